//! The training set of the world's base model: many seeded scenes of one or two objects with
//! captions, written in a form a training script reads without decoding images.
//!
//! `OUT/images.u8` holds `count` images of `size`×`size`×3 bytes back to back (row-major RGB),
//! `OUT/labels.u8` their exact object maps, `size`×`size` bytes each (0 background, `i + 1`
//! the `i`-th object the caption names), `OUT/captions.txt` one caption per line in the same
//! order, and `OUT/dataset.json` the parameters ([`DatasetInfo`]). Image `i` is the scene of [`sample_spec`]`(seed, i, size)`, so
//! any one can be redrawn alone.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::scene::SceneSpec;
use crate::error::{Error, Result};

/// `dataset.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Number of images.
    pub count: usize,
    /// Image side in pixels.
    pub size: u32,
    /// The data set's seed.
    pub seed: u64,
    /// How many images hold one object and how many two.
    pub objects_histogram: [usize; 2],
}

/// SplitMix64: a well-mixed 64-bit value from a counter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The scene spec of image `index` of the data set with `seed`: one or two objects (equally
/// likely), attributes drawn freely (two objects never identical).
pub fn sample_spec(seed: u64, index: u64, size: u32) -> SceneSpec {
    let scene_seed = mix(mix(seed) ^ index);
    SceneSpec {
        seed: scene_seed,
        objects: 1 + (mix(scene_seed) & 1) as usize,
        differ: None,
        size,
    }
}

/// Writes the data set into `dir` (created if missing), printing progress through `progress`
/// (images done, total).
pub fn write_dataset(
    dir: &Path,
    count: usize,
    seed: u64,
    size: u32,
    mut progress: impl FnMut(usize, usize),
) -> Result<DatasetInfo> {
    if count == 0 {
        return Err(Error::Input("--count 0: the data set needs images".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let images_path = dir.join("images.u8");
    let labels_path = dir.join("labels.u8");
    let captions_path = dir.join("captions.txt");
    let open = |p: &Path| {
        std::fs::File::create(p)
            .map(std::io::BufWriter::new)
            .map_err(|e| Error::io(p, e))
    };
    let mut images = open(&images_path)?;
    let mut labels = open(&labels_path)?;
    let mut captions = open(&captions_path)?;
    let mut histogram = [0usize; 2];
    for i in 0..count {
        let scene = sample_spec(seed, i as u64, size).draw()?;
        histogram[scene.objects.len() - 1] += 1;
        images
            .write_all(scene.image.as_raw())
            .map_err(|e| Error::io(&images_path, e))?;
        let mut label = vec![0u8; (size * size) as usize];
        for (k, o) in scene.objects.iter().enumerate() {
            for y in o.bbox.y0..o.bbox.y1 {
                for x in o.bbox.x0..o.bbox.x1 {
                    if o.covers(x, y) {
                        label[(y * size + x) as usize] = k as u8 + 1;
                    }
                }
            }
        }
        labels
            .write_all(&label)
            .map_err(|e| Error::io(&labels_path, e))?;
        writeln!(captions, "{}", scene.caption()).map_err(|e| Error::io(&captions_path, e))?;
        if (i + 1) % 1000 == 0 || i + 1 == count {
            progress(i + 1, count);
        }
    }
    images.flush().map_err(|e| Error::io(&images_path, e))?;
    labels.flush().map_err(|e| Error::io(&labels_path, e))?;
    captions.flush().map_err(|e| Error::io(&captions_path, e))?;
    let info = DatasetInfo {
        count,
        size,
        seed,
        objects_histogram: histogram,
    };
    let info_path = dir.join("dataset.json");
    let json = serde_json::to_string_pretty(&info).expect("dataset info serialises");
    std::fs::write(&info_path, json + "\n").map_err(|e| Error::io(&info_path, e))?;
    Ok(info)
}
