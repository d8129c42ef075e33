//! A diffusers Stable Diffusion folder → its components, each built from its own config.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use super::clip::{ClipConfig, ClipTextModel};
use super::config::ConfigJson;
use super::ddim::{Ddim, DdimConfig};
use super::sdxl::XlText;
use super::single_file::{Part, Plan};
use super::source::ModelSource;
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet, UNetConfig};
use super::vae::{Vae, VaeConfig};
use super::weights::{LoraConfig, WeightFile};
use crate::error::{Error, Result};

/// What to change in a component's weights as [`Component::load_dir`] reads them.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Tensors replacing (or adding) weights by name: fine-tuned weights or LoRA adapters.
    pub overrides: Vec<(String, Tensor)>,
    /// Every weight a `Var` (for the text encoder the vocabulary table too: leave it out of the
    /// optimiser).
    pub trainable: bool,
    /// Trainable LoRA adapters on the attention projections (handed out by the weights'
    /// `vars()`).
    pub lora: Option<LoraConfig>,
}

/// A model component that lives in its own diffusers / transformers folder (`config.json` plus
/// one weight file) and is built from the two. All components load through the one
/// [`Component::load_dir`].
pub trait Component: Sized {
    /// Stem of the folder's weight file (see [`find_weights`]).
    const WEIGHTS_STEM: &'static str;

    /// The dtype its weights are loaded in for a run of `dtype` (the VAE may ask for f32; see
    /// [`VaeConfig::compute_dtype`]).
    fn weight_dtype(_config: &ConfigJson, dtype: DType) -> Result<DType> {
        Ok(dtype)
    }

    /// Builds the component from its folder's parsed `config.json` and its weights.
    fn from_parts(
        config: &ConfigJson,
        weights: Rc<WeightFile>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self>;

    /// Loads the component folder `dir` with `options` applied to its weights; the weight file
    /// is returned too (phase B of learning derives trainable copies from it).
    fn load_dir(
        dir: &Path,
        dtype: DType,
        device: &Device,
        options: LoadOptions,
    ) -> Result<(Self, Rc<WeightFile>)> {
        let config = ConfigJson::read(&dir.join("config.json"))?;
        let file = find_weights(dir, Self::WEIGHTS_STEM)?;
        let weights = WeightFile::load(&file, Self::weight_dtype(&config, dtype)?, device)?;
        Self::load_weights(&config, weights, dtype, device, options)
    }

    /// Builds the component from a config and weights already in memory (a single-file
    /// checkpoint's part, mapped to diffusers names), with `options` applied as
    /// [`Component::load_dir`] does.
    fn load_weights(
        config: &ConfigJson,
        mut weights: WeightFile,
        dtype: DType,
        device: &Device,
        options: LoadOptions,
    ) -> Result<(Self, Rc<WeightFile>)> {
        weights.insert_all(options.overrides);
        weights.set_trainable(options.trainable);
        weights.set_lora(options.lora);
        let weights = Rc::new(weights);
        Ok((
            Self::from_parts(config, weights.clone(), dtype, device)?,
            weights,
        ))
    }
}

impl Component for UNet {
    const WEIGHTS_STEM: &'static str = "diffusion_pytorch_model";

    fn from_parts(
        config: &ConfigJson,
        weights: Rc<WeightFile>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        UNet::load(UNetConfig::from_json(config)?, weights, dtype, device)
    }
}

impl Component for ClipTextModel {
    const WEIGHTS_STEM: &'static str = "model";

    fn from_parts(
        config: &ConfigJson,
        weights: Rc<WeightFile>,
        _dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        ClipTextModel::load(ClipConfig::from_json(config)?, weights, device)
    }
}

impl Component for Vae {
    const WEIGHTS_STEM: &'static str = "diffusion_pytorch_model";

    fn weight_dtype(config: &ConfigJson, dtype: DType) -> Result<DType> {
        Ok(VaeConfig::from_json(config)?.compute_dtype(dtype))
    }

