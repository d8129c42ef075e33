//! CLIP as an image–text scorer: a transformers `CLIPModel` folder (`config.json` with
//! `text_config` / `vision_config` / `projection_dim`, `model.safetensors` with `text_model.*`,
//! `vision_model.*`, `visual_projection`, `text_projection`, the tokenizer files and optionally
//! `preprocessor_config.json`), e.g. `openai/clip-vit-large-patch14`.
//!
//! * Text: the tokenizer frames the prompt as `<|startoftext|> … <|endoftext|>` (77 positions at
//!   most), the text tower of [`crate::model::clip`] runs on it, the hidden state at the pooling
//!   position goes through `text_projection`. The pooling position follows transformers: the
//!   first `<|endoftext|>` (the first position holding `text_config.eos_token_id`), or, for the
//!   legacy `eos_token_id = 2` of the OpenAI configs, the position of the largest id. The causal
//!   mask makes padding irrelevant, so the sequence is cut after that position.
//! * Image: the image processor (see [`super::preprocess`]), the patch embedding (no bias), the
//!   class token and position table, `pre_layrnorm`, the encoder, `post_layernorm` of the class
//!   token, then `visual_projection`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::preprocess::{ImageProcessor, ProcessorKind};
use super::vit::{token, with_class_and_positions, Block, PatchEmbed, VitConfig};
use crate::error::{Error, Result};
use crate::model::clip::ClipTextModel;
use crate::model::config::ConfigJson;
use crate::model::nn::{Activation, LayerNorm, Linear};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::weights::Scope;

pub use crate::model::clip::Pooling;

struct Vision {
    cfg: VitConfig,
    patch: PatchEmbed,
    class: Tensor,
    positions: Tensor,
    pre_ln: LayerNorm,
    blocks: Vec<Block>,
    post_ln: LayerNorm,
}

/// A CLIP image–text model.
pub struct ClipModel {
    dir: PathBuf,
    text: ClipTextModel,
    text_projection: Linear,
    tokenizer: ClipTokenizer,
    pooling: Pooling,
    vision: Vision,
    visual_projection: Linear,
    processor: ImageProcessor,
    projection_dim: usize,
    device: Device,
}

/// `CLIPVisionConfig`'s defaults.
fn vision_defaults() -> VitConfig {
    VitConfig {
        hidden_size: 768,
        intermediate_size: 3072,
        num_layers: 12,
        num_heads: 12,
        image_size: 224,
        patch_size: 32,
        activation: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
        qkv_bias: true,
    }
}

impl ClipModel {
    /// Loads a `CLIPModel` folder in f32 on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&config_path, format!("invalid JSON: {e}")))?;
        let top = ConfigJson::from_value(&config_path, value.clone())?;
        top.require_one_of("model_type", &[serde_json::json!("clip")])?;
        let projection_dim = top.usize_or("projection_dim", 512)?;
        let vision_json = ConfigJson::from_value(
            config_path.with_file_name("config.json#vision_config"),
            value
                .get("vision_config")
                .cloned()
                .unwrap_or_else(|| serde_json::json!({})),
        )?;
        let vcfg = VitConfig::from_json(&vision_json, &vision_defaults())?;
        let eos = value
            .get("text_config")
            .and_then(|t| t.get("eos_token_id"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(49407);

        let (text_model, weights) = ClipTextModel::load_clip_model_dir(dir, DType::F32, device)?;
        let root = Scope::root(weights.clone());
        let text_hidden = text_model.config().hidden_size;
        let text_projection = Linear::load(
            &root.pp("text_projection"),
            text_hidden,
            projection_dim,
            false,
        )?;
        let vision = load_vision(&root.pp("vision_model"), &vcfg)?;
        let visual_projection = Linear::load(
            &root.pp("visual_projection"),
            vcfg.hidden_size,
            projection_dim,
            false,
        )?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let pooling = Pooling::for_eos(eos);
        if let Pooling::FirstId(id) = pooling {
            if tokenizer.eos_id() != id {
                return Err(Error::file(
                    &config_path,
                    format!(
                        "text_config.eos_token_id {id} is not the tokenizer's end-of-text id {}",
                        tokenizer.eos_id()
                    ),
                ));
            }
        }
        let processor = processor_for(
            dir,
            ProcessorKind::Clip,
            ImageProcessor::clip(vcfg.image_size as u32),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            text: text_model,
            text_projection,
            tokenizer,
            pooling,
            vision,
            visual_projection,
            processor,
            projection_dim,
            device: device.clone(),
        })
    }

