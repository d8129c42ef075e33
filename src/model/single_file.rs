//! Single-file Stable Diffusion checkpoints (`.safetensors` in the original CompVis / Stability
//! layout, as A1111 and ComfyUI keep them), mapped to the diffusers names the components load,
//! in memory (nothing is written to disk).
//!
//! | part | original prefix | diffusers component |
//! | --- | --- | --- |
//! | UNet | `model.diffusion_model.` (`input_blocks`, `middle_block`, `output_blocks`, `time_embed`, `out`; SDXL's `label_emb.0.{0,2}` → `add_embedding.linear_{1,2}`) | `unet` |
//! | VAE | `first_stage_model.` (`encoder.down.I.block.J`, `decoder.up.I` numbered from the lowest resolution, `mid.attn_1` with 1×1-conv q/k/v) | `vae` |
//! | text encoder, SD 1.x | `cond_stage_model.transformer.` (a transformers `CLIPTextModel`, with or without `text_model.`) | `text_encoder` |
//! | text encoder, SD 2.x | `cond_stage_model.model.` (OpenCLIP: `transformer.resblocks.N`, fused `attn.in_proj_weight`, `ln_final`, `positional_embedding`) | `text_encoder` |
//! | text encoder, SDXL | `conditioner.embedders.0.transformer.` (CLIP ViT-L, transformers names) | `text_encoder` |
//! | text encoder 2, SDXL | `conditioner.embedders.1.model.` (OpenCLIP bigG as SD 2.x's, every block used, `text_projection` [width, projection] transposed to `text_projection.weight`) | `text_encoder_2` |
//!
//! The architecture is recognised from the keys: SD 1.x by `cond_stage_model.transformer.*`,
//! SD 2.x by `cond_stage_model.model.*`, SDXL by `conditioner.embedders.*` with both of SDXL
//! base's encoders (an SDXL refiner, with OpenCLIP alone under `conditioner.embedders.0.`, is
//! refused), anything else refused naming the first key that fits no layout. EMA copies
//! (`model_ema.*`), the DDPM schedule buffers (`betas`, `alphas_cumprod`, …), SD 2.x's OpenCLIP
//! `text_projection`, `logit_scale` and the VAE's training loss (`first_stage_model.loss.*`)
//! are ignored. SD 2.x stores one more OpenCLIP block than the diffusers text encoder uses
//! (SD 2.x takes the penultimate layer), so its last block is read but unused.
//!
//! Configs come from `--model-config DIR` (a diffusers folder: `unet/config.json`,
//! `vae/config.json`, `text_encoder/config.json`, `scheduler/scheduler_config.json`,
//! `tokenizer/`; for SDXL `text_encoder_2/config.json`, `tokenizer_2/` and `model_index.json`'s
//! `force_zeros_for_empty_prompt`) when given; a folder whose UNet takes SDXL's added
//! conditioning is refused for an SD 1.x/2.x file and the other way round. Otherwise they are
//! inferred from the tensor shapes (levels, widths, layers per block, attention placement and
//! depth, linear or conv projections, text encoder widths, depths and projection, SDXL's
//! time-id embedding width) plus what the weights cannot tell, taken as the real models'
//! values: 32 norm groups, 8 heads (SD 1.x) or heads of 64 channels (SD 2.x, SDXL), VAE scaling
//! 0.18215 (SDXL: 0.13025 and `force_upcast`), 512 px (SDXL: 1024) and the ε-prediction DDPM
//! schedule of SD 1.x, SD 2.x-*base* and SDXL base (a 768-v SD 2.x model needs
//! `--model-config`); SDXL's encoder configs get `eos_token_id` 2, as SDXL base's say. So
//! without `--model-config` only the real SD 1.x / 2.x / XL sizes (UNet base width 320, VAE
//! 128, the text widths) are accepted; any other size is refused, asking for `--model-config`.
//! The tokenizer is then the CLIP BPE vocabulary mifo bundles ([`ClipTokenizer::bundled`]),
//! with `<|endoftext|>` padding for SD 1.x and SDXL's first tokenizer and `!` for SD 2.x and
//! SDXL's second, as their tokenizer folders have.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::config::ConfigJson;
use super::tokenizer::ClipTokenizer;
use crate::error::{Error, Result};

/// The Stable Diffusion generation a single file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: OpenAI CLIP ViT-L text encoder (`cond_stage_model.transformer.*`).
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder (`cond_stage_model.model.*`).
    Sd2,
    /// SDXL (base 1.0 architecture): CLIP ViT-L (`conditioner.embedders.0.transformer.*`) and
    /// OpenCLIP bigG (`conditioner.embedders.1.model.*`), the UNet's added conditioning in
    /// `label_emb`.
    Sdxl,
}

impl Family {
    /// `SD 1.x` / `SD 2.x` / `SDXL`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        }
    }
}

/// The components of a pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// `unet`.
    Unet,
    /// `vae`.
    Vae,
    /// `text_encoder`.
    TextEncoder,
    /// `text_encoder_2` (SDXL).
    TextEncoder2,
}

/// What one key of the file becomes.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// Not used by mifo (EMA copies, schedule buffers, …).
    Ignore,
    /// The tensor under a diffusers name.
    Plain(Part, String),
    /// A 1×1 convolution weight `[o, i, 1, 1]` used as a linear weight `[o, i]`.
    Squeeze(Part, String),
    /// A fused q/k/v projection (`[3C, …]`), split in three along dim 0.
    SplitQkv(Part, [String; 3]),
    /// A matrix stored the other way round (OpenCLIP's `text_projection` [in, out], applied as
    /// `x @ P`), transposed to a linear weight [out, in].
    Transpose(Part, String),
}

/// One tensor's entry in the file's header.
#[derive(Clone, Debug)]
struct Entry {
    shape: Vec<usize>,
}

/// A single-file checkpoint, read and understood from its header alone (no tensor data): its
/// family, the key mapping, and the configs and tokenizer source of each component.
pub struct Plan {
    /// The checkpoint file.
    pub path: PathBuf,
    /// SD 1.x, 2.x or XL.
    pub family: Family,
    /// The `--model-config` folder, when given.
    pub config_dir: Option<PathBuf>,
    /// `unet/config.json` (read or inferred).
    pub unet: ConfigJson,
    /// `vae/config.json` (read or inferred).
    pub vae: ConfigJson,
    /// `text_encoder/config.json` (read or inferred).
    pub text_encoder: ConfigJson,
    /// `text_encoder_2/config.json` (SDXL only; read or inferred).
    pub text_encoder_2: Option<ConfigJson>,
    /// `scheduler/scheduler_config.json` (read or Stable Diffusion's).
    pub scheduler: ConfigJson,
    /// SDXL: an empty negative prompt is all zeros (`force_zeros_for_empty_prompt` of the
    /// `--model-config` folder's `model_index.json`; true without one, as for SDXL base).
    pub force_zeros_for_empty_prompt: bool,
    targets: Vec<(String, Target)>,
}

