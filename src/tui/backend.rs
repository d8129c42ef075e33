//! The workbench's only door to runs and jobs: the [`Backend`] trait, the owned data it returns,
//! and [`LocalBackend`], an in-process implementation over [`Store`] that runs learning jobs on a
//! background thread.
//!
//! Rules every implementation follows (the TUI relies on them):
//! - Every call is made from a worker thread, never the UI thread, so a call may block (disk, a
//!   socket), but it should return in well under a second: long work (a learning run) is queued as
//!   a job and the call returns at once with a [`JobId`].
//! - Everything returned is owned data, with no handles into the implementation, so an engine
//!   client over a socket can implement the same trait.
//! - [`Backend::list_runs`] returns cheap summaries only (what a run record holds, plus the
//!   progress of live runs); metrics, logs, specs and images are fetched per run on demand.
//! - Errors are `anyhow` errors with one-line messages: the TUI shows them in its status line.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::jobs::learn::{check_resumable, prepare, resume, start, LearnJob, RunOptions};
use crate::jobs::sink::{Observer, SinkEvent};
use crate::jobs::synth::SynthJob;
use crate::learn::{scene_files, LearnConfig, SceneFiles};
use crate::store::{
    now_ms, BlobHash, RunId, RunKind, RunRecord, RunSpec, RunStatus, SpecHash, Store,
};

/// A run's metric series: name → `(step, value)` points in append order.
pub type Metrics = BTreeMap<String, Vec<(u64, f64)>>;

/// Where a live run is.
#[derive(Clone, Debug, PartialEq)]
pub struct RunProgress {
    /// Steps done.
    pub step: u64,
    /// Steps in the whole run.
    pub total: u64,
    /// Phase of the last step (`reward`, `penalty`, `dreambooth`), when known.
    pub phase: Option<String>,
}

impl RunProgress {
    /// Fraction done in `[0, 1]`.
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            (self.step as f64 / self.total as f64).clamp(0.0, 1.0)
        }
    }
}

impl From<crate::engine::RunSummary> for RunRow {
    fn from(r: crate::engine::RunSummary) -> Self {
        RunRow {
            id: r.id,
            kind: r.kind,
            status: r.status,
            created_ms: r.created_ms,
            started_ms: r.started_ms,
            finished_ms: r.finished_ms,
            scene: r.scene,
            parent: r.parent,
            rerun_of: r.rerun_of,
            rerun_identical: r.rerun_identical,
            spec_hash: r.spec_hash,
            config_deltas: r.config_deltas,
            final_loss: r.final_loss,
            tags: r.tags,
            progress: None,
            device: r.device,
        }
    }
}

/// One line of the runs table: what a run record holds, without metrics, logs or images.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRow {
    /// The run.
    pub id: RunId,
    /// Learning or synthesis.
    pub kind: RunKind,
    /// Where the run is in its life.
    pub status: RunStatus,
    /// Creation time (ms since the Unix epoch).
    pub created_ms: u64,
    /// Start time.
    pub started_ms: Option<u64>,
    /// End time.
    pub finished_ms: Option<u64>,
    /// Short label of the inputs (scene folder name).
    pub scene: Option<String>,
    /// The run this one builds on (a synthesis run's learning run).
    pub parent: Option<RunId>,
    /// For a re-run: the run it repeats.
    pub rerun_of: Option<RunId>,
    /// For a finished re-run: whether its outputs are bit-identical to the repeated run's.
    pub rerun_identical: Option<bool>,
    /// Hash of the run's spec (equal specs should give equal outputs).
    pub spec_hash: SpecHash,
    /// Config keys set away from the preset, as (`learn.key`, value).
    pub config_deltas: Vec<(String, String)>,
    /// Last value of the run's main loss (`loss/total`, else the first `loss/*` series), when the
    /// record has a summary.
    pub final_loss: Option<f64>,
    /// Tags, sorted.
    pub tags: Vec<String>,
    /// Progress of a live run.
    pub progress: Option<RunProgress>,
    /// Device it ran on (empty until started).
    pub device: String,
}

impl RunRow {
    /// The row of `record` with `tags` and no progress.
    pub fn from_record(record: &RunRecord, tags: Vec<String>) -> RunRow {
        crate::engine::RunSummary::from_record(record.clone(), tags).into()
    }