    /// The folder the model came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Width of the joint embedding space.
    pub fn projection_dim(&self) -> usize {
        self.projection_dim
    }

    /// The image processor in use.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// The token ids the text tower reads for `text`: bos, the tokens, and everything up to and
    /// including the pooling position.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode(text)?;
        let pos = self.pooling.position(&ids);
        Ok(ids[..=pos].to_vec())
    }

    /// The text tower's last hidden state [L, hidden] for ids from [`ClipModel::token_ids`].
    pub fn text_hidden(&self, ids: &[u32]) -> Result<Tensor> {
        let t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        Ok(self.text.forward(&t, None)?.squeeze(0)?)
    }

    /// Projected text features [projection_dim] of `text` (not normalised).
    pub fn text_embeds(&self, text: &str) -> Result<Tensor> {
        let ids = self.token_ids(text)?;
        let h = self.text_hidden(&ids)?;
        let pooled = h.narrow(0, ids.len() - 1, 1)?;
        Ok(self.text_projection.forward(&pooled)?.squeeze(0)?)
    }

    /// The vision tower's last hidden state [B, patches + 1, hidden] for `pixel_values`.
    pub fn vision_hidden(&self, pixels: &Tensor) -> Result<Tensor> {
        let v = &self.vision;
        let patches = v.patch.forward(pixels)?;
        let mut h = with_class_and_positions(&patches, &v.class, &v.positions)?;
        h = v.pre_ln.forward(&h)?;
        for b in &v.blocks {
            h = b.forward(&h)?;
        }
        Ok(h)
    }

    /// Projected image features [B, projection_dim] of `pixel_values` (not normalised).
    pub fn image_embeds_from_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        let h = self.vision_hidden(pixels)?;
        let pooled = self.vision.post_ln.forward(&token(&h, 0)?)?;
        self.visual_projection.forward(&pooled)
    }

    /// Projected image features of RGB images, one vector each.
    pub fn image_embeds(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(8) {
            let pixels =
                self.processor
                    .batch(chunk, self.vision.cfg.image_size as u32, &self.device)?;
            let e = self.image_embeds_from_pixels(&pixels)?;
            out.extend(e.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }
}

fn load_vision(s: &Scope, cfg: &VitConfig) -> Result<Vision> {
    let e = s.pp("embeddings");
    let d = cfg.hidden_size;
    let blocks = (0..cfg.num_layers)
        .map(|i| Block::load_clip(&s.pp("encoder.layers").pp(i), cfg))
        .collect::<Result<Vec<_>>>()?;
    Ok(Vision {
        patch: PatchEmbed::load(&e.pp("patch_embedding"), cfg, false)?,
        class: e.get("class_embedding", d)?,
        positions: e.get("position_embedding.weight", (cfg.num_patches() + 1, d))?,
        pre_ln: LayerNorm::load(&s.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?,
        blocks,
        post_ln: LayerNorm::load(&s.pp("post_layernorm"), d, cfg.layer_norm_eps)?,
        cfg: cfg.clone(),
    })
}

/// The folder's `preprocessor_config.json` when present, else `fallback`.
pub(crate) fn processor_for(
    dir: &Path,
    kind: ProcessorKind,
    fallback: ImageProcessor,
) -> Result<ImageProcessor> {
    let path = dir.join("preprocessor_config.json");
    if path.is_file() {
        ImageProcessor::from_file(&path, kind)
    } else {
        Ok(fallback)
    }
}
