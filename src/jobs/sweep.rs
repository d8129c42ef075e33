//! Sweeps: every combination of a grid of config values and a list of seeds becomes one run,
//! all tagged with the sweep's name.
//!
//! The front end parses `--grid section.key=v1,v2,…` ([`parse_grid`]) and `--seeds`
//! ([`parse_seeds`]), checks every value against the config ([`check_grid`]) and builds one job
//! per [`Combination`]; the engine then plans the whole sweep before it writes anything
//! ([`plan`]): every job is checked as a single launch would be, and a combination whose spec
//! already finished (the store's spec identity), is queued or running, or repeats an earlier
//! combination is skipped. One bad combination refuses the sweep, and nothing is queued.
//!
//! [`table`] reads a sweep back: the config keys that vary between its runs against chosen final
//! metrics, best first.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::learn::LearnJob;
use super::synth::SynthJob;
use super::Checked;
use crate::config::{apply_overrides_as, Override};
use crate::error::{Error, Result};
use crate::store::{RunId, RunKind, RunStatus, SpecHash, Store};

/// Most runs one sweep may make (a typo in `--seeds 0..100000` should not queue a day's work).
pub const MAX_COMBINATIONS: usize = 10_000;

/// One `--grid section.key=v1,v2,…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grid {
    /// `section.key`.
    pub key: String,
    /// The values, as typed (TOML literals like `--set` takes).
    pub values: Vec<String>,
}

/// One combination of grid values and a seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Combination {
    /// `section.key=value` overrides, one per grid, in grid order (applied after `--set`).
    pub sets: Vec<String>,
    /// The seed.
    pub seed: u64,
}

impl Combination {
    /// `learn.lr=0.01 learn.lambda_penalty=0.02 seed 1`: how errors and listings name it.
    pub fn label(&self) -> String {
        let mut parts = self.sets.clone();
        parts.push(format!("seed {}", self.seed));
        parts.join(" ")
    }
}

/// Splits `text` at the commas that are not inside brackets or quotes (a list value like
/// `["a","b"]` stays one value).
fn split_values(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut quote, mut start) = (0i32, None::<char>, 0usize);
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(text[start..i].trim().to_string());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(text[start..].trim().to_string());
    out
}

/// Parses one `--grid section.key=v1,v2,…` of a sweep over `section` (`learn` or `synth`).
pub fn parse_grid(text: &str, section: &str) -> Result<Grid> {
    let bad = |why: String| Error::Input(format!("--grid {text}: {why}"));
    let (key, values) = text
        .split_once('=')
        .ok_or_else(|| bad("expected section.key=v1,v2,… (e.g. learn.lr=0.005,0.01)".into()))?;
    let key = key.trim();
    let (sec, name) = key
        .split_once('.')
        .ok_or_else(|| bad(format!("the key must be qualified, e.g. {section}.KEY")))?;
    if sec != section || name.is_empty() {
        return Err(bad(format!(
            "a {section} sweep varies {section}.* keys only"
        )));
    }
    let values = split_values(values);
    if values.iter().any(String::is_empty) {
        return Err(bad("an empty value (values are separated by commas)".into()));
    }
    let mut seen = BTreeSet::new();
    if let Some(dup) = values.iter().find(|v| !seen.insert(v.as_str())) {
        return Err(bad(format!("value {dup} is given twice")));
    }
    Ok(Grid {
        key: key.to_string(),
        values,
    })
}

