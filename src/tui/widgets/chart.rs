//! A loss chart: a ratatui `Chart` over a prepared [`ChartModel`], with phase markers and a
//! phase line under it.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, LegendPosition, Paragraph, Widget};

use crate::tui::series::ChartModel;
use crate::tui::theme;

/// Draws `model` in `block`; `color(i)` gives series `i`'s colour.
pub fn render_chart(
    model: &ChartModel,
    block: Block<'_>,
    color: &dyn Fn(usize) -> Color,
    area: Rect,
    buf: &mut Buffer,
) {
    let inner = block.inner(area);
    block.render(area, buf);
    if inner.width < 10 || inner.height < 3 {
        return;
    }
    if let Some(why) = &model.empty {
        Paragraph::new(Span::styled(why.clone(), theme::dim())).render(inner, buf);
        return;
    }
    let phase_line = !model.phases.is_empty() && inner.height >= 6;
    let [chart_area, phase_area] = Layout::vertical([
        Constraint::Min(1),
        Constraint::Length(u16::from(phase_line)),
    ])
    .areas(inner);
    let mut datasets: Vec<Dataset<'_>> = model
        .markers
        .iter()
        .map(|m| {
            Dataset::default()
                .graph_type(GraphType::Line)
                .marker(Marker::Braille)
                .style(theme::dim())
                .data(&m.points)
        })
        .collect();
    for s in &model.series {
        let style = if s.dim {
            theme::dim()
        } else {
            Style::new().fg(color(s.color))
        };
        let mut d = Dataset::default()
            .graph_type(GraphType::Line)
            .marker(Marker::Braille)
            .style(style)
            .data(&s.points);
        if let Some(name) = &s.name {
            d = d.name(name.clone());
        }
        datasets.push(d);
    }
    let x_labels: Vec<Line> = model
        .x_labels
        .iter()
        .map(|l| Line::from(l.clone()))
        .collect();
    let y_labels: Vec<Line> = model
        .y_labels
        .iter()
        .map(|l| Line::from(l.clone()))
        .collect();
    Chart::new(datasets)
        .x_axis(
            Axis::default()
                .bounds(model.x_bounds)
                .labels(x_labels)
                .style(theme::dim()),
        )
        .y_axis(
            Axis::default()
                .bounds(model.y_bounds)
                .labels(y_labels)
                .style(theme::dim()),
        )
        .legend_position(Some(LegendPosition::TopRight))
        .hidden_legend_constraints((Constraint::Ratio(1, 2), Constraint::Ratio(1, 2)))
        .render(chart_area, buf);
    if phase_line {
        let mut spans = vec![Span::styled("phases ", theme::dim())];
        for (i, p) in model.phases.iter().enumerate() {
            if i > 0 {
                spans.push(Span::styled(" │ ", theme::dim()));
            }
            spans.push(Span::raw(format!("{} {}–{}", p.name, p.start, p.end)));
        }
        Paragraph::new(Line::from(spans)).render(phase_area, buf);
    }
}

/// `loss · log-y · EMA` style chart title.
pub fn chart_title(name: &str, model: &ChartModel) -> String {
    let mut t = name.to_string();
    if model.options.log_y {
        t.push_str(" · log-y");
    }
    if model.options.smooth {
        t.push_str(" · EMA");
    }
    t
}
