//! From a stored run to an [`EvalInput`]: the generated images, where each learned instance is
//! in them, the reference photo and masks of the learning run, and the SIM-C text.
//!
//! * A **synthesis** run (`--from` a learning run): its `sample_K.png`; each box whose subject is
//!   a placeholder `<vK>` gives an instance, located by the refined masks read back from
//!   `masks_K.png` (see [`crate::synth::render::decode_regions`]) — a region equal to its box is
//!   reported as `box` — or by the box when that image is missing or unreadable; a placeholder
//!   of the prompt without a box is located by the whole image.
//! * A **learning** run: its `preview.png` (“a photo of <v0> and <v1> …”), every instance
//!   located by the whole image (so only SIM-C and SIM-D).
//! * A synthesis run on a plain model has no reference instances: only SIM-C.
//!
//! Class words for the SIM-C text come from the learning run's `learn.init` (one word per
//! instance, unless `mean`), overridden by the caller's map.

use std::collections::BTreeMap;

use image::RgbImage;

use super::regions::{threshold, Region, RegionKind};
use super::score::{placeholders, sim_c_text};
use super::{EvalInput, Reference, Sample, Subject};
use crate::error::{Error, Result};
use crate::store::{BlobHash, RunId, RunKind, RunRecord, RunSpec, RunStatus};

/// Where runs and blobs are read from (the engine for the CLI, a [`crate::store::Store`] in
/// tests).
pub trait RunSource {
    /// A run's record and spec, by id or unique prefix.
    fn run(&mut self, run: &str) -> Result<(RunRecord, RunSpec)>;
    /// A blob's bytes.
    fn blob(&mut self, hash: &BlobHash) -> Result<Vec<u8>>;
}

impl RunSource for crate::store::Store {
    fn run(&mut self, run: &str) -> Result<(RunRecord, RunSpec)> {
        let id = self.resolve(run)?;
        let record = self.get_run(&id)?;
        let spec = self.spec(&record.spec_hash)?;
        Ok((record, spec))
    }
    fn blob(&mut self, hash: &BlobHash) -> Result<Vec<u8>> {
        Ok(self.read_blob(hash)?)
    }
}

/// A run made ready for [`super::evaluate`].
#[derive(Clone, Debug)]
pub struct PreparedRun {
    /// The run.
    pub id: RunId,
    /// Its kind.
    pub kind: RunKind,
    /// The prompt as the run used it.
    pub prompt: String,
    /// The learning run the references come from.
    pub learned: Option<RunId>,
    /// The scores' input.
    pub input: EvalInput,
    /// What was assumed or fell back (one line each).
    pub notes: Vec<String>,
}

fn decode_rgb(bytes: &[u8], what: &str) -> Result<RgbImage> {
    image::load_from_memory(bytes)
        .map(|i| i.to_rgb8())
        .map_err(|e| Error::Input(format!("{what}: cannot decode image ({e})")))
}

/// The class word of each placeholder a learning spec was given (`learn.init` words).
pub fn class_words(learn_spec: &RunSpec) -> BTreeMap<String, String> {
    let init = learn_spec
        .config
        .get("learn")
        .and_then(|l| l.get("init"))
        .and_then(|v| v.as_str())
        .unwrap_or("mean");
    if init == "mean" {
        return BTreeMap::new();
    }
    init.split(',')
        .enumerate()
        .filter(|(_, w)| !w.trim().is_empty())
        .map(|(i, w)| (crate::learn::token_name(i), w.trim().to_string()))
        .collect()
}

/// The reference instances of a finished learning run: its input image and masks.
pub fn references(src: &mut dyn RunSource, id: &RunId, spec: &RunSpec) -> Result<Vec<Reference>> {
    let image_hash = spec
        .inputs
        .get("image")
        .ok_or_else(|| Error::Input(format!("learning run {id} has no `image` input")))?;
    let image = decode_rgb(&src.blob(image_hash)?, &format!("run {id} input image"))?;
    let count = spec.inputs.keys().filter(|k| k.starts_with("mask")).count();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("mask{i}");
        let hash = spec
            .inputs
            .get(&name)
            .ok_or_else(|| Error::Input(format!("learning run {id} has no `{name}` input")))?;
        let bytes = src.blob(hash)?;
        let mask = image::load_from_memory(&bytes)
            .map_err(|e| Error::Input(format!("run {id} input {name}: cannot decode ({e})")))?;
        let grey = crate::imageio::mask_channel(&mask);
        if grey.dimensions() != image.dimensions() {
            return Err(Error::Input(format!(
                "run {id}: {name} is {}x{}, the image {}x{}",
                grey.width(),
                grey.height(),
                image.width(),
                image.height()
            )));
        }
        out.push(Reference {
            name: crate::learn::token_name(i),
            image: image.clone(),
            region: Region {
                kind: RegionKind::Mask,
                pixels: Some(threshold(&grey)),
            },
        });
    }
    Ok(out)
}

