//! An engine in the test process: `serve` on a store folder in a thread, over its real unix
//! socket, for tests of its clients (the protocol, the workbench's `EngineBackend`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use mifo::engine::{serve, Client, EngineOptions};
use mifo::jobs::pool::PoolOptions;

/// Starts an engine with `jobs` workers on `store` (created if needed) in a thread and returns
/// once it answers. It exits after 30 s with no job and no client.
pub fn serve_in_thread(store: &Path, jobs: usize) {
    serve_pool_in_thread(
        store,
        PoolOptions {
            cpu_jobs: jobs,
            ..PoolOptions::default()
        },
    )
}

/// Starts an engine with the device pool `pool` on `store` (created if needed) in a thread and
/// returns once it answers. It exits after 30 s with no job and no client.
pub fn serve_pool_in_thread(store: &Path, pool: PoolOptions) {
    let dir = store.to_path_buf();
    std::thread::spawn(move || {
        serve(
            &dir,
            EngineOptions {
                idle_exit: Some(Duration::from_secs(30)),
                pool,
                slurm: None,
            },
        )
        .unwrap()
    });
    for _ in 0..500 {
        if Client::try_connect(store).ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("engine did not come up on {}", store.display());
}

/// Starts an engine with `jobs` workers on a fresh store in the temp dir named after the test
/// and the process; returns the store folder.
pub fn start_engine_with(name: &str, jobs: usize) -> PathBuf {
    let store = std::env::temp_dir().join(format!("mifo-engine-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    serve_in_thread(&store, jobs);
    store
}

/// Starts an engine on a fresh `store` in a thread that exits after `idle` with no job and no
/// client, without waiting for it to answer; the receiver gets whether `serve` returned `Ok`
/// once it has exited.
pub fn serve_with_idle_exit(store: &Path, idle: Duration) -> Receiver<bool> {
    let _ = std::fs::remove_dir_all(store);
    let dir = store.to_path_buf();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = serve(
            &dir,
            EngineOptions {
                idle_exit: Some(idle),
                pool: PoolOptions::default(),
                slurm: None,
            },
        );
        let _ = done_tx.send(r.is_ok());
    });
    done_rx
}
