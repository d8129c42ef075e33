//! Scoring a stored synthesis run with the oracle: its samples, its boxes, and the attributes of
//! the instances its learning run learned from a world scene (`scene.json` kept as the learning
//! run's `world` input) — or, for a run drawn by the plain model, the world objects its boxes
//! name (`red circle`): the ceiling that the scene's own words reach.

use std::collections::BTreeMap;

use serde::Serialize;

use super::oracle::{judge, Reading, SubjectScores, SubjectVerdict};
use super::scene::{Colour, Shape};
use super::{SceneFile, ORACLE_PREFIX, WORLD_INPUT};
use crate::error::{Error, Result};
use crate::eval::run::RunSource;
use crate::store::{RunId, RunKind, RunStatus};
use crate::synth::boxes::box_mask;

/// The oracle's verdicts on one stored synthesis run.
#[derive(Clone, Debug, Serialize)]
pub struct RunVerdicts {
    /// The synthesis run.
    pub run: RunId,
    /// The learning run behind it (`None`: drawn by the plain model, its boxes naming world
    /// objects, `red circle`).
    pub learned: Option<RunId>,
    /// The run's prompt.
    pub prompt: String,
    /// The world scene the instances were learned from (`None` as for `learned`).
    pub scene: Option<SceneFile>,
    /// Per boxed subject, the shape and colour the oracle expects in its box.
    pub kinds: BTreeMap<String, (Shape, Colour)>,
    /// Per sample (`sample_K.png`), the verdict on each boxed placeholder, in box order.
    pub samples: Vec<Vec<(String, SubjectVerdict)>>,
    /// Per placeholder, the sums over the samples (see [`SubjectScores::means`]).
    pub subjects: BTreeMap<String, SubjectScores>,
}

impl RunVerdicts {
    /// The scores to store: `oracle/<measure>/<vK>` per placeholder and `oracle/<measure>`, the
    /// mean over placeholders.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        let means: Vec<SubjectScores> = self.subjects.values().map(|s| s.means()).collect();
        for (token, m) in self.subjects.keys().zip(&means) {
            out.extend(m.metrics(token));
        }
        let n = means.len().max(1) as f64;
        for (i, (what, _)) in SubjectScores::default().named().iter().enumerate() {
            let mean = means.iter().map(|m| m.named()[i].1).sum::<f64>() / n;
            out.push((format!("{ORACLE_PREFIX}{what}"), mean));
        }
        out
    }
}

fn decode(bytes: &[u8], what: &str) -> Result<image::RgbImage> {
    image::load_from_memory(bytes)
        .map(|i| i.to_rgb8())
        .map_err(|e| Error::Input(format!("{what}: cannot decode image ({e})")))
}

/// The world scene a learning run learned from, or an error saying why there is none.
pub fn learned_scene(src: &mut dyn RunSource, learn_run: &str) -> Result<(RunId, SceneFile)> {
    let (record, spec) = src.run(learn_run)?;
    let hash = spec.inputs.get(WORLD_INPUT).ok_or_else(|| {
        Error::Input(format!(
            "run {}: not learned from a world scene (no scene.json among its inputs; make scenes with `mifo world scene`)",
            record.id
        ))
    })?;
    let bytes = src.blob(hash)?;
    let scene = SceneFile::parse(&bytes, std::path::Path::new("scene.json"))?;
    Ok((record.id, scene))
}

