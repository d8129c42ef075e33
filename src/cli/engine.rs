//! `mifo engine …` and the client side of store commands: `mifo runs …` and following a
//! learning run go through the engine.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::runs::{carry_out, format_show, Console, RunsCommand};
use crate::engine::{serve, Client, EngineOptions, EventKind, Request, Response};
use crate::jobs::sink::SinkEvent;
use crate::runs::{RunsReply, RunsRequest};

/// The engine's devices: its GPU pool and how many runs each device holds.
#[derive(Args, Debug, Clone)]
pub struct PoolArgs {
    /// The GPUs the engine's pool owns, e.g. 0,2,3 (default: every GPU that answers; none in a
    /// build without CUDA). Runs with --device auto take a free one; a GPU that is not there is
    /// refused.
    #[arg(long, env = "MIFO_ENGINE_GPUS", value_name = "N,N,…")]
    pub gpus: Option<String>,
    /// Runs one GPU of the pool holds at once.
    #[arg(long, env = "MIFO_ENGINE_PER_GPU", default_value_t = 1)]
    pub per_gpu: usize,
    /// Runs on the plain `cpu` device at once (default 1).
    #[arg(long, env = "MIFO_ENGINE_JOBS", default_value_t = 1)]
    pub jobs: usize,
    /// For tests: a pool of N CPU slots named cpu:0 … cpu:N-1 in place of GPUs (the same
    /// pool code, on machines without GPUs).
    #[arg(long, env = "MIFO_ENGINE_CPU_SLOTS", hide = true)]
    pub cpu_slots: Option<usize>,
}

impl PoolArgs {
    /// The pool these flags ask for (flags checked, nothing probed yet).
    pub fn options(&self) -> anyhow::Result<crate::jobs::pool::PoolOptions> {
        if self.per_gpu == 0 {
            bail!("--per-gpu 0: give at least 1");
        }
        if self.jobs == 0 {
            bail!("--jobs 0: give at least 1");
        }
        Ok(crate::jobs::pool::PoolOptions {
            gpus: self
                .gpus
                .as_deref()
                .map(crate::jobs::pool::parse_gpus)
                .transpose()?,
            per_device: self.per_gpu,
            cpu_jobs: self.jobs,
            cpu_slots: self.cpu_slots,
        })
    }

    /// The same flags for the `mifo engine run` that `engine start` launches.
    fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--per-gpu".to_string(),
            self.per_gpu.to_string(),
            "--jobs".to_string(),
            self.jobs.to_string(),
        ];
        if let Some(g) = &self.gpus {
            v.extend(["--gpus".to_string(), g.clone()]);
        }
        if let Some(n) = self.cpu_slots {
            v.extend(["--cpu-slots".to_string(), n.to_string()]);
        }
        v
    }
}

/// Where the engine runs learning and synthesis runs: its own devices, or a Slurm cluster
/// (flags override the `[executor]` table of `<store>/engine.toml`).
#[derive(Args, Debug, Clone, Default)]
pub struct ExecutorArgs {
    /// `local` (the engine's device pool) or `slurm` (each learning or synthesis run one sbatch
    /// job running `mifo worker` on a compute node, a sweep one job array; the store must be on
    /// a filesystem the nodes share).
    #[arg(long, value_name = "local|slurm")]
    pub executor: Option<String>,
    /// Slurm partition of the jobs.
    #[arg(long)]
    pub partition: Option<String>,
    /// Slurm generic resources of each job, e.g. gpu:1.
    #[arg(long)]
    pub gres: Option<String>,
    /// Slurm time limit of each job, e.g. 2:00:00 (a run that hits it is resubmitted from its
    /// last checkpoint).
    #[arg(long)]
    pub time: Option<String>,
    /// Slurm account the jobs are charged to.
    #[arg(long)]
    pub account: Option<String>,
    /// A further sbatch argument, passed as given (repeatable), e.g. --sbatch-arg=--qos=low.
    #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// How many times a run whose job ended early (time limit, lost node, preemption, a killed
    /// worker) is resubmitted from its last checkpoint (default 2).
    #[arg(long)]
    pub max_retries: Option<u32>,
    /// At most K runs of one sweep at once: a sweep goes to Slurm as one job array, throttled
    /// with --array=0-(n-1)%K (default: as many as Slurm allows).
    #[arg(long, value_name = "K")]
    pub array_limit: Option<u32>,
    /// Seconds `engine start` waits for its first tiny Slurm job (which checks that a compute
    /// node can run mifo and write into the store); 0 skips the check.
    #[arg(long, default_value_t = 120)]
    pub probe_timeout: u64,
}

