//! Learning losses, in the form of the released codes (see `docs/mifo-impl-notes.md` §3.4 and
//! §3.6): masked reconstruction as a plain mean over all latent elements, MIFO's cross-attention
//! reward / penalty on head-mean attention maps, and Break-a-Scene's attention loss.

use candle_core::Tensor;

use crate::error::Result;
use crate::model::nn::{resize_bilinear, resize_nearest_hw};

/// `mean((m·ε̂ − m·ε)²)` over all elements; `mask` [B, h, w] broadcasts over channels.
pub fn masked_rec_loss(eps_pred: &Tensor, noise: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(1)?;
    let diff = (eps_pred.broadcast_mul(&m)? - noise.broadcast_mul(&m)?)?;
    Ok(diff.sqr()?.mean_all()?)
}

/// Reward term of one layer: `Σ_j mean_p (α·M_j − Ā_j)²` for maps/masks [J, h, w].
pub fn attn_reward(abar: &Tensor, mask: &Tensor, alpha: f64) -> Result<Tensor> {
    let d = ((mask * alpha)? - abar)?;
    let (j, _, _) = d.dims3()?;
    Ok((d.sqr()?.mean_all()? * j as f64)?)
}

/// Penalty term of one layer: `Σ_j mean_p ((1 − M_j)·Ā_j)²` for maps/masks [J, h, w].
pub fn attn_penalty(abar: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let outside = (mask.ones_like()? - mask)?;
    let d = (outside * abar)?;
    let (j, _, _) = d.dims3()?;
    Ok((d.sqr()?.mean_all()? * j as f64)?)
}

/// Break-a-Scene's cross-attention loss (`google/break-a-scene`, `train.py`): the head-mean maps
/// of the loss layers, `layer_maps` (each [J, h, w]), averaged over the layers (a layer of
/// another size is first resized bilinearly to the smallest one's; Break-a-Scene's layers share
/// one size), each token's map divided by its maximum, then `Σ_j mean_p (α·M_j − Â_j)²` against
/// the masks `masks` [J, H, W] nearest-downsampled to that size (PyTorch's default
/// `interpolate`, pixel ⌊i·H/h⌋). Break-a-Scene's target is the mask itself (α = 1).
pub fn bas_attn_loss(layer_maps: &[Tensor], masks: &Tensor, alpha: f64) -> Result<Tensor> {
    let (h, w) = layer_maps
        .iter()
        .map(|m| m.dims3().map(|(_, h, w)| (h, w)))
        .collect::<candle_core::Result<Vec<_>>>()?
        .into_iter()
        .min()
        .ok_or_else(|| crate::error::Error::Input("no attention map for the loss".into()))?;
    let mut sum: Option<Tensor> = None;
    for m in layer_maps {
        let m = if m.dims()[1..] == [h, w] {
            m.clone()
        } else {
            resize_bilinear(m, h, w)?
        };
        sum = Some(match sum {
            Some(s) => (s + m)?,
            None => m,
        });
    }
    let mean = (sum.expect("at least one map") / layer_maps.len() as f64)?;
    let peak = mean.max_keepdim(2)?.max_keepdim(1)?;
    let normed = mean.broadcast_div(&peak)?;
    let target = resize_nearest_hw(masks, h, w)?.to_dtype(normed.dtype())?;
    attn_reward(&normed, &target, alpha)
}
