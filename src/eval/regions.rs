//! Instance regions and the images the DINO scores are computed on.
//!
//! Following Break-a-Scene's practice (its authors, BaS issue #32), an instance is compared
//! with everything outside it painted black. Then, by default, the image is cut to the
//! region's bounding box and padded with black to a square (centred), so that an instance drawn
//! small in a corner of the generated image and the same instance in the reference photo reach
//! DINO at the same scale and without the aspect distortion of DINO's square resize
//! ([`CropMode::Crop`]). [`CropMode::Full`] keeps the whole masked image instead (BaS's setting
//! exactly).

use image::{GrayImage, Rgb, RgbImage};

use crate::error::{Error, Result};

/// Mask value at or above which a pixel of a (soft) mask belongs to the instance; the rule the
/// learning stage uses for its coverage checks.
pub const MASK_THRESHOLD: u8 = 128;

/// Where a region came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionKind {
    /// A refined mask of the synthesis (its `masks_K.png`).
    Mask,
    /// The subject's box.
    Box,
    /// The whole image (no box: a plain prompt or a learning run's preview).
    Whole,
}

impl RegionKind {
    /// `mask`, `box` or `whole`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mask => "mask",
            Self::Box => "box",
            Self::Whole => "whole",
        }
    }
}

/// A region of an image: its kind and, unless whole, its pixels (row-major, image resolution).
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    /// Where it came from.
    pub kind: RegionKind,
    /// Membership per pixel; `None` for the whole image.
    pub pixels: Option<Vec<bool>>,
}

impl Region {
    /// The whole image.
    pub fn whole() -> Self {
        Self {
            kind: RegionKind::Whole,
            pixels: None,
        }
    }

    /// Whether NSIM-D makes sense for it (it isolates one instance).
    pub fn is_localised(&self) -> bool {
        self.pixels.is_some()
    }
}

/// How the masked instance image is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    /// Black outside the instance, cut to its bounding box, padded to a square (default).
    Crop,
    /// Black outside the instance, the whole image.
    Full,
}

impl CropMode {
    /// `crop` or `full`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Crop => "crop",
            Self::Full => "full",
        }
    }
}

/// A grey (possibly soft) mask as membership: value ≥ [`MASK_THRESHOLD`].
pub fn threshold(mask: &GrayImage) -> Vec<bool> {
    mask.as_raw().iter().map(|&v| v >= MASK_THRESHOLD).collect()
}

/// The bounding box `(x0, y0, x1, y1)` (end-exclusive) of the set pixels of a `w`-wide mask;
/// `None` when it is empty.
pub fn bounding_box(mask: &[bool], w: u32) -> Option<(u32, u32, u32, u32)> {
    let w = w as usize;
    if w == 0 {
        return None;
    }
    let mut bb: Option<(usize, usize, usize, usize)> = None;
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let (x, y) = (i % w, i / w);
        bb = Some(match bb {
            None => (x, y, x + 1, y + 1),
            Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1)),
        });
    }
    bb.map(|(a, b, c, d)| (a as u32, b as u32, c as u32, d as u32))
}