/// Parses `--seeds`: `A..B` (A up to B − 1, as in Rust: `0..3` is 0, 1, 2), `A..=B`
/// (inclusive), or a list `0,4,7`.
pub fn parse_seeds(text: &str) -> Result<Vec<u64>> {
    let bad = |why: &str| Error::Input(format!("--seeds {text}: {why}"));
    let num = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| bad(&format!("`{}` is not a seed (a whole number)", s.trim())))
    };
    let seeds: Vec<u64> = if let Some((a, b)) = text.split_once("..=") {
        let (a, b) = (num(a)?, num(b)?);
        if b < a {
            return Err(bad("the range is empty"));
        }
        if b - a >= MAX_COMBINATIONS as u64 {
            return Err(bad(&format!("more than {MAX_COMBINATIONS} seeds")));
        }
        (a..=b).collect()
    } else if let Some((a, b)) = text.split_once("..") {
        let (a, b) = (num(a)?, num(b)?);
        if b <= a {
            return Err(bad("the range is empty (A..B runs A up to B - 1)"));
        }
        if b - a > MAX_COMBINATIONS as u64 {
            return Err(bad(&format!("more than {MAX_COMBINATIONS} seeds")));
        }
        (a..b).collect()
    } else {
        text.split(',').map(num).collect::<Result<_>>()?
    };
    let mut seen = BTreeSet::new();
    if let Some(dup) = seeds.iter().find(|s| !seen.insert(**s)) {
        return Err(bad(&format!("seed {dup} is given twice")));
    }
    Ok(seeds)
}

/// Checks every grid: no key twice, and each value alone applies to `base` (the config after
/// preset, `--config` and `--set`) with `--set`'s type checks; errors name `--grid`.
pub fn check_grid<T: Serialize + DeserializeOwned>(
    base: &T,
    section: &str,
    grids: &[Grid],
) -> Result<()> {
    let mut keys = BTreeSet::new();
    for g in grids {
        if !keys.insert(g.key.as_str()) {
            return Err(Error::Input(format!(
                "--grid {}: the key is given in two --grid flags",
                g.key
            )));
        }
        for v in &g.values {
            apply_overrides_as(base, section, &[override_of(&g.key, v)], "--grid")?;
        }
    }
    Ok(())
}

fn override_of(key: &str, value: &str) -> Override {
    let (section, key) = key.split_once('.').unwrap_or(("", key));
    Override {
        section: section.to_string(),
        key: key.to_string(),
        value: value.to_string(),
    }
}

/// `base` with a combination's grid values applied (errors name `--grid`).
pub fn apply<T: Serialize + DeserializeOwned>(
    base: &T,
    section: &str,
    combination: &Combination,
) -> Result<T> {
    let overrides: Vec<Override> = combination
        .sets
        .iter()
        .filter_map(|s| s.split_once('='))
        .map(|(k, v)| override_of(k, v))
        .collect();
    apply_overrides_as(base, section, &overrides, "--grid")
}

/// Every combination: the cartesian product of the grids (the last grid varies fastest), for
/// each seed in turn. Refused beyond [`MAX_COMBINATIONS`].
pub fn combinations(grids: &[Grid], seeds: &[u64]) -> Result<Vec<Combination>> {
    let count = grids
        .iter()
        .try_fold(seeds.len(), |n, g| n.checked_mul(g.values.len()))
        .filter(|&n| n <= MAX_COMBINATIONS);
    if count.is_none() {
        return Err(Error::Input(format!(
            "--grid: more than {MAX_COMBINATIONS} combinations"
        )));
    }
    let mut product: Vec<Vec<String>> = vec![Vec::new()];
    for g in grids {
        product = product
            .into_iter()
            .flat_map(|prefix| {
                g.values.iter().map(move |v| {
                    let mut p = prefix.clone();
                    p.push(format!("{}={v}", g.key));
                    p
                })
            })
            .collect();
    }
    Ok(seeds
        .iter()
        .flat_map(|&seed| {
            product.iter().map(move |sets| Combination {
                sets: sets.clone(),
                seed,
            })
        })
        .collect())
}

/// A sweep's default name: `KIND-KEY…-HASH`, the grid's key names and 8 hex digits of
/// `identity` (what defines the sweep: base job and combinations), so that the same sweep
/// typed again gets the same name.
pub fn default_name(kind: &str, grids: &[Grid], identity: &str) -> String {
    let keys: Vec<&str> = grids
        .iter()
        .map(|g| g.key.split_once('.').map_or(g.key.as_str(), |(_, k)| k))
        .collect();
    let hash = crate::store::Digest::of(identity.as_bytes()).to_hex();
    let mut name = kind.to_string();
    for k in keys {
        name.push('-');
        name.push_str(k);
    }
    // Tags are at most 64 bytes: keep room for the hash.
    name.truncate(54);
    format!("{name}-{}", &hash[..8])
}

