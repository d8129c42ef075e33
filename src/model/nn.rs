//! Building blocks shared by the text encoder, UNet and VAE: linear and conv layers, group and
//! layer norm, activations, softmax and nearest resizing.
//!
//! Every op here has a correct backward when gradients are needed: candle's fused
//! `softmax_last_dim` and `layer_norm` silently drop gradients, so they are used only when no
//! input of the op is tracked by autograd (see [`Tensor::track_op`]) and the dtype supports them.

use candle_core::{DType, Module, Tensor};

use super::frozen::FrozenLayer;
use super::grad_mode::param;
use super::weights::Scope;
use crate::error::Result;

/// A linear layer `y = x Wᵀ + b` with weights from a [`Scope`], plus an optional LoRA
/// adapter `scale · x Aᵀ Bᵀ` (see [`super::weights::LoraConfig`]).
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
    lora: Option<super::weights::LoraAdapter>,
}

impl Linear {
    /// Loads `weight` [out, in] and, when `bias`, `bias` [out].
    pub fn load(s: &Scope, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let w = s.get("weight", (out_dim, in_dim))?;
        let b = if bias {
            Some(s.get("bias", out_dim)?)
        } else {
            None
        };
        Ok(Self {
            inner: candle_nn::Linear::new(w, b),
            lora: s.lora_adapter(in_dim, out_dim)?,
        })
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (param(self.inner.weight()), self.inner.bias().map(param));
        let (w, b) = (&w, b.as_ref());
        let y = if FrozenLayer::applies(x, w, b) {
            // Gradient to the input only (see [`super::frozen`]).
            let dims = x.dims();
            let in_dim = dims[dims.len() - 1];
            let rows = x.elem_count() / in_dim.max(1);
            let y = x
                .reshape((rows, in_dim))?
                .apply_op1(FrozenLayer::linear(w, b))?;
            let mut out_dims = dims.to_vec();
            *out_dims.last_mut().expect("x has dims") = y.dim(1)?;
            y.reshape(out_dims)?
        } else {
            candle_nn::Linear::new(w.clone(), b.cloned()).forward(x)?
        };
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                // As one 2-D product over all leading dimensions (no broadcast copies of A, B).
                let dims = x.dims();
                let in_dim = dims[dims.len() - 1];
                let rows = x.elem_count() / in_dim.max(1);
                let x2 = x.reshape((rows, in_dim))?;
                let (a, b) = (
                    param(&l.a).to_dtype(x.dtype())?,
                    param(&l.b).to_dtype(x.dtype())?,
                );
                let up = x2.matmul(&a.t()?)?.matmul(&b.t()?)?;
                let up = if l.scale == 1.0 { up } else { (up * l.scale)? };
                let up = up.reshape(y.shape())?;
                Ok((y + up)?)
            }
        }
    }

    /// The weight matrix [out, in].
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

/// A 2-D convolution with weights from a [`Scope`].
#[derive(Clone, Debug)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

impl Conv2d {
    /// The weight's dtype.
    pub fn dtype(&self) -> candle_core::DType {
        self.inner.weight().dtype()
    }

    /// Loads `weight` [out, in, k, k] and `bias` [out].
    pub fn load(
        s: &Scope,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let w = s.get("weight", (out_ch, in_ch, kernel, kernel))?;
        let b = s.get("bias", out_ch)?;
        let cfg = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Ok(Self {
            inner: candle_nn::Conv2d::new(w, Some(b), cfg),
        })
    }

