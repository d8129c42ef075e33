//! DINO ViT as an image feature extractor: a transformers `ViTModel` folder in the
//! `facebook/dino-vits16` layout (`config.json` with `model_type: vit`, `model.safetensors` with
//! `embeddings.cls_token`, `embeddings.position_embeddings`,
//! `embeddings.patch_embeddings.projection`, `encoder.layer.N.…`, `layernorm`; keys may carry a
//! `vit.` prefix), and optionally `preprocessor_config.json`.
//!
//! The feature is the class token of the last hidden state after the final layer norm — DINO's
//! own `model(img)` output and transformers' `last_hidden_state[:, 0]`.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::clip::processor_for;
use super::preprocess::{ImageProcessor, ProcessorKind};
use super::vit::{token, with_class_and_positions, Block, PatchEmbed, VitConfig};
use crate::error::{Error, Result};
use crate::model::config::ConfigJson;
use crate::model::nn::{Activation, LayerNorm};
use crate::model::weights::{Scope, WeightFile};

/// `ViTConfig`'s defaults.
fn defaults() -> VitConfig {
    VitConfig {
        hidden_size: 768,
        intermediate_size: 3072,
        num_layers: 12,
        num_heads: 12,
        image_size: 224,
        patch_size: 16,
        activation: Activation::GeluErf,
        layer_norm_eps: 1e-12,
        qkv_bias: true,
    }
}

/// A DINO ViT.
pub struct Dino {
    dir: PathBuf,
    cfg: VitConfig,
    patch: PatchEmbed,
    cls: Tensor,
    positions: Tensor,
    blocks: Vec<Block>,
    final_ln: LayerNorm,
    processor: ImageProcessor,
    device: Device,
}

impl Dino {
    /// Loads a `ViTModel` folder in f32 on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let c = ConfigJson::read(&config_path)?;
        c.require_one_of("model_type", &[serde_json::json!("vit")])?;
        let cfg = VitConfig::from_json(&c, &defaults())?;
        let file = crate::model::loader::find_weights(dir, "model")?;
        let weights = Rc::new(WeightFile::load(&file, DType::F32, device)?);
        let root = Scope::root(weights.clone());
        let s = if weights.contains("vit.embeddings.cls_token") {
            root.pp("vit")
        } else {
            root
        };
        if !s.contains("embeddings.cls_token") {
            return Err(Error::file(
                &file,
                "no `embeddings.cls_token`: not a transformers ViTModel (DINO) checkpoint",
            ));
        }
        let d = cfg.hidden_size;
        let e = s.pp("embeddings");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::load_vit(&s.pp("encoder.layer").pp(i), &cfg))
            .collect::<Result<Vec<_>>>()?;
        let processor = processor_for(
            dir,
            ProcessorKind::Vit,
            ImageProcessor::dino(cfg.image_size as u32),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            patch: PatchEmbed::load(&e.pp("patch_embeddings.projection"), &cfg, true)?,
            cls: e.get("cls_token", (1, 1, d))?.reshape(d)?,
            positions: e
                .get("position_embeddings", (1, cfg.num_patches() + 1, d))?
                .squeeze(0)?,
            blocks,
            final_ln: LayerNorm::load(&s.pp("layernorm"), d, cfg.layer_norm_eps)?,
            processor,
            device: device.clone(),
            cfg,
        })
    }

    /// The folder the model came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image processor in use.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// The last hidden state [B, patches + 1, hidden] (after the final layer norm).
    pub fn hidden(&self, pixels: &Tensor) -> Result<Tensor> {
        let patches = self.patch.forward(pixels)?;
        let mut h = with_class_and_positions(&patches, &self.cls, &self.positions)?;
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        self.final_ln.forward(&h)
    }

    /// The class-token features [B, hidden] of `pixel_values`.
    pub fn cls_from_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        token(&self.hidden(pixels)?, 0)
    }

    /// Class-token features of RGB images, one vector each.
    pub fn features(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(8) {
            let pixels = self
                .processor
                .batch(chunk, self.cfg.image_size as u32, &self.device)?;
            out.extend(
                self.cls_from_pixels(&pixels)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?,
            );
        }
        Ok(out)
    }
}
