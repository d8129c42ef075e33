//! `RunRecord`: what happened to one run, and its bounded binary encoding in the `runs` tree.
//!
//! Encoding: one format byte ([`RECORD_FORMAT`]) followed by the record in bincode 2 (standard
//! config, varint integers) with a decode limit of `MAX_RECORD_BYTES` (1 MiB), so a corrupt length field
//! fails cleanly instead of allocating. bincode is not self-describing: adding a field means a new
//! format byte and a decoder for the old one.
//!
//! Formats: 1 is the record without [`RunRecord::model_source`]; 2 appends that field; 3
//! (written now) appends [`RunRecord::slurm_jobs`]. Each new field is last, and bincode encodes
//! `None` and an empty list as one 0 byte each, so an older body decodes as a format-3 body
//! followed by one 0 byte per missing field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::{StoreError, StoreResult};
use super::ids::{BlobHash, RunId, SpecHash};
use super::spec::RunKind;

/// The format byte in front of every encoded record.
pub const RECORD_FORMAT: u8 = 3;
/// The format before [`RunRecord::model_source`] existed; still read.
const RECORD_FORMAT_V1: u8 = 1;
/// The format before [`RunRecord::slurm_jobs`] existed; still read.
const RECORD_FORMAT_V2: u8 = 2;
/// Largest encoded record the store writes or reads.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Where a run is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Created, not started.
    Queued,
    /// Started by a process that may still be working on it.
    Running,
    /// Finished and every output recorded.
    Done,
    /// Stopped by an error (see [`RunRecord::error`]).
    Failed,
    /// Stopped on request.
    Cancelled,
    /// Was running when its process died (found by [`super::Store::mark_stale_running_interrupted`]).
    Interrupted,
}

impl RunStatus {
    /// All statuses, in life order.
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Done,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::Interrupted,
    ];

    /// The lowercase name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Done => "done",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
        }
    }

    /// True for statuses a run never leaves.
    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RunStatus {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                StoreError::InvalidInput(format!(
                    "unknown run status '{text}' (expected queued, running, done, failed, cancelled or interrupted)"
                ))
            })
    }
}

/// Summary of one metric series, kept in the record so listings never read the series.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeriesSummary {
    /// Number of points.
    pub count: u64,
    /// Step of the last point appended.
    pub last_step: u64,
    /// Value of the last point appended (the "final" value).
    pub last: f64,
    /// Smallest value (NaN when every value is NaN).
    pub min: f64,
    /// Largest value (NaN when every value is NaN).
    pub max: f64,
}

impl SeriesSummary {
    /// Summarises points in append order; `None` for an empty series.
    pub fn of(points: &[(u64, f64)]) -> Option<SeriesSummary> {
        let &(last_step, last) = points.last()?;
        let (mut min, mut max) = (f64::NAN, f64::NAN);
        for &(_, v) in points {
            min = min.min(v);
            max = max.max(v);
        }
        Some(SeriesSummary {
            count: points.len() as u64,
            last_step,
            last,
            min,
            max,
        })
    }
}

/// What happened to one run. Stored in the `runs` tree under the run id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run's id (time-ordered; see [`RunId`]).
    pub id: RunId,
    /// Hash of the run's [`super::RunSpec`] in the `specs` tree.
    pub spec_hash: SpecHash,
    /// Copy of the spec's kind, so listings need not read specs.
    pub kind: RunKind,
    /// Copy of the spec's parent run, so listings need not read specs.
    pub parent: Option<RunId>,
    /// Where the run is in its life.
    pub status: RunStatus,
    /// When the run was created (ms since the Unix epoch).
    pub created_ms: u64,
    /// When the run started (ms since the Unix epoch).
    pub started_ms: Option<u64>,
    /// When the run reached a final status (ms since the Unix epoch).
    pub finished_ms: Option<u64>,
    /// Host name of the machine that ran it (empty until started).
    pub host: String,
    /// Device it ran on, e.g. `cpu` or `cuda:0` (empty until started).
    pub device: String,
    /// Process id of the process that started it.
    pub pid: Option<u32>,
    /// Short label of the inputs for listings, e.g. the scene folder's name.
    pub scene: Option<String>,
    /// The config keys the launcher set away from their defaults (`key`, `value`), for listings.
    pub config_deltas: Vec<(String, String)>,
    /// Output blobs by name (`embeddings`, `image0`, …).
    pub outputs: BTreeMap<String, BlobHash>,
    /// Summary of each metric series, filled in when the run reaches a final status.
    pub summary: BTreeMap<String, SeriesSummary>,
    /// Why the run failed or was interrupted.
    pub error: Option<String>,
    /// For a re-run: the earlier run with the same spec that this one repeats.
    pub rerun_of: Option<RunId>,
    /// For a finished re-run: whether every output came out bit-identical (same names, same blob
    /// hashes) to the outputs of [`Self::rerun_of`]. `None` until then, or when that run is gone.
    pub rerun_identical: Option<bool>,
    /// The model source as the user gave it (`--model`: a folder, a single file, or a Hugging
    /// Face repo id with its revision); the spec holds only the weights' fingerprint. `None`
    /// for records written before mifo recorded it.
    #[serde(default)]
    pub model_source: Option<String>,
    /// The Slurm job ids the run ran under, oldest first (a run resubmitted after a timeout or
    /// a lost node has several); empty for a run the engine ran itself.
    #[serde(default)]
    pub slurm_jobs: Vec<String>,
}