    /// Whether the run may still change (queued or running).
    pub fn is_live(&self) -> bool {
        !self.status.is_final()
    }
}

/// Everything the run detail view shows about one run, except metrics and image bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct RunDetail {
    /// The runs-table row (status, progress, tags…).
    pub row: RunRow,
    /// The run's spec (config, seed, inputs); `None` when it cannot be read (see `spec_error`).
    pub spec: Option<RunSpec>,
    /// Why the spec could not be read.
    pub spec_error: Option<String>,
    /// Host that ran it.
    pub host: String,
    /// Why it failed or was interrupted.
    pub error: Option<String>,
    /// Output blobs by name.
    pub outputs: BTreeMap<String, BlobHash>,
    /// The last lines of the log (at most the number asked for).
    pub log_tail: Vec<String>,
    /// Number of log lines in all.
    pub log_lines: usize,
}

/// A job number handed out by a backend when it queues a launch.
pub type JobId = u64;

/// Where a job is.
#[derive(Clone, Debug, PartialEq)]
pub enum JobState {
    /// Waiting for the device.
    Queued,
    /// Loading the model and inputs (no run record yet).
    Starting,
    /// Its run is running.
    Running,
    /// Ended (see the run's status).
    Finished,
    /// Stopped by an error before or while running.
    Failed(String),
    /// Cancelled before it started.
    Cancelled,
}

impl JobState {
    /// `queued`, `starting`, …
    pub fn label(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Starting => "starting",
            JobState::Running => "running",
            JobState::Finished => "finished",
            JobState::Failed(_) => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Queued, starting or running.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            JobState::Queued | JobState::Starting | JobState::Running
        )
    }
}

/// One line of the jobs view.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRow {
    /// The job.
    pub job: JobId,
    /// What it does, e.g. `learn coffee (paper, seed 7)` or `re-run 0j5…`.
    pub label: String,
    /// Its run, once the run record exists.
    pub run: Option<RunId>,
    /// Where it is.
    pub state: JobState,
    /// Progress of its run.
    pub progress: Option<RunProgress>,
    /// Device it runs on.
    pub device: String,
    /// When it was queued (ms since the Unix epoch).
    pub queued_ms: u64,
    /// When it started (ms since the Unix epoch).
    pub started_ms: Option<u64>,
    /// When it ended (ms since the Unix epoch).
    pub finished_ms: Option<u64>,
}

/// The inputs of a new learning run.
#[derive(Clone, Debug, PartialEq)]
pub enum LearnSource {
    /// A scene folder: `img.*` plus `mask*.png`.
    Scene(PathBuf),
    /// An image and one mask per instance, in token order.
    Files {
        /// The image.
        image: PathBuf,
        /// The masks (`<v0>`, `<v1>`, …).
        masks: Vec<PathBuf>,
    },
}

/// A learning launch as the form fills it in (the same choices as `mifo learn`).
#[derive(Clone, Debug, PartialEq)]
pub struct LearnLaunch {
    /// Image and masks.
    pub source: LearnSource,
    /// Model folder; `None` uses the backend's default (`--model` / `$MIFO_MODEL`).
    pub model: Option<PathBuf>,
    /// `paper` or `official`.
    pub preset: String,
    /// `--set learn.key=value` overrides, applied after the preset.
    pub sets: Vec<String>,
    /// Seed.
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// `f32`, `f16`, `bf16`.
    pub dtype: String,
    /// Accept masks that overlap by more than 5%.
    pub allow_overlap: bool,
    /// Run even if a finished run has exactly this spec.
    pub rerun: bool,
}

/// How to repeat a run: its stored config with `sets` applied, and optionally another seed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RerunRequest {
    /// `--set learn.key=value` overrides applied to the run's stored config.
    pub sets: Vec<String>,
    /// A new seed (`None` keeps the run's).
    pub seed: Option<u64>,
}

/// A synthesis launch from a learned run (paper Algorithm 2).
#[derive(Clone, Debug, PartialEq)]
pub struct SynthLaunch {
    /// The learning run whose tokens to use.
    pub from: RunId,
    /// Prompt with placeholders, e.g. `a photo of <v0> and <v1> on a table`.
    pub prompt: String,
    /// One box per placeholder: (`<vK>`, `[x0, y0, x1, y1]` in `[0, 1]` image coordinates).
    pub boxes: Vec<(String, [f32; 4])>,
    /// Seed (sample k uses seed + k).
    pub seed: u64,
    /// Number of images.
    pub samples: usize,
    /// `--set synth.key=value` overrides.
    pub sets: Vec<String>,
}

