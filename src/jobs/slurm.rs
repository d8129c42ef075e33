//! The Slurm executor: the engine runs each learning or synthesis run as one `sbatch` job
//! running `mifo worker` on a compute node, follows the run's [journal](super::journal) and
//! ingests it into the store, so that listings, live curves and followers see the run as a
//! local one.
//!
//! Per run, the engine keeps `<store>/work/<run>/slurm.json` ([`SlurmState`]): the jobs it
//! submitted, the retries used, the `sbatch` options and how far the journal has been ingested.
//! An engine that starts finds these files and follows their runs again (re-attaches), so a
//! restart loses and duplicates nothing: the jobs never depended on the engine.
//!
//! What a job's end means when the journal does not say the run ended: cancelled (by the
//! engine's `scancel`, or anyone's: Slurm state `CANCELLED`) → `cancelled`; any other end
//! (`TIMEOUT`, `NODE_FAIL`, `PREEMPTED`, `OUT_OF_MEMORY`, a killed worker: `FAILED`, a
//! vanished job) → `interrupted`, resubmitted from the last checkpoint while retries are left
//! (a synthesis run, which has no checkpoint, from the start).
//! A run the worker journals as failed (bad weights, a scene that does not load) is `failed`
//! and not retried.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::journal::{journal_path, read_from, run_dir, Entry};
use super::runner::{RunnerEvent, RunnerObserver};
use super::sink::{SinkEvent, CHECKPOINT_OUTPUT};
use super::worker::WorkerJob;
use crate::error::{Error, Result};
use crate::store::{RunId, RunOutcome, RunStatus, Store};

/// The per-run state file in the run's folder.
pub const STATE_FILE: &str = "slurm.json";

/// How runs are submitted: `sbatch` options and retries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--gres`, e.g. `gpu:1`.
    pub gres: Option<String>,
    /// `--time`, e.g. `2:00:00`.
    pub time: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// Further `sbatch` arguments, passed as given.
    pub sbatch_args: Vec<String>,
    /// How many times a run is resubmitted after its job ended without the run ending.
    pub max_retries: u32,
    /// At most this many tasks of a sweep's job array run at once (`--array=…%K`); `None`:
    /// as many as Slurm allows.
    #[serde(default)]
    pub array_limit: Option<u32>,
}

impl SlurmOptions {
    /// The `sbatch` arguments these options stand for.
    pub fn sbatch_flags(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (flag, value) in [
            ("--partition", &self.partition),
            ("--gres", &self.gres),
            ("--time", &self.time),
            ("--account", &self.account),
        ] {
            if let Some(value) = value {
                v.push(format!("{flag}={value}"));
            }
        }
        v.extend(self.sbatch_args.iter().cloned());
        v
    }
}

/// What the engine keeps about one run it runs through Slurm (`slurm.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SlurmState {
    /// The jobs submitted for the run, oldest first.
    pub jobs: Vec<String>,
    /// Resubmissions used.
    pub retries: u32,
    /// The options it is submitted with.
    pub options: SlurmOptions,
    /// Bytes of the journal ingested into the store.
    pub offset: u64,
    /// The engine asked Slurm to cancel the job.
    pub cancel_requested: bool,
}