/// The configs of a single file's components.
struct Configs {
    unet: ConfigJson,
    vae: ConfigJson,
    text_encoder: ConfigJson,
    text_encoder_2: Option<ConfigJson>,
    scheduler: ConfigJson,
}

/// Keys at the top level of the file that hold nothing mifo uses (the DDPM schedule, which the
/// scheduler config gives, and training-time buffers).
const IGNORED_KEYS: &[&str] = &[
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "lvlb_weights",
];

impl Plan {
    /// Reads the header of `path` (refusing a truncated or malformed file), recognises the
    /// architecture, maps every key, and reads the configs from `config_dir` or infers them.
    /// Every refusal is one line naming the file.
    pub fn inspect(path: &Path, config_dir: Option<&Path>) -> Result<Self> {
        let header = super::weights::read_header(path)?;
        let mut entries = BTreeMap::new();
        for (name, value) in header.iter().filter(|(k, _)| *k != "__metadata__") {
            let shape = value["shape"]
                .as_array()
                .and_then(|dims| {
                    dims.iter()
                        .map(|d| d.as_u64().map(|d| d as usize))
                        .collect()
                })
                .ok_or_else(|| {
                    Error::file(
                        path,
                        format!("tensor `{name}` has no valid shape in the header"),
                    )
                })?;
            entries.insert(name.clone(), Entry { shape });
        }
        let family = recognise(path, &entries)?;
        let layout = Layout::of(path, &entries)?;
        let mut targets = Vec::with_capacity(entries.len());
        for name in entries.keys() {
            let target = layout.map(family, name).ok_or_else(|| {
                Error::file(
                    path,
                    format!(
                        "unknown key `{name}`: not the {} single-file layout mifo reads",
                        family.name()
                    ),
                )
            })?;
            targets.push((name.clone(), target));
        }
        let configs = match config_dir {
            Some(dir) => {
                let read = |rel: &str| ConfigJson::read(&dir.join(rel));
                let unet = read("unet/config.json")?;
                check_added_conditioning(path, family, &unet)?;
                Configs {
                    unet,
                    vae: read("vae/config.json")?,
                    text_encoder: read("text_encoder/config.json")?,
                    text_encoder_2: match family {
                        Family::Sdxl => Some(read("text_encoder_2/config.json")?),
                        _ => None,
                    },
                    scheduler: read("scheduler/scheduler_config.json")?,
                }
            }
            None => infer_configs(path, family, &layout, &entries)?,
        };
        let force_zeros_for_empty_prompt = match (family, config_dir) {
            (Family::Sdxl, Some(dir)) if dir.join("model_index.json").is_file() => {
                super::sdxl::force_zeros_for_empty_prompt(dir)?
            }
            _ => true,
        };
        Ok(Self {
            path: path.to_path_buf(),
            family,
            config_dir: config_dir.map(Path::to_path_buf),
            unet: configs.unet,
            vae: configs.vae,
            text_encoder: configs.text_encoder,
            text_encoder_2: configs.text_encoder_2,
            scheduler: configs.scheduler,
            force_zeros_for_empty_prompt,
            targets,
        })
    }

