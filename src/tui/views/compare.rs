//! 2–8 runs side by side: config diff (differing keys only, `a` for all), overlaid curves of
//! one metric, output images side by side, and whether re-runs came out bit-identical.

use std::collections::{BTreeMap, BTreeSet};

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, Widget};

use crate::store::{BlobHash, RunId};
use crate::tui::action::{Effect, Request};
use crate::tui::app::{short_id, App, View, RUNS_POLL_MS};
use crate::tui::backend::{Metrics, RunDetail};
use crate::tui::images::ImageKey;
use crate::tui::keymap::Cmd;
use crate::tui::series::{build_chart, fmt_num, ChartModel, ChartOptions};
use crate::tui::theme;
use crate::tui::widgets::chart::{chart_title, render_chart};
use crate::tui::widgets::image::render_image;

/// One key of the config table.
#[derive(Clone, Debug, PartialEq)]
pub struct CompareRow {
    /// Key (`seed`, `learn.lr`, `input.mask0`).
    pub key: String,
    /// Value per run (`–` where missing).
    pub values: Vec<String>,
    /// All values equal.
    pub same: bool,
}

/// State of the compare view.
pub struct CompareState {
    /// The runs (A, B, … in this order).
    pub ids: Vec<RunId>,
    /// Their details.
    pub details: Vec<Option<Box<RunDetail>>>,
    /// Their metrics.
    pub metrics: Vec<Option<Metrics>>,
    /// Load errors.
    pub errors: Vec<Option<String>>,
    /// Show equal keys too.
    pub show_all: bool,
    /// Every key.
    pub rows: Vec<CompareRow>,
    /// Metric names in any run.
    pub metric_names: Vec<String>,
    /// The metric plotted.
    pub metric: usize,
    /// The chart.
    pub chart: ChartModel,
    /// Chart options.
    pub options: ChartOptions,
    /// Image output names in any run.
    pub outputs: Vec<String>,
    /// The output shown.
    pub output: usize,
    /// First table row shown.
    pub scroll: u16,
    /// When the runs were last polled.
    pub last_poll: u64,
}

/// `A`, `B`, …
pub fn letter(i: usize) -> char {
    (b'A' + (i % 26) as u8) as char
}

impl CompareState {
    fn new(ids: Vec<RunId>) -> Self {
        let n = ids.len();
        CompareState {
            ids,
            details: vec![None; n],
            metrics: vec![None; n],
            errors: vec![None; n],
            show_all: false,
            rows: Vec::new(),
            metric_names: Vec::new(),
            metric: 0,
            chart: ChartModel::default(),
            options: ChartOptions::default(),
            outputs: Vec::new(),
            output: 0,
            scroll: 0,
            last_poll: 0,
        }
    }

    /// The rows shown (differing only, unless `show_all`).
    pub fn visible_rows(&self) -> Vec<&CompareRow> {
        self.rows
            .iter()
            .filter(|r| self.show_all || !r.same)
            .collect()
    }

