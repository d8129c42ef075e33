//! `AutoencoderKL`: image → latent distribution (mean / log-variance, seeded sampling) and
//! latent → image, built from `vae/config.json`.

use std::rc::Rc;

use candle_core::{DType, Tensor};
use serde_json::json;

use super::attention::{Attention, AttentionParams, AttnKind, HookCtx};
use super::blocks::{Downsample, ResnetBlock, ResnetParams, Upsample};
use super::config::ConfigJson;
use super::nn::{Conv2d, GroupNorm};
use super::weights::{Scope, WeightFile};
use crate::error::{Error, Result};

/// The resolved VAE configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Image channels.
    pub in_channels: usize,
    /// Decoded image channels.
    pub out_channels: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder block (the decoder has one more).
    pub layers_per_block: usize,
    /// Group-norm groups.
    pub norm_groups: usize,
    /// SD latents = mean × scaling_factor.
    pub scaling_factor: f64,
    /// Whether the mid blocks have an attention layer.
    pub mid_attention: bool,
    /// `quant_conv` present.
    pub quant_conv: bool,
    /// `post_quant_conv` present.
    pub post_quant_conv: bool,
    /// Run in f32 whatever the run's dtype (`force_upcast`; false when the key is absent):
    /// SDXL's VAE overflows in f16, and its config asks for f32 as diffusers' SDXL pipeline
    /// reads it.
    pub force_upcast: bool,
}

impl VaeConfig {
    /// Reads and validates a diffusers `AutoencoderKL` config.
    pub fn from_json(c: &ConfigJson) -> Result<Self> {
        c.require_one_of("act_fn", &[json!("silu")])?;
        c.require_null("shift_factor")?;
        c.require_null("latents_mean")?;
        c.require_null("latents_std")?;
        let boc = c.usize_list("block_out_channels")?;
        for key in ["down_block_types", "up_block_types"] {
            let types = c.str_list(key)?;
            let ok = if key == "down_block_types" {
                "DownEncoderBlock2D"
            } else {
                "UpDecoderBlock2D"
            };
            if types.len() != boc.len() || types.iter().any(|t| t != ok) {
                return Err(Error::file(
                    c.path(),
                    format!("key `{key}`: expected {} × {ok}", boc.len()),
                ));
            }
        }
        let norm_groups = c.usize_or("norm_num_groups", 32)?;
        if boc
            .iter()
            .any(|&ch| norm_groups == 0 || ch % norm_groups != 0)
        {
            return Err(Error::file(
                c.path(),
                format!("key `norm_num_groups`: {norm_groups} does not divide every block width"),
            ));
        }
        Ok(Self {
            in_channels: c.usize_or("in_channels", 3)?,
            out_channels: c.usize_or("out_channels", 3)?,
            latent_channels: c.usize_or("latent_channels", 4)?,
            block_out_channels: boc,
            layers_per_block: c.usize_or("layers_per_block", 2)?,
            norm_groups,
            scaling_factor: c.f64_or("scaling_factor", 0.18215)?,
            mid_attention: c.bool_or("mid_block_add_attention", true)?,
            quant_conv: c.bool_or("use_quant_conv", true)?,
            post_quant_conv: c.bool_or("use_post_quant_conv", true)?,
            force_upcast: c.bool_or("force_upcast", false)?,
        })
    }

    /// The dtype the VAE's weights and computation use in a run of `dtype`: f32 for an f16 or
    /// bf16 run when `force_upcast` is set, else `dtype` itself.
    pub fn compute_dtype(&self, dtype: DType) -> DType {
        match dtype {
            DType::F16 | DType::BF16 if self.force_upcast => DType::F32,
            other => other,
        }
    }

