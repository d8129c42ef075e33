//! SDXL's text side: the second tokenizer and text encoder of a `StableDiffusionXLPipeline`
//! folder, its prompt encoding and its time ids.
//!
//! What diffusers' `StableDiffusionXLPipeline.encode_prompt` computes, and what this module
//! reproduces:
//! - each prompt is tokenised twice, by `tokenizer/` and by `tokenizer_2/` (their pad tokens may
//!   differ: `<|endoftext|>` and `!` in SDXL base);
//! - the text states are the penultimate hidden states (`hidden_states[-2]`, before the final
//!   norm) of `text_encoder/` and of `text_encoder_2/`, concatenated along the width;
//! - the pooled conditioning (`text_embeds`) is `text_encoder_2`'s `text_projection` of its final
//!   state at the end-of-text position;
//! - with `force_zeros_for_empty_prompt` (model_index.json, true unless it says otherwise), an empty
//!   negative prompt is all zeros, states and pooled alike.
//!
//! The time ids are six numbers per image: original height and width, crop top and left, target
//! height and width.

use std::path::Path;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::clip::ClipTextModel;
use super::loader::{Component, LoadOptions};
use super::tokenizer::ClipTokenizer;
use super::unet::{AddedCond, UNetConfig};
use super::weights::WeightFile;
use crate::error::{Error, Result};

/// The second tokenizer and text encoder of an SDXL pipeline.
pub struct XlText {
    /// `tokenizer_2/`.
    pub tokenizer_2: ClipTokenizer,
    /// `text_encoder_2/` (a `CLIPTextModelWithProjection`).
    pub text_encoder_2: ClipTextModel,
    /// Its weights (shared with `text_encoder_2`).
    pub text_encoder_2_weights: Rc<WeightFile>,
    /// An empty negative prompt is zeros (model_index.json `force_zeros_for_empty_prompt`).
    pub force_zeros_for_empty_prompt: bool,
}

/// One batch of prompts encoded the SDXL way.
#[derive(Clone, Debug)]
pub struct XlPrompt {
    /// Both encoders' penultimate hidden states concatenated, [B, L, h1 + h2].
    pub context: Tensor,
    /// The second encoder's pooled, projected output, [B, projection_dim].
    pub text_embeds: Tensor,
}

impl XlPrompt {
    /// The all-zeros encoding of the same shape (`force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            context: self.context.zeros_like()?,
            text_embeds: self.text_embeds.zeros_like()?,
        })
    }

    /// The UNet's added conditioning for these prompts with `time_ids` [B or 1, 6].
    pub fn added(&self, time_ids: &Tensor) -> AddedCond {
        AddedCond {
            text_embeds: self.text_embeds.clone(),
            time_ids: time_ids.clone(),
        }
    }
}

/// Whether the pipeline folder `root` is an SDXL one: `text_encoder_2` listed (not null) in its
/// `model_index.json`, or a `text_encoder_2/` folder present.
pub fn is_xl(root: &Path) -> Result<bool> {
    if root.join("text_encoder_2").is_dir() {
        return Ok(true);
    }
    Ok(model_index(root)?
        .get("text_encoder_2")
        .is_some_and(|v| v.as_array().is_some_and(|a| a.iter().any(|x| !x.is_null()))))
}

/// `force_zeros_for_empty_prompt` of the pipeline folder `root`'s `model_index.json`: true when
/// the key is absent or null (diffusers' default for SDXL).
pub fn force_zeros_for_empty_prompt(root: &Path) -> Result<bool> {
    match model_index(root)?.get("force_zeros_for_empty_prompt") {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Error::file(
            root.join("model_index.json"),
            format!("key `force_zeros_for_empty_prompt`: expected true/false, got {v}"),
        )),
    }
}

fn model_index(root: &Path) -> Result<serde_json::Map<String, Value>> {
    let path = root.join("model_index.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::file(&path, "expected a JSON object")),
        Err(e) => Err(Error::file(&path, format!("invalid JSON: {e}"))),
    }
}