    /// Applies the convolution to `x` [B, C, H, W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (param(self.inner.weight()), self.inner.bias().map(param));
        let (w, b) = (&w, b.as_ref());
        let cfg = self.inner.config();
        if FrozenLayer::applies(x, w, b) {
            // Gradient to the input only (see [`super::frozen`]).
            return Ok(x.apply_op1(FrozenLayer::conv2d(w, b, cfg.padding, cfg.stride))?);
        }
        if !x.track_op() && !w.track_op() && !b.is_some_and(|b| b.track_op()) {
            // Inference: the same convolution (cuDNN on CUDA when built with it).
            let layer = FrozenLayer::conv2d(w, b, cfg.padding, cfg.stride);
            return Ok(layer.forward_untracked(x)?);
        }
        if x.device().is_cpu() {
            // A trained weight on the CPU: both gradients by our convolution (see
            // [`super::conv`]). On CUDA candle's own layer stays until this path has been
            // measured there.
            let op = super::conv::TrainableConv {
                padding: cfg.padding,
                stride: cfg.stride,
            };
            let y = x.contiguous()?.apply_op2(&w.contiguous()?, op)?;
            return Ok(super::conv::add_channel_bias(y, b)?);
        }
        Ok(candle_nn::Conv2d::new(w.clone(), b.cloned(), *cfg).forward(x)?)
    }

    /// `forward(x)` plus `image_bias` [B, C_out] (added to every position of each image's
    /// channel) and `residual` (of the output's shape), each optional. Where no gradient can
    /// flow, both are folded into the convolution's output pass with the bias
    /// ([`super::conv::conv2d_add`]: on the CPU in f32 the product accumulates onto them);
    /// otherwise they are added after [`Conv2d::forward`], so gradients take the same ops as
    /// before.
    pub fn forward_add(
        &self,
        x: &Tensor,
        image_bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (w, b) = (param(self.inner.weight()), self.inner.bias().map(param));
        let (w, b) = (&w, b.as_ref());
        let tracked = [Some(x), Some(w), b, image_bias, residual]
            .into_iter()
            .flatten()
            .any(Tensor::track_op);
        if !tracked {
            let cfg = self.inner.config();
            let addends = [b, image_bias, residual];
            return Ok(super::conv::conv2d_add(
                x,
                w,
                cfg.padding,
                cfg.stride,
                addends,
            )?);
        }
        let mut y = self.forward(x)?;
        if let Some(t) = image_bias {
            let (n, c) = (y.dim(0)?, y.dim(1)?);
            y = y.broadcast_add(&t.reshape((n, c, 1, 1))?)?;
        }
        Ok(match residual {
            Some(r) => (r + y)?,
            None => y,
        })
    }
}

/// Group normalisation over [B, C, ...]: [`super::fused::GroupNormOp`] (one pass forward,
/// closed-form backward) or candle's composite version (see [`GroupNorm::forward`]).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` [channels].
    pub fn load(s: &Scope, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(candle_core::Error::Msg(format!(
                "group norm: {channels} channels do not split into {groups} groups"
            ))
            .into());
        }
        Ok(Self {
            weight: s.get("weight", channels)?,
            bias: s.get("bias", channels)?,
            groups,
            eps,
        })
    }

    /// Normalises `x`. The fused op runs whenever autograd tracks an input, and always on
    /// CPU (one pass instead of candle's seven); CUDA without gradients keeps candle's kernels.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    /// `SiLU(GroupNorm(x))` (every ResNet block's and the VAE's output norm): on the same paths
    /// as [`GroupNorm::forward`], with the SiLU inside the fused op's pass (and its backward).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let (weight, bias) = (param(&self.weight), param(&self.bias));
        let tracked = x.track_op() || weight.track_op() || bias.track_op();
        if tracked || x.device().is_cpu() {
            let op = super::fused::GroupNormOp {
                groups: self.groups,
                eps: self.eps,
                silu,
            };
            return Ok(x.contiguous()?.apply_op3(&weight, &bias, op)?);
        }
        // Untracked on CUDA: candle's kernels.
        let channels = weight.dim(0)?;
        let y =
            candle_nn::GroupNorm::new(weight, bias, channels, self.groups, self.eps)?.forward(x)?;
        Ok(if silu { y.silu()? } else { y })
    }
}

/// Layer normalisation over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// Loads `weight` and `bias` [dim].
    pub fn load(s: &Scope, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: s.get("weight", dim)?,
            bias: s.get("bias", dim)?,
            eps: eps as f32,
        })
    }

    /// Normalises `x`; uses the fused kernel only when no gradient can flow through it.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (weight, bias) = (param(&self.weight), param(&self.bias));
        let needs_grad = x.track_op() || weight.track_op() || bias.track_op();
        if needs_grad || x.dtype() == DType::F64 {
            Ok(candle_nn::ops::layer_norm_slow(
                x, &weight, &bias, self.eps,
            )?)
        } else {
            Ok(candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &weight,
                &bias,
                self.eps,
            )?)
        }
    }
}

