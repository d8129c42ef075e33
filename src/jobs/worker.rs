//! `mifo worker`: runs one learning or synthesis run of a store on the machine it is started on
//! (a Slurm compute node), without opening the store's database. It reads `job.json` from the
//! run's folder, writes outputs and checkpoints as content-addressed blobs (the store's blob
//! writer: temp file, fsync, rename) and reports everything else in the run's
//! [journal](super::journal); the engine ingests the journal into the store. A task of a Slurm
//! job array (a sweep) finds its run in the array's manifest, one run id per line, at the line
//! `SLURM_ARRAY_TASK_ID` names ([`run_array_task`]).
//!
//! A learning worker started again on the same run (Slurm requeued the job, or the engine
//! resubmitted it after a time limit or a lost node) continues from the last checkpoint its
//! journal names, else from the checkpoint `job.json` names (a resume), else from the start. A
//! synthesis worker has no checkpoint: started again, it synthesises every sample again (the
//! same bytes under the same output names, so the run still ends with one set). SIGTERM or SIGINT (how
//! Slurm cancels, times out or preempts a job) stops the run at its next step, after which the
//! worker journals `stopped` and exits; the engine decides from the job's Slurm state whether
//! the run was cancelled or is to be resumed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use serde::{Deserialize, Serialize};

use super::journal::{journal_path, run_dir, Entry, JournalWriter};
use super::learn::LearnJob;
use super::synth::{LearnedRef, SynthJob};
use crate::error::{Error, Result};
use crate::learn::{self, Checkpoint, LearnRequest};
use crate::model::{enable_precision, parse_device, resolve_dtype, StableDiffusion};
use crate::sink::{Progress, RunSink};
use crate::store::{host_name, BlobHash, BlobStore, RunId};

/// The file in a run's folder that tells the worker what to run.
pub const JOB_FILE: &str = "job.json";

/// What a worker runs: written by the engine into `<store>/work/<run>/job.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerJob {
    /// The run.
    pub run: RunId,
    /// The learning job, for a learning run; its input files are blobs of the store (on the
    /// shared filesystem).
    #[serde(default)]
    pub learn: Option<LearnJob>,
    /// The synthesis job, for a synthesis run.
    #[serde(default)]
    pub synth: Option<SynthWork>,
    /// The checkpoint (blob hash, hex) to continue from when the journal names none: the
    /// last checkpoint of an interrupted run resumed through the worker.
    pub resume_from: Option<String>,
}

/// A synthesis run as a worker runs it: the job, and what the engine read from the store for it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SynthWork {
    /// The synthesis job.
    pub job: SynthJob,
    /// The learning run it draws on, by blob (`None`: the plain model).
    pub learned: Option<LearnedRef>,
    /// The run's spec hash (written into every sample's PNG text, as a local run does).
    pub spec_hash: String,
}

impl WorkerJob {
    /// A learning run's job.
    pub fn learning(run: RunId, learn: LearnJob, resume_from: Option<String>) -> WorkerJob {
        WorkerJob {
            run,
            learn: Some(learn),
            synth: None,
            resume_from,
        }
    }

    /// A synthesis run's job.
    pub fn synthesis(run: RunId, synth: SynthWork) -> WorkerJob {
        WorkerJob {
            run,
            learn: None,
            synth: Some(synth),
            resume_from: None,
        }
    }

    /// The device the job asks for.
    pub fn device(&self) -> &str {
        match (&self.learn, &self.synth) {
            (Some(l), _) => &l.device,
            (None, Some(s)) => &s.job.device,
            (None, None) => super::pool::AUTO,
        }
    }

    /// Writes the job into the run's folder under the store `root` (temp file, then rename).
    pub fn write(&self, root: &Path) -> Result<PathBuf> {
        let dir = run_dir(root, &self.run);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(JOB_FILE);
        let tmp = dir.join(format!("{JOB_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Input(format!("job of run {}: {e}", self.run)))?;
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    /// Reads the job of run `run` under the store `root`.
    pub fn read(root: &Path, run: &RunId) -> Result<WorkerJob> {
        let path = run_dir(root, run).join(JOB_FILE);
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_slice(&text)
            .map_err(|e| Error::file(&path, format!("not a worker job: {e}")))
    }
}

/// The signal that stopped the worker (0: none yet).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    STOP.store(true, Ordering::SeqCst);
}

fn catch_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
        // SAFETY: the handler only stores into atomics, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        n => format!("signal {n}"),
    }
}

/// A [`RunSink`] that writes blobs and journal records.
struct JournalSink {
    journal: JournalWriter,
    blobs: BlobStore,
}

impl RunSink for JournalSink {
    fn metric(&mut self, name: &str, step: u64, value: f64) -> Result<()> {
        self.journal.append(&Entry::Metric {
            name: name.to_string(),
            step,
            value: value.to_string(),
        })
    }

