//! `mifo sweep learn|synth|show`: a grid of config values × seeds as tagged runs of the engine,
//! and the table of a sweep's varied keys against its final metrics.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};

use super::learn::LearnArgs;
use super::synth::SynthArgs;
use crate::engine::{Client, Request, Response};
use crate::jobs::sweep::{
    apply, check_grid, combinations, default_name, parse_grid, parse_seeds, Combination, Grid,
    SweepEntry, SweepItem, SweepJob, SweepTable,
};

/// `mifo sweep` subcommands.
#[derive(Subcommand, Debug)]
pub enum SweepCommand {
    /// Learning runs for every combination of the --grid values and --seeds, all tagged with
    /// the sweep's name; every other flag is `mifo learn`'s.
    #[command(
        after_help = "Examples:\n  mifo sweep learn --scene fixtures/scenes/coffee --model fixtures/tiny-sd21 \\\n      --grid learn.lambda_penalty=0.005,0.01,0.02 --grid learn.lr=0.005,0.01 --seeds 0..3 --name pen\n  mifo sweep show pen --by loss/total\n\nA combination whose exact spec already finished is skipped (and tagged), so the same sweep\ntyped again queues nothing new; with --rerun every combination runs again."
    )]
    Learn(Box<SweepLearnArgs>),
    /// Synthesis runs for every combination of the --grid values and --seeds (e.g. from one
    /// learned run with --from RUN), all tagged with the sweep's name; every other flag is
    /// `mifo synth`'s (no --suite).
    #[command(
        after_help = "Example:\n  mifo sweep synth --from 01m8c --prompt \"a photo of <v0> and <v1>\" \\\n      --box \"<v0>=0.05,0.3,0.45,0.95\" --box \"<v1>=0.55,0.3,0.95,0.95\" \\\n      --grid synth.step_size=0.5,1,2 --seeds 0..4 --name steps\n  mifo eval --tag steps --clip DIR --dino DIR && mifo sweep show steps --by eval/sim_d"
    )]
    Synth(Box<SweepSynthArgs>),
    /// The table of a sweep: the config keys that vary between its runs against the final
    /// value of each --by metric, best first.
    Show(SweepShowArgs),
}

/// What every sweep takes besides the flags of the command it repeats.
#[derive(Args, Debug)]
pub struct SweepArgs {
    /// Vary one config key: SECTION.KEY=V1,V2,… (values as --set takes them; commas inside
    /// [lists] stay). Repeatable: every combination of the grids runs; applied after --set.
    #[arg(long = "grid", value_name = "SECTION.KEY=V1,V2,…")]
    pub grids: Vec<String>,
    /// The seeds: A..B (A up to B-1: 0..3 is 0, 1, 2), A..=B, or a list 0,4,7; each
    /// combination of the grids runs once per seed. Default: --seed, else 0.
    #[arg(long, value_name = "RANGE|LIST", conflicts_with = "seed")]
    pub seeds: Option<String>,
    /// The sweep's name: the tag of its runs (for `sweep show`, `runs ls --tag`, `eval --tag`).
    /// Default: KIND-KEYS-HASH, the same for the same sweep typed again.
    #[arg(long)]
    pub name: Option<String>,
}

/// Arguments of `mifo sweep learn`.
#[derive(Args, Debug)]
pub struct SweepLearnArgs {
    /// The grid, seeds and name.
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// `mifo learn`'s flags: the runs' common part.
    #[command(flatten)]
    pub learn: LearnArgs,
}

/// Arguments of `mifo sweep synth`.
#[derive(Args, Debug)]
pub struct SweepSynthArgs {
    /// The grid, seeds and name.
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// `mifo synth`'s flags: the runs' common part.
    #[command(flatten)]
    pub synth: SynthArgs,
}

/// Arguments of `mifo sweep show`.
#[derive(Args, Debug)]
pub struct SweepShowArgs {
    /// The sweep's name (the tag of its runs).
    pub name: String,
    /// A metric to show and sort by, best first: its final value (repeatable; the first sorts,
    /// the next breaks ties). Lower is better for loss/*, *leak*, *outside* and eval/nsim_d,
    /// higher for the rest; METRIC:min or METRIC:max says which. Default: loss/total.
    #[arg(long, value_name = "METRIC[:min|:max]")]
    pub by: Vec<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `mifo sweep …`.
pub fn run(cmd: SweepCommand, store: &Path) -> anyhow::Result<()> {
    match cmd {
        SweepCommand::Learn(args) => learn(*args, store),
        SweepCommand::Synth(args) => synth(*args, store),
        SweepCommand::Show(args) => show(args, store),
    }
}

/// The parsed grid and seeds of a sweep over `section`.
fn grid_and_seeds(
    sweep: &SweepArgs,
    seed: Option<u64>,
    section: &str,
) -> anyhow::Result<(Vec<Grid>, Vec<u64>)> {
    let grids = sweep
        .grids
        .iter()
        .map(|g| parse_grid(g, section))
        .collect::<crate::Result<Vec<_>>>()?;
    let seeds = match &sweep.seeds {
        Some(s) => parse_seeds(s)?,
        None => vec![seed.unwrap_or(0)],
    };
    Ok((grids, seeds))
}

/// `--grid: combination K of N (LABEL): WHY`.
fn combination_error(i: usize, n: usize, c: &Combination, e: impl std::fmt::Display) -> String {
    format!("--grid: combination {} of {n} ({}): {e}", i + 1, c.label())
}

/// One entry per combination: `base_config` with the combination's values in `section`, checked
/// by `check` (a failure names the combination), made into a job by `job` with its seed.
fn entries<C: serde::Serialize + serde::de::DeserializeOwned>(
    base_config: &C,
    section: &str,
    combos: &[Combination],
    check: impl Fn(&C) -> crate::Result<()>,
    job: impl Fn(C, u64) -> SweepJob,
) -> anyhow::Result<Vec<SweepEntry>> {
    combos
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let config = apply(base_config, section, c)?;
            check(&config).map_err(|e| anyhow!(combination_error(i, combos.len(), c, e)))?;
            Ok(SweepEntry {
                label: c.label(),
                job: job(config, c.seed),
            })
        })
        .collect()
}

