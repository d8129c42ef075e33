//! The vision-transformer pieces shared by the CLIP image tower and DINO: patch embedding and
//! the pre-norm encoder block (attention then MLP, each with a residual), built on
//! [`crate::model::nn`]'s Linear, LayerNorm, activations and softmax.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::model::config::ConfigJson;
use crate::model::nn::{softmax_last, Activation, LayerNorm, Linear};
use crate::model::weights::Scope;

/// The sizes of a ViT encoder, read from a `config.json` (or a nested `vision_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct VitConfig {
    /// Token width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder blocks.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Input side in pixels (square).
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// MLP activation.
    pub activation: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Whether query/key/value have biases (`qkv_bias`; CLIP always has them).
    pub qkv_bias: bool,
}

impl VitConfig {
    /// Reads the sizes with `defaults` for absent keys (the transformers class defaults).
    pub fn from_json(c: &ConfigJson, defaults: &VitConfig) -> Result<Self> {
        let act_name = c.str_or("hidden_act", act_name(defaults.activation))?;
        let activation = Activation::parse(&act_name).ok_or_else(|| {
            Error::file(
                c.path(),
                format!("key `hidden_act`: `{act_name}` is not supported by mifo"),
            )
        })?;
        let cfg = Self {
            hidden_size: c.usize_or("hidden_size", defaults.hidden_size)?,
            intermediate_size: c.usize_or("intermediate_size", defaults.intermediate_size)?,
            num_layers: c.usize_or("num_hidden_layers", defaults.num_layers)?,
            num_heads: c.usize_or("num_attention_heads", defaults.num_heads)?,
            image_size: c.usize_or("image_size", defaults.image_size)?,
            patch_size: c.usize_or("patch_size", defaults.patch_size)?,
            activation,
            layer_norm_eps: c.f64_or("layer_norm_eps", defaults.layer_norm_eps)?,
            qkv_bias: c.bool_or("qkv_bias", defaults.qkv_bias)?,
        };
        if c.usize_or("num_channels", 3)? != 3 {
            return Err(Error::file(
                c.path(),
                "key `num_channels`: only 3 (RGB) is supported",
            ));
        }
        if cfg.num_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
            return Err(Error::file(
                c.path(),
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    cfg.hidden_size, cfg.num_heads
                ),
            ));
        }
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(Error::file(
                c.path(),
                format!(
                    "image_size {} is not a multiple of patch_size {}",
                    cfg.image_size, cfg.patch_size
                ),
            ));
        }
        Ok(cfg)
    }

    /// Patches per image.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::GeluErf => "gelu",
        Activation::GeluTanh => "gelu_new",
        Activation::QuickGelu => "quick_gelu",
        Activation::Silu => "silu",
    }
}

/// Patch embedding: a convolution with kernel = stride = patch size (bias optional: CLIP has
/// none), flattened to [B, patches, hidden].
pub struct PatchEmbed {
    weight: Tensor,
    bias: Option<Tensor>,
    patch: usize,
}

impl PatchEmbed {
    /// Loads `weight` [hidden, 3, p, p] and, when `bias`, `bias` [hidden] from `s`.
    pub fn load(s: &Scope, cfg: &VitConfig, bias: bool) -> Result<Self> {
        let p = cfg.patch_size;
        Ok(Self {
            weight: s.get("weight", (cfg.hidden_size, 3, p, p))?,
            bias: if bias {
                Some(s.get("bias", cfg.hidden_size)?)
            } else {
                None
            },
            patch: p,
        })
    }

    /// [B, 3, H, W] → [B, (H/p)·(W/p), hidden].
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = pixels.conv2d(&self.weight, 0, self.patch, 1, 1)?;
        if let Some(b) = &self.bias {
            x = x.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
        }
        Ok(x.flatten_from(2)?.transpose(1, 2)?.contiguous()?)
    }
}

