//! Images in the workbench: the protocol choice, decoding and mask tinting (off the UI thread),
//! and image slots whose resize/encode work is sent to a worker instead of blocking a frame.
//!
//! Flow: the app asks for an image ([`super::action::Request::Image`]); the worker fetches the
//! blobs from the backend and [`prepare_image`] decodes, tints and wraps them in a
//! `StatefulProtocol` (image thread); the app keeps it in an [`ImageSlot`]. When a frame finds
//! that the slot needs a resize for its area, [`KeyedProtocol`] sends a [`ResizeJob`] to the image
//! thread rather than encoding inline, draws a placeholder, and the encoded protocol comes back
//! as [`super::Action::ImageResized`].

use std::collections::HashMap;
use std::sync::mpsc::Sender;

use anyhow::{anyhow, Result};
use image::{imageops::FilterType, DynamicImage, GrayImage, Rgb, RgbImage};
use ratatui::buffer::Buffer;
use ratatui::layout::{Rect, Size};
use ratatui_image::picker::{Picker, ProtocolType};
use ratatui_image::protocol::StatefulProtocol;
use ratatui_image::{Resize, ResizeEncodeRender};

use crate::store::RunId;

use super::theme::token_rgb;

/// `--image-protocol`: how images are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageMode {
    /// Ask the terminal (kitty / sixel / iTerm2), else halfblocks.
    #[default]
    Auto,
    /// Kitty graphics protocol.
    Kitty,
    /// Sixel.
    Sixel,
    /// iTerm2 inline images.
    Iterm2,
    /// Unicode half blocks (works everywhere: tmux, plain SSH).
    Halfblocks,
    /// No images: a line of text (name, size) instead.
    Off,
}

impl std::str::FromStr for ImageMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => ImageMode::Auto,
            "kitty" => ImageMode::Kitty,
            "sixel" => ImageMode::Sixel,
            "iterm2" => ImageMode::Iterm2,
            "halfblocks" => ImageMode::Halfblocks,
            "off" => ImageMode::Off,
            o => {
                return Err(format!(
                    "unknown image protocol `{o}` (auto, kitty, sixel, iterm2, halfblocks, off)"
                ))
            }
        })
    }
}

impl ImageMode {
    /// The picker for this mode. `Auto` and the forced graphics protocols query the terminal
    /// (stdio) once for its font size; call it after entering the alternate screen and before
    /// reading input. `None` for `Off`.
    pub fn picker(self) -> Option<Picker> {
        let query = || Picker::from_query_stdio().unwrap_or_else(|_| Picker::halfblocks());
        match self {
            ImageMode::Off => None,
            ImageMode::Halfblocks => Some(Picker::halfblocks()),
            ImageMode::Auto => Some(query()),
            forced => {
                let mut p = query();
                p.set_protocol_type(match forced {
                    ImageMode::Kitty => ProtocolType::Kitty,
                    ImageMode::Sixel => ProtocolType::Sixel,
                    _ => ProtocolType::Iterm2,
                });
                Some(p)
            }
        }
    }
}

/// Which image a slot holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ImageKey {
    /// A run's input image with its masks tinted.
    Input(RunId),
    /// A run's output image (by content).
    Output(RunId, crate::store::BlobHash),
}

/// A token's label on a tinted input image.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLabel {
    /// `<v0>`, `<v1>`, …
    pub text: String,
    /// Centre of the mask in `[0, 1]` image coordinates.
    pub centroid: (f32, f32),
    /// Token index (its colour).
    pub index: usize,
}

/// A decoded image ready to be sized for an area.
pub struct PreparedImage {
    /// The protocol state (not yet encoded for any area).
    pub protocol: StatefulProtocol,
    /// Source width in pixels.
    pub width: u32,
    /// Source height in pixels.
    pub height: u32,
    /// Token labels (tinted inputs only).
    pub labels: Vec<TokenLabel>,
}

/// Longest side kept before encoding (enough for any terminal pane, and fast to resize).
pub const MAX_SIDE: u32 = 768;

/// Decodes `image` (PNG or JPEG bytes), tints and outlines each mask in its token's colour,
/// and wraps the result for `picker`'s protocol.
pub fn prepare_image(image: &[u8], masks: &[Vec<u8>], picker: &Picker) -> Result<PreparedImage> {
    let base = image::load_from_memory(image).map_err(|e| anyhow!("cannot decode image: {e}"))?;
    let (width, height) = (base.width(), base.height());
    let mut rgb = base.to_rgb8();
    let mut labels = Vec::new();
    for (i, bytes) in masks.iter().enumerate() {
        let mask = image::load_from_memory(bytes)
            .map_err(|e| anyhow!("cannot decode mask {i}: {e}"))?
            .to_luma8();
        let mask = if mask.dimensions() != rgb.dimensions() {
            image::imageops::resize(&mask, rgb.width(), rgb.height(), FilterType::Nearest)
        } else {
            mask
        };
        if let Some(centroid) = tint_mask(&mut rgb, &mask, token_rgb(i)) {
            labels.push(TokenLabel {
                text: format!("<v{i}>"),
                centroid,
                index: i,
            });
        }
    }
    let mut img = DynamicImage::ImageRgb8(rgb);
    if width.max(height) > MAX_SIDE {
        img = img.resize(MAX_SIDE, MAX_SIDE, FilterType::Triangle);
    }
    Ok(PreparedImage {
        protocol: picker.new_resize_protocol(img),
        width,
        height,
        labels,
    })
}

