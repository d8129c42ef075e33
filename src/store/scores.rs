//! Scores added to a run after it finished (evaluation metrics such as `eval/sim_c`): one
//! sled transaction replaces the run's series under a prefix, updates the record's summaries
//! and appends a log line, so a crash leaves either the old scores or the new ones.

use std::collections::BTreeSet;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::error::{DbContext, StoreError, StoreResult};
use super::ids::RunId;
use super::logs::{cut_log_line, log_key};
use super::record::{RunRecord, RunStatus, SeriesSummary};
use super::{lock, metrics, Store};

/// The families of scores added after a run finished: `eval/` (CLIP and DINO, `mifo eval`) and
/// `oracle/` (the world's oracle, `mifo world score`).
pub const SCORE_PREFIXES: [&str; 2] = ["eval/", "oracle/"];

/// Whether a metric is such a score rather than a series the run itself wrote.
pub fn is_score(name: &str) -> bool {
    SCORE_PREFIXES.iter().any(|p| name.starts_with(p))
}

impl Store {
    /// Replaces every metric series of finished (`done`) run `id` whose name starts with
    /// `prefix` (which must end in `/`) by `scores`, one point at step 0 each, and appends `note`
    /// to the run's log — all in one transaction. Every score name must start with `prefix`,
    /// be a valid series name and appear once, and every value must be finite; otherwise
    /// nothing is written.
    pub fn record_scores(
        &self,
        id: &RunId,
        prefix: &str,
        scores: &[(String, f64)],
        note: &str,
    ) -> StoreResult<RunRecord> {
        if prefix.len() < 2 || !prefix.ends_with('/') {
            return Err(StoreError::InvalidInput(format!(
                "score prefix {prefix:?} must be a name followed by '/'"
            )));
        }
        if scores.is_empty() {
            return Err(StoreError::InvalidInput("no scores to record".into()));
        }
        let mut seen = BTreeSet::new();
        for (name, value) in scores {
            metrics::validate_series_name(name)?;
            if !name.starts_with(prefix) || name.len() == prefix.len() {
                return Err(StoreError::InvalidInput(format!(
                    "score {name:?} is not under {prefix:?}"
                )));
            }
            if !seen.insert(name.as_str()) {
                return Err(StoreError::InvalidInput(format!(
                    "score {name:?} given twice"
                )));
            }
            if !value.is_finite() {
                return Err(StoreError::InvalidInput(format!(
                    "score {name:?} is {value}, not a finite number"
                )));
            }
        }
        let _guard = lock(&self.inner.record_lock);
        let mut record = self.get_run(id)?;
        if record.status != RunStatus::Done {
            return Err(StoreError::state(
                id,
                format!(
                    "is {}; only a finished (done) run gets scores",
                    record.status
                ),
            ));
        }
        let mut scan = id.as_bytes().to_vec();
        scan.extend_from_slice(prefix.as_bytes());
        let old: Vec<sled::IVec> = self
            .inner
            .metrics
            .scan_prefix(&scan)
            .keys()
            .collect::<Result<_, _>>()
            .db(|| format!("reading the scores of run {id}"))?;
        record.summary.retain(|name, _| !name.starts_with(prefix));
        for (name, value) in scores {
            if let Some(s) = SeriesSummary::of(&[(0, *value)]) {
                record.summary.insert(name.clone(), s);
            }
        }
        let record_bytes = record.encode()?;
        let log_key = log_key(id, self.next_log_seq(id)?);
        let note = cut_log_line(note);
        let chunks: Vec<(Vec<u8>, Vec<u8>)> = scores
            .iter()
            .map(|(name, value)| {
                (
                    metrics::chunk_key(id, name, 0),
                    metrics::encode_chunk(&[(0, *value)]),
                )
            })
            .collect();
        let result: Result<(), TransactionError<()>> =
            (&self.inner.metrics, &self.inner.runs, &self.inner.logs).transaction(|(m, r, l)| {
                for key in &old {
                    m.remove(key)?;
                }
                for (key, chunk) in &chunks {
                    m.insert(key.as_slice(), chunk.as_slice())?;
                }
                r.insert(id.as_bytes(), record_bytes.as_slice())?;
                if !note.is_empty() {
                    l.insert(log_key.as_slice(), note.as_bytes())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            });
        match result {
            Ok(()) => {}
            Err(TransactionError::Storage(e)) => {
                return Err(e).db(|| format!("recording the scores of run {id}"))
            }
            Err(TransactionError::Abort(())) => {
                return Err(StoreError::InvalidInput(format!(
                    "recording the scores of run {id} was aborted"
                )))
            }
        }
        self.sync()?;
        Ok(record)
    }
}