/// One run of a sweep as the engine receives it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum SweepJob {
    /// A learning run.
    Learn(Box<LearnJob>),
    /// A synthesis run.
    Synth(Box<SynthJob>),
}

impl SweepJob {
    /// The device it asks for.
    pub fn device(&self) -> &str {
        match self {
            SweepJob::Learn(j) => &j.device,
            SweepJob::Synth(j) => &j.device,
        }
    }

    fn rerun(&self) -> bool {
        match self {
            SweepJob::Learn(j) => j.rerun,
            SweepJob::Synth(j) => j.rerun,
        }
    }

    /// Checks the job as a single launch would ([`super::learn::check`],
    /// [`super::synth::check`]), on `device` instead of its own (an engine checks `auto` jobs
    /// on one of its devices).
    pub fn check(&self, store: &Store, device: &str) -> Result<Checked> {
        match self {
            SweepJob::Learn(j) => super::learn::check(
                store,
                &LearnJob {
                    device: device.to_string(),
                    ..(**j).clone()
                },
            ),
            SweepJob::Synth(j) => super::synth::check(
                store,
                &SynthJob {
                    device: device.to_string(),
                    ..(**j).clone()
                },
            ),
        }
    }

    /// The runner's work for the recorded run `id`.
    pub fn into_work(self, id: RunId) -> super::runner::Work {
        match self {
            SweepJob::Learn(j) => super::runner::Work::Learn(id, j),
            SweepJob::Synth(j) => super::runner::Work::Synth(id, j),
        }
    }
}

/// One combination of a sweep as the front end sends it: how to name it, and its job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepEntry {
    /// The combination's [`Combination::label`].
    pub label: String,
    /// Its job.
    pub job: SweepJob,
}

/// What became of one combination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SweepItem {
    /// Queued as this new run.
    Queued(String),
    /// A finished run already has this spec: skipped (and tagged).
    Done(String),
    /// A queued or running run already has this spec: skipped (and tagged).
    Pending(String),
    /// Same spec as the combination at this index (0-based): skipped.
    Duplicate(usize),
}

impl SweepItem {
    /// The run this combination is, if any (a duplicate shares the earlier one's).
    pub fn run(&self) -> Option<&str> {
        match self {
            SweepItem::Queued(r) | SweepItem::Done(r) | SweepItem::Pending(r) => Some(r),
            SweepItem::Duplicate(_) => None,
        }
    }
}

/// One combination after [`plan`].
pub enum Planned {
    /// To record and queue.
    Queue(Box<Checked>),
    /// Skipped: see [`SweepItem`].
    Skip(SweepItem),
}

/// Checks every entry (on the device `check_device` gives for its own) and decides what to
/// do with it, writing nothing: a combination that fails its check refuses the whole sweep, in
/// one line naming it.
pub fn plan(
    store: &Store,
    entries: &[SweepEntry],
    check_device: &dyn Fn(&str) -> Result<String>,
) -> Result<Vec<Planned>> {
    // Runs that are queued or running now, by spec.
    let mut live: HashMap<SpecHash, RunId> = HashMap::new();
    for r in store.runs() {
        let Ok(r) = r else { continue };
        if matches!(r.status, RunStatus::Queued | RunStatus::Running) {
            live.entry(r.spec_hash).or_insert(r.id);
        }
    }
    let mut seen: HashMap<SpecHash, usize> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let named = |err: Error| {
            Error::Input(format!(
                "--grid: combination {} of {} ({}): {err}",
                i + 1,
                entries.len(),
                e.label
            ))
        };
        let device = check_device(e.job.device())?;
        let checked = match e.job.check(store, &device) {
            Ok(c) => c,
            Err(Error::AlreadyRan { run }) => {
                out.push(Planned::Skip(SweepItem::Done(run)));
                continue;
            }
            Err(err) => return Err(named(err)),
        };
        if let Some(&j) = seen.get(&checked.spec_hash) {
            out.push(Planned::Skip(SweepItem::Duplicate(j)));
            continue;
        }
        seen.insert(checked.spec_hash, i);
        match live.get(&checked.spec_hash) {
            Some(run) if !e.job.rerun() => {
                out.push(Planned::Skip(SweepItem::Pending(run.to_string())))
            }
            _ => out.push(Planned::Queue(Box::new(checked))),
        }
    }
    Ok(out)
}

