//! Overlays of a synthesis run: the boxes drawn and labelled over the sample (one colour per
//! subject, a built-in 5×7 bitmap font for the labels), and the regions (refined masks, or the
//! boxes) tinted per subject with a legend strip.

use image::{Rgb, RgbImage};

use super::boxes::{box_mask, BoxSpec};

/// Subject colours, in box order (cycled).
pub const PALETTE: [[u8; 3]; 8] = [
    [230, 25, 75],
    [60, 180, 75],
    [0, 130, 200],
    [255, 225, 25],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
];

/// The colour of subject `i`.
pub fn colour(i: usize) -> [u8; 3] {
    PALETTE[i % PALETTE.len()]
}

/// A 5×7 glyph, one byte per row, bit 4 = leftmost pixel. Letters are upper-case shapes (lower
/// case is drawn with them); unknown characters are drawn as `?`.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '\'' => [0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00],
        ' ' => [0x00; 7],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
    }
}

/// Width and height in pixels of `text` drawn at `scale` (6×8 cells, no trailing gap).
pub fn text_size(text: &str, scale: u32) -> (u32, u32) {
    let n = text.chars().count() as u32;
    ((n * 6).saturating_sub(1) * scale, 7 * scale)
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, Rgb(c));
    }
}

fn fill_rect(img: &mut RgbImage, x0: i64, y0: i64, w: i64, h: i64, c: [u8; 3]) {
    for y in y0..y0 + h {
        for x in x0..x0 + w {
            put(img, x, y, c);
        }
    }
}

/// Draws `text` with its top-left corner at (x, y), clipped to the image.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, c: [u8; 3]) {
    let s = scale.max(1) as i64;
    for (i, ch) in text.chars().enumerate() {
        let g = glyph(ch);
        let gx = x + i as i64 * 6 * s;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    fill_rect(img, gx + col * s, y + row as i64 * s, s, s, c);
                }
            }
        }
    }
}

/// Black or white, whichever reads better on `bg`.
fn ink_for(bg: [u8; 3]) -> [u8; 3] {
    let lum = 0.299 * bg[0] as f32 + 0.587 * bg[1] as f32 + 0.114 * bg[2] as f32;
    if lum > 140.0 {
        [0, 0, 0]
    } else {
        [255, 255, 255]
    }
}

/// A label: the text on a filled box of colour `c`.
fn draw_label(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, c: [u8; 3]) {
    let (tw, th) = text_size(text, scale);
    let pad = scale as i64;
    fill_rect(img, x, y, tw as i64 + 2 * pad, th as i64 + 2 * pad, c);
    draw_text(img, x + pad, y + pad, text, scale, ink_for(c));
}

fn scales(img: &RgbImage) -> (u32, u32) {
    let side = img.width().min(img.height());
    ((side / 160).max(1), (side / 256).max(1))
}

/// The sample with each box drawn as a frame in its subject's colour and labelled with the
/// subject name at its top-left corner.
pub fn draw_boxes(image: &RgbImage, boxes: &[BoxSpec]) -> RgbImage {
    let mut out = image.clone();
    let (w, h) = (image.width() as f64, image.height() as f64);
    let (thick, scale) = scales(image);
    let t = thick as i64;
    for (i, b) in boxes.iter().enumerate() {
        let c = colour(i);
        let [x0, y0, x1, y1] = b.rect.map(|v| v as f64);
        let (x0, y0) = ((x0 * w).round() as i64, (y0 * h).round() as i64);
        let (x1, y1) = ((x1 * w).round() as i64 - 1, (y1 * h).round() as i64 - 1);
        let (bw, bh) = ((x1 - x0 + 1).max(1), (y1 - y0 + 1).max(1));
        fill_rect(&mut out, x0, y0, bw, t, c);
        fill_rect(&mut out, x0, y1 - t + 1, bw, t, c);
        fill_rect(&mut out, x0, y0, t, bh, c);
        fill_rect(&mut out, x1 - t + 1, y0, t, bh, c);
        draw_label(&mut out, x0, y0, &b.subject, scale, c);
    }
    out
}

/// The sample greyed, each subject's region tinted in its colour (masks at `size` = (h, w),
/// upsampled by nearest neighbour), and a legend strip (colour swatch + subject name) below.
pub fn draw_regions(
    image: &RgbImage,
    size: (usize, usize),
    masks: &[Vec<bool>],
    names: &[String],
) -> RgbImage {
    let (w, h) = (image.width(), image.height());
    let (_, scale) = scales(image);
    let line = 9 * scale + 2;
    let strip = if names.is_empty() {
        0
    } else {
        names.len() as u32 * line + 4
    };
    let mut out = RgbImage::from_pixel(w, h + strip, Rgb([255, 255, 255]));
    let (mh, mw) = size;
    for y in 0..h {
        let my = ((y as usize * mh) / h as usize).min(mh.saturating_sub(1));
        for x in 0..w {
            let mx = ((x as usize * mw) / w as usize).min(mw.saturating_sub(1));
            let inside = masks
                .iter()
                .enumerate()
                .filter(|(_, m)| m.get(my * mw + mx).copied().unwrap_or(false))
                .map(|(i, _)| i);
            out.put_pixel(x, y, Rgb(region_pixel(image.get_pixel(x, y).0, inside)));
        }
    }
    for (i, name) in names.iter().enumerate() {
        let y = (h + 2 + i as u32 * line) as i64;
        let sw = 7 * scale as i64;
        fill_rect(&mut out, 2, y, sw, sw, colour(i));
        draw_text(
            &mut out,
            2 + sw + 2 * scale as i64,
            y,
            name,
            scale,
            [0, 0, 0],
        );
    }
    out
}