    fn from_parts(
        config: &ConfigJson,
        weights: Rc<WeightFile>,
        _dtype: DType,
        _device: &Device,
    ) -> Result<Self> {
        Vae::load(VaeConfig::from_json(config)?, weights)
    }
}

/// The weight file of a component folder: `<stem>.safetensors`, else `<stem>.fp16.safetensors`.
pub fn find_weights(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let hint = if dir.join(format!("{stem}.bin")).is_file() {
        " (only a PyTorch .bin file is there; convert it to safetensors)"
    } else {
        ""
    };
    Err(Error::file(
        dir,
        format!("no {stem}.safetensors or {stem}.fp16.safetensors{hint}"),
    ))
}

fn component(root: &Path, name: &str) -> Result<PathBuf> {
    let p = root.join(name);
    if p.is_dir() {
        Ok(p)
    } else {
        Err(Error::file(
            &p,
            format!(
                "missing component folder `{name}/` (expected a diffusers Stable Diffusion folder)"
            ),
        ))
    }
}

/// The image resolution a model folder was trained at (UNet `sample_size` × VAE factor), read
/// from the configs alone (no weights), with the same validation as a full load.
pub fn resolution(root: &Path) -> Result<u32> {
    if !root.join("model_index.json").is_file() {
        return Err(Error::file(
            root.join("model_index.json"),
            "missing: not a diffusers pipeline folder",
        ));
    }
    let unet = super::unet::UNetConfig::from_json(&ConfigJson::read(
        &component(root, "unet")?.join("config.json"),
    )?)?;
    let vae = super::vae::VaeConfig::from_json(&ConfigJson::read(
        &component(root, "vae")?.join("config.json"),
    )?)?;
    Ok((unet.sample_size * vae.factor()) as u32)
}

/// The image resolution of a model source (see [`resolution`]), after checking the headers of
/// its weight files (a single file is also recognised and its every key mapped): what a run's
/// preparation needs before the store is touched, without reading any weights.
pub fn check_source(source: &ModelSource) -> Result<u32> {
    if source.is_single_file() {
        let plan = Plan::inspect(&source.path, source.config.as_deref())?;
        let unet = UNetConfig::from_json(&plan.unet)?;
        let vae = VaeConfig::from_json(&plan.vae)?;
        return Ok((unet.sample_size * vae.factor()) as u32);
    }
    let resolution = resolution(&source.path)?;
    super::weights::check_weight_headers(&source.path)?;
    Ok(resolution)
}

/// All components of a Stable Diffusion pipeline.
pub struct StableDiffusion {
    /// The folder it came from (for a single file: the file).
    pub root: PathBuf,
    /// The source it was loaded from, as the user named it.
    pub source: ModelSource,
    /// How its parts were read: `diffusers folder`, or a single file's family and where its
    /// configs and tokenizer came from.
    pub layout: String,
    /// CLIP tokenizer.
    pub tokenizer: ClipTokenizer,
    /// CLIP text encoder.
    pub text_encoder: ClipTextModel,
    /// The denoising UNet.
    pub unet: UNet,
    /// The autoencoder.
    pub vae: Vae,
    /// The noise schedule / DDIM sampler.
    pub scheduler: Ddim,
    /// The device the weights live on.
    pub device: Device,
    /// The weights' dtype.
    pub dtype: DType,
    /// The UNet's weights (shared with `unet`; phase B derives trainable copies from them).
    pub unet_weights: Rc<WeightFile>,
    /// The text encoder's weights (shared with `text_encoder`).
    pub text_encoder_weights: Rc<WeightFile>,
    /// SDXL's second tokenizer and text encoder (`None` for SD 1.x / 2.x).
    pub xl: Option<XlText>,
}

impl StableDiffusion {
    /// Bytes held by the weights of every component (UNet, text encoders, VAE), as loaded.
    pub fn weight_bytes(&self) -> u64 {
        let xl = self
            .xl
            .as_ref()
            .map_or(0, |x| x.text_encoder_2_weights.bytes());
        self.unet_weights.bytes() + self.text_encoder_weights.bytes() + self.vae.weight_bytes() + xl
    }

    /// Loads every component of the folder `root` (model_index.json, tokenizer/,
    /// text_encoder/, unet/, vae/, scheduler/).
    pub fn load(root: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(root, dtype, device, Vec::new())
    }

