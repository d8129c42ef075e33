//! 2-D convolution on the CPU in f32, and its input gradient: im2col in tiles of whole output
//! rows, one matrix product per tile (candle's, multi-threaded), and the reverse (col2im) for
//! the gradient.
//!
//! candle 0.11's CPU convolution converts the input to NHWC on one thread and gathers its
//! im2col tile one element at a time, with a scattered write per output value; at the channel
//! counts of a VAE (and of every small model) that gathering, not the product, is most of its
//! time. Its transposed convolution (the input gradient) is a dot product per output pixel.
//! Here the patches are copied as row segments of the NCHW input (whole segments for stride 1),
//! the product's rows land as contiguous runs of the NCHW output, and the gradient adds row
//! segments back, one input channel per task.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Upper bound, in f32 values, on one tile's im2col matrix (32 MiB).
const TILE_VALUES: usize = 1 << 23;

/// The sizes of one convolution over one image.
#[derive(Clone, Copy, Debug)]
struct Dims {
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k: usize,
    padding: usize,
    stride: usize,
    oh: usize,
    ow: usize,
}

impl Dims {
    /// im2col rows: one per (input channel, kernel row, kernel column).
    fn rows(&self) -> usize {
        self.c_in * self.k * self.k
    }

    /// Output rows per tile, so that a tile's im2col matrix stays under [`TILE_VALUES`].
    fn tile_rows(&self) -> usize {
        (TILE_VALUES / (self.rows() * self.ow).max(1)).clamp(1, self.oh)
    }

    /// For output column `ox` ranging over `0..ow`, the input column is `ox·s + kw − p`; the
    /// range of `ox` whose input column lies inside the image.
    fn valid_cols(&self, kw: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // ox·s + kw ≥ p  ⇔  ox ≥ ceil((p − kw) / s)
        let lo = if kw >= p { 0 } else { (p - kw).div_ceil(s) };
        // ox·s + kw − p ≤ w − 1  ⇔  ox ≤ (w − 1 + p − kw) / s
        let hi = if self.w + p > kw {
            ((self.w - 1 + p - kw) / s + 1).min(self.ow)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// The input row of output row `oy` under kernel row `kh`, if inside the image.
    fn input_row(&self, oy: usize, kh: usize) -> Option<usize> {
        (oy * self.stride + kh)
            .checked_sub(self.padding)
            .filter(|&iy| iy < self.h)
    }
}

/// Whether these operands (input, weight or gradient) can take this path: every one f32, 4-D,
/// on the CPU. Whether their sizes fit one another is checked by each function (kernels must
/// be square, channels must match).
pub(crate) fn supports(operands: &[&Tensor]) -> bool {
    operands
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 4)
}

/// Calls `f` with the f32 values of a CPU tensor (made contiguous first if it is not).
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            Ok(f(&v[start..start + t.elem_count()]))
        }
        _ => candle_core::bail!("cpu conv: expected an f32 CPU tensor"),
    }
}

/// The sizes of a convolution of input `x_dims` under weight `w_dims`, if they fit: matching
/// input channels, a square kernel no larger than the padded input, a stride of at least 1.
fn dims(x_dims: &[usize], w_dims: &[usize], padding: usize, stride: usize) -> Option<Dims> {
    let (&[_, c_in, h, w], &[c_out, w_in, k, k_w]) = (x_dims, w_dims) else {
        return None;
    };
    if w_in != c_in || k_w != k || stride == 0 || h + 2 * padding < k || w + 2 * padding < k {
        return None;
    }
    Some(Dims {
        c_in,
        h,
        w,
        c_out,
        k,
        padding,
        stride,
        oh: (h + 2 * padding - k) / stride + 1,
        ow: (w + 2 * padding - k) / stride + 1,
    })
}

