//! Run logs: numbered lines in the `logs` tree (key: run id ++ line number, u64 big-endian), so
//! a prefix scan reads a run's log in order.

use super::error::{DbContext, StoreError, StoreResult};
use super::ids::{RunId, RUN_ID_LEN};
use super::{lock, Store};

/// Longest log line kept (longer lines are cut).
pub const MAX_LOG_LINE: usize = 64 * 1024;

impl Store {
    /// Appends a line to the log of running run `id` (cut at [`MAX_LOG_LINE`] bytes).
    pub fn append_log(&self, id: &RunId, line: &str) -> StoreResult<()> {
        self.require_owned(id, "log lines can be appended")?;
        let mut next = lock(&self.inner.log_next);
        let seq = match next.get(id) {
            Some(&seq) => seq,
            None => self.next_log_seq(id)?,
        };
        self.inner
            .logs
            .insert(log_key(id, seq), cut_log_line(line).as_bytes())
            .db(|| format!("writing the log of run {id}"))?;
        next.insert(id.clone(), seq + 1);
        Ok(())
    }

    /// The number of the line after the last one stored in the log of run `id`.
    pub(super) fn next_log_seq(&self, id: &RunId) -> StoreResult<u64> {
        Ok(self
            .inner
            .logs
            .scan_prefix(id.as_bytes())
            .keys()
            .next_back()
            .transpose()
            .db(|| format!("reading the log of run {id}"))?
            .and_then(|k| log_seq(&k))
            .map_or(0, |s| s + 1))
    }

    /// The log lines of run `id`, in order.
    pub fn logs(&self, id: &RunId) -> StoreResult<Vec<String>> {
        let mut lines = Vec::new();
        for entry in self.inner.logs.scan_prefix(id.as_bytes()) {
            let (key, bytes) = entry.db(|| format!("reading the log of run {id}"))?;
            let line = std::str::from_utf8(&bytes).map_err(|_| {
                StoreError::corrupt(
                    format!("log line {} of run {id}", log_seq(&key).unwrap_or(0)),
                    "not UTF-8",
                )
            })?;
            lines.push(line.to_string());
        }
        Ok(lines)
    }
}

/// The logs key of line `seq` of run `id`.
pub(super) fn log_key(id: &RunId, seq: u64) -> Vec<u8> {
    let mut key = id.as_bytes().to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `line` cut to at most [`MAX_LOG_LINE`] bytes, at a character boundary.
pub(super) fn cut_log_line(line: &str) -> &str {
    let mut end = line.len().min(MAX_LOG_LINE);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

fn log_seq(key: &[u8]) -> Option<u64> {
    key.get(RUN_ID_LEN..)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}
