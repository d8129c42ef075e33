//! Memory-efficient attention with an exact backward, on the CPU: `softmax(q·kᵀ·scale)·v`
//! computed in blocks of queries and keys with an online softmax, so the `[heads, N, M]`
//! probabilities are never held, neither in the forward nor for the backward.
//!
//! The forward walks the keys block by block for each block of queries, keeping per query row a
//! running maximum `m`, a running sum `l` of `exp(s − m)` and an unnormalised output; when a new
//! block raises the maximum, the sum and the output so far are rescaled by `exp(m_old − m_new)`.
//! It keeps only the output and each row's log-sum-exp `L = m + ln l` (an extra column of the
//! op's output). The backward recomputes each block's probabilities `P = exp(q·kᵀ·scale − L)`
//! from them and forms, with `Δᵢ = Σ_c dOᵢ꜀·Oᵢ꜀`:
//! `dV += Pᵀ·dO`, `dS = P ⊙ (dO·Vᵀ − Δ)`, `dQ += scale·dS·K`, `dK += scale·dSᵀ·Q`
//! (flash-attention's recomputation). Blocks run in parallel over batch × heads × query blocks;
//! each worker sums its own `dK`, `dV` and the sums are added at the end.
//!
//! Used by [`super::attention::Attention`] for every call that no hook reads, on CPU tensors
//! (f32 and f64 natively, f16 / bf16 upcast to f32). Calls a hook reads, and every call on
//! another device, keep the full path. `MIFO_ATTENTION=full` (or [`set_path`]) forces the full
//! path everywhere, for comparisons.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Query rows per block.
pub const QUERY_BLOCK: usize = 64;
/// Key rows per block.
pub const KEY_BLOCK: usize = 256;

/// Which attention computation runs where no hook reads the probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    /// Blocked with an online softmax (this module) wherever it applies: the default.
    Blocked,
    /// The full `[N, M]` probabilities, as for hooked layers.
    Full,
}

/// 0: not yet read from the environment; 1: blocked; 2: full.
static PATH: AtomicU8 = AtomicU8::new(0);

/// The path in force: set by [`set_path`], else `MIFO_ATTENTION` (`full` or `blocked`; unset
/// or anything else is blocked), read once.
pub fn path() -> AttentionPath {
    match PATH.load(Ordering::Relaxed) {
        1 => AttentionPath::Blocked,
        2 => AttentionPath::Full,
        _ => {
            let p = match std::env::var("MIFO_ATTENTION").as_deref() {
                Ok("full") => AttentionPath::Full,
                _ => AttentionPath::Blocked,
            };
            set_path(p);
            p
        }
    }
}

/// Blocked calls made by this process so far (forward passes through [`attention`]): how the
/// tests and the bench see which path ran.
pub fn calls() -> usize {
    CALLS.load(Ordering::Relaxed)
}

static CALLS: AtomicUsize = AtomicUsize::new(0);

/// Sets the path for the whole process (the bench's before/after comparison).
pub fn set_path(p: AttentionPath) {
    let v = match p {
        AttentionPath::Blocked => 1,
        AttentionPath::Full => 2,
    };
    PATH.store(v, Ordering::Relaxed);
}

/// Whether [`attention`] applies to these operands: the blocked path is in force, all three are
/// on the CPU in one float dtype, and they are `[.., N, d]`, `[.., M, d]`, `[.., M, d]` with the
/// same leading dimensions.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    path() == AttentionPath::Blocked && fits(q, k, v)
}

fn fits(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let on_cpu = [q, k, v].iter().all(|t| t.device().is_cpu());
    let dtype = q.dtype();
    let float = matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
        && k.dtype() == dtype
        && v.dtype() == dtype;
    on_cpu && float && dims(q.dims(), k.dims(), v.dims()).is_some()
}

/// Sizes of one call: `bh` independent (batch × head) problems of `n` queries, `m` keys, width
/// `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dims {
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
}

