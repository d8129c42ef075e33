//! Learning inputs: one image and one mask per instance, validated and brought to the model's
//! resolution together (short side resized to the model size, centre crop).

use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};

use crate::error::{Error, Result};
use crate::imageio::{fit_mask, fit_rgb, mask_channel, read_image, ImageFit};

/// Most instances one run can learn.
pub const MAX_MASKS: usize = 8;
/// Smallest accepted image side in pixels.
pub const MIN_IMAGE_SIDE: u32 = 64;
/// A mask covering less than this fraction of the image is "empty".
pub const MIN_MASK_FRACTION: f64 = 0.005;
/// Two masks may share at most this fraction of the smaller one (unless allowed).
pub const MAX_OVERLAP_FRACTION: f64 = 0.05;
/// File name of the optional scene description in a scene folder (what `mifo world scene`
/// writes next to the image and masks; read by the world's oracle, carried here as a path).
pub const SCENE_DESCRIPTION_FILE: &str = "scene.json";

/// The files of a scene.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SceneFiles {
    /// The image.
    pub image: PathBuf,
    /// One mask per instance; mask i becomes token `<vi>`.
    pub masks: Vec<PathBuf>,
    /// The world's description of the scene (`scene.json` of a `mifo world scene` folder):
    /// kept with the learning run so the oracle knows each instance's attributes.
    #[serde(default)]
    pub world: Option<PathBuf>,
}

impl SceneFiles {
    /// An image and its masks, with no world description.
    pub fn new(image: PathBuf, masks: Vec<PathBuf>) -> SceneFiles {
        SceneFiles {
            image,
            masks,
            world: None,
        }
    }
}

/// Finds `img.(png|jpg|jpeg)` and `mask*.png` (sorted by name) in a scene folder, and the
/// world's `scene.json` when the folder has one.
pub fn scene_files(dir: &Path) -> Result<SceneFiles> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut images = Vec::new();
    let mut masks = Vec::new();
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().to_lowercase();
        let p = e.path();
        if name.starts_with("mask") && name.ends_with(".png") {
            masks.push(p);
        } else if ["img.png", "img.jpg", "img.jpeg"].contains(&name.as_str()) {
            images.push(p);
        }
    }
    masks.sort();
    images.sort();
    let image = match images.len() {
        1 => images.remove(0),
        0 => {
            return Err(Error::file(
                dir,
                "no img.png / img.jpg in the scene folder (expected img.* and mask*.png)",
            ))
        }
        _ => return Err(Error::file(dir, "several img.* files; keep one")),
    };
    if masks.is_empty() {
        return Err(Error::file(dir, "no mask*.png in the scene folder"));
    }
    let world = dir.join(SCENE_DESCRIPTION_FILE);
    Ok(SceneFiles {
        image,
        masks,
        world: world.is_file().then_some(world),
    })
}

/// A validated scene at the model's resolution.
#[derive(Clone, Debug)]
pub struct Scene {
    /// Where it came from.
    pub files: SceneFiles,
    /// The image, size×size.
    pub image: RgbImage,
    /// The masks, size×size, soft values kept (255 = instance).
    pub masks: Vec<GrayImage>,
}

fn coverage(mask: &GrayImage) -> (f64, Vec<bool>) {
    let on: Vec<bool> = mask.as_raw().iter().map(|&v| v >= 128).collect();
    let n = on.iter().filter(|&&b| b).count();
    (n as f64 / on.len().max(1) as f64, on)
}

/// Reads and checks the image and masks, then brings them to `size`×`size` by `fit`; mask
/// coverage and overlap are judged after that.
pub fn load_scene(
    files: &SceneFiles,
    size: u32,
    allow_overlap: bool,
    fit: ImageFit,
) -> Result<Scene> {
    if files.masks.is_empty() {
        return Err(Error::Input("give at least one --mask".into()));
    }
    if files.masks.len() > MAX_MASKS {
        return Err(Error::Input(format!(
            "{} masks given; at most {MAX_MASKS} instances can be learned at once",
            files.masks.len()
        )));
    }
    let img = read_image(&files.image)?.to_rgb8();
    let (w, h) = img.dimensions();
    if w.min(h) < MIN_IMAGE_SIDE {
        return Err(Error::file(
            &files.image,
            format!("image is {w}x{h}; the short side must be at least {MIN_IMAGE_SIDE} px"),
        ));
    }
    let mut masks = Vec::new();
    for p in &files.masks {
        let m = mask_channel(&read_image(p)?);
        if m.dimensions() != (w, h) {
            return Err(Error::file(
                p,
                format!(
                    "mask is {}x{} but the image is {w}x{h}",
                    m.width(),
                    m.height()
                ),
            ));
        }
        // Coverage and overlap are judged on what the model will see: the mask after the
        // image's resize and centre crop, which can cut an instance near the border away.
        let fitted = fit_mask(&m, size, fit);
        let (frac, _) = coverage(&fitted);
        if frac < MIN_MASK_FRACTION {
            let (before, _) = coverage(&m);
            let why = if before < MIN_MASK_FRACTION {
                format!(
                    "mask is empty: {:.2}% of pixels are white (need at least {:.1}%)",
                    before * 100.0,
                    MIN_MASK_FRACTION * 100.0
                )
            } else {
                let (how, hint) = match fit {
                    ImageFit::Crop => (
                        format!("the centre crop to {size}x{size}"),
                        "; learn.image_fit=stretch keeps the whole image",
                    ),
                    ImageFit::Stretch => (format!("resizing to {size}x{size}"), ""),
                };
                format!(
                    "mask is empty after {how}: {:.2}% of pixels are white there (need at least {:.1}%; {:.2}% before{hint})",
                    frac * 100.0,
                    MIN_MASK_FRACTION * 100.0,
                    before * 100.0
                )
            };
            return Err(Error::file(p, why));
        }
        masks.push(fitted);
    }
    if !allow_overlap {
        let on: Vec<Vec<bool>> = masks.iter().map(|m| coverage(m).1).collect();
        for i in 0..on.len() {
            for j in i + 1..on.len() {
                let count = |v: &[bool]| v.iter().filter(|&&x| x).count();
                let both = on[i].iter().zip(&on[j]).filter(|(x, y)| **x && **y).count();
                let smaller = count(&on[i]).min(count(&on[j]));
                let frac = both as f64 / smaller.max(1) as f64;
                if frac > MAX_OVERLAP_FRACTION {
                    return Err(Error::file(
                        &files.masks[j],
                        format!(
                            "overlaps {} on {:.1}% of the smaller mask (limit {:.0}%; pass --allow-overlap to accept)",
                            files.masks[i].display(),
                            frac * 100.0,
                            MAX_OVERLAP_FRACTION * 100.0
                        ),
                    ));
                }
            }
        }
    }
    Ok(Scene {
        files: files.clone(),
        image: fit_rgb(&img, size, fit),
        masks,
    })
}
