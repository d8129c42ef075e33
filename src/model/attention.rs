//! Multi-head attention with a hook: every attention call in the UNet knows its identity
//! (execution index, self/cross, diffusers module path, spatial size) and lets an
//! [`AttentionHook`] add a bias to the logits before the softmax and read the probabilities.
//!
//! With no hook (or a hook that declines a layer) attention runs the plain path; the math is the
//! same, only nothing is reported. On the CPU that path is blocked attention
//! ([`super::blocked_attention`]: an online softmax that never holds the `[N, M]` probabilities,
//! with a backward that recomputes them by blocks); calls a hook reads, and other devices,
//! compute and hold the full `[batch, heads, N, M]` probabilities.

use candle_core::{DType, Tensor};

use super::checkpoint::Checkpointing;
use super::nn::{softmax_last, Linear};
use super::weights::Scope;
use crate::error::Result;

/// Whether an attention layer attends to the image itself or to the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttnKind {
    /// `attn1`: queries and keys are image positions.
    SelfAttn,
    /// `attn2`: queries are image positions, keys are text tokens.
    CrossAttn,
}

/// The identity of one attention call, handed to the hook.
#[derive(Clone, Debug)]
pub struct AttnCall<'a> {
    /// Execution index over all attention calls of one UNet forward (0..32 for SD: even =
    /// self, odd = cross, as counted by the released MIFO / Bounded-Attention code).
    pub index: usize,
    /// Execution index among calls of the same kind (cross-attention 0..16 for SD).
    pub kind_index: usize,
    /// Self- or cross-attention.
    pub kind: AttnKind,
    /// The diffusers module path, e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn2`.
    pub path: &'a str,
    /// Feature-map height of the queries.
    pub height: usize,
    /// Feature-map width of the queries (query index `q = y·width + x`).
    pub width: usize,
    /// Number of heads.
    pub heads: usize,
    /// Batch size.
    pub batch: usize,
    /// Number of keys (h·w for self-attention, the text length for cross-attention).
    pub key_len: usize,
}

/// Observes and edits attention. All methods have do-nothing defaults.
pub trait AttentionHook {
    /// Whether this call should be reported to [`AttentionHook::probs`] and asked for a bias.
    fn wants(&mut self, _call: &AttnCall) -> bool {
        true
    }

    /// Whether this hook could want a call of `kind` at module `path` (asked before the call,
    /// without its other details; must not change the hook). `false` promises that
    /// [`AttentionHook::wants`] will say no to it, which lets the UNet recompute the layer in
    /// the backward pass instead of keeping its activations ([`super::checkpoint`]). The
    /// default, `true`, never allows that.
    fn may_read(&self, _kind: AttnKind, _path: &str) -> bool {
        true
    }

    /// An additive bias for the logits, broadcastable to `[batch, heads, queries, keys]`
    /// (use a large negative value such as -1e4 / `f32::MIN` to mask), or `None`.
    fn logit_bias(&mut self, _call: &AttnCall) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The post-softmax probabilities `[batch, heads, queries, keys]` (after the bias).
    /// They stay on the autograd graph, so losses built from them are differentiable.
    fn probs(&mut self, _call: &AttnCall, _probs: &Tensor) -> Result<()> {
        Ok(())
    }

    /// Whether this call should also report, through [`AttentionHook::unbiased_probs`], the
    /// probabilities the layer would have produced without the hook's bias.
    fn wants_unbiased(&mut self, _call: &AttnCall) -> bool {
        false
    }

    /// The softmax of the same forward's logits *before* the bias, detached from the graph
    /// (`[batch, heads, queries, keys]`); the same tensor as [`AttentionHook::probs`] when no
    /// bias was added. Called after `probs`, only when [`AttentionHook::wants_unbiased`] said so.
    fn unbiased_probs(&mut self, _call: &AttnCall, _probs: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// Per-forward state: the optional hook and the running call counters.
pub struct HookCtx<'h> {
    hook: Option<&'h mut dyn AttentionHook>,
    next_index: usize,
    next_self: usize,
    next_cross: usize,
    checkpointing: Checkpointing,
}

impl<'h> HookCtx<'h> {
    /// A context around an optional hook.
    pub fn new(hook: Option<&'h mut dyn AttentionHook>) -> Self {
        Self {
            hook,
            next_index: 0,
            next_self: 0,
            next_cross: 0,
            checkpointing: Checkpointing::Off,
        }
    }

    /// Which units of this forward pass are checkpointed ([`super::checkpoint`]); off unless
    /// the model sets it.
    pub(crate) fn set_checkpointing(&mut self, c: Checkpointing) {
        self.checkpointing = c;
    }

    /// Whether the unit whose input is `input` is checkpointed in this pass.
    pub(crate) fn checkpoints(&self, input: &Tensor) -> bool {
        self.checkpointing.covers(input)
    }

    /// Number of attention calls seen so far.
    pub fn calls(&self) -> usize {
        self.next_index
    }

    /// Whether the hook could read a call of `kind` at `path` ([`AttentionHook::may_read`];
    /// false without a hook).
    pub(crate) fn may_read(&self, kind: AttnKind, path: &str) -> bool {
        self.hook.as_deref().is_some_and(|h| h.may_read(kind, path))
    }

