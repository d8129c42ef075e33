//! The procedural world: seeded scenes of flat shapes with exact masks and known attributes,
//! the data set the world's base model (`fixtures/world-sd/`) was trained on, and the oracle
//! that reads the attributes back from generated pixels.
//!
//! A scene folder written by [`write_scene_folder`] is what `mifo learn --scene` reads
//! (`img.png`, `mask0.png`, …) plus `scene.json` ([`SceneFile`]), which a learning run keeps
//! among its inputs (`world`) so that the oracle knows what each `<vK>` is.

pub mod bench;
pub mod dataset;
pub mod oracle;
pub mod quality;
pub mod scene;
pub mod score;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use scene::{
    caption, Attribute, Colour, PixelBox, SceneSpec, Shape, WorldObject, WorldScene, ATTRIBUTES,
    COLOURS, SHAPES,
};

use crate::error::{Error, Result};
use crate::learn::LearnConfig;
use crate::synth::SynthConfig;

/// Prefix of the oracle's scores stored with a run (`oracle/identity/<v0>`, …).
pub const ORACLE_PREFIX: &str = "oracle/";
/// Name of the learning-run input that holds `scene.json`.
pub const WORLD_INPUT: &str = "world";
/// File name of a scene's description in a scene folder (defined by the learning inputs, which
/// pick it up from a scene folder).
pub const SCENE_FILE: &str = crate::learn::inputs::SCENE_DESCRIPTION_FILE;
/// Version of [`SceneFile`]'s layout.
pub const SCENE_FILE_VERSION: u32 = 1;

/// The `paper` synthesis preset mapped to the world model (`fixtures/world-sd`: 64 px images,
/// 8×8 latents), as `mifo demo` and `mifo world bench` use it (the same as `mifo synth --set
/// 'synth.loss_layers=["up_blocks.1","up_blocks.2"]' --set 'synth.cluster_layers=["up_blocks.2"]'
/// --set synth.guided_steps=25 --set synth.max_step=0.2`).
///
/// * Layers. On SD (64×64 latents) the box loss and the leak read the mid block (8²) and the
///   first decoder level (16²), and mask refinement clusters the 16² maps. The world model's
///   decoder has cross-attention at 4² (`up_blocks.1`) and 8² (`up_blocks.2`) only, and its mid
///   block is 2×2, where a 20-pixel box can round to no cell at all. So the loss reads both
///   decoder levels and refinement clusters the 8² maps (the finest, as 16² is on SD's 64²).
/// * A trust region on the latent optimisation (`max_step` 0.2: no iteration moves the latent
///   by more than 0.2 root-mean-square per element), 25 guided steps of 50, and the preset's
///   step sizes (β 8 → 2). Measured with the bench's `words` row (the plain model drawing each
///   scene's own words under the same synthesis: 6 scenes × 2 layouts × 4 seeds, oracle
///   identity / leak / outside): without a bound 8 of 48 samples come out washed out (a grey
///   picture with a green smudge; none with `latent_opt` off):
///   the best unbounded setting (β 4 → 1 with `backtrack`) reached 66.7 / 13.5 / 31.8 %. With
///   the bound no sample is lost: 0.2 with β 4 → 1 86.5 / 9.9 / 37.4, with β 8 → 2 88.5 / 7.1 /
///   30.6 (with backtracking as well 88.5 / 9.7 / 32.2), with β 16 → 4 85.4 / 11.0 / 28.9;
///   bounds of 0.05, 0.1, 0.3 and 0.4 were no better. The table is in `docs/performance.md`.
///   On SD's 64×64 latents the presets keep no bound (neither the paper nor the code has one).
/// * Loss form: the preset's (`paper`).
pub fn synth_config() -> SynthConfig {
    SynthConfig {
        loss_layers: vec!["up_blocks.1".into(), "up_blocks.2".into()],
        cluster_layers: vec!["up_blocks.2".into()],
        guided_steps: 25,
        max_step: 0.2,
        ..SynthConfig::default()
    }
}