/// Tints the pixels of `mask` (> 127) in `color` and draws its outline; returns the mask's
/// centroid in `[0, 1]` coordinates (`None` for an empty mask).
pub fn tint_mask(img: &mut RgbImage, mask: &GrayImage, color: [u8; 3]) -> Option<(f32, f32)> {
    let (w, h) = img.dimensions();
    let inside = |x: i64, y: i64| {
        x >= 0
            && y >= 0
            && (x as u32) < w
            && (y as u32) < h
            && mask.get_pixel(x as u32, y as u32).0[0] > 127
    };
    let radius = (w.max(h) / 160).max(1) as i64;
    let (mut sx, mut sy, mut n) = (0f64, 0f64, 0u64);
    let mut edge = vec![false; (w * h) as usize];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            if !inside(x, y) {
                continue;
            }
            sx += x as f64;
            sy += y as f64;
            n += 1;
            let border =
                !(inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1));
            if border {
                for dy in -radius..=radius {
                    for dx in -radius..=radius {
                        if inside(x + dx, y + dy) {
                            edge[((y + dy) as u32 * w + (x + dx) as u32) as usize] = true;
                        }
                    }
                }
            }
        }
    }
    if n == 0 {
        return None;
    }
    for y in 0..h {
        for x in 0..w {
            if !inside(x as i64, y as i64) {
                continue;
            }
            let p = img.get_pixel_mut(x, y);
            if edge[(y * w + x) as usize] {
                *p = Rgb(color);
            } else {
                for (v, c) in p.0.iter_mut().zip(color) {
                    *v = ((*v as u16 * 11 + c as u16 * 9) / 20) as u8;
                }
            }
        }
    }
    Some((
        (sx / n as f64 / w as f64) as f32,
        (sy / n as f64 / h as f64) as f32,
    ))
}

/// A resize/encode to do off the UI thread.
pub struct ResizeJob {
    /// The slot it is for.
    pub key: ImageKey,
    /// The protocol to resize (taken out of the slot meanwhile).
    pub protocol: StatefulProtocol,
    /// How to fit it.
    pub resize: Resize,
    /// The area in cells.
    pub size: Size,
}

impl ResizeJob {
    /// Does the work; returns the action that puts the protocol back.
    pub fn run(mut self) -> super::Action {
        self.protocol.resize_encode(&self.resize, self.size);
        let error = match self.protocol.last_encoding_result() {
            Some(Err(e)) => Some(e.to_string()),
            _ => None,
        };
        super::Action::ImageResized {
            key: self.key,
            protocol: self.protocol,
            error,
        }
    }
}

/// The state a `StatefulImage` renders: a protocol that sends its resize work away, keyed by
/// slot, and draws nothing while it is away.
pub struct KeyedProtocol {
    key: ImageKey,
    inner: Option<StatefulProtocol>,
    tx: Option<Sender<ResizeJob>>,
}

impl KeyedProtocol {
    /// Whether the protocol is away being resized.
    pub fn is_pending(&self) -> bool {
        self.inner.is_none()
    }

    /// The protocol kind, when not away.
    pub fn protocol_type(&self) -> Option<&ratatui_image::protocol::StatefulProtocolType> {
        self.inner.as_ref().map(|p| p.protocol_type())
    }

    /// The area (in cells) the image takes inside `area` once fitted.
    pub fn size_for(&self, resize: Resize, area: Size) -> Option<Size> {
        self.inner.as_ref().map(|p| p.size_for(resize, area))
    }
}

impl ResizeEncodeRender for KeyedProtocol {
    fn resize_encode(&mut self, resize: &Resize, size: Size) {
        match &self.tx {
            Some(tx) => {
                if let Some(protocol) = self.inner.take() {
                    let job = ResizeJob {
                        key: self.key.clone(),
                        protocol,
                        resize: resize.clone(),
                        size,
                    };
                    if let Err(back) = tx.send(job) {
                        // No worker: do it here rather than lose the image.
                        let mut job = back.0;
                        job.protocol.resize_encode(&job.resize, job.size);
                        self.inner = Some(job.protocol);
                    }
                }
            }
            None => {
                if let Some(p) = self.inner.as_mut() {
                    p.resize_encode(resize, size);
                }
            }
        }
    }