/// Facts about a backend that change what the UI offers.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendInfo {
    /// Shown in the title bar (`local store runs/`, `engine …`).
    pub name: String,
    /// Whether jobs keep running after the UI quits (an engine) or stop with it (in-process).
    pub jobs_survive_quit: bool,
    /// The default model folder, if any (prefills the launch form).
    pub default_model: Option<PathBuf>,
    /// The default device (prefills the launch form).
    pub default_device: String,
}

/// Everything the workbench can ask of the runs and jobs. See the module docs for the rules.
pub trait Backend: Send {
    /// Facts about this backend.
    fn info(&self) -> BackendInfo;
    /// Every run, newest first, as cheap summaries (live runs carry their progress).
    fn list_runs(&self) -> Result<Vec<RunRow>>;
    /// One run's record, spec and the last `log_tail` log lines.
    fn run_detail(&self, id: &RunId, log_tail: usize) -> Result<RunDetail>;
    /// Every metric series of one run.
    fn metrics(&self, id: &RunId) -> Result<Metrics>;
    /// The bytes of a blob (an input or output image).
    fn blob(&self, hash: &BlobHash) -> Result<Vec<u8>>;
    /// Queues a learning run; returns its job at once.
    fn launch_learn(&self, launch: LearnLaunch) -> Result<JobId>;
    /// Queues a synthesis run; returns its job at once.
    fn launch_synth(&self, launch: SynthLaunch) -> Result<JobId>;
    /// Queues a re-run of `id` (same spec unless `request` changes it).
    fn rerun(&self, id: &RunId, request: RerunRequest) -> Result<JobId>;
    /// Queues the continuation of an interrupted learning run from its checkpoint.
    fn resume(&self, id: &RunId) -> Result<JobId>;
    /// Asks the running (or queued) run `id` to stop at its next step.
    fn cancel(&self, id: &RunId) -> Result<()>;
    /// Cancels a job, started or not.
    fn cancel_job(&self, job: JobId) -> Result<()>;
    /// Deletes a finished run (record, metrics, logs, tags and blobs no other run uses).
    fn delete(&self, id: &RunId) -> Result<()>;
    /// Tags run `id`.
    fn tag(&self, id: &RunId, tag: &str) -> Result<()>;
    /// Removes a tag from run `id`.
    fn untag(&self, id: &RunId, tag: &str) -> Result<()>;
    /// Jobs queued, running and recently ended, oldest first.
    fn jobs(&self) -> Result<Vec<JobRow>>;
    /// Called once when the UI quits. An in-process backend stops its jobs here; an engine client
    /// just lets go.
    fn shutdown(&self) {}
}

/// Resolves a learning config as `mifo learn` does: preset, then `--set` overrides (section
/// `learn` only), then validation.
pub fn resolve_learn_config(preset: &str, sets: &[String]) -> crate::Result<LearnConfig> {
    apply_learn_sets(&LearnConfig::preset(preset)?, sets)
}

/// Applies `--set learn.key=value` overrides to `base` with the CLI's checks, then validates.
pub fn apply_learn_sets(base: &LearnConfig, sets: &[String]) -> crate::Result<LearnConfig> {
    let cfg = crate::config::resolve(base, "learn", None, sets)?;
    cfg.validate()?;
    Ok(cfg)
}

/// The preset, dtype and learn config stored in a learning run's spec config document
/// (`{"preset": …, "dtype": …, "learn": {…}}`).
pub fn stored_learn_config(spec: &RunSpec) -> Result<(String, String, LearnConfig)> {
    Ok(crate::jobs::learn::stored_config(spec)?)
}

