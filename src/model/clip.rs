//! CLIP text transformer (`CLIPTextModel`) that embeds token ids with a frozen vocabulary table
//! plus a separate, trainable tensor for the placeholder rows.
//!
//! Ids below the base vocabulary size read the frozen table; ids `base + i` read row `i` of the
//! placeholder tensor. The table is never copied or concatenated, and because it is a plain
//! tensor an optimiser (and its weight decay) cannot touch it.
//!
//! A `CLIPTextModelWithProjection` (SDXL's second encoder) also carries `text_projection`, applied
//! to the pooled state: the final-norm row at the end-of-text position.

use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::checkpoint::{checkpointed, policy_for, Checkpointing, ModelCheckpointing};
use super::config::ConfigJson;
use super::nn::{softmax_last, Activation, LayerNorm, Linear};
use super::weights::{Scope, WeightFile};
use crate::error::{Error, Result};

/// The resolved text-encoder configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    /// Base vocabulary size (rows of the frozen table).
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub num_layers: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Length of the position table (77).
    pub max_positions: usize,
    /// MLP activation.
    pub activation: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Where the pooled state is read (from `eos_token_id`, as transformers does).
    pub pooling: Pooling,
    /// Width of `text_projection` for a `CLIPTextModelWithProjection` (from `projection_dim`
    /// when `architectures` names that class), `None` for a plain `CLIPTextModel`.
    pub projection_dim: Option<usize>,
}

/// Where a CLIP text tower's pooled feature is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The position of the largest id (transformers' rule for `eos_token_id == 2`).
    LargestId,
    /// The first position holding this id.
    FirstId(u32),
}

impl Pooling {
    /// The rule transformers applies for the config's `eos_token_id`.
    pub fn for_eos(eos_token_id: u64) -> Self {
        if eos_token_id == 2 {
            Self::LargestId
        } else {
            Self::FirstId(eos_token_id as u32)
        }
    }

    /// The pooled position in one row of ids (the last position when the id is absent).
    pub fn position(self, ids: &[u32]) -> usize {
        match self {
            Self::LargestId => {
                let max = ids.iter().copied().max().unwrap_or(0);
                ids.iter().position(|&i| i == max).unwrap_or(0)
            }
            Self::FirstId(eos) => ids
                .iter()
                .position(|&i| i == eos)
                .unwrap_or(ids.len().saturating_sub(1)),
        }
    }
}

impl ClipConfig {
    /// Reads and validates a transformers `CLIPTextModel` config.
    pub fn from_json(c: &ConfigJson) -> Result<Self> {
        let act_name = c.str_or("hidden_act", "quick_gelu")?;
        let activation = Activation::parse(&act_name).ok_or_else(|| {
            Error::file(
                c.path(),
                format!("key `hidden_act`: `{act_name}` is not supported by mifo"),
            )
        })?;
        c.require_one_of("model_type", &[json!("clip_text_model")])?;
        let with_projection = c
            .str_list("architectures")
            .map(|a| a.iter().any(|n| n == "CLIPTextModelWithProjection"))
            .unwrap_or(false);
        let cfg = Self {
            vocab_size: c.usize_or("vocab_size", 49408)?,
            hidden_size: c.usize_or("hidden_size", 512)?,
            intermediate_size: c.usize_or("intermediate_size", 2048)?,
            num_layers: c.usize_or("num_hidden_layers", 12)?,
            num_heads: c.usize_or("num_attention_heads", 8)?,
            max_positions: c.usize_or("max_position_embeddings", 77)?,
            activation,
            layer_norm_eps: c.f64_or("layer_norm_eps", 1e-5)?,
            pooling: Pooling::for_eos(c.usize_or("eos_token_id", 49407)? as u64),
            projection_dim: if with_projection {
                Some(c.usize_or("projection_dim", 512)?)
            } else {
                None
            },
        };
        if cfg.num_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
            return Err(Error::file(
                c.path(),
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    cfg.hidden_size, cfg.num_heads
                ),
            ));
        }
        Ok(cfg)
    }
}

impl ClipConfig {
    /// Reads the `text_config` object of a transformers `CLIPModel` `config.json` (the text
    /// tower of a CLIP image–text model; absent keys take `CLIPTextConfig`'s defaults, which
    /// are [`ClipConfig::from_json`]'s). `path` names the file in errors.
    pub fn from_clip_model(path: &Path, config: &serde_json::Value) -> Result<Self> {
        let text = config
            .get("text_config")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let label = path.with_file_name(format!(
            "{}#text_config",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "config.json".into())
        ));
        Self::from_json(&ConfigJson::from_value(label, text)?)
    }
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The CLIP text transformer.
pub struct ClipTextModel {
    config: ClipConfig,
    token_table: Tensor,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    final_ln: LayerNorm,
    projection: Option<Linear>,
    device: Device,
    /// Which layers to checkpoint in passes that build a graph ([`super::checkpoint`]).
    checkpointing: ModelCheckpointing,
}