/// Fills `col` [rows, (oy1 − oy0)·ow] with the patches of output rows `oy0..oy1` of image `x`
/// [c_in, h, w].
fn im2col(d: &Dims, x: &[f32], (oy0, oy1): (usize, usize), col: &mut [f32]) {
    let n = (oy1 - oy0) * d.ow;
    let per_channel = d.k * d.k * n;
    col.par_chunks_mut(per_channel)
        .enumerate()
        .for_each(|(c, rows)| {
            let plane = &x[c * d.h * d.w..(c + 1) * d.h * d.w];
            for kh in 0..d.k {
                for kw in 0..d.k {
                    let row = &mut rows[(kh * d.k + kw) * n..(kh * d.k + kw + 1) * n];
                    let (lo, hi) = d.valid_cols(kw);
                    for (t, oy) in (oy0..oy1).enumerate() {
                        let seg = &mut row[t * d.ow..(t + 1) * d.ow];
                        let Some(iy) = d.input_row(oy, kh) else {
                            seg.fill(0.0);
                            continue;
                        };
                        let src = &plane[iy * d.w..(iy + 1) * d.w];
                        seg[..lo].fill(0.0);
                        seg[hi..].fill(0.0);
                        if lo == hi {
                            continue;
                        }
                        let first = lo * d.stride + kw - d.padding;
                        if d.stride == 1 {
                            seg[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                        } else {
                            for (j, v) in seg[lo..hi].iter_mut().enumerate() {
                                *v = src[first + j * d.stride];
                            }
                        }
                    }
                }
            }
        });
}

/// Adds the columns of `col` [rows, (oy1 − oy0)·ow] back into the image gradient `dx`
/// [c_in, h, w] (the adjoint of [`im2col`]).
fn col2im_add(d: &Dims, col: &[f32], (oy0, oy1): (usize, usize), dx: &mut [f32]) {
    let n = (oy1 - oy0) * d.ow;
    let per_channel = d.k * d.k * n;
    dx.par_chunks_mut(d.h * d.w)
        .zip(col.par_chunks(per_channel))
        .for_each(|(plane, rows)| {
            for kh in 0..d.k {
                for kw in 0..d.k {
                    let row = &rows[(kh * d.k + kw) * n..(kh * d.k + kw + 1) * n];
                    let (lo, hi) = d.valid_cols(kw);
                    for (t, oy) in (oy0..oy1).enumerate() {
                        let Some(iy) = d.input_row(oy, kh) else {
                            continue;
                        };
                        if lo == hi {
                            continue;
                        }
                        let seg = &row[t * d.ow..(t + 1) * d.ow];
                        let dst = &mut plane[iy * d.w..(iy + 1) * d.w];
                        let first = lo * d.stride + kw - d.padding;
                        if d.stride == 1 {
                            for (o, v) in dst[first..first + (hi - lo)].iter_mut().zip(&seg[lo..hi])
                            {
                                *o += v;
                            }
                        } else {
                            for (j, v) in seg[lo..hi].iter().enumerate() {
                                dst[first + j * d.stride] += v;
                            }
                        }
                    }
                }
            }
        });
}

thread_local! {
    /// The im2col tile of the calling thread, kept between calls (a fresh 16–32 MiB buffer
    /// per convolution costs more in page faults than the copy into it).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Bytes held by every thread's im2col tile ([`SCRATCH`]; tiles only grow).
static SCRATCH_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Bytes held by the im2col tiles the CPU convolution keeps between calls, all threads together
/// (a cache: `mifo bench --full` counts it in its memory breakdown).
pub(crate) fn scratch_bytes() -> usize {
    SCRATCH_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Calls `f` with this thread's scratch buffer of at least `len` values (contents undefined).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            let grown = (len - s.len()) * std::mem::size_of::<f32>();
            SCRATCH_BYTES.fetch_add(grown, std::sync::atomic::Ordering::Relaxed);
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// A row-major matrix view for [`matmul`]: `rows × cols` values starting at `ptr`, with
/// `row_stride` and `col_stride` in values.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    row_stride: usize,
    col_stride: usize,
}

/// `dst [m, n] = lhs [m, k] · rhs [k, n]` (dst rows `dst_row_stride` apart, columns adjacent),
/// on candle's thread count; with `accumulate`, `dst += lhs · rhs`.
///
/// # Safety
/// Every view must address `m × k`, `k × n` and `m × n` live values with its strides, and `dst`
/// must not overlap the operands.
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: View,
    rhs: View,
    accumulate: bool,
) {
    let threads = crate::cpu_threads::count();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride as isize,
        accumulate,
        lhs.ptr,
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.ptr,
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

impl Dims {
    /// A 1×1 convolution with stride 1 and no padding: its im2col matrix is the image itself.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }

    /// The tiles of output rows: `(oy0, oy1, n)` with `n = (oy1 − oy0)·ow` values per channel.
    fn row_tiles(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let tile = self.tile_rows();
        (0..self.oh).step_by(tile).map(move |oy0| {
            let oy1 = (oy0 + tile).min(self.oh);
            (oy0, oy1, (oy1 - oy0) * self.ow)
        })
    }

    fn in_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    fn out_len(&self) -> usize {
        self.c_out * self.oh * self.ow
    }
}

/// Values a convolution's output starts from, so that adding them costs no pass of its own:
/// the product is accumulated onto them. Each is optional.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Addends<'a> {
    /// Per output channel, [c_out].
    pub(crate) bias: Option<&'a [f32]>,
    /// Per image and output channel, [batch, c_out] (a ResNet block's time embedding).
    pub(crate) image_bias: Option<&'a [f32]>,
    /// Of the output's shape, [batch, c_out, oh, ow] (a residual connection).
    pub(crate) residual: Option<&'a [f32]>,
}

impl Addends<'_> {
    /// Whether these fit a convolution of `batch` images with sizes `d`.
    fn fit(&self, d: &Dims, batch: usize) -> bool {
        self.bias.is_none_or(|b| b.len() == d.c_out)
            && self.image_bias.is_none_or(|b| b.len() == batch * d.c_out)
            && self.residual.is_none_or(|r| r.len() == batch * d.out_len())
    }
}

