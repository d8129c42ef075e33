//! Mean tables over groups of evaluated runs, laid out as the paper's Tables 2 and 3.
//!
//! Each row is one group (a tag: one method or setting). Its SIM-C, SIM-D and NSIM-D are the
//! means over the group's runs of their stored run means; CS is computed from the row's means
//! (`SIM-C · SIM-D · (1 − NSIM-D)`, which is how the paper's Table 3 values relate), and the
//! Table 2 column is the plain product `SIM-D × NSIM-D` the paper prints there (research notes
//! §7: that column equals the product of its neighbours, not the CS definition).

use std::collections::BTreeMap;

use serde::Serialize;

use super::score::{composite, mean};

/// One row of the tables.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TableRow {
    /// The group (tag).
    pub label: String,
    /// Runs with scores in the group.
    pub runs: usize,
    /// Mean SIM-C.
    pub sim_c: Option<f64>,
    /// Mean SIM-D.
    pub sim_d: Option<f64>,
    /// Mean NSIM-D.
    pub nsim_d: Option<f64>,
    /// CS from the means.
    pub cs: Option<f64>,
    /// SIM-D × NSIM-D (Table 2's third column).
    pub sim_d_x_nsim_d: Option<f64>,
}

/// The row of `label` from the `eval/*` metrics of its runs (name → value).
pub fn row(label: &str, runs: &[BTreeMap<String, f64>]) -> TableRow {
    let col = |name: &str| {
        mean(
            &runs
                .iter()
                .filter_map(|m| m.get(name).copied())
                .collect::<Vec<_>>(),
        )
    };
    let (sim_c, sim_d, nsim_d) = (col("eval/sim_c"), col("eval/sim_d"), col("eval/nsim_d"));
    TableRow {
        label: label.to_string(),
        runs: runs
            .iter()
            .filter(|m| m.keys().any(|k| k.starts_with("eval/")))
            .count(),
        sim_c,
        sim_d,
        nsim_d,
        cs: match (sim_c, sim_d, nsim_d) {
            (Some(c), Some(d), Some(n)) => Some(composite(c, d, n)),
            _ => None,
        },
        sim_d_x_nsim_d: match (sim_d, nsim_d) {
            (Some(d), Some(n)) => Some(d * n),
            _ => None,
        },
    }
}

/// The headline scores of a run, in the paper's order: (label, metric name).
pub const HEADLINE: [(&str, &str); 4] = [
    ("SIM-C", "eval/sim_c"),
    ("SIM-D", "eval/sim_d"),
    ("NSIM-D", "eval/nsim_d"),
    ("CS", "eval/cs"),
];

/// `SIM-C 0.1418  SIM-D 0.7107  NSIM-D 0.7333  CS 0.0269` from a run's `eval/*` values (`–`
/// where one is missing); `None` when the run has no scores.
pub fn headline(values: &BTreeMap<String, f64>) -> Option<String> {
    if !HEADLINE.iter().any(|(_, k)| values.contains_key(*k)) {
        return None;
    }
    Some(
        HEADLINE
            .iter()
            .map(|(label, k)| format!("{label} {}", cell(values.get(*k).copied(), 4)))
            .collect::<Vec<_>>()
            .join("  "),
    )
}

/// Per-instance lines, `<v0>  SIM-D 0.6797  NSIM-D 0.7380`, from a run's `eval/*` values.
pub fn instance_lines(values: &BTreeMap<String, f64>) -> Vec<String> {
    values
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("eval/sim_d/").map(|name| (name, *v)))
        .map(|(name, sim)| {
            format!(
                "{name}  SIM-D {}  NSIM-D {}",
                cell(Some(sim), 4),
                cell(values.get(&format!("eval/nsim_d/{name}")).copied(), 4)
            )
        })
        .collect()
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.digits$}"))
}

/// Both tables as text: Table 2's layout (SIM-D↑, NSIM-D↓, SIM-D × NSIM-D↑, four decimals)
/// and Table 3's (SIM-C↑, SIM-D↑, NSIM-D↓, CS↑, three decimals).
pub fn render(rows: &[TableRow]) -> String {
    let width = rows
        .iter()
        .map(|r| r.label.chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    let mut out = String::new();
    out.push_str("Table 2 layout (semantic learning)\n");
    out.push_str(&format!(
        "{:<width$}  {:>5}  {:>7}  {:>7}  {:>13}\n",
        "Method", "runs", "SIM-D↑", "NSIM-D↓", "SIM-D×NSIM-D↑"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:<width$}  {:>5}  {:>7}  {:>7}  {:>13}\n",
            r.label,
            r.runs,
            cell(r.sim_d, 4),
            cell(r.nsim_d, 4),
            cell(r.sim_d_x_nsim_d, 4)
        ));
    }
    out.push('\n');
    out.push_str("Table 3 layout (precise synthesis)\n");
    out.push_str(&format!(
        "{:<width$}  {:>5}  {:>6}  {:>6}  {:>7}  {:>6}\n",
        "Method", "runs", "SIM-C↑", "SIM-D↑", "NSIM-D↓", "CS↑"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:<width$}  {:>5}  {:>6}  {:>6}  {:>7}  {:>6}\n",
            r.label,
            r.runs,
            cell(r.sim_c, 3),
            cell(r.sim_d, 3),
            cell(r.nsim_d, 3),
            cell(r.cs, 3)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(c: f64, d: f64, n: f64) -> BTreeMap<String, f64> {
        [("eval/sim_c", c), ("eval/sim_d", d), ("eval/nsim_d", n)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    #[test]
    fn rows_average_runs_and_derive_cs_from_the_means() {
        let r = row("ours", &[run(0.6, 0.8, 0.7), run(0.618, 0.784, 0.752)]);
        assert_eq!(r.runs, 2);
        assert!((r.sim_c.unwrap() - 0.609).abs() < 1e-12);
        assert!((r.sim_d.unwrap() - 0.792).abs() < 1e-12);
        assert!((r.nsim_d.unwrap() - 0.726).abs() < 1e-12);
        assert!((r.cs.unwrap() - 0.132_157_872).abs() < 1e-9);
        assert!((r.sim_d_x_nsim_d.unwrap() - 0.792 * 0.726).abs() < 1e-12);
        let text = render(&[r]);
        assert!(
            text.contains("ours        2   0.7920   0.7260         0.5750"),
            "{text}"
        );
        assert!(
            text.contains("ours        2   0.609   0.792    0.726   0.132"),
            "{text}"
        );
        let empty = row("none", &[BTreeMap::new()]);
        assert_eq!((empty.runs, empty.cs), (0, None));
        let mut one = run(0.5, 0.25, 0.125);
        one.insert("eval/sim_d/<v0>".into(), 0.25);
        assert_eq!(
            headline(&one).unwrap(),
            "SIM-C 0.5000  SIM-D 0.2500  NSIM-D 0.1250  CS –"
        );
        assert_eq!(instance_lines(&one), vec!["<v0>  SIM-D 0.2500  NSIM-D –"]);
        assert_eq!(headline(&BTreeMap::new()), None);
    }
}
