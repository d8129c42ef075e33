//! The workbench's only door to runs and jobs: the [`Backend`] trait and the owned data it
//! returns. The workbench's backend is the engine's client
//! ([`EngineBackend`](super::engine_backend::EngineBackend)): jobs run in the engine, never in
//! the UI's process.
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

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;

use crate::jobs::sweep::SweepTable;
use crate::jobs::synth::SynthJob;
use crate::learn::LearnConfig;
use crate::store::{BlobHash, RunId, RunKind, RunRecord, RunSpec, RunStatus, SpecHash};

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
    /// `auto` (the engine's pool chooses), `cpu`, `cuda`, `cuda:N`.
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
    /// The synthesis preset (`paper` or `official`, as `mifo synth --preset`).
    pub preset: String,
    /// The synthesis method (`mifo`, `bounded-attention` or `plain`: `synth.method`), applied
    /// before `sets`.
    pub method: String,
    /// `--set synth.key=value` overrides.
    pub sets: Vec<String>,
}

/// Facts about a backend that change what the UI offers.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendInfo {
    /// Shown in the title bar (`engine runs/`).
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
    /// The sweep `name` (the runs tagged with it) as a table: the keys that vary between its
    /// runs against the final value of each metric of `by` (`METRIC`, `METRIC:min`,
    /// `METRIC:max`; none: the main loss), best first, as `mifo sweep show NAME --by …` prints
    /// it ([`crate::jobs::sweep::table`]).
    fn sweep_table(&self, name: &str, by: &[String]) -> Result<SweepTable>;
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

/// The `--set` entries a launch's method and overrides make: `synth.method=M` first when the
/// method is not the default `mifo` (so a run launched with the defaults has the same spec as
/// `mifo synth` without `--set`), then the typed overrides.
pub fn synth_sets(method: &str, sets: &[String]) -> Vec<String> {
    let mut all = Vec::with_capacity(sets.len() + 1);
    if method != "mifo" {
        all.push(format!("synth.method={method}"));
    }
    all.extend(sets.iter().cloned());
    all
}

/// The synthesis job of a workbench launch from learning run `spec` (its dtype; the launch's
/// preset, then its method and `--set` overrides), on `model` / `device`.
pub fn synth_job(
    l: &SynthLaunch,
    spec: &RunSpec,
    model: crate::model::ModelSource,
    device: &str,
) -> Result<SynthJob> {
    let (_, dtype, _) = crate::jobs::learn::stored_config(spec)?;
    let config = crate::config::resolve(
        &crate::synth::SynthConfig::preset(&l.preset)?,
        "synth",
        None,
        &synth_sets(&l.method, &l.sets),
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
        preset: l.preset.clone(),
        config,
        device: device.to_string(),
        dtype,
        rerun: false,
    })
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