/// The synthesis job of a workbench launch from learning run `spec` (its dtype; the paper
/// preset with the launch's `--set` overrides), on `model` / `device`.
pub fn synth_job(
    l: &SynthLaunch,
    spec: &RunSpec,
    model: PathBuf,
    device: &str,
) -> Result<SynthJob> {
    let (_, dtype, _) = crate::jobs::learn::stored_config(spec)?;
    let config = crate::config::resolve(
        &crate::synth::SynthConfig::preset("paper")?,
        "synth",
        None,
        &l.sets,
    )?;
    config.check()?;
    let boxes: Vec<String> = l
        .boxes
        .iter()
        .map(|(t, r)| format!("{t}={},{},{},{}", r[0], r[1], r[2], r[3]))
        .collect();
    for b in &boxes {
        crate::synth::parse_box(b)?;
    }
    Ok(SynthJob {
        from: Some(l.from.to_string()),
        model,
        prompt: l.prompt.clone(),
        boxes,
        samples: l.samples.max(1),
        seed: l.seed,
        preset: "paper".into(),
        config,
        device: device.to_string(),
        dtype,
        rerun: false,
    })
}

// === LocalBackend ===

/// What the job thread should do.
enum Work {
    Learn(Box<LearnJob>),
    Synth(Box<SynthJob>),
    Resume {
        run: RunId,
        model: PathBuf,
        device: String,
    },
}

struct Job {
    row: JobRow,
    work: Option<Work>,
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct Jobs {
    next: JobId,
    list: VecDeque<Job>,
}

/// Jobs kept in the list after they end.
const KEEP_ENDED_JOBS: usize = 20;

fn lock(jobs: &Mutex<Jobs>) -> MutexGuard<'_, Jobs> {
    jobs.lock().unwrap_or_else(|p| p.into_inner())
}

/// An in-process [`Backend`] over a [`Store`]: reads go straight to the store; learning runs are
/// queued and run one at a time on a background thread with [`crate::jobs::learn::launch`].
/// Runs stop when the process quits (they are cancelled at their next step by
/// [`Backend::shutdown`]; a killed process leaves them `running` until the next open marks them
/// `interrupted`, and they can be resumed).
pub struct LocalBackend {
    store: Store,
    jobs: Arc<Mutex<Jobs>>,
    progress: Arc<Mutex<HashMap<RunId, RunProgress>>>,
    shutdown: Arc<AtomicBool>,
    work_tx: Mutex<Option<Sender<JobId>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    model: Option<PathBuf>,
    device: String,
}

impl LocalBackend {
    /// Opens (creating if needed) the store at `root` and starts the job thread, which first
    /// marks runs left `running` by a dead process as interrupted. `model` is the default model folder
    /// (falls back to `$MIFO_MODEL`), `device` the default device.
    pub fn open(root: impl Into<PathBuf>, model: Option<PathBuf>, device: &str) -> Result<Self> {
        let root = root.into();
        let store = Store::create(&root)
            .with_context(|| format!("opening the run store {}", root.display()))?;
        Ok(Self::with_store(store, model, device))
    }

    /// A backend over an open store (see [`Self::open`]).
    pub fn with_store(store: Store, model: Option<PathBuf>, device: &str) -> Self {
        let model = model.or_else(|| std::env::var_os("MIFO_MODEL").map(PathBuf::from));
        let jobs = Arc::new(Mutex::new(Jobs::default()));
        let progress = Arc::new(Mutex::new(HashMap::new()));
        let shutdown = Arc::new(AtomicBool::new(false));
        let (work_tx, work_rx) = mpsc::channel::<JobId>();
        let thread = {
            let store = store.clone();
            let jobs = jobs.clone();
            let progress = progress.clone();
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("mifo-jobs".into())
                .spawn(move || job_thread(store, jobs, progress, shutdown, work_rx))
                .ok()
        };
        LocalBackend {
            store,
            jobs,
            progress,
            shutdown,
            work_tx: Mutex::new(Some(work_tx)),
            thread: Mutex::new(thread),
            model,
            device: device.to_string(),
        }
    }