fn dims(q: &[usize], k: &[usize], v: &[usize]) -> Option<Dims> {
    let r = q.len();
    if r < 2 || k.len() != r || v.len() != r {
        return None;
    }
    let lead = &q[..r - 2];
    if &k[..r - 2] != lead || &v[..r - 2] != lead {
        return None;
    }
    let (n, d, m) = (q[r - 2], q[r - 1], k[r - 2]);
    if k[r - 1] != d || v[r - 2] != m || v[r - 1] != d || n == 0 || m == 0 || d == 0 {
        return None;
    }
    Some(Dims {
        bh: lead.iter().product(),
        n,
        m,
        d,
    })
}

/// `softmax(q·kᵀ·scale)·v` over the last two dimensions (`q` [.., N, d], `k` and `v`
/// [.., M, d]) by blocks, with the default block sizes. Call only where [`applies`] holds
/// (else the op fails). Differentiable in `q`, `k` and `v`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with_blocks(q, k, v, scale, (QUERY_BLOCK, KEY_BLOCK))
}

/// [`attention`] with `(query, key)` block sizes of its own (tests use small and odd ones).
pub fn attention_with_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    (query_block, key_block): (usize, usize),
) -> Result<Tensor> {
    let in_dtype = q.dtype();
    let work = match in_dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let prep = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(work)?.contiguous()?) };
    let op = BlockedAttention {
        scale,
        query_block: query_block.max(1),
        key_block: key_block.max(1),
    };
    let out = prep(q)?.apply_op3(&prep(k)?, &prep(v)?, op)?;
    CALLS.fetch_add(1, Ordering::Relaxed);
    let d = q.dim(candle_core::D::Minus1)?;
    let out = out.narrow(candle_core::D::Minus1, 0, d)?;
    Ok(out.to_dtype(in_dtype)?)
}

/// The same attention with the full `[N, M]` probabilities (candle's matmul and softmax): the
/// reference of the tests and the bench.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let logits = (q * scale)?.matmul(&k.t()?)?;
    Ok(super::nn::softmax_last(&logits)?.matmul(v)?)
}

/// The op: inputs q, k, v contiguous in f32 or f64; output `[.., N, d + 1]`, the attention
/// output and each query row's log-sum-exp of its scaled logits in the last column.
#[derive(Clone, Copy, Debug)]
struct BlockedAttention {
    scale: f64,
    query_block: usize,
    key_block: usize,
}

/// The float types the kernels run in.
trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn of_f64(x: f64) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            fn of_f64(x: f64) -> Self {
                x as $t
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
        }
    };
}
real!(f32);
real!(f64);

/// A row-major operand of [`mm`]: values, row stride, column stride.
type Mat<'a, T> = (&'a [T], usize, usize);

