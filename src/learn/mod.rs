//! The learning stage (paper Algorithm 1): from one image and N instance masks, learn the
//! placeholder tokens `<v0>…<vN-1>` with joint sampling, a masked reconstruction loss and the
//! cross-attention reward (phase A.1) then penalty (phase A.2), followed by an optional
//! DreamBooth phase (B) that fine-tunes the UNet and text encoder together with the tokens.
//! The baselines of the paper's Table 2 run the same loop with other choices of phases, trained
//! variables and attention loss (`learn.method`, [`LearnMethod`]).
//!
//! Determinism: every random draw of step `s` comes from an RNG seeded by `(seed, s)`, so a run
//! resumed from a checkpoint (placeholder rows, optimiser moments, fine-tuned weights) continues
//! exactly as the uninterrupted run would have.

pub mod config;
pub mod inputs;
mod learner;
pub mod losses;
pub mod method;
pub mod optim;
pub mod recompose;
pub mod sampling;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::{Device, Tensor};

pub use config::{LearnConfig, PRESETS};
pub use inputs::{load_scene, scene_files, Scene, SceneFiles};
pub use method::{LearnMethod, METHOD_NAMES};

use crate::error::{Error, Result};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::StableDiffusion;
use crate::sink::RunSink;
use learner::Learner;

/// The placeholder token of instance `i`.
pub fn token_name(i: usize) -> String {
    format!("<v{i}>")
}

/// The phase of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A.1: embeddings with the attention reward.
    Reward,
    /// A.2: embeddings with the attention penalty.
    Penalty,
    /// B: DreamBooth fine-tuning.
    DreamBooth,
}

impl Phase {
    /// Lower-case name (metric value order: reward 0, penalty 1, dreambooth 2).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Reward => "reward",
            Phase::Penalty => "penalty",
            Phase::DreamBooth => "dreambooth",
        }
    }
}

/// A saved state to resume from.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Steps completed.
    pub step: u64,
    /// Placeholder rows, optimiser moments and (phase B) fine-tuned weights.
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Serialises to safetensors bytes (the step in the metadata).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut meta = BTreeMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert("format".to_string(), "mifo-learn-checkpoint-1".to_string());
        safetensors_bytes(&self.tensors, meta)
    }

    /// Parses bytes written by [`Checkpoint::to_bytes`].
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Input(format!("checkpoint is not valid safetensors: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::Input(format!("checkpoint metadata: {e}")))?;
        let step = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("mifo"))
            .and_then(|s| serde_json::from_str::<BTreeMap<String, String>>(s).ok())
            .and_then(|m| m.get("step").and_then(|s| s.parse().ok()))
            .ok_or_else(|| Error::Input("checkpoint has no step".into()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let t = candle_core::safetensors::Load::load(&view, device)?;
            tensors.insert(name, t);
        }
        Ok(Self { step, tensors })
    }
}

/// Serialises named tensors (moved to CPU) with metadata. The metadata goes in as a single
/// key, `mifo`, holding a JSON object with sorted keys: safetensors writes its metadata map in
/// hash order, which would make equal files differ byte for byte.
pub fn safetensors_bytes(
    tensors: &HashMap<String, Tensor>,
    meta: BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let meta: HashMap<String, String> = [(
        "mifo".to_string(),
        serde_json::to_string(&meta).unwrap_or_default(),
    )]
    .into();
    let mut cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(cpu.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| Error::Input(format!("safetensors serialisation failed: {e}")))
}

/// What one learning run needs.
pub struct LearnRequest<'a> {
    /// The base model.
    pub sd: &'a StableDiffusion,
    /// The validated scene (at the model's resolution).
    pub scene: &'a Scene,
    /// The resolved configuration.
    pub config: LearnConfig,
    /// The run's seed.
    pub seed: u64,
    /// Continue from this checkpoint.
    pub resume: Option<Checkpoint>,
    /// Class images made earlier for the same model and `class_prompt` (prior preservation);
    /// missing ones are generated. Image `i` is always generated from seed `i`.
    pub class_images: Vec<image::RgbImage>,
    /// Benchmarks (`mifo bench`): run the steps only, with no checkpoints and no outputs.
    pub measure_only: bool,
}