    /// The store this backend reads.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn model_dir(&self, model: Option<PathBuf>) -> Result<PathBuf> {
        let dir = model.or_else(|| self.model.clone()).ok_or_else(|| {
            anyhow!("no model folder: start the workbench with --model DIR or set MIFO_MODEL")
        })?;
        if !dir.is_dir() {
            bail!("{}: model folder does not exist", dir.display());
        }
        Ok(dir)
    }

    /// The workbench's model folder, else the one the store noted for the model of `spec`.
    fn model_for_run(&self, spec: &crate::store::RunSpec, id: &RunId) -> Result<PathBuf> {
        if self.model.is_some() {
            return self.model_dir(None);
        }
        self.store
            .model_dir_for(&spec.model_fingerprint)?
            .ok_or_else(|| {
                anyhow!(
                    "no model folder: start the workbench with --model DIR or set MIFO_MODEL (the store knows no folder that still holds the model run {id} used)"
                )
            })
    }

    fn enqueue(&self, label: String, device: String, work: Work) -> Result<JobId> {
        let id = {
            let mut jobs = lock(&self.jobs);
            jobs.next += 1;
            let id = jobs.next;
            jobs.list.push_back(Job {
                row: JobRow {
                    job: id,
                    label,
                    run: None,
                    state: JobState::Queued,
                    progress: None,
                    device,
                    queued_ms: now_ms(),
                    started_ms: None,
                    finished_ms: None,
                },
                work: Some(work),
                stop: Arc::new(AtomicBool::new(false)),
            });
            let ended = jobs
                .list
                .iter()
                .filter(|j| !j.row.state.is_active())
                .count();
            if ended > KEEP_ENDED_JOBS {
                let mut drop = ended - KEEP_ENDED_JOBS;
                jobs.list.retain(|j| {
                    if drop > 0 && !j.row.state.is_active() {
                        drop -= 1;
                        false
                    } else {
                        true
                    }
                });
            }
            id
        };
        let tx = self.work_tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.as_ref()
            .ok_or_else(|| anyhow!("the job thread has stopped"))?
            .send(id)
            .map_err(|_| anyhow!("the job thread has stopped"))?;
        Ok(id)
    }

    /// Progress of live run `id`, as its job last reported it.
    fn progress_of(&self, id: &RunId) -> Option<RunProgress> {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn job_for_run(&self, id: &RunId) -> Option<JobId> {
        lock(&self.jobs)
            .list
            .iter()
            .find(|j| j.row.run.as_ref() == Some(id) && j.row.state.is_active())
            .map(|j| j.row.job)
    }
}

/// `reward` / `penalty` / `dreambooth` for the values of the `phase` metric (0, 1, 2).
pub fn phase_name(value: f64) -> &'static str {
    match value.round() as i64 {
        0 => "reward",
        1 => "penalty",
        2 => "dreambooth",
        _ => "phase",
    }
}

fn job_thread(
    store: Store,
    jobs: Arc<Mutex<Jobs>>,
    progress: Arc<Mutex<HashMap<RunId, RunProgress>>>,
    shutdown: Arc<AtomicBool>,
    rx: Receiver<JobId>,
) {
    // This process holds the store's lock, so any `running` run it did not start is left from
    // a dead process. Marked here, off the startup path: the first listing may still show it
    // `running`; the next poll shows it `interrupted`.
    let _ = store.mark_stale_running_interrupted();
    while let Ok(id) = rx.recv() {
        let (work, stop) = {
            let mut jobs = lock(&jobs);
            let Some(job) = jobs.list.iter_mut().find(|j| j.row.job == id) else {
                continue;
            };
            if job.row.state != JobState::Queued {
                continue; // cancelled while queued
            }
            let Some(work) = job.work.take() else {
                continue;
            };
            job.row.state = JobState::Starting;
            job.row.started_ms = Some(now_ms());
            (work, job.stop.clone())
        };
        let observer: Observer = {
            let progress = progress.clone();
            Arc::new(move |run: &RunId, event: SinkEvent| {
                if let SinkEvent::Progress {
                    step, total, phase, ..
                } = event
                {
                    progress.lock().unwrap_or_else(|p| p.into_inner()).insert(
                        run.clone(),
                        RunProgress {
                            step,
                            total,
                            phase: Some(phase),
                        },
                    );
                }
            })
        };
        let opts = RunOptions {
            progress_bar: false,
            stop,
            shutdown: shutdown.clone(),
            observer: Some(observer),
            progress_lines: false,
        };
        let set_run = |run: &RunId| {
            let mut jobs = lock(&jobs);
            if let Some(job) = jobs.list.iter_mut().find(|j| j.row.job == id) {
                job.row.run = Some(run.clone());
                job.row.state = JobState::Running;
            }
        };
        let result = match &work {
            Work::Learn(job) => prepare(&store, job).and_then(|record| {
                set_run(&record.id);
                start(&store, &record.id, job, &opts)
            }),
            Work::Synth(job) => crate::jobs::synth::prepare(&store, job).and_then(|(record, _)| {
                set_run(&record.id);
                crate::jobs::synth::start(&store, &record.id, job, &opts, &|| {})
            }),
            Work::Resume { run, model, device } => {
                set_run(run);
                resume(&store, run, model, device, &opts)
            }
        };
        let mut jobs = lock(&jobs);
        if let Some(job) = jobs.list.iter_mut().find(|j| j.row.job == id) {
            if let Some(run) = &job.row.run {
                progress
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(run);
            }
            job.row.finished_ms = Some(now_ms());
            match result {
                Ok(record) => {
                    job.row.run = Some(record.id);
                    job.row.state = JobState::Finished;
                }
                Err(e) => job.row.state = JobState::Failed(e.to_string()),
            }
        }
    }
}

