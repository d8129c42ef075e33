//! The arithmetic of the scores: cosine similarity, the composite score, means, and the text
//! SIM-C compares the image with.

use std::collections::BTreeMap;

use regex::Regex;

/// Norms below this count as this (PyTorch's `cosine_similarity` eps).
pub const COSINE_EPS: f64 = 1e-8;

/// Cosine similarity `a·b / (max(‖a‖, ε)·max(‖b‖, ε))`, accumulated in f64 (PyTorch's
/// `F.cosine_similarity`). Vectors of different lengths compare over the shorter one.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    dot / (na.sqrt().max(COSINE_EPS) * nb.sqrt().max(COSINE_EPS))
}

/// The paper's composite score (App. C.4): `CS = SIM-C · SIM-D · (1 − NSIM-D)`.
pub fn composite(sim_c: f64, sim_d: f64, nsim_d: f64) -> f64 {
    sim_c * sim_d * (1.0 - nsim_d)
}

/// The mean of `values`; `None` when there are none.
pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn placeholder_pattern() -> Regex {
    Regex::new(r"<v[0-9]+>").expect("static pattern")
}

/// The placeholders (`<v0>`, `<v1>`, …) in `prompt`, in order of first appearance.
pub fn placeholders(prompt: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in placeholder_pattern().find_iter(prompt) {
        if !out.iter().any(|p| p == m.as_str()) {
            out.push(m.as_str().to_string());
        }
    }
    out
}

/// The text SIM-C compares a generated image with. Each placeholder `<vK>` becomes its class
/// word from `classes` when there is one; otherwise it is dropped, together with a joiner
/// (`and`, `&`, `,` or `, and`) between it and a neighbouring placeholder. Whitespace runs
/// become one space and spaces before punctuation go.
///
/// `a photo of <v0> and <v1> at the beach` → `a photo of cup and spoon at the beach` with both
/// words, `a photo of spoon at the beach` with only `<v1>`'s, `a photo of at the beach` with
/// none.
pub fn sim_c_text(prompt: &str, classes: &BTreeMap<String, String>) -> String {
    let pattern = placeholder_pattern();
    let joiner = Regex::new(r"^\s*(,\s*and|,|and|&)?\s*$").expect("static pattern");
    let found: Vec<(usize, usize, String)> = pattern
        .find_iter(prompt)
        .map(|m| (m.start(), m.end(), m.as_str().to_string()))
        .collect();
    let kept = |name: &str| classes.get(name).filter(|w| !w.trim().is_empty());
    let mut out = String::new();
    let mut pos = 0;
    for (i, (start, end, name)) in found.iter().enumerate() {
        let between = &prompt[pos..*start];
        let prev_dropped = i > 0 && kept(&found[i - 1].2).is_none();
        let this_dropped = kept(name).is_none();
        if i > 0 && (prev_dropped || this_dropped) && joiner.is_match(between) {
            out.push(' ');
        } else {
            out.push_str(between);
        }
        if let Some(word) = kept(name) {
            out.push_str(word.trim());
        }
        pos = *end;
    }
    out.push_str(&prompt[pos..]);
    let spaced = Regex::new(r"\s+")
        .expect("static pattern")
        .replace_all(&out, " ");
    Regex::new(r" ([,.!?;:])")
        .expect("static pattern")
        .replace_all(spaced.trim(), "$1")
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_and_composite_match_hand_values() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12);
        assert!((cosine(&[3.0, 4.0], &[-3.0, -4.0]) + 1.0).abs() < 1e-12);
        assert!(
            (cosine(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]) - 32.0 / (14f64.sqrt() * 77f64.sqrt()))
                .abs()
                < 1e-12
        );
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        // The paper's Table 3, "Ours": 0.609 · 0.792 · (1 − 0.726) = 0.1321578…
        assert!((composite(0.609, 0.792, 0.726) - 0.132_157_872).abs() < 1e-9);
        assert_eq!(mean(&[]), None);
        assert_eq!(mean(&[0.5, 1.0]), Some(0.75));
    }

    #[test]
    fn placeholders_become_class_words_or_disappear() {
        let none = BTreeMap::new();
        let mut both = BTreeMap::new();
        both.insert("<v0>".to_string(), "cup".to_string());
        both.insert("<v1>".to_string(), "spoon".to_string());
        let mut one = BTreeMap::new();
        one.insert("<v1>".to_string(), "spoon".to_string());
        let p = "a photo of <v0> and <v1> at the beach";
        assert_eq!(
            sim_c_text(p, &both),
            "a photo of cup and spoon at the beach"
        );
        assert_eq!(sim_c_text(p, &one), "a photo of spoon at the beach");
        assert_eq!(sim_c_text(p, &none), "a photo of at the beach");
        assert_eq!(
            sim_c_text("a photo of <v0>, <v1> and <v2>", &none),
            "a photo of"
        );
        assert_eq!(
            sim_c_text("<v0> floating on top of water, <v1>'s shadow", &both),
            "cup floating on top of water, spoon's shadow"
        );
        assert_eq!(sim_c_text("a photo of <v0> .", &none), "a photo of.");
        assert_eq!(
            placeholders("<v1> and <v0> near <v1>"),
            vec!["<v1>", "<v0>"]
        );
    }
}
