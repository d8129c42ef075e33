//! Prompt suites for evaluation runs: `editability`, the ten prompt templates of the paper's
//! Table 4 (App. C.6), for each learned instance alone and for all of them together.

use crate::error::{Error, Result};

/// The paper's Table 4 templates; `{}` stands for the instance(s).
pub const EDITABILITY_TEMPLATES: [&str; 10] = [
    "a photo of {} at the beach",
    "a photo of {} in the jungle",
    "a photo of {} in the snow",
    "a photo of {} in the street",
    "a photo of {} on top of a pink fabric",
    "a photo of {} floating on top of water",
    "a photo of {} on top of a wooden floor",
    "a photo of {} with a city in the background",
    "a photo of {} with a mountain in the background",
    "a photo of {} with the Eiffel tower in the background",
];

/// Box of a single instance (normalised x0, y0, x1, y1).
pub const SINGLE_BOX: [f64; 4] = [0.2, 0.15, 0.8, 0.9];

/// The suites `mifo synth --suite` knows.
pub const SUITES: [&str; 1] = ["editability"];

/// One synthesis of a suite.
#[derive(Clone, Debug, PartialEq)]
pub struct SuitePrompt {
    /// The prompt.
    pub prompt: String,
    /// The placeholders in it, each with a box.
    pub subjects: Vec<String>,
    /// Which group it belongs to: the placeholder, or `all`.
    pub group: String,
}

/// The prompts of suite `name` for a learning run with `instances` instances: every template
/// for `<v0>`, then for `<v1>`, …, then (two or more instances) for all of them joined with
/// `and`.
pub fn prompts(name: &str, instances: usize) -> Result<Vec<SuitePrompt>> {
    if name != "editability" {
        return Err(Error::Input(format!(
            "--suite {name}: unknown suite (known: {})",
            SUITES.join(", ")
        )));
    }
    if instances == 0 {
        return Err(Error::Input("the learning run has no instances".into()));
    }
    let names: Vec<String> = (0..instances).map(crate::learn::token_name).collect();
    let mut groups: Vec<(String, Vec<String>)> =
        names.iter().map(|n| (n.clone(), vec![n.clone()])).collect();
    if instances > 1 {
        groups.push(("all".into(), names.clone()));
    }
    let mut out = Vec::new();
    for (group, subjects) in groups {
        for t in EDITABILITY_TEMPLATES {
            out.push(SuitePrompt {
                prompt: t.replace("{}", &subjects.join(" and ")),
                subjects: subjects.clone(),
                group: group.clone(),
            });
        }
    }
    Ok(out)
}

/// Default boxes: one instance in [`SINGLE_BOX`]; several side by side, each an equal share of
/// the width between 0.05 and 0.95 (0.04 apart), from 0.2 to 0.9 in height.
pub fn default_boxes(subjects: &[String]) -> Vec<String> {
    let fmt = |v: f64| {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    if subjects.len() == 1 {
        let [a, b, c, d] = SINGLE_BOX;
        return vec![format!(
            "{}={},{},{},{}",
            subjects[0],
            fmt(a),
            fmt(b),
            fmt(c),
            fmt(d)
        )];
    }
    let n = subjects.len() as f64;
    let share = 0.9 / n;
    subjects
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let x0 = 0.05 + i as f64 * share + if i > 0 { 0.02 } else { 0.0 };
            let x1 = 0.05 + (i + 1) as f64 * share - if (i as f64) < n - 1.0 { 0.02 } else { 0.0 };
            format!("{s}={},{},{},{}", fmt(x0), fmt(0.2), fmt(x1), fmt(0.9))
        })
        .collect()
}

/// The default tag of a suite run from learning run `id`: `<suite>-<first 12 characters>`.
pub fn default_tag(suite: &str, id: &str) -> String {
    format!("{suite}-{}", &id[..id.len().min(12)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_instances_give_thirty_prompts_with_boxes() {
        let p = prompts("editability", 2).unwrap();
        assert_eq!(p.len(), 30);
        assert_eq!(p[0].prompt, "a photo of <v0> at the beach");
        assert_eq!(
            p[19].prompt,
            "a photo of <v1> with the Eiffel tower in the background"
        );
        assert_eq!(p[20].prompt, "a photo of <v0> and <v1> at the beach");
        assert_eq!(p[20].group, "all");
        assert_eq!(prompts("editability", 1).unwrap().len(), 10);
        assert!(prompts("beauty", 2).is_err());
        assert_eq!(
            default_boxes(&["<v1>".into()]),
            vec!["<v1>=0.2,0.15,0.8,0.9"]
        );
        assert_eq!(
            default_boxes(&["<v0>".into(), "<v1>".into()]),
            vec!["<v0>=0.05,0.2,0.48,0.9", "<v1>=0.52,0.2,0.95,0.9"]
        );
        for b in default_boxes(&["<v0>".into(), "<v1>".into(), "<v2>".into()]) {
            crate::synth::parse_box(&b).unwrap();
        }
        assert_eq!(
            default_tag("editability", "01m8c5s5mwfsx10c"),
            "editability-01m8c5s5mwfs"
        );
    }
}