    /// Loads a model from any [`ModelSource`]: a diffusers folder (a cache snapshot is one) or a
    /// single-file checkpoint, with `overrides` as in [`StableDiffusion::load_with`].
    pub fn load_source(
        source: &ModelSource,
        dtype: DType,
        device: &Device,
        overrides: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        if !source.is_single_file() {
            let mut sd = Self::load_with(&source.path, dtype, device, overrides)?;
            sd.source = source.clone();
            return Ok(sd);
        }
        let path = &source.path;
        let plan = Plan::inspect(path, source.config.as_deref())?;
        let tokenizer = plan.tokenizer()?;
        let tokenizer_2 = plan.tokenizer_2()?;
        let mut parts = plan.load(dtype, device)?;
        let mut take = |part: Part| {
            WeightFile::from_tensors(path.clone(), parts.remove(&part).unwrap_or_default())
        };
        let (unet_file, vae_file, te_file, te2_file) = (
            take(Part::Unet),
            take(Part::Vae),
            take(Part::TextEncoder),
            take(Part::TextEncoder2),
        );
        let (text_encoder, text_encoder_weights) = ClipTextModel::load_weights(
            &plan.text_encoder,
            te_file,
            dtype,
            device,
            pick(&overrides, "text_encoder.", dtype, device)?,
        )?;
        // SDXL: the second encoder, and the UNet's config checked against both encoders before
        // the UNet is built.
        let xl = match (tokenizer_2, &plan.text_encoder_2) {
            (Some(tokenizer_2), Some(config)) => {
                let encoder = ClipTextModel::load_weights(
                    config,
                    te2_file,
                    dtype,
                    device,
                    pick(&overrides, "text_encoder_2.", dtype, device)?,
                )?;
                let xl = XlText::new(
                    tokenizer_2,
                    encoder,
                    plan.force_zeros_for_empty_prompt,
                    config.path(),
                )?;
                xl.check_unet(&text_encoder, &UNetConfig::from_json(&plan.unet)?)?;
                Some(xl)
            }
            _ => None,
        };
        let (unet, unet_weights) = UNet::load_weights(
            &plan.unet,
            unet_file,
            dtype,
            device,
            pick(&overrides, "unet.", dtype, device)?,
        )?;
        let (vae, _) =
            Vae::load_weights(&plan.vae, vae_file, dtype, device, LoadOptions::default())?;
        let scheduler = Ddim::new(DdimConfig::from_json(&plan.scheduler)?)?;
        Ok(Self {
            root: path.clone(),
            source: source.clone(),
            layout: plan.describe(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            device: device.clone(),
            dtype,
            unet_weights,
            text_encoder_weights,
            xl,
        })
    }

    /// Like [`StableDiffusion::load`], with tensors named `unet.<name>` / `text_encoder.<name>`
    /// (/ `text_encoder_2.<name>` for SDXL) replacing or adding weights (fine-tuned weights, LoRA adapters) over the folder's.
    pub fn load_with(
        root: &Path,
        dtype: DType,
        device: &Device,
        overrides: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let pick = |prefix: &str| pick(&overrides, prefix, dtype, device);
        if !root.is_dir() {
            return Err(Error::file(root, "model folder does not exist"));
        }
        let index = root.join("model_index.json");
        if !index.is_file() {
            return Err(Error::file(
                &index,
                "missing: not a diffusers pipeline folder",
            ));
        }
        let tokenizer = ClipTokenizer::from_dir(&component(root, "tokenizer")?)?;
        let (text_encoder, text_encoder_weights) = ClipTextModel::load_dir(
            &component(root, "text_encoder")?,
            dtype,
            device,
            pick("text_encoder.")?,
        )?;
        // SDXL: the second encoder, and the UNet's config checked against both encoders before
        // its weights are read.
        let unet_dir = component(root, "unet")?;
        let unet_config = UNetConfig::from_json(&ConfigJson::read(&unet_dir.join("config.json"))?)?;
        let xl = if super::sdxl::is_xl(root)? {
            let xl = XlText::load_dir(root, dtype, device, pick("text_encoder_2.")?)?;
            xl.check_unet(&text_encoder, &unet_config)?;
            Some(xl)
        } else {
            if unet_config.text_time.is_some() {
                return Err(Error::file(
                    root,
                    "the UNet takes SDXL's added conditioning but the folder has no `text_encoder_2/`",
                ));
            }
            None
        };
        let (unet, unet_weights) = UNet::load_dir(&unet_dir, dtype, device, pick("unet.")?)?;
        let (vae, _) = Vae::load_dir(
            &component(root, "vae")?,
            dtype,
            device,
            LoadOptions::default(),
        )?;
        let scheduler = Ddim::new(DdimConfig::load_dir(&component(root, "scheduler")?)?)?;
        Ok(Self {
            root: root.to_path_buf(),
            source: ModelSource::folder(root),
            layout: if xl.is_some() {
                "diffusers folder (SDXL)".into()
            } else {
                "diffusers folder".into()
            },
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            device: device.clone(),
            dtype,
            unet_weights,
            text_encoder_weights,
            xl,
        })
    }

    /// A pipeline of the given component configs with seeded random weights
    /// ([`WeightFile::synthetic`]), taking the tokenizer and scheduler from the diffusers folder
    /// `root` (they hold no weights). Shapes are all that timing needs: `mifo bench` uses it to
    /// time Stable Diffusion 2.1-base without its 5 GB of weights. A shape with a second text
    /// encoder (SDXL) takes `tokenizer_2/` from `root` too.
    pub fn synthetic(
        root: &Path,
        shape: &ModelShape,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tokenizer = ClipTokenizer::from_dir(&component(root, "tokenizer")?)?;
        let scheduler = Ddim::new(DdimConfig::load_dir(&component(root, "scheduler")?)?)?;
        let text_encoder_weights = Rc::new(WeightFile::synthetic(
            format!("{} text_encoder (random)", shape.name),
            seed,
            dtype,
            device,
        ));
        let unet_weights = Rc::new(WeightFile::synthetic(
            format!("{} unet (random)", shape.name),
            seed.wrapping_add(1),
            dtype,
            device,
        ));
        let vae_weights = Rc::new(WeightFile::synthetic(
            format!("{} vae (random)", shape.name),
            seed.wrapping_add(2),
            shape.vae.compute_dtype(dtype),
            device,
        ));
        let xl = match &shape.text_encoder_2 {
            Some(config) => {
                let weights = Rc::new(WeightFile::synthetic(
                    format!("{} text_encoder_2 (random)", shape.name),
                    seed.wrapping_add(3),
                    dtype,
                    device,
                ));
                let xl = XlText {
                    tokenizer_2: ClipTokenizer::from_dir(&component(root, "tokenizer_2")?)?,
                    text_encoder_2: ClipTextModel::load(config.clone(), weights.clone(), device)?,
                    text_encoder_2_weights: weights,
                    force_zeros_for_empty_prompt: true,
                };
                Some(xl)
            }
            None => None,
        };
        Ok(Self {
            root: root.to_path_buf(),
            source: ModelSource::folder(root),
            layout: format!("{} shapes, random weights", shape.name),
            tokenizer,
            text_encoder: ClipTextModel::load(
                shape.text_encoder.clone(),
                text_encoder_weights.clone(),
                device,
            )?,
            unet: UNet::load(shape.unet.clone(), unet_weights.clone(), dtype, device)?,
            vae: Vae::load(shape.vae.clone(), vae_weights)?,
            scheduler,
            device: device.clone(),
            dtype,
            unet_weights,
            text_encoder_weights,
            xl,
        })
    }
}

/// The overrides named `<prefix><name>` as load options for one component, in its dtype and
/// on its device.
fn pick(
    overrides: &[(String, Tensor)],
    prefix: &str,
    dtype: DType,
    device: &Device,
) -> Result<LoadOptions> {
    overrides
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v)))
        .map(|(k, v)| Ok((k, v.to_dtype(dtype)?.to_device(device)?)))
        .collect::<Result<_>>()
        .map(|overrides| LoadOptions {
            overrides,
            ..LoadOptions::default()
        })
}

