//! Fused ops with their own backward, for the layers that gradients pass through: softmax over
//! the last dimension, and group normalisation with or without a SiLU after it. Built from
//! candle primitives these keep every intermediate (`x − max`, `exp`, the sum, the quotient; the
//! centred input, its square, the normalised input, the scaled one, the sigmoid) alive until the
//! backward ends — four to six full-size tensors per layer — and each is a pass over memory of
//! its own. These ops keep their input and output only, and compute the gradient from closed
//! forms. Their forward is a row loop on CPU (one pass writing the output once) and candle's own
//! kernels on CUDA.

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

/// GEGLU, the transformer feed-forward's gate: for `h` [..., 2·I], `y = a ⊙ gelu(b)` with
/// `a`, `b` the first and second halves of the last dimension and gelu the exact (erf) form,
/// `gelu(b) = b · Φ(b)`. Built from candle ops this keeps the two halves, `gelu(b)` and the
/// product, and its backward forms about ten more full-size tensors (the halves' gradients
/// padded back to 2·I, the derivative's terms); this op keeps `h` and `y` and writes the
/// gradient `[dy ⊙ gelu(b), dy ⊙ a ⊙ gelu′(b)]`, `gelu′(b) = Φ(b) + b·φ(b)`, in one pass.
/// CPU, f32 and f64 ([`geglu`] falls back to candle's ops elsewhere).
#[derive(Clone, Copy, Debug)]
struct GegluOp;

/// Its backward: `(h, dy)` → `dh`.
#[derive(Clone, Copy, Debug)]
struct GegluGrad;

/// `[a, b]` [..., 2·I] → `a ⊙ gelu(b)` [..., I] (see [`GegluOp`]).
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::DType;
    if h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::F64) {
        return h.contiguous()?.apply_op1(GegluOp);
    }
    let halves = h.chunk(2, D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

/// `Φ(x)` and `x·φ(x)` in f64.
fn gaussian_terms(x: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp()
        * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    (cdf, x * pdf)
}

/// One row: `y_i = a_i · gelu(b_i)`.
fn geglu_row<T: candle_core::WithDType>(y: &mut [T], h: &[T]) {
    let (a, b) = h.split_at(y.len());
    for ((yi, &ai), &bi) in y.iter_mut().zip(a).zip(b) {
        let b = bi.to_f64();
        *yi = T::from_f64(ai.to_f64() * b * gaussian_terms(b).0);
    }
}

/// One row of the gradient: `da_i = dy_i · gelu(b_i)`, `db_i = dy_i · a_i · gelu′(b_i)`.
fn geglu_grad_row<T: candle_core::WithDType>(dh: &mut [T], h: &[T], dy: &[T]) {
    let n = dy.len();
    let (a, b) = h.split_at(n);
    let (da, db) = dh.split_at_mut(n);
    for i in 0..n {
        let (bv, g) = (b[i].to_f64(), dy[i].to_f64());
        let (cdf, xpdf) = gaussian_terms(bv);
        da[i] = T::from_f64(g * bv * cdf);
        db[i] = T::from_f64(g * a[i].to_f64() * (cdf + xpdf));
    }
}

/// The last dimension of `layout` (2·I) and the contiguous range of its storage.
fn geglu_rows(layout: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("geglu: input is not contiguous".into()))?;
    let width = layout.dims().last().copied().unwrap_or(0);
    if width == 0 || width % 2 != 0 {
        candle_core::bail!("geglu: the last dimension ({width}) is not even");
    }
    Ok((start, end, width))
}

impl candle_core::CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "mifo-geglu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (start, end, width) = geglu_rows(layout)?;
        fn run<T: candle_core::WithDType>(h: &[T], width: usize) -> Vec<T> {
            let mut y = vec![T::zero(); h.len() / 2];
            y.par_chunks_mut(width / 2)
                .zip(h.par_chunks(width))
                .for_each(|(y, h)| geglu_row(y, h));
            y
        }
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(run(&v[start..end], width)),
            CpuStorage::F64(v) => CpuStorage::F64(run(&v[start..end], width)),
            _ => candle_core::bail!("geglu: f32 and f64 only"),
        };
        let mut dims = layout.dims().to_vec();
        *dims.last_mut().expect("checked above") = width / 2;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GegluGrad)?))
    }
}

