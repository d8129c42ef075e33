//! A sweep as a table (`mifo sweep show` in the workbench): one row per run tagged with the
//! sweep's name, the config keys that vary between them, and the final value of chosen metrics,
//! best first. `m` / `M` choose the metric that orders it (the `--by` of the CLI), `o` flips
//! whether lower or higher is better; the table is refetched while any of its runs is live.
//!
//! `w` opens it from the runs table (the filter's `tag:` if it names one tag, else the selected
//! run's tag), the run detail and the compare view (the tag the runs share; of several, the
//! one the most runs carry).

use std::collections::BTreeMap;

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, Widget};

use crate::jobs::sweep::{lower_is_better, SweepTable};
use crate::store::{RunId, RunStatus};
use crate::tui::action::{Effect, Request};
use crate::tui::app::{short_id, App, View, MAX_COMPARE, RUNS_POLL_MS};
use crate::tui::filter::Term;
use crate::tui::keymap::Cmd;
use crate::tui::series::fmt_num;
use crate::tui::theme;

/// Most metric columns shown (the ordering metric first, then the main loss and the scores).
pub const MAX_METRIC_COLUMNS: usize = 4;

/// State of the sweep table.
pub struct SweepState {
    /// The sweep's name (a tag).
    pub name: String,
    /// The last table that arrived.
    pub table: Option<SweepTable>,
    /// Why the last request failed.
    pub error: Option<String>,
    /// The metric that orders the table (`None` until the first table names the default).
    pub sort: Option<String>,
    /// Whether lower is better for `sort`.
    pub lower: bool,
    /// The `by` of the last request.
    pub asked: Vec<String>,
    /// A request is in flight.
    pub in_flight: bool,
    /// Selected row.
    pub selected: usize,
    /// First row shown.
    pub offset: usize,
    /// When the table was last requested.
    pub last_poll: u64,
}

impl SweepState {
    fn new(name: String) -> Self {
        SweepState {
            name,
            table: None,
            error: None,
            sort: None,
            lower: true,
            asked: Vec::new(),
            in_flight: false,
            selected: 0,
            offset: 0,
            last_poll: 0,
        }
    }

    /// The metrics `m` cycles through: every final metric of the sweep's runs but `phase`, the
    /// main loss first, then the scores (the paper's four first), the other losses and the rest.
    pub fn metric_cycle(&self) -> Vec<String> {
        let Some(t) = &self.table else {
            return Vec::new();
        };
        let rank = |m: &str| {
            let headline = crate::eval::table::HEADLINE
                .iter()
                .position(|(_, n)| *n == m);
            match m {
                "loss/total" => (0, 0),
                _ if headline.is_some() => (1, headline.unwrap_or(0)),
                _ if crate::store::is_score(m) => (2, 0),
                _ if m.starts_with("loss/") => (3, 0),
                _ => (4, 0),
            }
        };
        let mut names: Vec<String> = t
            .available
            .iter()
            .filter(|m| *m != "phase" && *m != crate::eval::SETUP_METRIC)
            .cloned()
            .collect();
        names.sort_by(|a, b| (rank(a), a).cmp(&(rank(b), b)));
        names
    }

    /// The `by` to ask for: the ordering metric with its direction, then up to
    /// [`MAX_METRIC_COLUMNS`] − 1 more columns (the main loss and the scores, as they come in
    /// [`Self::metric_cycle`]).
    pub fn by(&self) -> Vec<String> {
        let Some(sort) = &self.sort else {
            return Vec::new();
        };
        let mut by = vec![format!("{sort}:{}", if self.lower { "min" } else { "max" })];
        by.extend(
            self.metric_cycle()
                .into_iter()
                .filter(|m| m != sort && (m == "loss/total" || crate::store::is_score(m)))
                .take(MAX_METRIC_COLUMNS - 1),
        );
        by
    }

    fn selected_run(&self) -> Option<RunId> {
        let t = self.table.as_ref()?;
        t.rows.get(self.selected)?.run.parse().ok()
    }
}

fn request(app: &mut App, fx: &mut Vec<Effect>) {
    let now = app.now_ms;
    let Some(s) = app.sweep.as_mut() else {
        return;
    };
    if s.in_flight {
        return;
    }
    s.in_flight = true;
    s.last_poll = now;
    s.asked = s.by();
    fx.push(Effect::Backend(Request::Sweep {
        name: s.name.clone(),
        by: s.asked.clone(),
    }));
}

/// Opens the table of sweep `name`.
pub fn open(app: &mut App, name: String, fx: &mut Vec<Effect>) {
    app.sweep = Some(SweepState::new(name));
    app.go(View::Sweep);
    request(app, fx);
}