fn learn(args: SweepLearnArgs, store: &Path) -> anyhow::Result<()> {
    let SweepLearnArgs { sweep, learn } = args;
    if learn.resume.is_some() {
        bail!("--resume: a sweep starts new runs; resume one with `mifo learn --resume RUN`");
    }
    let (grids, seeds) = grid_and_seeds(&sweep, learn.seed, "learn")?;
    let (_, base_config) = super::learn::resolve_config(&learn)?;
    check_grid(&base_config, "learn", &grids)?;
    let base = super::learn::build_job(&learn)?;
    let entries = entries(
        &base_config,
        "learn",
        &combinations(&grids, &seeds)?,
        crate::learn::LearnConfig::validate,
        |config, seed| {
            SweepJob::Learn(Box::new(crate::jobs::learn::LearnJob {
                config,
                seed,
                ..base.clone()
            }))
        },
    )?;
    submit(
        store,
        "learn",
        &sweep,
        &grids,
        seeds.len(),
        entries,
        learn.json,
        learn.detach,
    )
}

fn synth(args: SweepSynthArgs, store: &Path) -> anyhow::Result<()> {
    let SweepSynthArgs { sweep, synth } = args;
    if synth.suite.is_some() {
        bail!("--suite: not in a sweep (a suite is its own set of runs: `mifo synth --suite`)");
    }
    let (grids, seeds) = grid_and_seeds(&sweep, synth.seed, "synth")?;
    let base_config = super::synth::resolve_config(&synth)?;
    check_grid(&base_config, "synth", &grids)?;
    let base = super::synth::build_job(&synth, store)?;
    let entries = entries(
        &base_config,
        "synth",
        &combinations(&grids, &seeds)?,
        crate::synth::SynthConfig::check,
        |config, seed| {
            SweepJob::Synth(Box::new(crate::jobs::synth::SynthJob {
                config,
                seed,
                ..base.clone()
            }))
        },
    )?;
    submit(
        store,
        "synth",
        &sweep,
        &grids,
        seeds.len(),
        entries,
        synth.json,
        synth.detach,
    )
}

/// What defines a sweep, for its default name: each run's job without its device.
fn identity(entries: &[SweepEntry]) -> String {
    let jobs: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(&e.job).unwrap_or_default();
            for job in v.as_object_mut().into_iter().flat_map(|m| m.values_mut()) {
                if let Some(job) = job.as_object_mut() {
                    job.remove("device");
                    job.remove("rerun");
                }
            }
            v
        })
        .collect();
    serde_json::Value::Array(jobs).to_string()
}

