//! `mifo engine …` and the client side of store commands: `mifo runs …` and following a
//! learning run go through the engine.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use super::runs::{carry_out, format_show, Console, RunsCommand};
use crate::engine::{serve, Client, EngineOptions, EventKind, Request, Response};
use crate::jobs::sink::SinkEvent;
use crate::runs::{RunsReply, RunsRequest};

/// `mifo engine` subcommands.
#[derive(Subcommand, Debug)]
pub enum EngineCommand {
    /// Start the engine for the store in the background (if it is not running).
    Start,
    /// Stop it: the running step finishes and checkpoints (the run becomes `interrupted`,
    /// resumable with `mifo learn --resume`); a second stop within 5 s forces.
    Stop {
        /// Exit at once without waiting for the step.
        #[arg(long)]
        force: bool,
    },
    /// Pid, uptime, queue, running job, device.
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run the engine in the foreground (what `start` launches).
    Run {
        /// Exit after this many seconds with no job and no client (0 = never).
        #[arg(long, default_value_t = 0)]
        idle_exit: u64,
        /// Jobs run at the same time (default 1: one per device) [env: MIFO_ENGINE_JOBS].
        #[arg(long, env = "MIFO_ENGINE_JOBS", default_value_t = 1)]
        jobs: usize,
    },
}

/// Runs `mifo engine …`.
pub fn run(cmd: EngineCommand, store: &Path) -> anyhow::Result<()> {
    match cmd {
        EngineCommand::Run { idle_exit, jobs } => Ok(serve(
            store,
            EngineOptions {
                idle_exit: (idle_exit > 0).then(|| Duration::from_secs(idle_exit)),
                jobs,
            },
        )?),
        EngineCommand::Start => {
            let c = Client::connect(store)?;
            eprintln!(
                "engine running (pid {}) for {}",
                c.engine_pid,
                store.display()
            );
            Ok(())
        }
        EngineCommand::Stop { force } => {
            let Some(mut c) = Client::try_connect(store)? else {
                eprintln!("no engine is running for {}", store.display());
                return Ok(());
            };
            expect_ok(c.request(&Request::Stop { force })?)?;
            eprintln!(
                "engine (pid {}) stopping{}",
                c.engine_pid,
                if force {
                    " now"
                } else {
                    " after the current step"
                }
            );
            Ok(())
        }
        EngineCommand::Status { json } => {
            let Some(mut c) = Client::try_connect(store)? else {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"running": false, "pid": null, "store": store})
                    );
                } else {
                    println!("no engine is running for {}", store.display());
                }
                return Ok(());
            };
            let Response::Status(st) = c.request(&Request::Status)? else {
                bail!("engine: unexpected reply to status");
            };
            if json {
                let mut v = serde_json::to_value(&st)?;
                v["running_engine"] = serde_json::json!(true);
                println!("{v}");
            } else {
                println!("pid      {}", st.pid);
                println!("uptime   {:.0} s", st.uptime_s);
                println!("store    {}", st.store);
                println!(
                    "running  {}",
                    match (&st.running, &st.progress) {
                        (Some(r), Some((s, t, p))) => format!("{r} ({p} {s}/{t})"),
                        (Some(r), None) => r.clone(),
                        _ => "-".into(),
                    }
                );
                println!("device   {}", st.device.as_deref().unwrap_or("-"));
                for (run, device, p) in st.running_all.iter().skip(1) {
                    let p = p
                        .as_ref()
                        .map(|(s, t, ph)| format!(" ({ph} {s}/{t})"))
                        .unwrap_or_default();
                    println!("also     {run}{p} on {device}");
                }
                println!("workers  {}", st.workers);
                println!(
                    "queue    {}",
                    if st.queue.is_empty() {
                        "-".into()
                    } else {
                        st.queue.join(" ")
                    }
                );
            }
            Ok(())
        }
    }
}

/// The model the store noted for run `run`'s model, if it still holds that model (asks the
/// engine, starting one if none runs).
pub fn known_model(store: &Path, run: &str) -> anyhow::Result<Option<crate::model::ModelSource>> {
    Ok(Client::connect(store)?.stored_run(run)?.known_model())
}

fn expect_ok(r: Response) -> anyhow::Result<()> {
    match r {
        Response::Ok => Ok(()),
        Response::Error(e) => Err(anyhow!(e)),
        other => Err(anyhow!("engine: unexpected reply {other:?}")),
    }
}

/// `mifo runs …` through the engine: `rerun` submits a job and follows it; every other
/// command is carried out by typed requests ([`crate::runs`]) the engine executes.
pub fn runs(cmd: RunsCommand, store: &Path) -> anyhow::Result<()> {
    if !store.join("db").is_dir() {
        bail!(
            "{}: no run store here (nothing has run yet, or pass --store DIR / set MIFO_STORE)",
            store.display()
        );
    }
    if let RunsCommand::Rerun {
        run,
        sets,
        seed,
        model,
        source,
        device,
        json,
        detach,
    } = cmd
    {
        let mut c = Client::connect(store)?;
        let stored = c.stored_run(&run)?;
        let known = stored.known_model();
        let crate::engine::StoredRun { record, spec, .. } = stored;
        let model = crate::jobs::model_for_run(&source.flags(model), known, &run)?;
        let request = match record.kind {
            crate::store::RunKind::Learn => {
                let root = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
                let blobs = crate::store::BlobStore::new(root.join("blobs"));
                Request::SubmitLearn(Box::new(crate::jobs::learn::job_from_spec(
                    &spec,
                    &blobs,
                    model,
                    &device,
                    &sets,
                    seed,
                    record.scene.as_deref(),
                )?))
            }
            crate::store::RunKind::Synth => Request::SubmitSynth(Box::new(
                crate::jobs::synth::job_from_spec(&spec, model, &device, &sets, seed)?,
            )),
        };
        if !json {
            eprintln!("re-running {} ({})", record.id, record.kind.as_str());
        }
        return submit_and_follow(store, &request, json, detach);
    }
    // One connection per request: `rm` may wait on the user between two of them.
    Console::terminal(|console| {
        carry_out(
            cmd,
            &mut |request| Ok(Client::connect(store)?.runs(request)?),
            console,
        )
    })
}

