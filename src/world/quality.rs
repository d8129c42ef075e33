//! How well a base model draws the world from plain prompts, read by the oracle: the table that
//! says whether `fixtures/world-sd/` is good enough to show MIFO's effect on.
//!
//! Prompts alternate between one object (the 12 shape × colour kinds in turn) and two objects
//! (a seeded pair of distinct kinds, as in the training captions); image `i` starts from the
//! latent of seed `seed + i`. Bars (from the world issue): one-object prompts with every
//! attribute right ≥ 95 %, two-object prompts with both objects right ≥ 75 %, images showing a
//! colour not asked for ≤ 5 %.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::oracle::{judge_prompt, Reading};
use super::scene::{caption_of, Colour, Shape, COLOURS, SHAPES};
use crate::error::Result;
use crate::imageio::tensor_to_rgb;
use crate::model::sample::{seeded_normal, Sampler};
use crate::model::StableDiffusion;

/// Bar for one-object prompts (share with every attribute right).
pub const SINGLE_BAR: f64 = 0.95;
/// Bar for two-object prompts (share with both objects right).
pub const PAIR_BAR: f64 = 0.75;
/// Bar for images showing a colour not asked for (at most).
pub const EXTRA_COLOUR_BAR: f64 = 0.05;

/// How to sample.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct QualityOptions {
    /// Images in all (half one-object, half two-object prompts).
    pub images: usize,
    /// DDIM steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Seed of the first image's latent (and of the pairs drawn).
    pub seed: u64,
}

/// One generated image and what the oracle read in it.
#[derive(Clone, Debug, Serialize)]
pub struct QualityImage {
    /// The prompt.
    pub prompt: String,
    /// Objects asked for.
    pub objects: usize,
    /// Every asked object drawn with both attributes right.
    pub all_right: bool,
    /// Every asked colour present.
    pub colours_right: bool,
    /// A colour not asked for is drawn.
    pub extra_colour: bool,
}

/// One row of the table.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QualityRow {
    /// Images in the row.
    pub images: usize,
    /// Share with every asked object right.
    pub all_right: f64,
    /// Share with every asked colour present.
    pub colours_right: f64,
    /// Share showing a colour not asked for.
    pub extra_colour: f64,
}

impl QualityRow {
    fn of<'a>(images: impl Iterator<Item = &'a QualityImage>) -> QualityRow {
        let mut r = QualityRow::default();
        for i in images {
            r.images += 1;
            r.all_right += f64::from(u8::from(i.all_right));
            r.colours_right += f64::from(u8::from(i.colours_right));
            r.extra_colour += f64::from(u8::from(i.extra_colour));
        }
        let n = r.images.max(1) as f64;
        r.all_right /= n;
        r.colours_right /= n;
        r.extra_colour /= n;
        r
    }
}

/// The table and the images behind it.
#[derive(Clone, Debug, Serialize)]
pub struct QualityReport {
    /// How it was sampled.
    pub options: QualityOptions,
    /// One-object prompts.
    pub single: QualityRow,
    /// Two-object prompts.
    pub pair: QualityRow,
    /// All prompts.
    pub all: QualityRow,
    /// Whether the three bars are met.
    pub meets_bars: bool,
    /// Every image.
    pub images: Vec<QualityImage>,
}

/// The asked objects of prompt `i`.
pub fn prompt_objects(i: usize, seed: u64) -> Vec<(Shape, Colour)> {
    let kinds: Vec<(Shape, Colour)> = SHAPES
        .iter()
        .flat_map(|&s| COLOURS.iter().map(move |&c| (s, c)))
        .collect();
    if i.is_multiple_of(2) {
        vec![kinds[(i / 2) % kinds.len()]]
    } else {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37));
        let a = rng.random_range(0..kinds.len());
        let mut b = rng.random_range(0..kinds.len() - 1);
        if b >= a {
            b += 1;
        }
        vec![kinds[a], kinds[b]]
    }
}

/// Samples `options.images` images and judges them; `progress(done, total)` after each.
pub fn measure(
    sd: &StableDiffusion,
    options: QualityOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<QualityReport> {
    let dev = &sd.device;
    let tok = &sd.tokenizer;
    let uncond = Tensor::new(tok.encode("")?, dev)?.unsqueeze(0)?;
    let sampler = Sampler {
        text_encoder: &sd.text_encoder,
        unet: &sd.unet,
        vae: &sd.vae,
        scheduler: &sd.scheduler,
    };
    let size = sd.unet.config().sample_size;
    let channels = sd.unet.config().in_channels;
    let mut images = Vec::with_capacity(options.images);
    for i in 0..options.images {
        let asked = prompt_objects(i, options.seed);
        let prompt = caption_of(&asked);
        let ids = Tensor::new(tok.encode(&prompt)?, dev)?.unsqueeze(0)?;
        let latent = seeded_normal(&[1, channels, size, size], options.seed + i as u64, dev)?
            .to_dtype(sd.dtype)?;
        let t = sampler.generate(
            &ids,
            &uncond,
            None,
            &latent,
            options.steps,
            options.guidance,
        )?;
        let image = tensor_to_rgb(&t)?;
        let v = judge_prompt(&Reading::of(&image), &asked);
        images.push(QualityImage {
            prompt,
            objects: asked.len(),
            all_right: v.all_right,
            colours_right: v.colours_right,
            extra_colour: v.extra_colour,
        });
        progress(i + 1, options.images);
    }
    let single = QualityRow::of(images.iter().filter(|i| i.objects == 1));
    let pair = QualityRow::of(images.iter().filter(|i| i.objects == 2));
    let all = QualityRow::of(images.iter());
    let meets_bars = single.all_right >= SINGLE_BAR
        && pair.all_right >= PAIR_BAR
        && all.extra_colour <= EXTRA_COLOUR_BAR;
    Ok(QualityReport {
        options,
        single,
        pair,
        all,
        meets_bars,
        images,
    })
}

/// The table as `mifo world quality` prints it.
pub fn render(r: &QualityReport) -> String {
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let mut out = format!(
        "{:<14} {:>6} {:>10} {:>14} {:>13}\n",
        "prompts", "images", "all right", "colours right", "extra colour"
    );
    for (name, row, bar) in [
        (
            "one object",
            &r.single,
            format!("≥ {:.0}%", 100.0 * SINGLE_BAR),
        ),
        (
            "two objects",
            &r.pair,
            format!("≥ {:.0}%", 100.0 * PAIR_BAR),
        ),
        (
            "all",
            &r.all,
            format!("extra ≤ {:.0}%", 100.0 * EXTRA_COLOUR_BAR),
        ),
    ] {
        out += &format!(
            "{:<14} {:>6} {:>10} {:>14} {:>13}   bar {bar}\n",
            name,
            row.images,
            pct(row.all_right),
            pct(row.colours_right),
            pct(row.extra_colour)
        );
    }
    out += &format!("bars {}\n", if r.meets_bars { "met" } else { "NOT met" });
    out
}
