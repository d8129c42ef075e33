//! The store's error type: every variant names the run, blob, record or path it is about.

use std::path::PathBuf;

/// Errors from the run store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // === Opening ===
    /// There is no run store at this path (no `db/` folder).
    #[error("no run store at {} (set --store DIR or MIFO_STORE)", path.display())]
    NotAStore {
        /// The folder that was expected to hold a store.
        path: PathBuf,
    },
    /// Another process (the engine, or another `mifo`) has the store open.
    #[error("run store {} is in use by another process (is the engine running?)", path.display())]
    Locked {
        /// The store folder.
        path: PathBuf,
    },
    /// The store was written by a newer (or unknown) schema version.
    #[error("run store {} has schema version {found}; this mifo reads version {supported}", path.display())]
    SchemaVersion {
        /// The store folder.
        path: PathBuf,
        /// The version recorded in the store.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },

    // === Lookup ===
    /// A run id or prefix that contains characters run ids never contain.
    #[error("'{0}' is not a run id (run ids use the characters 0-9 and a-z without i, l, o, u)")]
    InvalidRunId(String),
    /// No run id starts with this prefix.
    #[error("no run matches '{0}'")]
    UnknownRun(String),
    /// Several run ids start with this prefix.
    #[error("run prefix '{prefix}' is ambiguous: it matches {}{}", matches.join(", "), if *total > matches.len() { format!(" and {} more", total - matches.len()) } else { String::new() })]
    AmbiguousRun {
        /// The prefix the user gave.
        prefix: String,
        /// The first few matching run ids.
        matches: Vec<String>,
        /// How many run ids match in all.
        total: usize,
    },
    /// A blob that a record refers to is not in the blob folder.
    #[error("blob {hash} is missing from the store")]
    MissingBlob {
        /// The blob's blake3 hash (hex).
        hash: String,
    },
    /// A spec that a run refers to is not in the `specs` tree.
    #[error("spec {hash} is missing from the store")]
    MissingSpec {
        /// The spec hash (hex).
        hash: String,
    },

    // === Corruption ===
    /// A record (run, spec, metric chunk, log line, cache entry) could not be decoded.
    #[error("{what} is corrupt: {detail}")]
    Corrupt {
        /// What was being decoded, e.g. `run 0j5…`, `spec 3f2a…`, `metric chunk …`.
        what: String,
        /// Why it could not be decoded.
        detail: String,
    },
    /// A blob file whose content does not hash to its name, or that cannot be read.
    #[error("blob {hash} is corrupt ({}): {detail}", path.display())]
    CorruptBlob {
        /// The blob's name (its expected blake3 hash).
        hash: String,
        /// Where the blob file lives.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },

    // === Use ===
    /// An operation that the run's current state does not allow.
    #[error("run {run}: {msg}")]
    InvalidState {
        /// The run.
        run: String,
        /// What is not allowed and why.
        msg: String,
    },
    /// An argument that the store cannot accept (bad series name, tag, output name…).
    #[error("{0}")]
    InvalidInput(String),

    // === Underlying ===
    /// An I/O error on a file or folder of the store.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An error from sled, the metadata database.
    #[error("metadata database: {context}: {source}")]
    Db {
        /// What the store was doing.
        context: String,
        /// The underlying error.
        source: sled::Error,
    },
}

/// Result with [`StoreError`].
pub type StoreResult<T> = std::result::Result<T, StoreError>;

impl StoreError {
    /// Builds a [`StoreError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds a [`StoreError::Corrupt`].
    pub fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }

    /// Builds a [`StoreError::InvalidState`].
    pub fn state(run: impl std::fmt::Display, msg: impl Into<String>) -> Self {
        StoreError::InvalidState {
            run: run.to_string(),
            msg: msg.into(),
        }
    }
}

/// Adds "what was the store doing" context to sled results.
pub(crate) trait DbContext<T> {
    /// Maps a sled error to [`StoreError::Db`] with `context`.
    fn db(self, context: impl FnOnce() -> String) -> StoreResult<T>;
}

impl<T> DbContext<T> for std::result::Result<T, sled::Error> {
    fn db(self, context: impl FnOnce() -> String) -> StoreResult<T> {
        self.map_err(|source| StoreError::Db {
            context: context(),
            source,
        })
    }
}