/// `conv2d` of `batch` images `x` [batch, c_in, h, w] under `w` [c_out, c_in, k, k], plus
/// `add` (see [`Addends`]; callers check [`Addends::fit`]), as [batch, c_out, oh, ow] values.
/// The output starts as the residual (or zeros) with the biases added in the same pass, and
/// the matrix products accumulate onto it.
fn conv2d_values(d: &Dims, batch: usize, x: &[f32], w: &[f32], add: Addends) -> Vec<f32> {
    let plane_out = d.oh * d.ow;
    let mut out = match add.residual {
        Some(r) => r.to_vec(),
        None => vec![0f32; batch * d.out_len()],
    };
    let biased = add.bias.is_some() || add.image_bias.is_some();
    let accumulate = biased || add.residual.is_some();
    // W [c_out, c_in·k·k] (its own layout) times each tile's patches.
    let lhs = View {
        ptr: w.as_ptr(),
        row_stride: d.rows(),
        col_stride: 1,
    };
    for (bi, (image, out_b)) in x
        .chunks_exact(d.in_len())
        .zip(out.chunks_exact_mut(d.out_len()))
        .enumerate()
    {
        if biased {
            for (c, plane) in out_b.chunks_exact_mut(plane_out).enumerate() {
                let b = add.bias.map_or(0.0, |b| b[c])
                    + add.image_bias.map_or(0.0, |b| b[bi * d.c_out + c]);
                if add.residual.is_some() {
                    plane.iter_mut().for_each(|v| *v += b);
                } else {
                    plane.fill(b);
                }
            }
        }
        for (oy0, oy1, n) in d.row_tiles() {
            let dst = out_b[oy0 * d.ow..].as_mut_ptr();
            if d.is_pointwise() {
                let rhs = View {
                    ptr: image[oy0 * d.ow..].as_ptr(),
                    row_stride: d.h * d.w,
                    col_stride: 1,
                };
                // SAFETY: lhs [c_out, c_in] = `w`, rhs [c_in, n] rows h·w apart inside
                // `image`, dst [c_out, n] rows plane_out apart inside `out_b`.
                unsafe { matmul((d.c_out, n, d.rows()), dst, plane_out, lhs, rhs, accumulate) };
                continue;
            }
            with_scratch(d.rows() * n, |col| {
                im2col(d, image, (oy0, oy1), col);
                let rhs = View {
                    ptr: col.as_ptr(),
                    row_stride: n,
                    col_stride: 1,
                };
                // SAFETY: lhs [c_out, rows] = `w`, rhs [rows, n] = `col`, dst [c_out, n] rows
                // plane_out apart inside `out_b`.
                unsafe { matmul((d.c_out, n, d.rows()), dst, plane_out, lhs, rhs, accumulate) };
            });
        }
    }
    out
}

