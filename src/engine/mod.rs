//! The engine: one background process per store owns the sled database and the device and runs
//! the jobs; every front end (CLI, TUI) is a client over a unix socket in the store folder.
//! sled allows one process per database, and an SSH session can drop at any time: with the
//! engine, a lost terminal never stops a run and a second terminal can watch it.

pub mod client;
pub mod protocol;
pub mod server;

use std::path::{Path, PathBuf};

pub use client::{Client, StoredRun};
pub use protocol::{EngineStatus, Event, EventKind, Request, Response, RunSummary};
pub use server::{serve, EngineOptions};

/// The engine's socket: `<store>/engine.sock`.
pub fn socket_path(store_dir: &Path) -> PathBuf {
    store_dir.join("engine.sock")
}