impl candle_core::CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "mifo-geglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (hs, he, width) = geglu_rows(l1)?;
        let (gs, ge) = l2
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("geglu: gradient is not contiguous".into()))?;
        if (ge - gs) * 2 != he - hs {
            candle_core::bail!("geglu: gradient and input sizes disagree");
        }
        fn run<T: candle_core::WithDType>(h: &[T], dy: &[T], width: usize) -> Vec<T> {
            let mut dh = vec![T::zero(); h.len()];
            dh.par_chunks_mut(width)
                .zip(h.par_chunks(width))
                .zip(dy.par_chunks(width / 2))
                .for_each(|((dh, h), dy)| geglu_grad_row(dh, h, dy));
            dh
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(h), CpuStorage::F32(g)) => {
                CpuStorage::F32(run(&h[hs..he], &g[gs..ge], width))
            }
            (CpuStorage::F64(h), CpuStorage::F64(g)) => {
                CpuStorage::F64(run(&h[hs..he], &g[gs..ge], width))
            }
            _ => candle_core::bail!("geglu: f32 and f64 only, one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Group normalisation of x [B, C, ...] with per-channel weight and bias [C]:
/// `z = (x − μ) / √(σ² + ε) · γ_c + β_c`, with the statistics of each group of C/G channels
/// over all positions (biased variance, as PyTorch), and `y = z` or, with `silu`,
/// `y = z · σ(z)` (`GroupNorm` then `SiLU`, as every ResNet block and the VAE's output norm
/// apply them).
///
/// Backward, with `x̂` the normalised input, `r = 1/√(σ² + ε)` and `dz` the gradient reaching
/// `z` (`dy` itself, or with `silu` `dy ⊙ σ(z) ⊙ (1 + z ⊙ (1 − σ(z)))`, `z` recomputed from `x`),
/// `ĝ = dz ⊙ γ`: `dx = r · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))` (means over the group),
/// `dγ = Σ dz ⊙ x̂`, `dβ = Σ dz` — each only for an argument autograd tracks.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormOp {
    /// Number of groups G (C is a multiple of G).
    pub groups: usize,
    /// ε.
    pub eps: f64,
    /// Apply SiLU to the normalised output (in the same pass).
    pub silu: bool,
}

/// `z · σ(z)` in f64.
fn silu_f64(z: f64) -> f64 {
    z / (1.0 + (-z).exp())
}

/// One group: `(x − μ)·r·γ_c + β_c` over `channels_per_group` rows of `spatial` values.
/// With `silu`, each value then goes through `z · σ(z)`.
fn normalise_group<T: candle_core::WithDType>(
    out: &mut [T],
    xs: &[T],
    (gamma, beta): (&[T], &[T]),
    spatial: usize,
    eps: f64,
    silu: bool,
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
            let z = (x.to_f64() - mean) * w + b;
            *o = T::from_f64(if silu { silu_f64(z) } else { z });
        }
    }
}

/// [`normalise_group`] for f32: the statistics in f64, the per-value arithmetic in f32 (as
/// PyTorch's CPU kernel), so that the loop over the group vectorises but for `exp`.
fn normalise_group_f32(
    out: &mut [f32],
    xs: &[f32],
    (gamma, beta): (&[f32], &[f32]),
    spatial: usize,
    eps: f64,
    silu: bool,
) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = xs
        .iter()
        .map(|&v| {
            let d = v as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    let r = 1.0 / (var + eps).sqrt();
    let mean = mean as f32;
    for (ci, (oc, xc)) in out
        .chunks_mut(spatial.max(1))
        .zip(xs.chunks(spatial.max(1)))
        .enumerate()
    {
        let (w, b) = ((gamma[ci] as f64 * r) as f32, beta[ci]);
        if silu {
            for (o, &x) in oc.iter_mut().zip(xc) {
                let z = (x - mean) * w + b;
                *o = z / (1.0 + (-z).exp());
            }
        } else {
            for (o, &x) in oc.iter_mut().zip(xc) {
                *o = (x - mean) * w + b;
            }
        }
    }
}

/// A per-group kernel: output, the group's input, its channels' (γ, β), spatial size, ε, SiLU.
type GroupKernel<T> = fn(&mut [T], &[T], (&[T], &[T]), usize, f64, bool);

/// The group loop, groups in parallel: x is [B, C, spatial] flattened, `gamma`/`beta` [C].
fn group_norm_cpu<T: candle_core::WithDType>(
    kernel: GroupKernel<T>,
    x: &[T],
    (gamma, beta): (&[T], &[T]),
    (channels, spatial): (usize, usize),
    op: &GroupNormOp,
) -> Vec<T> {
    let (groups, eps, silu) = (op.groups, op.eps, op.silu);
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
            kernel(
                o,
                xs,
                (&gamma[range.clone()], &beta[range]),
                spatial,
                eps,
                silu,
            );
        });
    out
}