/// The input gradient [batch, c_in, h, w] from the output gradient `g` under `w`.
fn input_grad_values(d: &Dims, batch: usize, g: &[f32], w: &[f32]) -> Vec<f32> {
    let (plane_in, plane_out) = (d.h * d.w, d.oh * d.ow);
    let mut dx = vec![0f32; batch * d.in_len()];
    // Wᵀ [c_in·k·k, c_out]: W read column-wise.
    let lhs = View {
        ptr: w.as_ptr(),
        row_stride: 1,
        col_stride: d.rows(),
    };
    for (g_b, dx_b) in g
        .chunks_exact(d.out_len())
        .zip(dx.chunks_exact_mut(d.in_len()))
    {
        for (oy0, oy1, n) in d.row_tiles() {
            // The tile's gradient rows [c_out, n], plane_out apart.
            let rhs = View {
                ptr: g_b[oy0 * d.ow..].as_ptr(),
                row_stride: plane_out,
                col_stride: 1,
            };
            if d.is_pointwise() {
                let dst = dx_b[oy0 * d.ow..].as_mut_ptr();
                // SAFETY: lhs [c_in, c_out] = `w`, rhs [c_out, n] inside `g_b`, dst [c_in, n]
                // rows plane_in apart inside `dx_b`; tiles write disjoint columns.
                unsafe { matmul((d.rows(), n, d.c_out), dst, plane_in, lhs, rhs, false) };
                continue;
            }
            with_scratch(d.rows() * n, |cols| {
                // SAFETY: lhs [rows, c_out] = `w`, rhs [c_out, n] inside `g_b`, dst [rows, n]
                // = `cols`.
                unsafe {
                    matmul(
                        (d.rows(), n, d.c_out),
                        cols.as_mut_ptr(),
                        n,
                        lhs,
                        rhs,
                        false,
                    )
                };
                col2im_add(d, cols, (oy0, oy1), dx_b);
            });
        }
    }
    dx
}

/// The weight gradient [c_out, c_in, k, k] from the input `x` and the output gradient `g`:
/// `dW += dy · im2col(x)ᵀ` over images and tiles.
fn weight_grad_values(d: &Dims, x: &[f32], g: &[f32]) -> Vec<f32> {
    let plane_out = d.oh * d.ow;
    let mut dw = vec![0f32; d.c_out * d.rows()];
    let dst = dw.as_mut_ptr();
    for (image, g_b) in x.chunks_exact(d.in_len()).zip(g.chunks_exact(d.out_len())) {
        for (oy0, oy1, n) in d.row_tiles() {
            // dy [c_out, n] (rows plane_out apart) times the patches, transposed.
            let lhs = View {
                ptr: g_b[oy0 * d.ow..].as_ptr(),
                row_stride: plane_out,
                col_stride: 1,
            };
            if d.is_pointwise() {
                let rhs = View {
                    ptr: image[oy0 * d.ow..].as_ptr(),
                    row_stride: 1,
                    col_stride: d.h * d.w,
                };
                // SAFETY: lhs [c_out, n] inside `g_b`, rhs [n, c_in] inside `image`, dst
                // [c_out, c_in] = `dw`.
                unsafe { matmul((d.c_out, d.rows(), n), dst, d.rows(), lhs, rhs, true) };
                continue;
            }
            with_scratch(d.rows() * n, |col| {
                im2col(d, image, (oy0, oy1), col);
                let rhs = View {
                    ptr: col.as_ptr(),
                    row_stride: 1,
                    col_stride: n,
                };
                // SAFETY: lhs [c_out, n] inside `g_b`, rhs [n, rows] = `col` read transposed,
                // dst [c_out, rows] = `dw`.
                unsafe { matmul((d.c_out, d.rows(), n), dst, d.rows(), lhs, rhs, true) };
            });
        }
    }
    dw
}

