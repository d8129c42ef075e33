//! 2-D convolutions (dilation 1, one group) by the fastest path the build and device have:
//! cuDNN on CUDA with the `cudnn` feature ([`super::cudnn`]), our own in f32 on the CPU
//! ([`super::cpu_conv`]), else candle's. Frozen layers ([`super::frozen`]) use the forward and
//! input gradient; layers whose weight is trained use [`TrainableConv`], whose backward gives
//! both gradients by the same paths (candle's own conv2d backward computes the input gradient
//! with a transposed convolution that is a direct loop on CPU and GPU).

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};

use super::frozen::output_storage;

/// `conv2d(x, weight)` without bias (dilation 1, one group): with the `cudnn` feature on a CUDA
/// device, cuDNN or candle by measurement per shape ([`super::cudnn`]); in f32 on the CPU,
/// [`super::cpu_conv`]; else candle's.
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let candle_path = || x.conv2d(weight, padding, stride, 1, 1);
    #[cfg(feature = "cudnn")]
    if super::cudnn::supports(x, weight) {
        return super::cudnn::conv2d(x, weight, padding, stride, candle_path);
    }
    if square_kernel(weight) && super::cpu_conv::supports(&[x, weight]) {
        return super::cpu_conv::conv2d(x, weight, padding, stride);
    }
    candle_path()
}

/// [`conv2d`] plus `[bias [C], image_bias [B, C], residual [B, C, H, W]]`, each optional, with
/// no gradient recorded: on the CPU in f32 ([`super::cpu_conv::conv2d_add`]) the product is
/// accumulated onto the addends in the output's one pass; elsewhere they are added after it.
pub(crate) fn conv2d_add(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    addends: [Option<&Tensor>; 3],
) -> candle_core::Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if square_kernel(weight)
        && super::cpu_conv::supports(&[x, weight])
        && addends.iter().flatten().all(|t| cpu_f32(t))
    {
        return super::cpu_conv::conv2d_add(x, weight, padding, stride, addends);
    }
    let [bias, image_bias, residual] = addends;
    let mut y = add_channel_bias(conv2d(x, weight, padding, stride)?, bias)?;
    if let Some(t) = image_bias {
        let (b, c) = (y.dim(0)?, y.dim(1)?);
        y = y.broadcast_add(&t.reshape((b, c, 1, 1))?)?;
    }
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

/// `y` [B, C, H, W] plus a per-channel `bias` [C], if any.
pub(crate) fn add_channel_bias(y: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// Whether a 4-D weight has a square kernel (what [`super::cpu_conv`] handles).
fn square_kernel(weight: &Tensor) -> bool {
    weight.dim(2).ok() == weight.dim(3).ok()
}

/// The gradient of [`conv2d`] with respect to its input of height and width `in_hw`, given the
/// output's gradient `grad`: [`super::cpu_conv`] in f32 on the CPU, cuDNN's backward-data
/// convolution where that measured faster ([`super::cudnn`]), else a transposed convolution as
/// in candle's own conv2d backward.
pub(crate) fn conv2d_input_grad(
    grad: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    in_hw: (usize, usize),
) -> candle_core::Result<Tensor> {
    let candle_path = || {
        let k = weight.dim(2)?;
        let out_size = (grad.dim(2)? - 1) * stride + k - 2 * padding;
        let out_padding = in_hw.0 - out_size;
        grad.conv_transpose2d(weight, padding, out_padding, stride, 1)
    };
    #[cfg(feature = "cudnn")]
    if super::cudnn::supports(grad, weight) {
        return super::cudnn::conv2d_input_grad(grad, weight, padding, stride, in_hw, candle_path);
    }
    if square_kernel(weight) && super::cpu_conv::supports(&[grad, weight]) {
        return super::cpu_conv::conv2d_input_grad(grad, weight, padding, stride, in_hw);
    }
    candle_path()
}

/// The gradient of [`conv2d`] with respect to its weight [c_out, c_in, k, k], given its input
/// `x` and the output's gradient `grad`: [`super::cpu_conv`] in f32 on the CPU, else as in
/// candle's conv2d backward (a convolution of the transposed input by the transposed gradient).
fn conv2d_weight_grad(
    x: &Tensor,
    grad: &Tensor,
    (k, k_w): (usize, usize),
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    if k == k_w && super::cpu_conv::supports(&[x, grad]) {
        return super::cpu_conv::conv2d_weight_grad(x, grad, k, padding, stride);
    }
    // With the roles of batch and channels swapped, the weight gradient is a convolution of
    // the input by the output gradient, dilated by the stride; it can overhang the kernel by
    // up to stride − 1 rows and columns, which are cut.
    let dw = x
        .transpose(0, 1)?
        .conv2d(&grad.transpose(0, 1)?, padding, 1, stride, 1)?
        .transpose(0, 1)?;
    dw.narrow(2, 0, k)?.narrow(3, 0, k_w)
}

/// `conv2d(x, weight)` (no bias) with a weight that is trained: forward and both gradients by
/// the paths of this module. Used on the CPU ([`super::nn::Conv2d`]); its backward is written
/// for any device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TrainableConv {
    /// Zero padding on each side.
    pub(crate) padding: usize,
    /// Stride in both directions.
    pub(crate) stride: usize,
}