/// A sweep read back: its varied keys against chosen metrics, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepTable {
    /// The sweep's name (its tag).
    pub name: String,
    /// The config keys (and `seed`) whose values differ between its runs.
    pub keys: Vec<String>,
    /// The metrics shown, in sort order.
    pub metrics: Vec<String>,
    /// For each metric, whether lower is better.
    pub lower_better: Vec<bool>,
    /// The runs, best first (runs without the first metric last).
    pub rows: Vec<SweepRow>,
    /// Every metric with a final value in any of the sweep's runs, by name (what `--by` may
    /// name; the workbench cycles through them).
    #[serde(default)]
    pub available: Vec<String>,
}

/// One run as [`table_of`] reads it: what the store (or a workbench backend) knows of it.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepRun {
    /// Run id.
    pub run: String,
    /// Learning or synthesis.
    pub kind: RunKind,
    /// Its status (`done`, `running`, …).
    pub status: String,
    /// Its config as flat `key → value` text ([`flat_config`]).
    pub config: BTreeMap<String, String>,
    /// The final value of each of its metric series.
    pub finals: BTreeMap<String, f64>,
}

/// One run of a [`SweepTable`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    /// Run id.
    pub run: String,
    /// Its status.
    pub status: String,
    /// Its value of each of the table's keys (`-` where it has none).
    pub values: Vec<String>,
    /// The final value of each of the table's metrics.
    pub metrics: Vec<Option<f64>>,
}

/// Whether lower is better for a metric with no explicit `:min` / `:max`: losses, leaks,
/// out-of-box shares and NSIM-D (similarity to the other instances); higher for the rest
/// (SIM-C, SIM-D, CS, the oracle's identity and presence).
pub fn lower_is_better(metric: &str) -> bool {
    metric.starts_with("loss")
        || metric.contains("leak")
        || metric.contains("outside")
        || metric.contains("elsewhere")
        || metric.contains("nsim")
}

/// Parses one `--by METRIC[:min|:max]`.
fn parse_by(text: &str) -> (String, bool) {
    match text.rsplit_once(':') {
        Some((m, "min")) => (m.to_string(), true),
        Some((m, "max")) => (m.to_string(), false),
        _ => (text.to_string(), lower_is_better(text)),
    }
}

/// The config of a spec as flat `key → value` text: `section.key` for each table's keys, the
/// other top-level entries (preset, dtype, prompt, …) as they are, `from` (the parent run) and
/// `seed`.
pub fn flat_config(spec: &crate::store::RunSpec) -> BTreeMap<String, String> {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = BTreeMap::new();
    if let Some(map) = spec.config.as_object() {
        for (k, v) in map {
            match v.as_object() {
                Some(inner) => {
                    for (ik, iv) in inner {
                        out.insert(format!("{k}.{ik}"), text(iv));
                    }
                }
                None => {
                    out.insert(k.clone(), text(v));
                }
            }
        }
    }
    if let Some(p) = &spec.parent {
        out.insert("from".into(), p.to_string());
    }
    out.insert("seed".into(), spec.seed.to_string());
    out
}

