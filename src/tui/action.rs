//! Messages into the app ([`Action`]) and work out of it ([`Effect`], [`Request`]).

use ratatui::crossterm::event::KeyEvent;
use ratatui_image::protocol::StatefulProtocol;

use crate::jobs::sweep::SweepTable;
use crate::store::{BlobHash, RunId};

use super::backend::{
    JobId, JobRow, LearnLaunch, Metrics, RerunRequest, RunDetail, RunRow, SynthLaunch,
};
use super::images::{ImageKey, PreparedImage};

/// Everything that can happen to the app: input, time, and answers from the workers.
pub enum Action {
    /// A key press.
    Key(KeyEvent),
    /// Time passes (the clock drives polling and message expiry).
    Tick {
        /// Now, in ms since the Unix epoch.
        now_ms: u64,
    },
    /// The runs list arrived.
    RunsLoaded {
        /// The rows, or why not.
        result: Result<Vec<RunRow>, String>,
        /// How long the backend took, in ms.
        elapsed_ms: f64,
    },
    /// A run's detail arrived.
    DetailLoaded {
        /// The run asked for.
        id: RunId,
        /// The detail, or why not.
        result: Result<Box<RunDetail>, String>,
    },
    /// A run's metrics arrived.
    MetricsLoaded {
        /// The run asked for.
        id: RunId,
        /// The series, or why not.
        result: Result<Metrics, String>,
    },
    /// The jobs list arrived.
    JobsLoaded(Result<Vec<JobRow>, String>),
    /// An image was decoded (and tinted) and is ready to be sized.
    ImageReady {
        /// Which slot.
        key: ImageKey,
        /// The image, or why not.
        result: Result<PreparedImage, String>,
    },
    /// An image was resized and encoded for its area.
    ImageResized {
        /// Which slot.
        key: ImageKey,
        /// The encoded protocol (an error is kept inside and shown as text).
        protocol: StatefulProtocol,
        /// Why encoding failed, if it did.
        error: Option<String>,
    },
    /// A sweep's table arrived.
    SweepLoaded {
        /// The sweep asked for.
        name: String,
        /// The table, or why not.
        result: Result<SweepTable, String>,
    },
    /// A job was queued (launch, re-run, resume).
    Launched {
        /// What was asked for (`launch`, `re-run 0j5…`).
        what: String,
        /// The job, or why not.
        result: Result<JobId, String>,
    },
    /// A change finished (tag, delete, cancel).
    Done {
        /// What was asked for.
        what: String,
        /// A message, or why not.
        result: Result<String, String>,
    },
}

/// Work the app asks the runtime to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// A backend call (runs on the worker thread; the answer comes back as an [`Action`]).
    Backend(Request),
    /// Leave the UI (jobs of an in-process backend are stopped by the runtime).
    Quit,
}

/// A backend call.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// [`super::Backend::list_runs`].
    ListRuns,
    /// [`super::Backend::run_detail`].
    Detail {
        /// The run.
        id: RunId,
        /// Log lines wanted.
        log_tail: usize,
    },
    /// [`super::Backend::metrics`].
    Metrics {
        /// The run.
        id: RunId,
    },
    /// [`super::Backend::jobs`].
    Jobs,
    /// Fetch blobs and decode an image (masks tinted on top).
    Image {
        /// Which slot it fills.
        key: ImageKey,
        /// The image blob.
        image: BlobHash,
        /// Mask blobs, tinted and labelled `<v0>`, `<v1>`… in order.
        masks: Vec<BlobHash>,
    },
    /// [`super::Backend::sweep_table`].
    Sweep {
        /// The sweep (a tag).
        name: String,
        /// `METRIC[:min|:max]`, in sort order.
        by: Vec<String>,
    },
    /// [`super::Backend::launch_learn`].
    LaunchLearn(Box<LearnLaunch>),
    /// [`super::Backend::launch_synth`].
    LaunchSynth(Box<SynthLaunch>),
    /// [`super::Backend::rerun`].
    Rerun {
        /// The run to repeat.
        id: RunId,
        /// Changes.
        request: RerunRequest,
    },
    /// [`super::Backend::resume`].
    Resume(RunId),
    /// [`super::Backend::cancel`].
    Cancel(RunId),
    /// [`super::Backend::cancel_job`].
    CancelJob(JobId),
    /// [`super::Backend::delete`], for each run.
    Delete(Vec<RunId>),
    /// [`super::Backend::tag`] (or `untag` with `remove`), for each run.
    Tag {
        /// The runs.
        ids: Vec<RunId>,
        /// The tag.
        tag: String,
        /// Remove instead of add.
        remove: bool,
    },
}