/// The image DINO sees for one instance: black outside `region`, then framed by `mode`. A
/// whole-image region returns the image unchanged. Errors on an empty region or a mask of the
/// wrong size.
pub fn isolate(img: &RgbImage, region: &Region, mode: CropMode) -> Result<RgbImage> {
    let Some(mask) = &region.pixels else {
        return Ok(img.clone());
    };
    let (w, h) = img.dimensions();
    if mask.len() != (w as usize) * (h as usize) {
        return Err(Error::Input(format!(
            "a region of {} pixels does not fit a {w}x{h} image",
            mask.len()
        )));
    }
    let (x0, y0, x1, y1) = bounding_box(mask, w)
        .ok_or_else(|| Error::Input(format!("empty {} region", region.kind.as_str())))?;
    let masked = RgbImage::from_fn(w, h, |x, y| {
        if mask[(y * w + x) as usize] {
            *img.get_pixel(x, y)
        } else {
            Rgb([0, 0, 0])
        }
    });
    match mode {
        CropMode::Full => Ok(masked),
        CropMode::Crop => {
            let (cw, ch) = (x1 - x0, y1 - y0);
            let side = cw.max(ch);
            let (ox, oy) = ((side - cw) / 2, (side - ch) / 2);
            let mut out = RgbImage::new(side, side);
            for y in 0..ch {
                for x in 0..cw {
                    out.put_pixel(ox + x, oy + y, *masked.get_pixel(x0 + x, y0 + y));
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([(10 + x) as u8, (20 + y) as u8, 200]))
    }

    #[test]
    fn outside_the_instance_is_black_and_the_crop_is_a_padded_square() {
        // 6x4 image, region = columns 1..4 of rows 1..2 (3 wide, 2 tall), one hole at (2,1).
        let (w, h) = (6u32, 4u32);
        let mut mask = vec![false; 24];
        for y in 1..3 {
            for x in 1..4 {
                mask[y * 6 + x] = true;
            }
        }
        mask[6 + 2] = false;
        let region = Region {
            kind: RegionKind::Mask,
            pixels: Some(mask),
        };
        assert_eq!(
            bounding_box(region.pixels.as_ref().unwrap(), w),
            Some((1, 1, 4, 3))
        );
        let full = isolate(&img(w, h), &region, CropMode::Full).unwrap();
        assert_eq!(full.dimensions(), (6, 4));
        assert_eq!(full.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(full.get_pixel(2, 1).0, [0, 0, 0]); // the hole
        assert_eq!(full.get_pixel(1, 1).0, [11, 21, 200]);
        let crop = isolate(&img(w, h), &region, CropMode::Crop).unwrap();
        // 3x2 box → 3x3 square, content in rows 0..2 (pad (3-2)/2 = 0 above, 1 below).
        assert_eq!(crop.dimensions(), (3, 3));
        assert_eq!(crop.get_pixel(0, 0).0, [11, 21, 200]);
        assert_eq!(crop.get_pixel(1, 0).0, [0, 0, 0]); // the hole
        assert_eq!(crop.get_pixel(2, 1).0, [13, 22, 200]);
        assert!((0..3).all(|x| crop.get_pixel(x, 2).0 == [0, 0, 0]));
        // A tall region pads left and right.
        let mut tall = vec![false; 24];
        for y in 0..4 {
            tall[y * 6 + 5] = true;
        }
        let r = Region {
            kind: RegionKind::Box,
            pixels: Some(tall),
        };
        let crop = isolate(&img(w, h), &r, CropMode::Crop).unwrap();
        assert_eq!(crop.dimensions(), (4, 4));
        assert_eq!(crop.get_pixel(1, 3).0, [15, 23, 200]);
        assert_eq!(crop.get_pixel(0, 3).0, [0, 0, 0]);
    }

    #[test]
    fn empty_and_mis_sized_regions_are_refused() {
        let empty = Region {
            kind: RegionKind::Mask,
            pixels: Some(vec![false; 24]),
        };
        assert!(isolate(&img(6, 4), &empty, CropMode::Crop).is_err());
        let wrong = Region {
            kind: RegionKind::Mask,
            pixels: Some(vec![true; 5]),
        };
        assert!(isolate(&img(6, 4), &wrong, CropMode::Full).is_err());
        assert_eq!(
            isolate(&img(6, 4), &Region::whole(), CropMode::Crop).unwrap(),
            img(6, 4)
        );
    }

    #[test]
    fn soft_masks_are_thresholded_at_128() {
        let m = GrayImage::from_raw(4, 1, vec![0, 127, 128, 255]).unwrap();
        assert_eq!(threshold(&m), vec![false, false, true, true]);
    }
}