/// The `[executor]` table of `<store>/engine.toml`.
#[derive(serde::Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct ExecutorToml {
    kind: Option<String>,
    partition: Option<String>,
    gres: Option<String>,
    time: Option<String>,
    account: Option<String>,
    #[serde(default)]
    sbatch_args: Vec<String>,
    max_retries: Option<u32>,
    array_limit: Option<u32>,
}

#[derive(serde::Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct EngineToml {
    executor: Option<ExecutorToml>,
}

/// Default of `--max-retries`.
const DEFAULT_MAX_RETRIES: u32 = 2;

impl ExecutorArgs {
    /// The Slurm options these flags and `<store>/engine.toml` ask for (`None`: local).
    pub fn slurm(&self, store: &Path) -> anyhow::Result<Option<crate::jobs::slurm::SlurmOptions>> {
        let path = store.join("engine.toml");
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str::<EngineToml>(&text)
                .map_err(|e| {
                    anyhow!(
                        "{}: {}",
                        path.display(),
                        e.message().lines().next().unwrap_or("does not parse")
                    )
                })?
                .executor
                .unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ExecutorToml::default(),
            Err(e) => bail!("{}: {e}", path.display()),
        };
        let kind = self
            .executor
            .clone()
            .or(file.kind.clone())
            .unwrap_or_else(|| "local".into());
        match kind.as_str() {
            "local" => {
                let slurm_flag = [&self.partition, &self.gres, &self.time, &self.account]
                    .iter()
                    .any(|f| f.is_some())
                    || !self.sbatch_args.is_empty()
                    || self.max_retries.is_some()
                    || self.array_limit.is_some();
                if slurm_flag && self.executor.is_some() {
                    bail!("--partition, --gres, --time, --account, --sbatch-arg, --max-retries and --array-limit go with --executor slurm");
                }
                Ok(None)
            }
            "slurm" => {
                let pick = |flag: &Option<String>, file: &Option<String>| {
                    flag.clone().or_else(|| file.clone())
                };
                let array_limit = self.array_limit.or(file.array_limit);
                if array_limit == Some(0) {
                    bail!(
                        "{}: give at least 1",
                        if self.array_limit.is_some() {
                            "--array-limit 0".to_string()
                        } else {
                            format!("{}: [executor] array_limit = 0", path.display())
                        }
                    );
                }
                Ok(Some(crate::jobs::slurm::SlurmOptions {
                    partition: pick(&self.partition, &file.partition),
                    gres: pick(&self.gres, &file.gres),
                    time: pick(&self.time, &file.time),
                    account: pick(&self.account, &file.account),
                    sbatch_args: if self.sbatch_args.is_empty() {
                        file.sbatch_args
                    } else {
                        self.sbatch_args.clone()
                    },
                    max_retries: self
                        .max_retries
                        .or(file.max_retries)
                        .unwrap_or(DEFAULT_MAX_RETRIES),
                    array_limit,
                }))
            }
            other => bail!("--executor {other}: use local or slurm"),
        }
    }

    /// The same flags for the `mifo engine run` that `engine start` launches.
    fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (flag, value) in [
            ("--executor", &self.executor),
            ("--partition", &self.partition),
            ("--gres", &self.gres),
            ("--time", &self.time),
            ("--account", &self.account),
        ] {
            if let Some(value) = value {
                v.push(format!("{flag}={value}"));
            }
        }
        for a in &self.sbatch_args {
            v.push(format!("--sbatch-arg={a}"));
        }
        if let Some(n) = self.max_retries {
            v.push(format!("--max-retries={n}"));
        }
        if let Some(k) = self.array_limit {
            v.push(format!("--array-limit={k}"));
        }
        v
    }
}

/// `mifo engine start`'s flags.
#[derive(Args, Debug, Clone)]
pub struct StartArgs {
    /// The device pool.
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Where learning and synthesis runs go.
    #[command(flatten)]
    pub executor: ExecutorArgs,
}

/// `mifo engine` subcommands.
#[derive(Subcommand, Debug)]
pub enum EngineCommand {
    /// Start the engine for the store in the background (if it is not running), with its
    /// device pool: every GPU that answers (or --gpus), --per-gpu runs each; or with
    /// --executor slurm, sending each learning or synthesis run to a Slurm cluster as one sbatch
    /// job (a sweep as one job array).
    Start(StartArgs),
    /// Stop it: the running step finishes and checkpoints (the run becomes `interrupted`,
    /// resumable with `mifo learn --resume`); a second stop within 5 s forces.
    Stop {
        /// Exit at once without waiting for the step.
        #[arg(long)]
        force: bool,
    },
    /// Pid, uptime, the device pool (which run holds which device), the queue.
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
        /// The device pool.
        #[command(flatten)]
        pool: PoolArgs,
        /// Where learning and synthesis runs go.
        #[command(flatten)]
        executor: ExecutorArgs,
    },
}