/// Summary of a finished run.
#[derive(Clone, Debug, Default)]
pub struct LearnReport {
    /// Steps run in this call (after a resume: only the remaining ones).
    pub steps_run: u64,
    /// Whether the run stopped early because the sink asked it to.
    pub cancelled: bool,
    /// Final leak per token (fraction of attention outside its mask, last measurement).
    pub final_leak: BTreeMap<String, f64>,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Per phase run (`A`: the embedding phase, `B`: DreamBooth), the bytes of what it trains
    /// and of its optimiser, as the phase began (see [`PhaseMemory`]).
    pub memory: BTreeMap<String, PhaseMemory>,
}

/// What one learning phase holds besides the model's weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseMemory {
    /// Bytes of the trained variables: the placeholder rows, and in phase B the LoRA adapters
    /// or, with full fine-tuning, the trainable copies of the weights.
    pub trained_bytes: u64,
    /// Bytes of the optimiser's state (AdamW's two moments per variable).
    pub optimiser_bytes: u64,
}

/// On SDXL, the default layer lists (written for SD 2.1, where they name its attended decoder
/// levels at 16² and 32² latents, and the 16² encoder and decoder levels for phase B's penalty)
/// are mapped to the same structural levels of this UNet: the first two decoder levels with
/// attention (`up_blocks.0`, `up_blocks.1`: 32² and 64² latents at 1024 px in SDXL base) for the
/// attention losses, the lowest-resolution encoder level with attention and the first decoder
/// level with attention (`down_blocks.2`, `up_blocks.0`: 32²) for the penalty. Lists the user
/// set are kept. Returns whether anything changed.
pub fn xl_layer_defaults(config: &mut LearnConfig, unet: &crate::model::unet::UNetConfig) -> bool {
    let defaults = LearnConfig::paper();
    let ups: Vec<usize> = (0..unet.up_attn.len())
        .filter(|&i| unet.up_attn[i])
        .collect();
    let last_down = (0..unet.down_attn.len()).rev().find(|&i| unet.down_attn[i]);
    let mut changed = false;
    if config.attn_layers == defaults.attn_layers && !ups.is_empty() {
        config.attn_layers = ups
            .iter()
            .take(2)
            .map(|i| format!("up_blocks.{i}"))
            .collect();
        changed = true;
    }
    if config.dreambooth_penalty_layers == defaults.dreambooth_penalty_layers {
        if let (Some(d), Some(u)) = (last_down, ups.first()) {
            config.dreambooth_penalty_layers =
                vec![format!("down_blocks.{d}"), format!("up_blocks.{u}")];
            changed = true;
        }
    }
    changed
}

/// The tokenizer with `<v0>…<vN-1>` added, and their ids.
pub fn tokenizer_with_placeholders(
    base: &ClipTokenizer,
    n: usize,
) -> Result<(ClipTokenizer, Vec<u32>)> {
    let mut tok = base.clone();
    let names: Vec<String> = (0..n).map(token_name).collect();
    let ids = tok.add_tokens(&names)?;
    Ok((tok, ids))
}

/// Runs the learning stage, reporting through `sink`. Artifacts: `embeddings`
/// (safetensors, one [hidden] tensor per token), `weights` (phase B full: fine-tuned UNet and
/// text-encoder tensors named `unet.…` / `text_encoder.…`) or `lora` (phase B LoRA: adapters
/// named `unet.<module>.lora_A.weight` / `lora_B.weight`, likewise for `text_encoder.`),
/// `attn/<vK>.png`, `preview.png`, and with prior preservation `class/<i>.png`.
pub fn run(req: LearnRequest, sink: &mut dyn RunSink) -> Result<LearnReport> {
    let started = Instant::now();
    // The method's phases and losses: the learner reads the keys of what runs.
    let mut req = LearnRequest {
        config: req.config.effective(),
        ..req
    };
    if req.sd.is_xl() && xl_layer_defaults(&mut req.config, req.sd.unet.config()) {
        sink.log(&format!(
            "SDXL: attention-loss layers {:?}, phase B penalty layers {:?}",
            req.config.attn_layers, req.config.dreambooth_penalty_layers
        ))?;
    }
    let mut report = Learner::new(&req, sink)?.run(sink)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