impl EncoderLayer {
    /// Pre-norm self-attention under the additive `mask` [L, L], then the pre-norm MLP, each
    /// added to the residual stream `h` [B, L, hidden].
    fn forward(
        &self,
        h: &Tensor,
        mask: &Tensor,
        heads: usize,
        activation: Activation,
    ) -> Result<Tensor> {
        let (b, l, d) = h.dims3()?;
        let hd = d / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let x = self.ln1.forward(h)?;
        let q = split((self.q.forward(&x)? * scale)?)?;
        let k = split(self.k.forward(&x)?)?;
        let v = split(self.v.forward(&x)?)?;
        let logits = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = softmax_last(&logits)?;
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
        let h = (h + self.out.forward(&a)?)?;
        let x = self.ln2.forward(&h)?;
        let m = self
            .fc2
            .forward(&activation.forward(&self.fc1.forward(&x)?)?)?;
        Ok((h + m)?)
    }
}

/// The hidden states of a text forward that SDXL reads.
#[derive(Clone, Debug)]
pub struct TextStates {
    /// The output of the second-to-last layer, before the final norm (transformers'
    /// `hidden_states[-2]`), [B, L, hidden].
    pub penultimate: Tensor,
    /// The last hidden state after the final norm, [B, L, hidden].
    pub last: Tensor,
}

