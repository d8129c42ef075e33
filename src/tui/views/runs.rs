//! The runs table: filter, sort, marks, live status, and the run commands.

use std::collections::HashMap;

use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, Widget};

use crate::store::{format_age, RunId, RunKind, RunStatus};
use crate::tui::action::Effect;
use crate::tui::app::{run_command, short_id, App, MAX_COMPARE};
use crate::tui::backend::RunRow;
use crate::tui::filter::{filter_and_sort, short_key, Filter, SortKey};
use crate::tui::keymap::Cmd;
use crate::tui::series::fmt_num;
use crate::tui::theme;
use crate::tui::widgets::input::TextInput;

/// State of the runs table.
#[derive(Default)]
pub struct RunsState {
    /// Every run, newest first (as the backend lists them).
    pub rows: Vec<RunRow>,
    index: HashMap<RunId, usize>,
    /// Indices into `rows` passing the filter, in sort order.
    pub shown: Vec<usize>,
    /// Selected position in `shown`.
    pub selected: usize,
    /// First visible position in `shown`.
    pub offset: usize,
    /// Rows visible in the last frame.
    pub page: usize,
    /// The filter text.
    pub filter_input: TextInput,
    /// Whether the filter line has the keyboard.
    pub filter_editing: bool,
    /// The filter in force (the good terms of the text).
    pub filter: Filter,
    /// Why the filter text does not parse.
    pub filter_error: Option<String>,
    /// Sort key.
    pub sort: SortKey,
    /// Reverse the sort.
    pub reverse: bool,
    /// Marked runs, in marking order (compare letters A, B, … follow it).
    pub marked: Vec<RunId>,
    /// Whether a list has arrived.
    pub loaded: bool,
    /// How long the last list took (ms).
    pub load_ms: Option<f64>,
    /// Why the last list failed.
    pub error: Option<String>,
}

impl RunsState {
    /// The row of run `id`.
    pub fn row(&self, id: &RunId) -> Option<&RunRow> {
        self.index.get(id).map(|&i| &self.rows[i])
    }

    /// The selected row.
    pub fn selected_row(&self) -> Option<&RunRow> {
        self.shown.get(self.selected).map(|&i| &self.rows[i])
    }

    /// Runs queued or running.
    pub fn live_count(&self) -> usize {
        self.rows.iter().filter(|r| r.is_live()).count()
    }

    /// Recomputes `shown`, keeping the selected run selected when it still shows.
    pub fn refilter(&mut self) {
        let keep = self.selected_row().map(|r| r.id.clone());
        self.shown = filter_and_sort(&self.rows, &self.filter, self.sort, self.reverse);
        self.selected = keep
            .and_then(|id| {
                let i = *self.index.get(&id)?;
                self.shown.iter().position(|&s| s == i)
            })
            .unwrap_or(0)
            .min(self.shown.len().saturating_sub(1));
    }

    fn move_by(&mut self, delta: isize) {
        if self.shown.is_empty() {
            return;
        }
        let last = self.shown.len() - 1;
        self.selected = (self.selected as isize + delta).clamp(0, last as isize) as usize;
    }

    /// Toggles the mark of run `id`.
    pub fn toggle_mark(&mut self, id: &RunId) {
        if let Some(i) = self.marked.iter().position(|m| m == id) {
            self.marked.remove(i);
        } else {
            self.marked.push(id.clone());
        }
    }
}

/// Replaces the rows; returns the runs whose status changed.
pub fn set_rows(app: &mut App, rows: Vec<RunRow>, elapsed_ms: f64) -> Vec<RunId> {
    let runs = &mut app.runs;
    let changed: Vec<RunId> = rows
        .iter()
        .filter(|r| {
            runs.row(&r.id)
                .is_some_and(|old| old.status != r.status || old.outputs_hint() != r.outputs_hint())
        })
        .map(|r| r.id.clone())
        .collect();
    let keep = runs.selected_row().map(|r| r.id.clone());
    runs.index = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.clone(), i))
        .collect();
    runs.rows = rows;
    runs.loaded = true;
    runs.error = None;
    runs.load_ms = Some(elapsed_ms);
    let index = &runs.index;
    runs.marked.retain(|m| index.contains_key(m));
    runs.shown = filter_and_sort(&runs.rows, &runs.filter, runs.sort, runs.reverse);
    runs.selected = keep
        .and_then(|id| {
            let i = *runs.index.get(&id)?;
            runs.shown.iter().position(|&s| s == i)
        })
        .unwrap_or(runs.selected)
        .min(runs.shown.len().saturating_sub(1));
    changed
}

trait OutputsHint {
    fn outputs_hint(&self) -> (Option<u64>, Option<bool>);
}