/// Follows run `id` until it ends, drawing progress on stderr. Ctrl-C detaches (the run goes
/// on in the engine). Returns the final status.
pub fn follow(store: &Path, id: &str, quiet: bool) -> anyhow::Result<String> {
    let detached = Arc::new(AtomicBool::new(false));
    {
        let detached = detached.clone();
        let id = id.to_string();
        let _ = ctrlc::set_handler(move || {
            if !detached.swap(true, Ordering::SeqCst) {
                eprintln!(
                    "\ndetached: run {id} goes on in the engine. Watch it with `mifo runs show {id}`; stop it with `mifo engine stop`."
                );
                std::process::exit(0);
            }
        });
    }
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} (ETA {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    });
    let events = Client::connect(store)?.subscribe(Some(id))?;
    let mut last_print = 0u64;
    for ev in events {
        let ev = ev?;
        match ev.kind {
            EventKind::Status { status, error } => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                if matches!(
                    status.as_str(),
                    "done" | "failed" | "cancelled" | "interrupted"
                ) {
                    if let Some(e) = error {
                        if !quiet {
                            eprintln!("run {id} {status}: {e}");
                        }
                    }
                    return Ok(status);
                }
                if !quiet && bar.is_none() {
                    eprintln!("run {id} {status}");
                }
            }
            EventKind::Run(SinkEvent::Progress {
                step,
                total,
                phase,
                message,
            }) => match &bar {
                Some(b) => {
                    b.set_length(total);
                    b.set_position(step);
                    b.set_prefix(phase);
                    b.set_message(message);
                }
                None => {
                    if !quiet && (step == total || step >= last_print + 50) {
                        last_print = step;
                        eprintln!("step {step}/{total} {phase} {message}");
                    }
                }
            },
            EventKind::Run(SinkEvent::Log(line)) => {
                if !quiet {
                    match &bar {
                        Some(b) => b.println(&line),
                        None => eprintln!("{line}"),
                    }
                }
            }
            EventKind::Run(_) => {}
        }
    }
    bail!("the engine closed the event stream before run {id} ended (see engine.log)")
}

/// Prints `runs show RUN --json` from the engine on stdout.
pub fn runs_show_json(store: &Path, id: &str) -> anyhow::Result<()> {
    match Client::connect(store)?.runs(RunsRequest::Show { run: id.into() })? {
        RunsReply::Show(show) => {
            let mut out = std::io::stdout().lock();
            format_show(&show, true, &mut out)?;
            out.flush()?;
            Ok(())
        }
        other => Err(anyhow!("engine: unexpected reply {other:?}")),
    }
}

/// What the engine did with a submitted job.
pub enum Submitted {
    /// Queued as this run.
    Queued(String),
    /// A finished run already has this spec.
    AlreadyRan(String),
}

/// Submits a job to the engine and prints its validation warnings.
pub fn submit(store: &Path, request: &Request) -> anyhow::Result<Submitted> {
    let mut client = Client::connect(store)?;
    match client.request(request)? {
        Response::Queued { run, warnings } => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            Ok(Submitted::Queued(run))
        }
        Response::AlreadyRan { run } => Ok(Submitted::AlreadyRan(run)),
        Response::Error(e) => bail!(e),
        other => bail!("engine: unexpected reply {other:?}"),
    }
}

/// Submits a job to the engine, prints its warnings, then follows it (or returns at once with
/// `detach`). With `json`, prints the finished run's record (or `{id, status}` when detached).
pub fn submit_and_follow(
    store: &Path,
    request: &Request,
    json: bool,
    detach: bool,
) -> anyhow::Result<()> {
    let id = match submit(store, request)? {
        Submitted::Queued(id) => id,
        Submitted::AlreadyRan(run) => return Err(crate::Error::AlreadyRan { run }.into()),
    };
    if detach {
        if json {
            println!("{}", serde_json::json!({ "id": id, "status": "queued" }));
        } else {
            eprintln!("queued run {id}; follow it with `mifo runs show {id}`");
        }
        return Ok(());
    }
    if !json {
        eprintln!("run {id} (Ctrl-C detaches; the run goes on in the engine)");
    }
    let status = follow(store, &id, json)?;
    if json {
        runs_show_json(store, &id)?;
    } else {
        eprintln!("run {id} {status}; see it with `mifo runs show {id}`");
    }
    match status.as_str() {
        "done" => Ok(()),
        other => bail!("run {id} ended {other}"),
    }
}