/// `conv2d(x, weight)` without bias (dilation 1, one group) for f32 CPU tensors
/// (see [`supports`]); no gradient is recorded.
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    conv2d_add(x, weight, padding, stride, [None, None, None])
}

/// `conv2d(x, weight)` plus `[bias [c_out], image_bias [batch, c_out], residual]` (each
/// optional, see [`Addends`]) for f32 CPU tensors (see [`supports`]; the addends f32 on the
/// CPU too), in one output pass; no gradient is recorded.
pub(crate) fn conv2d_add(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    [bias, image_bias, residual]: [Option<&Tensor>; 3],
) -> candle_core::Result<Tensor> {
    let Some(d) = dims(x.dims(), weight.dims(), padding, stride) else {
        candle_core::bail!(
            "conv2d: input {:?} does not fit weight {:?}",
            x.dims(),
            weight.dims()
        )
    };
    let batch = x.dim(0)?;
    let small = |t: Option<&Tensor>| -> candle_core::Result<Option<Vec<f32>>> {
        t.map(|t| t.flatten_all()?.to_vec1::<f32>()).transpose()
    };
    let (bias, image_bias) = (small(bias)?, small(image_bias)?);
    let run = |residual: Option<&[f32]>| -> candle_core::Result<Vec<f32>> {
        let add = Addends {
            bias: bias.as_deref(),
            image_bias: image_bias.as_deref(),
            residual,
        };
        if !add.fit(&d, batch) {
            candle_core::bail!(
                "conv2d: the addends do not fit an output of [{batch}, {}, {}, {}]",
                d.c_out,
                d.oh,
                d.ow
            );
        }
        with_values(weight, |w| {
            with_values(x, |x| conv2d_values(&d, batch, x, w, add))
        })?
    };
    let out = match residual {
        Some(r) => with_values(r, |r| run(Some(r)))??,
        None => run(None)?,
    };
    Tensor::from_vec(out, (batch, d.c_out, d.oh, d.ow), &Device::Cpu)
}

/// The f32 values of a CPU storage under `layout`, if it is f32 and contiguous (a custom op's
/// operand, read in place).
pub(crate) fn storage_values<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Some(&v[start..end]),
        _ => None,
    }
}

/// [`conv2d`] plus a per-channel `bias` on values read in place (a custom op's CPU forward):
/// input `x` of `x_dims`, weight `w` of `w_dims`; `None` if the sizes do not fit.
pub(crate) fn conv2d_on_values(
    (x, x_dims): (&[f32], &[usize]),
    (w, w_dims): (&[f32], &[usize]),
    bias: Option<&[f32]>,
    padding: usize,
    stride: usize,
) -> Option<(CpuStorage, Shape)> {
    let d = dims(x_dims, w_dims, padding, stride)?;
    let batch = x_dims[0];
    let add = Addends {
        bias,
        ..Addends::default()
    };
    let fits = x.len() == batch * d.in_len() && w.len() == d.c_out * d.rows() && add.fit(&d, batch);
    fits.then(|| {
        let out = conv2d_values(&d, batch, x, w, add);
        (
            CpuStorage::F32(out),
            Shape::from((batch, d.c_out, d.oh, d.ow)),
        )
    })
}

/// The gradient of [`conv2d`] with respect to its input [n, c_in, in_h, in_w], given the
/// gradient `grad` [n, c_out, oh, ow] of its output.
pub(crate) fn conv2d_input_grad(
    grad: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    (in_h, in_w): (usize, usize),
) -> candle_core::Result<Tensor> {
    let batch = grad.dim(0)?;
    let input = [batch, weight.dim(1)?, in_h, in_w];
    let d = match dims(&input, weight.dims(), padding, stride) {
        Some(d) if grad.dims() == [batch, d.c_out, d.oh, d.ow] => d,
        _ => candle_core::bail!(
            "conv2d input gradient: gradient {:?} does not fit weight {:?} and input {in_h}x{in_w}",
            grad.dims(),
            weight.dims()
        ),
    };
    let dx = with_values(weight, |w| {
        with_values(grad, |g| input_grad_values(&d, batch, g, w))
    })??;
    Tensor::from_vec(dx, (batch, d.c_in, d.h, d.w), &Device::Cpu)
}