/// The component configs of a pipeline, without weights.
#[derive(Clone, Debug)]
pub struct ModelShape {
    /// A short name (`sd21-base`).
    pub name: String,
    /// The UNet's config.
    pub unet: UNetConfig,
    /// The text encoder's config.
    pub text_encoder: ClipConfig,
    /// SDXL's second text encoder's config (`None` for SD 1.x / 2.x).
    pub text_encoder_2: Option<ClipConfig>,
    /// The autoencoder's config.
    pub vae: VaeConfig,
}

impl ModelShape {
    /// Stable Diffusion 2.1-base (stabilityai/stable-diffusion-2-1-base): the values of its
    /// unet/, text_encoder/ and vae/ config.json files, read through the same parsers as a
    /// folder on disk.
    pub fn sd21_base() -> Result<Self> {
        use super::config::ConfigJson;
        use serde_json::json;
        let unet = UNetConfig::from_json(&ConfigJson::from_value(
            "sd21-base/unet/config.json",
            json!({
                "block_out_channels": [320, 640, 1280, 1280],
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                   "CrossAttnUpBlock2D"],
                "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                "layers_per_block": 2, "norm_num_groups": 32, "use_linear_projection": true,
                "sample_size": 64, "in_channels": 4, "out_channels": 4,
                "flip_sin_to_cos": true, "freq_shift": 0
            }),
        )?)?;
        let text_encoder = ClipConfig::from_json(&ConfigJson::from_value(
            "sd21-base/text_encoder/config.json",
            json!({"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
                   "num_hidden_layers": 23, "num_attention_heads": 16,
                   "max_position_embeddings": 77, "hidden_act": "gelu",
                   "model_type": "clip_text_model"}),
        )?)?;
        let vae = VaeConfig::from_json(&ConfigJson::from_value(
            "sd21-base/vae/config.json",
            json!({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                   "norm_num_groups": 32, "latent_channels": 4,
                   "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D",
                                        "DownEncoderBlock2D", "DownEncoderBlock2D"],
                   "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D",
                                      "UpDecoderBlock2D", "UpDecoderBlock2D"],
                   "scaling_factor": 0.18215}),
        )?)?;
        Ok(Self {
            name: "sd21-base".into(),
            unet,
            text_encoder,
            text_encoder_2: None,
            vae,
        })
    }

    /// Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): the values of its
    /// unet/, text_encoder/, text_encoder_2/ and vae/ config.json files, read through the same
    /// parsers as a folder on disk.
    pub fn sdxl_base() -> Result<Self> {
        use super::config::ConfigJson;
        use serde_json::json;
        let unet = UNetConfig::from_json(&ConfigJson::from_value(
            "sdxl-base/unet/config.json",
            json!({
                "block_out_channels": [320, 640, 1280],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
                "transformer_layers_per_block": [1, 2, 10],
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
                "layers_per_block": 2, "norm_num_groups": 32, "use_linear_projection": true,
                "sample_size": 128, "in_channels": 4, "out_channels": 4,
                "flip_sin_to_cos": true, "freq_shift": 0
            }),
        )?)?;
        let text_encoder = ClipConfig::from_json(&ConfigJson::from_value(
            "sdxl-base/text_encoder/config.json",
            json!({"architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 768,
                   "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                   "model_type": "clip_text_model", "eos_token_id": 2}),
        )?)?;
        let text_encoder_2 = ClipConfig::from_json(&ConfigJson::from_value(
            "sdxl-base/text_encoder_2/config.json",
            json!({"architectures": ["CLIPTextModelWithProjection"], "vocab_size": 49408,
                   "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                   "num_attention_heads": 20, "max_position_embeddings": 77,
                   "hidden_act": "gelu", "projection_dim": 1280,
                   "model_type": "clip_text_model", "eos_token_id": 2}),
        )?)?;
        let vae = VaeConfig::from_json(&ConfigJson::from_value(
            "sdxl-base/vae/config.json",
            json!({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                   "norm_num_groups": 32, "latent_channels": 4,
                   "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D",
                                        "DownEncoderBlock2D", "DownEncoderBlock2D"],
                   "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D",
                                      "UpDecoderBlock2D", "UpDecoderBlock2D"],
                   "scaling_factor": 0.13025, "force_upcast": true}),
        )?)?;
        Ok(Self {
            name: "sdxl-base".into(),
            unet,
            text_encoder,
            text_encoder_2: Some(text_encoder_2),
            vae,
        })
    }
}