/// Softmax over the last dimension: candle's fused kernel when no gradient can flow, else
/// [`super::fused::SoftmaxLastDim`], the same forward with a backward that keeps only the output (the
/// composite `exp / sum` keeps four full-size intermediates per attention layer alive).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        Ok(x.contiguous()?.apply_op1(super::fused::SoftmaxLastDim)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
    }
}

/// Activation functions named in the model configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x·Φ(x)` (HF `gelu`).
    GeluErf,
    /// Tanh-approximated GELU (HF `gelu_new` / `gelu_pytorch_tanh`).
    GeluTanh,
    /// `x·σ(1.702x)` (HF `quick_gelu`, SD 1.x text encoder).
    QuickGelu,
    /// `x·σ(x)`.
    Silu,
}

impl Activation {
    /// Parses an HF / diffusers activation name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "quick_gelu" => Some(Self::QuickGelu),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }

    /// Applies the activation.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::GeluErf => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Self::Silu => x.silu()?,
        })
    }
}

/// Nearest-neighbour resize of [B, C, H, W] to (h, w) with PyTorch's `nearest` rule
/// (source index `floor(dst · in / out)`), built from `index_select` so that its backward
/// accumulates correctly even when the input is used elsewhere.
pub fn resize_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, in_h, in_w) = x.dims4()?;
    let idx = |out: usize, inp: usize| -> Vec<u32> {
        (0..out)
            .map(|d| ((d as f64 * inp as f64 / out as f64).floor() as usize).min(inp - 1) as u32)
            .collect()
    };
    let dev = x.device();
    let rows = Tensor::new(idx(h, in_h), dev)?;
    let cols = Tensor::new(idx(w, in_w), dev)?;
    Ok(x.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

/// The [out, in] matrix of PyTorch's `bilinear` resize along one axis (`align_corners=False`,
/// no antialias): source coordinate `(dst + 0.5)·in/out − 0.5`, clamped at 0.
pub fn bilinear_matrix(inp: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for d in 0..out {
        let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let frac = (src - i0 as f64) as f32;
        m[d * inp + i0] += 1.0 - frac;
        m[d * inp + i1] += frac;
    }
    m
}

/// Bilinear resize (PyTorch `F.interpolate(mode="bilinear", align_corners=False)`) of the last
/// two dimensions of `x` [..., H, W] to (h, w), as two matrix products (differentiable).
pub fn resize_bilinear(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = dims.len();
    if n < 2 {
        return Err(crate::error::Error::Input(
            "resize_bilinear needs at least 2 dimensions".into(),
        ));
    }
    let (in_h, in_w) = (dims[n - 2], dims[n - 1]);
    let dev = x.device();
    let ry = Tensor::from_vec(bilinear_matrix(in_h, h), (h, in_h), dev)?.to_dtype(x.dtype())?;
    let rx = Tensor::from_vec(bilinear_matrix(in_w, w), (w, in_w), dev)?.to_dtype(x.dtype())?;
    let lead: usize = dims[..n - 2].iter().product();
    let flat = x.reshape((lead, in_h, in_w))?;
    let rows = ry
        .unsqueeze(0)?
        .broadcast_as((lead, h, in_h))?
        .matmul(&flat)?;
    let out = rows.matmul(
        &rx.t()?
            .unsqueeze(0)?
            .broadcast_as((lead, in_w, w))?
            .contiguous()?,
    )?;
    let mut out_dims = dims[..n - 2].to_vec();
    out_dims.extend([h, w]);
    Ok(out.reshape(out_dims)?)
}

/// Nearest resize (PyTorch `nearest`) of the last two dimensions of `x` [..., H, W].
pub fn resize_nearest_hw(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = dims.len();
    let lead: usize = dims[..n - 2].iter().product();
    let out = resize_nearest(&x.reshape((1, lead, dims[n - 2], dims[n - 1]))?, h, w)?;
    let mut out_dims = dims[..n - 2].to_vec();
    out_dims.extend([h, w]);
    Ok(out.reshape(out_dims)?)
}
