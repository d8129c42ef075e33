//! Colours and styles, in one place.

use ratatui::style::{Color, Modifier, Style};

use crate::store::RunStatus;

/// Token colours (`<v0>`, `<v1>`, …) as RGB, shared by mask tints and text labels.
pub const TOKENS: [[u8; 3]; 8] = [
    [255, 99, 71],   // tomato
    [30, 144, 255],  // dodger blue
    [50, 205, 50],   // lime green
    [255, 215, 0],   // gold
    [218, 112, 214], // orchid
    [0, 206, 209],   // dark turquoise
    [255, 140, 0],   // dark orange
    [173, 255, 47],  // green yellow
];

/// RGB of token `i`.
pub fn token_rgb(i: usize) -> [u8; 3] {
    TOKENS[i % TOKENS.len()]
}

/// Terminal colour of token `i`.
pub fn token_color(i: usize) -> Color {
    let [r, g, b] = token_rgb(i);
    Color::Rgb(r, g, b)
}

/// Colours of chart series and of compared runs (A, B, …).
pub const SERIES: [Color; 8] = [
    Color::Cyan,
    Color::Yellow,
    Color::Magenta,
    Color::Green,
    Color::LightRed,
    Color::LightBlue,
    Color::White,
    Color::LightGreen,
];

/// Colour of series or run `i`.
pub fn series_color(i: usize) -> Color {
    SERIES[i % SERIES.len()]
}

/// Style of a run status.
pub fn status_style(status: RunStatus) -> Style {
    let color = match status {
        RunStatus::Queued => Color::Blue,
        RunStatus::Running => Color::Cyan,
        RunStatus::Done => Color::Green,
        RunStatus::Failed => Color::Red,
        RunStatus::Cancelled => Color::DarkGray,
        RunStatus::Interrupted => Color::Yellow,
    };
    Style::new().fg(color)
}

/// Title of a block.
pub fn title() -> Style {
    Style::new().add_modifier(Modifier::BOLD)
}

/// The selected row.
pub fn selected() -> Style {
    Style::new()
        .bg(Color::DarkGray)
        .add_modifier(Modifier::BOLD)
}

/// Keys in hints and help.
pub fn key() -> Style {
    Style::new().fg(Color::Black).bg(Color::Gray)
}

/// Secondary text.
pub fn dim() -> Style {
    Style::new().fg(Color::DarkGray)
}

/// A value changed from its preset / differing between runs.
pub fn changed() -> Style {
    Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)
}

/// Error text.
pub fn error() -> Style {
    Style::new().fg(Color::Red)
}

/// Marked runs.
pub fn marked() -> Style {
    Style::new().fg(Color::Magenta).add_modifier(Modifier::BOLD)
}

/// The focused pane's border.
pub fn focus() -> Style {
    Style::new().fg(Color::Cyan)
}
