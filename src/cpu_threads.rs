//! How many threads candle's CPU kernels use, decided once per process.
//!
//! candle (0.11) asks `candle_core::utils::get_num_threads()` for the thread count of every CPU
//! matrix product. Unless `RAYON_NUM_THREADS` is set, that call counts the physical cores again,
//! which on a machine without `cpu_capacity` in sysfs (most x86 servers and VMs) opens and reads
//! the whole of `/proc/cpuinfo` — about 350 times per forward of the tiny UNet, and on a
//! many-core GPU server a file of hundreds of kilobytes each time. [`settle`] counts once and
//! sets the variable to that count, so every later call only reads it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The variable candle and rayon read for their thread counts.
pub const RAYON_NUM_THREADS: &str = "RAYON_NUM_THREADS";

/// Set beside [`RAYON_NUM_THREADS`] when mifo wrote it, to the same count, so that a child
/// process (the engine, started by another `mifo`) knows the count was counted, not chosen.
pub const COUNTED_THREADS: &str = "MIFO_COUNTED_THREADS";

static COUNTED_BY_MIFO: AtomicBool = AtomicBool::new(false);

/// A usable thread count in `RAYON_NUM_THREADS`, if one is set (by the user or a parent mifo).
fn from_env() -> Option<usize> {
    std::env::var(RAYON_NUM_THREADS)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// Decides the CPU thread count for the rest of the process: a `RAYON_NUM_THREADS` the user set
/// is kept; otherwise candle's own default (the physical cores) is counted once and written to
/// `RAYON_NUM_THREADS`. rayon's global pool is built first, so it keeps its own default (the
/// logical CPUs) as before. Call it at the start of `main`, before any other thread exists.
pub fn settle() {
    if let Some(n) = from_env() {
        // Inherited from a mifo process on this machine (the engine's parent) or the user's.
        let counted = std::env::var(COUNTED_THREADS).ok() == Some(n.to_string());
        COUNTED_BY_MIFO.store(counted, Ordering::Relaxed);
        return;
    }
    let count = candle_core::utils::get_num_threads().to_string();
    // Ignored when the pool exists already: then it was sized before this call anyway.
    let _ = rayon::ThreadPoolBuilder::new().build_global();
    std::env::set_var(RAYON_NUM_THREADS, &count);
    std::env::set_var(COUNTED_THREADS, &count);
    COUNTED_BY_MIFO.store(true, Ordering::Relaxed);
}

/// Whether `RAYON_NUM_THREADS` holds a count mifo made on this machine (by [`settle`] here or
/// in a parent `mifo`) rather than one the user set: a process started on another machine (a
/// Slurm job) must not inherit it.
pub fn counted_by_mifo() -> bool {
    COUNTED_BY_MIFO.load(Ordering::Relaxed)
}

/// candle's CPU thread count, read once (what our own kernels hand to `gemm`).
pub fn count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(candle_core::utils::get_num_threads)
}
