//! Popups: a centred box with text (confirmations, the tag prompt, messages).

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::Line;
use ratatui::widgets::{Block, BorderType, Clear, Paragraph, Widget, Wrap};

use crate::tui::theme;

/// A rectangle of at most `width` × `height` centred in `area`.
pub fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

/// Draws a titled popup holding `lines`, sized to them (up to `area`).
pub fn render_popup(title: &str, lines: Vec<Line<'_>>, area: Rect, buf: &mut Buffer) {
    let width = lines
        .iter()
        .map(|l| l.width() as u16)
        .max()
        .unwrap_or(0)
        .max(title.chars().count() as u16 + 4)
        .saturating_add(4)
        .min(area.width.saturating_sub(4).max(20));
    let height = (lines.len() as u16).saturating_add(2);
    let rect = centered(area, width, height);
    Clear.render(rect, buf);
    let block = Block::bordered()
        .border_type(BorderType::Rounded)
        .border_style(theme::focus())
        .title(Line::styled(format!(" {title} "), theme::title()));
    Paragraph::new(lines)
        .wrap(Wrap { trim: false })
        .block(block)
        .render(rect, buf);
}
