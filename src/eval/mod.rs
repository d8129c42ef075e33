//! Evaluation as in the paper (App. C.4, Tables 2–3): SIM-C, SIM-D, NSIM-D and the composite
//! score CS, with CLIP and DINO written here on [`crate::model::nn`]'s building blocks.
//!
//! # Definitions (what the paper leaves open is settled as in the research notes §7)
//! * **SIM-C** — cosine similarity of the CLIP image embedding of a generated image and the CLIP
//!   text embedding of its prompt (projected features, as `CLIPModel.get_*_features`). The
//!   prompt's placeholders become the instances' class words where the user gave them
//!   (`learn.init` words, or `mifo eval --class`), otherwise they are dropped
//!   ([`score::sim_c_text`]).
//! * **SIM-D** — cosine similarity of DINO class-token features of an instance's region in the
//!   generated image and of the same instance in the reference image (the learning run's input
//!   photo and mask), both black outside the instance (Break-a-Scene's practice) and, by default,
//!   cut to the region's bounding box and padded square ([`regions`]). The region in a generated
//!   image is the subject's refined mask from the synthesis (read back from `masks_K.png`), else
//!   its box, else (no box at all) the whole image.
//! * **NSIM-D** — the same against every *other* instance of the reference image, averaged over
//!   them; only for instances with a box or mask (a whole image holds every instance) and when
//!   the learned run has at least two instances.
//! * **CS** = SIM-C · SIM-D · (1 − NSIM-D).
//!
//! A run's SIM-C is the mean over its samples; SIM-D and NSIM-D are means over every (sample,
//! instance) pair; CS is computed from those means (as the paper's Table 3 values are). The
//! scores are stored with the run as metrics (one point at step 0): `eval/sim_c`,
//! `eval/sim_d`, `eval/nsim_d`, `eval/cs`, per instance `eval/sim_d/<vK>` and
//! `eval/nsim_d/<vK>`, and `eval/setup` (an id of the models and options used).

pub mod clip;
pub mod dino;
pub mod preprocess;
pub mod regions;
pub mod run;
pub mod score;
pub mod suite;
pub mod table;
pub mod vit;

use image::RgbImage;
use serde::Serialize;

pub use clip::ClipModel;
pub use dino::Dino;
pub use regions::{CropMode, Region, RegionKind};

use crate::error::{Error, Result};

/// Prefix of every evaluation metric.
pub const METRIC_PREFIX: &str = "eval/";
/// Metric holding the id of the models and options a run was evaluated with (48 bits of a
/// blake3, exact in an f64).
pub const SETUP_METRIC: &str = "eval/setup";

/// The feature extractors the scores need (the real models, or stand-ins in tests).
pub trait Encoders {
    /// CLIP image features, one vector per image.
    fn clip_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>>;
    /// CLIP text features of `text`.
    fn clip_text(&self, text: &str) -> Result<Vec<f32>>;
    /// DINO features, one vector per image.
    fn dino(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>>;
}

/// CLIP and DINO loaded from their folders.
pub struct Models {
    /// The image–text model.
    pub clip: ClipModel,
    /// The image feature model.
    pub dino: Dino,
}

impl Encoders for Models {
    fn clip_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        self.clip.image_embeds(images)
    }
    fn clip_text(&self, text: &str) -> Result<Vec<f32>> {
        Ok(self.clip.text_embeds(text)?.to_vec1::<f32>()?)
    }
    fn dino(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        self.dino.features(images)
    }
}

/// One instance of the reference image (the learning run's input).
#[derive(Clone, Debug)]
pub struct Reference {
    /// Its placeholder, `<vK>`.
    pub name: String,
    /// The reference photo.
    pub image: RgbImage,
    /// The instance's mask.
    pub region: Region,
}

/// An instance as drawn in a generated image.
#[derive(Clone, Debug)]
pub struct Subject {
    /// Its placeholder.
    pub name: String,
    /// Index into [`EvalInput::references`].
    pub instance: usize,
    /// Where it is in the image.
    pub region: Region,
}

/// One generated image.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Its output name (`sample_0.png`, `preview.png`).
    pub name: String,
    /// The image.
    pub image: RgbImage,
    /// The learned instances in it.
    pub subjects: Vec<Subject>,
}

/// Everything the scores of one run are computed from.
#[derive(Clone, Debug)]
pub struct EvalInput {
    /// The SIM-C text; `None` skips SIM-C.
    pub text: Option<String>,
    /// The reference instances.
    pub references: Vec<Reference>,
    /// The generated images.
    pub samples: Vec<Sample>,
}

/// One instance in one sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SubjectScore {
    /// Its placeholder.
    pub name: String,
    /// The region used.
    pub region: RegionKind,
    /// SIM-D.
    pub sim_d: f64,
    /// NSIM-D (`None` without a localised region or another instance).
    pub nsim_d: Option<f64>,
}

/// The scores of one sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SampleScore {
    /// Its output name.
    pub name: String,
    /// SIM-C.
    pub sim_c: Option<f64>,
    /// Per instance.
    pub subjects: Vec<SubjectScore>,
}

/// Means of one instance over the samples.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceScore {
    /// Its placeholder.
    pub name: String,
    /// Mean SIM-D.
    pub sim_d: f64,
    /// Mean NSIM-D.
    pub nsim_d: Option<f64>,
    /// Samples it was scored in.
    pub count: usize,
}

