//! `UNet2DConditionModel` (SD 1.x / 2.x and SDXL layouts) built from `unet/config.json`.
//!
//! SDXL's UNet (`addition_embed_type = "text_time"`) adds a second embedding to the time
//! embedding: every time id (original size, crop corner, target size) through the same sinusoidal
//! features as the timestep, `addition_time_embed_dim` wide each, concatenated after the pooled
//! text embedding and sent through a two-layer SiLU MLP (`add_embedding`).

use std::rc::Rc;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::attention::{AttentionHook, HookCtx};
use super::blocks::{
    Downsample, ResnetBlock, ResnetParams, SpatialTransformer, TransformerParams, Upsample,
};
use super::checkpoint::{policy_for, Checkpointing, ModelCheckpointing};
use super::config::ConfigJson;
use super::nn::{Conv2d, GroupNorm, Linear};
use super::weights::{Scope, WeightFile};
use crate::error::{Error, Result};

/// The resolved UNet configuration (everything the forward needs).
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Channels per resolution level.
    pub block_out_channels: Vec<usize>,
    /// Whether each down block has cross-attention (up blocks mirror the config's own list).
    pub down_attn: Vec<bool>,
    /// Whether each up block has cross-attention.
    pub up_attn: Vec<bool>,
    /// ResNet layers per down block (up blocks have one more).
    pub layers_per_block: Vec<usize>,
    /// Attention heads per level (diffusers reads `attention_head_dim` as the head count
    /// when `num_attention_heads` is null).
    pub heads: Vec<usize>,
    /// Transformer blocks per spatial transformer, per level.
    pub transformer_layers: Vec<usize>,
    /// Width of the text states.
    pub cross_attention_dim: usize,
    /// Group-norm groups.
    pub norm_groups: usize,
    /// Group-norm epsilon of the ResNets and the output norm.
    pub norm_eps: f64,
    /// Linear (true) or 1×1-conv projections in the spatial transformers.
    pub linear_projection: bool,
    /// Attention in f32 for half-precision weights.
    pub upcast_attention: bool,
    /// Sinusoidal embedding: cos first.
    pub flip_sin_to_cos: bool,
    /// Sinusoidal embedding frequency shift.
    pub freq_shift: f64,
    /// Width of the time embedding MLP output.
    pub time_embed_dim: usize,
    /// Kernel of `conv_in` / `conv_out`.
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    pub conv_out_kernel: usize,
    /// Padding of the stride-2 downsampling convolutions.
    pub downsample_padding: usize,
    /// Divisor of every ResNet output.
    pub resnet_out_scale: f64,
    /// Divisor of the mid-block ResNet outputs.
    pub mid_block_scale: f64,
    /// Map the input from [0,1] to [-1,1] first.
    pub center_input_sample: bool,
    /// The latent size the model was trained at (`sample_size`).
    pub sample_size: usize,
    /// SDXL's added text-and-time conditioning (`addition_embed_type = "text_time"`).
    pub text_time: Option<TextTimeConfig>,
}

/// The sizes of SDXL's added conditioning.
#[derive(Clone, Debug, PartialEq)]
pub struct TextTimeConfig {
    /// Width of each time id's sinusoidal features (`addition_time_embed_dim`).
    pub time_embed_dim: usize,
    /// Input width of `add_embedding` (`projection_class_embeddings_input_dim`): the pooled
    /// text width plus the time ids × `time_embed_dim`.
    pub input_dim: usize,
}

/// SDXL's added conditioning for one batch: the pooled, projected text embedding of the second
/// text encoder and the time ids (original height and width, crop top and left, target height
/// and width).
#[derive(Clone, Debug)]
pub struct AddedCond {
    /// [B, projection_dim].
    pub text_embeds: Tensor,
    /// [B, 6] (any float dtype).
    pub time_ids: Tensor,
}