/// The sweep that `w` means for `ids`: the filter's `tag:` when it names one tag, else the tag
/// every one of `ids` carries (of several, the one the most listed runs carry).
pub fn sweep_of(app: &App, ids: &[RunId]) -> Result<String, String> {
    for term in &app.runs.filter.terms {
        if let Term::Tag(tags) = term {
            if let [one] = tags.as_slice() {
                return Ok(one.clone());
            }
        }
    }
    let Some(first) = ids.first() else {
        return Err("no run selected".into());
    };
    let tags_of = |id: &RunId| {
        app.row(id)
            .map(|r| r.tags.clone())
            .or_else(|| {
                app.detail
                    .as_ref()
                    .filter(|d| d.id == *id)
                    .and_then(|d| d.detail.as_ref())
                    .map(|d| d.row.tags.clone())
            })
            .unwrap_or_default()
    };
    let common: Vec<String> = tags_of(first)
        .into_iter()
        .filter(|t| ids[1..].iter().all(|id| tags_of(id).contains(t)))
        .collect();
    let mut counts: BTreeMap<&String, usize> = common.iter().map(|t| (t, 0)).collect();
    for row in &app.runs.rows {
        for t in &row.tags {
            if let Some(n) = counts.get_mut(t) {
                *n += 1;
            }
        }
    }
    // Most runs first; of equal counts, the first by name.
    let best = counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .map(|(t, _)| t.clone());
    best.ok_or_else(|| {
        let what = if ids.len() == 1 {
            format!("run {} has no tag", short_id(first))
        } else {
            format!("the {} runs share no tag", ids.len())
        };
        format!("{what}: a sweep's runs carry its name as a tag (or filter with /tag:NAME)")
    })
}

/// `w`: opens the sweep of what the view shows (see [`sweep_of`]).
pub fn open_for_view(app: &mut App, fx: &mut Vec<Effect>) {
    let ids: Vec<RunId> = match app.view {
        View::Runs => app
            .runs
            .selected_row()
            .map(|r| vec![r.id.clone()])
            .unwrap_or_default(),
        View::Detail => app.detail.iter().map(|d| d.id.clone()).collect(),
        View::Compare => app
            .compare
            .as_ref()
            .map(|c| c.ids.clone())
            .unwrap_or_default(),
        _ => return,
    };
    match sweep_of(app, &ids) {
        Ok(name) => open(app, name, fx),
        Err(e) => app.error(e),
    }
}

/// A table answer.
pub fn on_loaded(
    app: &mut App,
    name: &str,
    result: Result<SweepTable, String>,
    fx: &mut Vec<Effect>,
) {
    let Some(s) = app.sweep.as_mut() else {
        return;
    };
    if s.name != name {
        return;
    }
    s.in_flight = false;
    match result {
        Ok(t) => {
            let keep = s.selected_run();
            if s.sort.is_none() {
                s.sort = t.metrics.first().cloned();
                s.lower = t.lower_better.first().copied().unwrap_or(true);
            }
            s.selected = keep
                .and_then(|id| t.rows.iter().position(|r| r.run == id.as_str()))
                .unwrap_or(0);
            s.table = Some(t);
            s.error = None;
            // The first answer names the default metric and every metric there is: ask again
            // with the columns wanted.
            if s.by() != s.asked {
                request(app, fx);
            }
        }
        Err(e) => {
            s.error = Some(e.clone());
            app.error(format!("sweep {name}: {e}"));
        }
    }
}

/// Refetches the table while it shows a live run.
pub fn on_tick(app: &mut App, fx: &mut Vec<Effect>) {
    let live = app.sweep.as_ref().is_some_and(|s| {
        s.table.as_ref().is_some_and(|t| {
            t.rows
                .iter()
                .any(|r| r.status.parse::<RunStatus>().is_ok_and(|st| !st.is_final()))
        }) && app.now_ms.saturating_sub(s.last_poll) >= RUNS_POLL_MS
    });
    if app.view == View::Sweep && live {
        request(app, fx);
    }
}

/// A run's status changed in the runs list: refetch the table if it shows that run.
pub fn on_run_changed(app: &mut App, id: &RunId, fx: &mut Vec<Effect>) {
    let shown = app.view == View::Sweep
        && app.sweep.as_ref().is_some_and(|s| {
            s.table
                .as_ref()
                .is_some_and(|t| t.rows.iter().any(|r| r.run == id.as_str()))
        });
    if shown {
        request(app, fx);
    }
}

