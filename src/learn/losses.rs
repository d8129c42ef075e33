//! MIFO learning losses, in the form of the released code (see
//! `docs/mifo-impl-notes.md` §3.4): masked reconstruction as a plain mean over all
//! latent elements, and the cross-attention reward / penalty on head-mean attention maps.

use candle_core::Tensor;

use crate::error::Result;

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