    /// Counts calls that ran without the hook (a checkpointed layer), so that the calls after
    /// them keep their indices.
    pub(crate) fn skip(&mut self, self_calls: usize, cross_calls: usize) {
        self.next_index += self_calls + cross_calls;
        self.next_self += self_calls;
        self.next_cross += cross_calls;
    }
}

/// One attention module (`attn1` / `attn2` of a transformer block, or the VAE mid attention).
#[derive(Clone, Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    kind: AttnKind,
    path: String,
    upcast: bool,
}

/// The shape and options of one attention module ([`Attention::load`]).
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    /// Width of the query input (and of the output).
    pub query_dim: usize,
    /// Width of the key/value input: the text embedding for cross-attention, `query_dim` for
    /// self-attention.
    pub context_dim: usize,
    /// Number of heads.
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Self- or cross-attention.
    pub kind: AttnKind,
    /// Whether the q/k/v projections have a bias (false in the UNet, true in the VAE).
    pub qkv_bias: bool,
    /// Compute the scores in f32 whatever the weights' dtype (`upcast_attention`).
    pub upcast: bool,
}

impl Attention {
    /// Loads `to_q/to_k/to_v/to_out.0` (or the older VAE names `query/key/value/proj_attn`)
    /// from `s`, shaped by `p`.
    pub fn load(s: &Scope, p: AttentionParams) -> Result<Self> {
        let AttentionParams {
            query_dim,
            context_dim,
            heads,
            head_dim,
            kind,
            qkv_bias,
            upcast,
        } = p;
        let inner = heads * head_dim;
        // Older VAE checkpoints name the projections query/key/value/proj_attn.
        let legacy = !s.contains("to_q.weight") && s.contains("query.weight");
        let (q, k, v, o) = if legacy {
            ("query", "key", "value", s.pp("proj_attn"))
        } else {
            ("to_q", "to_k", "to_v", s.pp("to_out").pp(0))
        };
        Ok(Self {
            to_q: Linear::load(&s.pp(q), query_dim, inner, qkv_bias)?,
            to_k: Linear::load(&s.pp(k), context_dim, inner, qkv_bias)?,
            to_v: Linear::load(&s.pp(v), context_dim, inner, qkv_bias)?,
            to_out: Linear::load(&o, inner, query_dim, true)?,
            heads,
            head_dim,
            kind,
            path: s.path().to_string(),
            upcast,
        })
    }

    /// The module path (diffusers naming).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Self- or cross-attention.
    pub fn kind(&self) -> AttnKind {
        self.kind
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        Ok(x.reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// `x` [B, N, query_dim]; `context` [B, M, context_dim] for cross-attention (None for
    /// self-attention); `(height, width)` is the query feature map (N = height·width).
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        (height, width): (usize, usize),
        ctx: &mut HookCtx,
    ) -> Result<Tensor> {
        let (batch, n, _) = x.dims3()?;
        let kv_in = context.unwrap_or(x);
        let key_len = kv_in.dim(1)?;
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(kv_in)?)?;
        let v = self.split_heads(&self.to_v.forward(kv_in)?)?;

        let index = ctx.next_index;
        ctx.next_index += 1;
        let kind_index = match self.kind {
            AttnKind::SelfAttn => {
                ctx.next_self += 1;
                ctx.next_self - 1
            }
            AttnKind::CrossAttn => {
                ctx.next_cross += 1;
                ctx.next_cross - 1
            }
        };
        let call = AttnCall {
            index,
            kind_index,
            kind: self.kind,
            path: &self.path,
            height,
            width,
            heads: self.heads,
            batch,
            key_len,
        };
        // (Not `Option::filter`: `wants` needs the hook mutably.)
        #[allow(clippy::manual_filter)]
        let mut hook = match ctx.hook.as_deref_mut() {
            Some(h) => {
                if h.wants(&call) {
                    Some(h)
                } else {
                    None
                }
            }
            None => None,
        };

        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if hook.is_none() && super::blocked_attention::applies(&q, &k, &v) {
            // No hook reads this call: blocked attention, no [N, M] tensor held.
            let out = super::blocked_attention::attention(&q, &k, &v, scale)?;
            let out = out
                .transpose(1, 2)?
                .reshape((batch, n, self.heads * self.head_dim))?;
            return self.to_out.forward(&out);
        }

        let in_dtype = q.dtype();
        let (q, k) = if self.upcast && in_dtype != DType::F64 {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q, k)
        };
        // The 1/√d scale goes on q ([B, h, N, d]) rather than on the [B, h, N, M] logits:
        // one full-size tensor less per layer, which matters for the backward's memory.
        let unbiased_logits = (q * scale)?.matmul(&k.t()?)?;
        let mut logits = unbiased_logits.clone();
        let mut biased = false;
        if let Some(h) = hook.as_deref_mut() {
            if let Some(bias) = h.logit_bias(&call)? {
                logits = logits.broadcast_add(&bias.to_dtype(logits.dtype())?)?;
                biased = true;
            }
        }
        let probs = softmax_last(&logits)?.to_dtype(in_dtype)?;
        if let Some(h) = hook {
            h.probs(&call, &probs)?;
            if h.wants_unbiased(&call) {
                if biased {
                    let unbiased = softmax_last(&unbiased_logits.detach())?.to_dtype(in_dtype)?;
                    h.unbiased_probs(&call, &unbiased)?;
                } else {
                    h.unbiased_probs(&call, &probs.detach())?;
                }
            }
        }
        let out = probs.matmul(&v)?; // [B, heads, N, d]
        let out = out
            .transpose(1, 2)?
            .reshape((batch, n, self.heads * self.head_dim))?;
        self.to_out.forward(&out)
    }
}