/// One pre-norm encoder block: `h + attn(ln1(h))`, then `h + fc2(act(fc1(ln2(h))))`.
pub struct Block {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: Activation,
}

impl Block {
    /// A CLIP encoder layer (`layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`,
    /// `mlp.fc1`, `mlp.fc2`).
    pub fn load_clip(s: &Scope, cfg: &VitConfig) -> Result<Self> {
        let (d, m, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let a = s.pp("self_attn");
        Ok(Self {
            ln1: LayerNorm::load(&s.pp("layer_norm1"), d, eps)?,
            q: Linear::load(&a.pp("q_proj"), d, d, true)?,
            k: Linear::load(&a.pp("k_proj"), d, d, true)?,
            v: Linear::load(&a.pp("v_proj"), d, d, true)?,
            out: Linear::load(&a.pp("out_proj"), d, d, true)?,
            ln2: LayerNorm::load(&s.pp("layer_norm2"), d, eps)?,
            fc1: Linear::load(&s.pp("mlp.fc1"), d, m, true)?,
            fc2: Linear::load(&s.pp("mlp.fc2"), m, d, true)?,
            heads: cfg.num_heads,
            activation: cfg.activation,
        })
    }

    /// A transformers `ViTLayer` (`layernorm_before`, `attention.attention.{query,key,value}`,
    /// `attention.output.dense`, `layernorm_after`, `intermediate.dense`, `output.dense`).
    pub fn load_vit(s: &Scope, cfg: &VitConfig) -> Result<Self> {
        let (d, m, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let a = s.pp("attention.attention");
        Ok(Self {
            ln1: LayerNorm::load(&s.pp("layernorm_before"), d, eps)?,
            q: Linear::load(&a.pp("query"), d, d, cfg.qkv_bias)?,
            k: Linear::load(&a.pp("key"), d, d, cfg.qkv_bias)?,
            v: Linear::load(&a.pp("value"), d, d, cfg.qkv_bias)?,
            out: Linear::load(&s.pp("attention.output.dense"), d, d, true)?,
            ln2: LayerNorm::load(&s.pp("layernorm_after"), d, eps)?,
            fc1: Linear::load(&s.pp("intermediate.dense"), d, m, true)?,
            fc2: Linear::load(&s.pp("output.dense"), m, d, true)?,
            heads: cfg.num_heads,
            activation: cfg.activation,
        })
    }

    /// Applies the block to `h` [B, N, hidden] (full attention, no mask).
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let (b, n, d) = h.dims3()?;
        let hd = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let x = self.ln1.forward(h)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let q = split((self.q.forward(&x)? * scale)?)?;
        let k = split(self.k.forward(&x)?)?;
        let v = split(self.v.forward(&x)?)?;
        let probs = softmax_last(&q.matmul(&k.t()?)?)?;
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        let h = (h + self.out.forward(&a)?)?;
        let x = self.ln2.forward(&h)?;
        let m = self
            .fc2
            .forward(&self.activation.forward(&self.fc1.forward(&x)?)?)?;
        Ok((h + m)?)
    }
}

/// Prepends the class token [hidden] to patch tokens [B, N, hidden] and adds the position table
/// [N + 1, hidden].
pub fn with_class_and_positions(
    patches: &Tensor,
    class: &Tensor,
    positions: &Tensor,
) -> Result<Tensor> {
    let (b, _, d) = patches.dims3()?;
    let cls = class.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
    let tokens = Tensor::cat(&[&cls.contiguous()?, patches], 1)?;
    Ok(tokens.broadcast_add(&positions.unsqueeze(0)?)?)
}

/// Row `index` of the token axis: [B, N, hidden] → [B, hidden].
pub fn token(h: &Tensor, index: usize) -> Result<Tensor> {
    Ok(h.narrow(1, index, 1)?.squeeze(1)?)
}

/// L2 norm along the last dimension (for tests and diagnostics).
pub fn l2(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}
