//! The views (one module each) and the frame around them: title bar, status line, key hints,
//! popups, and the too-small message.

pub mod compare;
pub mod detail;
pub mod help;
pub mod jobs;
pub mod launch;
pub mod runs;
pub mod sweep;
pub mod synth;

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Widget, Wrap};

use super::app::{App, Popup, View};
use super::keymap;
use super::theme;
use super::widgets::hints::render_hints;
use super::widgets::popup::render_popup;

/// Smallest terminal the views draw in; below it a message asks for more room.
pub const MIN_SIZE: (u16, u16) = (40, 12);

/// Draws the whole app into `area` of `buf`.
pub fn render(app: &mut App, area: Rect, buf: &mut Buffer) {
    app.images.frame += 1;
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        let msg = format!(
            "Terminal too small ({}×{}): mifo needs at least {}×{}. q quits.",
            area.width, area.height, MIN_SIZE.0, MIN_SIZE.1
        );
        Paragraph::new(msg)
            .wrap(Wrap { trim: true })
            .render(area, buf);
        return;
    }
    let [title, body, status, hints] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    render_title(app, title, buf);
    match app.view {
        View::Runs => runs::render(app, body, buf),
        View::Detail => detail::render(app, body, buf),
        View::Compare => compare::render(app, body, buf),
        View::Sweep => sweep::render(app, body, buf),
        View::Launch => launch::render(app, body, buf),
        View::Jobs => jobs::render(app, body, buf),
        View::Synth => synth::render(app, body, buf),
    }
    render_status(app, status, buf);
    let hint_list: Vec<(&str, &str)> = match &app.popup {
        Some(Popup::Confirm { .. }) => vec![("y", "yes"), ("n/Esc", "no")],
        Some(Popup::Tag { .. }) => vec![("Enter", "apply"), ("Esc", "cancel")],
        Some(Popup::Help { .. }) => vec![("j/k", "scroll"), ("Esc", "close")],
        None if app.view == View::Runs && app.runs.filter_editing => vec![
            ("Enter", "keep filter"),
            ("Esc", "clear filter"),
            ("status:", "queued running done failed…"),
            ("kind:", "learn synth"),
            ("tag:", "name"),
        ],
        None => keymap::hints(app.view.ctx()),
    };
    render_hints(&hint_list, hints, buf);
    match &app.popup {
        None => {}
        Some(Popup::Help { scroll }) => help::render(*scroll, body, buf),
        Some(Popup::Confirm { title, lines, .. }) => {
            let lines = lines.iter().map(|l| Line::raw(l.clone())).collect();
            render_popup(title, lines, body, buf);
        }
        Some(Popup::Tag { ids, input }) => {
            let lines = vec![
                Line::raw(format!(
                    "Tag {} run{} (-name removes a tag):",
                    ids.len(),
                    if ids.len() == 1 { "" } else { "s" }
                )),
                input.line(true, ratatui::style::Style::new()),
            ];
            render_popup("Tag", lines, body, buf);
        }
    }
}

fn render_title(app: &App, area: Rect, buf: &mut Buffer) {
    let tab = |n: &str, name: String, on: bool| {
        let style = if on { theme::selected() } else { theme::dim() };
        Span::styled(format!(" {n} {name} "), style)
    };
    let active = app.jobs_active();
    let jobs = if active > 0 {
        format!("Jobs ({active})")
    } else {
        "Jobs".into()
    };
    let spans = vec![
        Span::styled(" mifo ", theme::title()),
        tab(
            "1",
            "Runs".into(),
            matches!(
                app.view,
                View::Runs | View::Detail | View::Compare | View::Sweep
            ),
        ),
        tab("2", jobs, app.view == View::Jobs),
        Span::styled(format!("  {}", app.info.name), theme::dim()),
    ];
    Paragraph::new(Line::from(spans)).render(area, buf);
}

fn render_status(app: &App, area: Rect, buf: &mut Buffer) {
    let line = match &app.status {
        Some(s) if s.error => Line::styled(format!(" {}", s.text), theme::error()),
        Some(s) => Line::raw(format!(" {}", s.text)),
        None => match (app.runs.loaded, app.runs.load_ms) {
            (true, Some(ms)) => Line::styled(
                format!(" {} runs listed in {ms:.0} ms", app.runs.rows.len()),
                theme::dim(),
            ),
            _ => Line::raw(""),
        },
    };
    Paragraph::new(line).render(area, buf);
}