/// Runs `mifo engine …`.
pub fn run(cmd: EngineCommand, store: &Path) -> anyhow::Result<()> {
    match cmd {
        EngineCommand::Run {
            idle_exit,
            pool,
            executor,
        } => Ok(serve(
            store,
            EngineOptions {
                idle_exit: (idle_exit > 0).then(|| Duration::from_secs(idle_exit)),
                pool: pool.options()?,
                slurm: executor.slurm(store)?,
            },
        )?),
        EngineCommand::Start(StartArgs { pool, executor }) => {
            let opts = pool.options()?;
            let slurm = executor.slurm(store)?;
            if let Some(mut c) = Client::try_connect(store)? {
                let devices = match c.request(&Request::Status)? {
                    Response::Status(st) => pool_line(&st.pool),
                    _ => "?".into(),
                };
                eprintln!(
                    "engine already running (pid {}) for {}; its devices: {devices} (stop it to change them)",
                    c.engine_pid,
                    store.display(),
                );
                return Ok(());
            }
            // Refuse a pool that cannot be here, in one line, before anything starts.
            let devices = crate::jobs::pool::DevicePool::new(&opts)?;
            if let Some(slurm) = &slurm {
                // sbatch there, its options accepted, a first tiny job able to write into
                // the store from a compute node: checked before the engine starts.
                std::fs::create_dir_all(store).map_err(|e| anyhow!("{}: {e}", store.display()))?;
                let root = store
                    .canonicalize()
                    .map_err(|e| anyhow!("{}: {e}", store.display()))?;
                let exe = std::env::current_exe()?;
                crate::jobs::slurm::preflight(
                    &root,
                    &exe,
                    slurm,
                    Duration::from_secs(executor.probe_timeout),
                )?;
            }
            let mut args = pool.to_args();
            args.extend(executor.to_args());
            let c = Client::connect_with(store, &args)?;
            match &slurm {
                Some(s) => eprintln!(
                    "engine running (pid {}) for {}; learning and synthesis runs go to Slurm ({}), a sweep as one job array{}",
                    c.engine_pid,
                    store.display(),
                    if s.sbatch_flags().is_empty() {
                        "default partition".to_string()
                    } else {
                        s.sbatch_flags().join(" ")
                    },
                    s.array_limit
                        .map(|k| format!(" of at most {k} tasks at once"))
                        .unwrap_or_default()
                ),
                None => eprintln!(
                    "engine running (pid {}) for {}; devices: {}",
                    c.engine_pid,
                    store.display(),
                    pool_line(&devices.slots())
                ),
            }
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
                println!("devices");
                for d in &st.pool {
                    let holders: Vec<String> = d
                        .runs
                        .iter()
                        .map(|r| {
                            let p = st
                                .running_all
                                .iter()
                                .find(|(id, _, _)| id == r)
                                .and_then(|(_, _, p)| p.as_ref())
                                .map(|(s, t, ph)| format!(" ({ph} {s}/{t})"))
                                .unwrap_or_default();
                            format!("{r}{p}")
                        })
                        .collect();
                    println!(
                        "  {:<8} {}/{}{}  {}",
                        d.device,
                        d.runs.len(),
                        d.capacity,
                        if d.auto { " auto" } else { "     " },
                        if holders.is_empty() {
                            "free".to_string()
                        } else {
                            holders.join(", ")
                        }
                    );
                }
                println!("executor {}", st.executor);
                if !st.slurm.is_empty() {
                    println!("slurm");
                    for j in &st.slurm {
                        let p = j
                            .progress
                            .as_ref()
                            .map(|(s, t, ph)| format!(" ({ph} {s}/{t})"))
                            .unwrap_or_default();
                        let earlier = if j.jobs.len() > 1 {
                            format!(", earlier jobs {}", j.jobs[..j.jobs.len() - 1].join(", "))
                        } else {
                            String::new()
                        };
                        println!("  job {:<8} {:<11} {}{p}{earlier}", j.job, j.state, j.run);
                    }
                }
                println!(
                    "queue    {}",
                    if st.waiting.is_empty() {
                        "-".into()
                    } else {
                        st.waiting
                            .iter()
                            .map(|(r, want)| format!("{r} (waits for {want})"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    }
                );
            }
            Ok(())
        }
    }
}

/// `cuda:0×1 cuda:1×1 cpu×1`: the devices of a pool and their slots.
fn pool_line(pool: &[crate::jobs::pool::DeviceSlots]) -> String {
    pool.iter()
        .map(|d| format!("{}×{}", d.device, d.capacity))
        .collect::<Vec<_>>()
        .join(" ")
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
    if let Some(table) =
        super::runs::tag_table(&cmd, &|name, by| super::sweep::fetch_table(store, name, by))
    {
        let mut out = std::io::stdout().lock();
        super::sweep::format_table(&table, &mut out)?;
        return Ok(());
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
