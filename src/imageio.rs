//! Images in and out: loading an image and its masks at the model's resolution (short side
//! resized to the target, then centre-cropped, image and masks together), tensors to PNG, and
//! simple overlays (attention heat maps, tinted masks).

use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};

use crate::error::{Error, Result};

/// Reads an image file (PNG or JPEG).
pub fn read_image(path: &Path) -> Result<DynamicImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader
        .decode()
        .map_err(|e| Error::file(path, format!("cannot decode image: {e}")))
}

/// The first channel of a mask image as a grey image (grey, grey+alpha, RGB or RGBA: white =
/// instance; soft values are kept).
pub fn mask_channel(img: &DynamicImage) -> GrayImage {
    match img {
        DynamicImage::ImageLuma8(g) => g.clone(),
        DynamicImage::ImageLumaA8(g) => GrayImage::from_fn(g.width(), g.height(), |x, y| {
            image::Luma([g.get_pixel(x, y)[0]])
        }),
        other => {
            let rgb = other.to_rgba8();
            GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                image::Luma([rgb.get_pixel(x, y)[0]])
            })
        }
    }
}

/// "Short side to `size`, centre crop": resize by `size / min(w, h)`, then take the centred
/// size×size square.
fn resize_crop(img: &DynamicImage, size: u32, filter: FilterType) -> DynamicImage {
    let (w, h) = (img.width(), img.height());
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size),
        ((h as f64 * scale).round() as u32).max(size),
    );
    let resized = img.resize_exact(nw, nh, filter);
    resized.crop_imm((nw - size) / 2, (nh - size) / 2, size, size)
}

/// How an image goes to the model's square size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFit {
    /// Resize the short side to the size, then centre-crop (the aspect ratio is kept).
    Crop,
    /// Resize both sides to the size (the aspect ratio is not kept).
    Stretch,
}

impl ImageFit {
    /// `crop` or `stretch` (`learn.image_fit`); anything else is `None`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "crop" => Some(ImageFit::Crop),
            "stretch" => Some(ImageFit::Stretch),
            _ => None,
        }
    }

    fn apply(self, img: &DynamicImage, size: u32, filter: FilterType) -> DynamicImage {
        match self {
            ImageFit::Crop => resize_crop(img, size, filter),
            ImageFit::Stretch => img.resize_exact(size, size, filter),
        }
    }
}

/// An RGB image brought to size×size by `fit` (Catmull-Rom).
pub fn fit_rgb(img: &RgbImage, size: u32, fit: ImageFit) -> RgbImage {
    fit.apply(
        &DynamicImage::ImageRgb8(img.clone()),
        size,
        FilterType::CatmullRom,
    )
    .to_rgb8()
}

/// A grey mask brought to size×size by `fit` (bilinear: soft edges kept).
pub fn fit_mask(mask: &GrayImage, size: u32, fit: ImageFit) -> GrayImage {
    fit.apply(
        &DynamicImage::ImageLuma8(mask.clone()),
        size,
        FilterType::Triangle,
    )
    .to_luma8()
}

/// RGB → [1, 3, H, W] in [-1, 1].
pub fn rgb_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    let t = Tensor::from_vec(data, (h as usize, w as usize, 3), device)?;
    Ok(t.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}

/// Grey → [H, W] in [0, 1].
pub fn mask_to_tensor(mask: &GrayImage, device: &Device) -> Result<Tensor> {
    let (w, h) = mask.dimensions();
    let data: Vec<f32> = mask.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize), device)?)
}

/// [3, H, W] (or [1, 3, H, W]) in [0, 1] → RGB image (values clamped and rounded).
pub fn tensor_to_rgb(t: &Tensor) -> Result<RgbImage> {
    let t = if t.rank() == 4 {
        t.squeeze(0)?
    } else {
        t.clone()
    };
    let (c, h, w) = t.dims3()?;
    if c != 3 {
        return Err(Error::Input(format!("expected 3 channels, got {c}")));
    }
    let data: Vec<f32> = t
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1()?;
    let bytes: Vec<u8> = data
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| Error::Input("image buffer size mismatch".into()))
}

/// Encodes an RGB image as PNG bytes.
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| Error::Input(format!("PNG encoding failed: {e}")))?;
    Ok(out.into_inner())
}

/// A map [h, w] (any range; normalised to its max) drawn as a red heat overlay on `base`
/// (upsampled bilinearly to the base's size).
pub fn heat_overlay(base: &RgbImage, map: &Tensor) -> Result<RgbImage> {
    let (h, w) = map.dims2()?;
    let v: Vec<f32> = map
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let max = v.iter().fold(0f32, |m, x| m.max(*x)).max(1e-12);
    let small = GrayImage::from_raw(
        w as u32,
        h as u32,
        v.iter()
            .map(|x| ((x / max).clamp(0.0, 1.0) * 255.0) as u8)
            .collect(),
    )
    .ok_or_else(|| Error::Input("map size mismatch".into()))?;
    let big = image::imageops::resize(&small, base.width(), base.height(), FilterType::Triangle);
    Ok(RgbImage::from_fn(base.width(), base.height(), |x, y| {
        let a = big.get_pixel(x, y)[0] as f32 / 255.0;
        let p = base.get_pixel(x, y);
        let grey = (p[0] as f32 * 0.3 + p[1] as f32 * 0.59 + p[2] as f32 * 0.11) * 0.5;
        image::Rgb([
            (grey * (1.0 - a) + 255.0 * a) as u8,
            (grey * (1.0 - a) + 40.0 * a) as u8,
            (grey * (1.0 - a) + 40.0 * a) as u8,
        ])
    }))
}
