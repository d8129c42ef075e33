//! Blocks shared by the UNet and the VAE: ResNet blocks, down/up-sampling, and the spatial
//! transformer (`Transformer2DModel` with `BasicTransformerBlock`s) of the UNet.

use std::sync::Arc;

use candle_core::{Tensor, D};

use super::attention::{Attention, AttentionParams, AttnKind, HookCtx};
use super::checkpoint::checkpointed;
use super::nn::{resize_nearest, Conv2d, GroupNorm, LayerNorm, Linear};
use super::weights::Scope;
use crate::error::Result;

/// `ResnetBlock2D`: two norm-SiLU-conv stages, an optional time-embedding projection, and a
/// 1×1 shortcut when the channel count changes.
#[derive(Clone, Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale: f64,
}

/// Shape parameters of a [`ResnetBlock`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetParams {
    /// Group-norm groups.
    pub groups: usize,
    /// Group-norm epsilon.
    pub eps: f64,
    /// Width of the time embedding, or None (VAE).
    pub temb_dim: Option<usize>,
    /// The block's output is divided by this (diffusers `output_scale_factor`).
    pub output_scale: f64,
}

impl ResnetBlock {
    /// Loads a block mapping `in_ch` to `out_ch` channels.
    pub fn load(s: &Scope, in_ch: usize, out_ch: usize, p: ResnetParams) -> Result<Self> {
        let shortcut = if in_ch != out_ch || s.contains("conv_shortcut.weight") {
            Some(Conv2d::load(
                &s.pp("conv_shortcut"),
                in_ch,
                out_ch,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(&s.pp("norm1"), p.groups, in_ch, p.eps)?,
            conv1: Conv2d::load(&s.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: match p.temb_dim {
                Some(t) => Some(Linear::load(&s.pp("time_emb_proj"), t, out_ch, true)?),
                None => None,
            },
            norm2: GroupNorm::load(&s.pp("norm2"), p.groups, out_ch, p.eps)?,
            conv2: Conv2d::load(&s.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            shortcut,
            output_scale: p.output_scale,
        })
    }

    /// `x` [B, C, H, W]; `temb` [B, T] is the time embedding (required iff the block has one).
    /// Each norm is fused with its SiLU; the time embedding's projection and the residual are
    /// added by the convolutions' output passes ([`Conv2d::forward_add`]).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(proj.forward(&t.silu()?)?),
            _ => None,
        };
        let h = self
            .conv1
            .forward_add(&self.norm1.forward_silu(x)?, t.as_ref(), None)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = self
            .conv2
            .forward_add(&self.norm2.forward_silu(&h)?, None, Some(&skip))?;
        if self.output_scale != 1.0 {
            Ok((out / self.output_scale)?)
        } else {
            Ok(out)
        }
    }
}

impl ResnetBlock {
    /// [`ResnetBlock::forward`] as one checkpointed unit when `ctx` says so for `x`
    /// ([`super::checkpoint`]).
    pub fn forward_in(&self, x: &Tensor, temb: &Tensor, ctx: &HookCtx) -> Result<Tensor> {
        if !ctx.checkpoints(x) {
            return self.forward(x, Some(temb));
        }
        let block = self.clone();
        checkpointed(
            Arc::new(move |t: &[Tensor]| block.forward(&t[0], Some(&t[1]))),
            &[x, temb],
        )
    }
}

/// `Downsample2D`: a stride-2 3×3 convolution (`padding` 0 means diffusers' asymmetric
/// right/bottom zero padding, as in the VAE encoder).
#[derive(Clone, Debug)]
pub struct Downsample {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample {
    /// Loads `conv` from `s` (the `downsamplers.0` scope).
    pub fn load(s: &Scope, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&s.pp("conv"), channels, channels, 3, 2, padding)?,
            asymmetric_pad: padding == 0,
        })
    }

    /// Halves the spatial size.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let x = x
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D`: nearest upsampling followed by a 3×3 convolution.
#[derive(Clone, Debug)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// Loads `conv` from `s` (the `upsamplers.0` scope).
    pub fn load(s: &Scope, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&s.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// Upsamples to `size` (h, w), or 2× when `None`.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&resize_nearest(x, oh, ow)?)
    }
}

/// `FeedForward` with GEGLU: `net.0.proj` to 2×inner, `h · gelu(gate)`, `net.2` back.
#[derive(Clone, Debug)]
struct GegluFeedForward {
    proj: Linear,
    out: Linear,
}

impl GegluFeedForward {
    fn load(s: &Scope, dim: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            proj: Linear::load(&s.pp("net.0.proj"), dim, inner * 2, true)?,
            out: Linear::load(&s.pp("net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = super::fused::geglu(&self.proj.forward(x)?)?;
        self.out.forward(&gated)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention and a GEGLU feed-forward, each
/// pre-normed with a LayerNorm and added back to the residual stream.
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: GegluFeedForward,
}

impl TransformerBlock {
    /// `t + attn1(norm1(t))`.
    fn self_attention(&self, t: &Tensor, hw: (usize, usize), ctx: &mut HookCtx) -> Result<Tensor> {
        Ok((t + self.attn1.forward(&self.norm1.forward(t)?, None, hw, ctx)?)?)
    }

    /// `t + attn2(norm2(t), context)`.
    fn cross_attention(
        &self,
        t: &Tensor,
        context: &Tensor,
        hw: (usize, usize),
        ctx: &mut HookCtx,
    ) -> Result<Tensor> {
        Ok((t + self
            .attn2
            .forward(&self.norm2.forward(t)?, Some(context), hw, ctx)?)?)
    }

    /// `t + ff(norm3(t))`.
    fn feed_forward(&self, t: &Tensor) -> Result<Tensor> {
        Ok((t + self.ff.forward(&self.norm3.forward(t)?)?)?)
    }

    /// The block on tokens `t`: each of its three parts checkpointed where `ctx` says so for
    /// `t` and (for the attention parts) the hook could not read it.
    fn forward(
        self: &Arc<Self>,
        t: &Tensor,
        context: &Tensor,
        hw: (usize, usize),
        ctx: &mut HookCtx,
    ) -> Result<Tensor> {
        let t = if ctx.checkpoints(t) && !ctx.may_read(AttnKind::SelfAttn, self.attn1.path()) {
            ctx.skip(1, 0);
            let blk = Arc::clone(self);
            checkpointed(
                Arc::new(move |x: &[Tensor]| {
                    blk.self_attention(&x[0], hw, &mut HookCtx::new(None))
                }),
                &[t],
            )?
        } else {
            self.self_attention(t, hw, ctx)?
        };
        let t = if ctx.checkpoints(&t) && !ctx.may_read(AttnKind::CrossAttn, self.attn2.path()) {
            ctx.skip(0, 1);
            let blk = Arc::clone(self);
            checkpointed(
                Arc::new(move |x: &[Tensor]| {
                    blk.cross_attention(&x[0], &x[1], hw, &mut HookCtx::new(None))
                }),
                &[&t, context],
            )?
        } else {
            self.cross_attention(&t, context, hw, ctx)?
        };
        if ctx.checkpoints(&t) {
            let blk = Arc::clone(self);
            checkpointed(Arc::new(move |x: &[Tensor]| blk.feed_forward(&x[0])), &[&t])
        } else {
            self.feed_forward(&t)
        }
    }
}

/// Shape parameters of a [`SpatialTransformer`].
#[derive(Clone, Copy, Debug)]
pub struct TransformerParams {
    /// Number of attention heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Number of `BasicTransformerBlock`s.
    pub layers: usize,
    /// Width of the text states.
    pub context_dim: usize,
    /// Group-norm groups of the input norm.
    pub groups: usize,
    /// Linear (SD 2.x) or 1×1-conv (SD 1.x) `proj_in` / `proj_out`.
    pub linear_projection: bool,
    /// Compute attention logits and softmax in f32 even for f16/bf16 weights.
    pub upcast_attention: bool,
}

#[derive(Clone, Debug)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// `Transformer2DModel` over a feature map: norm, project in, transformer blocks, project out,
/// residual.
#[derive(Clone, Debug)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<Arc<TransformerBlock>>,
    proj_out: Projection,
}

impl SpatialTransformer {
    /// Loads a spatial transformer over `channels` channels.
    pub fn load(s: &Scope, channels: usize, p: TransformerParams) -> Result<Self> {
        let inner = p.heads * p.head_dim;
        let (proj_in, proj_out) = if p.linear_projection {
            (
                Projection::Linear(Linear::load(&s.pp("proj_in"), channels, inner, true)?),
                Projection::Linear(Linear::load(&s.pp("proj_out"), inner, channels, true)?),
            )
        } else {
            (
                Projection::Conv(Conv2d::load(&s.pp("proj_in"), channels, inner, 1, 1, 0)?),
                Projection::Conv(Conv2d::load(&s.pp("proj_out"), inner, channels, 1, 1, 0)?),
            )
        };
        let mut blocks = Vec::with_capacity(p.layers);
        for i in 0..p.layers {
            let b = s.pp("transformer_blocks").pp(i);
            blocks.push(Arc::new(TransformerBlock {
                norm1: LayerNorm::load(&b.pp("norm1"), inner, 1e-5)?,
                attn1: Attention::load(
                    &b.pp("attn1"),
                    AttentionParams {
                        query_dim: inner,
                        context_dim: inner,
                        heads: p.heads,
                        head_dim: p.head_dim,
                        kind: AttnKind::SelfAttn,
                        qkv_bias: false,
                        upcast: p.upcast_attention,
                    },
                )?,
                norm2: LayerNorm::load(&b.pp("norm2"), inner, 1e-5)?,
                attn2: Attention::load(
                    &b.pp("attn2"),
                    AttentionParams {
                        query_dim: inner,
                        context_dim: p.context_dim,
                        heads: p.heads,
                        head_dim: p.head_dim,
                        kind: AttnKind::CrossAttn,
                        qkv_bias: false,
                        upcast: p.upcast_attention,
                    },
                )?,
                norm3: LayerNorm::load(&b.pp("norm3"), inner, 1e-5)?,
                ff: GegluFeedForward::load(&b.pp("ff"), inner, inner * 4)?,
            }));
        }
        Ok(Self {
            norm: GroupNorm::load(&s.pp("norm"), p.groups, channels, 1e-6)?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// The attention modules in call order: each transformer block's self-attention, then its
    /// cross-attention.
    pub fn attention_modules(&self) -> impl Iterator<Item = &Attention> {
        self.blocks.iter().flat_map(|b| [&b.attn1, &b.attn2])
    }

    /// Norm and `proj_in` of `x` [B, C, H, W]: tokens [B, H·W, inner].
    fn tokens_in(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))?)
        };
        let normed = self.norm.forward(x)?;
        match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(&normed)?),
            Projection::Conv(cv) => to_tokens(&cv.forward(&normed)?),
        }
    }

    /// `proj_out` of `tokens` back to the feature map, plus the residual `x`.
    fn tokens_out(&self, tokens: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let out = match &self.proj_out {
            Projection::Linear(l) => {
                let t = l.forward(tokens)?;
                t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?
            }
            Projection::Conv(cv) => {
                let inner = tokens.dim(2)?;
                let t = tokens.reshape((b, h, w, inner))?.permute((0, 3, 1, 2))?;
                cv.forward(&t.contiguous()?)?
            }
        };
        Ok((out + x)?)
    }

    /// `x` [B, C, H, W], `context` [B, M, context_dim]. Where `ctx` checkpoints
    /// ([`super::checkpoint`]) the input and output projections and each transformer block's
    /// parts are separate units.
    pub fn forward(&self, x: &Tensor, context: &Tensor, ctx: &mut HookCtx) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut tokens = if ctx.checkpoints(x) {
            let me = self.clone();
            checkpointed(Arc::new(move |t: &[Tensor]| me.tokens_in(&t[0])), &[x])?
        } else {
            self.tokens_in(x)?
        };
        for blk in &self.blocks {
            tokens = blk.forward(&tokens, context, (h, w), ctx)?;
        }
        if ctx.checkpoints(&tokens) {
            let me = self.clone();
            checkpointed(
                Arc::new(move |t: &[Tensor]| me.tokens_out(&t[0], &t[1])),
                &[&tokens, x],
            )
        } else {
            self.tokens_out(&tokens, x)
        }
    }
}
