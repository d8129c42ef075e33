//! A run's journal: the append-only file through which a worker on another machine (a Slurm
//! job, [`super::worker`]) reports a run to the engine, which ingests it into the store. Workers
//! never open the sled database (one process per database, not safe across nodes).
//!
//! Every run that goes through a worker has a folder `<store>/work/<run id>/` holding
//! `job.json` (what to run, written by the engine), `journal` (written by the worker) and
//! `slurm.out` (the job's stdout and stderr).
//!
//! One record per line: `<byte length of JSON> <first 16 hex of its blake3> <JSON>\n`. A reader
//! stops at the first line that is incomplete (no newline yet), of the wrong length or with the
//! wrong checksum: a record torn by a kill is never read, and everything before it is. A worker
//! that opens a journal cuts such a torn tail off before it appends.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{Digest, RunId};

/// The folder of run `id`'s worker files under the store `root`.
pub fn run_dir(root: &Path, id: &RunId) -> PathBuf {
    root.join("work").join(id.to_string())
}

/// The journal of the run whose folder is `dir`.
pub fn journal_path(dir: &Path) -> PathBuf {
    dir.join("journal")
}

/// One thing a worker reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// The worker started (a job restarted by Slurm starts again: one entry per attempt).
    Started {
        /// Host it runs on.
        host: String,
        /// Device it runs on.
        device: String,
        /// Its process id.
        pid: u32,
        /// The Slurm job id (`SLURM_JOB_ID`), when it runs under Slurm.
        job: Option<String>,
        /// The step of the checkpoint it continues from, if any.
        resumed_from: Option<u64>,
    },
    /// A metric point.
    Metric {
        /// Series.
        name: String,
        /// Step.
        step: u64,
        /// Value, as Rust prints it (round-trips exactly, NaN and infinities included).
        value: String,
    },
    /// A log line.
    Log {
        /// The line.
        line: String,
    },
    /// Progress after a step.
    Progress {
        /// Steps done.
        step: u64,
        /// Total steps.
        total: u64,
        /// Phase.
        phase: String,
        /// Latest losses in words.
        message: String,
    },
    /// An output, written as a blob before this entry.
    Output {
        /// Output name.
        name: String,
        /// Blob hash (hex).
        hash: String,
    },
    /// A checkpoint, written as a blob before this entry.
    Checkpoint {
        /// Step it was taken after.
        step: u64,
        /// Blob hash (hex).
        hash: String,
    },
    /// The worker stopped on a signal (Slurm's cancel, time limit or preemption) after
    /// checkpointing; what becomes of the run depends on why Slurm ended the job.
    Stopped {
        /// The signal, e.g. `SIGTERM`.
        signal: String,
    },
    /// The run ended.
    Ended {
        /// `done`, `failed` or `cancelled`.
        status: String,
        /// Why it failed.
        error: Option<String>,
    },
}

/// Encodes one record as its journal line (with the newline).
pub fn encode_line(entry: &Entry) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(entry)
        .map_err(|e| Error::Input(format!("journal entry cannot be encoded: {e}")))?;
    let sum = &Digest::of(&json).to_hex()[..16];
    let mut line = format!("{} {sum} ", json.len()).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    Ok(line)
}

/// Decodes one line (without its newline); `None` when it is torn or corrupt.
fn decode_line(line: &[u8]) -> Option<Entry> {
    let text = std::str::from_utf8(line).ok()?;
    let (len, rest) = text.split_once(' ')?;
    let (sum, json) = rest.split_once(' ')?;
    if len.parse::<usize>().ok()? != json.len()
        || Digest::of(json.as_bytes()).to_hex()[..16] != *sum
    {
        return None;
    }
    serde_json::from_str(json).ok()
}

/// Parses the whole records of `bytes`, returning them and the length of the prefix they
/// fill: the first torn or corrupt line and everything after it is left out.
pub fn parse(bytes: &[u8]) -> (Vec<Entry>, usize) {
    let mut entries = Vec::new();
    let mut used = 0;
    while let Some(end) = bytes[used..].iter().position(|&b| b == b'\n') {
        let Some(entry) = decode_line(&bytes[used..used + end]) else {
            break;
        };
        entries.push(entry);
        used += end + 1;
    }
    (entries, used)
}

/// Reads the whole records of the journal at `path` from byte `offset` on; returns them and
/// the offset after the last one (a missing journal has none).
pub fn read_from(path: &Path, offset: u64) -> Result<(Vec<Entry>, u64)> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), offset)),
        Err(e) => return Err(Error::io(path, e)),
    };
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let (entries, used) = parse(&bytes);
    Ok((entries, offset + used as u64))
}

/// Appends records to a journal.
pub struct JournalWriter {
    file: File,
    path: PathBuf,
}

impl JournalWriter {
    /// Opens (creating) the journal at `path` for appending, first cutting off a torn last
    /// record left by a killed worker; returns the writer and the records already there.
    pub fn open(path: &Path) -> Result<(JournalWriter, Vec<Entry>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, e))?;
        let (entries, used) = parse(&bytes);
        if used != bytes.len() {
            file.set_len(used as u64).map_err(|e| Error::io(path, e))?;
        }
        file.seek(SeekFrom::Start(used as u64))
            .map_err(|e| Error::io(path, e))?;
        Ok((
            JournalWriter {
                file,
                path: path.to_path_buf(),
            },
            entries,
        ))
    }

    /// Appends one record (one `write` call, so a reader sees it whole or torn, never
    /// interleaved).
    pub fn append(&mut self, entry: &Entry) -> Result<()> {
        let line = encode_line(entry)?;
        self.file
            .write_all(&line)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Appends one record and fsyncs the journal (checkpoints, the end).
    pub fn append_synced(&mut self, entry: &Entry) -> Result<()> {
        self.append(entry)?;
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(step: u64, value: f64) -> Entry {
        Entry::Metric {
            name: "loss/total".into(),
            step,
            value: value.to_string(),
        }
    }

    /// A journal whose last record was torn by a kill reads up to its last whole record; the
    /// next writer cuts the torn bytes off and appends after the whole ones.
    #[test]
    fn a_torn_last_record_is_ignored_and_cut_off_by_the_next_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut w, old) = JournalWriter::open(&path).unwrap();
        assert!(old.is_empty());
        w.append(&metric(1, 0.5)).unwrap();
        w.append(&metric(2, f64::NAN)).unwrap();
        drop(w);
        let whole = std::fs::metadata(&path).unwrap().len();
        // A kill in the middle of the third record.
        let third = encode_line(&metric(3, 0.25)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&third[..third.len() / 2]).unwrap();
        drop(f);
        let (entries, end) = read_from(&path, 0).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(end, whole);
        let Entry::Metric { value, .. } = &entries[1] else {
            panic!("{entries:?}")
        };
        assert!(value.parse::<f64>().unwrap().is_nan());
        // A record with a whole line but a wrong checksum stops the reader as well.
        let mut bad = encode_line(&metric(3, 0.25)).unwrap();
        let n = bad.len();
        bad[n - 3] ^= 1;
        assert_eq!(parse(&bad).0.len(), 0);
        // The next writer keeps the two whole records, drops the torn bytes, appends.
        let (mut w, old) = JournalWriter::open(&path).unwrap();
        assert_eq!(old.len(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        w.append(&metric(3, 0.25)).unwrap();
        let (entries, _) = read_from(&path, 0).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2], metric(3, 0.25));
        // A follower that read the first two goes on from its offset.
        let (more, _) = read_from(&path, end).unwrap();
        assert_eq!(more, vec![metric(3, 0.25)]);
    }
}
