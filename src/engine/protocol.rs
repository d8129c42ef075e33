//! The engine's wire protocol: length-prefixed frames (u32 big-endian length, then a bincode 2
//! payload) over a unix socket, with a version handshake.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::jobs::learn::LearnJob;
use crate::jobs::sink::SinkEvent;
use crate::runs::{RunsReply, RunsRequest};

/// Bumped whenever a message changes shape.
pub const PROTOCOL_VERSION: u32 = 13;
/// Largest frame accepted (a `runs show --json` of a long run is well below this).
pub const MAX_FRAME: usize = 64 << 20;

/// Client → engine. `Hello` stays the first variant in every protocol version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// First message of every connection.
    Hello {
        /// The client's [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Engine status.
    Status,
    /// A `mifo runs …` operation on the engine's store; answered with [`Response::Runs`] (or
    /// [`Response::Error`]).
    Runs(RunsRequest),
    /// Every run record (newest first) with its tags.
    ListRecords,
    /// Every run (newest first) as a compact [`RunSummary`]: what a runs table shows.
    ListSummaries,
    /// One run's record, spec (when readable) and log.
    Detail {
        /// Run id or unique prefix.
        run: String,
    },
    /// Every metric series of a run.
    Metrics {
        /// Run id or unique prefix.
        run: String,
    },
    /// A blob's bytes by hash (hex).
    Blob {
        /// blake3 hex.
        hash: String,
    },
    /// Adds (or with `remove`, removes) a tag.
    Tag {
        /// Run id or unique prefix.
        run: String,
        /// The tag.
        tag: String,
        /// Remove instead of add.
        remove: bool,
    },
    /// Deletes a finished run and the blobs no other run uses.
    Remove {
        /// Run id or unique prefix.
        run: String,
    },
    /// Validate and queue a learning run.
    SubmitLearn(Box<LearnJob>),
    /// Validate and queue a synthesis run.
    SubmitSynth(Box<crate::jobs::synth::SynthJob>),
    /// Check every run of a sweep, then record and queue those whose spec has not run (nothing
    /// when one fails its check); every run of the sweep, skipped or not, gets the tag `name`.
    /// Answered with [`Response::Sweep`].
    SubmitSweep {
        /// The sweep's name: the tag of its runs.
        name: String,
        /// One entry per combination.
        entries: Vec<crate::jobs::sweep::SweepEntry>,
    },
    /// The table of sweep `name` (its varied keys against the final metrics of `by`, best
    /// first); answered with [`Response::SweepTable`].
    SweepTable {
        /// The sweep's name (a tag).
        name: String,
        /// `METRIC`, `METRIC:min` or `METRIC:max`, in sort order.
        by: Vec<String>,
    },
    /// Queue the continuation of an interrupted learning run.
    ResumeLearn {
        /// Run id or unique prefix.
        run: String,
        /// The model (its fingerprint must match the run's).
        model: crate::model::ModelSource,
        /// Device.
        device: String,
    },
    /// Cancel a queued or running run (it stops at the next step; its checkpoint is kept).
    Cancel {
        /// Run id or unique prefix.
        run: String,
    },
    /// From now on this connection only receives [`Response::Event`]s (of one run, or all).
    Subscribe {
        /// Run id or prefix; `None` for every run.
        run: Option<String>,
    },
    /// Stop the engine: the running step finishes and checkpoints; `force` exits at once.
    Stop {
        /// Exit without waiting for the step.
        force: bool,
    },
    /// Store evaluation scores computed by the client (`mifo eval`) with a finished run:
    /// replaces its `eval/*` metrics (one point each at step 0) and logs `note`, in one
    /// transaction; invalid scores change nothing.
    RecordScores {
        /// Run id or unique prefix.
        run: String,
        /// `eval/…` metric name → value.
        scores: Vec<(String, f64)>,
        /// One log line saying how they were computed.
        note: String,
    },
}

/// One line of a runs table: the record's small fields, the final loss and the tags (no
/// outputs, no metric summaries), so that listing 10,000 runs stays cheap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Run id.
    pub id: crate::store::RunId,
    /// Learn or synth.
    pub kind: crate::store::RunKind,
    /// Status.
    pub status: crate::store::RunStatus,
    /// Created (ms since the epoch).
    pub created_ms: u64,
    /// Started.
    pub started_ms: Option<u64>,
    /// Finished.
    pub finished_ms: Option<u64>,
    /// Scene label.
    pub scene: Option<String>,
    /// Parent run.
    pub parent: Option<crate::store::RunId>,
    /// The run this one repeats.
    pub rerun_of: Option<crate::store::RunId>,
    /// Whether a finished re-run's outputs are bit-identical.
    pub rerun_identical: Option<bool>,
    /// Spec hash.
    pub spec_hash: crate::store::SpecHash,
    /// Config keys changed from the preset.
    pub config_deltas: Vec<(String, String)>,
    /// Last value of `loss/total` (else the first `loss/*` series).
    pub final_loss: Option<f64>,
    /// Tags.
    pub tags: Vec<String>,
    /// Device.
    pub device: String,
}

impl RunSummary {
    /// The summary of `record`, with its `tags`.
    pub fn from_record(record: crate::store::RunRecord, tags: Vec<String>) -> Self {
        Self {
            final_loss: record.final_loss(),
            id: record.id,
            kind: record.kind,
            status: record.status,
            created_ms: record.created_ms,
            started_ms: record.started_ms,
            finished_ms: record.finished_ms,
            scene: record.scene,
            parent: record.parent,
            rerun_of: record.rerun_of,
            rerun_identical: record.rerun_identical,
            spec_hash: record.spec_hash,
            config_deltas: record.config_deltas,
            tags,
            device: record.device,
        }
    }
}