impl TrainableConv {
    fn forward_on(
        &self,
        x: Storage,
        x_l: &Layout,
        w: Storage,
        w_l: &Layout,
    ) -> candle_core::Result<Tensor> {
        let plain = |s: Storage, l: &Layout| {
            if !l.is_contiguous() || l.start_offset() != 0 {
                candle_core::bail!("conv2d: operands must be contiguous from offset 0");
            }
            Ok(Tensor::from_storage(
                s,
                l.shape().clone(),
                BackpropOp::none(),
                false,
            ))
        };
        conv2d(&plain(x, x_l)?, &plain(w, w_l)?, self.padding, self.stride)?.contiguous()
    }
}

impl CustomOp2 for TrainableConv {
    fn name(&self) -> &'static str {
        "mifo-trainable-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let values = |s, l| super::cpu_conv::storage_values(s, l);
        if let (Some(xs), Some(ws)) = (values(x, x_l), values(w, w_l)) {
            let (x_in, w_in) = ((xs, x_l.dims()), (ws, w_l.dims()));
            if let Some(y) =
                super::cpu_conv::conv2d_on_values(x_in, w_in, None, self.padding, self.stride)
            {
                return Ok(y);
            }
        }
        let y = self.forward_on(Storage::Cpu(x.clone()), x_l, Storage::Cpu(w.clone()), w_l)?;
        match output_storage(&y)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("conv2d: the output left the CPU"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (p, s) = (self.padding, self.stride);
        let dx = if x.track_op() {
            Some(conv2d_input_grad(
                grad,
                weight,
                p,
                s,
                (x.dim(2)?, x.dim(3)?),
            )?)
        } else {
            None
        };
        let kernel = (weight.dim(2)?, weight.dim(3)?);
        let dw = conv2d_weight_grad(&x.detach(), grad, kernel, p, s)?;
        Ok((dx, Some(dw)))
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
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Both gradients of the trainable convolution equal candle's conv2d backward, on our CPU
    /// path (f32) and on the generic path other devices take (exercised here in f64).
    #[test]
    fn trainable_conv_gradients_match_candles_backward() {
        // (batch, c_in, side, c_out, k, padding, stride); square inputs, where candle's own
        // backward is right.
        let cases = [
            (2, 3, 9, 4, 3, 1, 1),
            (1, 5, 8, 6, 3, 1, 2),
            (2, 4, 7, 3, 1, 0, 1),
            (1, 3, 9, 2, 3, 0, 2),
        ];
        for dtype in [DType::F32, DType::F64] {
            for (i, &(b, ci, side, co, k, p, s)) in cases.iter().enumerate() {
                let x = Var::from_tensor(&random(&[b, ci, side, side], i as u64, dtype)).unwrap();
                let w = Var::from_tensor(&random(&[co, ci, k, k], 10 + i as u64, dtype)).unwrap();
                let ours = x
                    .as_tensor()
                    .apply_op2(
                        w.as_tensor(),
                        TrainableConv {
                            padding: p,
                            stride: s,
                        },
                    )
                    .unwrap();
                let theirs = x.as_tensor().conv2d(w.as_tensor(), p, s, 1, 1).unwrap();
                assert!(
                    max_rel_err(&ours, &theirs) < 1e-5,
                    "{dtype:?} case {i}: forward"
                );
                let dy = random(theirs.dims(), 20 + i as u64, dtype);
                let g_ours = (&ours * &dy)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g_theirs = (&theirs * &dy)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for (what, v) in [("dx", &x), ("dw", &w)] {
                    let err = max_rel_err(
                        g_ours.get(v.as_tensor()).unwrap(),
                        g_theirs.get(v.as_tensor()).unwrap(),
                    );
                    assert!(err < 1e-5, "{dtype:?} case {i}: {what} {err}");
                }
            }
        }
    }
}
