//! The library's error type: every failure a user can cause names the file or flag and what is wrong.

use std::path::PathBuf;

/// Errors returned by the mifo library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file (or folder) exists but its contents are unusable, or it is missing.
    #[error("{}: {msg}", path.display())]
    File {
        /// The offending file or folder.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// An I/O error while touching `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A configuration value (flag, `--set` key, config.json key) that is not supported.
    #[error("{0}")]
    Config(String),
    /// Invalid user input that is not tied to one file (a prompt, a box, a flag combination).
    #[error("{0}")]
    Input(String),
    /// A finished run already has exactly this spec (pass `--rerun` to run it again).
    #[error("this exact run already finished as {run} (same spec); pass --rerun to run it again")]
    AlreadyRan {
        /// The earlier run's id.
        run: String,
    },
    /// An error from the run store.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A tensor operation failed (shape mismatch and the like): a bug or an unsupported model.
    #[error("tensor error: {}", first_line(.0))]
    Tensor(#[from] candle_core::Error),
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds an [`Error::File`] from a path and a message.
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// Builds an [`Error::Io`] from a path and an io error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// candle appends a backtrace to its messages when RUST_BACKTRACE is set; keep the message.
pub(crate) fn first_line(e: &candle_core::Error) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or("").trim().to_string()
}