    fn render(&mut self, area: Rect, buf: &mut Buffer) {
        if let Some(p) = self.inner.as_mut() {
            p.render(area, buf);
        }
    }

    fn needs_resize(&self, resize: &Resize, size: Size) -> Option<Size> {
        self.inner
            .as_ref()
            .and_then(|p| p.needs_resize(resize, size))
    }
}

/// What a slot holds.
pub enum SlotState {
    /// Asked for; not here yet.
    Loading,
    /// Decoded.
    Ready {
        /// The protocol state.
        protocol: Box<KeyedProtocol>,
        /// Source size in pixels.
        size: (u32, u32),
        /// Token labels.
        labels: Vec<TokenLabel>,
        /// The last encoding error.
        error: Option<String>,
    },
    /// Could not be loaded.
    Failed(String),
}

/// One image the views show.
pub struct ImageSlot {
    /// Its state.
    pub state: SlotState,
    /// The frame counter when it was last drawn (for eviction).
    pub last_used: u64,
}

/// Most image slots kept.
pub const MAX_SLOTS: usize = 48;

/// The app's images: enabled or not, the slots, and the resize channel.
pub struct ImageCache {
    /// Whether images are drawn at all (`--image-protocol off` turns them into text).
    pub enabled: bool,
    /// Slots by key.
    pub slots: HashMap<ImageKey, ImageSlot>,
    /// Where resize work goes (`None`: resize inline, for simple embedders).
    pub tx: Option<Sender<ResizeJob>>,
    /// Frames drawn.
    pub frame: u64,
}

impl ImageCache {
    /// A cache; `tx` receives resize work.
    pub fn new(enabled: bool, tx: Option<Sender<ResizeJob>>) -> Self {
        ImageCache {
            enabled,
            slots: HashMap::new(),
            tx,
            frame: 0,
        }
    }

    /// Whether `key` has a slot (loading, ready or failed).
    pub fn has(&self, key: &ImageKey) -> bool {
        self.slots.contains_key(key)
    }

    /// Marks `key` as loading; returns false when it already has a slot.
    pub fn begin(&mut self, key: &ImageKey) -> bool {
        if !self.enabled || self.slots.contains_key(key) {
            return false;
        }
        self.evict();
        self.slots.insert(
            key.clone(),
            ImageSlot {
                state: SlotState::Loading,
                last_used: self.frame,
            },
        );
        true
    }

    fn evict(&mut self) {
        while self.slots.len() >= MAX_SLOTS {
            let Some(oldest) = self
                .slots
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.slots.remove(&oldest);
        }
    }

    /// Stores a decoded image (or its error).
    pub fn ready(&mut self, key: ImageKey, result: Result<PreparedImage, String>) {
        let state = match result {
            Ok(p) => SlotState::Ready {
                protocol: Box::new(KeyedProtocol {
                    key: key.clone(),
                    inner: Some(p.protocol),
                    tx: self.tx.clone(),
                }),
                size: (p.width, p.height),
                labels: p.labels,
                error: None,
            },
            Err(e) => SlotState::Failed(e),
        };
        self.slots.insert(
            key,
            ImageSlot {
                state,
                last_used: self.frame,
            },
        );
    }

    /// Puts a resized protocol back into its slot.
    pub fn resized(&mut self, key: &ImageKey, protocol: StatefulProtocol, error: Option<String>) {
        if let Some(ImageSlot {
            state:
                SlotState::Ready {
                    protocol: slot,
                    error: slot_error,
                    ..
                },
            ..
        }) = self.slots.get_mut(key)
        {
            if slot.inner.is_none() {
                slot.inner = Some(protocol);
            }
            *slot_error = error;
        }
    }

    /// Forgets the slots of images no longer shown (e.g. after a run was deleted).
    pub fn forget_run(&mut self, id: &RunId) {
        self.slots.retain(|k, _| match k {
            ImageKey::Input(r) | ImageKey::Output(r, _) => r != id,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tint_outlines_and_centres() {
        let mut img = RgbImage::from_pixel(20, 10, Rgb([0, 0, 0]));
        let mut mask = GrayImage::new(20, 10);
        for y in 2..8 {
            for x in 10..20 {
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        let c = tint_mask(&mut img, &mask, [255, 0, 0]).unwrap();
        assert!((c.0 - 14.5 / 20.0).abs() < 1e-3 && (c.1 - 4.5 / 10.0).abs() < 1e-3);
        assert_eq!(img.get_pixel(10, 2).0, [255, 0, 0]); // outline
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]); // outside
        assert!(tint_mask(&mut img, &GrayImage::new(20, 10), [1, 2, 3]).is_none());
    }

    #[test]
    fn modes_parse() {
        assert_eq!("off".parse::<ImageMode>(), Ok(ImageMode::Off));
        assert!("png".parse::<ImageMode>().is_err());
    }
}