impl XlText {
    /// Loads `tokenizer_2/` and `text_encoder_2/` of the SDXL folder `root`, with `options`
    /// applied to the encoder's weights.
    pub fn load_dir(
        root: &Path,
        dtype: DType,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self> {
        let force_zeros = force_zeros_for_empty_prompt(root)?;
        let folder = |name: &str| -> Result<std::path::PathBuf> {
            let p = root.join(name);
            if p.is_dir() {
                Ok(p)
            } else {
                Err(Error::file(
                    &p,
                    format!("missing component folder `{name}/` (an SDXL pipeline has one)"),
                ))
            }
        };
        let tokenizer_2 = ClipTokenizer::from_dir(&folder("tokenizer_2")?)?;
        let te_dir = folder("text_encoder_2")?;
        let (text_encoder_2, text_encoder_2_weights) =
            ClipTextModel::load_dir(&te_dir, dtype, device, options)?;
        Self::new(
            tokenizer_2,
            (text_encoder_2, text_encoder_2_weights),
            force_zeros,
            &te_dir.join("config.json"),
        )
    }

    /// The second tokenizer and a loaded second encoder with its weights (from a folder, or a
    /// single-file checkpoint's part), refusing an encoder without `text_projection`
    /// (`config` is its config's path, named in that error).
    pub fn new(
        tokenizer_2: ClipTokenizer,
        (text_encoder_2, text_encoder_2_weights): (ClipTextModel, Rc<WeightFile>),
        force_zeros_for_empty_prompt: bool,
        config: &Path,
    ) -> Result<Self> {
        if text_encoder_2.config().projection_dim.is_none() {
            return Err(Error::file(
                config,
                "key `architectures`: SDXL's second text encoder must be a CLIPTextModelWithProjection",
            ));
        }
        Ok(Self {
            tokenizer_2,
            text_encoder_2,
            text_encoder_2_weights,
            force_zeros_for_empty_prompt,
        })
    }

    /// Checks that the UNet takes what the two encoders give: `cross_attention_dim` = h1 + h2,
    /// and `add_embedding`'s input = the projection width + 6 time ids.
    pub fn check_unet(&self, text_encoder: &ClipTextModel, unet: &UNetConfig) -> Result<()> {
        let (h1, h2) = (
            text_encoder.config().hidden_size,
            self.text_encoder_2.config().hidden_size,
        );
        if unet.cross_attention_dim != h1 + h2 {
            return Err(Error::Input(format!(
                "unet/config.json: cross_attention_dim {} is not the two text encoders' widths {h1} + {h2}",
                unet.cross_attention_dim
            )));
        }
        let tt = unet.text_time.as_ref().ok_or_else(|| {
            Error::Input(
                "unet/config.json: an SDXL pipeline's UNet needs `addition_embed_type = \"text_time\"`"
                    .into(),
            )
        })?;
        let proj = self.text_encoder_2.config().projection_dim.unwrap_or(0);
        if tt.input_dim != proj + TIME_IDS * tt.time_embed_dim {
            return Err(Error::Input(format!(
                "unet/config.json: projection_class_embeddings_input_dim {} is not text_encoder_2's projection_dim {proj} + {TIME_IDS} × addition_time_embed_dim {}",
                tt.input_dim, tt.time_embed_dim
            )));
        }
        Ok(())
    }

    /// Encodes token ids of both tokenizers (`ids` [B, L] by `tokenizer/`, `ids_2` [B, L] by
    /// `tokenizer_2/`) with placeholder rows for each encoder (ids at or above each base
    /// vocabulary; see [`ClipTextModel::forward`]).
    pub fn encode(
        &self,
        text_encoder: &ClipTextModel,
        ids: &Tensor,
        rows: Option<&Tensor>,
        ids_2: &Tensor,
        rows_2: Option<&Tensor>,
    ) -> Result<XlPrompt> {
        encode_with(text_encoder, &self.text_encoder_2, ids, rows, ids_2, rows_2)
    }
}

/// [`XlText::encode`] with any pair of encoders (a learning run's trainable copies).
pub fn encode_with(
    text_encoder: &ClipTextModel,
    text_encoder_2: &ClipTextModel,
    ids: &Tensor,
    rows: Option<&Tensor>,
    ids_2: &Tensor,
    rows_2: Option<&Tensor>,
) -> Result<XlPrompt> {
    let one = text_encoder.forward_states(ids, rows)?;
    let two = text_encoder_2.forward_states(ids_2, rows_2)?;
    let text_embeds = text_encoder_2.text_embeds(&two.last, ids_2)?;
    let context = Tensor::cat(
        &[
            &one.penultimate,
            &two.penultimate.to_dtype(one.penultimate.dtype())?,
        ],
        2,
    )?;
    Ok(XlPrompt {
        context,
        text_embeds,
    })
}

/// How many time ids SDXL base conditions on.
pub const TIME_IDS: usize = 6;

/// The time ids [batch, 6] of SDXL: original (height, width), crop (top, left), target
/// (height, width), in pixels, as f32.
pub fn time_ids(
    original: (usize, usize),
    crop: (usize, usize),
    target: (usize, usize),
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let row = [original.0, original.1, crop.0, crop.1, target.0, target.1].map(|v| v as f32);
    Ok(Tensor::new(&row, device)?
        .unsqueeze(0)?
        .broadcast_as((batch, TIME_IDS))?
        .contiguous()?)
}