    /// Recomputes the table, metric list and output list.
    pub fn recompute(&mut self) {
        let mut per_run: Vec<BTreeMap<String, String>> = Vec::new();
        for d in &self.details {
            let mut m = BTreeMap::new();
            if let Some(d) = d {
                m.insert("kind".into(), d.row.kind.to_string());
                m.insert("status".into(), d.row.status.to_string());
                m.insert("scene".into(), d.row.scene.clone().unwrap_or_default());
                m.insert("spec".into(), d.row.spec_hash.short(12));
                if let Some(spec) = &d.spec {
                    m.insert("seed".into(), spec.seed.to_string());
                    m.insert("model".into(), spec.model_fingerprint.short(12));
                    m.insert("code".into(), spec.code_version.clone());
                    for (name, hash) in &spec.inputs {
                        m.insert(format!("input.{name}"), hash.short(12));
                    }
                    for line in super::detail::config_lines(spec) {
                        m.insert(line.key, line.value);
                    }
                }
            }
            per_run.push(m);
        }
        // Scores (`mifo eval`, `mifo world score`) head the table: the final value of each
        // `eval/*` and `oracle/*` series, the paper's four first.
        for (m, metrics) in per_run.iter_mut().zip(&self.metrics) {
            let Some(metrics) = metrics else { continue };
            for (name, points) in metrics {
                if crate::store::is_score(name) && name != crate::eval::SETUP_METRIC {
                    if let Some(&(_, v)) = points.last() {
                        m.insert(name.clone(), format!("{v:.4}"));
                    }
                }
            }
        }
        let keys: BTreeSet<&String> = per_run.iter().flat_map(|m| m.keys()).collect();
        let order = |k: &str| match k {
            k if crate::eval::table::HEADLINE.iter().any(|(_, n)| *n == k) => {
                crate::eval::table::HEADLINE
                    .iter()
                    .position(|(_, n)| *n == k)
                    .unwrap_or(0)
            }
            k if crate::store::is_score(k) => 4,
            "kind" => 5,
            "status" => 6,
            "seed" => 7,
            "scene" => 8,
            "spec" => 9,
            "model" => 10,
            "code" => 11,
            k if k.starts_with("input.") => 12,
            _ => 13,
        };
        let mut rows: Vec<CompareRow> = keys
            .into_iter()
            .map(|k| {
                let values: Vec<String> = per_run
                    .iter()
                    .map(|m| m.get(k).cloned().unwrap_or_else(|| "–".into()))
                    .collect();
                CompareRow {
                    key: k.clone(),
                    same: values.windows(2).all(|w| w[0] == w[1]),
                    values,
                }
            })
            .collect();
        rows.sort_by(|a, b| (order(&a.key), &a.key).cmp(&(order(&b.key), &b.key)));
        self.rows = rows;

        let shown_metric = self.metric_names.get(self.metric).cloned();
        let names: BTreeSet<String> = self
            .metrics
            .iter()
            .flatten()
            .flat_map(|m| m.keys().cloned())
            .filter(|n| n != "phase" && !crate::store::is_score(n))
            .collect();
        self.metric_names = names.into_iter().collect();
        self.metric_names
            .sort_by_key(|n| (n != "loss/total", !n.starts_with("loss/"), n.clone()));
        self.metric = shown_metric
            .and_then(|n| self.metric_names.iter().position(|m| *m == n))
            .unwrap_or(0);

        let shown_output = self.outputs.get(self.output).cloned();
        let mut all = BTreeMap::new();
        for d in self.details.iter().flatten() {
            for (name, hash) in &d.outputs {
                all.entry(name.clone()).or_insert(*hash);
            }
        }
        self.outputs = super::detail::image_outputs(&all)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        self.output = shown_output
            .and_then(|n| self.outputs.iter().position(|o| *o == n))
            .unwrap_or(0);
        self.rebuild_chart();
    }

