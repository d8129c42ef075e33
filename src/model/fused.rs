//! Fused ops with their own backward, for the layers that gradients pass through: softmax over
//! the last dimension and group normalisation. Built from candle primitives these keep every
//! intermediate (`x − max`, `exp`, the sum, the quotient; the centred input, its square, the
//! normalised input, the scaled one) alive until the backward ends — four to five full-size
//! tensors per layer. These ops keep their input and output only, and compute the gradient
//! from closed forms. Their forward is a row loop on CPU and candle's own kernels on CUDA.

use candle_core::{CpuStorage, Layout, Shape, Tensor, D};

/// Softmax over the last dimension with a backward: `dx = y ⊙ (dy − Σ dy ⊙ y)`, computed
/// from the saved output `y` alone. The forward is a row loop on CPU (f32 rows in f32, other
/// dtypes through f64) and candle's fused kernel on CUDA.
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxLastDim;

fn softmax_rows<T: candle_core::WithDType>(src: &[T], dim: usize) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::zero(); src.len()];
    out.par_chunks_mut(dim.max(1))
        .zip(src.par_chunks(dim.max(1)))
        .for_each(|(o, x)| {
            let max = x
                .iter()
                .map(|v| v.to_f64())
                .fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0f64;
            for (oi, xi) in o.iter_mut().zip(x) {
                let e = (xi.to_f64() - max).exp();
                sum += e;
                *oi = T::from_f64(e);
            }
            for oi in o.iter_mut() {
                *oi = T::from_f64(oi.to_f64() / sum);
            }
        });
    out
}

fn softmax_rows_f32(src: &[f32], dim: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(dim.max(1))
        .zip(src.par_chunks(dim.max(1)))
        .for_each(|(o, x)| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (oi, &xi) in o.iter_mut().zip(x) {
                *oi = (xi - max).exp();
                sum += *oi;
            }
            let inv = 1.0 / sum;
            for oi in o.iter_mut() {
                *oi *= inv;
            }
        });
    out
}

impl candle_core::CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "mifo-softmax-last-dim"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("softmax: input is not contiguous".into()))?;
        let dim = layout.dims().last().copied().unwrap_or(1);
        let out = match storage {
            S::F32(v) => S::F32(softmax_rows_f32(&v[start..end], dim)),
            S::F64(v) => S::F64(softmax_rows(&v[start..end], dim)),
            S::F16(v) => S::F16(softmax_rows(&v[start..end], dim)),
            S::BF16(v) => S::BF16(softmax_rows(&v[start..end], dim)),
            _ => {
                return Err(candle_core::Error::Msg(
                    "softmax: unsupported dtype (floats only)".into(),
                ))
            }
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::op::BackpropOp;
        use candle_core::Storage;
        if layout.start_offset() != 0 || !layout.is_contiguous() {
            return Err(candle_core::Error::Msg(
                "softmax: input is not a fresh contiguous tensor".into(),
            ));
        }
        let input = Tensor::from_storage(
            Storage::Cuda(storage.try_clone(layout)?),
            layout.shape().clone(),
            BackpropOp::none(),
            false,
        );
        let y = candle_nn::ops::softmax_last_dim(&input)?;
        let (out, out_layout) = y.storage_and_layout();
        match &*out {
            Storage::Cuda(s) => Ok((s.try_clone(out_layout)?, y.shape().clone())),
            _ => Err(candle_core::Error::Msg(
                "softmax: fused kernel left the device".into(),
            )),
        }
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((res * grad_res.broadcast_sub(&dot)?)?))
    }
}

/// Group normalisation of x [B, C, ...] with per-channel weight and bias [C]:
/// `y = (x − μ) / √(σ² + ε) · γ_c + β_c`, with the statistics of each group of C/G channels
/// over all positions (biased variance, as PyTorch). Backward, with `x̂` the normalised input,
/// `ĝ = dy ⊙ γ` and `r = 1/√(σ² + ε)`: `dx = r · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))` (means over
/// the group), `dγ = Σ dy ⊙ x̂`, `dβ = Σ dy` — each only for an argument autograd tracks.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormOp {
    /// Number of groups G (C is a multiple of G).
    pub groups: usize,
    /// ε.
    pub eps: f64,
}

/// One group: `(x − μ)·r·γ_c + β_c` over `channels_per_group` rows of `spatial` values.
fn normalise_group<T: candle_core::WithDType>(
    out: &mut [T],
    xs: &[T],
    gamma: &[T],
    beta: &[T],
    spatial: usize,
    eps: f64,
) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = xs.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    let r = 1.0 / (var + eps).sqrt();
    for (ci, (oc, xc)) in out
        .chunks_mut(spatial.max(1))
        .zip(xs.chunks(spatial.max(1)))
        .enumerate()
    {
        let (w, b) = (gamma[ci].to_f64() * r, beta[ci].to_f64());
        for (o, x) in oc.iter_mut().zip(xc) {
            *o = T::from_f64((x.to_f64() - mean) * w + b);
        }
    }
}

