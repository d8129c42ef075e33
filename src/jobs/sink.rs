//! A [`RunSink`] that records into the run store, with an optional progress bar on stderr.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};
use crate::sink::{Progress, RunSink};
use crate::store::{RunId, Store};

/// Name of the output that holds the latest checkpoint.
pub const CHECKPOINT_OUTPUT: &str = "checkpoint";

/// Something that happened in a run, as seen by observers (the engine's event stream).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SinkEvent {
    /// A metric point.
    Metric {
        /// Series name.
        name: String,
        /// Step.
        step: u64,
        /// Value.
        value: f64,
    },
    /// A log line.
    Log(String),
    /// Progress after a step.
    Progress {
        /// Steps done.
        step: u64,
        /// Total steps.
        total: u64,
        /// Phase name.
        phase: String,
        /// Latest losses in words.
        message: String,
    },
    /// An output was recorded.
    Output(String),
}

/// Receives the events of one run.
pub type Observer = Arc<dyn Fn(&RunId, SinkEvent) + Send + Sync>;

/// Records metrics, logs, outputs and checkpoints of one run into the store.
pub struct StoreSink {
    store: Store,
    run: RunId,
    bar: Option<ProgressBar>,
    stop: Vec<Arc<AtomicBool>>,
    observer: Option<Observer>,
    log_progress: bool,
}

impl StoreSink {
    /// A sink for `run`; `progress_bar` draws on stderr (use it when stderr is a terminal).
    /// The run stops at the next step when any flag in `stop` is set.
    pub fn new(store: Store, run: RunId, progress_bar: bool, stop: Vec<Arc<AtomicBool>>) -> Self {
        let bar = progress_bar.then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix:>10} [{bar:30}] {pos}/{len} {msg} (ETA {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self {
            store,
            run,
            bar,
            stop,
            observer: None,
            log_progress: false,
        }
    }

    /// Without a progress bar, also print a progress line to stderr every 50 steps (the engine
    /// does, into its log; an in-process UI must not).
    pub fn with_progress_lines(mut self, on: bool) -> Self {
        self.log_progress = on;
        self
    }

    /// Also reports every event to `observer`.
    pub fn with_observer(mut self, observer: Option<Observer>) -> Self {
        self.observer = observer;
        self
    }

    fn emit(&self, event: SinkEvent) {
        if let Some(o) = &self.observer {
            o(&self.run, event);
        }
    }

    /// Ends the progress bar (leaves the last line on screen).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

impl RunSink for StoreSink {
    fn metric(&mut self, name: &str, step: u64, value: f64) -> Result<()> {
        self.store.append_metric(&self.run, name, step, value)?;
        self.emit(SinkEvent::Metric {
            name: name.to_string(),
            step,
            value,
        });
        Ok(())
    }

    fn log(&mut self, line: &str) -> Result<()> {
        if let Some(b) = &self.bar {
            b.println(line);
        }
        self.store.append_log(&self.run, line)?;
        self.emit(SinkEvent::Log(line.to_string()));
        Ok(())
    }

    fn progress(&mut self, p: &Progress) {
        self.emit(SinkEvent::Progress {
            step: p.step,
            total: p.total,
            phase: p.phase.clone(),
            message: p.message.clone(),
        });
        if let Some(b) = &self.bar {
            b.set_length(p.total);
            b.set_position(p.step);
            b.set_prefix(p.phase.clone());
            b.set_message(p.message.clone());
        } else if self.log_progress && (p.step == p.total || p.step.is_multiple_of(50)) {
            eprintln!("step {}/{} {} {}", p.step, p.total, p.phase, p.message);
        }
    }

    fn artifact(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.store.put_output(&self.run, name, &bytes)?;
        self.emit(SinkEvent::Output(name.to_string()));
        Ok(())
    }

    fn checkpoint(&mut self, _step: u64, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put_output(&self.run, CHECKPOINT_OUTPUT, &bytes)?;
        // To disk now, record and metrics with it: a crash right after a checkpoint must resume
        // from it (sled would otherwise write its buffers within the next half second).
        self.store.flush().map_err(Error::from)
    }

    fn should_stop(&self) -> bool {
        self.stop.iter().any(|f| f.load(Ordering::Relaxed))
    }
}