    /// The tokenizer: the `--model-config` folder's `tokenizer/`, else the bundled CLIP
    /// vocabulary with this family's pad token.
    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        match &self.config_dir {
            Some(dir) => ClipTokenizer::from_dir(&dir.join("tokenizer")),
            None => ClipTokenizer::bundled(match self.family {
                Family::Sd1 | Family::Sdxl => "<|endoftext|>",
                Family::Sd2 => "!",
            }),
        }
    }

    /// SDXL's second tokenizer: the `--model-config` folder's `tokenizer_2/`, else the bundled
    /// CLIP vocabulary padded with `!` (as SDXL base's `tokenizer_2/` is); `None` for SD 1.x/2.x.
    pub fn tokenizer_2(&self) -> Result<Option<ClipTokenizer>> {
        if self.family != Family::Sdxl {
            return Ok(None);
        }
        match &self.config_dir {
            Some(dir) => ClipTokenizer::from_dir(&dir.join("tokenizer_2")).map(Some),
            None => ClipTokenizer::bundled("!").map(Some),
        }
    }

    /// Every key of the file with what it becomes, in key order (for checks and tools that
    /// relate the file's tensors to a diffusers folder's).
    pub fn mapping(&self) -> &[(String, Target)] {
        &self.targets
    }

    /// One line on where configs and tokenizer come from (`mifo model info` prints it).
    pub fn describe(&self) -> String {
        match &self.config_dir {
            Some(dir) => format!(
                "{} single file; configs and tokenizer from {}",
                self.family.name(),
                dir.display()
            ),
            None => format!(
                "{} single file; configs inferred from its keys{}; bundled CLIP tokenizer",
                self.family.name(),
                match self.family {
                    Family::Sd2 => " (SD 2.x-base assumed: 512 px, ε-prediction)",
                    Family::Sdxl =>
                        " (SDXL base 1.0 assumed: 1024 px, ε-prediction, VAE upcast to f32)",
                    Family::Sd1 => "",
                }
            ),
        }
    }

    /// Reads every tensor the plan maps, converted to `dtype` on `device` (the VAE's to its
    /// [`super::vae::VaeConfig::compute_dtype`]), renamed to the diffusers names, one map per
    /// component.
    pub fn load(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<BTreeMap<Part, HashMap<String, Tensor>>> {
        let path = &self.path;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::file(path, format!("not a valid safetensors file ({e})")))?;
        // The VAE may run in f32 in an f16 run (`force_upcast`): its weights are read so.
        let vae_dtype = super::vae::VaeConfig::from_json(&self.vae)?.compute_dtype(dtype);
        let mut out: BTreeMap<Part, HashMap<String, Tensor>> = BTreeMap::new();
        for (name, target) in &self.targets {
            let part = match target {
                Target::Ignore => continue,
                Target::Plain(p, _)
                | Target::Squeeze(p, _)
                | Target::SplitQkv(p, _)
                | Target::Transpose(p, _) => *p,
            };
            let view = file
                .tensor(name)
                .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
            let want = if part == Part::Vae { vae_dtype } else { dtype };
            let tensor = super::weights::load_view(path, name, &view, want)?;
            let bad_shape = |what: &str| {
                Error::file(
                    path,
                    format!("tensor `{name}` has shape {:?}, not {what}", tensor.dims()),
                )
            };
            match target {
                Target::Ignore => {}
                Target::Plain(part, to) => {
                    out.entry(*part)
                        .or_default()
                        .insert(to.clone(), tensor.to_device(device)?);
                }
                Target::Squeeze(part, to) => {
                    let t = match tensor.dims() {
                        [o, i, 1, 1] => tensor.reshape((*o, *i))?,
                        [_, _] => tensor.clone(),
                        _ => return Err(bad_shape("a 1×1 convolution [C, C, 1, 1]")),
                    };
                    out.entry(*part)
                        .or_default()
                        .insert(to.clone(), t.to_device(device)?);
                }
                Target::Transpose(part, to) => {
                    if tensor.rank() != 2 {
                        return Err(bad_shape("a matrix [in, out]"));
                    }
                    let t = tensor.t()?.contiguous()?;
                    out.entry(*part)
                        .or_default()
                        .insert(to.clone(), t.to_device(device)?);
                }
                Target::SplitQkv(part, to) => {
                    let rows = tensor.dim(0)?;
                    if rows % 3 != 0 {
                        return Err(bad_shape("a fused q/k/v projection [3C, …]"));
                    }
                    let c = rows / 3;
                    for (k, name) in to.iter().enumerate() {
                        let piece = tensor.narrow(0, k * c, c)?.contiguous()?;
                        out.entry(*part)
                            .or_default()
                            .insert(name.clone(), piece.to_device(device)?);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Refuses a UNet config that does not fit the file's family: the UNet takes SDXL's added
/// conditioning exactly when the file is an SDXL one.
fn check_added_conditioning(path: &Path, family: Family, unet: &ConfigJson) -> Result<()> {
    let has = super::unet::UNetConfig::from_json(unet)?
        .text_time
        .is_some();
    if has == (family == Family::Sdxl) {
        return Ok(());
    }
    Err(Error::file(
        path,
        format!(
            "an {} checkpoint, but {} {} SDXL's added conditioning (`addition_embed_type = \"text_time\"`): --model-config must be a folder of the same kind of model",
            family.name(),
            unet.path().display(),
            if has { "has" } else { "lacks" },
        ),
    ))
}

/// SD 1.x, 2.x or XL from the key families, or a one-line refusal.
fn recognise(path: &Path, entries: &BTreeMap<String, Entry>) -> Result<Family> {
    let any = |prefix: &str| entries.keys().any(|k| k.starts_with(prefix));
    let missing = |what: &str, prefix: &str| {
        Error::file(
            path,
            format!(
                "not a Stable Diffusion (1.x, 2.x or XL) single-file checkpoint: no {what} (`{prefix}*` keys){}",
                entries
                    .keys()
                    .next()
                    .map(|k| format!("; its first key is `{k}`"))
                    .unwrap_or_else(|| "; it holds no tensors".into())
            ),
        )
    };
    if !any("model.diffusion_model.") {
        return Err(missing("UNet", "model.diffusion_model."));
    }
    if !any("first_stage_model.") {
        return Err(missing("VAE", "first_stage_model."));
    }
    let sd1 = any("cond_stage_model.transformer.");
    let sd2 = any("cond_stage_model.model.");
    if any("conditioner.embedders.") {
        if sd1 || sd2 {
            return Err(Error::file(
                path,
                "holds both SDXL (`conditioner.embedders.*`) and SD 1.x/2.x (`cond_stage_model.*`) text encoder keys",
            ));
        }
        let (l, g) = (
            any("conditioner.embedders.0.transformer."),
            any("conditioner.embedders.1.model."),
        );
        if !(l && g) {
            return Err(Error::file(
                path,
                format!(
                    "an SDXL-style checkpoint (`conditioner.embedders.*` keys) without {}: mifo reads SDXL base 1.0's layout (CLIP ViT-L under `conditioner.embedders.0.transformer.`, OpenCLIP bigG under `conditioner.embedders.1.model.`), not an SDXL refiner's or another model's",
                    match (l, g) {
                        (false, false) => "either of SDXL base's text encoders",
                        (false, true) => "its CLIP ViT-L text encoder",
                        _ => "its OpenCLIP bigG text encoder",
                    }
                ),
            ));
        }
        return Ok(Family::Sdxl);
    }
    match (sd1, sd2) {
        (true, false) => Ok(Family::Sd1),
        (false, true) => Ok(Family::Sd2),
        (false, false) => Err(missing(
            "text encoder",
            "cond_stage_model.transformer., cond_stage_model.model. or conditioner.embedders.",
        )),
        (true, true) => Err(Error::file(
            path,
            "holds both an SD 1.x (`cond_stage_model.transformer.*`) and an SD 2.x (`cond_stage_model.model.*`) text encoder",
        )),
    }
}

/// The block counts the key mapping needs, read from the keys.
struct Layout {
    /// ResNets per UNet down level (up levels have one more).
    unet_layers: usize,
    /// Number of VAE decoder levels (the original numbers them from the lowest resolution).
    vae_levels: usize,
}

impl Layout {
    fn of(path: &Path, entries: &BTreeMap<String, Entry>) -> Result<Self> {
        // The first downsampler sits after the first level's ResNets: input_blocks.(L+1).0.op.
        let first_down = entries
            .keys()
            .filter_map(|k| k.strip_prefix("model.diffusion_model.input_blocks."))
            .filter_map(|rest| {
                let (k, sub) = rest.split_once('.')?;
                sub.starts_with("0.op.").then(|| k.parse::<usize>().ok())?
            })
            .min()
            .ok_or_else(|| {
                Error::file(
                    path,
                    "no UNet downsampler (`model.diffusion_model.input_blocks.N.0.op.*`): not a Stable Diffusion UNet",
                )
            })?;
        if first_down < 2 {
            return Err(Error::file(
                path,
                "`model.diffusion_model.input_blocks.1.0.op`: a downsampler before any ResNet is not a Stable Diffusion UNet",
            ));
        }
        let vae_levels = entries
            .keys()
            .filter_map(|k| k.strip_prefix("first_stage_model.decoder.up."))
            .filter_map(|rest| rest.split_once('.')?.0.parse::<usize>().ok())
            .collect::<BTreeSet<_>>()
            .len();
        Ok(Self {
            unet_layers: first_down - 1,
            vae_levels,
        })
    }

    /// What the original key `name` becomes, `None` when it fits no known layout.
    fn map(&self, family: Family, name: &str) -> Option<Target> {
        if IGNORED_KEYS.contains(&name) || name.starts_with("model_ema.") {
            return Some(Target::Ignore);
        }
        if let Some(rest) = name.strip_prefix("model.diffusion_model.") {
            if family == Family::Sdxl {
                // SDXL's added conditioning (pooled text embedding and time ids).
                for (from, to) in [
                    ("label_emb.0.0.", "add_embedding.linear_1."),
                    ("label_emb.0.2.", "add_embedding.linear_2."),
                ] {
                    if let Some(t) = rest.strip_prefix(from) {
                        return param(t).then(|| Target::Plain(Part::Unet, format!("{to}{t}")));
                    }
                }
            }
            return self.unet(rest).map(|n| Target::Plain(Part::Unet, n));
        }
        if let Some(rest) = name.strip_prefix("first_stage_model.") {
            return self.vae(rest);
        }
        match family {
            Family::Sd1 => name
                .strip_prefix("cond_stage_model.transformer.")
                .and_then(|r| clip_hf(r, Part::TextEncoder)),
            Family::Sd2 => name
                .strip_prefix("cond_stage_model.model.")
                .and_then(|r| open_clip(r, Part::TextEncoder, false)),
            Family::Sdxl => match name.strip_prefix("conditioner.embedders.0.transformer.") {
                Some(r) => clip_hf(r, Part::TextEncoder),
                None => name
                    .strip_prefix("conditioner.embedders.1.model.")
                    .and_then(|r| open_clip(r, Part::TextEncoder2, true)),
            },
        }
    }

    fn unet(&self, rest: &str) -> Option<String> {
        let per = self.unet_layers + 1;
        for (from, to) in [
            ("time_embed.0.", "time_embedding.linear_1."),
            ("time_embed.2.", "time_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."),
            ("out.0.", "conv_norm_out."),
            ("out.2.", "conv_out."),
        ] {
            if let Some(tail) = rest.strip_prefix(from) {
                return param(tail).then(|| format!("{to}{tail}"));
            }
        }
        if let Some(tail) = rest.strip_prefix("middle_block.1.") {
            return unet_attention(tail).then(|| format!("mid_block.attentions.0.{tail}"));
        }
        for (from, to) in [
            ("middle_block.0.", "mid_block.resnets.0."),
            ("middle_block.2.", "mid_block.resnets.1."),
        ] {
            if let Some(tail) = rest.strip_prefix(from) {
                return unet_resnet(tail).map(|t| format!("{to}{t}"));
            }
        }
        if let Some(r) = rest.strip_prefix("input_blocks.") {
            let (k, sub, tail) = split2(r)?;
            let (level, slot) = ((k.checked_sub(1)?) / per, (k - 1) % per);
            return match (slot < self.unet_layers, sub) {
                (true, 0) => {
                    unet_resnet(tail).map(|t| format!("down_blocks.{level}.resnets.{slot}.{t}"))
                }
                (true, 1) => unet_attention(tail)
                    .then(|| format!("down_blocks.{level}.attentions.{slot}.{tail}")),
                (false, 0) => {
                    let t = tail.strip_prefix("op.")?;
                    param(t).then(|| format!("down_blocks.{level}.downsamplers.0.conv.{t}"))
                }
                _ => None,
            };
        }
        if let Some(r) = rest.strip_prefix("output_blocks.") {
            let (k, sub, tail) = split2(r)?;
            let (level, j) = (k / per, k % per);
            let up = |t: &str| param(t).then(|| format!("up_blocks.{level}.upsamplers.0.conv.{t}"));
            return match sub {
                0 => unet_resnet(tail).map(|t| format!("up_blocks.{level}.resnets.{j}.{t}")),
                1 => match tail.strip_prefix("conv.") {
                    Some(t) => up(t),
                    None => unet_attention(tail)
                        .then(|| format!("up_blocks.{level}.attentions.{j}.{tail}")),
                },
                2 => up(tail.strip_prefix("conv.")?),
                _ => None,
            };
        }
        None
    }

    fn vae(&self, rest: &str) -> Option<Target> {
        let plain = |n: String| Some(Target::Plain(Part::Vae, n));
        if rest.starts_with("loss.") {
            return Some(Target::Ignore);
        }
        for exact in [
            "encoder.conv_in.",
            "encoder.conv_out.",
            "decoder.conv_in.",
            "decoder.conv_out.",
            "quant_conv.",
            "post_quant_conv.",
        ] {
            if let Some(t) = rest.strip_prefix(exact) {
                return if param(t) {
                    plain(rest.to_string())
                } else {
                    None
                };
            }
        }
        let (side, r) = rest.split_once('.')?;
        if side != "encoder" && side != "decoder" {
            return None;
        }
        if let Some(t) = r.strip_prefix("norm_out.") {
            return if param(t) {
                plain(format!("{side}.conv_norm_out.{t}"))
            } else {
                None
            };
        }
        if let Some(m) = r.strip_prefix("mid.") {
            for (from, to) in [("block_1.", "resnets.0."), ("block_2.", "resnets.1.")] {
                if let Some(t) = m.strip_prefix(from) {
                    return vae_resnet(t).and_then(|t| plain(format!("{side}.mid_block.{to}{t}")));
                }
            }
            let a = m.strip_prefix("attn_1.")?;
            let base = format!("{side}.mid_block.attentions.0");
            if let Some(t) = a.strip_prefix("norm.") {
                return if param(t) {
                    plain(format!("{base}.group_norm.{t}"))
                } else {
                    None
                };
            }
            for (from, to) in [
                ("q.", "to_q"),
                ("k.", "to_k"),
                ("v.", "to_v"),
                ("proj_out.", "to_out.0"),
            ] {
                if let Some(t) = a.strip_prefix(from) {
                    return match t {
                        "weight" => Some(Target::Squeeze(Part::Vae, format!("{base}.{to}.weight"))),
                        "bias" => plain(format!("{base}.{to}.bias")),
                        _ => None,
                    };
                }
            }
            return None;
        }
        let (word, levels) = if side == "encoder" {
            ("down.", None)
        } else {
            ("up.", Some(self.vae_levels))
        };
        let r = r.strip_prefix(word)?;
        let (i, tail) = r.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let (blocks, level) = match levels {
            None => ("down_blocks", i),
            Some(n) => ("up_blocks", n.checked_sub(1)?.checked_sub(i)?),
        };
        if let Some(b) = tail.strip_prefix("block.") {
            let (j, t) = b.split_once('.')?;
            let j: usize = j.parse().ok()?;
            return vae_resnet(t)
                .and_then(|t| plain(format!("{side}.{blocks}.{level}.resnets.{j}.{t}")));
        }
        let sampler = if side == "encoder" {
            ("downsample.conv.", "downsamplers")
        } else {
            ("upsample.conv.", "upsamplers")
        };
        let t = tail.strip_prefix(sampler.0)?;
        if param(t) {
            plain(format!("{side}.{blocks}.{level}.{}.0.conv.{t}", sampler.1))
        } else {
            None
        }
    }
}

/// `weight` or `bias`.
fn param(t: &str) -> bool {
    t == "weight" || t == "bias"
}

/// `"K.S.tail"` → (K, S, tail).
fn split2(r: &str) -> Option<(usize, usize, &str)> {
    let (k, r) = r.split_once('.')?;
    let (s, tail) = r.split_once('.')?;
    Some((k.parse().ok()?, s.parse().ok()?, tail))
}

/// A UNet ResNet's parameter: `in_layers.0` norm1, `in_layers.2` conv1, `emb_layers.1`
/// time_emb_proj, `out_layers.0` norm2, `out_layers.3` conv2, `skip_connection` conv_shortcut.
fn unet_resnet(tail: &str) -> Option<String> {
    for (from, to) in [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ] {
        if let Some(t) = tail.strip_prefix(from) {
            return param(t).then(|| format!("{to}{t}"));
        }
    }
    None
}

/// A spatial transformer's parameter: the original and diffusers names are the same.
fn unet_attention(tail: &str) -> bool {
    ["norm.", "proj_in.", "proj_out.", "transformer_blocks."]
        .iter()
        .any(|p| tail.starts_with(p))
}

/// A VAE ResNet's parameter: the same names except `nin_shortcut` → `conv_shortcut`.
fn vae_resnet(tail: &str) -> Option<String> {
    let (module, t) = tail.split_once('.')?;
    let module = match module {
        "norm1" | "conv1" | "norm2" | "conv2" => module,
        "nin_shortcut" => "conv_shortcut",
        _ => return None,
    };
    param(t).then(|| format!("{module}.{t}"))
}

/// SD 1.x and SDXL's first encoder: a transformers `CLIPTextModel` already; old files lack the
/// `text_model.` level.
fn clip_hf(rest: &str, part: Part) -> Option<Target> {
    let name = if rest.starts_with("text_model.") {
        rest.to_string()
    } else {
        format!("text_model.{rest}")
    };
    if name.ends_with("embeddings.position_ids") {
        return Some(Target::Ignore);
    }
    let known = [
        "text_model.embeddings.",
        "text_model.encoder.layers.",
        "text_model.final_layer_norm.",
    ]
    .iter()
    .any(|p| name.starts_with(p));
    known.then_some(Target::Plain(part, name))
}

/// SD 2.x and SDXL's second encoder: OpenCLIP's text tower to transformers' `CLIPTextModel`
/// names. With `projection` (SDXL: a `CLIPTextModelWithProjection`) OpenCLIP's
/// `text_projection` [width, projection] becomes `text_projection.weight`, transposed; SD 2.x
/// does not use it.
fn open_clip(rest: &str, part: Part, projection: bool) -> Option<Target> {
    let te = |n: String| Some(Target::Plain(part, n));
    match rest {
        "token_embedding.weight" => {
            return te("text_model.embeddings.token_embedding.weight".into())
        }
        "positional_embedding" => {
            return te("text_model.embeddings.position_embedding.weight".into())
        }
        "text_projection" if projection => {
            return Some(Target::Transpose(part, "text_projection.weight".into()))
        }
        "text_projection" | "logit_scale" | "attn_mask" => return Some(Target::Ignore),
        _ => {}
    }
    if let Some(t) = rest.strip_prefix("ln_final.") {
        return if param(t) {
            te(format!("text_model.final_layer_norm.{t}"))
        } else {
            None
        };
    }
    let r = rest.strip_prefix("transformer.resblocks.")?;
    let (n, tail) = r.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let layer = format!("text_model.encoder.layers.{n}");
    match tail {
        "attn.in_proj_weight" | "attn.in_proj_bias" => {
            let p = if tail.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            return Some(Target::SplitQkv(
                part,
                ["q_proj", "k_proj", "v_proj"].map(|q| format!("{layer}.self_attn.{q}.{p}")),
            ));
        }
        _ => {}
    }
    for (from, to) in [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ] {
        if let Some(t) = tail.strip_prefix(from) {
            return if param(t) {
                te(format!("{layer}.{to}{t}"))
            } else {
                None
            };
        }
    }
    None
}

/// What the shapes tell of one CLIP text encoder: width, depth used, MLP width, vocabulary
/// rows, positions.
pub type TextShape = (usize, usize, usize, usize, usize);

/// What the shapes tell of the UNet, VAE and text encoders (the part of the configs that
/// needs no assumption).
#[derive(Clone, Debug, PartialEq)]
pub struct Inferred {
    /// UNet widths per level.
    pub unet_channels: Vec<usize>,
    /// UNet levels with cross-attention.
    pub unet_attention: Vec<bool>,
    /// Transformer blocks per attention, per level (1 where a level has no attention, as
    /// diffusers' configs write it).
    pub transformer_depth: Vec<usize>,
    /// UNet ResNets per down level.
    pub unet_layers: usize,
    /// UNet latent channels in / out.
    pub unet_in_out: (usize, usize),
    /// Text-state width of the cross-attention.
    pub cross_attention_dim: usize,
    /// Linear (not 1×1-conv) spatial-transformer projections.
    pub linear_projection: bool,
    /// SDXL's added conditioning: (`addition_time_embed_dim`,
    /// `projection_class_embeddings_input_dim`) from `label_emb`'s input width less the second
    /// encoder's projection width, over six time ids.
    pub added: Option<(usize, usize)>,
    /// VAE widths per level.
    pub vae_channels: Vec<usize>,
    /// VAE ResNets per encoder level.
    pub vae_layers: usize,
    /// VAE latent channels.
    pub latent_channels: usize,
    /// The (first) text encoder.
    pub text: TextShape,
    /// SDXL's second text encoder and its projection width.
    pub text_2: Option<(TextShape, usize)>,
}

/// Reads [`Inferred`] from the file's header (`--model-config` not given).
pub fn infer(path: &Path, family: Family) -> Result<Inferred> {
    let header = super::weights::read_header(path)?;
    let mut entries = BTreeMap::new();
    for (name, value) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let shape: Option<Vec<usize>> = value["shape"]
            .as_array()
            .and_then(|d| d.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
        if let Some(shape) = shape {
            entries.insert(name.clone(), Entry { shape });
        }
    }
    let layout = Layout::of(path, &entries)?;
    inferred(path, family, &layout, &entries)
}

fn inferred(
    path: &Path,
    family: Family,
    layout: &Layout,
    entries: &BTreeMap<String, Entry>,
) -> Result<Inferred> {
    let shape = |key: &str| -> Result<&[usize]> {
        entries
            .get(key)
            .map(|e| e.shape.as_slice())
            .ok_or_else(|| Error::file(path, format!("missing tensor `{key}`")))
    };
    let dim = |key: &str, i: usize| -> Result<usize> {
        shape(key)?.get(i).copied().ok_or_else(|| {
            Error::file(
                path,
                format!("tensor `{key}` has fewer than {} dimensions", i + 1),
            )
        })
    };
    // How many of key(0), key(1), … the file holds, counting from 0 until the first gap.
    let count = |key: &dyn Fn(usize) -> String| {
        (0..).take_while(|&n| entries.contains_key(&key(n))).count()
    };
    let u = "model.diffusion_model.";
    let per = layout.unet_layers + 1;
    let mut unet_channels = Vec::new();
    let mut unet_attention = Vec::new();
    let mut transformer_depth = Vec::new();
    let mut proj_rank = None;
    let mut cross = None;
    loop {
        let k = 1 + unet_channels.len() * per;
        let key = format!("{u}input_blocks.{k}.0.out_layers.3.weight");
        if !entries.contains_key(&key) {
            break;
        }
        unet_channels.push(dim(&key, 0)?);
        let proj = format!("{u}input_blocks.{k}.1.proj_in.weight");
        unet_attention.push(entries.contains_key(&proj));
        let depth =
            count(&|n| format!("{u}input_blocks.{k}.1.transformer_blocks.{n}.norm1.weight"));
        transformer_depth.push(depth.max(1));
        if let Some(e) = entries.get(&proj) {
            proj_rank.get_or_insert(e.shape.len());
            let to_k = format!("{u}input_blocks.{k}.1.transformer_blocks.0.attn2.to_k.weight");
            cross.get_or_insert(dim(&to_k, 1)?);
            if depth > 1 && family != Family::Sdxl {
                return Err(Error::file(
                    path,
                    "UNet with several transformer blocks per attention: not SD 1.x/2.x (pass --model-config DIR)",
                ));
            }
        }
    }
    if unet_channels.is_empty() {
        return Err(Error::file(
            path,
            format!("missing tensor `{u}input_blocks.1.0.out_layers.3.weight`"),
        ));
    }
    let cross = cross.ok_or_else(|| Error::file(path, "UNet without cross-attention"))?;
    let v = "first_stage_model.encoder.down.";
    let mut vae_channels = Vec::new();
    while let Some(e) = entries.get(&format!("{v}{}.block.0.conv1.weight", vae_channels.len())) {
        vae_channels.push(e.shape[0]);
    }
    let vae_layers = count(&|j| format!("{v}0.block.{j}.conv1.weight"));
    // A transformers CLIPTextModel under `base` (with or without `text_model.`).
    let clip = |base: &str| -> Result<TextShape> {
        let p = if entries.contains_key(&format!(
            "{base}text_model.embeddings.token_embedding.weight"
        )) {
            format!("{base}text_model.")
        } else {
            base.to_string()
        };
        let table = shape(&format!("{p}embeddings.token_embedding.weight"))?;
        let layers = count(&|n| format!("{p}encoder.layers.{n}.mlp.fc1.weight"));
        Ok((
            table[1],
            layers,
            dim(&format!("{p}encoder.layers.0.mlp.fc1.weight"), 0)?,
            table[0],
            dim(&format!("{p}embeddings.position_embedding.weight"), 0)?,
        ))
    };
    // An OpenCLIP text tower under `p`, less `unused` final blocks.
    let open = |p: &str, unused: usize| -> Result<TextShape> {
        let table = shape(&format!("{p}token_embedding.weight"))?;
        let blocks = count(&|n| format!("{p}transformer.resblocks.{n}.mlp.c_fc.weight"));
        Ok((
            table[1],
            blocks.saturating_sub(unused),
            dim(&format!("{p}transformer.resblocks.0.mlp.c_fc.weight"), 0)?,
            table[0],
            dim(&format!("{p}positional_embedding"), 0)?,
        ))
    };
    let (text, text_2) = match family {
        Family::Sd1 => (clip("cond_stage_model.transformer.")?, None),
        // SD 2.x uses the penultimate block's output: diffusers' text encoder has one layer
        // fewer than the checkpoint.
        Family::Sd2 => (open("cond_stage_model.model.", 1)?, None),
        Family::Sdxl => {
            let g = "conditioner.embedders.1.model.";
            let projection = dim(&format!("{g}text_projection"), 1)?;
            (
                clip("conditioner.embedders.0.transformer.")?,
                Some((open(g, 0)?, projection)),
            )
        }
    };
    let added = match &text_2 {
        Some((_, projection)) => {
            let key = format!("{u}label_emb.0.0.weight");
            let input = dim(&key, 1)?;
            let time = input
                .checked_sub(*projection)
                .filter(|t| t % super::sdxl::TIME_IDS == 0 && *t > 0)
                .ok_or_else(|| {
                    Error::file(
                        path,
                        format!(
                            "tensor `{key}` takes {input} inputs, not the second text encoder's projection width {projection} plus {} time-id embeddings",
                            super::sdxl::TIME_IDS
                        ),
                    )
                })?;
            Some((time / super::sdxl::TIME_IDS, input))
        }
        None => None,
    };
    Ok(Inferred {
        unet_in_out: (
            dim(&format!("{u}input_blocks.0.0.weight"), 1)?,
            dim(&format!("{u}out.2.weight"), 0)?,
        ),
        unet_channels,
        unet_attention,
        transformer_depth,
        unet_layers: layout.unet_layers,
        cross_attention_dim: cross,
        linear_projection: proj_rank == Some(2),
        added,
        latent_channels: dim("first_stage_model.quant_conv.weight", 0)? / 2,
        vae_channels,
        vae_layers,
        text,
        text_2,
    })
}

/// The configs of a file without `--model-config`: [`Inferred`] plus the values of the real
/// models for what weights cannot tell; refused for sizes other than theirs.
fn infer_configs(
    path: &Path,
    family: Family,
    layout: &Layout,
    entries: &BTreeMap<String, Entry>,
) -> Result<Configs> {
    let inf = inferred(path, family, layout, entries)?;
    // The real models' widths: UNet, cross-attention, text encoder(s), VAE.
    let (want_cross, want_text) = match family {
        Family::Sd1 => (768, vec![768]),
        Family::Sd2 => (1024, vec![1024]),
        Family::Sdxl => (2048, vec![768, 1280]),
    };
    let mut text_widths = vec![inf.text.0];
    text_widths.extend(inf.text_2.map(|(t, _)| t.0));
    let standard = inf.unet_channels.first() == Some(&320)
        && inf.cross_attention_dim == want_cross
        && text_widths == want_text
        && inf.vae_channels.first() == Some(&128);
    if !standard {
        let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join("+");
        return Err(Error::file(
            path,
            format!(
                "{} layout, but not its sizes (UNet width {:?}, cross-attention {}, text encoder {}, VAE width {:?}; {} has 320, {want_cross}, {}, 128): mifo infers configs only for the real SD 1.x/2.x/XL sizes, pass --model-config DIR (a diffusers folder with this model's configs)",
                family.name(),
                inf.unet_channels.first().copied().unwrap_or(0),
                inf.cross_attention_dim,
                list(&text_widths),
                inf.vae_channels.first().copied().unwrap_or(0),
                family.name(),
                list(&want_text),
            ),
        ));
    }
    let down: Vec<&str> = inf
        .unet_attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = inf
        .unet_attention
        .iter()
        .rev()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    // SD 1.x: 8 heads everywhere; SD 2.x and SDXL: heads of 64 channels.
    let heads: Value = match family {
        Family::Sd1 => json!(8),
        Family::Sd2 | Family::Sdxl => {
            json!(inf.unet_channels.iter().map(|c| c / 64).collect::<Vec<_>>())
        }
    };
    let xl = family == Family::Sdxl;
    let label = |part: &str| PathBuf::from(format!("{} (inferred {part})", path.display()));
    let mut unet = json!({
        "block_out_channels": inf.unet_channels,
        "down_block_types": down, "up_block_types": up,
        "layers_per_block": inf.unet_layers, "attention_head_dim": heads,
        "cross_attention_dim": inf.cross_attention_dim,
        "use_linear_projection": inf.linear_projection,
        "in_channels": inf.unet_in_out.0, "out_channels": inf.unet_in_out.1,
        "norm_num_groups": 32, "norm_eps": 1e-5,
        "sample_size": if xl { 128 } else { 64 },
        "flip_sin_to_cos": true, "freq_shift": 0, "downsample_padding": 1,
    });
    if let (Some((time, input)), Value::Object(m)) = (inf.added, &mut unet) {
        m.insert(
            "transformer_layers_per_block".into(),
            json!(inf.transformer_depth),
        );
        m.insert("addition_embed_type".into(), json!("text_time"));
        m.insert("addition_time_embed_dim".into(), json!(time));
        m.insert("projection_class_embeddings_input_dim".into(), json!(input));
    }
    let unet = ConfigJson::from_value(label("unet/config.json"), unet)?;
    let vae_n = inf.vae_channels.len();
    // SDXL's VAE overflows in f16: its config asks for f32 (`force_upcast`).
    let vae = ConfigJson::from_value(
        label("vae/config.json"),
        json!({
            "block_out_channels": inf.vae_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; vae_n],
            "up_block_types": vec!["UpDecoderBlock2D"; vae_n],
            "layers_per_block": inf.vae_layers, "latent_channels": inf.latent_channels,
            "norm_num_groups": 32,
            "scaling_factor": if xl { 0.13025 } else { 0.18215 },
            "sample_size": if xl { 1024 } else { 512 },
            "force_upcast": xl,
        }),
    )?;
    // SD 1.x's and SDXL's first encoder are OpenAI CLIP (quick GELU); OpenCLIP uses GELU.
    // SDXL base's encoder configs say `eos_token_id` 2 (the pooled state at the largest id).
    let text_config = |(width, layers, mlp, vocab, positions): TextShape,
                       act: &str,
                       projection: Option<usize>| {
        let mut c = json!({
            "model_type": "clip_text_model", "hidden_size": width,
            "num_hidden_layers": layers, "num_attention_heads": width / 64,
            "intermediate_size": mlp, "vocab_size": vocab,
            "max_position_embeddings": positions, "layer_norm_eps": 1e-5,
            "hidden_act": act,
        });
        if let Value::Object(m) = &mut c {
            if xl {
                m.insert("eos_token_id".into(), json!(2));
            }
            if let Some(p) = projection {
                m.insert(
                    "architectures".into(),
                    json!(["CLIPTextModelWithProjection"]),
                );
                m.insert("projection_dim".into(), json!(p));
            }
        }
        c
    };
    let text_encoder = ConfigJson::from_value(
        label("text_encoder/config.json"),
        text_config(
            inf.text,
            match family {
                Family::Sd1 | Family::Sdxl => "quick_gelu",
                Family::Sd2 => "gelu",
            },
            None,
        ),
    )?;
    let text_encoder_2 = match inf.text_2 {
        Some((shape, projection)) => Some(ConfigJson::from_value(
            label("text_encoder_2/config.json"),
            text_config(shape, "gelu", Some(projection)),
        )?),
        None => None,
    };
    // SD 1.x, SD 2.x-base and SDXL base share the ε-prediction scaled-linear schedule.
    let scheduler = ConfigJson::from_value(
        label("scheduler/scheduler_config.json"),
        json!({
            "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
            "set_alpha_to_one": false, "steps_offset": 1, "clip_sample": false,
            "timestep_spacing": "leading",
        }),
    )?;
    Ok(Configs {
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        scheduler,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            unet_layers: 2,
            vae_levels: 4,
        }
    }

    fn plain(part: Part, name: &str) -> Option<Target> {
        Some(Target::Plain(part, name.to_string()))
    }

    #[test]
    fn unet_keys_follow_the_block_arithmetic() {
        let l = layout();
        let m = |k: &str| l.map(Family::Sd2, &format!("model.diffusion_model.{k}"));
        let u = |n: &str| plain(Part::Unet, n);
        assert_eq!(m("input_blocks.0.0.weight"), u("conv_in.weight"));
        assert_eq!(m("time_embed.2.bias"), u("time_embedding.linear_2.bias"));
        assert_eq!(
            m("input_blocks.2.0.in_layers.2.weight"),
            u("down_blocks.0.resnets.1.conv1.weight")
        );
        assert_eq!(
            m("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
            u("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight")
        );
        assert_eq!(
            m("input_blocks.6.0.op.weight"),
            u("down_blocks.1.downsamplers.0.conv.weight")
        );
        assert_eq!(
            m("input_blocks.10.0.skip_connection.bias"),
            u("down_blocks.3.resnets.0.conv_shortcut.bias")
        );
        assert_eq!(
            m("middle_block.2.emb_layers.1.weight"),
            u("mid_block.resnets.1.time_emb_proj.weight")
        );
        assert_eq!(
            m("output_blocks.2.1.conv.weight"),
            u("up_blocks.0.upsamplers.0.conv.weight")
        );
        assert_eq!(
            m("output_blocks.5.2.conv.bias"),
            u("up_blocks.1.upsamplers.0.conv.bias")
        );
        assert_eq!(
            m("output_blocks.5.1.proj_out.weight"),
            u("up_blocks.1.attentions.2.proj_out.weight")
        );
        assert_eq!(m("out.2.weight"), u("conv_out.weight"));
        assert_eq!(m("input_blocks.1.0.mystery.weight"), None);
        assert_eq!(m("label_emb.0.0.weight"), None);
    }

    #[test]
    fn vae_decoder_levels_are_reversed_and_attention_convs_squeezed() {
        let l = layout();
        let m = |k: &str| l.map(Family::Sd1, &format!("first_stage_model.{k}"));
        assert_eq!(
            m("decoder.up.0.block.2.nin_shortcut.weight"),
            plain(
                Part::Vae,
                "decoder.up_blocks.3.resnets.2.conv_shortcut.weight"
            )
        );
        assert_eq!(
            m("decoder.up.3.upsample.conv.bias"),
            plain(Part::Vae, "decoder.up_blocks.0.upsamplers.0.conv.bias")
        );
        assert_eq!(
            m("encoder.down.1.downsample.conv.weight"),
            plain(
                Part::Vae,
                "encoder.down_blocks.1.downsamplers.0.conv.weight"
            )
        );
        assert_eq!(
            m("encoder.mid.attn_1.q.weight"),
            Some(Target::Squeeze(
                Part::Vae,
                "encoder.mid_block.attentions.0.to_q.weight".into()
            ))
        );
        assert_eq!(
            m("decoder.mid.attn_1.proj_out.bias"),
            plain(Part::Vae, "decoder.mid_block.attentions.0.to_out.0.bias")
        );
        assert_eq!(
            m("encoder.norm_out.weight"),
            plain(Part::Vae, "encoder.conv_norm_out.weight")
        );
        assert_eq!(m("loss.discriminator.main.0.weight"), Some(Target::Ignore));
        assert_eq!(m("decoder.up.4.block.0.conv1.weight"), None);
    }

    #[test]
    fn text_encoders_of_both_families() {
        let l = layout();
        assert_eq!(
            l.map(
                Family::Sd1,
                "cond_stage_model.transformer.embeddings.position_ids"
            ),
            Some(Target::Ignore)
        );
        assert_eq!(
            l.map(
                Family::Sd1,
                "cond_stage_model.transformer.encoder.layers.3.mlp.fc1.weight"
            ),
            plain(
                Part::TextEncoder,
                "text_model.encoder.layers.3.mlp.fc1.weight"
            )
        );
        assert_eq!(
            l.map(
                Family::Sd2,
                "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias"
            ),
            Some(Target::SplitQkv(
                Part::TextEncoder,
                ["q_proj", "k_proj", "v_proj"]
                    .map(|q| format!("text_model.encoder.layers.1.self_attn.{q}.bias"))
            ))
        );
        assert_eq!(
            l.map(Family::Sd2, "cond_stage_model.model.positional_embedding"),
            plain(
                Part::TextEncoder,
                "text_model.embeddings.position_embedding.weight"
            )
        );
        assert_eq!(
            l.map(
                Family::Sd2,
                "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.bias"
            ),
            plain(
                Part::TextEncoder,
                "text_model.encoder.layers.0.mlp.fc2.bias"
            )
        );
        // An SD 1.x key in an SD 2.x file fits no layout.
        assert_eq!(
            l.map(Family::Sd2, "cond_stage_model.transformer.text_model.x"),
            None
        );
        assert_eq!(l.map(Family::Sd2, "alphas_cumprod"), Some(Target::Ignore));
        assert_eq!(l.map(Family::Sd2, "model_ema.decay"), Some(Target::Ignore));
        assert_eq!(l.map(Family::Sd2, "something.else"), None);
    }

    #[test]
    fn sdxl_keys_map_to_both_encoders_and_the_added_conditioning() {
        let l = layout();
        let m = |k: &str| l.map(Family::Sdxl, k);
        assert_eq!(
            m("model.diffusion_model.label_emb.0.2.bias"),
            plain(Part::Unet, "add_embedding.linear_2.bias")
        );
        assert_eq!(m("model.diffusion_model.label_emb.0.1.bias"), None);
        assert_eq!(
            m("model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight"),
            plain(
                Part::Unet,
                "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_q.weight"
            )
        );
        assert_eq!(
            m("conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.bias"),
            plain(
                Part::TextEncoder,
                "text_model.encoder.layers.11.mlp.fc2.bias"
            )
        );
        assert_eq!(
            m("conditioner.embedders.0.transformer.text_model.embeddings.position_ids"),
            Some(Target::Ignore)
        );
        assert_eq!(
            m("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"),
            Some(Target::SplitQkv(
                Part::TextEncoder2,
                ["q_proj", "k_proj", "v_proj"]
                    .map(|q| format!("text_model.encoder.layers.31.self_attn.{q}.weight"))
            ))
        );
        assert_eq!(
            m("conditioner.embedders.1.model.text_projection"),
            Some(Target::Transpose(
                Part::TextEncoder2,
                "text_projection.weight".into()
            ))
        );
        assert_eq!(
            m("conditioner.embedders.1.model.ln_final.weight"),
            plain(Part::TextEncoder2, "text_model.final_layer_norm.weight")
        );
        assert_eq!(
            m("conditioner.embedders.1.model.logit_scale"),
            Some(Target::Ignore)
        );
        // SD 2.x ignores OpenCLIP's projection; other families do not read SDXL's keys.
        assert_eq!(
            l.map(Family::Sd2, "cond_stage_model.model.text_projection"),
            Some(Target::Ignore)
        );
        assert_eq!(
            l.map(Family::Sd2, "conditioner.embedders.1.model.ln_final.weight"),
            None
        );
        assert_eq!(m("cond_stage_model.model.ln_final.weight"), None);
        assert_eq!(m("conditioner.embedders.2.model.ln_final.weight"), None);
    }
}
