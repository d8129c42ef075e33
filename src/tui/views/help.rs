//! The `?` help, generated from the keymap.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Clear, Paragraph, Widget};

use crate::tui::keymap::help_sections;
use crate::tui::theme;
use crate::tui::widgets::popup::centered;

/// The help lines.
pub fn help_lines() -> Vec<Line<'static>> {
    let mut lines = Vec::new();
    for (title, bindings) in help_sections() {
        lines.push(Line::styled(title, theme::title()));
        for (keys, desc) in bindings {
            lines.push(Line::from(vec![
                Span::styled(format!("  {keys:<10}"), theme::changed()),
                Span::raw(desc),
            ]));
        }
        lines.push(Line::raw(""));
    }
    lines.push(Line::styled(
        "Filter: text, status:running, kind:synth, tag:x, !negated (all must match)",
        theme::dim(),
    ));
    lines
}

/// Draws the help popup scrolled by `scroll` lines.
pub fn render(scroll: u16, area: Rect, buf: &mut Buffer) {
    let lines = help_lines();
    let rect = centered(area, 64, area.height.saturating_sub(2));
    Clear.render(rect, buf);
    let max = (lines.len() as u16).saturating_sub(rect.height.saturating_sub(2));
    Paragraph::new(lines)
        .scroll((scroll.min(max), 0))
        .block(
            Block::bordered()
                .border_type(BorderType::Rounded)
                .border_style(theme::focus())
                .title(" Keys · j/k scroll · any other key closes "),
        )
        .render(rect, buf);
}