impl RunRecord {
    /// Last value of the run's main loss: `loss/total`, else the first `loss/*` series (from
    /// the summary, so `None` until the run is final).
    pub fn final_loss(&self) -> Option<f64> {
        self.summary
            .get("loss/total")
            .or_else(|| {
                self.summary
                    .iter()
                    .find(|(name, _)| name.starts_with("loss/"))
                    .map(|(_, s)| s)
            })
            .map(|s| s.last)
    }

    /// Encodes the record (format byte + bincode), refusing records over `MAX_RECORD_BYTES` (1 MiB).
    pub fn encode(&self) -> StoreResult<Vec<u8>> {
        let mut bytes = vec![RECORD_FORMAT];
        let body = bincode::serde::encode_to_vec(self, bincode_config()).map_err(|e| {
            StoreError::InvalidInput(format!("run {} cannot be encoded: {e}", self.id))
        })?;
        bytes.extend_from_slice(&body);
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(StoreError::InvalidInput(format!(
                "run {} record is {} bytes; the store accepts at most {MAX_RECORD_BYTES}",
                self.id,
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Decodes a record; `what` names it in errors (e.g. `run 0j5…`).
    pub fn decode(bytes: &[u8], what: &str) -> StoreResult<RunRecord> {
        let (&format, body) = bytes
            .split_first()
            .ok_or_else(|| StoreError::corrupt(what, "empty record"))?;
        let upgraded;
        let body = match format {
            RECORD_FORMAT => body,
            RECORD_FORMAT_V1 => {
                // The missing last fields, `model_source: None` and no Slurm jobs.
                upgraded = [body, &[0u8, 0u8]].concat();
                &upgraded[..]
            }
            RECORD_FORMAT_V2 => {
                // The missing last field: no Slurm jobs.
                upgraded = [body, &[0u8]].concat();
                &upgraded[..]
            }
            _ => {
                return Err(StoreError::corrupt(
                    what,
                    format!(
                        "unknown record format {format} (this mifo reads {RECORD_FORMAT_V1} to {RECORD_FORMAT})"
                    ),
                ))
            }
        };
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(StoreError::corrupt(
                what,
                format!("{} bytes is over the limit", bytes.len()),
            ));
        }
        let (record, used): (RunRecord, usize) =
            bincode::serde::decode_from_slice(body, bincode_config())
                .map_err(|e| StoreError::corrupt(what, e))?;
        if used != body.len() {
            return Err(StoreError::corrupt(
                what,
                format!("{} trailing bytes after the record", body.len() - used),
            ));
        }
        Ok(record)
    }

    /// Wall time from start to finish (or to `now_ms` while running), in milliseconds.
    pub fn duration_ms(&self, now_ms: u64) -> Option<u64> {
        let start = self.started_ms?;
        Some(self.finished_ms.unwrap_or(now_ms).saturating_sub(start))
    }
}

/// bincode 2 standard config with the record limit: the decoder refuses any length past it.
pub(crate) fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_RECORD_BYTES>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(model_source: Option<String>) -> RunRecord {
        RunRecord {
            id: "01m8c5s5mwfsx10c".parse().unwrap(),
            spec_hash: SpecHash::of(b"spec"),
            kind: RunKind::Learn,
            parent: None,
            status: RunStatus::Done,
            created_ms: 1,
            started_ms: Some(2),
            finished_ms: Some(3),
            host: "h".into(),
            device: "cpu".into(),
            pid: Some(4),
            scene: Some("coffee".into()),
            config_deltas: vec![("learn.lr".into(), "1".into())],
            outputs: BTreeMap::new(),
            summary: BTreeMap::new(),
            error: None,
            rerun_of: None,
            rerun_identical: Some(true),
            model_source,
            slurm_jobs: Vec::new(),
        }
    }

    #[test]
    fn the_model_source_round_trips_and_format_1_records_still_read() {
        let with = record(Some("stabilityai/stable-diffusion-2-1-base@main".into()));
        let bytes = with.encode().unwrap();
        assert_eq!(bytes[0], RECORD_FORMAT);
        assert_eq!(RunRecord::decode(&bytes, "run").unwrap(), with);
        // A format-2 record is the format-3 body without the trailing empty job list, a
        // format-1 record also without the `None` before it.
        let without = record(None);
        let mut old = without.encode().unwrap();
        assert_eq!(old.pop(), Some(0));
        old[0] = RECORD_FORMAT_V2;
        assert_eq!(RunRecord::decode(&old, "run").unwrap(), without);
        assert_eq!(old.pop(), Some(0));
        old[0] = RECORD_FORMAT_V1;
        assert_eq!(RunRecord::decode(&old, "run").unwrap(), without);
        // Slurm job ids round-trip.
        let mut jobs = record(None);
        jobs.slurm_jobs = vec!["12".into(), "15".into()];
        let bytes = jobs.encode().unwrap();
        assert_eq!(RunRecord::decode(&bytes, "run").unwrap(), jobs);
        old[0] = 9;
        let err = RunRecord::decode(&old, "run").unwrap_err().to_string();
        assert!(err.contains("unknown record format 9"), "{err}");
    }
}
