//! A diffusers Stable Diffusion folder → its components, each built from its own config.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::clip::ClipTextModel;
use super::ddim::{Ddim, DdimConfig};
use super::tokenizer::ClipTokenizer;
use super::unet::UNet;
use super::vae::Vae;
use crate::error::{Error, Result};

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
    use super::config::ConfigJson;
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

/// All components of a Stable Diffusion pipeline.
pub struct StableDiffusion {
    /// The folder it came from.
    pub root: PathBuf,
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
}

impl StableDiffusion {
    /// Loads every component of the folder `root` (model_index.json, tokenizer/,
    /// text_encoder/, unet/, vae/, scheduler/).
    pub fn load(root: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(root, dtype, device, Vec::new())
    }

    /// Like [`StableDiffusion::load`], with tensors named `unet.<name>` / `text_encoder.<name>`
    /// replacing or adding weights (fine-tuned weights, LoRA adapters) over the folder's.
    pub fn load_with(
        root: &Path,
        dtype: DType,
        device: &Device,
        overrides: Vec<(String, candle_core::Tensor)>,
    ) -> Result<Self> {
        let pick = |prefix: &str| -> Result<Vec<(String, candle_core::Tensor)>> {
            overrides
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v)))
                .map(|(k, v)| Ok((k, v.to_dtype(dtype)?.to_device(device)?)))
                .collect()
        };
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
        let text_encoder = ClipTextModel::load_dir_with(
            &component(root, "text_encoder")?,
            dtype,
            device,
            pick("text_encoder.")?,
            false,
            None,
        )?
        .0;
        let unet = UNet::load_dir_with(
            &component(root, "unet")?,
            dtype,
            device,
            pick("unet.")?,
            false,
            None,
        )?
        .0;
        let vae = Vae::load_dir(&component(root, "vae")?, dtype, device)?;
        let scheduler = Ddim::new(DdimConfig::load_dir(&component(root, "scheduler")?)?)?;
        Ok(Self {
            root: root.to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            device: device.clone(),
            dtype,
        })
    }
}