/// `dst [m, n] (rows dst_rs apart) = beta · lhs [m, k] · rhs [k, n]`, or `+=` with
/// `accumulate`, on the calling thread (the blocks already run in parallel).
fn mm<T: Real>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (&mut [T], usize),
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    beta: T,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && n > 0 && k > 0, "blocked attention: empty block");
    assert!(last(m, n, dst_rs, 1) < dst.len(), "blocked attention: dst");
    assert!(
        last(m, k, lhs.1, lhs.2) < lhs.0.len(),
        "blocked attention: lhs"
    );
    assert!(
        last(k, n, rhs.1, rhs.2) < rhs.0.len(),
        "blocked attention: rhs"
    );
    // SAFETY: the asserts above keep every addressed element of the three views inside their
    // slices, and `dst` is a `&mut` slice, so it cannot overlap the shared operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            if accumulate { T::ONE } else { T::ZERO },
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The forward: `[bh, n, d + 1]` rows of output and log-sum-exp.
// Row loops index the per-row running maxima, sums and outputs together.
#[allow(clippy::needless_range_loop)]
fn forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    z: Dims,
    scale: T,
    (bq, bk): (usize, usize),
) -> Vec<T> {
    let Dims { n, m, d, .. } = z;
    let w = d + 1;
    let mut out = vec![T::ZERO; z.bh * n * w];
    out.par_chunks_mut(n * w)
        .enumerate()
        .for_each(|(h, out_h)| {
            let (q_h, k_h, v_h) = (
                &q[h * n * d..(h + 1) * n * d],
                &k[h * m * d..(h + 1) * m * d],
                &v[h * m * d..(h + 1) * m * d],
            );
            out_h
                .par_chunks_mut(bq * w)
                .enumerate()
                .for_each(|(b, out_b)| {
                    let r = out_b.len() / w;
                    let q_b = &q_h[b * bq * d..(b * bq + r) * d];
                    let mut s = vec![T::ZERO; r * bk.min(m)];
                    let mut acc = vec![T::ZERO; r * d];
                    let mut run_max = vec![T::NEG_INF; r];
                    let mut run_sum = vec![T::ZERO; r];
                    for j0 in (0..m).step_by(bk) {
                        let c = bk.min(m - j0);
                        let (k_b, v_b) = (&k_h[j0 * d..(j0 + c) * d], &v_h[j0 * d..(j0 + c) * d]);
                        // s = scale · q_b · k_bᵀ
                        mm(
                            (r, c, d),
                            (&mut s[..], c),
                            false,
                            (q_b, d, 1),
                            (k_b, 1, d),
                            scale,
                        );
                        for i in 0..r {
                            let row = &mut s[i * c..(i + 1) * c];
                            let block_max =
                                row.iter().copied().fold(
                                    T::NEG_INF,
                                    |a, x| {
                                        if x > a {
                                            x
                                        } else {
                                            a
                                        }
                                    },
                                );
                            let new_max = if block_max > run_max[i] {
                                block_max
                            } else {
                                run_max[i]
                            };
                            // exp(−∞) = 0 on the first block: nothing to rescale yet.
                            let rescale = (run_max[i] - new_max).exp();
                            let mut sum = T::ZERO;
                            for x in row.iter_mut() {
                                *x = (*x - new_max).exp();
                                sum += *x;
                            }
                            run_sum[i] = run_sum[i] * rescale + sum;
                            for a in &mut acc[i * d..(i + 1) * d] {
                                *a *= rescale;
                            }
                            run_max[i] = new_max;
                        }
                        // acc += p · v_b
                        mm(
                            (r, d, c),
                            (&mut acc[..], d),
                            true,
                            (&s[..], c, 1),
                            (v_b, d, 1),
                            T::ONE,
                        );
                    }
                    for i in 0..r {
                        let inv = T::ONE / run_sum[i];
                        let row = &mut out_b[i * w..(i + 1) * w];
                        for (o, &a) in row[..d].iter_mut().zip(&acc[i * d..(i + 1) * d]) {
                            *o = a * inv;
                        }
                        row[d] = run_max[i] + run_sum[i].ln();
                    }
                });
        });
    out
}