    /// Rebuilds the overlaid chart of the chosen metric.
    pub fn rebuild_chart(&mut self) {
        let Some(name) = self.metric_names.get(self.metric) else {
            self.chart = build_chart(&[], None, self.options);
            return;
        };
        let empty: Vec<(u64, f64)> = Vec::new();
        let inputs: Vec<(String, &[(u64, f64)])> = self
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let pts = self.metrics[i]
                    .as_ref()
                    .and_then(|m| m.get(name))
                    .map_or(empty.as_slice(), Vec::as_slice);
                (format!("{} {}", letter(i), short_id(id)), pts)
            })
            .collect();
        self.chart = build_chart(&inputs, None, self.options);
    }

    /// Lines about re-runs and equal specs: whether outputs came out bit-identical.
    pub fn identity_lines(&self) -> Vec<Line<'static>> {
        let mut lines = Vec::new();
        let ok = |t: String| Span::styled(t, theme::status_style(crate::store::RunStatus::Done));
        let bad = |t: String| Span::styled(t, theme::error());
        for (i, d) in self.details.iter().enumerate() {
            let Some(d) = d else { continue };
            let Some(of) = &d.row.rerun_of else { continue };
            let target = match self.ids.iter().position(|x| x == of) {
                Some(j) => letter(j).to_string(),
                None => short_id(of).to_string(),
            };
            let verdict = match d.row.rerun_identical {
                Some(true) => ok("outputs bit-identical ✓".into()),
                Some(false) => bad("outputs differ ✗".into()),
                None => Span::styled("not compared yet", theme::dim()),
            };
            lines.push(Line::from(vec![
                Span::raw(format!("{} re-runs {target}: ", letter(i))),
                verdict,
            ]));
        }
        // Runs with the same spec: compare their outputs here.
        let mut by_spec: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, d) in self.details.iter().enumerate() {
            if let Some(d) = d {
                by_spec.entry(d.row.spec_hash.to_hex()).or_default().push(i);
            }
        }
        for group in by_spec.values().filter(|g| g.len() > 1) {
            let names: String = group
                .iter()
                .map(|&i| letter(i))
                .collect::<Vec<_>>()
                .iter()
                .map(char::to_string)
                .collect::<Vec<_>>()
                .join(" = ");
            let outs: Vec<&BTreeMap<String, BlobHash>> = group
                .iter()
                .filter_map(|&i| self.details[i].as_ref().map(|d| &d.outputs))
                .collect();
            let all: BTreeSet<&String> = outs.iter().flat_map(|o| o.keys()).collect();
            let differing: Vec<&String> = all
                .iter()
                .filter(|n| outs.windows(2).any(|w| w[0].get(**n) != w[1].get(**n)))
                .copied()
                .collect();
            let verdict = if differing.is_empty() {
                ok(format!("all {} outputs bit-identical ✓", all.len()))
            } else {
                bad(format!(
                    "{} of {} outputs differ ✗ ({})",
                    differing.len(),
                    all.len(),
                    differing
                        .iter()
                        .take(3)
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            };
            lines.push(Line::from(vec![
                Span::raw(format!("{names} same spec: ")),
                verdict,
            ]));
        }
        lines
    }
}

/// Opens the compare view on `ids`.
pub fn open(app: &mut App, ids: Vec<RunId>, fx: &mut Vec<Effect>) {
    let state = CompareState::new(ids.clone());
    app.compare = Some(state);
    app.go(View::Compare);
    for id in &ids {
        app.request_run(id, true, fx);
    }
    if let Some(c) = app.compare.as_mut() {
        c.last_poll = app.now_ms;
    }
}

/// Polls compared runs that are live.
pub fn on_tick(app: &mut App, fx: &mut Vec<Effect>) {
    let now = app.now_ms;
    let Some(c) = app.compare.as_mut() else {
        return;
    };
    if app.view != View::Compare || now.saturating_sub(c.last_poll) < RUNS_POLL_MS {
        return;
    }
    let live: Vec<RunId> = c
        .ids
        .iter()
        .zip(&c.details)
        .filter(|(_, d)| d.as_ref().is_none_or(|d| d.row.is_live()))
        .map(|(id, _)| id.clone())
        .collect();
    c.last_poll = now;
    for id in live {
        app.request_run(&id, true, fx);
    }
}

/// A detail answer (for the compare view).
pub fn on_detail(
    app: &mut App,
    id: &RunId,
    result: &Result<Box<RunDetail>, String>,
    fx: &mut Vec<Effect>,
) {
    let Some(c) = app.compare.as_mut() else {
        return;
    };
    let Some(i) = c.ids.iter().position(|x| x == id) else {
        return;
    };
    match result {
        Ok(d) => {
            c.details[i] = Some(d.clone());
            c.errors[i] = None;
        }
        Err(e) => c.errors[i] = Some(e.clone()),
    }
    c.recompute();
    ensure_images(app, fx);
}

