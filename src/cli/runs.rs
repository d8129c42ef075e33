//! `mifo runs …`: list, show, compare, remove, collect, check and export stored runs. This module
//! parses the arguments into [`RunsRequest`]s and formats the [`RunsReply`]s; the operations
//! themselves are [`crate::runs`] (executed by the engine, or in this process by [`run_with`]).
//!
//! Read commands take `--json` and then print exactly one JSON document on stdout. Errors (unknown
//! or ambiguous run prefix, missing store, a store in use) are one line on stderr and a non-zero
//! exit, with the store left as it was.

use std::collections::BTreeMap;
use std::io::{self, BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};

use crate::jobs::sweep::SweepTable;
use crate::runs::{Listing, RunShow, RunsReply, RunsRequest};
use crate::store::{
    format_age, format_duration, format_utc, now_ms, RunDiff, RunId, RunKind, RunStatus,
    SeriesSummary, Store,
};

/// `mifo runs` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first: id, kind, status, scene or parent, final loss, age, config changes.
    /// With --tag, runs that differ in config keys (a sweep) show as `mifo sweep show` shows
    /// them: their varied keys against final metrics, best first.
    Ls {
        /// Only runs of this kind.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// Only runs with this status.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Only runs with this tag; when they differ in config keys (a sweep), a table of those
        /// keys against their final metrics (without --kind, --status or --json).
        #[arg(long)]
        tag: Option<String>,
        /// With --tag: a metric to show and sort the table by, best first (repeatable; as
        /// `mifo sweep show --by`). Default: loss/total.
        #[arg(long, value_name = "METRIC[:min|:max]", requires = "tag")]
        by: Vec<String>,
        /// Print one JSON array instead of text (the list, never the table).
        #[arg(long)]
        json: bool,
    },
    /// Everything about one run: spec, config, timings, metrics, outputs, log.
    Show {
        /// Run id or any unique prefix of one.
        run: String,
        /// Print one JSON object instead of text (metrics as name -> [[step, value], …]).
        #[arg(long)]
        json: bool,
        /// Print output image NAME in the terminal instead.
        #[arg(long, value_name = "NAME", conflicts_with = "json")]
        image: Option<String>,
    },
    /// Compare two runs: config keys, seed, inputs, model, code, metric summaries, outputs.
    Diff {
        /// First run (id or unique prefix).
        a: String,
        /// Second run (id or unique prefix).
        b: String,
        /// List equal config keys, fields and inputs too.
        #[arg(long)]
        all: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a run, its metrics and log, and the blobs no other run uses.
    Rm {
        /// Run id or unique prefix.
        run: String,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// Add tags to a run (or remove them with --remove).
    Tag {
        /// Run id or unique prefix.
        run: String,
        /// Tags (no whitespace).
        #[arg(required = true)]
        tags: Vec<String>,
        /// Remove the tags instead.
        #[arg(long)]
        remove: bool,
    },
    /// Remove blobs, specs and entries that no run refers to; print what was freed.
    Gc,
    /// Re-hash every blob and validate every record; exit non-zero when a problem is found.
    Check {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write a run's config (TOML), metrics (CSV), images (PNG with provenance) and learned
    /// embeddings (diffusers and A1111 formats) into DIR.
    Export {
        /// Run id or unique prefix.
        run: String,
        /// Folder to create (must be empty if it exists).
        dir: PathBuf,
    },
    /// Run a stored configuration again (same spec, so the store records whether the outputs
    /// came out bit-identical), or a variant of it with --set / --seed.
    Rerun {
        /// Run id or unique prefix.
        run: String,
        /// Override keys of the stored config (`learn.…` or `synth.…`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// A new seed.
        #[arg(long)]
        seed: Option<u64>,
        /// The model (its fingerprint must match the run's): a diffusers folder, a single-file
        /// checkpoint or a cached repo id [env: MIFO_MODEL]; default: the one the run used,
        /// while it still holds that model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// `--revision` / `--model-config` for --model.
        #[command(flatten)]
        source: crate::cli::SourceArgs,
        /// Device: auto (a free device of the engine's pool), cpu, cuda or cuda:N. Default:
        /// auto in a CUDA build, cpu otherwise.
        #[arg(long, default_value = crate::jobs::pool::default_device())]
        device: String,
        /// Print the finished run's record as one JSON document.
        #[arg(long)]
        json: bool,
        /// Queue it and return at once.
        #[arg(long)]
        detach: bool,
    },
}

/// `--kind` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// Learning runs.
    Learn,
    /// Synthesis runs.
    Synth,
}

impl From<KindArg> for RunKind {
    fn from(kind: KindArg) -> RunKind {
        match kind {
            KindArg::Learn => RunKind::Learn,
            KindArg::Synth => RunKind::Synth,
        }
    }
}

/// `--status` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusArg {
    /// Created, not started.
    Queued,
    /// Started and not finished.
    Running,
    /// Finished.
    Done,
    /// Stopped by an error.
    Failed,
    /// Stopped on request.
    Cancelled,
    /// Its process died while it ran.
    Interrupted,
}