impl Backend for LocalBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: format!("store {}", self.store.root().display()),
            jobs_survive_quit: false,
            default_model: self.model.clone(),
            default_device: self.device.clone(),
        }
    }

    fn list_runs(&self) -> Result<Vec<RunRow>> {
        let mut tags = self.store.all_tags()?;
        let mut rows = Vec::with_capacity(self.store.run_count());
        for record in self.store.runs() {
            let record = record?;
            let t = tags.remove(&record.id).unwrap_or_default();
            rows.push(RunRow::from_record(&record, t));
        }
        let progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        if !progress.is_empty() {
            for row in rows.iter_mut().filter(|r| r.status == RunStatus::Running) {
                row.progress = progress.get(&row.id).cloned();
            }
        }
        Ok(rows)
    }

    fn run_detail(&self, id: &RunId, log_tail: usize) -> Result<RunDetail> {
        let record = self.store.get_run(id)?;
        let tags = self.store.tags(id)?;
        let mut row = RunRow::from_record(&record, tags);
        if row.status == RunStatus::Running {
            row.progress = self.progress_of(id);
        }
        let (spec, spec_error) = match self.store.spec(&record.spec_hash) {
            Ok(spec) => (Some(spec), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let logs = self.store.logs(id)?;
        let log_lines = logs.len();
        let log_tail = logs[log_lines.saturating_sub(log_tail)..].to_vec();
        Ok(RunDetail {
            row,
            spec,
            spec_error,
            host: record.host.clone(),
            error: record.error.clone(),
            outputs: record.outputs.clone(),
            log_tail,
            log_lines,
        })
    }

    fn metrics(&self, id: &RunId) -> Result<Metrics> {
        Ok(self.store.metrics(id)?)
    }

    fn blob(&self, hash: &BlobHash) -> Result<Vec<u8>> {
        Ok(self.store.read_blob(hash)?)
    }

    fn launch_learn(&self, l: LearnLaunch) -> Result<JobId> {
        let config = resolve_learn_config(&l.preset, &l.sets)?;
        let model = self.model_dir(l.model.clone())?;
        let (files, scene_dir) = match &l.source {
            LearnSource::Scene(dir) => (scene_files(dir)?, Some(dir.clone())),
            LearnSource::Files { image, masks } => {
                if masks.is_empty() {
                    bail!("give at least one mask");
                }
                (SceneFiles::new(image.clone(), masks.clone()), None)
            }
        };
        for p in std::iter::once(&files.image).chain(&files.masks) {
            if !p.is_file() {
                bail!("{}: no such file", p.display());
            }
        }
        let label = format!(
            "learn {} ({}, seed {})",
            crate::jobs::scene_label(&files.image, scene_dir.as_deref()),
            l.preset,
            l.seed
        );
        let job = LearnJob {
            model,
            files,
            scene_dir,
            preset: l.preset.clone(),
            config,
            seed: l.seed,
            device: l.device.clone(),
            dtype: l.dtype.clone(),
            allow_overlap: l.allow_overlap,
            rerun: l.rerun,
        };
        self.enqueue(label, l.device, Work::Learn(Box::new(job)))
    }

    fn launch_synth(&self, l: SynthLaunch) -> Result<JobId> {
        let record = self.store.get_run(&l.from)?;
        if record.kind != RunKind::Learn || record.status != RunStatus::Done {
            bail!("run {} is not a finished learning run", l.from);
        }
        let spec = self.store.spec(&record.spec_hash)?;
        let model = self.model_for_run(&spec, &l.from)?;
        let job = synth_job(&l, &spec, model, &self.device)?;
        let label = format!(
            "synth from {} ({} box{}, seed {})",
            &l.from.as_str()[..l.from.as_str().len().min(12)],
            job.boxes.len(),
            if job.boxes.len() == 1 { "" } else { "es" },
            l.seed
        );
        self.enqueue(label, self.device.clone(), Work::Synth(Box::new(job)))
    }

    fn rerun(&self, id: &RunId, request: RerunRequest) -> Result<JobId> {
        let record = self.store.get_run(id)?;
        if record.kind != RunKind::Learn {
            bail!(
                "run {id} is a {} run; only learning runs can be re-run here",
                record.kind
            );
        }
        let spec = self.store.spec(&record.spec_hash)?;
        let job = crate::jobs::learn::job_from_spec(
            &spec,
            self.store.blobs(),
            self.model_for_run(&spec, id)?,
            &self.device,
            &request.sets,
            request.seed,
            record.scene.as_deref(),
        )?;
        let seed = job.seed;
        let label = format!(
            "re-run {} ({} change{}, seed {seed})",
            &id.as_str()[..id.as_str().len().min(12)],
            request.sets.len(),
            if request.sets.len() == 1 { "" } else { "s" }
        );
        self.enqueue(label, self.device.clone(), Work::Learn(Box::new(job)))
    }

    fn resume(&self, id: &RunId) -> Result<JobId> {
        let record = self.store.get_run(id)?;
        let model = self.model_for_run(&self.store.spec(&record.spec_hash)?, id)?;
        check_resumable(&self.store, id.as_str(), &model)?;
        let label = format!("resume {}", &id.as_str()[..id.as_str().len().min(12)]);
        let work = Work::Resume {
            run: id.clone(),
            model,
            device: self.device.clone(),
        };
        self.enqueue(label, self.device.clone(), work)
    }

    fn cancel(&self, id: &RunId) -> Result<()> {
        match self.job_for_run(id) {
            Some(job) => self.cancel_job(job),
            None => bail!("run {id} is not running in this workbench"),
        }
    }

    fn cancel_job(&self, job: JobId) -> Result<()> {
        let mut jobs = lock(&self.jobs);
        let j = jobs
            .list
            .iter_mut()
            .find(|j| j.row.job == job)
            .ok_or_else(|| anyhow!("no job {job}"))?;
        match j.row.state {
            JobState::Queued => {
                j.row.state = JobState::Cancelled;
                j.row.finished_ms = Some(now_ms());
                j.work = None;
            }
            JobState::Starting | JobState::Running => j.stop.store(true, Ordering::SeqCst),
            _ => bail!("job {job} has already ended"),
        }
        Ok(())
    }

    fn delete(&self, id: &RunId) -> Result<()> {
        self.store.remove_run(id)?;
        Ok(())
    }

    fn tag(&self, id: &RunId, tag: &str) -> Result<()> {
        Ok(self.store.add_tag(id, tag)?)
    }

    fn untag(&self, id: &RunId, tag: &str) -> Result<()> {
        if !self.store.remove_tag(id, tag)? {
            bail!("run {id} has no tag {tag}");
        }
        Ok(())
    }

    fn jobs(&self) -> Result<Vec<JobRow>> {
        let mut rows: Vec<JobRow> = lock(&self.jobs)
            .list
            .iter()
            .map(|j| j.row.clone())
            .collect();
        for row in rows.iter_mut().filter(|r| r.state == JobState::Running) {
            row.progress = row.run.as_ref().and_then(|r| self.progress_of(r));
        }
        Ok(rows)
    }

    fn shutdown(&self) {
        {
            let mut jobs = lock(&self.jobs);
            for job in jobs.list.iter_mut() {
                if job.row.state == JobState::Queued {
                    job.row.state = JobState::Cancelled;
                    job.work = None;
                }
            }
        }
        // Running jobs stop at their next step and stay resumable (`interrupted`).
        self.shutdown.store(true, Ordering::SeqCst);
        // Closing the channel ends the job thread once the current job stops.
        self.work_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            // A step of a large model can take seconds; wait a while, then let the process end
            // (the run is then marked interrupted when the store is next opened).
            let deadline = Instant::now() + Duration::from_secs(30);
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        let _ = self.store.flush();
    }
}
