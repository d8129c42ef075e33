//! The app model and its pure update: `update(&mut App, Action) -> Vec<Effect>` (TEA). Nothing
//! here does I/O; effects go to the runtime (threads) or to the test driver (inline).

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind};

use crate::store::{RunId, RunKind, RunStatus};

use super::action::{Action, Effect, Request};
use super::backend::{BackendInfo, JobId, RerunRequest, RunRow};
use super::images::ImageCache;
use super::keymap::{self, Cmd, Ctx};
use super::views::compare::CompareState;
use super::views::detail::DetailState;
use super::views::jobs::JobsState;
use super::views::launch::LaunchForm;
use super::views::runs::RunsState;
use super::views::sweep::SweepState;
use super::views::synth::SynthForm;
use super::widgets::input::TextInput;

/// Poll the runs list this often while something is live (ms); 5× slower when idle.
pub const RUNS_POLL_MS: u64 = 1000;
/// Poll the open run this often while it is live (ms).
pub const OPEN_POLL_MS: u64 = 500;
/// Poll the jobs this often while any is active or the jobs view is shown (ms).
pub const JOBS_POLL_MS: u64 = 1000;
/// Log lines fetched for the detail view.
pub const LOG_TAIL: usize = 200;
/// How long a status message stays (ms).
pub const STATUS_TTL_MS: u64 = 8000;
/// Most runs the compare view takes.
pub const MAX_COMPARE: usize = 8;

/// The views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// The runs table.
    Runs,
    /// One run.
    Detail,
    /// 2–8 runs side by side.
    Compare,
    /// A sweep's runs: varied keys against final metrics, best first.
    Sweep,
    /// The launch form.
    Launch,
    /// Queued and running jobs.
    Jobs,
    /// The synthesis form.
    Synth,
}

impl View {
    /// Its keymap context.
    pub fn ctx(self) -> Ctx {
        match self {
            View::Runs => Ctx::Runs,
            View::Detail => Ctx::Detail,
            View::Compare => Ctx::Compare,
            View::Sweep => Ctx::Sweep,
            View::Launch => Ctx::Launch,
            View::Jobs => Ctx::Jobs,
            View::Synth => Ctx::Synth,
        }
    }
}

/// A destructive or long action waiting for `y`.
#[derive(Clone, Debug, PartialEq)]
pub enum Confirm {
    /// Delete these runs.
    Delete(Vec<RunId>),
    /// Cancel this running run.
    Cancel(RunId),
    /// Cancel this job.
    CancelJob(JobId),
    /// Re-run this run unchanged.
    Rerun(RunId),
    /// Resume this interrupted run.
    Resume(RunId),
    /// Quit although in-process jobs would stop.
    Quit,
}

/// A popup over the view.
#[derive(Clone, Debug, PartialEq)]
pub enum Popup {
    /// A yes/no question.
    Confirm {
        /// Title.
        title: String,
        /// Body lines.
        lines: Vec<String>,
        /// What `y` does.
        action: Confirm,
    },
    /// The tag prompt.
    Tag {
        /// Runs to tag.
        ids: Vec<RunId>,
        /// The text typed so far (`-tag` removes).
        input: TextInput,
    },
    /// The keymap help.
    Help {
        /// First line shown.
        scroll: u16,
    },
}

/// A message in the status line.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    /// Text.
    pub text: String,
    /// Shown as an error.
    pub error: bool,
    /// When it was set (ms).
    pub at_ms: u64,
}

/// Requests in flight and when each poll last went out.
#[derive(Clone, Debug, Default)]
pub struct Polls {
    /// A `ListRuns` is in flight.
    pub runs_in_flight: bool,
    /// When the last `ListRuns` went out.
    pub runs_at: u64,
    /// A `Jobs` is in flight.
    pub jobs_in_flight: bool,
    /// When the last `Jobs` went out.
    pub jobs_at: u64,
    /// Details in flight.
    pub details_in_flight: Vec<RunId>,
    /// Metrics in flight.
    pub metrics_in_flight: Vec<RunId>,
}