impl ClipTextModel {
    /// The text tower of a transformers `CLIPModel` folder (`config.json` with a nested
    /// `text_config`, `model.safetensors` with `text_model.*` keys); the weight file is returned
    /// too, for the caller's `text_projection`.
    pub fn load_clip_model_dir(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, Rc<WeightFile>)> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
        let config = ClipConfig::from_clip_model(&path, &value)?;
        let file = super::loader::find_weights(dir, "model")?;
        let weights = Rc::new(WeightFile::load(&file, dtype, device)?);
        if !weights.contains("text_model.embeddings.token_embedding.weight") {
            return Err(Error::file(
                &file,
                "no `text_model.*` weights: not a transformers CLIPModel",
            ));
        }
        Ok((Self::load(config, weights.clone(), device)?, weights))
    }

    /// Builds the model from a config and weights (keys with or without the `text_model.`
    /// prefix).
    pub fn load(config: ClipConfig, weights: Rc<WeightFile>, device: &Device) -> Result<Self> {
        let root = Scope::root(weights.clone());
        let s = if weights.contains("text_model.embeddings.token_embedding.weight") {
            root.pp("text_model")
        } else {
            root
        };
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let emb = s.pp("embeddings");
        let token_table = emb.get("token_embedding.weight", (config.vocab_size, d))?;
        let positions = emb.get("position_embedding.weight", (config.max_positions, d))?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let l = s.pp("encoder.layers").pp(i);
            let a = l.pp("self_attn");
            layers.push(EncoderLayer {
                ln1: LayerNorm::load(&l.pp("layer_norm1"), d, eps)?,
                q: Linear::load(&a.pp("q_proj"), d, d, true)?,
                k: Linear::load(&a.pp("k_proj"), d, d, true)?,
                v: Linear::load(&a.pp("v_proj"), d, d, true)?,
                out: Linear::load(&a.pp("out_proj"), d, d, true)?,
                ln2: LayerNorm::load(&l.pp("layer_norm2"), d, eps)?,
                fc1: Linear::load(&l.pp("mlp.fc1"), d, config.intermediate_size, true)?,
                fc2: Linear::load(&l.pp("mlp.fc2"), config.intermediate_size, d, true)?,
            });
        }
        let final_ln = LayerNorm::load(&s.pp("final_layer_norm"), d, eps)?;
        // `text_projection` sits beside `text_model`, at the file's root.
        let projection = match config.projection_dim {
            Some(p) => Some(Linear::load(
                &Scope::root(weights.clone()).pp("text_projection"),
                d,
                p,
                false,
            )?),
            None => None,
        };
        Ok(Self {
            config,
            token_table,
            positions,
            layers,
            final_ln,
            projection,
            device: device.clone(),
            checkpointing: ModelCheckpointing::at_load(&weights, device),
        })
    }

    /// Sets which layers are checkpointed ([`super::checkpoint`]); a text encoder with
    /// trainable parameters stays at [`Checkpointing::Off`].
    pub fn set_checkpointing(&mut self, c: Checkpointing) {
        self.checkpointing.set(c);
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The frozen vocabulary table [vocab, hidden].
    pub fn token_table(&self) -> &Tensor {
        &self.token_table
    }

    /// Rows of the frozen table for `ids` (e.g. to initialise placeholders from words).
    pub fn token_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let idx = Tensor::new(ids, &self.device)?;
        Ok(self.token_table.index_select(&idx, 0)?)
    }

    /// Mean of all rows of the frozen table [hidden] (the "vocabulary mean" initialisation).
    pub fn mean_token_row(&self) -> Result<Tensor> {
        Ok(self.token_table.mean(0)?)
    }

    /// Embeds `ids` [B, L] (u32 or i64) with the frozen table and, for ids at or above the base
    /// vocabulary, the rows of `extra` [N, hidden]; returns [B, L, hidden].
    pub fn embed_tokens(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let flat: Vec<u32> = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        let base = self.config.vocab_size as u32;
        let n_extra = extra.map(|e| e.dim(0)).transpose()?.unwrap_or(0) as u32;
        if let Some(&bad) = flat.iter().find(|&&i| i >= base + n_extra) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary ({base} words + {n_extra} placeholders)"
            )));
        }
        let base_ids: Vec<u32> = flat.iter().map(|&i| if i < base { i } else { 0 }).collect();
        let base_ids = Tensor::new(base_ids, &self.device)?;
        let mut emb = super::grad_mode::param(&self.token_table).index_select(&base_ids, 0)?;
        let extra = extra.map(super::grad_mode::param);
        if let Some(extra) = &extra {
            if flat.iter().any(|&i| i >= base) {
                let extra_ids: Vec<u32> = flat.iter().map(|&i| i.saturating_sub(base)).collect();
                let is_extra: Vec<u8> = flat.iter().map(|&i| u8::from(i >= base)).collect();
                let extra_ids = Tensor::new(extra_ids, &self.device)?;
                let is_extra = Tensor::new(is_extra, &self.device)?
                    .unsqueeze(1)?
                    .broadcast_as(emb.shape())?;
                let extra_emb = extra.to_dtype(emb.dtype())?.index_select(&extra_ids, 0)?;
                emb = is_extra.where_cond(&extra_emb, &emb)?;
            }
        }
        Ok(emb.reshape((b, l, self.config.hidden_size))?)
    }

    /// The last hidden state after the final layer norm, [B, L, hidden], for token ids
    /// [B, L]; `extra` holds the placeholder rows (ids `vocab_size + i`).
    pub fn forward(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
        let emb = self.embed_tokens(ids, extra)?;
        self.forward_embeds(&emb)
    }

    /// The transformer on token embeddings [B, L, hidden] (positions are added here).
    pub fn forward_embeds(&self, token_embeds: &Tensor) -> Result<Tensor> {
        let (_, last) = self.run_layers(token_embeds, false)?;
        self.final_ln.forward(&last)
    }

    /// The penultimate and the final-norm last hidden states for token ids [B, L] (`extra` as in
    /// [`ClipTextModel::forward`]).
    pub fn forward_states(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<TextStates> {
        let emb = self.embed_tokens(ids, extra)?;
        let (penultimate, last) = self.run_layers(&emb, true)?;
        let penultimate = penultimate.ok_or_else(|| {
            Error::Input("the text encoder has no layers: no penultimate hidden state".into())
        })?;
        Ok(TextStates {
            penultimate,
            last: self.final_ln.forward(&last)?,
        })
    }

    /// The pooled state [B, hidden]: the row of `last` [B, L, hidden] at each row's end-of-text
    /// position in `ids` [B, L] (the config's pooling rule).
    pub fn pooled(&self, last: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let picked = rows
            .iter()
            .enumerate()
            .map(|(b, r)| {
                let pos = self.config.pooling.position(r);
                Ok(last.get(b)?.narrow(0, pos, 1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&picked, 0)?)
    }

    /// `text_projection` of the pooled state [B, projection_dim] (SDXL's `text_embeds`); an
    /// error for a text encoder without a projection.
    pub fn text_embeds(&self, last: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let proj = self.projection.as_ref().ok_or_else(|| {
            Error::Input(
                "this text encoder has no text_projection (not a CLIPTextModelWithProjection)"
                    .into(),
            )
        })?;
        proj.forward(&self.pooled(last, ids)?)
    }

    /// Runs every layer on `token_embeds`; returns the input of the last layer when
    /// `keep_penultimate` (and there is a layer), and the last layer's output before the final
    /// norm.
    fn run_layers(
        &self,
        token_embeds: &Tensor,
        keep_penultimate: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let (_, l, _) = token_embeds.dims3()?;
        if l > self.config.max_positions {
            return Err(Error::Input(format!(
                "{l} tokens exceed the text encoder's {} positions",
                self.config.max_positions
            )));
        }
        let heads = self.config.num_heads;
        let activation = self.config.activation;
        let pos = super::grad_mode::param(&self.positions)
            .narrow(0, 0, l)?
            .unsqueeze(0)?;
        let mut h = token_embeds.broadcast_add(&pos)?;
        let mask = causal_mask(l, h.dtype(), &self.device)?;
        let policy = policy_for(self.checkpointing.policy(), &[&h]);
        let mut penultimate = None;
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if keep_penultimate && i + 1 == n {
                penultimate = Some(h.clone());
            }
            h = if policy.covers(&h) {
                let (layer, mask) = (layer.clone(), mask.clone());
                checkpointed(
                    Arc::new(move |x: &[Tensor]| layer.forward(&x[0], &mask, heads, activation)),
                    &[&h],
                )?
            } else {
                layer.forward(&h, &mask, heads, activation)?
            };
        }
        Ok((penultimate, h))
    }
}

/// [L, L] additive causal mask: 0 on and below the diagonal, the dtype's minimum above.
fn causal_mask(l: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let min = match dtype {
        DType::F64 => f64::MIN,
        DType::F32 => f32::MIN as f64,
        _ => -65504.0,
    };
    let data: Vec<f64> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { min } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (l, l), device)?.to_dtype(dtype)?)
}