/// The scores of one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scores {
    /// The SIM-C text.
    pub text: Option<String>,
    /// Mean SIM-C.
    pub sim_c: Option<f64>,
    /// Mean SIM-D.
    pub sim_d: Option<f64>,
    /// Mean NSIM-D.
    pub nsim_d: Option<f64>,
    /// CS from the three means.
    pub cs: Option<f64>,
    /// Per instance.
    pub instances: Vec<InstanceScore>,
    /// Per sample.
    pub samples: Vec<SampleScore>,
}

impl Scores {
    /// The metrics stored with the run: `eval/sim_c`, `eval/sim_d`, `eval/nsim_d`, `eval/cs`,
    /// `eval/sim_d/<vK>`, `eval/nsim_d/<vK>` (those that are defined).
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (name, v) in [
            ("sim_c", self.sim_c),
            ("sim_d", self.sim_d),
            ("nsim_d", self.nsim_d),
            ("cs", self.cs),
        ] {
            if let Some(v) = v {
                out.push((format!("{METRIC_PREFIX}{name}"), v));
            }
        }
        for i in &self.instances {
            out.push((format!("{METRIC_PREFIX}sim_d/{}", i.name), i.sim_d));
            if let Some(n) = i.nsim_d {
                out.push((format!("{METRIC_PREFIX}nsim_d/{}", i.name), n));
            }
        }
        out
    }
}

/// Computes the scores of `input` with `enc`, framing instance images by `mode`.
pub fn evaluate(input: &EvalInput, enc: &dyn Encoders, mode: CropMode) -> Result<Scores> {
    if input.samples.is_empty() {
        return Err(Error::Input("no generated images to evaluate".into()));
    }
    // SIM-C.
    let text = match &input.text {
        Some(t) => Some(enc.clip_text(t)?),
        None => None,
    };
    let sim_c: Vec<Option<f64>> = match &text {
        Some(t) => {
            let images: Vec<RgbImage> = input.samples.iter().map(|s| s.image.clone()).collect();
            enc.clip_images(&images)?
                .iter()
                .map(|f| Some(score::cosine(f, t)))
                .collect()
        }
        None => vec![None; input.samples.len()],
    };
    // Reference features.
    let refs: Vec<RgbImage> = input
        .references
        .iter()
        .map(|r| {
            regions::isolate(&r.image, &r.region, mode)
                .map_err(|e| Error::Input(format!("reference {}: {e}", r.name)))
        })
        .collect::<Result<_>>()?;
    let ref_features = if refs.is_empty() {
        Vec::new()
    } else {
        enc.dino(&refs)?
    };
    // Instance crops of every sample.
    let mut crops = Vec::new();
    let mut owners = Vec::new();
    for (si, s) in input.samples.iter().enumerate() {
        for (j, subj) in s.subjects.iter().enumerate() {
            if subj.instance >= ref_features.len() {
                return Err(Error::Input(format!(
                    "{}: {} has no reference instance",
                    s.name, subj.name
                )));
            }
            crops.push(
                regions::isolate(&s.image, &subj.region, mode)
                    .map_err(|e| Error::Input(format!("{} {}: {e}", s.name, subj.name)))?,
            );
            owners.push((si, j));
        }
    }
    let crop_features = if crops.is_empty() {
        Vec::new()
    } else {
        enc.dino(&crops)?
    };
    let mut samples: Vec<SampleScore> = input
        .samples
        .iter()
        .zip(&sim_c)
        .map(|(s, c)| SampleScore {
            name: s.name.clone(),
            sim_c: *c,
            subjects: Vec::new(),
        })
        .collect();
    for ((si, j), f) in owners.into_iter().zip(&crop_features) {
        let subj = &input.samples[si].subjects[j];
        let k = subj.instance;
        let sim_d = score::cosine(f, &ref_features[k]);
        let others: Vec<f64> = ref_features
            .iter()
            .enumerate()
            .filter(|(o, _)| *o != k)
            .map(|(_, r)| score::cosine(f, r))
            .collect();
        let nsim_d = if subj.region.is_localised() {
            score::mean(&others)
        } else {
            None
        };
        samples[si].subjects.push(SubjectScore {
            name: subj.name.clone(),
            region: subj.region.kind,
            sim_d,
            nsim_d,
        });
    }
    // Means.
    let all: Vec<&SubjectScore> = samples.iter().flat_map(|s| &s.subjects).collect();
    let sim_c_mean = score::mean(&sim_c.iter().flatten().copied().collect::<Vec<_>>());
    let sim_d = score::mean(&all.iter().map(|s| s.sim_d).collect::<Vec<_>>());
    let nsim_d = score::mean(&all.iter().filter_map(|s| s.nsim_d).collect::<Vec<_>>());
    let cs = match (sim_c_mean, sim_d, nsim_d) {
        (Some(c), Some(d), Some(n)) => Some(score::composite(c, d, n)),
        _ => None,
    };
    let mut instances = Vec::new();
    for r in &input.references {
        let mine: Vec<&&SubjectScore> = all.iter().filter(|s| s.name == r.name).collect();
        if let Some(sim) = score::mean(&mine.iter().map(|s| s.sim_d).collect::<Vec<_>>()) {
            instances.push(InstanceScore {
                name: r.name.clone(),
                sim_d: sim,
                nsim_d: score::mean(&mine.iter().filter_map(|s| s.nsim_d).collect::<Vec<_>>()),
                count: mine.len(),
            });
        }
    }
    Ok(Scores {
        text: input.text.clone(),
        sim_c: sim_c_mean,
        sim_d,
        nsim_d,
        cs,
        instances,
        samples,
    })
}