/// The gradient of [`conv2d`] with respect to its weight [c_out, c_in, k, k], given its input
/// `x` and the gradient `grad` of its output.
pub(crate) fn conv2d_weight_grad(
    x: &Tensor,
    grad: &Tensor,
    k: usize,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (batch, c_out) = (grad.dim(0)?, grad.dim(1)?);
    let d = match dims(x.dims(), &[c_out, x.dim(1)?, k, k], padding, stride) {
        Some(d) if grad.dims() == [batch, c_out, d.oh, d.ow] && x.dim(0)? == batch => d,
        _ => candle_core::bail!(
            "conv2d weight gradient: input {:?} does not fit gradient {:?} under a {k}x{k} kernel",
            x.dims(),
            grad.dims()
        ),
    };
    let dw = with_values(x, |x| with_values(grad, |g| weight_grad_values(&d, x, g)))??;
    Tensor::from_vec(dw, (d.c_out, d.c_in, d.k, d.k), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::max_rel_err;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn dot(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// Shapes as in the VAE and UNet (3×3 stride 1 and 2, 1×1, odd sizes, no valid column for
    /// a kernel tap), and the last three in several tiles of output rows.
    const CASES: [(usize, usize, usize, usize, usize, usize, usize); 9] = [
        // (batch, c_in, h, w, c_out, k, padding) with stride below
        (2, 3, 9, 7, 5, 3, 1),
        (1, 4, 8, 8, 6, 3, 0),
        (2, 5, 6, 11, 3, 1, 0),
        (1, 2, 7, 7, 4, 3, 1),
        (1, 3, 10, 9, 2, 3, 1),
        (1, 3, 2, 2, 2, 3, 1),
        (1, 600, 140, 12, 2, 3, 1),
        (1, 600, 300, 26, 2, 3, 1),
        (2, 600, 120, 120, 3, 1, 0),
    ];
    const STRIDES: [usize; 9] = [1, 1, 1, 2, 2, 2, 1, 2, 1];

    /// The weight gradient is the adjoint in the weight: ⟨conv(x, V), dy⟩ = ⟨V, dW⟩ for any V.
    #[test]
    fn weight_gradient_is_the_adjoint_in_the_weight() {
        for (i, (&(b, ci, h, w, co, k, p), &s)) in CASES.iter().zip(&STRIDES).enumerate() {
            let x = random(&[b, ci, h, w], i as u64);
            let v = random(&[co, ci, k, k], 100 + i as u64);
            let y = conv2d(&x, &v, p, s).unwrap();
            let dy = random(y.dims(), 200 + i as u64);
            let dw = conv2d_weight_grad(&x, &dy, k, p, s).unwrap();
            assert_eq!(dw.dims(), v.dims(), "case {i}");
            let (lhs, rhs) = (dot(&y, &dy), dot(&v, &dw));
            let scale = dot(&y.abs().unwrap(), &dy.abs().unwrap());
            assert!((lhs - rhs).abs() < 1e-5 * scale, "case {i}: {lhs} vs {rhs}");
        }
    }

    #[test]
    fn the_large_cases_take_several_tiles() {
        for &(_, ci, h, w, co, k, p) in &CASES[6..] {
            let s = STRIDES[CASES.iter().position(|c| c.1 == ci && c.2 == h).unwrap()];
            let d = dims(&[1, ci, h, w], &[co, ci, k, k], p, s).unwrap();
            assert!(d.tile_rows() < d.oh, "{d:?} fits one tile");
        }
    }

    #[test]
    fn forward_matches_candle_conv2d() {
        for (i, (&(b, ci, h, w, co, k, p), &s)) in CASES.iter().zip(&STRIDES).enumerate() {
            let x = random(&[b, ci, h, w], i as u64);
            let wt = random(&[co, ci, k, k], 100 + i as u64);
            let ours = conv2d(&x, &wt, p, s).unwrap();
            let theirs = x.conv2d(&wt, p, s, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            let err = max_rel_err(&ours, &theirs);
            assert!(err < 1e-5, "case {i}: {err}");
        }
    }

    /// The input gradient is the adjoint of the forward: ⟨conv(x), dy⟩ = ⟨x, grad(dy)⟩ for any
    /// x and dy; and where candle's own conv2d backward handles the shape (square inputs; it
    /// takes the output padding of both sides from the height), the two agree.
    #[test]
    fn input_gradient_is_the_adjoint_and_matches_candle_backward() {
        for (i, (&(b, ci, h, w, co, k, p), &s)) in CASES.iter().zip(&STRIDES).enumerate() {
            let x = random(&[b, ci, h, w], i as u64);
            let wt = random(&[co, ci, k, k], 100 + i as u64);
            let y = conv2d(&x, &wt, p, s).unwrap();
            let dy = random(y.dims(), 200 + i as u64);
            let dx = conv2d_input_grad(&dy, &wt, p, s, (h, w)).unwrap();
            assert_eq!(dx.dims(), x.dims(), "case {i}");
            let (lhs, rhs) = (dot(&y, &dy), dot(&x, &dx));
            let scale = dot(&y.abs().unwrap(), &dy.abs().unwrap());
            assert!((lhs - rhs).abs() < 1e-5 * scale, "case {i}: {lhs} vs {rhs}");
            if h == w {
                let xv = candle_core::Var::from_tensor(&x).unwrap();
                let yv = xv.as_tensor().conv2d(&wt, p, s, 1, 1).unwrap();
                let grads = (&yv * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let err = max_rel_err(&dx, grads.get(xv.as_tensor()).unwrap());
                assert!(err < 1e-5, "case {i}: {err}");
            }
        }
    }

    /// The addends folded into the output pass give the same as adding them after the
    /// convolution, one at a time and together, pointwise and 3×3, in one tile and in several.
    #[test]
    fn addends_match_adding_after_the_convolution() {
        for (i, (&(b, ci, h, w, co, k, p), &s)) in CASES.iter().zip(&STRIDES).enumerate() {
            let x = random(&[b, ci, h, w], i as u64);
            let wt = random(&[co, ci, k, k], 100 + i as u64);
            let plain = conv2d(&x, &wt, p, s).unwrap();
            let bias = random(&[co], 300 + i as u64);
            let image_bias = random(&[b, co], 400 + i as u64);
            let residual = random(plain.dims(), 500 + i as u64);
            let with_bias = plain
                .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let with_image = with_bias
                .broadcast_add(&image_bias.reshape((b, co, 1, 1)).unwrap())
                .unwrap();
            let all = (&with_image + &residual).unwrap();
            let only_residual = (&plain + &residual).unwrap();
            let cases = [
                ([Some(&bias), None, None], &with_bias),
                ([Some(&bias), Some(&image_bias), None], &with_image),
                ([None, None, Some(&residual)], &only_residual),
                ([Some(&bias), Some(&image_bias), Some(&residual)], &all),
            ];
            for (j, (addends, expected)) in cases.into_iter().enumerate() {
                let ours = conv2d_add(&x, &wt, p, s, addends).unwrap();
                let err = max_rel_err(&ours, expected);
                assert!(err < 1e-6, "case {i}, addends {j}: {err}");
            }
        }
        // Addends of the wrong size are refused, not read out of bounds.
        let x = random(&[2, 3, 5, 5], 1);
        let wt = random(&[4, 3, 3, 3], 2);
        let short = random(&[3], 3);
        assert!(conv2d_add(&x, &wt, 1, 1, [Some(&short), None, None]).is_err());
        let one_image = random(&[1, 4], 4);
        assert!(conv2d_add(&x, &wt, 1, 1, [None, Some(&one_image), None]).is_err());
    }
}