/// The whole UI state.
pub struct App {
    /// The view shown.
    pub view: View,
    /// Where `Esc` goes back to.
    pub back: Vec<View>,
    /// About the backend.
    pub info: BackendInfo,
    /// Now (ms since the Unix epoch), from the last tick.
    pub now_ms: u64,
    /// The runs table.
    pub runs: RunsState,
    /// The open run.
    pub detail: Option<DetailState>,
    /// The compare view.
    pub compare: Option<CompareState>,
    /// The sweep table.
    pub sweep: Option<SweepState>,
    /// The launch form.
    pub launch: Option<LaunchForm>,
    /// The synthesis form.
    pub synth: Option<SynthForm>,
    /// The jobs view.
    pub jobs: JobsState,
    /// A popup, if any.
    pub popup: Option<Popup>,
    /// The status line.
    pub status: Option<Status>,
    /// Images.
    pub images: ImageCache,
    /// Polling bookkeeping.
    pub polls: Polls,
    /// Set when the app should end.
    pub quit: bool,
}

impl App {
    /// A new app at `now_ms` showing the runs table.
    pub fn new(info: BackendInfo, images: ImageCache, now_ms: u64) -> App {
        App {
            view: View::Runs,
            back: Vec::new(),
            info,
            now_ms,
            runs: RunsState::default(),
            detail: None,
            compare: None,
            sweep: None,
            launch: None,
            synth: None,
            jobs: JobsState::default(),
            popup: None,
            status: None,
            images,
            polls: Polls::default(),
            quit: false,
        }
    }

    /// The first requests: the runs list and the jobs.
    pub fn init(&mut self) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.request_runs(&mut fx);
        self.request_jobs(&mut fx);
        fx
    }

    /// Shows `text` in the status line.
    pub fn say(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            error: false,
            at_ms: self.now_ms,
        });
    }

    /// Shows `text` as an error in the status line.
    pub fn error(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            error: true,
            at_ms: self.now_ms,
        });
    }

    /// Switches to `view`, remembering where `Esc` goes back to.
    pub fn go(&mut self, view: View) {
        if self.view != view {
            self.back.retain(|v| *v != view);
            self.back.push(self.view);
            self.view = view;
        }
    }

    /// Goes back one view (the runs table when there is nothing to go back to).
    pub fn go_back(&mut self) {
        let to = self.back.pop().unwrap_or(View::Runs);
        match self.view {
            View::Launch => self.launch = None,
            View::Synth => self.synth = None,
            _ => {}
        }
        self.view = to;
    }

    /// Queues a runs-list request unless one is in flight.
    pub fn request_runs(&mut self, fx: &mut Vec<Effect>) {
        if !self.polls.runs_in_flight {
            self.polls.runs_in_flight = true;
            self.polls.runs_at = self.now_ms;
            fx.push(Effect::Backend(Request::ListRuns));
        }
    }

    /// Queues a jobs request unless one is in flight.
    pub fn request_jobs(&mut self, fx: &mut Vec<Effect>) {
        if !self.polls.jobs_in_flight {
            self.polls.jobs_in_flight = true;
            self.polls.jobs_at = self.now_ms;
            fx.push(Effect::Backend(Request::Jobs));
        }
    }

    /// Queues detail and metrics requests for `id` unless they are in flight.
    pub fn request_run(&mut self, id: &RunId, metrics: bool, fx: &mut Vec<Effect>) {
        if !self.polls.details_in_flight.contains(id) {
            self.polls.details_in_flight.push(id.clone());
            fx.push(Effect::Backend(Request::Detail {
                id: id.clone(),
                log_tail: LOG_TAIL,
            }));
        }
        if metrics && !self.polls.metrics_in_flight.contains(id) {
            self.polls.metrics_in_flight.push(id.clone());
            fx.push(Effect::Backend(Request::Metrics { id: id.clone() }));
        }
    }

    /// The row of run `id`, if listed.
    pub fn row(&self, id: &RunId) -> Option<&RunRow> {
        self.runs.row(id)
    }

    /// Whether any job is queued, starting or running.
    pub fn jobs_active(&self) -> usize {
        self.jobs
            .rows
            .iter()
            .filter(|j| j.state.is_active())
            .count()
    }
}

/// The first 12 characters of a run id (unique in practice: 10 time + 2 random characters).
pub fn short_id(id: &RunId) -> &str {
    let s = id.as_str();
    &s[..s.len().min(12)]
}