impl OutputsHint for RunRow {
    /// What changes when a run gets new outputs or finishes comparing (cheap to compare).
    fn outputs_hint(&self) -> (Option<u64>, Option<bool>) {
        (self.finished_ms, self.rerun_identical)
    }
}

/// Clears the filter.
pub fn clear_filter(app: &mut App) {
    let runs = &mut app.runs;
    runs.filter_input = TextInput::default();
    runs.filter = Filter::default();
    runs.filter_error = None;
    runs.filter_editing = false;
    runs.refilter();
}

/// A key while the filter line is being edited.
pub fn on_filter_key(app: &mut App, key: KeyEvent) {
    match key.code {
        KeyCode::Enter => app.runs.filter_editing = false,
        KeyCode::Esc => clear_filter(app),
        _ => {
            let runs = &mut app.runs;
            if runs.filter_input.handle(&key) {
                let (filter, error) = Filter::parse_lenient(runs.filter_input.text());
                runs.filter = filter;
                runs.filter_error = error;
                runs.refilter();
            }
        }
    }
}

/// The marked runs, or the selected one when none is marked.
fn targets(app: &App) -> Vec<RunId> {
    if app.runs.marked.is_empty() {
        app.runs
            .selected_row()
            .map(|r| vec![r.id.clone()])
            .unwrap_or_default()
    } else {
        app.runs.marked.clone()
    }
}

/// A command in the runs table.
pub fn on_cmd(app: &mut App, cmd: Cmd, fx: &mut Vec<Effect>) {
    let page = (app.runs.page.max(2) / 2) as isize;
    match cmd {
        Cmd::Up => app.runs.move_by(-1),
        Cmd::Down => app.runs.move_by(1),
        Cmd::PageUp => app.runs.move_by(-page),
        Cmd::PageDown => app.runs.move_by(page),
        Cmd::Top => app.runs.selected = 0,
        Cmd::Bottom => app.runs.selected = app.runs.shown.len().saturating_sub(1),
        Cmd::Filter => app.runs.filter_editing = true,
        Cmd::Sort => {
            app.runs.sort = app.runs.sort.next();
            app.runs.refilter();
            app.say(format!("sorted by {}", app.runs.sort.name()));
        }
        Cmd::SortReverse => {
            app.runs.reverse = !app.runs.reverse;
            app.runs.refilter();
        }
        Cmd::Mark => {
            if let Some(id) = app.runs.selected_row().map(|r| r.id.clone()) {
                app.runs.toggle_mark(&id);
                app.runs.move_by(1);
            }
        }
        Cmd::UnmarkAll => app.runs.marked.clear(),
        Cmd::Open => {
            if let Some(id) = app.runs.selected_row().map(|r| r.id.clone()) {
                super::detail::open(app, id, fx);
            }
        }
        Cmd::Diff => {
            let n = app.runs.marked.len();
            if !(2..=MAX_COMPARE).contains(&n) {
                app.error(format!(
                    "mark 2 to {MAX_COMPARE} runs with Space to compare them ({n} marked)"
                ));
            } else {
                let ids = app.runs.marked.clone();
                super::compare::open(app, ids, fx);
            }
        }
        Cmd::Tag | Cmd::Delete => run_command(app, cmd, targets(app), fx),
        Cmd::Rerun | Cmd::EditRerun | Cmd::Cancel | Cmd::Resume | Cmd::Synth => {
            let sel = app
                .runs
                .selected_row()
                .map(|r| vec![r.id.clone()])
                .unwrap_or_default();
            run_command(app, cmd, sel, fx)
        }
        _ => {}
    }
}

/// `running 45%`, `done`, …
pub fn status_text(row: &RunRow) -> String {
    match (&row.status, &row.progress) {
        (RunStatus::Running, Some(p)) if p.total > 0 => {
            format!("running {:>3.0}%", p.fraction() * 100.0)
        }
        (s, _) => s.as_str().to_string(),
    }
}

/// `coffee`, or `← 0j5abc…` for a run with a parent.
pub fn scene_text(row: &RunRow) -> String {
    match (&row.parent, &row.scene) {
        (Some(p), _) if row.kind == RunKind::Synth => format!("← {}", short_id(p)),
        (_, Some(s)) => s.clone(),
        _ => String::new(),
    }
}

/// `lr=0.001 penalty_steps=300 #best`.
pub fn deltas_text(row: &RunRow) -> String {
    let mut parts: Vec<String> = row
        .config_deltas
        .iter()
        .map(|(k, v)| format!("{}={}", short_key(k), v.trim_matches('"')))
        .collect();
    if row.rerun_of.is_some() {
        parts.insert(0, "↻".into());
    }
    parts.extend(row.tags.iter().map(|t| format!("#{t}")));
    parts.join(" ")
}