    /// Downsampling factor image → latent.
    pub fn factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

struct MidBlock {
    resnet_0: ResnetBlock,
    attn: Option<(GroupNorm, Attention)>,
    resnet_1: ResnetBlock,
}

impl MidBlock {
    fn load(s: &Scope, ch: usize, cfg: &VaeConfig, rp: ResnetParams) -> Result<Self> {
        let attn = if cfg.mid_attention {
            let a = s.pp("attentions.0");
            Some((
                GroupNorm::load(&a.pp("group_norm"), cfg.norm_groups, ch, 1e-6)?,
                Attention::load(
                    &a,
                    AttentionParams {
                        query_dim: ch,
                        context_dim: ch,
                        heads: 1,
                        head_dim: ch,
                        kind: AttnKind::SelfAttn,
                        qkv_bias: true,
                        upcast: false,
                    },
                )?,
            ))
        } else {
            None
        };
        Ok(Self {
            resnet_0: ResnetBlock::load(&s.pp("resnets.0"), ch, ch, rp)?,
            attn,
            resnet_1: ResnetBlock::load(&s.pp("resnets.1"), ch, ch, rp)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet_0.forward(x, None)?;
        if let Some((norm, attn)) = &self.attn {
            let (b, c, hh, ww) = h.dims4()?;
            let tokens = norm
                .forward(&h)?
                .reshape((b, c, hh * ww))?
                .transpose(1, 2)?;
            let out = attn.forward(&tokens, None, (hh, ww), &mut HookCtx::new(None))?;
            let out = out.transpose(1, 2)?.reshape((b, c, hh, ww))?;
            h = (h + out)?;
        }
        self.resnet_1.forward(&h, None)
    }
}

/// The VAE.
pub struct Vae {
    config: VaeConfig,
    weights: Rc<WeightFile>,
    enc_conv_in: Conv2d,
    enc_blocks: Vec<(Vec<ResnetBlock>, Option<Downsample>)>,
    enc_mid: MidBlock,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dec_conv_in: Conv2d,
    dec_mid: MidBlock,
    dec_blocks: Vec<(Vec<ResnetBlock>, Option<Upsample>)>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
}

impl Vae {
    /// Builds the VAE from a config and weights.
    pub fn load(config: VaeConfig, weights: Rc<WeightFile>) -> Result<Self> {
        let s = Scope::root(weights.clone());
        let cfg = &config;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let g = cfg.norm_groups;
        let rp = ResnetParams {
            groups: g,
            eps: 1e-6,
            temb_dim: None,
            output_scale: 1.0,
        };
        let e = s.pp("encoder");
        let enc_conv_in = Conv2d::load(&e.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?;
        let mut enc_blocks = Vec::with_capacity(n);
        let mut prev = boc[0];
        for (i, &out) in boc.iter().enumerate() {
            let bs = e.pp("down_blocks").pp(i);
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block {
                let in_ch = if j == 0 { prev } else { out };
                resnets.push(ResnetBlock::load(&bs.pp("resnets").pp(j), in_ch, out, rp)?);
            }
            let down = if i + 1 < n {
                Some(Downsample::load(&bs.pp("downsamplers").pp(0), out, 0)?)
            } else {
                None
            };
            enc_blocks.push((resnets, down));
            prev = out;
        }
        let last = boc[n - 1];
        let enc_mid = MidBlock::load(&e.pp("mid_block"), last, cfg, rp)?;
        let enc_norm_out = GroupNorm::load(&e.pp("conv_norm_out"), g, last, 1e-6)?;
        let lat = cfg.latent_channels;
        let enc_conv_out = Conv2d::load(&e.pp("conv_out"), last, 2 * lat, 3, 1, 1)?;
        let quant_conv = if cfg.quant_conv {
            Some(Conv2d::load(
                &s.pp("quant_conv"),
                2 * lat,
                2 * lat,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let post_quant_conv = if cfg.post_quant_conv {
            Some(Conv2d::load(&s.pp("post_quant_conv"), lat, lat, 1, 1, 0)?)
        } else {
            None
        };

        let d = s.pp("decoder");
        let dec_conv_in = Conv2d::load(&d.pp("conv_in"), lat, last, 3, 1, 1)?;
        let dec_mid = MidBlock::load(&d.pp("mid_block"), last, cfg, rp)?;
        let mut dec_blocks = Vec::with_capacity(n);
        let mut prev = last;
        for (i, &out) in boc.iter().rev().enumerate() {
            let bs = d.pp("up_blocks").pp(i);
            let mut resnets = Vec::new();
            for j in 0..=cfg.layers_per_block {
                let in_ch = if j == 0 { prev } else { out };
                resnets.push(ResnetBlock::load(&bs.pp("resnets").pp(j), in_ch, out, rp)?);
            }
            let up = if i + 1 < n {
                Some(Upsample::load(&bs.pp("upsamplers").pp(0), out)?)
            } else {
                None
            };
            dec_blocks.push((resnets, up));
            prev = out;
        }
        let dec_norm_out = GroupNorm::load(&d.pp("conv_norm_out"), g, boc[0], 1e-6)?;
        let dec_conv_out = Conv2d::load(&d.pp("conv_out"), boc[0], cfg.out_channels, 3, 1, 1)?;
        Ok(Self {
            config,
            weights,
            enc_conv_in,
            enc_blocks,
            enc_mid,
            enc_norm_out,
            enc_conv_out,
            quant_conv,
            post_quant_conv,
            dec_conv_in,
            dec_mid,
            dec_blocks,
            dec_norm_out,
            dec_conv_out,
        })
    }

    /// Bytes held by its weights.
    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes()
    }

    /// The resolved configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype the VAE computes in (its weights'; see [`VaeConfig::compute_dtype`]). Inputs
    /// of another dtype are converted to it, and results converted back to the input's.
    pub fn dtype(&self) -> DType {
        self.enc_conv_in.dtype()
    }

    /// Encodes images [B, 3, H, W] in [-1, 1] to the latent distribution: (mean, logvar),
    /// each [B, latent, H/f, W/f], unscaled (SD latents are `mean × scaling_factor`), in the
    /// image's dtype.
    pub fn encode(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let (mean, logvar) = self.encode_in_own_dtype(&image.to_dtype(self.dtype())?)?;
        Ok((
            mean.to_dtype(image.dtype())?,
            logvar.to_dtype(image.dtype())?,
        ))
    }

    fn encode_in_own_dtype(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = image.dims4()?;
        let f = self.config.factor();
        if h % f != 0 || w % f != 0 {
            return Err(Error::Input(format!(
                "VAE: image size {h}x{w} is not a multiple of {f}"
            )));
        }
        let mut x = self.enc_conv_in.forward(image)?;
        for (resnets, down) in &self.enc_blocks {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(d) = down {
                x = d.forward(&x)?;
            }
        }
        x = self.enc_mid.forward(&x)?;
        x = self
            .enc_conv_out
            .forward(&self.enc_norm_out.forward_silu(&x)?)?;
        if let Some(q) = &self.quant_conv {
            x = q.forward(&x)?;
        }
        let parts = x.chunk(2, 1)?;
        let logvar = parts[1].clamp(-30f32, 20f32)?;
        Ok((parts[0].clone(), logvar))
    }

    /// A sample `mean + exp(logvar/2)·noise` with host-side noise of the same shape.
    pub fn sample(mean: &Tensor, logvar: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let std = (logvar * 0.5)?.exp()?;
        Ok((mean + std.mul(&noise.to_dtype(mean.dtype())?)?)?)
    }

    /// Decodes unscaled latents [B, latent, h, w] (divide SD latents by `scaling_factor`
    /// first) to images [B, 3, h·f, w·f], roughly in [-1, 1], not clamped, in the latents'
    /// dtype.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let own = z.to_dtype(self.dtype())?;
        let mut x = match &self.post_quant_conv {
            Some(p) => p.forward(&own)?,
            None => own,
        };
        x = self.dec_conv_in.forward(&x)?;
        x = self.dec_mid.forward(&x)?;
        for (resnets, up) in &self.dec_blocks {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = up {
                x = u.forward(&x, None)?;
            }
        }
        Ok(self
            .dec_conv_out
            .forward(&self.dec_norm_out.forward_silu(&x)?)?
            .to_dtype(z.dtype())?)
    }
}