/// The `paper` learning preset mapped to the world model, as `mifo demo` and `mifo world
/// bench` use it: the attention loss weighs 0.1 in both phases instead of 0.01 (`--set
/// learn.lambda_reward=0.1 --set learn.lambda_penalty=0.1`).
///
/// On the world model the paper's 0.01 leaves the learned tokens' cross-attention where the
/// reconstruction puts it: the attention term is 1e-4 of a total near 0.02, and the share of
/// each token's attention outside its mask stays at 30–45 % through both phases — no better
/// than the colour words themselves (37 % and 29 % on the demo scene). With 0.1 the bench
/// (6 scenes × 2 layouts × 4 seeds, the synthesis mapping of the time) went from identity /
/// leak / outside 39.6 / 41.7 / 51.3 % to 42.7 / 34.0 / 43.4 %. With 1.0 the learning leak fell
/// to 0.23 in the reward phase and rose to 0.45 in the penalty phase, whose loss is also met by
/// attention that is low everywhere.
///
/// Every step learns from a recomposed image (`learn.recompose_p = 1`, not in the paper: the
/// step's instances alone, cut out and put down at random places on the background colour,
/// `learn::recompose`). Learned from the scene itself, a token drew its instance where it had
/// stood and, alone, drew two objects; on the bench (6 scenes × 2 layouts × 4 seeds, the
/// current synthesis mapping) identity / leak / outside went from 49.0 / 44.3 / 51.6 % to
/// 66.7 / 24.4 / 38.8 % (`docs/performance.md`). `--set learn.recompose_p=0` learns as the
/// paper does.
///
/// Phase B fine-tunes at [`WORLD_DREAMBOOTH_LR`] instead of the paper's 2e-6 (see there).
pub fn learn_config() -> LearnConfig {
    LearnConfig {
        lambda_reward: 0.1,
        lambda_penalty: 0.1,
        recompose_p: 1.0,
        dreambooth_lr: WORLD_DREAMBOOTH_LR,
        ..LearnConfig::paper()
    }
}

/// Phase B's learning rate on the world model: the paper's ratio of fine-tuning rate to the
/// base model's training rate (2e-6 against Stable Diffusion's 1e-4, 1/50) applied to the
/// world model's 6e-4 (`fixtures/world-sd/README.md`). At the paper's 2e-6 phase B barely
/// moves a model trained at 6e-4. On the bench (6 scenes × 2 layouts × 4 seeds, MIFO's row,
/// identity / leak / elsewhere): 2e-6 gave 64.6 / 25.7 / 18.2 %, 6e-6 69.8 / 22.9 / 16.2 %,
/// 1.2e-5 74.0 / 16.8 / 9.1 %, 2.4e-5 64.6 / 19.9 / 18.6 %, 6e-5 50.0 / 18.3 / 12.5 %.
pub const WORLD_DREAMBOOTH_LR: f64 = 1.2e-5;

/// A learning method's preset mapped to the world model, as `mifo world bench --methods` uses
/// it: `mifo` is [`learn_config`]; `break-a-scene` its preset with its loss layers at the world
/// UNet's coarsest down and up cross-attention level (`down_blocks.1`, `up_blocks.1`, 4×4), as
/// the preset's `down_blocks.2`, `up_blocks.1` are SD 2.1's 16² level at 512 px (the middle
/// block, which Break-a-Scene leaves out, stays out); `ti-m` and `db-m` their presets unchanged
/// (they have no attention loss, and their steps and rates are the paper preset's).
pub fn method_learn_config(method: crate::learn::LearnMethod) -> LearnConfig {
    use crate::learn::LearnMethod;
    match method {
        LearnMethod::Mifo => learn_config(),
        LearnMethod::BreakAScene => LearnConfig {
            attn_layers: vec!["down_blocks.1".into(), "up_blocks.1".into()],
            ..LearnConfig::break_a_scene()
        },
        LearnMethod::TiM => LearnConfig::ti_m(),
        LearnMethod::DbM => LearnConfig::db_m(),
    }
}