impl AddedCond {
    /// The two halves stacked along the batch (classifier-free guidance: uncond then cond).
    pub fn cat(a: &Self, b: &Self) -> Result<Self> {
        Ok(Self {
            text_embeds: Tensor::cat(&[&a.text_embeds, &b.text_embeds], 0)?,
            time_ids: Tensor::cat(&[&a.time_ids, &b.time_ids], 0)?,
        })
    }

    /// Batch rows `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            text_embeds: self.text_embeds.narrow(0, start, len)?,
            time_ids: self.time_ids.narrow(0, start, len)?,
        })
    }

    /// The same conditioning off the autograd graph.
    pub fn detach(&self) -> Self {
        Self {
            text_embeds: self.text_embeds.detach(),
            time_ids: self.time_ids.detach(),
        }
    }
}

impl UNetConfig {
    /// Reads and validates a diffusers `UNet2DConditionModel` config.
    pub fn from_json(c: &ConfigJson) -> Result<Self> {
        let bad = |msg: String| Error::file(c.path(), msg);
        // Features of other diffusers UNets that SD 1.x/2.x never use: refuse, do not ignore.
        for key in [
            "class_embed_type",
            "num_class_embeds",
            "time_cond_proj_dim",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "cross_attention_norm",
            "timestep_post_act",
            "time_embedding_act_fn",
            "reverse_transformer_layers_per_block",
            "mid_block_only_cross_attention",
        ] {
            c.require_null(key)?;
        }
        c.require_one_of("act_fn", &[json!("silu")])?;
        c.require_one_of("dual_cross_attention", &[json!(false)])?;
        c.require_one_of("only_cross_attention", &[json!(false)])?;
        c.require_one_of("resnet_time_scale_shift", &[json!("default")])?;
        c.require_one_of("time_embedding_type", &[json!("positional")])?;
        c.require_one_of("attention_type", &[json!("default")])?;
        c.require_one_of("resnet_skip_time_act", &[json!(false)])?;
        c.require_one_of("mid_block_type", &[json!("UNetMidBlock2DCrossAttn")])?;
        c.require_one_of("class_embeddings_concat", &[json!(false)])?;
        c.require_one_of("addition_embed_type", &[json!("text_time")])?;
        let text_time = if c.str_or("addition_embed_type", "")? == "text_time" {
            let time_embed_dim = c.usize("addition_time_embed_dim")?;
            if time_embed_dim == 0 || time_embed_dim % 2 != 0 {
                return Err(bad(format!(
                    "key `addition_time_embed_dim`: {time_embed_dim} must be even and positive"
                )));
            }
            Some(TextTimeConfig {
                time_embed_dim,
                input_dim: c.usize("projection_class_embeddings_input_dim")?,
            })
        } else {
            None
        };

        let boc = c.usize_list("block_out_channels")?;
        let n = boc.len();
        if n == 0 {
            return Err(bad("key `block_out_channels`: empty".into()));
        }
        let down_types = c.str_list("down_block_types")?;
        let up_types = c.str_list("up_block_types")?;
        if down_types.len() != n || up_types.len() != n {
            return Err(bad(format!(
                "down_block_types ({}) and up_block_types ({}) must both have {n} entries like block_out_channels",
                down_types.len(),
                up_types.len()
            )));
        }
        let down_attn = down_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                o => Err(bad(format!(
                    "key `down_block_types`: block type `{o}` is not supported by mifo"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_attn = up_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                o => Err(bad(format!(
                    "key `up_block_types`: block type `{o}` is not supported by mifo"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let layers_per_block = c.per_block("layers_per_block", n)?.unwrap_or(vec![2; n]);
        let heads = match c.per_block("num_attention_heads", n)? {
            Some(h) => h,
            None => c.per_block("attention_head_dim", n)?.unwrap_or(vec![8; n]),
        };
        for (i, (&ch, &h)) in boc.iter().zip(&heads).enumerate() {
            if h == 0 || ch % h != 0 {
                return Err(bad(format!(
                    "block {i}: {ch} channels cannot be split into {h} attention heads"
                )));
            }
        }
        let transformer_layers = c
            .per_block("transformer_layers_per_block", n)?
            .unwrap_or(vec![1; n]);
        let norm_groups = c.usize_or("norm_num_groups", 32)?;
        for &ch in &boc {
            if norm_groups == 0 || ch % norm_groups != 0 {
                return Err(bad(format!(
                    "key `norm_num_groups`: {norm_groups} groups do not divide {ch} channels"
                )));
            }
        }
        let conv_in_kernel = c.usize_or("conv_in_kernel", 3)?;
        let conv_out_kernel = c.usize_or("conv_out_kernel", 3)?;
        if conv_in_kernel % 2 == 0 || conv_out_kernel % 2 == 0 {
            return Err(bad("conv_in_kernel / conv_out_kernel must be odd".into()));
        }
        if boc[0] % 2 != 0 {
            return Err(bad(
                "block_out_channels[0] must be even (sinusoidal time embedding)".into(),
            ));
        }
        Ok(Self {
            in_channels: c.usize_or("in_channels", 4)?,
            out_channels: c.usize_or("out_channels", 4)?,
            time_embed_dim: c.usize_or("time_embedding_dim", boc[0] * 4)?,
            block_out_channels: boc,
            down_attn,
            up_attn,
            layers_per_block,
            heads,
            transformer_layers,
            cross_attention_dim: c.usize_or("cross_attention_dim", 1280)?,
            norm_groups,
            norm_eps: c.f64_or("norm_eps", 1e-5)?,
            linear_projection: c.bool_or("use_linear_projection", false)?,
            upcast_attention: c.bool_or("upcast_attention", false)?,
            flip_sin_to_cos: c.bool_or("flip_sin_to_cos", true)?,
            freq_shift: c.f64_or("freq_shift", 0.0)?,
            conv_in_kernel,
            conv_out_kernel,
            downsample_padding: c.usize_or("downsample_padding", 1)?,
            resnet_out_scale: c.f64_or("resnet_out_scale_factor", 1.0)?,
            mid_block_scale: c.f64_or("mid_block_scale_factor", 1.0)?,
            center_input_sample: c.bool_or("center_input_sample", false)?,
            sample_size: c.usize_or("sample_size", 64)?,
            text_time,
        })
    }

    /// Total number of attention calls in one forward (self + cross).
    pub fn attention_calls(&self) -> usize {
        let n = self.block_out_channels.len();
        let mut calls = 0;
        for i in 0..n {
            if self.down_attn[i] {
                calls += self.layers_per_block[i] * self.transformer_layers[i] * 2;
            }
        }
        calls += self.transformer_layers[n - 1] * 2;
        for i in 0..n {
            if self.up_attn[i] {
                let level = n - 1 - i;
                calls += (self.layers_per_block[level] + 1) * self.transformer_layers[level] * 2;
            }
        }
        calls
    }
}

struct Layer {
    resnet: ResnetBlock,
    attn: Option<SpatialTransformer>,
}

struct DownBlock {
    layers: Vec<Layer>,
    down: Option<Downsample>,
}

struct UpBlock {
    layers: Vec<Layer>,
    up: Option<Upsample>,
}

/// The UNet.
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    add_embedding: Option<(Linear, Linear)>,
    down: Vec<DownBlock>,
    mid_resnet_0: ResnetBlock,
    mid_attn: SpatialTransformer,
    mid_resnet_1: ResnetBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
    device: Device,
    /// Which units to checkpoint in passes that build a graph ([`super::checkpoint`]).
    checkpointing: ModelCheckpointing,
}

impl UNet {
    /// Builds the UNet from a config and its weights.
    pub fn load(
        config: UNetConfig,
        weights: Rc<WeightFile>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let file = Rc::clone(&weights);
        let s = Scope::root(weights);
        let cfg = &config;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let rp = ResnetParams {
            groups: cfg.norm_groups,
            eps: cfg.norm_eps,
            temb_dim: Some(cfg.time_embed_dim),
            output_scale: cfg.resnet_out_scale,
        };
        let tp = |level: usize| TransformerParams {
            heads: cfg.heads[level],
            head_dim: boc[level] / cfg.heads[level],
            layers: cfg.transformer_layers[level],
            context_dim: cfg.cross_attention_dim,
            groups: cfg.norm_groups,
            linear_projection: cfg.linear_projection,
            upcast_attention: cfg.upcast_attention,
        };

        let conv_in = Conv2d::load(
            &s.pp("conv_in"),
            cfg.in_channels,
            boc[0],
            cfg.conv_in_kernel,
            1,
            cfg.conv_in_kernel / 2,
        )?;
        let time_linear_1 = Linear::load(
            &s.pp("time_embedding.linear_1"),
            boc[0],
            cfg.time_embed_dim,
            true,
        )?;
        let time_linear_2 = Linear::load(
            &s.pp("time_embedding.linear_2"),
            cfg.time_embed_dim,
            cfg.time_embed_dim,
            true,
        )?;

        let add_embedding = match &cfg.text_time {
            Some(tt) => Some((
                Linear::load(
                    &s.pp("add_embedding.linear_1"),
                    tt.input_dim,
                    cfg.time_embed_dim,
                    true,
                )?,
                Linear::load(
                    &s.pp("add_embedding.linear_2"),
                    cfg.time_embed_dim,
                    cfg.time_embed_dim,
                    true,
                )?,
            )),
            None => None,
        };

        let mut down = Vec::with_capacity(n);
        let mut prev = boc[0];
        for (i, &out) in boc.iter().enumerate() {
            let bs = s.pp("down_blocks").pp(i);
            let mut layers = Vec::new();
            for j in 0..cfg.layers_per_block[i] {
                let in_ch = if j == 0 { prev } else { out };
                layers.push(Layer {
                    resnet: ResnetBlock::load(&bs.pp("resnets").pp(j), in_ch, out, rp)?,
                    attn: if cfg.down_attn[i] {
                        Some(SpatialTransformer::load(
                            &bs.pp("attentions").pp(j),
                            out,
                            tp(i),
                        )?)
                    } else {
                        None
                    },
                });
            }
            let down_s = if i + 1 < n {
                Some(Downsample::load(
                    &bs.pp("downsamplers").pp(0),
                    out,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                layers,
                down: down_s,
            });
            prev = out;
        }

        let mid = s.pp("mid_block");
        let mid_rp = ResnetParams {
            output_scale: cfg.mid_block_scale,
            ..rp
        };
        let last = boc[n - 1];
        let mid_resnet_0 = ResnetBlock::load(&mid.pp("resnets.0"), last, last, mid_rp)?;
        let mid_attn = SpatialTransformer::load(&mid.pp("attentions.0"), last, tp(n - 1))?;
        let mid_resnet_1 = ResnetBlock::load(&mid.pp("resnets.1"), last, last, mid_rp)?;

        let mut up = Vec::with_capacity(n);
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut prev_out = rev[0];
        for i in 0..n {
            let level = n - 1 - i;
            let bs = s.pp("up_blocks").pp(i);
            let out = rev[i];
            let input = rev[(i + 1).min(n - 1)];
            let count = cfg.layers_per_block[level] + 1;
            let mut layers = Vec::new();
            for j in 0..count {
                let skip = if j + 1 == count { input } else { out };
                let res_in = if j == 0 { prev_out } else { out };
                layers.push(Layer {
                    resnet: ResnetBlock::load(&bs.pp("resnets").pp(j), res_in + skip, out, rp)?,
                    attn: if cfg.up_attn[i] {
                        Some(SpatialTransformer::load(
                            &bs.pp("attentions").pp(j),
                            out,
                            tp(level),
                        )?)
                    } else {
                        None
                    },
                });
            }
            let up_s = if i + 1 < n {
                Some(Upsample::load(&bs.pp("upsamplers").pp(0), out)?)
            } else {
                None
            };
            up.push(UpBlock { layers, up: up_s });
            prev_out = out;
        }

        let norm_out = GroupNorm::load(
            &s.pp("conv_norm_out"),
            cfg.norm_groups,
            boc[0],
            cfg.norm_eps,
        )?;
        let conv_out = Conv2d::load(
            &s.pp("conv_out"),
            boc[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            1,
            cfg.conv_out_kernel / 2,
        )?;
        Ok(Self {
            config,
            conv_in,
            time_linear_1,
            time_linear_2,
            add_embedding,
            down,
            mid_resnet_0,
            mid_attn,
            mid_resnet_1,
            up,
            norm_out,
            conv_out,
            dtype,
            device: device.clone(),
            checkpointing: ModelCheckpointing::at_load(&file, device),
        })
    }

    /// Sets which units of this UNet are checkpointed ([`super::checkpoint`]). A UNet with
    /// trainable parameters stays at [`Checkpointing::Off`]: the recomputation would not carry
    /// their gradients.
    pub fn set_checkpointing(&mut self, c: Checkpointing) {
        self.checkpointing.set(c);
    }

    /// Which units are checkpointed.
    pub fn checkpointing(&self) -> Checkpointing {
        self.checkpointing.policy()
    }

    /// The resolved configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Sinusoidal timestep features [B, block_out_channels[0]] in f32.
    fn time_features(&self, timesteps: &Tensor, batch: usize) -> Result<Tensor> {
        let t = timesteps.to_dtype(DType::F32)?.flatten_all()?;
        let t = match t.dim(0)? {
            1 if batch > 1 => t.broadcast_as(batch)?.contiguous()?,
            b if b == batch => t,
            b => {
                return Err(Error::Input(format!(
                    "UNet: {b} timesteps for a batch of {batch}"
                )))
            }
        };
        self.sinusoidal(&t, self.config.block_out_channels[0])
    }

    /// diffusers' `Timesteps` features of the values `t` [N] (f32): [N, dim], with the UNet's
    /// `flip_sin_to_cos` and `freq_shift`.
    fn sinusoidal(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let half = dim / 2;
        let denom = half as f64 - self.config.freq_shift;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f64.ln()) * i as f64 / denom).exp() as f32)
            .collect();
        let freqs = Tensor::new(freqs, &self.device)?;
        let args = t
            .to_device(&self.device)?
            .unsqueeze(1)?
            .broadcast_mul(&freqs.unsqueeze(0)?)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.config.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 1)?
        } else {
            Tensor::cat(&[sin, cos], 1)?
        };
        Ok(emb)
    }

    /// SDXL's `add_embedding` of (pooled text, time ids) for a batch of `batch`: [B, T], or an
    /// error when the conditioning is missing, unexpected or of the wrong width.
    fn added_embedding(&self, added: Option<&AddedCond>, batch: usize) -> Result<Option<Tensor>> {
        let (tt, (l1, l2)) = match (&self.config.text_time, &self.add_embedding, added) {
            (None, _, None) => return Ok(None),
            (None, _, Some(_)) => {
                return Err(Error::Input(
                    "UNet: added conditioning given to a UNet without `addition_embed_type`".into(),
                ))
            }
            (Some(_), _, None) | (Some(_), None, _) => {
                return Err(Error::Input(
                    "UNet: this SDXL UNet (`addition_embed_type = \"text_time\"`) needs the pooled text embeds and the time ids".into(),
                ))
            }
            (Some(tt), Some(l), Some(_)) => (tt, l),
        };
        let added = added.expect("matched Some above");
        let rows = |t: &Tensor, what: &str| -> Result<Tensor> {
            match t.dim(0)? {
                1 if batch > 1 => Ok(t.broadcast_as((batch, t.dim(1)?))?.contiguous()?),
                b if b == batch => Ok(t.clone()),
                b => Err(Error::Input(format!(
                    "UNet: {b} rows of {what} for a batch of {batch}"
                ))),
            }
        };
        let text = rows(&added.text_embeds, "text_embeds")?;
        let ids = rows(&added.time_ids.to_dtype(DType::F32)?, "time_ids")?;
        let (_, n_ids) = ids.dims2()?;
        let width = text.dim(1)? + n_ids * tt.time_embed_dim;
        if width != tt.input_dim {
            return Err(Error::Input(format!(
                "UNet: text_embeds ({}) + {n_ids} time ids × {} is {width} wide, add_embedding takes {}",
                text.dim(1)?,
                tt.time_embed_dim,
                tt.input_dim
            )));
        }
        let time = self
            .sinusoidal(&ids.flatten_all()?, tt.time_embed_dim)?
            .reshape((batch, n_ids * tt.time_embed_dim))?;
        let input =
            Tensor::cat(&[&text, &time.to_dtype(text.dtype())?], 1)?.to_dtype(self.dtype)?;
        Ok(Some(l2.forward(&l1.forward(&input)?.silu()?)?))
    }

    /// Predicts the model output (noise for epsilon models) for latents `x` [B, C, H, W] at
    /// `timesteps` ([B] or [1], any numeric dtype) given text states `context` [B, M, D].
    pub fn forward(&self, x: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_hooked(x, timesteps, context, None)
    }

    /// [`UNet::forward`] with an attention hook that sees (and may edit) every attention call.
    pub fn forward_hooked(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        hook: Option<&mut dyn AttentionHook>,
    ) -> Result<Tensor> {
        self.forward_cond(x, timesteps, context, None, hook)
    }

    /// [`UNet::forward_hooked`] with SDXL's added conditioning (required by, and only accepted
    /// by, a UNet whose config has `addition_embed_type = "text_time"`).
    pub fn forward_cond(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        hook: Option<&mut dyn AttentionHook>,
    ) -> Result<Tensor> {
        let mut ctx = HookCtx::new(hook);
        let (batch, ch, _, _) = x.dims4()?;
        if ch != self.config.in_channels {
            return Err(Error::Input(format!(
                "UNet expects {} latent channels, got {ch}",
                self.config.in_channels
            )));
        }
        let temb = self.time_features(timesteps, batch)?.to_dtype(self.dtype)?;
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&temb)?.silu()?)?;
        let temb = match self.added_embedding(added, batch)? {
            Some(aug) => (temb + aug)?,
            None => temb,
        };

        let x = if self.config.center_input_sample {
            ((x * 2.0)? - 1.0)?
        } else {
            x.clone()
        };
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        ctx.set_checkpointing(policy_for(self.checkpointing.policy(), &[&x, context]));
        let run = |layer: &Layer, h: &Tensor, ctx: &mut HookCtx| -> Result<Tensor> {
            let h = layer.resnet.forward_in(h, &temb, ctx)?;
            match &layer.attn {
                Some(a) => a.forward(&h, context, ctx),
                None => Ok(h),
            }
        };
        for blk in &self.down {
            for layer in &blk.layers {
                h = run(layer, &h, &mut ctx)?;
                skips.push(h.clone());
            }
            if let Some(d) = &blk.down {
                h = d.forward(&h)?;
                skips.push(h.clone());
            }
        }

        h = self.mid_resnet_0.forward_in(&h, &temb, &ctx)?;
        h = self.mid_attn.forward(&h, context, &mut ctx)?;
        h = self.mid_resnet_1.forward_in(&h, &temb, &ctx)?;

        for blk in &self.up {
            for layer in &blk.layers {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Input("UNet: skip connections exhausted".into()))?;
                h = run(layer, &Tensor::cat(&[&h, &skip], 1)?, &mut ctx)?;
            }
            if let Some(u) = &blk.up {
                // Upsample to the next skip's size (handles sizes that are not powers of 2).
                let size = match skips.last() {
                    Some(s) => {
                        let (_, _, sh, sw) = s.dims4()?;
                        Some((sh, sw))
                    }
                    None => None,
                };
                h = u.forward(&h, size)?;
            }
        }
        let h = self.norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}
