//! Reusable widgets: text input, loss chart, image pane, key hints, popups.

pub mod chart;
pub mod hints;
pub mod image;
pub mod input;
pub mod popup;