/// The backward: `(dq, dk, dv)` from the inputs, the forward's output-and-log-sum-exp rows `o`
/// and their gradient `g` (both `[bh, n, d + 1]`; a gradient of the log-sum-exp column, if any,
/// is honoured).
// Row loops index the per-row Δ alongside the blocks' rows.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    g: &[T],
    z: Dims,
    scale: T,
    (bq, bk): (usize, usize),
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims { n, m, d, .. } = z;
    let w = d + 1;
    let mut dq = vec![T::ZERO; z.bh * n * d];
    let mut dk = vec![T::ZERO; z.bh * m * d];
    let mut dv = vec![T::ZERO; z.bh * m * d];
    dq.par_chunks_mut(n * d)
        .zip(dk.par_chunks_mut(m * d))
        .zip(dv.par_chunks_mut(m * d))
        .enumerate()
        .for_each(|(h, ((dq_h, dk_h), dv_h))| {
            let (q_h, k_h, v_h) = (
                &q[h * n * d..(h + 1) * n * d],
                &k[h * m * d..(h + 1) * m * d],
                &v[h * m * d..(h + 1) * m * d],
            );
            let (o_h, g_h) = (
                &o[h * n * w..(h + 1) * n * w],
                &g[h * n * w..(h + 1) * n * w],
            );
            let sums = dq_h
                .par_chunks_mut(bq * d)
                .enumerate()
                .fold(
                    || (vec![T::ZERO; m * d], vec![T::ZERO; m * d]),
                    |(mut dk_acc, mut dv_acc), (b, dq_b)| {
                        let r = dq_b.len() / d;
                        let i0 = b * bq;
                        let q_b = &q_h[i0 * d..(i0 + r) * d];
                        let (o_b, g_b) = (&o_h[i0 * w..(i0 + r) * w], &g_h[i0 * w..(i0 + r) * w]);
                        // Δᵢ = Σ dOᵢ·Oᵢ − dLᵢ (the log-sum-exp's own gradient enters as −dLᵢ).
                        let delta: Vec<T> = (0..r)
                            .map(|i| {
                                let (orow, grow) =
                                    (&o_b[i * w..(i + 1) * w], &g_b[i * w..(i + 1) * w]);
                                let mut s = T::ZERO;
                                for c in 0..d {
                                    s += orow[c] * grow[c];
                                }
                                s - grow[d]
                            })
                            .collect();
                        let mut p = vec![T::ZERO; r * bk.min(m)];
                        let mut ds = vec![T::ZERO; r * bk.min(m)];
                        for j0 in (0..m).step_by(bk) {
                            let c = bk.min(m - j0);
                            let (k_b, v_b) =
                                (&k_h[j0 * d..(j0 + c) * d], &v_h[j0 * d..(j0 + c) * d]);
                            mm(
                                (r, c, d),
                                (&mut p[..], c),
                                false,
                                (q_b, d, 1),
                                (k_b, 1, d),
                                scale,
                            );
                            for i in 0..r {
                                let lse = o_b[i * w + d];
                                for x in &mut p[i * c..(i + 1) * c] {
                                    *x = (*x - lse).exp();
                                }
                            }
                            // dV_b += pᵀ · dO_b
                            let dv_b = &mut dv_acc[j0 * d..(j0 + c) * d];
                            mm(
                                (c, d, r),
                                (dv_b, d),
                                true,
                                (&p[..], 1, c),
                                (g_b, w, 1),
                                T::ONE,
                            );
                            // dS = p ⊙ (dO_b · v_bᵀ − Δ)
                            mm(
                                (r, c, d),
                                (&mut ds[..], c),
                                false,
                                (g_b, w, 1),
                                (v_b, 1, d),
                                T::ONE,
                            );
                            for i in 0..r {
                                let rows = ds[i * c..(i + 1) * c]
                                    .iter_mut()
                                    .zip(&p[i * c..(i + 1) * c]);
                                for (x, &pv) in rows {
                                    *x = pv * (*x - delta[i]);
                                }
                            }
                            // dQ_b += scale · dS · k_b; dK_b += scale · dSᵀ · q_b
                            mm(
                                (r, d, c),
                                (&mut *dq_b, d),
                                true,
                                (&ds[..], c, 1),
                                (k_b, d, 1),
                                scale,
                            );
                            let dk_b = &mut dk_acc[j0 * d..(j0 + c) * d];
                            mm(
                                (c, d, r),
                                (dk_b, d),
                                true,
                                (&ds[..], 1, c),
                                (q_b, d, 1),
                                scale,
                            );
                        }
                        (dk_acc, dv_acc)
                    },
                )
                .reduce(
                    || (vec![T::ZERO; m * d], vec![T::ZERO; m * d]),
                    |(mut a_k, mut a_v), (b_k, b_v)| {
                        a_k.iter_mut().zip(&b_k).for_each(|(a, &b)| *a += b);
                        a_v.iter_mut().zip(&b_v).for_each(|(a, &b)| *a += b);
                        (a_k, a_v)
                    },
                );
            dk_h.copy_from_slice(&sums.0);
            dv_h.copy_from_slice(&sums.1);
        });
    (dq, dk, dv)
}

/// The contiguous values of a CPU storage of type `T`.
fn slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("blocked attention: operands must be contiguous".into())
    })?;
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

impl BlockedAttention {
    fn blocks(&self) -> (usize, usize) {
        (self.query_block, self.key_block)
    }

    fn dims_of(&self, q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<Dims> {
        dims(q.dims(), k.dims(), v.dims()).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "blocked attention: shapes q {q:?}, k {k:?}, v {v:?} do not fit [.., N, d], [.., M, d], [.., M, d]"
            ))
        })
    }

    fn out_shape(q: &Shape, d: usize) -> Shape {
        let mut dims = q.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = d + 1;
        }
        Shape::from(dims)
    }
}

