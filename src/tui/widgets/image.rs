//! An image pane: draws an [`ImageSlot`] with ratatui-image's `StatefulImage` (resize work goes
//! to the image thread), token labels over tinted inputs, and text while it loads.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, StatefulWidget, Widget, Wrap};
use ratatui_image::protocol::StatefulProtocolType;
use ratatui_image::{FilterType, Resize, StatefulImage};

use crate::tui::images::{ImageCache, ImageKey, SlotState};
use crate::tui::theme;

/// How images are fitted to their pane: scaled (up or down) to fit, keeping proportions.
pub fn fit() -> Resize {
    Resize::Scale(Some(FilterType::Triangle))
}

/// Draws image `key` into `area`; `alt` is the text shown when images are off.
pub fn render_image(
    cache: &mut ImageCache,
    key: &ImageKey,
    alt: &str,
    area: Rect,
    buf: &mut Buffer,
) {
    if area.width == 0 || area.height == 0 {
        return;
    }
    let text = |t: String, style: Style, buf: &mut Buffer| {
        Paragraph::new(Span::styled(t, style))
            .wrap(Wrap { trim: true })
            .render(area, buf);
    };
    if !cache.enabled {
        text(format!("[image] {alt}"), theme::dim(), buf);
        return;
    }
    let frame = cache.frame;
    let Some(slot) = cache.slots.get_mut(key) else {
        text("…".into(), theme::dim(), buf);
        return;
    };
    slot.last_used = frame;
    match &mut slot.state {
        SlotState::Loading => text("loading…".into(), theme::dim(), buf),
        SlotState::Failed(e) => text(e.clone(), theme::error(), buf),
        SlotState::Ready {
            protocol,
            labels,
            error,
            ..
        } => {
            if let Some(e) = error {
                text(format!("cannot draw: {e}"), theme::error(), buf);
                return;
            }
            StatefulImage::new()
                .resize(fit())
                .render(area, buf, protocol.as_mut());
            if protocol.is_pending() {
                text("rendering…".into(), theme::dim(), buf);
                return;
            }
            // Labels over the cells only where the image is made of cells (halfblocks): over
            // kitty/sixel/iTerm2 graphics, text would be hidden or would erase the image.
            let halfblocks = matches!(
                protocol.protocol_type(),
                Some(StatefulProtocolType::Halfblocks(_))
            );
            if !halfblocks || labels.is_empty() {
                return;
            }
            let Some(size) = protocol.size_for(fit(), area.into()) else {
                return;
            };
            for label in labels.iter() {
                let w = label.text.chars().count() as u16;
                let cx = area.x + (label.centroid.0 * f32::from(size.width)) as u16;
                let cy = area.y + (label.centroid.1 * f32::from(size.height)) as u16;
                let x = cx.saturating_sub(w / 2).max(area.x);
                let x = x.min(area.right().saturating_sub(w));
                let y = cy.min(area.bottom().saturating_sub(1));
                let style = Style::new()
                    .fg(Color::Black)
                    .bg(theme::token_color(label.index));
                buf.set_string(x, y, &label.text, style);
            }
        }
    }
}

/// The cells image `key` takes when drawn into `area` (top-left aligned), once it is ready.
pub fn image_area(cache: &ImageCache, key: &ImageKey, area: Rect) -> Option<Rect> {
    match &cache.slots.get(key)?.state {
        SlotState::Ready { protocol, .. } => {
            let size = protocol.size_for(fit(), area.into())?;
            Some(Rect::new(
                area.x,
                area.y,
                size.width.min(area.width),
                size.height.min(area.height),
            ))
        }
        _ => None,
    }
}

/// A legend line of token colours: `■ <v0>  ■ <v1>`.
pub fn token_legend(count: usize) -> Line<'static> {
    let mut spans = Vec::new();
    for i in 0..count {
        spans.push(Span::styled("■ ", Style::new().fg(theme::token_color(i))));
        spans.push(Span::raw(format!("<v{i}>  ")));
    }
    Line::from(spans)
}
