//! One run: summary, resolved config (changed-from-preset keys highlighted), loss curves,
//! input image with tinted masks, outputs browsable with ←/→, and the log tail. Live while the
//! run is going.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Widget, Wrap};

use crate::learn::LearnConfig;
use crate::store::{format_age, format_duration, format_utc, BlobHash, RunId, RunKind, RunSpec};
use crate::tui::action::{Effect, Request};
use crate::tui::app::{run_command, short_id, App, View, OPEN_POLL_MS};
use crate::tui::backend::{stored_learn_config, Metrics, RunDetail};
use crate::tui::images::ImageKey;
use crate::tui::keymap::Cmd;
use crate::tui::series::{build_chart, group_series, metric_groups, ChartModel, ChartOptions};
use crate::tui::theme;
use crate::tui::widgets::chart::{chart_title, render_chart};
use crate::tui::widgets::image::{render_image, token_legend};

/// The panes that take the keyboard for scrolling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pane {
    /// The config list.
    #[default]
    Config,
    /// The log tail.
    Log,
}

/// One line of the config pane.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigLine {
    /// Dotted key.
    pub key: String,
    /// Value as text.
    pub value: String,
    /// Changed from the preset.
    pub changed: bool,
}

/// State of the detail view.
pub struct DetailState {
    /// The run.
    pub id: RunId,
    /// Its detail, once loaded.
    pub detail: Option<Box<RunDetail>>,
    /// Why it could not be loaded.
    pub error: Option<String>,
    /// Its metrics, once loaded.
    pub metrics: Option<Metrics>,
    /// Why they could not be loaded.
    pub metrics_error: Option<String>,
    /// Chart groups (`loss`, `leak`, `lr`, …).
    pub groups: Vec<String>,
    /// The group shown.
    pub group: usize,
    /// The chart, prepared.
    pub chart: ChartModel,
    /// Chart options.
    pub options: ChartOptions,
    /// The pane `j`/`k` scroll.
    pub focus: Pane,
    /// First config line shown.
    pub config_scroll: u16,
    /// Log lines scrolled up from the end.
    pub log_scroll: u16,
    /// The config, resolved.
    pub config: Vec<ConfigLine>,
    /// Image outputs in browsing order.
    pub outputs: Vec<(String, BlobHash)>,
    /// The output shown.
    pub output: usize,
    /// When the run was last polled.
    pub last_poll: u64,
}

impl DetailState {
    fn new(id: RunId) -> Self {
        DetailState {
            id,
            detail: None,
            error: None,
            metrics: None,
            metrics_error: None,
            groups: Vec::new(),
            group: 0,
            chart: ChartModel::default(),
            options: ChartOptions::default(),
            focus: Pane::default(),
            config_scroll: 0,
            log_scroll: 0,
            config: Vec::new(),
            outputs: Vec::new(),
            output: 0,
            last_poll: 0,
        }
    }

    /// Rebuilds the chart from the metrics and options.
    pub fn rebuild_chart(&mut self) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        self.groups = metric_groups(metrics);
        self.group = self.group.min(self.groups.len().saturating_sub(1));
        let group = self.groups.get(self.group).cloned().unwrap_or_default();
        let inputs: Vec<(String, &[(u64, f64)])> = group_series(metrics, &group)
            .into_iter()
            .map(|(n, p)| (n.to_string(), p))
            .collect();
        let phase = metrics.get("phase").map(Vec::as_slice);
        self.chart = build_chart(&inputs, phase, self.options);
    }

    fn is_live(&self) -> bool {
        self.detail.as_ref().is_none_or(|d| d.row.is_live())
    }
}

/// Opens run `id`.
pub fn open(app: &mut App, id: RunId, fx: &mut Vec<Effect>) {
    if app.detail.as_ref().is_none_or(|d| d.id != id) {
        app.detail = Some(DetailState::new(id.clone()));
    }
    if let Some(d) = app.detail.as_mut() {
        d.last_poll = app.now_ms;
    }
    app.go(View::Detail);
    app.request_run(&id, true, fx);
    ensure_images(app, fx);
}