impl From<StatusArg> for RunStatus {
    fn from(status: StatusArg) -> RunStatus {
        match status {
            StatusArg::Queued => RunStatus::Queued,
            StatusArg::Running => RunStatus::Running,
            StatusArg::Done => RunStatus::Done,
            StatusArg::Failed => RunStatus::Failed,
            StatusArg::Cancelled => RunStatus::Cancelled,
            StatusArg::Interrupted => RunStatus::Interrupted,
        }
    }
}

pub use crate::runs::LsFilter;

/// Asks a yes/no question and returns the answer.
pub type Confirm<'a> = &'a mut dyn FnMut(&str) -> io::Result<bool>;

/// Where a command writes and how it asks for confirmation.
pub struct Console<'a> {
    /// Standard output (text or the JSON document).
    pub out: &'a mut dyn Write,
    /// Asks a yes/no question on the terminal; `None` when there is no terminal to ask on.
    pub confirm: Option<Confirm<'a>>,
}

/// Carries out one [`RunsRequest`]: on the store in this process, or through the engine.
pub type Execute<'a> = &'a mut dyn FnMut(RunsRequest) -> anyhow::Result<RunsReply>;

impl Console<'static> {
    /// Runs `f` with a console on stdout that asks on the terminal when there is one.
    pub fn terminal<T>(f: impl FnOnce(&mut Console<'_>) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let stdout = io::stdout();
        let mut out = stdout.lock();
        let mut ask = ask_on_terminal;
        let interactive = io::stdin().is_terminal() && io::stderr().is_terminal();
        let mut console = Console {
            out: &mut out,
            confirm: if interactive { Some(&mut ask) } else { None },
        };
        let result = f(&mut console);
        out.flush()?;
        result
    }
}

/// Runs `cmd` on the store at `store_dir` in this process, printing to stdout and asking on the
/// terminal.
pub fn run(cmd: RunsCommand, store_dir: &Path) -> anyhow::Result<()> {
    Console::terminal(|console| run_with(cmd, store_dir, console))
}