/// The sweep `name`: the runs tagged with it, the keys that vary between them, and the final
/// value of each metric of `by` (`METRIC`, `METRIC:min` or `METRIC:max`; none: `loss/total`,
/// else the first `loss/*` series the runs have), sorted best first by the first metric, then
/// the next. An unknown sweep is an error naming it.
pub fn table(store: &Store, name: &str, by: &[String]) -> Result<SweepTable> {
    let tags = store.all_tags()?;
    let mut runs = Vec::new();
    for r in store.runs() {
        let r = r?;
        if tags.get(&r.id).is_some_and(|t| t.iter().any(|t| t == name)) {
            let spec = store.spec(&r.spec_hash)?;
            runs.push(SweepRun {
                run: r.id.to_string(),
                kind: r.kind,
                status: r.status.as_str().to_string(),
                config: flat_config(&spec),
                finals: r.summary.iter().map(|(m, s)| (m.clone(), s.last)).collect(),
            });
        }
    }
    table_of(name, &runs, by)
}

/// [`table`] over runs already read (`runs`: those tagged `name`); the workbench's backends
/// share it, so every front end orders a sweep the same way.
pub fn table_of(name: &str, runs: &[SweepRun], by: &[String]) -> Result<SweepTable> {
    if runs.is_empty() {
        return Err(Error::Input(format!(
            "sweep {name}: no run is tagged {name} (see `mifo runs ls`)"
        )));
    }
    let kinds: BTreeSet<RunKind> = runs.iter().map(|r| r.kind).collect();
    if kinds.len() > 1 {
        return Err(Error::Input(format!(
            "sweep {name}: its runs mix learning and synthesis; not a sweep"
        )));
    }
    let all_keys: BTreeSet<&String> = runs.iter().flat_map(|r| r.config.keys()).collect();
    let mut keys: Vec<String> = all_keys
        .into_iter()
        .filter(|k| {
            let values: BTreeSet<Option<&String>> = runs.iter().map(|r| r.config.get(*k)).collect();
            values.len() > 1
        })
        .cloned()
        .collect();
    // The seed last: the grid's keys are what the table is about.
    if let Some(i) = keys.iter().position(|k| k == "seed") {
        let seed = keys.remove(i);
        keys.push(seed);
    }
    let names: BTreeSet<&String> = runs.iter().flat_map(|r| r.finals.keys()).collect();
    let chosen: Vec<(String, bool)> = if by.is_empty() {
        let default = if names.iter().any(|n| *n == "loss/total") {
            Some("loss/total".to_string())
        } else {
            names
                .iter()
                .find(|n| n.starts_with("loss/"))
                .map(|n| n.to_string())
        };
        default.map(|m| (m, true)).into_iter().collect()
    } else {
        by.iter().map(|b| parse_by(b)).collect()
    };
    let mut rows: Vec<SweepRow> = runs
        .iter()
        .map(|r| SweepRow {
            run: r.run.clone(),
            status: r.status.clone(),
            values: keys
                .iter()
                .map(|k| r.config.get(k).cloned().unwrap_or_else(|| "-".into()))
                .collect(),
            metrics: chosen
                .iter()
                .map(|(m, _)| r.finals.get(m).copied().filter(|v| !v.is_nan()))
                .collect(),
        })
        .collect();
    rows.sort_by(|a, b| {
        for (i, (_, lower)) in chosen.iter().enumerate() {
            let order = match (a.metrics[i], b.metrics[i]) {
                (Some(x), Some(y)) if *lower => x.total_cmp(&y),
                (Some(x), Some(y)) => y.total_cmp(&x),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            if order != std::cmp::Ordering::Equal {
                return order;
            }
        }
        a.run.cmp(&b.run)
    });
    Ok(SweepTable {
        name: name.to_string(),
        keys,
        metrics: chosen.iter().map(|(m, _)| m.clone()).collect(),
        lower_better: chosen.iter().map(|(_, l)| *l).collect(),
        rows,
        available: names.into_iter().cloned().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_split_at_top_level_commas_and_name_the_flag() {
        let g = parse_grid("learn.lr=0.005, 0.01,0.02", "learn").unwrap();
        assert_eq!(g.key, "learn.lr");
        assert_eq!(g.values, ["0.005", "0.01", "0.02"]);
        let g = parse_grid(r#"learn.attn_layers=["a","b"],["c"]"#, "learn").unwrap();
        assert_eq!(g.values, [r#"["a","b"]"#, r#"["c"]"#]);
        for (bad, needle) in [
            ("learn.lr", "expected section.key="),
            ("lr=1,2", "must be qualified"),
            ("synth.steps=1,2", "learn.* keys only"),
            ("learn.lr=1,,2", "empty value"),
            ("learn.lr=1,1", "given twice"),
        ] {
            let e = parse_grid(bad, "learn").unwrap_err().to_string();
            assert!(e.starts_with(&format!("--grid {bad}:")), "{e}");
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn seeds_are_ranges_or_lists() {
        assert_eq!(parse_seeds("0..3").unwrap(), [0, 1, 2]);
        assert_eq!(parse_seeds("2..=4").unwrap(), [2, 3, 4]);
        assert_eq!(parse_seeds("7,1").unwrap(), [7, 1]);
        for bad in ["3..3", "a..2", "1,1", "0..99999999", ""] {
            let e = parse_seeds(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--seeds {bad}:")), "{e}");
        }
    }

    #[test]
    fn combinations_are_the_cartesian_product_times_the_seeds() {
        let grids = [
            parse_grid("learn.a=1,2", "learn").unwrap(),
            parse_grid("learn.b=x,y,z", "learn").unwrap(),
        ];
        let c = combinations(&grids, &[0, 1]).unwrap();
        assert_eq!(c.len(), 12);
        assert_eq!(c[0].sets, ["learn.a=1", "learn.b=x"]);
        assert_eq!(c[1].sets, ["learn.a=1", "learn.b=y"]);
        assert_eq!(c[3].sets, ["learn.a=2", "learn.b=x"]);
        assert_eq!((c[5].seed, c[6].seed), (0, 1));
        assert_eq!(c[0].label(), "learn.a=1 learn.b=x seed 0");
        assert_eq!(combinations(&[], &[4]).unwrap().len(), 1);
        let name = default_name("learn", &grids, "x");
        assert!(name.starts_with("learn-a-b-") && name.len() == "learn-a-b-".len() + 8);
        assert_eq!(name, default_name("learn", &grids, "x"));
        assert_ne!(name, default_name("learn", &grids, "y"));
    }

    #[test]
    fn grid_values_are_checked_against_the_config() {
        let base = crate::learn::LearnConfig::paper();
        let ok = [parse_grid("learn.lr=0.01,0.02", "learn").unwrap()];
        check_grid(&base, "learn", &ok).unwrap();
        let bad = [parse_grid("learn.lr=0.01,fast", "learn").unwrap()];
        let e = check_grid(&base, "learn", &bad).unwrap_err().to_string();
        assert!(
            e.starts_with("--grid learn.lr=fast: expected a number"),
            "{e}"
        );
        let unknown = [parse_grid("learn.nope=1", "learn").unwrap()];
        let e = check_grid(&base, "learn", &unknown)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--grid learn.nope=1: unknown key"), "{e}");
        let c = &combinations(&ok, &[0]).unwrap()[1];
        assert_eq!(apply(&base, "learn", c).unwrap().lr, 0.02);
    }

    #[test]
    fn metric_directions() {
        assert!(lower_is_better("loss/total"));
        assert!(lower_is_better("oracle/leak"));
        assert!(lower_is_better("eval/nsim_d"));
        assert!(!lower_is_better("eval/sim_d"));
        assert!(!lower_is_better("oracle/identity"));
        assert_eq!(parse_by("eval/cs:min"), ("eval/cs".to_string(), true));
        assert_eq!(
            parse_by("loss/total:max"),
            ("loss/total".to_string(), false)
        );
    }
}