impl CustomOp3 for BlockedAttention {
    fn name(&self) -> &'static str {
        "mifo-blocked-attention"
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
        let z = self.dims_of(l1.shape(), l2.shape(), l3.shape())?;
        let shape = Self::out_shape(l1.shape(), z.d);
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(forward::<f32>(
                slice(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                z,
                self.scale as f32,
                self.blocks(),
            )),
            CpuStorage::F64(_) => CpuStorage::F64(forward::<f64>(
                slice(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                z,
                self.scale,
                self.blocks(),
            )),
            _ => candle_core::bail!("blocked attention: expected f32 or f64 operands"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let z = self.dims_of(q.shape(), k.shape(), v.shape())?;
        fn run<T: Real + candle_core::WithDType>(
            op: &BlockedAttention,
            z: Dims,
            [q, k, v, o, g]: [&Tensor; 5],
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let vals = |t: &Tensor| t.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>();
            let (dq, dk, dv) = backward::<T>(
                &vals(q)?,
                &vals(k)?,
                &vals(v)?,
                &vals(o)?,
                &vals(g)?,
                z,
                <T as Real>::of_f64(op.scale),
                op.blocks(),
            );
            let dev = q.device();
            Ok((
                Some(Tensor::from_vec(dq, q.shape(), dev)?),
                Some(Tensor::from_vec(dk, k.shape(), dev)?),
                Some(Tensor::from_vec(dv, v.shape(), dev)?),
            ))
        }
        let all = [q, k, v, res, grad];
        match q.dtype() {
            DType::F32 => run::<f32>(self, z, all),
            DType::F64 => run::<f64>(self, z, all),
            dt => candle_core::bail!("blocked attention: backward in {dt:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::max_rel_err;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let len: usize = shape.iter().product();
        let vals: Vec<f64> = (0..len)
            .map(|_| rand_distr::StandardNormal.sample(&mut rng))
            .collect();
        Tensor::from_vec(vals, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// q, k, v of `[2, 3, n, d]`, `[2, 3, m, d]` as variables; `spread` widens the logits so
    /// that the softmax is peaked and later key blocks raise the running maximum.
    fn operands(n: usize, m: usize, d: usize, dtype: DType, seed: u64) -> [Var; 3] {
        let q = (randn(&[2, 3, n, d], seed, dtype) * 1.5).unwrap();
        // Keys grow along M, so the maximum moves from block to block.
        let ramp: Vec<f64> = (0..m).map(|j| 0.5 + 2.0 * j as f64 / m as f64).collect();
        let ramp = Tensor::from_vec(ramp, (m, 1), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let k = randn(&[2, 3, m, d], seed + 1, dtype)
            .broadcast_mul(&ramp)
            .unwrap();
        let v = randn(&[2, 3, m, d], seed + 2, dtype);
        [q, k, v].map(|t| Var::from_tensor(&t).unwrap())
    }

    /// Output and gradients of `Σ out ⊙ w` for q, k, v, by one of the two paths.
    fn run(
        vars: &[Var; 3],
        w: &Tensor,
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> (Tensor, [Tensor; 3]) {
        let [q, k, v] = vars.each_ref().map(|x| x.as_tensor());
        let out = f(q, k, v).unwrap();
        let loss = (out.to_dtype(DType::F64).unwrap() * w)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = [q, k, v].map(|t| grads.get(t).expect("a gradient").clone());
        (out, g)
    }

    /// Blocked against full attention, forward ≤ 1e-5 and gradients ≤ 1e-4 relative to the
    /// largest value, for self-attention (N = M, not a multiple of the block) and
    /// cross-attention (77 keys), with small odd blocks and with the defaults.
    #[test]
    fn blocked_matches_full_forward_and_gradients() {
        for (n, m, d) in [(37, 37, 8), (37, 77, 8), (70, 77, 16), (300, 300, 8)] {
            for blocks in [(7, 5), (16, 32), (QUERY_BLOCK, KEY_BLOCK)] {
                let vars = operands(n, m, d, DType::F32, 3);
                let w = randn(&[2, 3, n, d], 9, DType::F64);
                let scale = 1.0 / (d as f64).sqrt();
                let (full, g_full) = run(&vars, &w, |q, k, v| reference(q, k, v, scale));
                let (blk, g_blk) = run(&vars, &w, |q, k, v| {
                    attention_with_blocks(q, k, v, scale, blocks)
                });
                assert_eq!(blk.dims(), full.dims());
                let e = max_rel_err(&blk, &full);
                assert!(e <= 1e-5, "forward n={n} m={m} blocks {blocks:?}: {e:.2e}");
                for (name, (a, b)) in ["q", "k", "v"].iter().zip(g_blk.iter().zip(&g_full)) {
                    let e = max_rel_err(a, b);
                    assert!(e <= 1e-4, "d{name} n={n} m={m} blocks {blocks:?}: {e:.2e}");
                }
            }
        }
    }

    /// The gradients in f64 against central finite differences of the blocked forward itself.
    #[test]
    fn blocked_gradients_match_finite_differences() {
        let (n, m, d) = (11, 13, 4);
        let blocks = (4, 3);
        let vars = operands(n, m, d, DType::F64, 21);
        let w = randn(&[2, 3, n, d], 5, DType::F64);
        let scale = 0.7;
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| attention_with_blocks(q, k, v, scale, blocks);
        let (_, grads) = run(&vars, &w, f);
        let value = || {
            let [q, k, v] = vars.each_ref().map(|x| x.as_tensor());
            (f(q, k, v).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for (name, (var, grad)) in ["q", "k", "v"].iter().zip(vars.iter().zip(&grads)) {
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let g = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let shape = var.as_tensor().shape().clone();
            let top = g.iter().fold(0f64, |a, x| a.max(x.abs()));
            let h = 1e-5;
            let mut worst = 0f64;
            for i in (0..base.len()).step_by(base.len() / 40 + 1) {
                let at = |delta: f64| {
                    let mut x = base.clone();
                    x[i] += delta;
                    var.set(&Tensor::from_vec(x, shape.clone(), &Device::Cpu).unwrap())
                        .unwrap();
                    value()
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                worst = worst.max((numeric - g[i]).abs() / top);
            }
            var.set(&Tensor::from_vec(base, shape, &Device::Cpu).unwrap())
                .unwrap();
            assert!(top > 1e-6, "d{name} is all zeros");
            assert!(
                worst < 1e-7,
                "d{name}: finite differences off by {worst:.2e}"
            );
        }
    }

    /// f16 operands are upcast per call: the result matches the full path in f32 on the same
    /// (f16-rounded) values to f16 precision, and comes back in f16.
    #[test]
    fn half_precision_is_upcast() {
        let vars = operands(20, 77, 8, DType::F16, 4);
        let [q, k, v] = vars.each_ref().map(|x| x.as_tensor());
        let out = attention_with_blocks(q, k, v, 0.35, (8, 16)).unwrap();
        assert_eq!(out.dtype(), DType::F16);
        let f32s = [q, k, v].map(|t| t.to_dtype(DType::F32).unwrap());
        let full = reference(&f32s[0], &f32s[1], &f32s[2], 0.35).unwrap();
        let e = max_rel_err(&out, &full);
        assert!(e < 2e-3, "{e:.2e}");
    }

    /// What the blocked path accepts: CPU operands of matching shapes, and not when the full
    /// path is forced.
    #[test]
    fn applies_only_to_fitting_operands() {
        let q = randn(&[1, 2, 5, 4], 1, DType::F32);
        let k = randn(&[1, 2, 7, 4], 2, DType::F32);
        assert!(fits(&q, &k, &k));
        assert!(!fits(&q, &q, &k), "keys and values of different lengths");
        let wide = randn(&[1, 2, 7, 6], 3, DType::F32);
        assert!(
            !fits(&q, &wide, &wide),
            "a key width other than the query's"
        );
        let other = randn(&[2, 2, 7, 4], 4, DType::F32);
        assert!(!fits(&q, &other, &other), "different leading dimensions");
        assert!(
            !fits(&q, &k.to_dtype(DType::F64).unwrap(), &k),
            "mixed dtypes"
        );
    }
}