/// Applies `action` to `app`; returns the work to do.
pub fn update(app: &mut App, action: Action) -> Vec<Effect> {
    let mut fx = Vec::new();
    match action {
        Action::Key(key) => {
            if key.kind != KeyEventKind::Release {
                on_key(app, key, &mut fx);
            }
        }
        Action::Tick { now_ms } => on_tick(app, now_ms, &mut fx),
        Action::RunsLoaded { result, elapsed_ms } => {
            app.polls.runs_in_flight = false;
            match result {
                Ok(rows) => {
                    let changed = super::views::runs::set_rows(app, rows, elapsed_ms);
                    // A run whose status changed is refetched in the views that show it.
                    for id in changed {
                        if app.detail.as_ref().is_some_and(|d| d.id == id) {
                            app.request_run(&id, true, &mut fx);
                        }
                        if app.compare.as_ref().is_some_and(|c| c.ids.contains(&id)) {
                            app.request_run(&id, true, &mut fx);
                        }
                        super::views::sweep::on_run_changed(app, &id, &mut fx);
                    }
                }
                Err(e) => {
                    app.runs.error = Some(e.clone());
                    app.error(format!("listing runs: {e}"));
                }
            }
        }
        Action::DetailLoaded { id, result } => {
            app.polls.details_in_flight.retain(|x| *x != id);
            super::views::detail::on_detail(app, &id, &result, &mut fx);
            super::views::compare::on_detail(app, &id, &result, &mut fx);
            super::views::launch::on_detail(app, &id, &result);
            super::views::synth::on_detail(app, &id, &result, &mut fx);
        }
        Action::MetricsLoaded { id, result } => {
            app.polls.metrics_in_flight.retain(|x| *x != id);
            super::views::detail::on_metrics(app, &id, &result);
            super::views::compare::on_metrics(app, &id, &result);
        }
        Action::JobsLoaded(result) => {
            app.polls.jobs_in_flight = false;
            match result {
                Ok(rows) => super::views::jobs::set_rows(app, rows, &mut fx),
                Err(e) => app.error(format!("listing jobs: {e}")),
            }
        }
        Action::SweepLoaded { name, result } => {
            super::views::sweep::on_loaded(app, &name, result, &mut fx)
        }
        Action::ImageReady { key, result } => app.images.ready(key, result),
        Action::ImageResized {
            key,
            protocol,
            error,
        } => app.images.resized(&key, protocol, error),
        Action::Launched { what, result } => {
            match result {
                Ok(job) => app.say(format!("{what}: queued as job {job}")),
                Err(e) => app.error(format!("{what}: {e}")),
            }
            app.request_jobs(&mut fx);
            app.request_runs(&mut fx);
        }
        Action::Done { what, result } => {
            match result {
                Ok(msg) => app.say(msg),
                Err(e) => app.error(format!("{what}: {e}")),
            }
            app.request_runs(&mut fx);
            app.request_jobs(&mut fx);
        }
    }
    fx
}

fn on_tick(app: &mut App, now_ms: u64, fx: &mut Vec<Effect>) {
    app.now_ms = now_ms;
    if app
        .status
        .as_ref()
        .is_some_and(|s| now_ms.saturating_sub(s.at_ms) > STATUS_TTL_MS)
    {
        app.status = None;
    }
    let live = app.runs.live_count() > 0 || app.jobs_active() > 0;
    let runs_every = if live { RUNS_POLL_MS } else { 5 * RUNS_POLL_MS };
    if now_ms.saturating_sub(app.polls.runs_at) >= runs_every {
        app.request_runs(fx);
    }
    let jobs_every = if app.jobs_active() > 0 || app.view == View::Jobs {
        JOBS_POLL_MS
    } else {
        5 * JOBS_POLL_MS
    };
    if now_ms.saturating_sub(app.polls.jobs_at) >= jobs_every {
        app.request_jobs(fx);
    }
    super::views::detail::on_tick(app, fx);
    super::views::compare::on_tick(app, fx);
    super::views::sweep::on_tick(app, fx);
}