/// A running job: (run, device, progress as (step, total, phase)).
pub type RunningJob = (String, String, Option<(u64, u64, String)>);

/// What the engine reports about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    /// Process id.
    pub pid: u32,
    /// Seconds since start.
    pub uptime_s: f64,
    /// The store folder.
    pub store: String,
    /// Queued run ids, oldest first.
    pub queue: Vec<String>,
    /// The running run, if any.
    pub running: Option<String>,
    /// Progress of the running run: (step, total, phase).
    pub progress: Option<(u64, u64, String)>,
    /// Device of the running job.
    pub device: Option<String>,
    /// Every running job.
    pub running_all: Vec<RunningJob>,
    /// How many jobs may run at once (the slots of the device pool).
    pub workers: usize,
    /// The device pool: each device, its slots and the runs holding them.
    pub pool: Vec<crate::jobs::pool::DeviceSlots>,
    /// Queued runs with the device each waits for (`auto` or a device name), oldest first.
    pub waiting: Vec<(String, String)>,
    /// Where learning and synthesis runs go: `local` (the pool) or `slurm`.
    pub executor: String,
    /// The runs followed on Slurm, with their jobs and job states.
    pub slurm: Vec<crate::jobs::slurm::SlurmJob>,
    /// Protocol version.
    pub version: u32,
}

/// Something that happened, streamed to subscribers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The run.
    pub run: String,
    /// What happened.
    pub kind: EventKind,
}

/// Kinds of [`Event`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// Status change (`queued`, `running`, `done`, `failed`, `cancelled`, `interrupted`).
    Status {
        /// New status.
        status: String,
        /// Error text of a failed run.
        error: Option<String>,
    },
    /// A metric point, log line, progress report or new output.
    Run(SinkEvent),
}

/// Engine → client. `Hello` and `Error` stay the first two variants in every protocol
/// version, so that a client of another version can always read the handshake's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    /// Handshake accepted.
    Hello {
        /// The engine's version.
        version: u32,
        /// The engine's pid.
        pid: u32,
    },
    /// Request refused or failed (one line).
    Error(String),
    /// Engine status.
    Status(EngineStatus),
    /// The answer to a [`Request::Runs`].
    Runs(RunsReply),
    /// Raw bytes (an output).
    Bytes(Vec<u8>),
    /// Run records, newest first, each with its tags.
    Records(Vec<(crate::store::RunRecord, Vec<String>)>),
    /// Run summaries, newest first.
    Summaries(Vec<RunSummary>),
    /// One run in full.
    Detail {
        /// Its record.
        record: Box<crate::store::RunRecord>,
        /// Its spec as JSON (bincode cannot carry the free-form config), or why it could not
        /// be read; parse with `serde_json::from_str::<RunSpec>`.
        spec_json: std::result::Result<String, String>,
        /// Its log lines.
        logs: Vec<String>,
        /// Its tags.
        tags: Vec<String>,
        /// The model folder the run used, where this store knows it and it still holds that
        /// model (same fingerprint); for a single-file model, the file.
        model_dir: Option<std::path::PathBuf>,
        /// The `--model-config` folder noted with a single-file model.
        model_config: Option<std::path::PathBuf>,
    },
    /// Metric series: name → [(step, value)].
    Metrics(std::collections::BTreeMap<String, Vec<(u64, f64)>>),
    /// A run was queued.
    Queued {
        /// Its id.
        run: String,
        /// Validation warnings (e.g. overlapping boxes).
        warnings: Vec<String>,
    },
    /// A finished run already has this exact spec (nothing was queued).
    AlreadyRan {
        /// Its id.
        run: String,
    },
    /// What became of each combination of a [`Request::SubmitSweep`], in order.
    Sweep(Vec<crate::jobs::sweep::SweepItem>),
    /// The answer to a [`Request::SweepTable`].
    SweepTable(crate::jobs::sweep::SweepTable),
    /// Request done.
    Ok,
    /// A streamed event (after `Subscribe`).
    Event(Event),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let bytes = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    if bytes.len() > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "message of {} bytes exceeds the {MAX_FRAME}-byte frame limit",
                bytes.len()
            ),
        ));
    }
    w.write_all(&(bytes.len() as u32).to_be_bytes())?;
    w.write_all(&bytes)?;
    w.flush()
}

/// Reads one frame (`Ok(None)` on a clean end of stream).
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    let (msg, _) = bincode::serde::decode_from_slice(&buf, config())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply that holds free-form JSON (config values) survives the bincode framing.
    #[test]
    fn a_diff_with_json_values_crosses_the_wire() {
        let a = crate::store::RunId::from_parts(1_750_000_000_000, 7);
        let diff = crate::store::RunDiff {
            a: a.clone(),
            b: a,
            fields: Vec::new(),
            config: vec![crate::store::ConfigDelta {
                key: "learn.lr".into(),
                a: Some(serde_json::json!({"x": [0.001, null, "s"]})),
                b: None,
                same: false,
            }],
            inputs: Vec::new(),
            metrics: Vec::new(),
            outputs: Vec::new(),
        };
        let mut frame = Vec::new();
        write_frame(
            &mut frame,
            &Response::Runs(RunsReply::Diff(Box::new(diff.clone()))),
        )
        .unwrap();
        let back: Response = read_frame(&mut frame.as_slice()).unwrap().unwrap();
        let Response::Runs(RunsReply::Diff(back)) = back else {
            panic!("not a diff: {back:?}")
        };
        assert_eq!(back.config, diff.config);
        assert_eq!(back.a, diff.a);
    }
}
