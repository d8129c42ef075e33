//! Jobs: queued and running launches with progress gauges, the device each run holds (or `→`
//! the one it waits for), and cancel.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, Widget};

use crate::store::{format_age, format_duration};
use crate::tui::action::Effect;
use crate::tui::app::{short_id, App, Confirm, Popup};
use crate::tui::backend::{JobRow, JobState};
use crate::tui::keymap::Cmd;
use crate::tui::theme;

/// State of the jobs view.
#[derive(Default)]
pub struct JobsState {
    /// Jobs, newest first.
    pub rows: Vec<JobRow>,
    /// Selected row.
    pub selected: usize,
    /// Whether a list has arrived.
    pub loaded: bool,
}

/// Replaces the jobs (newest first); a job that just got its run refreshes the runs list.
pub fn set_rows(app: &mut App, mut rows: Vec<JobRow>, fx: &mut Vec<Effect>) {
    rows.reverse();
    let new_run = rows.iter().any(|r| {
        r.run.is_some()
            && !app
                .jobs
                .rows
                .iter()
                .any(|o| o.job == r.job && o.run == r.run && o.state == r.state)
    });
    let keep = app.jobs.rows.get(app.jobs.selected).map(|r| r.job);
    app.jobs.rows = rows;
    app.jobs.loaded = true;
    app.jobs.selected = keep
        .and_then(|k| app.jobs.rows.iter().position(|r| r.job == k))
        .unwrap_or(0);
    if new_run {
        app.request_runs(fx);
    }
}

/// A command in the jobs view.
pub fn on_cmd(app: &mut App, cmd: Cmd, fx: &mut Vec<Effect>) {
    let n = app.jobs.rows.len();
    match cmd {
        Cmd::Up => app.jobs.selected = app.jobs.selected.saturating_sub(1),
        Cmd::Down => app.jobs.selected = (app.jobs.selected + 1).min(n.saturating_sub(1)),
        Cmd::Open => match app
            .jobs
            .rows
            .get(app.jobs.selected)
            .and_then(|j| j.run.clone())
        {
            Some(run) => super::detail::open(app, run, fx),
            None => app.error("this job has no run yet"),
        },
        Cmd::Cancel => {
            let Some(job) = app.jobs.rows.get(app.jobs.selected).cloned() else {
                return;
            };
            if !job.state.is_active() {
                app.error(format!("job {} has already ended", job.job));
                return;
            }
            app.popup = Some(Popup::Confirm {
                title: "Cancel job".into(),
                lines: vec![
                    format!("Cancel job {} ({})?", job.job, job.label),
                    "A running job stops at its next step (checkpoint kept). y/n".into(),
                ],
                action: Confirm::CancelJob(job.job),
            });
        }
        _ => {}
    }
}

/// `[#####-----]  45% 540/1200 penalty`.
pub fn gauge_text(job: &JobRow, width: usize) -> String {
    match &job.progress {
        Some(p) if p.total > 0 => {
            let filled = (p.fraction() * width as f64).round() as usize;
            format!(
                "{}{} {:>3.0}% {}/{}{}",
                "█".repeat(filled),
                "░".repeat(width - filled.min(width)),
                p.fraction() * 100.0,
                p.step,
                p.total,
                p.phase
                    .as_ref()
                    .map(|s| format!(" {s}"))
                    .unwrap_or_default()
            )
        }
        _ => match &job.state {
            JobState::Failed(e) => e.clone(),
            JobState::Starting => "loading model and inputs…".into(),
            _ => String::new(),
        },
    }
}

/// Draws the jobs view.
pub fn render(app: &mut App, area: Rect, buf: &mut Buffer) {
    let active = app.jobs_active();
    let block = Block::bordered().title(Line::styled(
        format!(" Jobs · {active} active · {} listed ", app.jobs.rows.len()),
        theme::title(),
    ));
    if app.jobs.rows.is_empty() {
        let inner = block.inner(area);
        block.render(area, buf);
        let text = if app.jobs.loaded {
            "No jobs. Launch a learning run with L, or re-run a run with r."
        } else {
            "loading jobs…"
        };
        Paragraph::new(Span::styled(text, theme::dim())).render(inner, buf);
        return;
    }
    let now = app.now_ms;
    let rows: Vec<Row> = app
        .jobs
        .rows
        .iter()
        .enumerate()
        .map(|(i, j)| {
            let state_style = match &j.state {
                JobState::Running | JobState::Starting => {
                    theme::status_style(crate::store::RunStatus::Running)
                }
                JobState::Queued => theme::status_style(crate::store::RunStatus::Queued),
                JobState::Finished => theme::status_style(crate::store::RunStatus::Done),
                JobState::Failed(_) => theme::error(),
                JobState::Cancelled => theme::dim(),
            };
            let elapsed = j
                .started_ms
                .map(|s| format_duration(j.finished_ms.unwrap_or(now).saturating_sub(s)))
                .unwrap_or_else(|| format!("{} ago", format_age(now.saturating_sub(j.queued_ms))));
            let mut r = Row::new(vec![
                Cell::from(format!("#{}", j.job)),
                Cell::from(Span::styled(j.state.label(), state_style)),
                Cell::from(j.label.clone()),
                Cell::from(
                    j.run
                        .as_ref()
                        .map(|r| short_id(r).to_string())
                        .unwrap_or_default(),
                ),
                Cell::from(j.device.clone()),
                Cell::from(elapsed),
                Cell::from(gauge_text(j, 12)),
            ]);
            if i == app.jobs.selected {
                r = r.style(theme::selected());
            }
            r
        })
        .collect();
    let widths = [
        Constraint::Length(4),
        Constraint::Length(9),
        Constraint::Fill(2),
        Constraint::Length(12),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Fill(3),
    ];
    Table::new(rows, widths)
        .header(
            Row::new(["JOB", "STATE", "WHAT", "RUN", "DEVICE", "TIME", "PROGRESS"])
                .style(theme::dim()),
        )
        .block(block)
        .render(area, buf);
}