/// Gathers everything [`super::evaluate`] needs for `run` (id or prefix). `classes` override
/// the learning run's class words. The run must be `done`.
pub fn prepare(
    src: &mut dyn RunSource,
    run: &str,
    classes: &BTreeMap<String, String>,
) -> Result<PreparedRun> {
    let (record, spec) = src.run(run)?;
    let id = record.id.clone();
    if record.status != RunStatus::Done {
        return Err(Error::Input(format!(
            "run {id} is {}; only finished (done) runs can be evaluated",
            record.status
        )));
    }
    let mut notes = Vec::new();
    let output = |name: &str| record.outputs.get(name).copied();
    match record.kind {
        RunKind::Learn => {
            let hash = output("preview.png").ok_or_else(|| {
                Error::Input(format!(
                    "learning run {id} has no preview.png to evaluate (learn.preview was off)"
                ))
            })?;
            let image = decode_rgb(&src.blob(&hash)?, &format!("run {id} preview.png"))?;
            let refs = references(src, &id, &spec)?;
            let names: Vec<String> = refs.iter().map(|r| r.name.clone()).collect();
            let prompt = format!("a photo of {}", names.join(" and "));
            let mut words = class_words(&spec);
            words.extend(classes.clone());
            notes.push("the preview has no boxes: instances are located by the whole image (no NSIM-D, no CS)".into());
            let subjects = names
                .iter()
                .enumerate()
                .map(|(k, n)| Subject {
                    name: n.clone(),
                    instance: k,
                    region: Region::whole(),
                })
                .collect();
            Ok(PreparedRun {
                id,
                kind: RunKind::Learn,
                input: EvalInput {
                    text: Some(sim_c_text(&prompt, &words)),
                    references: refs,
                    samples: vec![Sample {
                        name: "preview.png".into(),
                        image,
                        subjects,
                    }],
                },
                prompt,
                learned: Some(record.id.clone()),
                notes,
            })
        }
        RunKind::Synth => {
            let prompt = spec
                .config
                .get("prompt")
                .and_then(|p| p.as_str())
                .ok_or_else(|| Error::Input(format!("run {id}: its spec has no prompt")))?
                .to_string();
            let boxes = crate::synth::boxes::stored_boxes(&spec.config)?;
            let (refs, mut words) = match &spec.parent {
                Some(parent) => {
                    let (prec, pspec) = src.run(parent.as_str())?;
                    (references(src, &prec.id, &pspec)?, class_words(&pspec))
                }
                None => {
                    notes.push("no learning run behind it: SIM-C only".into());
                    (Vec::new(), BTreeMap::new())
                }
            };
            words.extend(classes.clone());
            let mut samples = Vec::new();
            for k in 0.. {
                let Some(hash) = output(&format!("sample_{k}.png")) else {
                    break;
                };
                let image = decode_rgb(&src.blob(&hash)?, &format!("run {id} sample_{k}.png"))?;
                let (w, h) = image.dimensions();
                let box_masks: Vec<Vec<bool>> = boxes
                    .iter()
                    .map(|b| crate::synth::boxes::box_mask(&b.rect, h as usize, w as usize))
                    .collect();
                let decoded = match output(&format!("masks_{k}.png")) {
                    Some(mh) if !boxes.is_empty() => {
                        let drawn =
                            decode_rgb(&src.blob(&mh)?, &format!("run {id} masks_{k}.png"))?;
                        let d = crate::synth::render::decode_regions(&image, &drawn, boxes.len());
                        if d.is_none() {
                            notes.push(format!(
                                "masks_{k}.png could not be read back: the boxes are used"
                            ));
                        }
                        d
                    }
                    _ => None,
                };
                let mut subjects = Vec::new();
                for (bi, b) in boxes.iter().enumerate() {
                    let Some(instance) = refs.iter().position(|r| r.name == b.subject) else {
                        continue;
                    };
                    let region = match decoded.as_ref().map(|d| &d[bi]) {
                        Some(m) if m.iter().any(|&x| x) && *m != box_masks[bi] => Region {
                            kind: RegionKind::Mask,
                            pixels: Some(m.clone()),
                        },
                        _ if box_masks[bi].iter().any(|&x| x) => Region {
                            kind: RegionKind::Box,
                            pixels: Some(box_masks[bi].clone()),
                        },
                        _ => {
                            notes.push(format!(
                                "sample_{k}: the region of {} is empty; skipped",
                                b.subject
                            ));
                            continue;
                        }
                    };
                    subjects.push(Subject {
                        name: b.subject.clone(),
                        instance,
                        region,
                    });
                }
                for p in placeholders(&prompt) {
                    if boxes.iter().any(|b| b.subject == p) {
                        continue;
                    }
                    if let Some(instance) = refs.iter().position(|r| r.name == p) {
                        if k == 0 {
                            notes.push(format!("{p} has no box: located by the whole image"));
                        }
                        subjects.push(Subject {
                            name: p,
                            instance,
                            region: Region::whole(),
                        });
                    }
                }
                samples.push(Sample {
                    name: format!("sample_{k}.png"),
                    image,
                    subjects,
                });
            }
            if samples.is_empty() {
                return Err(Error::Input(format!(
                    "synthesis run {id} has no sample_K.png outputs"
                )));
            }
            Ok(PreparedRun {
                id,
                kind: RunKind::Synth,
                input: EvalInput {
                    text: Some(sim_c_text(&prompt, &words)),
                    references: refs,
                    samples,
                },
                prompt,
                learned: spec.parent.clone(),
                notes,
            })
        }
    }
}