/// Judges every sample of finished synthesis run `run` (id or prefix) whose learning run came
/// from the world. Errors (one line) when the run is not such a run.
pub fn score_run(src: &mut dyn RunSource, run: &str) -> Result<RunVerdicts> {
    let (record, spec) = src.run(run)?;
    let id = record.id.clone();
    if record.kind != RunKind::Synth {
        return Err(Error::Input(format!(
            "run {id} is a {} run; the oracle scores synthesis runs (`mifo synth --from` a run learned on a world scene)",
            record.kind.as_str()
        )));
    }
    if record.status != RunStatus::Done {
        return Err(Error::Input(format!(
            "run {id} is {}; only finished (done) runs can be scored",
            record.status
        )));
    }
    let prompt = spec
        .config
        .get("prompt")
        .and_then(|p| p.as_str())
        .unwrap_or_default()
        .to_string();
    let boxes = crate::synth::boxes::stored_boxes(&spec.config)?;
    // (subject, its index among the instances, its box)
    let (learned, scene, instances, subjects): (_, _, Vec<(Shape, Colour)>, Vec<_>) = match spec
        .parent
        .as_ref()
    {
        Some(parent) => {
            let (learned, scene) = learned_scene(src, parent.as_str())?;
            let subjects: Vec<(String, usize, [f32; 4])> = boxes
                .iter()
                .filter_map(|b| {
                    scene
                        .objects
                        .iter()
                        .position(|o| o.token == b.subject)
                        .map(|k| (b.subject.clone(), k, b.rect))
                })
                .collect();
            if subjects.is_empty() {
                return Err(Error::Input(format!(
                    "run {id}: no box holds a learned placeholder ({}), nothing to score",
                    scene
                        .objects
                        .iter()
                        .map(|o| o.token.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let instances = scene.objects.iter().map(|o| o.object.kind()).collect();
            (Some(learned), Some(scene), instances, subjects)
        }
        None => {
            let kinds: Option<Vec<(Shape, Colour)>> =
                boxes.iter().map(|b| noun_phrase_kind(&b.subject)).collect();
            let kinds = kinds.filter(|k| !k.is_empty()).ok_or_else(|| {
                    Error::Input(format!(
                        "run {id}: synthesised from a plain model, not from instances learned on a world scene, and its boxes do not all name world objects (`red circle`)"
                    ))
                })?;
            let subjects = boxes
                .iter()
                .enumerate()
                .map(|(k, b)| (b.subject.clone(), k, b.rect))
                .collect();
            (None, None, kinds, subjects)
        }
    };
    let kinds = subjects
        .iter()
        .map(|(s, k, _)| (s.clone(), instances[*k]))
        .collect();
    let mut samples = Vec::new();
    let mut sums: BTreeMap<String, SubjectScores> = BTreeMap::new();
    for k in 0.. {
        let Some(hash) = record.outputs.get(&format!("sample_{k}.png")).copied() else {
            break;
        };
        let image = decode(&src.blob(&hash)?, &format!("run {id} sample_{k}.png"))?;
        let (w, h) = image.dimensions();
        let reading = Reading::of(&image);
        let mut verdicts = Vec::new();
        for (token, instance, rect) in &subjects {
            let mask = box_mask(rect, h as usize, w as usize);
            let v = judge(&image, &reading, &instances, *instance, &mask);
            sums.entry(token.clone()).or_default().add(&v);
            verdicts.push((token.clone(), v));
        }
        samples.push(verdicts);
    }
    if samples.is_empty() {
        return Err(Error::Input(format!("run {id}: no sample_K.png outputs")));
    }
    Ok(RunVerdicts {
        run: id,
        learned,
        prompt,
        scene,
        kinds,
        samples,
        subjects: sums,
    })
}

/// The world object a box subject names (`red circle`, `a red circle`), if it names one.
pub fn noun_phrase_kind(subject: &str) -> Option<(Shape, Colour)> {
    let words: Vec<&str> = subject
        .split_whitespace()
        .filter(|w| !w.eq_ignore_ascii_case("a"))
        .collect();
    match words.as_slice() {
        [colour, shape] => Some((shape.parse().ok()?, colour.parse().ok()?)),
        _ => None,
    }
}

/// The mean, over runs, of each run's headline scores (`oracle/identity`, … — the means over
/// placeholders, not the per-placeholder series): one row of a tag or bench table.
pub fn mean_of_runs<'a>(
    runs: impl ExactSizeIterator<Item = &'a BTreeMap<String, f64>>,
) -> BTreeMap<String, f64> {
    let n = runs.len().max(1) as f64;
    let mut mean: BTreeMap<String, f64> = BTreeMap::new();
    for m in runs {
        for (k, v) in m {
            if k.strip_prefix(ORACLE_PREFIX)
                .is_some_and(|rest| !rest.contains('/'))
            {
                *mean.entry(k.clone()).or_default() += v / n;
            }
        }
    }
    mean
}

/// The table `mifo world score` prints for one run.
pub fn report(v: &RunVerdicts) -> String {
    let mut out = format!(
        "run {}  from {}  \"{}\"  {} sample(s)\n",
        v.run,
        v.learned.as_ref().map_or(
            "the plain model (world words)".to_string(),
            ToString::to_string
        ),
        v.prompt,
        v.samples.len()
    );
    out += &format!(
        "  {:<6} {:<16} {:>8} {:>8} {:>7} {:>6} {:>7} {:>8} {:>9}\n",
        "", "instance", "present", "identity", "colour", "shape", "leak", "outside", "elsewhere"
    );
    let pct = |x: f64| format!("{:.0}%", 100.0 * x);
    let pct1 = |x: f64| format!("{:.1}%", 100.0 * x);
    let line = |name: &str, what: &str, m: &SubjectScores| {
        format!(
            "  {:<6} {:<16} {:>8} {:>8} {:>7} {:>6} {:>7} {:>8} {:>9}\n",
            name,
            what,
            pct(m.present),
            pct(m.identity),
            pct(m.colour),
            pct(m.shape),
            pct1(m.leak),
            pct1(m.outside),
            pct1(m.elsewhere)
        )
    };
    let mut all = SubjectScores::default();
    for (token, sums) in &v.subjects {
        let what = v
            .kinds
            .get(token)
            .map(|(shape, colour)| format!("{colour} {shape}"))
            .unwrap_or_default();
        let m = sums.means();
        out += &line(token, &what, &m);
        all.samples += 1;
        all.present += m.present;
        all.identity += m.identity;
        all.colour += m.colour;
        all.shape += m.shape;
        all.leak += m.leak;
        all.outside += m.outside;
        all.elsewhere += m.elsewhere;
    }
    if v.subjects.len() > 1 {
        out += &line("mean", "", &all.means());
    }
    out
}