impl SlurmState {
    fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Reads the state in `dir` (`None` when the run never went through Slurm).
    pub fn read(dir: &Path) -> Result<Option<SlurmState>> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::file(&path, format!("not a Slurm state file: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Writes the state into `dir` (temp file, then rename).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Input(format!("Slurm state: {e}")))?;
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }
}

/// Runs a Slurm command, returning its stdout; an error names the command and its first line
/// of stderr.
fn slurm_command(program: &str, args: &[String]) -> Result<String> {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null());
    if crate::cpu_threads::counted_by_mifo() {
        // A job runs on another node: it counts its own cores.
        command
            .env_remove(crate::cpu_threads::RAYON_NUM_THREADS)
            .env_remove(crate::cpu_threads::COUNTED_THREADS);
    }
    let out = command
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Input(format!(
                    "--executor slurm: `{program}` is not on PATH (run the engine on a Slurm login node)"
                ))
            } else {
                Error::Input(format!("--executor slurm: running `{program}`: {e}"))
            }
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no message");
        return Err(Error::Input(format!(
            "--executor slurm: `{program}` failed: {line}"
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Submits a batch script; returns the job id (of a job array: the array's id).
fn sbatch(flags: &[String], name: &str, output: &Path, script: &Path) -> Result<String> {
    sbatch_with(flags, &[], name, output, script)
}

/// [`sbatch`] with further arguments of this submission (`--array=…`).
fn sbatch_with(
    flags: &[String],
    extra: &[String],
    name: &str,
    output: &Path,
    script: &Path,
) -> Result<String> {
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name={name}"),
        format!("--output={}", output.display()),
        "--open-mode=append".to_string(),
    ];
    args.extend(extra.iter().cloned());
    args.extend(flags.iter().cloned());
    args.push(script.display().to_string());
    let out = slurm_command("sbatch", &args)?;
    let id = out.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(Error::Input(format!(
            "--executor slurm: sbatch answered {:?}, not a job id",
            out.trim()
        )));
    }
    Ok(id)
}

/// Slurm states in which a job may still run.
fn is_active(state: &str) -> bool {
    !matches!(
        state,
        "COMPLETED"
            | "FAILED"
            | "CANCELLED"
            | "TIMEOUT"
            | "NODE_FAIL"
            | "PREEMPTED"
            | "OUT_OF_MEMORY"
            | "BOOT_FAIL"
            | "DEADLINE"
            | "REVOKED"
            | "GONE"
    )
}

/// The task ids of one `squeue` job id: `123` and `123_4` stand for themselves; a pending job
/// array that Slurm has not split yet reads `123_[0-3]`, `123_[2,5-7%2]` (`%K`: its
/// throttle), which stands for `123_0` … `123_3`, or `123_2`, `123_5` … `123_7`.
pub fn expand_job_id(id: &str) -> Vec<String> {
    let Some((array, rest)) = id.split_once("_[") else {
        return vec![id.to_string()];
    };
    let spec = rest.trim_end_matches(']');
    let spec = spec.split_once('%').map_or(spec, |(s, _)| s);
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (Ok(a), Ok(b)) = (a.trim().parse::<u64>(), b.trim().parse::<u64>()) else {
            continue;
        };
        // A bracket of a million tasks is not what a sweep submits; bounded all the same.
        out.extend((a..=b.min(a + 100_000)).map(|t| format!("{array}_{t}")));
    }
    out
}

/// The states of `jobs` (plain job ids, or `ARRAY_TASK` for the tasks of a job array):
/// `squeue` (which also lists jobs that ended a short while ago), then `sacct` for the rest; a
/// job neither knows is `GONE`.
pub fn job_states(jobs: &[String]) -> Result<HashMap<String, String>> {
    let mut states = HashMap::new();
    if jobs.is_empty() {
        return Ok(states);
    }
    let list = jobs.join(",");
    // An unknown job id makes squeue fail as a whole: fall back to one at a time.
    // `-r`: a pending job array one task a line (the brackets are read all the same).
    let answer = slurm_command(
        "squeue",
        &[
            "-h".into(),
            "-r".into(),
            "-t".into(),
            "all".into(),
            "-j".into(),
            list,
            "-o".into(),
            "%i|%T".into(),
        ],
    );
    let mut parse = |text: &str| {
        for line in text.lines() {
            if let Some((id, state)) = line.trim().split_once('|') {
                for id in expand_job_id(id) {
                    states.insert(id, state.to_string());
                }
            }
        }
    };
    match answer {
        Ok(text) => parse(&text),
        Err(_) => {
            for job in jobs {
                let args = [
                    "-h".into(),
                    "-r".into(),
                    "-t".into(),
                    "all".into(),
                    "-j".into(),
                    job.clone(),
                    "-o".into(),
                    "%i|%T".into(),
                ];
                if let Ok(text) = slurm_command("squeue", &args) {
                    parse(&text);
                }
            }
        }
    }
    for job in jobs {
        if states.contains_key(job) {
            continue;
        }
        let args = [
            "-n".into(),
            "-P".into(),
            "-X".into(),
            "-j".into(),
            job.clone(),
            "-o".into(),
            "State".into(),
        ];
        let state = slurm_command("sacct", &args)
            .ok()
            .and_then(|t| {
                t.lines()
                    .next()
                    .and_then(|l| l.split_whitespace().next())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "GONE".to_string());
        states.insert(job.clone(), state);
    }
    Ok(states)
}

/// Checks, before an engine starts with `--executor slurm`, that `sbatch` is there, that it
/// accepts `options` (partition, account…) and that a first tiny job on a compute node can run
/// `exe` and write into the store at `root` (skipped when `probe_timeout` is zero). Nothing is
/// queued when a check fails; the error is one line.
pub fn preflight(
    root: &Path,
    exe: &Path,
    options: &SlurmOptions,
    probe_timeout: Duration,
) -> Result<()> {
    slurm_command("sbatch", &["--version".into()])?;
    let flags = options.sbatch_flags();
    let mut test = vec!["--test-only".to_string()];
    test.extend(flags.iter().cloned());
    test.extend(["--wrap".to_string(), "true".to_string()]);
    slurm_command("sbatch", &test)?;
    if probe_timeout.is_zero() {
        return Ok(());
    }
    let dir = root.join("work");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let nonce = format!("probe-{}-{}", std::process::id(), crate::store::now_ms());
    let marker = dir.join(&nonce);
    let script = dir.join(format!("{nonce}.sh"));
    let output = dir.join(format!("{nonce}.out"));
    let text = format!(
        "#!/bin/sh\nexec {} worker --probe {}\n",
        shell_quote(&exe.display().to_string()),
        shell_quote(&marker.display().to_string())
    );
    std::fs::write(&script, text).map_err(|e| Error::io(&script, e))?;
    let job = sbatch(&flags, "mifo-probe", &output, &script)?;
    let started = Instant::now();
    let cleanup = || {
        for p in [&marker, &script] {
            let _ = std::fs::remove_file(p);
        }
    };
    loop {
        if marker.is_file() {
            cleanup();
            let _ = std::fs::remove_file(&output);
            return Ok(());
        }
        let state = job_states(std::slice::from_ref(&job))?
            .remove(&job)
            .unwrap_or_default();
        if !is_active(&state) {
            // The file may reach this host a moment after the job ended (NFS).
            std::thread::sleep(Duration::from_millis(500));
            if marker.is_file() {
                cleanup();
                let _ = std::fs::remove_file(&output);
                return Ok(());
            }
            cleanup();
            return Err(Error::Input(format!(
                "--executor slurm: the first job ({job}, {state}) could not run {} and write into {} from a compute node (see {}); put the store and mifo on a filesystem the nodes share",
                exe.display(),
                root.display(),
                output.display()
            )));
        }
        if started.elapsed() >= probe_timeout {
            let _ = slurm_command("scancel", std::slice::from_ref(&job));
            cleanup();
            return Err(Error::Input(format!(
                "--executor slurm: the first job ({job}) did not run within {} s (the cluster is busy?); retry, or pass --probe-timeout 0 to skip this check",
                probe_timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// One run the executor follows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlurmJob {
    /// The run.
    pub run: String,
    /// Its current Slurm job.
    pub job: String,
    /// The job's Slurm state (`PENDING`, `RUNNING`, …).
    pub state: String,
    /// Every job the run ran under, oldest first.
    pub jobs: Vec<String>,
    /// Resubmissions used.
    pub retries: u32,
    /// Last progress: (step, total, phase).
    pub progress: Option<(u64, u64, String)>,
}

struct Followed {
    info: SlurmJob,
    cancel: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

struct Inner {
    store: Store,
    root: PathBuf,
    exe: PathBuf,
    options: Option<SlurmOptions>,
    observer: RunnerObserver,
    followed: Mutex<BTreeMap<RunId, Followed>>,
    /// Job states from the last poll.
    states: Mutex<HashMap<String, String>>,
    shutdown: AtomicBool,
    poll: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The Slurm executor of one engine: submits runs, follows them, answers for them.
#[derive(Clone)]
pub struct SlurmExecutor {
    inner: Arc<Inner>,
}

impl SlurmExecutor {
    /// An executor for the store `store`, submitting `exe worker …` with `options` (`None`: an
    /// engine that runs its runs itself and only follows the Slurm runs a previous engine
    /// left), reporting to `observer`. It polls Slurm every `MIFO_SLURM_POLL_MS` ms (2000).
    pub fn new(
        store: Store,
        exe: PathBuf,
        options: Option<SlurmOptions>,
        observer: RunnerObserver,
    ) -> SlurmExecutor {
        let poll = std::env::var("MIFO_SLURM_POLL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000u64);
        let inner = Arc::new(Inner {
            root: store.root().to_path_buf(),
            store,
            exe,
            options,
            observer,
            followed: Mutex::new(BTreeMap::new()),
            states: Mutex::new(HashMap::new()),
            shutdown: AtomicBool::new(false),
            poll: Duration::from_millis(poll.max(50)),
        });
        let poller = inner.clone();
        std::thread::spawn(move || poll_loop(&poller));
        SlurmExecutor { inner }
    }

    /// Whether new runs go to Slurm.
    pub fn submits(&self) -> bool {
        self.inner.options.is_some()
    }

    /// The runs of the store whose Slurm jobs a previous engine left (their state files say
    /// so and their records are queued or running): the engine adopts them before it marks
    /// stale runs interrupted.
    pub fn left_behind(store: &Store) -> Result<Vec<RunId>> {
        let work = store.root().join("work");
        let Ok(entries) = std::fs::read_dir(&work) else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let Ok(id) = entry.file_name().to_string_lossy().parse::<RunId>() else {
                continue;
            };
            if SlurmState::read(&entry.path())?.is_none() {
                continue;
            }
            let Some(record) = store.try_get_run(&id)? else {
                continue;
            };
            if matches!(record.status, RunStatus::Queued | RunStatus::Running) {
                found.push(id);
            }
        }
        found.sort();
        Ok(found)
    }

    /// Follows run `id` again (after an engine restart): adopts it when running.
    pub fn reattach(&self, id: &RunId) -> Result<()> {
        let record = self.inner.store.get_run(id)?;
        if record.status == RunStatus::Running {
            self.inner.store.adopt_run(id)?;
        }
        let dir = run_dir(&self.inner.root, id);
        let state = SlurmState::read(&dir)?.unwrap_or_default();
        eprintln!(
            "engine: following run {id} again (Slurm jobs {})",
            if state.jobs.is_empty() {
                "none yet".to_string()
            } else {
                state.jobs.join(", ")
            }
        );
        self.follow(id.clone(), state)
    }

    /// Submits the queued learning run `id` (its job file written from `job`).
    pub fn submit(&self, id: &RunId, job: &super::learn::LearnJob) -> Result<()> {
        self.submit_job(WorkerJob::learning(id.clone(), job.clone(), None))
    }

    /// Submits the queued synthesis run `id` (its job file written from `job` and the outputs
    /// of the learning run it draws on, read from the store now: the worker does not open it).
    pub fn submit_synth(&self, id: &RunId, job: &super::synth::SynthJob) -> Result<()> {
        self.submit_job(self.synth_worker_job(id, job)?)
    }

    fn synth_worker_job(&self, id: &RunId, job: &super::synth::SynthJob) -> Result<WorkerJob> {
        let store = &self.inner.store;
        let record = store.get_run(id)?;
        let learned = job
            .from
            .as_deref()
            .map(|p| super::synth::learned_ref(store, p, &job.model))
            .transpose()?;
        Ok(WorkerJob::synthesis(
            id.clone(),
            super::worker::SynthWork {
                job: job.clone(),
                learned,
                spec_hash: record.spec_hash.to_string(),
            },
        ))
    }

    /// Submits the continuation of the interrupted learning run `id` from its last checkpoint.
    pub fn submit_resume(&self, id: &RunId, model: crate::model::ModelSource) -> Result<()> {
        let store = &self.inner.store;
        let record = store.get_run(id)?;
        let spec = store.spec(&record.spec_hash)?;
        let dir = run_dir(&self.inner.root, id);
        let device = match WorkerJob::read(&self.inner.root, id) {
            Ok(old) => old.device().to_string(),
            Err(_) => super::pool::AUTO.to_string(),
        };
        let learn = super::learn::job_from_spec(
            &spec,
            store.blobs(),
            model,
            &device,
            &[],
            None,
            record.scene.as_deref(),
        )?;
        let mut state = SlurmState::read(&dir)?.unwrap_or_default();
        state.retries = 0;
        state.cancel_requested = false;
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        state.write(&dir)?;
        self.submit_job(WorkerJob::learning(
            id.clone(),
            learn,
            record.outputs.get(CHECKPOINT_OUTPUT).map(|h| h.to_hex()),
        ))
    }

    /// Submits the queued runs of a sweep as one Slurm job array, task `i` running `runs[i]`
    /// (a learning or a synthesis run, as [`Self::submit`] and [`Self::submit_synth`] would
    /// send it): their job files, a manifest of their ids (one a line) and one `sbatch
    /// --array=0-(n-1)[%K]`. Each run's record lists its task as `ARRAY_i`; from then on the
    /// task is followed, cancelled (`scancel ARRAY_i`) and, when it ends early, resubmitted as
    /// a job of its own, as a run submitted alone is. A single run goes as a job of its own.
    pub fn submit_array(&self, runs: Vec<(RunId, super::sweep::SweepJob)>) -> Result<()> {
        let Some(options) = self.inner.options.clone() else {
            return Err(Error::Input(
                "this engine does not submit to Slurm (start it with --executor slurm)".into(),
            ));
        };
        let mut jobs = Vec::with_capacity(runs.len());
        for (id, job) in runs {
            jobs.push(match job {
                super::sweep::SweepJob::Learn(j) => WorkerJob::learning(id, *j, None),
                super::sweep::SweepJob::Synth(j) => self.synth_worker_job(&id, &j)?,
            });
        }
        if jobs.len() <= 1 {
            return jobs.pop().map_or(Ok(()), |j| self.submit_job(j));
        }
        let root = &self.inner.root;
        for job in &jobs {
            job.write(root)?;
        }
        let dir = root.join("work").join(ARRAY_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // Named after its first run: unique in the store.
        let name = format!("array-{}", jobs[0].run);
        let manifest = dir.join(format!("{name}.runs"));
        let ids: String = jobs.iter().map(|j| format!("{}\n", j.run)).collect();
        let tmp = dir.join(format!("{name}.runs.tmp"));
        std::fs::write(&tmp, ids).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &manifest).map_err(|e| Error::io(&manifest, e))?;
        let script = dir.join(format!("{name}.sh"));
        let text = format!(
            "#!/bin/sh\n# mifo sweep of {} runs: written by the engine, run by Slurm (task i runs line i+1 of the manifest).\nexec {} --store {} worker --manifest {}\n",
            jobs.len(),
            shell_quote(&self.inner.exe.display().to_string()),
            shell_quote(&root.display().to_string()),
            shell_quote(&manifest.display().to_string()),
        );
        std::fs::write(&script, text).map_err(|e| Error::io(&script, e))?;
        let array = sbatch_with(
            &options.sbatch_flags(),
            &[array_flag(jobs.len(), options.array_limit)],
            &format!("mifo-{name}"),
            &dir.join(format!("{name}-%a.out")),
            &script,
        )?;
        eprintln!(
            "engine: runs {} submitted as Slurm job array {array} ({} tasks)",
            jobs.iter()
                .map(|j| j.run.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            jobs.len()
        );
        let mut first_error = None;
        for (i, job) in jobs.into_iter().enumerate() {
            let id = job.run;
            let task = format!("{array}_{i}");
            let run_dir = run_dir(root, &id);
            // The task's output, where a run's own job writes it.
            let _ = std::os::unix::fs::symlink(
                dir.join(format!("{name}-{i}.out")),
                run_dir.join("slurm.out"),
            );
            let state = SlurmState {
                jobs: vec![task.clone()],
                options: options.clone(),
                ..SlurmState::default()
            };
            let followed = state
                .write(&run_dir)
                .and_then(|_| Ok(self.inner.store.add_slurm_job(&id, &task)?))
                .and_then(|_| self.follow(id, state));
            if let Err(e) = followed {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn submit_job(&self, job: WorkerJob) -> Result<()> {
        let Some(options) = &self.inner.options else {
            return Err(Error::Input(
                "this engine does not submit to Slurm (start it with --executor slurm)".into(),
            ));
        };
        let id = job.run.clone();
        job.write(&self.inner.root)?;
        let dir = run_dir(&self.inner.root, &id);
        let mut state = SlurmState::read(&dir)?.unwrap_or_default();
        state.options = options.clone();
        let job_id = self.sbatch_run(&id, &state.options)?;
        state.jobs.push(job_id.clone());
        state.write(&dir)?;
        self.inner.store.add_slurm_job(&id, &job_id)?;
        eprintln!("engine: run {id} submitted as Slurm job {job_id}");
        self.follow(id, state)
    }

    /// `sbatch` of the worker script of run `id`; returns the job id.
    fn sbatch_run(&self, id: &RunId, options: &SlurmOptions) -> Result<String> {
        submit_worker(&self.inner.root, &self.inner.exe, id, options)
    }

    fn follow(&self, id: RunId, state: SlurmState) -> Result<()> {
        let cancel = Arc::new(AtomicBool::new(false));
        let info = SlurmJob {
            run: id.to_string(),
            job: state.jobs.last().cloned().unwrap_or_default(),
            state: "PENDING".into(),
            jobs: state.jobs.clone(),
            retries: state.retries,
            progress: None,
        };
        let mut followed = lock(&self.inner.followed);
        if followed.get(&id).is_some_and(|f| f.handle.is_some()) {
            return Err(Error::Input(format!("run {id} is already followed")));
        }
        let inner = self.inner.clone();
        let flag = cancel.clone();
        let run = id.clone();
        let handle = std::thread::spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                follow_run(&inner, &run, state, &flag)
            }));
            let detached = match result {
                Ok(Ok(detached)) => detached,
                Ok(Err(e)) => {
                    eprintln!("engine: following run {run}: {e}");
                    let _ = inner
                        .store
                        .finish_run(&run, RunOutcome::Failed(e.to_string()));
                    false
                }
                Err(_) => {
                    eprintln!("engine: following run {run} panicked");
                    let _ = inner.store.finish_run(
                        &run,
                        RunOutcome::Failed("internal error (panic); see engine.log".into()),
                    );
                    false
                }
            };
            if let Some(f) = lock(&inner.followed).get_mut(&run) {
                f.handle = None;
            }
            lock(&inner.followed).remove(&run);
            if !detached {
                (inner.observer)(&run, RunnerEvent::Ended);
            }
        });
        followed.insert(
            id,
            Followed {
                info,
                cancel,
                handle: Some(handle),
            },
        );
        Ok(())
    }

    /// Cancels run `id` if this executor follows it (`scancel`; the run ends `cancelled`);
    /// `false` when it does not.
    pub fn cancel(&self, id: &RunId) -> bool {
        match lock(&self.inner.followed).get(id) {
            Some(f) => {
                f.cancel.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Whether run `id` is followed (queued or running on Slurm).
    pub fn is_pending(&self, id: &RunId) -> bool {
        lock(&self.inner.followed).contains_key(id)
    }

    /// Whether any run is followed.
    pub fn is_busy(&self) -> bool {
        !lock(&self.inner.followed).is_empty()
    }

    /// The followed runs with their jobs and states.
    pub fn jobs(&self) -> Vec<SlurmJob> {
        lock(&self.inner.followed)
            .values()
            .map(|f| f.info.clone())
            .collect()
    }

    /// Stops following (the jobs go on; the next engine re-attaches). Returns at once; see
    /// [`Self::finished`].
    pub fn stop(&self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
    }

    /// Whether every follower has saved its place and returned (after [`Self::stop`]).
    pub fn finished(&self) -> bool {
        lock(&self.inner.followed).is_empty()
    }
}

/// The folder under `<store>/work/` of the job arrays' manifests, scripts and outputs.
pub const ARRAY_DIR: &str = "arrays";

/// `--array=0-(n-1)`, with `%K` when at most `limit` tasks may run at once.
fn array_flag(n: usize, limit: Option<u32>) -> String {
    let last = n.saturating_sub(1);
    match limit {
        Some(k) => format!("--array=0-{last}%{k}"),
        None => format!("--array=0-{last}"),
    }
}

/// Writes the batch script of run `id` and submits it; returns the job id.
fn submit_worker(root: &Path, exe: &Path, id: &RunId, options: &SlurmOptions) -> Result<String> {
    let dir = run_dir(root, id);
    let script = dir.join("job.sh");
    let text = format!(
        "#!/bin/sh\n# mifo run {id}: written by the engine, run by Slurm.\nexec {} --store {} worker --run {id}\n",
        shell_quote(&exe.display().to_string()),
        shell_quote(&root.display().to_string()),
    );
    std::fs::write(&script, text).map_err(|e| Error::io(&script, e))?;
    sbatch(
        &options.sbatch_flags(),
        &format!("mifo-{id}"),
        &dir.join("slurm.out"),
        &script,
    )
}

fn poll_loop(inner: &Arc<Inner>) {
    loop {
        // Ends with its engine: the executor is gone when only this thread holds it.
        if Arc::strong_count(inner) == 1 {
            return;
        }
        let jobs: Vec<String> = lock(&inner.followed)
            .values()
            .map(|f| f.info.job.clone())
            .filter(|j| !j.is_empty())
            .collect();
        if !jobs.is_empty() {
            match job_states(&jobs) {
                Ok(states) => {
                    let mut followed = lock(&inner.followed);
                    for f in followed.values_mut() {
                        if let Some(s) = states.get(&f.info.job) {
                            f.info.state = s.clone();
                        }
                    }
                    drop(followed);
                    lock(&inner.states).extend(states);
                }
                Err(e) => eprintln!("engine: asking Slurm for job states: {e}"),
            }
        }
        std::thread::sleep(inner.poll);
    }
}

/// Ingests journal entries of one run into the store.
struct Ingest<'a> {
    inner: &'a Inner,
    id: &'a RunId,
    /// Per series: points at or below this step are already in the store (a worker that
    /// continues from a checkpoint repeats the steps after it).
    floor: HashMap<String, u64>,
    ended: bool,
}

impl Ingest<'_> {
    fn emit(&self, ev: SinkEvent) {
        (self.inner.observer)(self.id, RunnerEvent::Sink(ev));
    }

    fn set_floor(&mut self) -> Result<()> {
        self.floor = self
            .inner
            .store
            .metrics(self.id)?
            .into_iter()
            .filter_map(|(name, pts)| pts.last().map(|(s, _)| (name, *s)))
            .collect();
        Ok(())
    }

    fn entry(&mut self, entry: Entry) -> Result<()> {
        let store = &self.inner.store;
        let id = self.id;
        let status = store.get_run(id)?.status;
        match entry {
            Entry::Started {
                host,
                device,
                job,
                resumed_from,
                ..
            } => {
                match status {
                    RunStatus::Queued => {
                        store.start_run(id, &host, &device)?;
                    }
                    RunStatus::Interrupted => {
                        store.resume_run(id, &host, &device)?;
                    }
                    _ => {}
                }
                self.set_floor()?;
                if store.get_run(id)?.status == RunStatus::Running {
                    let line = format!(
                        "worker started on {host} ({device}) as Slurm job {}{}",
                        job.as_deref().unwrap_or("?"),
                        resumed_from
                            .map(|s| format!(", from the checkpoint after step {s}"))
                            .unwrap_or_default()
                    );
                    store.append_log(id, &line)?;
                    (self.inner.observer)(id, RunnerEvent::Started);
                }
            }
            _ if status != RunStatus::Running => {}
            Entry::Metric { name, step, value } => {
                if self.floor.get(&name).is_some_and(|&f| step <= f) {
                    return Ok(());
                }
                let value: f64 = value
                    .parse()
                    .map_err(|_| Error::Input(format!("journal: metric value {value:?}")))?;
                store.append_metric(id, &name, step, value)?;
                self.emit(SinkEvent::Metric { name, step, value });
            }
            Entry::Log { line } => {
                store.append_log(id, &line)?;
                self.emit(SinkEvent::Log(line));
            }
            Entry::Progress {
                step,
                total,
                phase,
                message,
            } => {
                if let Some(f) = lock(&self.inner.followed).get_mut(id) {
                    f.info.progress = Some((step, total, phase.clone()));
                }
                self.emit(SinkEvent::Progress {
                    step,
                    total,
                    phase,
                    message,
                });
            }
            Entry::Output { name, hash } => {
                let hash = parse_hash(&hash)?;
                store.set_output(id, &name, hash)?;
                self.emit(SinkEvent::Output(name));
            }
            Entry::Checkpoint { hash, .. } => {
                store.set_output(id, CHECKPOINT_OUTPUT, parse_hash(&hash)?)?;
                store.flush()?;
            }
            Entry::Stopped { signal } => {
                store.append_log(id, &format!("worker stopped on {signal}"))?;
            }
            Entry::Ended { status, error } => {
                let outcome = match status.as_str() {
                    "done" => RunOutcome::Done,
                    "cancelled" => RunOutcome::Cancelled,
                    _ => RunOutcome::Failed(error.unwrap_or_else(|| "the worker failed".into())),
                };
                store.finish_run(id, outcome)?;
                self.ended = true;
            }
        }
        Ok(())
    }
}

fn parse_hash(hex: &str) -> Result<crate::store::BlobHash> {
    hex.parse()
        .map_err(|_| Error::Input(format!("journal: `{hex}` is not a blob hash")))
}

/// Follows run `id` until it ends (`Ok(false)`) or the engine stops (`Ok(true)`: detached,
/// the job goes on).
fn follow_run(
    inner: &Arc<Inner>,
    id: &RunId,
    mut state: SlurmState,
    cancel: &AtomicBool,
) -> Result<bool> {
    let dir = run_dir(&inner.root, id);
    let journal = journal_path(&dir);
    let mut ingest = Ingest {
        inner,
        id,
        floor: HashMap::new(),
        ended: false,
    };
    // After a restart: points the store already has are not ingested twice.
    ingest.set_floor()?;
    if state.jobs.is_empty() {
        // Recorded, never submitted (the engine stopped first).
        let options = inner.options.clone().unwrap_or_default();
        let job = submit_worker(&inner.root, &inner.exe, id, &options)?;
        state.options = options;
        state.jobs.push(job.clone());
        state.write(&dir)?;
        inner.store.add_slurm_job(id, &job)?;
        set_job(inner, id, &state);
    }
    let mut saved_at = Instant::now();
    loop {
        let (entries, offset) = read_from(&journal, state.offset)?;
        let changed = offset != state.offset;
        // A checkpoint saves the place at once (the store was flushed with it).
        let checkpointed = entries
            .iter()
            .any(|e| matches!(e, Entry::Checkpoint { .. }));
        for entry in entries {
            ingest.entry(entry)?;
        }
        state.offset = offset;
        if ingest.ended {
            state.write(&dir)?;
            return Ok(false);
        }
        if checkpointed || (changed && saved_at.elapsed() >= Duration::from_secs(2)) {
            inner.store.flush()?;
            state.write(&dir)?;
            saved_at = Instant::now();
        }
        let job = state.jobs.last().cloned().unwrap_or_default();
        if cancel.load(Ordering::SeqCst) && !state.cancel_requested {
            state.cancel_requested = true;
            state.write(&dir)?;
            if let Err(e) = slurm_command("scancel", std::slice::from_ref(&job)) {
                eprintln!("engine: run {id}: {e}");
            }
        }
        if inner.shutdown.load(Ordering::SeqCst) {
            inner.store.flush()?;
            state.write(&dir)?;
            return Ok(true);
        }
        let slurm_state = lock(&inner.states).get(&job).cloned();
        if let Some(s) = slurm_state.filter(|s| !is_active(s)) {
            // The journal's last records may land a moment after the job's end (NFS).
            std::thread::sleep(inner.poll.min(Duration::from_millis(500)));
            let (entries, offset) = read_from(&journal, state.offset)?;
            for entry in entries {
                ingest.entry(entry)?;
            }
            state.offset = offset;
            if ingest.ended {
                state.write(&dir)?;
                return Ok(false);
            }
            match job_ended(inner, id, &mut state, &job, &s)? {
                true => return Ok(false),
                false => {
                    lock(&inner.states).remove(&job);
                    set_job(inner, id, &state);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Shows the run's newest job in the executor's list.
fn set_job(inner: &Inner, id: &RunId, state: &SlurmState) {
    if let Some(f) = lock(&inner.followed).get_mut(id) {
        f.info.job = state.jobs.last().cloned().unwrap_or_default();
        f.info.jobs = state.jobs.clone();
        f.info.retries = state.retries;
        f.info.state = "PENDING".into();
    }
}

/// The job of run `id` ended in Slurm state `slurm` without the run ending: cancel it,
/// resubmit it, or leave it interrupted. `Ok(true)` when the run is final.
fn job_ended(
    inner: &Arc<Inner>,
    id: &RunId,
    state: &mut SlurmState,
    job: &str,
    slurm: &str,
) -> Result<bool> {
    let store = &inner.store;
    let dir = run_dir(&inner.root, id);
    let record = store.get_run(id)?;
    let status = record.status;
    let learning = record.kind == crate::store::RunKind::Learn;
    if state.cancel_requested || slurm == "CANCELLED" {
        if !status.is_final() {
            if status == RunStatus::Running {
                store.append_log(id, &format!("Slurm job {job} cancelled"))?;
            }
            store.finish_run(id, RunOutcome::Cancelled)?;
        }
        state.write(&dir)?;
        return Ok(true);
    }
    let why = format!("Slurm job {job} ended {slurm} before the run did");
    if state.retries < state.options.max_retries {
        state.retries += 1;
        let next = submit_worker(&inner.root, &inner.exe, id, &state.options)?;
        let line = format!(
            "{why}; resubmitted {} as job {next} (retry {} of {})",
            if learning {
                "from the last checkpoint"
            } else {
                "to start again (a synthesis run has no checkpoint)"
            },
            state.retries,
            state.options.max_retries
        );
        eprintln!("engine: run {id}: {line}");
        if status == RunStatus::Running {
            store.append_log(id, &line)?;
            store.interrupt_run(id, &why)?;
        }
        state.jobs.push(next.clone());
        state.write(&dir)?;
        store.add_slurm_job(id, &next)?;
        return Ok(false);
    }
    eprintln!("engine: run {id}: {why}; no retries left");
    match status {
        RunStatus::Running => {
            let next = if learning {
                format!("resume it with `mifo learn --resume {id}`")
            } else {
                format!("run it again with `mifo runs rerun {id}`")
            };
            store.append_log(id, &format!("{why}; no retries left: {next}"))?;
            store.interrupt_run(id, &why)?;
        }
        RunStatus::Queued => {
            store.finish_run(
                id,
                RunOutcome::Failed(format!(
                    "{why}, which never started (see {})",
                    dir.join("slurm.out").display()
                )),
            )?;
        }
        _ => {}
    }
    state.write(&dir)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_sbatch_flags_in_order() {
        let o = SlurmOptions {
            partition: Some("gpu".into()),
            gres: Some("gpu:1".into()),
            time: Some("2:00:00".into()),
            account: None,
            sbatch_args: vec!["--qos=low".into()],
            max_retries: 2,
            array_limit: Some(3),
        };
        assert_eq!(
            o.sbatch_flags(),
            [
                "--partition=gpu",
                "--gres=gpu:1",
                "--time=2:00:00",
                "--qos=low"
            ]
        );
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        assert!(is_active("PENDING") && is_active("REQUEUED") && is_active("COMPLETING"));
        assert!(!is_active("TIMEOUT") && !is_active("NODE_FAIL") && !is_active("GONE"));
        // The throttle is the array's, not every job's.
        assert!(!o.sbatch_flags().iter().any(|f| f.contains("array")));
        assert_eq!(array_flag(4, None), "--array=0-3");
        assert_eq!(array_flag(4, o.array_limit), "--array=0-3%3");
    }

    #[test]
    fn squeue_ids_of_array_tasks_expand_to_one_id_per_task() {
        assert_eq!(expand_job_id("277"), ["277"]);
        assert_eq!(expand_job_id("277_4"), ["277_4"]);
        assert_eq!(
            expand_job_id("277_[0-3]"),
            ["277_0", "277_1", "277_2", "277_3"]
        );
        assert_eq!(
            expand_job_id("277_[2,5-7%2]"),
            ["277_2", "277_5", "277_6", "277_7"]
        );
        assert!(expand_job_id("277_[x-y]").is_empty());
    }
}