fn on_key(app: &mut App, key: KeyEvent, fx: &mut Vec<Effect>) {
    if app.popup.is_some() {
        on_popup_key(app, key, fx);
        return;
    }
    if app.view == View::Runs && app.runs.filter_editing {
        super::views::runs::on_filter_key(app, key);
        return;
    }
    let cmd = keymap::lookup(app.view.ctx(), &key);
    if app.view == View::Launch {
        super::views::launch::on_key(app, key, cmd, fx);
        return;
    }
    if app.view == View::Synth {
        super::views::synth::on_key(app, key, cmd, fx);
        return;
    }
    let Some(cmd) = cmd else {
        return;
    };
    match cmd {
        Cmd::Quit => {
            let active = app.jobs_active();
            if active > 0 && !app.info.jobs_survive_quit {
                app.popup = Some(Popup::Confirm {
                    title: "Quit?".into(),
                    lines: vec![
                        format!(
                            "{active} job{} in this process will stop at the next step",
                            if active == 1 { "" } else { "s" }
                        ),
                        "(cancelled with a checkpoint; resume with R or mifo learn --resume)."
                            .into(),
                        "Quit? y/n".into(),
                    ],
                    action: Confirm::Quit,
                });
            } else {
                quit(app, fx);
            }
        }
        Cmd::ForceQuit => quit(app, fx),
        Cmd::Help => app.popup = Some(Popup::Help { scroll: 0 }),
        Cmd::Back => {
            if app.view != View::Runs {
                app.go_back();
            } else if !app.runs.filter.is_empty() {
                super::views::runs::clear_filter(app);
            }
        }
        Cmd::ShowRuns => {
            app.back.clear();
            app.view = View::Runs;
        }
        Cmd::ShowJobs => {
            app.go(View::Jobs);
            app.request_jobs(fx);
        }
        Cmd::NewLearn => super::views::launch::open_new(app),
        Cmd::Sweep => super::views::sweep::open_for_view(app, fx),
        _ => match app.view {
            View::Runs => super::views::runs::on_cmd(app, cmd, fx),
            View::Detail => super::views::detail::on_cmd(app, cmd, fx),
            View::Compare => super::views::compare::on_cmd(app, cmd, fx),
            View::Sweep => super::views::sweep::on_cmd(app, cmd, fx),
            View::Jobs => super::views::jobs::on_cmd(app, cmd, fx),
            View::Launch | View::Synth => {}
        },
    }
}

fn quit(app: &mut App, fx: &mut Vec<Effect>) {
    app.quit = true;
    fx.push(Effect::Quit);
}

fn on_popup_key(app: &mut App, key: KeyEvent, fx: &mut Vec<Effect>) {
    let Some(popup) = app.popup.take() else {
        return;
    };
    match popup {
        Popup::Confirm {
            title,
            lines,
            action,
        } => match key.code {
            KeyCode::Char('y') | KeyCode::Char('Y') | KeyCode::Enter => confirmed(app, action, fx),
            KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc | KeyCode::Char('q') => {
                app.say("cancelled")
            }
            _ => {
                app.popup = Some(Popup::Confirm {
                    title,
                    lines,
                    action,
                })
            }
        },
        Popup::Tag { ids, mut input } => match key.code {
            KeyCode::Esc => {}
            KeyCode::Enter => {
                let text = input.text().trim().to_string();
                if text.is_empty() {
                    return;
                }
                let (tag, remove) = match text.strip_prefix('-') {
                    Some(t) => (t.to_string(), true),
                    None => (text, false),
                };
                fx.push(Effect::Backend(Request::Tag { ids, tag, remove }));
            }
            _ => {
                input.handle(&key);
                app.popup = Some(Popup::Tag { ids, input });
            }
        },
        Popup::Help { scroll } => {
            let scroll = match keymap::lookup(Ctx::Runs, &key) {
                Some(Cmd::Down) => scroll.saturating_add(1),
                Some(Cmd::Up) => scroll.saturating_sub(1),
                Some(Cmd::PageDown) => scroll.saturating_add(10),
                Some(Cmd::PageUp) => scroll.saturating_sub(10),
                Some(Cmd::Top) => 0,
                _ => return, // any other key closes the help
            };
            app.popup = Some(Popup::Help { scroll });
        }
    }
}