fn contiguous_slice<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("group norm: inputs must be contiguous"),
    }
}

/// One group's backward on the CPU (see [`GroupNormOp`]): the first pass writes `ĝ = dz·γ`
/// into `dx` and sums `ĝ` and `ĝ·x̂` (and, per channel, `dz·x̂` and `dz` into `dgamma`, `dbeta`);
/// the second turns `ĝ` into `dx` in place. Sums and per-value arithmetic in f64.
fn group_backward<T: candle_core::WithDType>(
    dx: &mut [T],
    (xs, dys): (&[T], &[T]),
    (gamma, beta): (&[T], &[T]),
    (dgamma, dbeta): (&mut [f64], &mut [f64]),
    spatial: usize,
    op: &GroupNormOp,
) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = xs.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    let r = 1.0 / (var + op.eps).sqrt();
    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
    let rows = dx
        .chunks_mut(spatial.max(1))
        .zip(xs.chunks(spatial.max(1)).zip(dys.chunks(spatial.max(1))));
    for (k, (o, (xc, dc))) in rows.enumerate() {
        let (g, b) = (gamma[k].to_f64(), beta[k].to_f64());
        for (o, (x, d)) in o.iter_mut().zip(xc.iter().zip(dc)) {
            let xh = (x.to_f64() - mean) * r;
            let mut dz = d.to_f64();
            if op.silu {
                let z = xh * g + b;
                let s = 1.0 / (1.0 + (-z).exp());
                dz *= s * (1.0 + z * (1.0 - s));
            }
            dgamma[k] += dz * xh;
            dbeta[k] += dz;
            let gh = dz * g;
            sum_g += gh;
            sum_gx += gh * xh;
            *o = T::from_f64(gh);
        }
    }
    let (m1, m2) = (sum_g / n, sum_gx / n);
    for (o, x) in dx.iter_mut().zip(xs) {
        let xh = (x.to_f64() - mean) * r;
        *o = T::from_f64(r * (o.to_f64() - m1 - xh * m2));
    }
}

impl GroupNormOp {
    /// The backward on the CPU: [`group_backward`] over the groups in parallel, then the
    /// per-channel sums over the batch; gradients only for the arguments autograd tracks.
    #[allow(clippy::type_complexity)]
    fn cpu_bwd<T: candle_core::WithDType>(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let dims = x.dims().to_vec();
        let (batch, channels) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let per_group = channels / self.groups;
        let group_len = (per_group * spatial).max(1);
        let xs = x.flatten_all()?.to_vec1::<T>()?;
        let dys = dy.to_dtype(x.dtype())?.flatten_all()?.to_vec1::<T>()?;
        let gs = gamma.to_dtype(x.dtype())?.to_vec1::<T>()?;
        let bs = beta.to_dtype(x.dtype())?.to_vec1::<T>()?;
        let mut dx = vec![T::zero(); xs.len()];
        // Per (image, channel): Σ dz·x̂ and Σ dz.
        let mut dgamma = vec![0f64; batch * channels];
        let mut dbeta = vec![0f64; batch * channels];
        dx.par_chunks_mut(group_len)
            .zip(xs.par_chunks(group_len).zip(dys.par_chunks(group_len)))
            .zip(
                dgamma
                    .par_chunks_mut(per_group.max(1))
                    .zip(dbeta.par_chunks_mut(per_group.max(1))),
            )
            .enumerate()
            .for_each(|(i, ((o, (xg, dg)), (dgam, dbet)))| {
                let c0 = (i % self.groups) * per_group;
                let range = c0..c0 + per_group;
                group_backward(
                    o,
                    (xg, dg),
                    (&gs[range.clone()], &bs[range]),
                    (dgam, dbet),
                    spatial,
                    self,
                );
            });
        let per_channel = |sums: &[f64], like: &Tensor| -> candle_core::Result<Tensor> {
            let total: Vec<f64> = (0..channels)
                .map(|c| (0..batch).map(|b| sums[b * channels + c]).sum())
                .collect();
            Tensor::from_vec(total, channels, &candle_core::Device::Cpu)?.to_dtype(like.dtype())
        };
        Ok((
            if x.track_op() {
                Some(Tensor::from_vec(dx, dims, &candle_core::Device::Cpu)?)
            } else {
                None
            },
            if gamma.track_op() {
                Some(per_channel(&dgamma, gamma)?)
            } else {
                None
            },
            if beta.track_op() {
                Some(per_channel(&dbeta, beta)?)
            } else {
                None
            },
        ))
    }
}