/// Polls the open run while it is live.
pub fn on_tick(app: &mut App, fx: &mut Vec<Effect>) {
    let now = app.now_ms;
    let Some(d) = app.detail.as_mut() else {
        return;
    };
    if app.view == View::Detail && d.is_live() && now.saturating_sub(d.last_poll) >= OPEN_POLL_MS {
        d.last_poll = now;
        let id = d.id.clone();
        app.request_run(&id, true, fx);
    }
}

/// PNG outputs in browsing order: previews and samples first, class images last.
pub fn image_outputs(
    outputs: &std::collections::BTreeMap<String, BlobHash>,
) -> Vec<(String, BlobHash)> {
    let mut list: Vec<(String, BlobHash)> = outputs
        .iter()
        .filter(|(n, _)| n.ends_with(".png"))
        .map(|(n, h)| (n.clone(), *h))
        .collect();
    let rank = |n: &str| {
        if n == "preview.png" {
            0
        } else if n.starts_with("sample") {
            1
        } else if n.starts_with("class/") {
            3
        } else {
            2
        }
    };
    list.sort_by(|a, b| (rank(&a.0), &a.0).cmp(&(rank(&b.0), &b.0)));
    list
}

/// A detail answer (for the detail view).
pub fn on_detail(
    app: &mut App,
    id: &RunId,
    result: &Result<Box<RunDetail>, String>,
    fx: &mut Vec<Effect>,
) {
    let Some(d) = app.detail.as_mut().filter(|d| d.id == *id) else {
        return;
    };
    match result {
        Ok(detail) => {
            let shown = d.outputs.get(d.output).map(|o| o.0.clone());
            d.outputs = image_outputs(&detail.outputs);
            d.output = shown
                .and_then(|name| d.outputs.iter().position(|o| o.0 == name))
                .unwrap_or(0);
            d.config = detail.spec.as_ref().map(config_lines).unwrap_or_default();
            d.detail = Some(detail.clone());
            d.error = None;
        }
        Err(e) => d.error = Some(e.clone()),
    }
    ensure_images(app, fx);
}

/// A metrics answer (for the detail view).
pub fn on_metrics(app: &mut App, id: &RunId, result: &Result<Metrics, String>) {
    let Some(d) = app.detail.as_mut().filter(|d| d.id == *id) else {
        return;
    };
    match result {
        Ok(m) => {
            d.metrics = Some(m.clone());
            d.metrics_error = None;
            d.rebuild_chart();
        }
        Err(e) => d.metrics_error = Some(e.clone()),
    }
}

/// Asks for the input image (masks tinted) and the output shown, when not asked yet.
fn ensure_images(app: &mut App, fx: &mut Vec<Effect>) {
    let Some(d) = app.detail.as_ref() else {
        return;
    };
    let Some(detail) = &d.detail else {
        return;
    };
    let mut wanted = Vec::new();
    if let Some(spec) = &detail.spec {
        if let Some(image) = spec.inputs.get("image") {
            wanted.push((ImageKey::Input(d.id.clone()), *image, mask_hashes(spec)));
        }
    }
    if let Some((_, hash)) = d.outputs.get(d.output) {
        wanted.push((ImageKey::Output(d.id.clone(), *hash), *hash, Vec::new()));
    }
    for (key, image, masks) in wanted {
        if app.images.begin(&key) {
            fx.push(Effect::Backend(Request::Image { key, image, masks }));
        }
    }
}

/// `mask0`, `mask1`, … blobs of a spec, in token order.
pub fn mask_hashes(spec: &RunSpec) -> Vec<BlobHash> {
    (0..)
        .map_while(|i| spec.inputs.get(&format!("mask{i}")).copied())
        .collect()
}

fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), value_text(other))),
    }
}