/// The group loop, groups in parallel: x is [B, C, spatial] flattened, `gamma`/`beta` [C].
fn group_norm_cpu<T: candle_core::WithDType>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    (channels, spatial): (usize, usize),
    groups: usize,
    eps: f64,
) -> Vec<T> {
    use rayon::prelude::*;
    let per_group = channels / groups;
    let group_len = (per_group * spatial).max(1);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(group_len)
        .zip(x.par_chunks(group_len))
        .enumerate()
        .for_each(|(i, (o, xs))| {
            let c0 = (i % groups) * per_group;
            let range = c0..c0 + per_group;
            normalise_group(o, xs, &gamma[range.clone()], &beta[range], spatial, eps);
        });
    out
}

fn contiguous_slice<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("group norm: inputs must be contiguous"),
    }
}

impl candle_core::CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "mifo-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::CpuStorage as S;
        let dims = l1.dims();
        if dims.len() < 2 || !dims[1].is_multiple_of(self.groups) {
            candle_core::bail!(
                "group norm: {dims:?} does not split into {} groups",
                self.groups
            );
        }
        let channels = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let shape = (channels, spatial);
        macro_rules! run {
            ($($v:ident),*) => {
                match (s1, s2, s3) {
                    $((S::$v(x), S::$v(w), S::$v(b)) => S::$v(group_norm_cpu(
                        contiguous_slice(x, l1)?,
                        contiguous_slice(w, l2)?,
                        contiguous_slice(b, l3)?,
                        shape,
                        self.groups,
                        self.eps,
                    )),)*
                    _ => candle_core::bail!("group norm: float inputs of one dtype expected"),
                }
            };
        }
        let out = run!(F32, F64, F16, BF16);
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::op::BackpropOp;
        use candle_core::{Module, Storage};
        let fresh = |s: &candle_core::CudaStorage, l: &Layout| -> candle_core::Result<Tensor> {
            if !l.is_contiguous() || l.start_offset() != 0 {
                candle_core::bail!("group norm: inputs must be contiguous from offset 0");
            }
            Ok(Tensor::from_storage(
                Storage::Cuda(s.try_clone(l)?),
                l.shape().clone(),
                BackpropOp::none(),
                false,
            ))
        };
        let (x, w, b) = (fresh(s1, l1)?, fresh(s2, l2)?, fresh(s3, l3)?);
        // candle's own (composite) group norm computes the forward on the device.
        let channels = x.dim(1)?;
        let y = candle_nn::GroupNorm::new(w, b, channels, self.groups, self.eps)?.forward(&x)?;
        let (out, layout) = y.storage_and_layout();
        match &*out {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => candle_core::bail!("group norm: the output left the device"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let g = self.groups;
        let n = x.elem_count() / (b * g);
        let mut cdims = vec![1usize; dims.len()];
        cdims[1] = c;
        // Statistics in f32 at least (as the forward).
        let work = if x.dtype() == candle_core::DType::F64 {
            candle_core::DType::F64
        } else {
            candle_core::DType::F32
        };
        let xr = x.to_dtype(work)?.reshape((b, g, n))?;
        let mean = xr.mean_keepdim(2)?;
        let xc = xr.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let r = (var + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&r)?; // [B, G, n]
        let dyw = dy.to_dtype(work)?;
        let mut grads = (None, None, None);
        if x.track_op() {
            let gh = dyw
                .broadcast_mul(&gamma.to_dtype(work)?.reshape(cdims.clone())?)?
                .reshape((b, g, n))?;
            let m1 = gh.mean_keepdim(2)?;
            let m2 = (&gh * &xhat)?.mean_keepdim(2)?;
            let dx = gh
                .broadcast_sub(&m1)?
                .sub(&xhat.broadcast_mul(&m2)?)?
                .broadcast_mul(&r)?;
            grads.0 = Some(dx.reshape(dims.clone())?.to_dtype(x.dtype())?);
        }
        // Sum over every dim but the channels.
        let per_channel = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, c, n * g / c))?.sum(2)?.sum(0)
        };
        if gamma.track_op() {
            let xh = xhat.reshape(dims.clone())?;
            grads.1 = Some(per_channel(&(&dyw * xh)?)?.to_dtype(gamma.dtype())?);
        }
        if beta.track_op() {
            grads.2 = Some(per_channel(&dyw)?.to_dtype(beta.dtype())?);
        }
        Ok(grads)
    }
}