/// Submits the sweep to the engine, reports what it queued and skipped, then follows the queued
/// runs (unless `detach`) and prints the sweep's table.
#[allow(clippy::too_many_arguments)]
fn submit(
    store: &Path,
    kind: &str,
    sweep: &SweepArgs,
    grids: &[Grid],
    seed_count: usize,
    entries: Vec<SweepEntry>,
    json: bool,
    detach: bool,
) -> anyhow::Result<()> {
    let name = match &sweep.name {
        Some(n) => n.clone(),
        None => default_name(kind, grids, &identity(&entries)),
    };
    crate::store::validate_tag(&name).map_err(|e| anyhow!("--name {name}: {e}"))?;
    let labels: Vec<String> = entries.iter().map(|e| e.label.clone()).collect();
    let total = entries.len();
    let items = match Client::connect(store)?.request(&Request::SubmitSweep {
        name: name.clone(),
        entries,
    })? {
        Response::Sweep(items) => items,
        Response::Error(e) => bail!(e),
        other => bail!("engine: unexpected reply {other:?}"),
    };
    let count = |f: fn(&SweepItem) -> bool| items.iter().filter(|i| f(i)).count();
    let queued = count(|i| matches!(i, SweepItem::Queued(_)));
    let done = count(|i| matches!(i, SweepItem::Done(_)));
    let pending = count(|i| matches!(i, SweepItem::Pending(_)));
    let duplicate = count(|i| matches!(i, SweepItem::Duplicate(_)));
    if !json {
        let mut line = format!(
            "sweep {name}: {total} runs ({} combination(s) × {seed_count} seed(s)): queued {queued}, skipped {done} already done",
            total / seed_count.max(1)
        );
        if pending > 0 {
            line.push_str(&format!(", {pending} already queued or running"));
        }
        if duplicate > 0 {
            line.push_str(&format!(", {duplicate} with the same spec as another"));
        }
        eprintln!("{line}");
    }
    let mut statuses: Vec<String> = Vec::with_capacity(items.len());
    let mut failed = 0;
    for (i, item) in items.iter().enumerate() {
        let status = match item {
            SweepItem::Done(_) => "done".to_string(),
            SweepItem::Duplicate(j) => format!("same as #{}", j + 1),
            SweepItem::Queued(_) | SweepItem::Pending(_) if detach => "queued".to_string(),
            SweepItem::Queued(id) | SweepItem::Pending(id) => {
                let s = super::engine::follow(store, id, true)?;
                if !json {
                    eprintln!("[{}/{}] {id} {s}: {}", i + 1, items.len(), labels[i]);
                }
                if s != "done" {
                    failed += 1;
                }
                s
            }
        };
        statuses.push(status);
    }
    if json {
        let runs: Vec<serde_json::Value> = items
            .iter()
            .zip(&labels)
            .zip(&statuses)
            .map(|((item, label), status)| {
                serde_json::json!({"combination": label, "id": item.run(), "status": status})
            })
            .collect();
        let doc = serde_json::json!({
            "name": name,
            "queued": queued,
            "skipped_done": done,
            "skipped_pending": pending,
            "skipped_duplicate": duplicate,
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else if detach {
        eprintln!("follow it with `mifo sweep show {name}` or `mifo runs ls --tag {name}`");
    } else {
        let table = fetch_table(store, &name, &[])?;
        let mut out = std::io::stdout().lock();
        format_table(&table, &mut out)?;
    }
    if failed > 0 {
        bail!("{failed} of {} sweep runs did not finish", items.len());
    }
    Ok(())
}

/// The engine's table of sweep `name` (see [`crate::jobs::sweep::table`]).
pub fn fetch_table(store: &Path, name: &str, by: &[String]) -> anyhow::Result<SweepTable> {
    match Client::connect(store)?.request(&Request::SweepTable {
        name: name.to_string(),
        by: by.to_vec(),
    })? {
        Response::SweepTable(t) => Ok(t),
        Response::Error(e) => bail!(e),
        other => bail!("engine: unexpected reply {other:?}"),
    }
}

fn show(args: SweepShowArgs, store: &Path) -> anyhow::Result<()> {
    if !store.join("db").is_dir() {
        bail!(
            "{}: no run store here (nothing has run yet, or pass --store DIR / set MIFO_STORE)",
            store.display()
        );
    }
    let table = fetch_table(store, &args.name, &args.by)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&table_json(&table))?
        )?;
    } else {
        format_table(&table, &mut out)?;
    }
    Ok(())
}

/// The table as one JSON object: rows with their keys and metrics by name, best first.
pub fn table_json(t: &SweepTable) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = t
        .rows
        .iter()
        .map(|r| {
            let values: serde_json::Map<String, serde_json::Value> = t
                .keys
                .iter()
                .zip(&r.values)
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let metrics: serde_json::Map<String, serde_json::Value> = t
                .metrics
                .iter()
                .zip(&r.metrics)
                .map(|(m, v)| (m.clone(), serde_json::json!(v)))
                .collect();
            serde_json::json!({"run": r.run, "status": r.status, "values": values, "metrics": metrics})
        })
        .collect();
    serde_json::json!({
        "name": t.name,
        "keys": t.keys,
        "metrics": t.metrics,
        "lower_is_better": t.lower_better,
        "rows": rows,
    })
}

/// Writes the table: a title line, then RUN, STATUS, the varied keys and the metrics.
pub fn format_table(t: &SweepTable, out: &mut dyn Write) -> std::io::Result<()> {
    let by: Vec<String> = t
        .metrics
        .iter()
        .zip(&t.lower_better)
        .map(|(m, l)| format!("{m} ({} is better)", if *l { "lower" } else { "higher" }))
        .collect();
    writeln!(
        out,
        "sweep {} · {} runs · {}",
        t.name,
        t.rows.len(),
        if by.is_empty() {
            "no metric to sort by".to_string()
        } else {
            format!("best first by {}", by.join(", then "))
        }
    )?;
    let mut header = vec!["RUN".to_string(), "STATUS".to_string()];
    header.extend(t.keys.iter().cloned());
    header.extend(t.metrics.iter().cloned());
    let rows: Vec<Vec<String>> = t
        .rows
        .iter()
        .map(|r| {
            let mut cells = vec![r.run.chars().take(12).collect(), r.status.clone()];
            cells.extend(r.values.iter().cloned());
            cells.extend(
                r.metrics
                    .iter()
                    .map(|m| m.map_or_else(|| "-".to_string(), |v| format!("{v:.6}"))),
            );
            cells
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}
