//! Joint sampling (MIFO App. C.5), the "union sampling" of Break-a-Scene: each step learns a
//! random non-empty subset Λ of the instances, its tokens in the prompt and the union of its
//! masks in the masked loss. Every method draws its steps this way.

use candle_core::Tensor;
use rand::Rng;

use crate::error::{Error, Result};

/// Λ for one step out of `n` instances: k ~ U{1..n}, then k distinct instances in random order
/// (Python's `random.sample`, as both released codes draw it); with `all`, every instance in
/// index order.
pub fn draw_subset<R: Rng + ?Sized>(rng: &mut R, n: usize, all: bool) -> Vec<usize> {
    if all || n == 0 {
        return (0..n).collect();
    }
    let k = rng.random_range(1..=n);
    rand::seq::index::sample(rng, n, k).into_vec()
}

/// M_rec of Eq. 4: the pixelwise maximum of the masks `masks` [N, H, W] of the instances in
/// `subset`, as [1, H, W].
pub fn union_mask(masks: &Tensor, subset: &[usize]) -> Result<Tensor> {
    if subset.is_empty() {
        return Err(Error::Input("joint sampling drew no instance".into()));
    }
    let sel = Tensor::new(
        subset.iter().map(|&j| j as u32).collect::<Vec<_>>(),
        masks.device(),
    )?;
    Ok(masks.index_select(&sel, 0)?.max_keepdim(0)?)
}