/// A command in the sweep table.
pub fn on_cmd(app: &mut App, cmd: Cmd, fx: &mut Vec<Effect>) {
    let Some(s) = app.sweep.as_mut() else {
        return;
    };
    let n = s.table.as_ref().map_or(0, |t| t.rows.len());
    match cmd {
        Cmd::Up => s.selected = s.selected.saturating_sub(1),
        Cmd::Down => s.selected = (s.selected + 1).min(n.saturating_sub(1)),
        Cmd::NextMetric | Cmd::PrevMetric => {
            let cycle = s.metric_cycle();
            if cycle.is_empty() {
                app.error("the sweep's runs have no metric yet");
                return;
            }
            let at = s
                .sort
                .as_ref()
                .and_then(|m| cycle.iter().position(|c| c == m));
            let next = match (at, cmd == Cmd::NextMetric) {
                (None, _) => 0,
                (Some(i), true) => (i + 1) % cycle.len(),
                (Some(i), false) => (i + cycle.len() - 1) % cycle.len(),
            };
            let metric = cycle[next].clone();
            s.lower = lower_is_better(&metric);
            s.sort = Some(metric);
            s.in_flight = false;
            request(app, fx);
        }
        Cmd::SortReverse if s.sort.is_some() => {
            s.lower = !s.lower;
            s.in_flight = false;
            request(app, fx);
        }
        Cmd::Open => {
            if let Some(id) = s.selected_run() {
                super::detail::open(app, id, fx);
            }
        }
        Cmd::Mark => {
            if let Some(id) = s.selected_run() {
                s.selected = (s.selected + 1).min(n.saturating_sub(1));
                app.runs.toggle_mark(&id);
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
        _ => {}
    }
}

/// `loss/total (lower is better)`.
fn direction(metric: &str, lower: bool) -> String {
    format!(
        "{metric} ({} is better)",
        if lower { "lower" } else { "higher" }
    )
}

/// Draws the sweep table.
pub fn render(app: &mut App, area: Rect, buf: &mut Buffer) {
    let marked = app.runs.marked.clone();
    let Some(s) = app.sweep.as_mut() else {
        return;
    };
    let mut title = format!(" Sweep {}", s.name);
    if let Some(t) = &s.table {
        title.push_str(&format!(" · {} runs", t.rows.len()));
        match (&s.sort, t.metrics.first()) {
            (Some(m), Some(first)) if m == first => {
                title.push_str(&format!(" · best first by {}", direction(m, s.lower)))
            }
            (_, None) => title.push_str(" · no metric to order by"),
            _ => {}
        }
    }
    title.push(' ');
    let block = Block::bordered().title(Line::styled(title, theme::title()));
    let inner = block.inner(area);
    block.render(area, buf);
    let Some(t) = &s.table else {
        let line = match &s.error {
            Some(e) => Span::styled(format!("cannot read sweep {}: {e}", s.name), theme::error()),
            None => Span::styled(format!("loading sweep {}…", s.name), theme::dim()),
        };
        Paragraph::new(line).render(inner, buf);
        return;
    };
    let body = inner.height.saturating_sub(1) as usize;
    if body == 0 {
        return;
    }
    s.selected = s.selected.min(t.rows.len().saturating_sub(1));
    if s.selected < s.offset {
        s.offset = s.selected;
    } else if s.selected >= s.offset + body {
        s.offset = s.selected + 1 - body;
    }
    s.offset = s.offset.min(t.rows.len().saturating_sub(body));
    let mut header: Vec<String> = vec![String::new(), "#".into(), "RUN".into(), "STATUS".into()];
    header.extend(t.keys.iter().cloned());
    header.extend(t.metrics.iter().enumerate().map(|(i, m)| {
        if i == 0 {
            format!("{m} ({})", if t.lower_better[0] { "min" } else { "max" })
        } else {
            m.clone()
        }
    }));
    let cells: Vec<Vec<String>> = t
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut c = vec![
                String::new(),
                (i + 1).to_string(),
                r.run.chars().take(12).collect(),
                r.status.clone(),
            ];
            c.extend(r.values.iter().cloned());
            c.extend(
                r.metrics
                    .iter()
                    .map(|m| m.map_or_else(|| "–".to_string(), fmt_num)),
            );
            c
        })
        .collect();
    let key_cols = 4..4 + t.keys.len();
    let widths: Vec<Constraint> = (0..header.len())
        .map(|i| {
            let w = cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0);
            let w = if key_cols.contains(&i) { w.min(24) } else { w };
            Constraint::Length(if i == 0 { 1 } else { w as u16 })
        })
        .collect();
    let metric_start = 4 + t.keys.len();
    let end = (s.offset + body).min(t.rows.len());
    let rows: Vec<Row> = (s.offset..end)
        .map(|pos| {
            let r = &t.rows[pos];
            let is_marked = r.run.parse::<RunId>().is_ok_and(|id| marked.contains(&id));
            let status = r.status.parse::<RunStatus>().ok();
            let row_cells: Vec<Cell> = cells[pos]
                .iter()
                .enumerate()
                .map(|(i, text)| match i {
                    0 => Cell::from(Span::styled(
                        if is_marked { "●" } else { " " },
                        theme::marked(),
                    )),
                    3 => Cell::from(Span::styled(
                        text.clone(),
                        status.map_or_else(theme::dim, theme::status_style),
                    )),
                    i if i >= metric_start => Cell::from(Line::from(text.clone()).right_aligned()),
                    1 => Cell::from(Line::from(text.clone()).right_aligned()),
                    _ => Cell::from(text.clone()),
                })
                .collect();
            let mut row = Row::new(row_cells);
            if pos == s.selected {
                row = row.style(theme::selected());
            } else if is_marked {
                row = row.style(theme::marked());
            }
            row
        })
        .collect();
    Table::new(rows, widths)
        .header(Row::new(header).style(theme::dim()))
        .column_spacing(2)
        .render(inner, buf);
}