/// The config pane's lines: every key of the spec's config, flattened; for learning runs the
/// keys changed from the run's preset are marked.
pub fn config_lines(spec: &RunSpec) -> Vec<ConfigLine> {
    let mut flat = Vec::new();
    flatten("", &spec.config, &mut flat);
    let changed: Vec<String> = match (spec.kind, stored_learn_config(spec)) {
        (RunKind::Learn, Ok((preset, _, cfg))) => LearnConfig::preset(&preset)
            .map(|base| crate::config::changed_keys(&base, &cfg))
            .unwrap_or_default()
            .into_iter()
            .map(|k| format!("learn.{k}"))
            .collect(),
        _ => Vec::new(),
    };
    // Changed keys first, then the rest in key order.
    let mut lines: Vec<ConfigLine> = flat
        .into_iter()
        .map(|(key, value)| ConfigLine {
            changed: changed.contains(&key),
            key,
            value,
        })
        .collect();
    lines.sort_by_key(|l| {
        (
            !l.changed,
            l.key != "preset",
            l.key != "dtype",
            l.key.clone(),
        )
    });
    lines
}

/// A command in the detail view.
pub fn on_cmd(app: &mut App, cmd: Cmd, fx: &mut Vec<Effect>) {
    let Some(d) = app.detail.as_mut() else {
        return;
    };
    match cmd {
        Cmd::FocusNext => {
            d.focus = match d.focus {
                Pane::Config => Pane::Log,
                Pane::Log => Pane::Config,
            }
        }
        Cmd::Up | Cmd::Down => {
            let up = cmd == Cmd::Up;
            match d.focus {
                Pane::Config => {
                    d.config_scroll = if up {
                        d.config_scroll.saturating_sub(1)
                    } else {
                        (d.config_scroll + 1).min(d.config.len() as u16)
                    }
                }
                Pane::Log => {
                    let lines = d.detail.as_ref().map_or(0, |x| x.log_tail.len()) as u16;
                    d.log_scroll = if up {
                        (d.log_scroll + 1).min(lines)
                    } else {
                        d.log_scroll.saturating_sub(1)
                    }
                }
            }
        }
        Cmd::LogY => {
            d.options.log_y = !d.options.log_y;
            d.rebuild_chart();
        }
        Cmd::Smooth => {
            d.options.smooth = !d.options.smooth;
            d.rebuild_chart();
        }
        Cmd::NextMetric if !d.groups.is_empty() => {
            d.group = (d.group + 1) % d.groups.len();
            d.rebuild_chart();
        }
        Cmd::PrevImage | Cmd::NextImage => {
            let n = d.outputs.len();
            if n > 0 {
                d.output = if cmd == Cmd::NextImage {
                    (d.output + 1) % n
                } else {
                    (d.output + n - 1) % n
                };
                ensure_images(app, fx);
            }
        }
        Cmd::Tag
        | Cmd::Delete
        | Cmd::Rerun
        | Cmd::EditRerun
        | Cmd::Cancel
        | Cmd::Resume
        | Cmd::Synth => {
            let id = d.id.clone();
            run_command(app, cmd, vec![id], fx);
        }
        _ => {}
    }
}

/// Rows `text` takes when word-wrapped to `width` columns (long words broken).
fn wrapped_rows(text: &str, width: usize) -> usize {
    let mut rows = 1;
    let mut col = 0usize;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let len = word.chars().count();
        if col > 0 && col + 1 + len <= width {
            col += 1 + len;
            continue;
        }
        if col > 0 {
            rows += 1;
        }
        col = len;
        while col > width {
            rows += 1;
            col -= width;
        }
    }
    rows
}

