//! How the learning and synthesis loops report: metric points, log lines, progress, output
//! artifacts and checkpoints go to a [`RunSink`]. The engine implements it over the run store;
//! tests use [`MemorySink`].

use std::collections::BTreeMap;

use crate::error::Result;

/// Progress of a running job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    /// Steps done (0-based index of the step just finished + 1).
    pub step: u64,
    /// Total steps of the run.
    pub total: u64,
    /// Phase name (`reward`, `penalty`, `dreambooth`, `denoise`, …).
    pub phase: String,
    /// A short human summary of the latest losses.
    pub message: String,
}

/// Receives everything a run produces.
pub trait RunSink {
    /// One metric point.
    fn metric(&mut self, name: &str, step: u64, value: f64) -> Result<()>;
    /// One log line.
    fn log(&mut self, line: &str) -> Result<()>;
    /// Progress after a step.
    fn progress(&mut self, _progress: &Progress) {}
    /// A named output (PNG, safetensors…). Names are stable (`embeddings`, `preview.png`, …).
    fn artifact(&mut self, name: &str, bytes: Vec<u8>) -> Result<()>;
    /// A checkpoint to resume from (replaces the previous one).
    fn checkpoint(&mut self, _step: u64, _bytes: Vec<u8>) -> Result<()> {
        Ok(())
    }
    /// Whether the run should stop at the next step boundary (cancellation).
    fn should_stop(&self) -> bool {
        false
    }
}

/// A sink that keeps everything in memory (tests, `--dry-run`).
#[derive(Debug, Default)]
pub struct MemorySink {
    /// name → points.
    pub metrics: BTreeMap<String, Vec<(u64, f64)>>,
    /// Log lines.
    pub logs: Vec<String>,
    /// name → bytes.
    pub artifacts: BTreeMap<String, Vec<u8>>,
    /// The latest checkpoint (step, bytes).
    pub checkpoint: Option<(u64, Vec<u8>)>,
    /// Stop after this many progress reports (tests of cancellation / resume).
    pub stop_after: Option<u64>,
    /// Progress reports received.
    pub steps_seen: u64,
}

impl RunSink for MemorySink {
    fn metric(&mut self, name: &str, step: u64, value: f64) -> Result<()> {
        self.metrics
            .entry(name.to_string())
            .or_default()
            .push((step, value));
        Ok(())
    }

    fn log(&mut self, line: &str) -> Result<()> {
        self.logs.push(line.to_string());
        Ok(())
    }

    fn progress(&mut self, _progress: &Progress) {
        self.steps_seen += 1;
    }

    fn artifact(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.artifacts.insert(name.to_string(), bytes);
        Ok(())
    }

    fn checkpoint(&mut self, step: u64, bytes: Vec<u8>) -> Result<()> {
        self.checkpoint = Some((step, bytes));
        Ok(())
    }

    fn should_stop(&self) -> bool {
        self.stop_after.is_some_and(|n| self.steps_seen >= n)
    }
}