    fn log(&mut self, line: &str) -> Result<()> {
        self.journal.append(&Entry::Log {
            line: line.to_string(),
        })
    }

    fn progress(&mut self, p: &Progress) {
        // Progress is advisory: a failed write shows up on the next metric or output.
        let _ = self.journal.append(&Entry::Progress {
            step: p.step,
            total: p.total,
            phase: p.phase.clone(),
            message: p.message.clone(),
        });
    }

    fn artifact(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let hash = self.blobs.put(&bytes)?;
        self.journal.append(&Entry::Output {
            name: name.to_string(),
            hash: hash.to_hex(),
        })
    }

    fn checkpoint(&mut self, step: u64, bytes: Vec<u8>) -> Result<()> {
        let hash = self.blobs.put(&bytes)?;
        self.journal.append_synced(&Entry::Checkpoint {
            step,
            hash: hash.to_hex(),
        })
    }

    fn should_stop(&self) -> bool {
        STOP.load(Ordering::Relaxed)
    }
}

/// The device a worker runs on: `auto` is the first GPU the job can see (Slurm's `--gres`
/// sets `CUDA_VISIBLE_DEVICES`), else the CPU.
fn worker_device(asked: &str) -> String {
    if asked != super::pool::AUTO {
        return asked.to_string();
    }
    if super::pool::visible_gpus() > 0 {
        "cuda:0".into()
    } else {
        "cpu".into()
    }
}

/// Runs run `run` of the store at `root` as a worker (see the module docs). An error here is
/// one the worker could not journal (no job file, an unwritable journal); a failed run is
/// journalled as `ended failed` and is not an error.
pub fn run(root: &Path, run: &RunId) -> Result<()> {
    let job = WorkerJob::read(root, run)?;
    let dir = run_dir(root, run);
    let (journal, old) = JournalWriter::open(&journal_path(&dir))?;
    if old.iter().any(|e| matches!(e, Entry::Ended { .. })) {
        // A job that Slurm started again after the run ended has nothing to do.
        eprintln!("mifo worker: run {run} already ended");
        return Ok(());
    }
    catch_stop_signals();
    let resume_hash = old
        .iter()
        .rev()
        .find_map(|e| match e {
            Entry::Checkpoint { hash, .. } => Some(hash.clone()),
            _ => None,
        })
        .or(job.resume_from.clone());
    let blobs = BlobStore::new(root.join("blobs"));
    let mut sink = JournalSink { journal, blobs };
    let device_name = worker_device(job.device());
    let outcome = match (&job.learn, &job.synth) {
        (Some(learn), _) => run_learn(&mut sink, learn, resume_hash.as_deref(), &device_name),
        (None, Some(synth)) => run_synth(&mut sink, synth, &device_name),
        (None, None) => Err(Error::Input(format!(
            "{}: names neither a learning nor a synthesis job",
            run_dir(root, run).join(JOB_FILE).display()
        ))),
    };
    let end = match outcome {
        Ok(true) => Entry::Stopped {
            signal: signal_name(SIGNAL.load(Ordering::SeqCst)),
        },
        Ok(false) => Entry::Ended {
            status: "done".into(),
            error: None,
        },
        Err(e) => Entry::Ended {
            status: "failed".into(),
            error: Some(e.to_string()),
        },
    };
    sink.journal.append_synced(&end)
}

/// Runs a learning job into `sink`; `Ok(true)` when a stop signal ended it early.
fn run_learn(
    sink: &mut JournalSink,
    learn: &LearnJob,
    resume_hash: Option<&str>,
    device_name: &str,
) -> Result<bool> {
    let device = parse_device(device_name)?;
    let dtype = resolve_dtype(&learn.dtype, &device)?;
    enable_precision(&learn.dtype);
    let checkpoint = match resume_hash {
        Some(h) => {
            let hash: BlobHash = h
                .parse()
                .map_err(|_| Error::Input(format!("checkpoint `{h}` is not a blob hash")))?;
            Some(Checkpoint::from_bytes(&sink.blobs.read(&hash)?, &device)?)
        }
        None => None,
    };
    journal_started(sink, device_name, checkpoint.as_ref().map(|c| c.step))?;
    let sd = StableDiffusion::load_source(&learn.model, dtype, &device, Vec::new())?;
    let resolution = super::learn::model_resolution(&sd);
    let scene = learn::load_scene(
        &learn.files,
        resolution,
        learn.allow_overlap,
        learn.config.fit(),
    )?;
    let instances = scene.masks.len();
    sink.log(&format!(
        "learn {instances} instances, model {}, seed {} (worker on {})",
        super::model_label(&learn.model),
        learn.seed,
        host_name()
    ))?;
    let report = learn::run(
        LearnRequest {
            sd: &sd,
            scene: &scene,
            config: learn.config.clone(),
            seed: learn.seed,
            resume: checkpoint,
            class_images: Vec::new(),
            measure_only: false,
        },
        sink,
    )?;
    Ok(report.cancelled)
}