fn summary_lines(app: &App, d: &DetailState, detail: &RunDetail) -> Vec<Line<'static>> {
    let row = &detail.row;
    let now = app.now_ms;
    let label = |k: &str| Span::styled(format!("{k:<9}"), theme::dim());
    let mut lines = Vec::new();
    let mut status = vec![
        label("status"),
        Span::styled(
            row.status.as_str().to_string(),
            theme::status_style(row.status),
        ),
    ];
    if let Some(p) = &row.progress {
        status.push(Span::raw(format!(
            " {:.0}% step {}/{}",
            p.fraction() * 100.0,
            p.step,
            p.total
        )));
        if let Some(ph) = &p.phase {
            status.push(Span::raw(format!(" {ph}")));
        }
        if let (Some(start), true) = (row.started_ms, p.step > 0) {
            let elapsed = now.saturating_sub(start);
            let eta = elapsed as f64 / p.step as f64 * p.total.saturating_sub(p.step) as f64;
            status.push(Span::styled(
                format!(" ETA {}", format_duration(eta as u64)),
                theme::dim(),
            ));
        }
    } else if let (Some(s), Some(f)) = (row.started_ms, row.finished_ms) {
        status.push(Span::raw(format!(
            " in {}",
            format_duration(f.saturating_sub(s))
        )));
    }
    lines.push(Line::from(status));
    if let Some(e) = &detail.error {
        lines.push(Line::from(vec![
            label("error"),
            Span::styled(e.clone(), theme::error()),
        ]));
    }
    lines.push(Line::from(vec![
        label("created"),
        Span::raw(format!(
            "{} ({} ago)",
            format_utc(row.created_ms),
            format_age(now.saturating_sub(row.created_ms))
        )),
    ]));
    if let Some(spec) = &detail.spec {
        lines.push(Line::from(vec![
            label("seed"),
            Span::raw(spec.seed.to_string()),
        ]));
        let inputs: Vec<String> = spec
            .inputs
            .iter()
            .map(|(n, h)| format!("{n} {}", h.short(8)))
            .collect();
        lines.push(Line::from(vec![
            label("inputs"),
            Span::raw(inputs.join(", ")),
        ]));
        lines.push(Line::from(vec![
            label("model"),
            Span::raw(format!(
                "{} · {}",
                spec.model_fingerprint.short(12),
                spec.code_version
            )),
        ]));
    } else if let Some(e) = &detail.spec_error {
        lines.push(Line::from(vec![
            label("spec"),
            Span::styled(e.clone(), theme::error()),
        ]));
    }
    if !row.device.is_empty() {
        lines.push(Line::from(vec![
            label("device"),
            Span::raw(format!("{} on {}", row.device, detail.host)),
        ]));
    }
    if let Some(p) = &row.parent {
        lines.push(Line::from(vec![
            label("parent"),
            Span::raw(short_id(p).to_string()),
        ]));
    }
    if let Some(of) = &row.rerun_of {
        let same = match row.rerun_identical {
            Some(true) => Span::styled(
                " outputs bit-identical ✓",
                theme::status_style(crate::store::RunStatus::Done),
            ),
            Some(false) => Span::styled(" outputs differ ✗", theme::error()),
            None => Span::styled(" (compared when it finishes)", theme::dim()),
        };
        lines.push(Line::from(vec![
            label("re-run of"),
            Span::raw(short_id(of).to_string()),
            same,
        ]));
    }
    if !row.tags.is_empty() {
        let tags: Vec<String> = row.tags.iter().map(|t| format!("#{t}")).collect();
        lines.push(Line::from(vec![label("tags"), Span::raw(tags.join(" "))]));
    }
    lines.push(Line::from(vec![
        label("outputs"),
        Span::raw(format!(
            "{} ({} images)",
            detail.outputs.len(),
            d.outputs.len()
        )),
    ]));
    // Evaluation scores (`mifo eval`), when the run has them.
    if let Some(metrics) = &d.metrics {
        let scores: std::collections::BTreeMap<String, f64> = metrics
            .iter()
            .filter(|(n, _)| n.starts_with(crate::eval::METRIC_PREFIX))
            .filter_map(|(n, p)| p.last().map(|&(_, v)| (n.clone(), v)))
            .collect();
        if crate::eval::table::headline(&scores).is_some() {
            let cell = |k: &str| {
                scores
                    .get(k)
                    .map_or_else(|| "–".to_string(), |v| format!("{v:.3}"))
            };
            let pairs =
                crate::eval::table::HEADLINE.map(|(label, k)| format!("{label} {}", cell(k)));
            lines.push(Line::from(vec![
                label("eval"),
                Span::raw(format!("{}  {}", pairs[0], pairs[1])),
            ]));
            lines.push(Line::from(vec![
                label(""),
                Span::raw(format!("{}  {}", pairs[2], pairs[3])),
            ]));
        }
        // The world oracle's scores (`mifo world score`).
        let oracle: std::collections::BTreeMap<String, f64> = metrics
            .iter()
            .filter(|(n, _)| n.starts_with(crate::world::ORACLE_PREFIX))
            .filter_map(|(n, p)| p.last().map(|&(_, v)| (n.clone(), v)))
            .collect();
        for (i, line) in crate::world::oracle::score_lines(&oracle)
            .into_iter()
            .enumerate()
        {
            let text = line.trim_start_matches("oracle").trim().to_string();
            lines.push(Line::from(vec![
                label(if i == 0 { "oracle" } else { "" }),
                Span::raw(text),
            ]));
        }
    }
    lines
}