/// The colour [`draw_regions`] gives a sample pixel `p` that lies in the regions `inside`
/// (subject indices, ascending): the pixel greyed, then tinted once per region.
pub fn region_pixel(p: [u8; 3], inside: impl IntoIterator<Item = usize>) -> [u8; 3] {
    let grey = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
    let mut px = [grey * 0.6 + 40.0; 3];
    for i in inside {
        let c = colour(i);
        for (v, cc) in px.iter_mut().zip(c) {
            *v = *v * 0.45 + cc as f32 * 0.55;
        }
    }
    px.map(|v| v.clamp(0.0, 255.0) as u8)
}

/// Reads the `n` regions back out of a [`draw_regions`] image (`drawn`, legend strip below
/// ignored) of `sample`, at the sample's resolution: for every pixel, the smallest set of
/// regions whose tint reproduces the drawn colour exactly. `None` when some pixel matches no
/// set (not a regions image of this sample) or `n` is 0 or above 8.
pub fn decode_regions(sample: &RgbImage, drawn: &RgbImage, n: usize) -> Option<Vec<Vec<bool>>> {
    let (w, h) = sample.dimensions();
    if n == 0 || n > PALETTE.len() || drawn.width() != w || drawn.height() < h {
        return None;
    }
    let mut subsets: Vec<u32> = (0..1u32 << n).collect();
    subsets.sort_by_key(|s| (s.count_ones(), *s));
    let members = |s: u32| (0..n).filter(move |i| s & (1 << i) != 0);
    let mut masks = vec![vec![false; (w * h) as usize]; n];
    for y in 0..h {
        for x in 0..w {
            let p = sample.get_pixel(x, y).0;
            let want = drawn.get_pixel(x, y).0;
            let s = subsets
                .iter()
                .copied()
                .find(|&s| region_pixel(p, members(s)) == want)?;
            for i in members(s) {
                masks[i][(y * w + x) as usize] = true;
            }
        }
    }
    Some(masks)
}

/// The boxes as masks at the image resolution (for [`draw_regions`] when no refinement ran).
pub fn box_regions(boxes: &[BoxSpec], h: usize, w: usize) -> Vec<Vec<bool>> {
    boxes.iter().map(|b| box_mask(&b.rect, h, w)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_labels_are_drawn() {
        let img = RgbImage::from_pixel(64, 64, Rgb([128, 128, 128]));
        let b = BoxSpec {
            subject: "<v0>".into(),
            rect: [0.25, 0.5, 0.75, 1.0],
        };
        let out = draw_boxes(&img, std::slice::from_ref(&b));
        // Right edge of the frame at x = 47, bottom at y = 63, in the subject colour.
        assert_eq!(out.get_pixel(47, 56).0, colour(0));
        assert_eq!(out.get_pixel(40, 63).0, colour(0));
        // Outside the box nothing changes.
        assert_eq!(out.get_pixel(5, 5).0, [128, 128, 128]);
        // The label's ink (white on red) appears inside the label area.
        let (tw, th) = text_size("<v0>", 1);
        let ink = (16..16 + tw + 2)
            .flat_map(|x| (32..32 + th + 2).map(move |y| (x, y)))
            .filter(|&(x, y)| out.get_pixel(x, y).0 == [255, 255, 255])
            .count();
        assert!(ink > 10, "{ink}");
        let regions = draw_regions(
            &img,
            (2, 2),
            &[vec![true, false, false, false]],
            &["<v0>".into()],
        );
        assert!(regions.height() > 64);
        assert_ne!(regions.get_pixel(5, 5), regions.get_pixel(60, 60));
    }

    #[test]
    fn regions_decode_back_from_the_drawn_image() {
        let img = RgbImage::from_fn(32, 24, |x, y| {
            Rgb([(x * 7) as u8, (y * 9) as u8, ((x * y) % 251) as u8])
        });
        // Masks at 4x4 (upsampled by nearest), overlapping in one cell.
        let a = vec![
            true, true, false, false, true, true, false, false, false, false, false, false, false,
            false, false, false,
        ];
        let b = vec![
            false, true, true, false, false, false, false, false, false, false, true, true, false,
            false, true, true,
        ];
        let drawn = draw_regions(
            &img,
            (4, 4),
            &[a.clone(), b.clone()],
            &["a".into(), "b".into()],
        );
        let decoded = decode_regions(&img, &drawn, 2).unwrap();
        for (mask, small) in decoded.iter().zip([&a, &b]) {
            for y in 0..24usize {
                for x in 0..32usize {
                    let cell = (y * 4 / 24) * 4 + x * 4 / 32;
                    assert_eq!(mask[y * 32 + x], small[cell], "({x},{y})");
                }
            }
        }
        // Another image's drawing does not decode.
        let other = RgbImage::from_pixel(32, 24, Rgb([1, 2, 3]));
        assert!(decode_regions(&other, &drawn, 2).is_none());
    }
}