/// A metrics answer (for the compare view).
pub fn on_metrics(app: &mut App, id: &RunId, result: &Result<Metrics, String>) {
    let Some(c) = app.compare.as_mut() else {
        return;
    };
    let Some(i) = c.ids.iter().position(|x| x == id) else {
        return;
    };
    match result {
        Ok(m) => c.metrics[i] = Some(m.clone()),
        Err(e) => c.errors[i] = Some(e.clone()),
    }
    c.recompute();
}

fn ensure_images(app: &mut App, fx: &mut Vec<Effect>) {
    let Some(c) = app.compare.as_ref() else {
        return;
    };
    let Some(name) = c.outputs.get(c.output) else {
        return;
    };
    let wanted: Vec<(ImageKey, BlobHash)> = c
        .ids
        .iter()
        .zip(&c.details)
        .filter_map(|(id, d)| {
            let hash = *d.as_ref()?.outputs.get(name)?;
            Some((ImageKey::Output(id.clone(), hash), hash))
        })
        .collect();
    for (key, image) in wanted {
        if app.images.begin(&key) {
            fx.push(Effect::Backend(Request::Image {
                key,
                image,
                masks: Vec::new(),
            }));
        }
    }
}

/// A command in the compare view.
pub fn on_cmd(app: &mut App, cmd: Cmd, fx: &mut Vec<Effect>) {
    let Some(c) = app.compare.as_mut() else {
        return;
    };
    match cmd {
        Cmd::ToggleAll => {
            c.show_all = !c.show_all;
            c.scroll = 0;
        }
        Cmd::Up => c.scroll = c.scroll.saturating_sub(1),
        Cmd::Down => c.scroll = (c.scroll + 1).min(c.visible_rows().len() as u16),
        Cmd::NextMetric | Cmd::PrevMetric => {
            let n = c.metric_names.len();
            if n > 0 {
                c.metric = if cmd == Cmd::NextMetric {
                    (c.metric + 1) % n
                } else {
                    (c.metric + n - 1) % n
                };
                c.rebuild_chart();
            }
        }
        Cmd::LogY => {
            c.options.log_y = !c.options.log_y;
            c.rebuild_chart();
        }
        Cmd::Smooth => {
            c.options.smooth = !c.options.smooth;
            c.rebuild_chart();
        }
        Cmd::PrevImage | Cmd::NextImage => {
            let n = c.outputs.len();
            if n > 0 {
                c.output = if cmd == Cmd::NextImage {
                    (c.output + 1) % n
                } else {
                    (c.output + n - 1) % n
                };
                ensure_images(app, fx);
            }
        }
        _ => {}
    }
}