/// Draws the runs table.
pub fn render(app: &mut App, area: Rect, buf: &mut Buffer) {
    let runs = &mut app.runs;
    let title = {
        let mut t = format!(" Runs {}", runs.rows.len());
        if !runs.filter.is_empty() {
            t.push_str(&format!(" ({} shown)", runs.shown.len()));
        }
        t.push_str(&format!(
            " · sort {} {}",
            runs.sort.name(),
            if runs.reverse { "↑" } else { "↓" }
        ));
        if !runs.marked.is_empty() {
            t.push_str(&format!(" · {} marked", runs.marked.len()));
        }
        t.push(' ');
        t
    };
    let block = Block::bordered().title(Line::styled(title, theme::title()));
    let inner = block.inner(area);
    block.render(area, buf);
    let show_filter = runs.filter_editing || !runs.filter_input.text().is_empty();
    let [filter_area, table_area] = Layout::vertical([
        Constraint::Length(u16::from(show_filter)),
        Constraint::Min(0),
    ])
    .areas(inner);
    if show_filter {
        let mut spans = vec![Span::styled("/ ", theme::key())];
        spans.push(Span::raw(" "));
        spans.extend(
            runs.filter_input
                .line(runs.filter_editing, Style::new())
                .spans,
        );
        if let Some(e) = &runs.filter_error {
            spans.push(Span::styled(format!("  {e}"), theme::error()));
        }
        Paragraph::new(Line::from(spans)).render(filter_area, buf);
    }
    if let Some(e) = &runs.error {
        Paragraph::new(Span::styled(
            format!("cannot list runs: {e}"),
            theme::error(),
        ))
        .render(table_area, buf);
        return;
    }
    if !runs.loaded {
        Paragraph::new(Span::styled("loading runs…", theme::dim())).render(table_area, buf);
        return;
    }
    if runs.rows.is_empty() {
        Paragraph::new(vec![
            Line::raw("No runs yet."),
            Line::styled(
                "Press L to launch a learning run (or run `mifo learn --scene DIR`).",
                theme::dim(),
            ),
        ])
        .render(table_area, buf);
        return;
    }
    if runs.shown.is_empty() {
        Paragraph::new(Span::styled(
            "No run matches the filter (Esc clears it).",
            theme::dim(),
        ))
        .render(table_area, buf);
        return;
    }
    let body = table_area.height.saturating_sub(1) as usize;
    runs.page = body;
    if body == 0 {
        return;
    }
    if runs.selected < runs.offset {
        runs.offset = runs.selected;
    } else if runs.selected >= runs.offset + body {
        runs.offset = runs.selected + 1 - body;
    }
    runs.offset = runs.offset.min(runs.shown.len().saturating_sub(body));
    let now = app.now_ms;
    let end = (runs.offset + body).min(runs.shown.len());
    let rows: Vec<Row> = (runs.offset..end)
        .map(|pos| {
            let row = &runs.rows[runs.shown[pos]];
            let marked = runs.marked.contains(&row.id);
            let mark = if marked { "●" } else { " " };
            let cells = vec![
                Cell::from(Span::styled(mark, theme::marked())),
                Cell::from(short_id(&row.id).to_string()),
                Cell::from(row.kind.as_str()),
                Cell::from(Span::styled(
                    status_text(row),
                    theme::status_style(row.status),
                )),
                Cell::from(scene_text(row)),
                Cell::from(Span::styled(deltas_text(row), theme::dim())),
                Cell::from(
                    Line::from(row.final_loss.map(fmt_num).unwrap_or_default()).right_aligned(),
                ),
                Cell::from(
                    Line::from(format_age(now.saturating_sub(row.created_ms))).right_aligned(),
                ),
            ];
            let mut r = Row::new(cells);
            if pos == runs.selected {
                r = r.style(theme::selected());
            } else if marked {
                r = r.style(theme::marked());
            }
            r
        })
        .collect();
    let widths = [
        Constraint::Length(1),
        Constraint::Length(12),
        Constraint::Length(5),
        Constraint::Length(12),
        Constraint::Length(14),
        Constraint::Fill(1),
        Constraint::Length(8),
        Constraint::Length(4),
    ];
    let header = Row::new([
        "",
        "ID",
        "KIND",
        "STATUS",
        "SCENE/PARENT",
        "DELTAS · TAGS",
        "LOSS",
        "AGE",
    ])
    .style(theme::dim());
    Table::new(rows, widths)
        .header(header)
        .column_spacing(1)
        .render(table_area, buf);
}