fn confirmed(app: &mut App, action: Confirm, fx: &mut Vec<Effect>) {
    match action {
        Confirm::Delete(ids) => {
            for id in &ids {
                app.runs.marked.retain(|m| m != id);
                app.images.forget_run(id);
            }
            if app.detail.as_ref().is_some_and(|d| ids.contains(&d.id)) {
                app.detail = None;
                if app.view == View::Detail {
                    app.go_back();
                }
            }
            fx.push(Effect::Backend(Request::Delete(ids)));
        }
        Confirm::Cancel(id) => fx.push(Effect::Backend(Request::Cancel(id))),
        Confirm::CancelJob(job) => fx.push(Effect::Backend(Request::CancelJob(job))),
        Confirm::Rerun(id) => fx.push(Effect::Backend(Request::Rerun {
            id,
            request: RerunRequest::default(),
        })),
        Confirm::Resume(id) => fx.push(Effect::Backend(Request::Resume(id))),
        Confirm::Quit => quit(app, fx),
    }
}

/// Commands that act on runs, shared by the runs table (selected / marked runs) and the detail
/// view (the open run).
pub fn run_command(app: &mut App, cmd: Cmd, targets: Vec<RunId>, fx: &mut Vec<Effect>) {
    let Some(first) = targets.first().cloned() else {
        app.error("no run selected");
        return;
    };
    let row = app.row(&first).cloned();
    let what = |row: &Option<RunRow>| {
        row.as_ref().map_or_else(
            || short_id(&first).to_string(),
            |r| {
                format!(
                    "{} ({} {}{})",
                    short_id(&r.id),
                    r.kind,
                    r.status,
                    r.scene
                        .as_ref()
                        .map(|s| format!(", {s}"))
                        .unwrap_or_default()
                )
            },
        )
    };
    match cmd {
        Cmd::Tag => {
            app.popup = Some(Popup::Tag {
                ids: targets,
                input: TextInput::default(),
            })
        }
        Cmd::Delete => {
            if let Some(live) = targets
                .iter()
                .find(|id| app.row(id).is_some_and(|r| r.is_live()))
            {
                app.error(format!(
                    "run {} is live: cancel it first (x)",
                    short_id(live)
                ));
                return;
            }
            let n = targets.len();
            let mut lines = vec![if n == 1 {
                format!("Delete run {}?", what(&row))
            } else {
                format!("Delete {n} marked runs?")
            }];
            lines.push("Its record, metrics, logs, tags and unshared blobs go. y/n".into());
            app.popup = Some(Popup::Confirm {
                title: "Delete".into(),
                lines,
                action: Confirm::Delete(targets),
            });
        }
        Cmd::Cancel => {
            if !row.as_ref().is_some_and(|r| r.is_live()) {
                app.error(format!("run {} is not running", short_id(&first)));
                return;
            }
            app.popup = Some(Popup::Confirm {
                title: "Cancel run".into(),
                lines: vec![
                    format!("Cancel run {}?", what(&row)),
                    "It stops at its next step (checkpoint kept). y/n".into(),
                ],
                action: Confirm::Cancel(first),
            });
        }
        Cmd::Rerun => {
            if row.as_ref().is_some_and(|r| r.kind != RunKind::Learn) {
                app.error("only learning runs can be re-run from the workbench yet");
                return;
            }
            app.popup = Some(Popup::Confirm {
                title: "Re-run".into(),
                lines: vec![
                    format!(
                        "Re-run {} with the same spec (config, seed, inputs)?",
                        what(&row)
                    ),
                    "The new run records whether its outputs are bit-identical. y/n".into(),
                ],
                action: Confirm::Rerun(first),
            });
        }
        Cmd::Resume => {
            if !row
                .as_ref()
                .is_some_and(|r| r.status == RunStatus::Interrupted)
            {
                app.error("only an interrupted run can be resumed");
                return;
            }
            app.popup = Some(Popup::Confirm {
                title: "Resume".into(),
                lines: vec![format!(
                    "Resume {} from its last checkpoint? y/n",
                    what(&row)
                )],
                action: Confirm::Resume(first),
            });
        }
        Cmd::EditRerun => {
            if row.as_ref().is_some_and(|r| r.kind != RunKind::Learn) {
                app.error("only learning runs can be re-run from the workbench yet");
                return;
            }
            super::views::launch::open_rerun(app, &first, fx);
        }
        Cmd::Synth => super::views::synth::open(app, &first, fx),
        _ => {}
    }
}