/// Draws the compare view.
pub fn render(app: &mut App, area: Rect, buf: &mut Buffer) {
    let Some(c) = app.compare.as_ref() else {
        return;
    };
    let n = c.ids.len();
    let outer =
        Block::bordered().title(Line::styled(format!(" Compare {n} runs "), theme::title()));
    let inner = outer.inner(area);
    outer.render(area, buf);
    // Run legend + identity.
    let mut head: Vec<Line> = c
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let style = Style::new().fg(theme::series_color(i));
            let mut spans = vec![Span::styled(
                format!("{} {} ", letter(i), short_id(id)),
                style,
            )];
            match (&c.details[i], &c.errors[i]) {
                (_, Some(e)) => spans.push(Span::styled(e.clone(), theme::error())),
                (None, None) => spans.push(Span::styled("loading…", theme::dim())),
                (Some(d), None) => {
                    spans.push(Span::styled(
                        format!("{:<9}", d.row.status.as_str()),
                        theme::status_style(d.row.status),
                    ));
                    let mut rest =
                        format!("{} {}", d.row.kind, d.row.scene.clone().unwrap_or_default());
                    if let Some(spec) = &d.spec {
                        rest.push_str(&format!(" seed {}", spec.seed));
                    }
                    if let Some(l) = d.row.final_loss {
                        rest.push_str(&format!(" loss {}", fmt_num(l)));
                    }
                    spans.push(Span::raw(rest));
                }
            }
            Line::from(spans)
        })
        .collect();
    head.extend(c.identity_lines());
    let head_h = (head.len() as u16).min(inner.height / 3);
    let show_images = inner.height >= 24 && !c.outputs.is_empty();
    let [head_area, mid, img_area] = Layout::vertical([
        Constraint::Length(head_h),
        Constraint::Min(6),
        Constraint::Percentage(if show_images { 40 } else { 0 }),
    ])
    .areas(inner);
    Paragraph::new(head).render(head_area, buf);
    let [table_area, chart_area] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(mid);
    let visible = c.visible_rows();
    let differing = c.rows.iter().filter(|r| !r.same).count();
    let title = if c.show_all {
        format!(" Config · all {} keys ({differing} differ) ", c.rows.len())
    } else {
        format!(" Config · {differing} of {} keys differ ", c.rows.len())
    };
    let rows: Vec<Row> = visible
        .iter()
        .skip(c.scroll as usize)
        .map(|r| {
            let style = if r.same { theme::dim() } else { Style::new() };
            let mut cells = vec![Cell::from(Span::styled(
                r.key.clone(),
                if r.same {
                    theme::dim()
                } else {
                    theme::changed()
                },
            ))];
            cells.extend(
                r.values
                    .iter()
                    .map(|v| Cell::from(Span::styled(v.clone(), style))),
            );
            Row::new(cells)
        })
        .collect();
    let mut widths = vec![Constraint::Fill(2)];
    widths.extend((0..n).map(|_| Constraint::Fill(1)));
    let mut header = vec!["KEY".to_string()];
    header.extend((0..n).map(|i| letter(i).to_string()));
    Table::new(rows, widths)
        .header(Row::new(header).style(theme::dim()))
        .block(Block::bordered().title(title))
        .render(table_area, buf);
    let metric = c
        .metric_names
        .get(c.metric)
        .cloned()
        .unwrap_or_else(|| "metric".into());
    let chart_block = Block::bordered().title(format!(
        " {} ({}/{}) ",
        chart_title(&metric, &c.chart),
        c.metric + usize::from(!c.metric_names.is_empty()),
        c.metric_names.len()
    ));
    render_chart(&c.chart, chart_block, &theme::series_color, chart_area, buf);
    if !show_images {
        return;
    }
    let name = c.outputs.get(c.output).cloned().unwrap_or_default();
    let cells: Vec<(usize, RunId, Option<BlobHash>)> = c
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let h = c.details[i]
                .as_ref()
                .and_then(|d| d.outputs.get(&name).copied());
            (i, id.clone(), h)
        })
        .collect();
    let img_block = Block::bordered().title(format!(
        " Output {}/{} · {name} ",
        c.output + 1,
        c.outputs.len()
    ));
    let img_inner = img_block.inner(img_area);
    img_block.render(img_area, buf);
    let cols = Layout::horizontal(vec![Constraint::Ratio(1, n as u32); n]).split(img_inner);
    for ((i, id, hash), col) in cells.into_iter().zip(cols.iter()) {
        let [label, pic] =
            Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(*col);
        Paragraph::new(Span::styled(
            format!("{} {}", letter(i), short_id(&id)),
            Style::new().fg(theme::series_color(i)),
        ))
        .render(label, buf);
        match hash {
            Some(h) => render_image(
                &mut app.images,
                &ImageKey::Output(id, h),
                &format!("{name} {}", h.short(8)),
                pic,
                buf,
            ),
            None => Paragraph::new(Span::styled("–", theme::dim())).render(pic, buf),
        }
    }
}