/// `scene.json`: what a world scene holds, object `i` being mask `i` and token `<vi>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SceneFile {
    /// Layout version ([`SCENE_FILE_VERSION`]).
    pub world: u32,
    /// What the scene was drawn from.
    pub spec: SceneSpec,
    /// The caption naming every object ("a photo of a red circle and a blue circle").
    pub caption: String,
    /// The objects in mask order.
    pub objects: Vec<SceneObject>,
}

/// One object of `scene.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SceneObject {
    /// The placeholder that learns it (`<v0>`).
    pub token: String,
    /// Its mask file in the folder.
    pub mask: String,
    /// Shape, colour and pixel box.
    #[serde(flatten)]
    pub object: WorldObject,
    /// The box in image fractions `[x0, y0, x1, y1]`, as `--box` takes it.
    pub box_fractions: [f32; 4],
}

impl SceneFile {
    /// The description of a drawn scene.
    pub fn of(scene: &WorldScene) -> SceneFile {
        SceneFile {
            world: SCENE_FILE_VERSION,
            spec: scene.spec,
            caption: scene.caption(),
            objects: scene
                .objects
                .iter()
                .enumerate()
                .map(|(i, o)| SceneObject {
                    token: format!("<v{i}>"),
                    mask: format!("mask{i}.png"),
                    object: *o,
                    box_fractions: o.bbox.fractions(scene.spec.size),
                })
                .collect(),
        }
    }

    /// Parses `scene.json` bytes; `what` names the source in errors.
    pub fn parse(bytes: &[u8], what: &Path) -> Result<SceneFile> {
        let file: SceneFile = serde_json::from_slice(bytes)
            .map_err(|e| Error::file(what, format!("not a world scene description ({e})")))?;
        if file.world != SCENE_FILE_VERSION {
            return Err(Error::file(
                what,
                format!(
                    "world scene layout {} (this mifo reads {SCENE_FILE_VERSION})",
                    file.world
                ),
            ));
        }
        if file.objects.is_empty() {
            return Err(Error::file(what, "no objects"));
        }
        Ok(file)
    }

    /// The objects, in mask order.
    pub fn world_objects(&self) -> Vec<WorldObject> {
        self.objects.iter().map(|o| o.object).collect()
    }
}

/// Writes `img.png`, `mask0.png`… and `scene.json` into `dir` (created if missing; existing
/// files of those names are replaced, a folder holding other scene files is refused).
pub fn write_scene_folder(scene: &WorldScene, dir: &Path) -> Result<SceneFile> {
    if dir.is_file() {
        return Err(Error::file(dir, "is a file, not a folder"));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // A stale mask from an earlier scene with more objects would join this scene as `<vN>`.
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().to_lowercase();
        let ours = name == "img.png"
            || name == SCENE_FILE
            || (0..scene.objects.len()).any(|i| name == format!("mask{i}.png"));
        if !ours && (name.starts_with("mask") || name.starts_with("img.")) {
            return Err(Error::file(
                dir,
                format!("already holds {name}, which would join the scene; use an empty folder"),
            ));
        }
    }
    let save = |name: &str, result: image::ImageResult<()>| {
        result.map_err(|e| Error::file(dir.join(name), format!("cannot write ({e})")))
    };
    save("img.png", scene.image.save(dir.join("img.png")))?;
    for i in 0..scene.objects.len() {
        let name = format!("mask{i}.png");
        save(&name, scene.mask(i).save(dir.join(&name)))?;
    }
    let file = SceneFile::of(scene);
    let json = serde_json::to_string_pretty(&file).expect("scene file serialises");
    let path = dir.join(SCENE_FILE);
    std::fs::write(&path, json + "\n").map_err(|e| Error::io(&path, e))?;
    Ok(file)
}