fn ask_on_terminal(question: &str) -> io::Result<bool> {
    let mut stderr = io::stderr();
    write!(stderr, "{question} [y/N] ")?;
    stderr.flush()?;
    let mut answer = String::new();
    io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// Runs `cmd` on the store at `store_dir` in this process, with explicit output and
/// confirmation (for tests).
pub fn run_with(
    cmd: RunsCommand,
    store_dir: &Path,
    console: &mut Console<'_>,
) -> anyhow::Result<()> {
    let store = Store::open(store_dir)?;
    if let RunsCommand::Rerun { .. } = cmd {
        bail!("`runs rerun` submits a job: run it through the engine client (mifo runs rerun)")
    }
    if let Some(table) = tag_table(&cmd, &|name, by| {
        Ok(crate::jobs::sweep::table(&store, name, by)?)
    }) {
        super::sweep::format_table(&table, console.out)?;
        return Ok(());
    }
    carry_out(
        cmd,
        &mut |request| Ok(crate::runs::execute(&store, request)?),
        console,
    )
}

/// What reads a sweep's table: `(tag, --by)` → the table (the engine's, or the store's).
pub type FetchTable<'a> = &'a dyn Fn(&str, &[String]) -> anyhow::Result<SweepTable>;

/// `runs ls --tag T` (without --kind, --status or --json) as a sweep: the table of the runs
/// tagged T ([`crate::jobs::sweep::table`], the one `mifo sweep show` prints) when they differ
/// in config keys or seed; `None` for a plain listing (one run, runs alike, runs of both kinds).
pub fn tag_table(cmd: &RunsCommand, fetch: FetchTable<'_>) -> Option<SweepTable> {
    let RunsCommand::Ls {
        kind: None,
        status: None,
        tag: Some(tag),
        by,
        json: false,
    } = cmd
    else {
        return None;
    };
    fetch(tag, by).ok().filter(|t| !t.keys.is_empty())
}

fn unexpected(reply: RunsReply) -> anyhow::Error {
    anyhow!("engine: unexpected reply {reply:?}")
}

/// Carries out `cmd` (any command but `rerun`, which submits a job) by sending its requests to
/// `execute` and writing the replies to `console`: the one place that turns replies into text
/// and JSON.
pub fn carry_out(
    cmd: RunsCommand,
    execute: Execute<'_>,
    console: &mut Console<'_>,
) -> anyhow::Result<()> {
    match cmd {
        RunsCommand::Ls {
            kind,
            status,
            tag,
            json,
            ..
        } => {
            let filter = LsFilter {
                kind: kind.map(Into::into),
                status: status.map(Into::into),
                tag,
            };
            match execute(RunsRequest::List(filter))? {
                RunsReply::List(listing) => format_ls(&listing, json, console.out)?,
                other => return Err(unexpected(other)),
            }
        }
        RunsCommand::Show {
            run,
            image: Some(name),
            ..
        } => match execute(RunsRequest::Output {
            run: run.clone(),
            name: name.clone(),
        })? {
            RunsReply::Output(bytes) => {
                print_png(&bytes, &format!("output '{name}' of run {run}"))?
            }
            other => return Err(unexpected(other)),
        },
        RunsCommand::Show {
            run,
            json,
            image: None,
        } => match execute(RunsRequest::Show { run })? {
            RunsReply::Show(show) => format_show(&show, json, console.out)?,
            other => return Err(unexpected(other)),
        },
        RunsCommand::Diff { a, b, all, json } => match execute(RunsRequest::Diff { a, b, all })? {
            RunsReply::Diff(diff) if json => {
                writeln!(console.out, "{}", serde_json::to_string_pretty(&diff)?)?
            }
            RunsReply::Diff(diff) => write_diff_text(&diff, console.out)?,
            other => return Err(unexpected(other)),
        },
        RunsCommand::Rm { run, yes } => {
            let mut run = run;
            if !yes {
                let (id, record) = match execute(RunsRequest::Record { run })? {
                    RunsReply::Record { id, record } => (id, record),
                    other => return Err(unexpected(other)),
                };
                let question = match record {
                    Some(r) => format!(
                        "remove {} run {id} ({}, {} outputs, created {})?",
                        r.kind,
                        r.status,
                        r.outputs.len(),
                        format_utc(r.created_ms)
                    ),
                    None => format!("remove run {id} (its record is unreadable)?"),
                };
                match console.confirm.as_mut() {
                    None => {
                        bail!("refusing to remove run {id} without --yes (no terminal to ask on)")
                    }
                    Some(confirm) => {
                        if !confirm(&question)? {
                            writeln!(console.out, "run {id} kept")?;
                            return Ok(());
                        }
                    }
                }
                run = id.to_string();
            }
            let report = match execute(RunsRequest::Remove { run })? {
                RunsReply::Removed(report) => report,
                other => return Err(unexpected(other)),
            };
            writeln!(
                console.out,
                "removed run {}: {} blobs ({}) freed, {} kept (used by other runs), spec {}, {} metric/log/tag entries",
                report.run,
                report.blobs_removed,
                human_bytes(report.bytes_freed),
                report.blobs_kept,
                if report.spec_removed { "removed" } else { "kept" },
                report.keys_removed
            )?;
            if let Some(note) = report.note {
                writeln!(console.out, "note: {note}")?;
            }
        }
        RunsCommand::Tag { run, tags, remove } => {
            match execute(RunsRequest::Tag { run, tags, remove })? {
                RunsReply::Tags { id, tags } => {
                    writeln!(console.out, "run {id} tags: {}", tags.join(", "))?
                }
                other => return Err(unexpected(other)),
            }
        }
        RunsCommand::Gc => {
            let report = match execute(RunsRequest::Gc)? {
                RunsReply::Gc(report) => report,
                other => return Err(unexpected(other)),
            };
            writeln!(
                console.out,
                "gc freed {}: {} unreferenced blobs ({}), {} unused specs, {} orphan metric/log/tag entries, {} temp files ({})",
                human_bytes(report.bytes_freed + report.temp_bytes_freed),
                report.blobs_removed,
                human_bytes(report.bytes_freed),
                report.specs_removed,
                report.orphan_keys_removed,
                report.temp_files_removed,
                human_bytes(report.temp_bytes_freed)
            )?;
        }
        RunsCommand::Check { json } => {
            let (report, store) = match execute(RunsRequest::Check)? {
                RunsReply::Check { report, store } => (report, store),
                other => return Err(unexpected(other)),
            };
            if json {
                writeln!(console.out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                for problem in &report.problems {
                    writeln!(
                        console.out,
                        "problem: {}: {}",
                        problem.subject, problem.message
                    )?;
                }
                for id in &report.stale_running {
                    writeln!(
                        console.out,
                        "note: run {id} is marked running but its process is gone"
                    )?;
                }
                writeln!(
                    console.out,
                    "checked {} runs, {} specs, {} blobs ({}), {} metric chunks: {} problems; gc would remove {} blobs, {} specs, {} entries, {} temp files",
                    report.runs_checked,
                    report.specs_checked,
                    report.blobs_checked,
                    human_bytes(report.bytes_hashed),
                    report.metric_chunks_checked,
                    report.problems.len(),
                    report.garbage_blobs,
                    report.garbage_specs,
                    report.garbage_keys,
                    report.temp_files
                )?;
            }
            if !report.is_clean() {
                bail!(
                    "store check found {} problems in {}",
                    report.problems.len(),
                    store.display()
                );
            }
        }
        RunsCommand::Rerun { .. } => {
            bail!("`runs rerun` submits a job: run it through the engine client (mifo runs rerun)")
        }
        RunsCommand::Export { run, dir } => {
            // The engine may run in another directory: send the folder as an absolute path.
            let dir = if dir.is_relative() {
                std::env::current_dir()?.join(dir)
            } else {
                dir
            };
            let report = match execute(RunsRequest::Export { run, dir })? {
                RunsReply::Exported(report) => report,
                other => return Err(unexpected(other)),
            };
            for file in &report.files {
                writeln!(console.out, "{}", file.display())?;
            }
            if !report.skipped_null_keys.is_empty() {
                writeln!(
                    console.out,
                    "note: config keys with no value left out of config.toml: {}",
                    report.skipped_null_keys.join(", ")
                )?;
            }
            for note in &report.notes {
                writeln!(console.out, "note: {note}")?;
            }
        }
    }
    Ok(())
}

// === ls ===

/// Writes the `runs ls` listing (text or one JSON array) of the runs in `store` that pass
/// `filter`.
pub fn write_ls(
    store: &Store,
    filter: &LsFilter,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    format_ls(&crate::runs::list(store, filter)?, json, out)
}

/// Writes a listing as `runs ls` prints it (text, or one JSON array); unreadable records are
/// warnings on stderr.
pub fn format_ls(listing: &Listing, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    for problem in &listing.unreadable {
        eprintln!("warning: {problem} (run `mifo runs check`)");
    }
    let rows = &listing.rows;
    let now = now_ms();
    if json {
        let items: Vec<Value> = rows
            .iter()
            .map(|row| {
                let r = &row.record;
                json!({
                    "id": r.id.to_string(),
                    "kind": r.kind,
                    "status": r.status,
                    "scene": r.scene,
                    "parent": r.parent.as_ref().map(ToString::to_string),
                    "config_deltas": r.config_deltas.iter().cloned().collect::<BTreeMap<_, _>>(),
                    "final_loss": row.final_loss,
                    "created_at": format_utc(r.created_ms),
                    "age_s": now.saturating_sub(r.created_ms) / 1000,
                    "tags": row.tags,
                    "rerun_of": r.rerun_of.as_ref().map(ToString::to_string),
                })
            })
            .collect();
        serde_json::to_writer(&mut *out, &items)?;
        writeln!(out)?;
        return Ok(());
    }
    let width = listing.id_width;
    let mut text = String::with_capacity(rows.len() * 100 + 100);
    use std::fmt::Write as _;
    let _ = writeln!(
        text,
        "{:<width$}  {:<5}  {:<11}  {:<20}  {:>9}  {:>4}  CONFIG",
        "ID", "KIND", "STATUS", "SCENE/PARENT", "LOSS", "AGE"
    );
    for row in rows {
        let r = &row.record;
        let origin = match (&r.scene, &r.parent) {
            (Some(scene), Some(parent)) => format!("{scene} ^{}", &parent.as_str()[..width]),
            (Some(scene), None) => scene.clone(),
            (None, Some(parent)) => format!("^{}", &parent.as_str()[..width]),
            (None, None) => "-".to_string(),
        };
        let loss = row.final_loss.map_or_else(|| "-".to_string(), format_value);
        let mut config: String = r
            .config_deltas
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        if !row.tags.is_empty() {
            config = format!("{config} [{}]", row.tags.join(","));
        }
        let _ = writeln!(
            text,
            "{:<width$}  {:<5}  {:<11}  {:<20}  {:>9}  {:>4}  {}",
            &r.id.as_str()[..width],
            r.kind.as_str(),
            r.status.as_str(),
            truncate(&origin, 20),
            loss,
            format_age(now.saturating_sub(r.created_ms)),
            truncate(config.trim(), 60)
        );
    }
    out.write_all(text.as_bytes())?;
    Ok(())
}

// === show ===

/// Writes `runs show` for run `id` of `store` (see [`format_show`]).
pub fn write_show(
    store: &Store,
    id: &RunId,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    format_show(&crate::runs::show(store, id)?, json, out)
}

/// Writes `runs show`: text, or one JSON object with at least `id`, `kind`, `status`,
/// `spec_hash`, `config`, `seed`, `inputs`, `parent`, `metrics` (name -> [[step, value], …]),
/// `outputs`, `error` and the timings.
pub fn format_show(show: &RunShow, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let RunShow {
        record,
        spec,
        metrics,
        summaries,
        tags,
        logs,
        model_dir,
        model_config,
        output_sizes,
    } = show;
    let now = now_ms();
    if json {
        let metrics_json: BTreeMap<&String, Vec<[Value; 2]>> = metrics
            .iter()
            .map(|(name, points)| {
                (
                    name,
                    points.iter().map(|&(s, v)| [json!(s), json!(v)]).collect(),
                )
            })
            .collect();
        let doc = json!({
            "id": record.id.to_string(),
            "kind": record.kind,
            "status": record.status,
            "spec_hash": record.spec_hash.to_hex(),
            "config": spec.config,
            "seed": spec.seed,
            "inputs": spec.inputs,
            "parent": spec.parent.as_ref().map(ToString::to_string),
            "model_fingerprint": spec.model_fingerprint.to_hex(),
            "model_dir": model_dir,
            "model_config": model_config,
            "model_source": record.model_source,
            "code_version": spec.code_version,
            "metrics": metrics_json,
            "eval": metrics
                .iter()
                .filter(|(name, _)| name.starts_with(crate::eval::METRIC_PREFIX))
                .filter_map(|(name, points)| points.last().map(|&(_, v)| (name.clone(), v)))
                .collect::<BTreeMap<String, f64>>(),
            "oracle": metrics
                .iter()
                .filter(|(name, _)| name.starts_with(crate::world::ORACLE_PREFIX))
                .filter_map(|(name, points)| points.last().map(|&(_, v)| (name.clone(), v)))
                .collect::<BTreeMap<String, f64>>(),
            "summary": summaries,
            "outputs": record.outputs,
            "error": record.error,
            "created_at": format_utc(record.created_ms),
            "started_at": record.started_ms.map(format_utc),
            "finished_at": record.finished_ms.map(format_utc),
            "created_ms": record.created_ms,
            "started_ms": record.started_ms,
            "finished_ms": record.finished_ms,
            "duration_s": record.duration_ms(now).map(|ms| ms as f64 / 1000.0),
            "host": record.host,
            "device": record.device,
            "slurm_jobs": record.slurm_jobs,
            "pid": record.pid,
            "scene": record.scene,
            "config_deltas": record.config_deltas.iter().cloned().collect::<BTreeMap<_, _>>(),
            "tags": tags,
            "rerun_of": record.rerun_of.as_ref().map(ToString::to_string),
            "rerun_identical": record.rerun_identical,
            "log": logs,
        });
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        writeln!(out)?;
        return Ok(());
    }

    let dash = || "-".to_string();
    writeln!(
        out,
        "run        {}  ({} {})",
        record.id, record.kind, record.status
    )?;
    writeln!(out, "spec       {}", record.spec_hash)?;
    writeln!(out, "seed       {}", spec.seed)?;
    writeln!(
        out,
        "parent     {}",
        spec.parent.as_ref().map_or_else(dash, ToString::to_string)
    )?;
    if let Some(earlier) = &record.rerun_of {
        let identical = match record.rerun_identical {
            Some(true) => "outputs bit-identical",
            Some(false) => "outputs differ",
            None => "not compared yet",
        };
        writeln!(out, "rerun of   {earlier} ({identical})")?;
    }
    writeln!(
        out,
        "scene      {}",
        record.scene.clone().unwrap_or_else(dash)
    )?;
    match &model_dir {
        Some(dir) => writeln!(
            out,
            "model      {}  {}",
            spec.model_fingerprint,
            dir.display()
        )?,
        None => writeln!(
            out,
            "model      {}  (no folder known)",
            spec.model_fingerprint
        )?,
    }
    if let Some(given) = &record.model_source {
        writeln!(out, "source     {given}")?;
    }
    writeln!(out, "code       {}", spec.code_version)?;
    writeln!(out, "created    {}", format_utc(record.created_ms))?;
    if let Some(started) = record.started_ms {
        writeln!(
            out,
            "started    {} on {} ({}, pid {})",
            format_utc(started),
            record.host,
            record.device,
            record.pid.map_or_else(dash, |p| p.to_string())
        )?;
    }
    if !record.slurm_jobs.is_empty() {
        writeln!(out, "slurm      jobs {}", record.slurm_jobs.join(", "))?;
    }
    if let Some(finished) = record.finished_ms {
        writeln!(out, "finished   {}", format_utc(finished))?;
    }
    if let Some(ms) = record.duration_ms(now) {
        writeln!(out, "duration   {}", format_duration(ms))?;
    }
    if !tags.is_empty() {
        writeln!(out, "tags       {}", tags.join(", "))?;
    }
    if let Some(error) = &record.error {
        writeln!(out, "error      {error}")?;
    }
    if !spec.inputs.is_empty() {
        writeln!(out, "inputs")?;
        for (name, hash) in &spec.inputs {
            writeln!(out, "  {name:<20} {hash}")?;
        }
    }
    writeln!(out, "config")?;
    let mut flat = BTreeMap::new();
    flatten_json("", &spec.config, &mut flat);
    for (key, value) in &flat {
        writeln!(out, "  {key} = {value}")?;
    }
    let scores: BTreeMap<String, f64> = metrics
        .iter()
        .filter(|(name, _)| name.starts_with(crate::eval::METRIC_PREFIX))
        .filter_map(|(name, points)| points.last().map(|&(_, v)| (name.clone(), v)))
        .collect();
    if let Some(line) = crate::eval::table::headline(&scores) {
        writeln!(out, "eval       {line}")?;
        for l in crate::eval::table::instance_lines(&scores) {
            writeln!(out, "  {l}")?;
        }
    }
    let oracle: BTreeMap<String, f64> = metrics
        .iter()
        .filter(|(name, _)| name.starts_with(crate::world::ORACLE_PREFIX))
        .filter_map(|(name, points)| points.last().map(|&(_, v)| (name.clone(), v)))
        .collect();
    for line in crate::world::oracle::score_lines(&oracle) {
        writeln!(out, "{line}")?;
    }
    if metrics.keys().any(|n| !crate::store::is_score(n)) {
        writeln!(
            out,
            "metrics    {:>7}  {:>12}  {:>12}  {:>12}",
            "points", "last", "min", "max"
        )?;
        for (name, points) in metrics.iter().filter(|(n, _)| !crate::store::is_score(n)) {
            if let Some(s) = SeriesSummary::of(points) {
                writeln!(
                    out,
                    "  {name:<16} {:>7}  {:>12}  {:>12}  {:>12}",
                    s.count,
                    format_value(s.last),
                    format_value(s.min),
                    format_value(s.max)
                )?;
            }
        }
    }
    if !record.outputs.is_empty() {
        writeln!(out, "outputs")?;
        for (name, hash) in &record.outputs {
            let size = output_sizes.get(name).copied().flatten().map(human_bytes);
            writeln!(
                out,
                "  {name:<20} {hash}  {}",
                size.unwrap_or_else(|| "MISSING".to_string())
            )?;
        }
    }
    if !logs.is_empty() {
        const TAIL: usize = 10;
        writeln!(
            out,
            "log (last {} of {} lines)",
            TAIL.min(logs.len()),
            logs.len()
        )?;
        for line in &logs[logs.len().saturating_sub(TAIL)..] {
            writeln!(out, "  {line}")?;
        }
    }
    Ok(())
}

/// Prints PNG bytes in the terminal with viuer (kitty / iTerm2 / blocks); `what` names the
/// image in errors.
pub fn print_png(bytes: &[u8], what: &str) -> anyhow::Result<()> {
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        bail!("{what} is not a PNG image");
    }
    let image = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .with_context(|| format!("{what}: PNG cannot be decoded"))?;
    let config = viuer::Config {
        absolute_offset: false,
        restore_cursor: false,
        ..viuer::Config::default()
    };
    viuer::print(&image, &config).map_err(|e| anyhow::anyhow!("printing {what}: {e}"))?;
    Ok(())
}

// === diff ===

fn write_diff_text(diff: &RunDiff, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(out, "A = {}", diff.a)?;
    writeln!(out, "B = {}", diff.b)?;
    let width = diff
        .fields
        .iter()
        .map(|f| f.field.len())
        .chain(diff.config.iter().map(|c| c.key.len() + 2))
        .chain(diff.metrics.iter().map(|m| m.name.len() + 2))
        .chain(diff.outputs.iter().map(|o| o.name.len() + 2))
        .chain(diff.inputs.iter().map(|o| o.name.len() + 2))
        .max()
        .unwrap_or(10)
        .max(10);
    for field in &diff.fields {
        let mark = if field.same { "=" } else { "≠" };
        writeln!(
            out,
            "{:<width$}  {mark} {}  |  {}",
            field.field, field.a, field.b
        )?;
    }
    let show = |v: &Option<Value>| {
        v.as_ref()
            .map_or_else(|| "(absent)".to_string(), Value::to_string)
    };
    if diff.config.is_empty() {
        writeln!(out, "config: identical")?;
    } else {
        writeln!(out, "config")?;
        for delta in &diff.config {
            let mark = if delta.same { "=" } else { "≠" };
            writeln!(
                out,
                "  {:<w$}  {mark} {}  |  {}",
                delta.key,
                show(&delta.a),
                show(&delta.b),
                w = width - 2
            )?;
        }
    }
    let hash = |h: &Option<crate::store::BlobHash>| {
        h.map_or_else(|| "(absent)".to_string(), |h| h.short(12))
    };
    if !diff.inputs.is_empty() {
        writeln!(out, "inputs")?;
        for input in &diff.inputs {
            let mark = if input.identical { "=" } else { "≠" };
            writeln!(
                out,
                "  {:<w$}  {mark} {}  |  {}",
                input.name,
                hash(&input.a),
                hash(&input.b),
                w = width - 2
            )?;
        }
    }
    let is_eval = crate::store::is_score;
    let mut scores: Vec<&crate::store::MetricDelta> = diff
        .metrics
        .iter()
        .filter(|m| is_eval(&m.name) && m.name != crate::eval::SETUP_METRIC)
        .collect();
    // The paper's four first, then per instance.
    scores.sort_by_key(|m| {
        let head = crate::eval::table::HEADLINE
            .iter()
            .position(|(_, n)| *n == m.name)
            .unwrap_or(crate::eval::table::HEADLINE.len());
        (head, m.name.clone())
    });
    if !scores.is_empty() {
        writeln!(out, "scores (A  |  B  |  B - A)")?;
        for m in scores {
            let (a, b) = (m.a.map(|s| s.last), m.b.map(|s| s.last));
            let show = |v: Option<f64>| v.map_or_else(|| "(absent)".to_string(), format_value);
            let delta = match (a, b) {
                (Some(a), Some(b)) => format!("{:+.4}", b - a),
                _ => "-".to_string(),
            };
            writeln!(
                out,
                "  {:<w$}    {}  |  {}  |  {delta}",
                m.name,
                show(a),
                show(b),
                w = width - 2
            )?;
        }
    }
    if diff.metrics.iter().any(|m| !is_eval(&m.name)) {
        writeln!(out, "metrics (final / min)")?;
        let summary = |s: &Option<SeriesSummary>| {
            s.map_or_else(
                || "(absent)".to_string(),
                |s| format!("{} / {}", format_value(s.last), format_value(s.min)),
            )
        };
        for metric in diff.metrics.iter().filter(|m| !is_eval(&m.name)) {
            writeln!(
                out,
                "  {:<w$}    {}  |  {}",
                metric.name,
                summary(&metric.a),
                summary(&metric.b),
                w = width - 2
            )?;
        }
    }
    if !diff.outputs.is_empty() {
        writeln!(out, "outputs")?;
        for output in &diff.outputs {
            let verdict = match (output.a, output.b) {
                (Some(_), Some(_)) if output.identical => "identical".to_string(),
                (Some(a), Some(b)) => format!("differ ({} | {})", a.short(12), b.short(12)),
                (Some(_), None) => "only in A".to_string(),
                (None, Some(_)) => "only in B".to_string(),
                (None, None) => "-".to_string(),
            };
            writeln!(out, "  {:<w$}    {verdict}", output.name, w = width - 2)?;
        }
    }
    Ok(())
}

// === helpers ===

fn flatten_json(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, item) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten_json(&path, item, out);
            }
        }
        _ => {
            out.insert(
                if prefix.is_empty() {
                    "(config)".to_string()
                } else {
                    prefix.to_string()
                },
                value.to_string(),
            );
        }
    }
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e6) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