/// Draws the detail view.
pub fn render(app: &mut App, area: Rect, buf: &mut Buffer) {
    let Some(d) = app.detail.as_ref() else {
        return;
    };
    let title = match &d.detail {
        Some(x) => format!(
            " Run {} · {} · {} {} ",
            d.id,
            x.row.kind,
            x.row.status,
            x.row.scene.clone().unwrap_or_default()
        ),
        None => format!(" Run {} ", d.id),
    };
    let outer = Block::bordered().title(Line::styled(title, theme::title()));
    let inner = outer.inner(area);
    outer.render(area, buf);
    let Some(detail) = d.detail.clone() else {
        let text = match &d.error {
            Some(e) => Span::styled(format!("cannot load the run: {e}"), theme::error()),
            None => Span::styled("loading…", theme::dim()),
        };
        Paragraph::new(text).render(inner, buf);
        return;
    };
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(36), Constraint::Percentage(64)]).areas(inner);
    // Left: summary over config.
    let summary = summary_lines(app, d, &detail);
    let text_w = left.width.saturating_sub(2).max(1) as usize;
    let rows: usize = summary
        .iter()
        .map(|l| {
            let text: String = l.spans.iter().map(|s| s.content.as_ref()).collect();
            wrapped_rows(&text, text_w)
        })
        .sum();
    let summary_h = (rows as u16 + 2).min(left.height / 2);
    let [sum_area, cfg_area] =
        Layout::vertical([Constraint::Length(summary_h), Constraint::Min(0)]).areas(left);
    Paragraph::new(summary)
        .wrap(Wrap { trim: true })
        .block(Block::bordered().title(" Summary "))
        .render(sum_area, buf);
    let focus_style = |p: Pane| {
        if d.focus == p {
            theme::focus()
        } else {
            Style::new()
        }
    };
    let changed = d.config.iter().filter(|l| l.changed).count();
    let cfg_lines: Vec<Line> = d
        .config
        .iter()
        .map(|l| {
            let (mark, style) = if l.changed {
                ("*", theme::changed())
            } else {
                (" ", Style::new())
            };
            Line::from(vec![
                Span::styled(format!("{mark}{} ", l.key), style),
                Span::styled(
                    l.value.clone(),
                    if l.changed { style } else { theme::dim() },
                ),
            ])
        })
        .collect();
    Paragraph::new(cfg_lines)
        .scroll((d.config_scroll, 0))
        .block(
            Block::bordered()
                .border_style(focus_style(Pane::Config))
                .title(format!(" Config · {changed} changed from preset (*) ")),
        )
        .render(cfg_area, buf);

    // Right: chart, images, log.
    let show_images = right.height >= 20;
    let [chart_area, img_area, log_area] = Layout::vertical([
        Constraint::Percentage(if show_images { 42 } else { 65 }),
        Constraint::Percentage(if show_images { 38 } else { 0 }),
        Constraint::Min(3),
    ])
    .areas(right);
    let group = d
        .groups
        .get(d.group)
        .cloned()
        .unwrap_or_else(|| "metrics".into());
    let chart_block = Block::bordered().title(format!(
        " {} ({}/{}) ",
        chart_title(&group, &d.chart),
        d.group + usize::from(!d.groups.is_empty()),
        d.groups.len()
    ));
    match (&d.metrics, &d.metrics_error) {
        (_, Some(e)) => Paragraph::new(Span::styled(e.clone(), theme::error()))
            .block(chart_block)
            .render(chart_area, buf),
        (None, None) => Paragraph::new(Span::styled("loading metrics…", theme::dim()))
            .block(chart_block)
            .render(chart_area, buf),
        (Some(_), None) => {
            render_chart(&d.chart, chart_block, &theme::series_color, chart_area, buf)
        }
    }
    let log_lines: Vec<Line> = {
        let h = log_area.height.saturating_sub(2) as usize;
        let total = detail.log_tail.len();
        let end = total.saturating_sub(d.log_scroll as usize);
        let start = end.saturating_sub(h);
        detail.log_tail[start..end]
            .iter()
            .map(|l| Line::raw(l.clone()))
            .collect()
    };
    Paragraph::new(log_lines)
        .block(
            Block::bordered()
                .border_style(focus_style(Pane::Log))
                .title(format!(" Log · {} lines ", detail.log_lines)),
        )
        .render(log_area, buf);
    if !show_images {
        return;
    }
    let id = d.id.clone();
    let masks = detail.spec.as_ref().map_or(0, |s| mask_hashes(s).len());
    let has_input = detail
        .spec
        .as_ref()
        .is_some_and(|s| s.inputs.contains_key("image"));
    let output = d.outputs.get(d.output).cloned();
    let n_out = d.outputs.len();
    let out_index = d.output;
    let [in_area, out_area] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
            .areas(img_area);
    let in_block = Block::bordered().title(" Input · masks ");
    let in_inner = in_block.inner(in_area);
    in_block.render(in_area, buf);
    if has_input {
        let [pic, legend] =
            Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(in_inner);
        render_image(
            &mut app.images,
            &ImageKey::Input(id.clone()),
            "input image",
            pic,
            buf,
        );
        Paragraph::new(token_legend(masks)).render(legend, buf);
    } else {
        Paragraph::new(Span::styled("no input image", theme::dim())).render(in_inner, buf);
    }
    let out_title = match &output {
        Some((name, _)) => format!(" Output {}/{} · {} ", out_index + 1, n_out, name),
        None => " Outputs ".into(),
    };
    let out_block = Block::bordered().title(out_title);
    let out_inner = out_block.inner(out_area);
    out_block.render(out_area, buf);
    match output {
        Some((name, hash)) => render_image(
            &mut app.images,
            &ImageKey::Output(id, hash),
            &format!("{name} {}", hash.short(8)),
            out_inner,
            buf,
        ),
        None => Paragraph::new(Span::styled("no image outputs yet", theme::dim()))
            .render(out_inner, buf),
    }
}

#[cfg(test)]
mod tests {
    use super::wrapped_rows;

    #[test]
    fn wrapped_rows_counts_word_wrapped_lines() {
        assert_eq!(wrapped_rows("", 10), 1);
        assert_eq!(wrapped_rows("abc def", 7), 1);
        assert_eq!(wrapped_rows("abc defg", 7), 2);
        assert_eq!(wrapped_rows("inputs   image 1, mask0 2, mask1 3", 20), 2);
        assert_eq!(wrapped_rows("abcdefghijklmnopqrstu", 10), 3);
    }
}