impl candle_core::CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        if self.silu {
            "mifo-group-norm-silu"
        } else {
            "mifo-group-norm"
        }
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
            ($(($v:ident, $kernel:expr)),*) => {
                match (s1, s2, s3) {
                    $((S::$v(x), S::$v(w), S::$v(b)) => S::$v(group_norm_cpu(
                        $kernel,
                        contiguous_slice(x, l1)?,
                        (contiguous_slice(w, l2)?, contiguous_slice(b, l3)?),
                        shape,
                        self,
                    )),)*
                    _ => candle_core::bail!("group norm: float inputs of one dtype expected"),
                }
            };
        }
        let out = run!(
            (F32, normalise_group_f32),
            (F64, normalise_group),
            (F16, normalise_group),
            (BF16, normalise_group)
        );
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
        let y = if self.silu { y.silu()? } else { y };
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
        if x.device().is_cpu() {
            match x.dtype() {
                candle_core::DType::F32 => return self.cpu_bwd::<f32>(x, gamma, beta, dy),
                candle_core::DType::F64 => return self.cpu_bwd::<f64>(x, gamma, beta, dy),
                _ => {}
            }
        }
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
        // The gradient at the norm's output z (before the SiLU, recomputed from x).
        let dyw = if self.silu {
            let z = xhat
                .reshape(dims.clone())?
                .broadcast_mul(&gamma.to_dtype(work)?.reshape(cdims.clone())?)?
                .broadcast_add(&beta.to_dtype(work)?.reshape(cdims.clone())?)?;
            let s = (z.neg()?.exp()? + 1.0)?.recip()?;
            let ds = ((&z * (1.0 - &s)?)? + 1.0)?;
            (dyw * s)?.mul(&ds)?
        } else {
            dyw
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::max_rel_err;
    use candle_core::{DType, Device, Var};

    fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// candle's composite group norm (then SiLU): the reference for the fused op.
    fn composite(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, silu: bool) -> Tensor {
        use candle_core::Module;
        let c = x.dim(1).unwrap();
        let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, 1e-6).unwrap();
        let y = gn.forward(x).unwrap();
        if silu {
            y.silu().unwrap()
        } else {
            y
        }
    }

    fn op(groups: usize, silu: bool) -> GroupNormOp {
        GroupNormOp {
            groups,
            eps: 1e-6,
            silu,
        }
    }

    /// Shapes with one and several channels per group, 3-D and 4-D.
    const SHAPES: [(&[usize], usize); 3] =
        [(&[2, 8, 5, 3], 4), (&[1, 6, 7], 3), (&[3, 4, 2, 2], 4)];

    #[test]
    fn forward_matches_group_norm_then_silu() {
        for (i, &(shape, groups)) in SHAPES.iter().enumerate() {
            let c = shape[1];
            for dtype in [DType::F32, DType::F64] {
                // An offset mean, as real activations have.
                let x = (random(shape, i as u64, dtype) + 3.0).unwrap();
                let gamma = random(&[c], 10 + i as u64, dtype);
                let beta = random(&[c], 20 + i as u64, dtype);
                for silu in [false, true] {
                    let ours = x.apply_op3(&gamma, &beta, op(groups, silu)).unwrap();
                    let theirs = composite(&x, &gamma, &beta, groups, silu);
                    let err = max_rel_err(&ours, &theirs);
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    assert!(err < tol, "shape {i}, {dtype:?}, silu {silu}: {err}");
                }
            }
        }
    }

    /// The closed-form backward (input, γ, β) against candle's autograd through the composite
    /// ops, and the input gradient against central finite differences, in f64.
    #[test]
    fn backward_matches_autograd_and_finite_differences() {
        for (i, &(shape, groups)) in SHAPES.iter().enumerate() {
            let c = shape[1];
            for silu in [false, true] {
                let x = Var::from_tensor(&random(shape, i as u64, DType::F64)).unwrap();
                let gamma = Var::from_tensor(&random(&[c], 10 + i as u64, DType::F64)).unwrap();
                let beta = Var::from_tensor(&random(&[c], 20 + i as u64, DType::F64)).unwrap();
                let w = random(shape, 30 + i as u64, DType::F64);
                let loss = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap();
                let (xt, gt, bt) = (x.as_tensor(), gamma.as_tensor(), beta.as_tensor());
                let ours = loss(&xt.apply_op3(gt, bt, op(groups, silu)).unwrap())
                    .backward()
                    .unwrap();
                let theirs = loss(&composite(xt, gt, bt, groups, silu))
                    .backward()
                    .unwrap();
                for (name, t) in [("x", xt), ("gamma", gt), ("beta", bt)] {
                    let err = max_rel_err(ours.get(t).unwrap(), theirs.get(t).unwrap());
                    assert!(err < 1e-10, "shape {i}, silu {silu}, d{name}: {err}");
                }
                // The f32 kernel against the f64 gradients.
                let f32_var = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F32).unwrap());
                let (x32, g32, b32) = (
                    f32_var(xt).unwrap(),
                    f32_var(gt).unwrap(),
                    f32_var(bt).unwrap(),
                );
                let y32 = x32
                    .as_tensor()
                    .apply_op3(g32.as_tensor(), b32.as_tensor(), op(groups, silu))
                    .unwrap();
                let w32 = w.to_dtype(DType::F32).unwrap();
                let g = (y32 * w32).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, t32, t) in [("x", &x32, xt), ("gamma", &g32, gt), ("beta", &b32, bt)] {
                    let err = max_rel_err(g.get(t32.as_tensor()).unwrap(), ours.get(t).unwrap());
                    assert!(err < 1e-5, "f32, shape {i}, silu {silu}, d{name}: {err}");
                }
                // Central differences on a few input entries.
                let dx = ours.get(xt).unwrap().flatten_all().unwrap();
                let dx = dx.to_vec1::<f64>().unwrap();
                let base = xt.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let f = |v: &[f64]| -> f64 {
                    let xv = Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
                    let y = xv.apply_op3(gt, bt, op(groups, silu)).unwrap();
                    loss(&y).to_scalar::<f64>().unwrap()
                };
                let h = 1e-6;
                for k in (0..base.len()).step_by(base.len() / 7 + 1) {
                    let (mut up, mut down) = (base.clone(), base.clone());
                    up[k] += h;
                    down[k] -= h;
                    let fd = (f(&up) - f(&down)) / (2.0 * h);
                    let scale = dx.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                    assert!(
                        (fd - dx[k]).abs() < 1e-6 * scale,
                        "shape {i}, silu {silu}, entry {k}: {fd} vs {}",
                        dx[k]
                    );
                }
            }
        }
    }

    /// The fused GEGLU against candle's composite ops (forward, gradient) and, in f64, against
    /// central finite differences of the loss `Σ y ⊙ w`.
    #[test]
    fn geglu_matches_the_composite_ops_and_finite_differences() {
        let composite = |h: &Tensor| {
            let halves = h.chunk(2, D::Minus1).unwrap();
            (&halves[0] * halves[1].gelu_erf().unwrap()).unwrap()
        };
        for dtype in [DType::F32, DType::F64] {
            let h = random(&[2, 5, 12], 7, dtype);
            let w = random(&[2, 5, 6], 8, dtype);
            let ours = geglu(&h).unwrap();
            assert_eq!(ours.dims(), &[2, 5, 6]);
            let reference = composite(&h);
            let err = max_rel_err(&ours, &reference);
            assert!(err < 1e-6, "{dtype:?} forward {err}");

            let v = Var::from_tensor(&h).unwrap();
            let grad = |y: Tensor| {
                let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(v.as_tensor()).unwrap().clone()
            };
            let g_ours = grad(geglu(v.as_tensor()).unwrap());
            let g_ref = grad(composite(v.as_tensor()));
            // candle's own derivative rounds 1/√(2π) to 0.398942; ours is exact.
            let err = max_rel_err(&g_ours, &g_ref);
            assert!(err < 1e-5, "{dtype:?} gradient {err}");
        }
        let h = random(&[3, 8], 9, DType::F64);
        let w = random(&[3, 4], 10, DType::F64);
        let v = Var::from_tensor(&h).unwrap();
        let loss = |h: &Tensor| {
            (geglu(h).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let g = (geglu(v.as_tensor()).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f64> = g
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let flat: Vec<f64> = h.flatten_all().unwrap().to_vec1().unwrap();
        let step = 1e-6;
        for (i, gi) in g.iter().enumerate() {
            let at = |d: f64| {
                let mut x = flat.clone();
                x[i] += d;
                loss(&Tensor::from_vec(x, (3, 8), &Device::Cpu).unwrap())
            };
            let fd = (at(step) - at(-step)) / (2.0 * step);
            assert!(
                (fd - gi).abs() < 1e-7 * (1.0 + fd.abs()),
                "entry {i}: {fd} vs {gi}"
            );
        }
    }
}