/// Runs a synthesis job into `sink` from the start; `Ok(true)` when a stop signal ended it
/// early.
fn run_synth(sink: &mut JournalSink, synth: &SynthWork, device_name: &str) -> Result<bool> {
    journal_started(sink, device_name, None)?;
    let job = SynthJob {
        device: device_name.to_string(),
        ..synth.job.clone()
    };
    let blobs = sink.blobs.clone();
    let report =
        super::synth::synthesise(&blobs, &job, synth.learned.as_ref(), &synth.spec_hash, sink)?;
    Ok(report.cancelled)
}

/// Journals the worker's start (synced: the engine marks the run running on it).
fn journal_started(
    sink: &mut JournalSink,
    device_name: &str,
    resumed_from: Option<u64>,
) -> Result<()> {
    sink.journal.append_synced(&Entry::Started {
        host: host_name(),
        device: device_name.to_string(),
        pid: std::process::id(),
        job: slurm_job_id(),
        resumed_from,
    })
}

/// This job's id as Slurm names it: `ARRAY_TASK` for a task of a job array, else the job id.
fn slurm_job_id() -> Option<String> {
    let array = std::env::var("SLURM_ARRAY_JOB_ID").ok();
    let task = std::env::var("SLURM_ARRAY_TASK_ID").ok();
    match (array, task) {
        (Some(a), Some(t)) => Some(format!("{a}_{t}")),
        _ => std::env::var("SLURM_JOB_ID").ok(),
    }
}

/// `mifo worker --manifest FILE`: the task of a Slurm job array runs the run on line
/// `SLURM_ARRAY_TASK_ID` (0-based) of `FILE` (one run id per line, written by the engine).
pub fn run_array_task(root: &Path, manifest: &Path) -> Result<()> {
    let task: usize = std::env::var("SLURM_ARRAY_TASK_ID")
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| {
            Error::Input(format!(
                "--manifest {}: SLURM_ARRAY_TASK_ID is not set (run as a task of a Slurm job array)",
                manifest.display()
            ))
        })?;
    let text = std::fs::read_to_string(manifest).map_err(|e| Error::io(manifest, e))?;
    let line = text.lines().nth(task).ok_or_else(|| {
        Error::file(
            manifest,
            format!("has no line for array task {task} (one run id per line)"),
        )
    })?;
    let run: RunId = line.trim().parse().map_err(|_| {
        Error::file(
            manifest,
            format!("line {}: `{}` is not a run id", task + 1, line.trim()),
        )
    })?;
    self::run(root, &run)
}

/// `mifo worker --probe FILE`: writes this host's name into `FILE` (temp file, then rename),
/// so that the engine knows a compute node can run this binary and write to the store.
pub fn probe(file: &Path) -> Result<()> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, host_name()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, file).map_err(|e| Error::io(file, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob written twice (a retried job writing the same checkpoint or output again) is
    /// the same blob: same hash, one file, same bytes.
    #[test]
    fn a_blob_written_twice_is_the_same_blob() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path().join("blobs"));
        let bytes = b"checkpoint bytes".to_vec();
        let a = blobs.put(&bytes).unwrap();
        let first = std::fs::metadata(blobs.path(&a)).unwrap();
        let b = blobs.put(&bytes).unwrap();
        assert_eq!(a, b);
        assert_eq!(blobs.read(&b).unwrap(), bytes);
        let files: Vec<_> = walk(&dir.path().join("blobs"));
        assert_eq!(files.len(), 1, "{files:?}");
        // Not rewritten either: the file is the first one.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(blobs.path(&b)).unwrap().ino(),
            first.ino()
        );
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    /// A job file round-trips through its folder.
    #[test]
    fn a_job_file_is_written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunId::from_parts(1_750_000_000_000, 3);
        let job = WorkerJob::learning(
            run.clone(),
            LearnJob {
                model: crate::model::ModelSource::folder(dir.path()),
                files: crate::learn::SceneFiles {
                    image: dir.path().join("i.png"),
                    masks: vec![dir.path().join("m.png")],
                    world: None,
                },
                scene_dir: None,
                preset: "paper".into(),
                config: crate::learn::LearnConfig::preset("paper").unwrap(),
                seed: 4,
                device: "auto".into(),
                dtype: "f32".into(),
                allow_overlap: true,
                rerun: true,
            },
            None,
        );
        job.write(dir.path()).unwrap();
        let back = WorkerJob::read(dir.path(), &run).unwrap();
        assert_eq!(back.run, run);
        assert_eq!(back.learn.as_ref().map(|l| l.seed), Some(4));
        assert!(back.synth.is_none());
        let missing = WorkerJob::read(dir.path(), &RunId::from_parts(1, 1)).unwrap_err();
        assert!(missing.to_string().contains("job.json"), "{missing}");
    }
}
