//! The key-hint bar at the bottom, generated from the keymap.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Widget};

use crate::tui::theme;

/// Draws `key desc` pairs on one line, as many as fit.
pub fn render_hints(hints: &[(&str, &str)], area: Rect, buf: &mut Buffer) {
    let mut spans = Vec::new();
    let mut width = 0usize;
    for (key, desc) in hints {
        let w = key.chars().count() + desc.chars().count() + 3;
        if width + w > area.width as usize {
            break;
        }
        width += w;
        spans.push(Span::styled(format!(" {key} "), theme::key()));
        spans.push(Span::raw(format!("{desc} ")));
    }
    Paragraph::new(Line::from(spans)).render(area, buf);
}
