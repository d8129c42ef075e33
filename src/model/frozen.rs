//! Linear and convolution layers over weights that take no gradient, with a backward that
//! computes the input's gradient only.
//!
//! candle 0.11's backward computes a gradient for every argument of every op on the path to a
//! variable, frozen weights included, and keeps each of those weight gradients until the whole
//! backward pass ends. With the UNet frozen (learning phase A, the latent optimisation of
//! synthesis, the base weights under LoRA) that is a weight-sized gradient computed and held for
//! every layer: about a third of the backward's arithmetic and a model-sized block of memory,
//! for nothing. These ops run the same forward (candle's matmul / conv2d on a detached copy of
//! the input) and give back only `dx`.

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// What the frozen layer computes.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `x [rows, in] · Wᵀ (+ b)` with W [out, in].
    Linear,
    /// 2-D convolution with W [out, in, k, k].
    Conv2d { padding: usize, stride: usize },
}

/// A layer whose weight (and bias) are constants of the graph.
#[derive(Clone, Debug)]
pub(crate) struct FrozenLayer {
    weight: Tensor,
    bias: Option<Tensor>,
    kind: Kind,
}

impl FrozenLayer {
    /// `x · Wᵀ + b` over a 2-D input.
    pub(crate) fn linear(weight: &Tensor, bias: Option<&Tensor>) -> Self {
        Self {
            weight: weight.clone(),
            bias: bias.cloned(),
            kind: Kind::Linear,
        }
    }

    /// A 2-D convolution (dilation 1, one group).
    pub(crate) fn conv2d(
        weight: &Tensor,
        bias: Option<&Tensor>,
        padding: usize,
        stride: usize,
    ) -> Self {
        Self {
            weight: weight.clone(),
            bias: bias.cloned(),
            kind: Kind::Conv2d { padding, stride },
        }
    }

    /// Whether this path applies to `x` under `weight` / `bias`: gradient flows into `x`, none
    /// into the weights, and `x` is a plain contiguous tensor (the op reads its storage from
    /// the start). Checked before a layer is built, so the common paths build nothing.
    pub(crate) fn applies(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
        x.track_op()
            && !weight.track_op()
            && !bias.is_some_and(|b| b.track_op())
            && x.is_contiguous()
            && x.layout().start_offset() == 0
    }

    /// The layer on a tensor outside any graph (also the inference path of [`super::nn`]'s
    /// layers when nothing is tracked: on CUDA with cuDNN this is where convolutions go to it).
    pub(crate) fn forward_untracked(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.kind {
            Kind::Linear => {
                let y = x.matmul(&self.weight.t()?)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Kind::Conv2d { padding, stride } => super::conv::conv2d_add(
                x,
                &self.weight,
                padding,
                stride,
                [self.bias.as_ref(), None, None],
            ),
        }
    }

    /// A convolution in f32 on the CPU computed on the input's storage in place (no copy of
    /// input or output, unlike [`FrozenLayer::on_storage`]); `None` where that path does not
    /// apply.
    fn cpu_conv(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<Option<(CpuStorage, Shape)>> {
        use super::cpu_conv::{conv2d_on_values, storage_values, supports, with_values};
        let (Kind::Conv2d { padding, stride }, Some(x)) =
            (self.kind, storage_values(storage, layout))
        else {
            return Ok(None);
        };
        let bias_fits = self
            .bias
            .as_ref()
            .is_none_or(|b| b.device().is_cpu() && b.dtype() == candle_core::DType::F32);
        if !bias_fits || !supports(&[&self.weight]) {
            return Ok(None);
        }
        let x = (x, layout.dims());
        with_values(&self.weight, |w| {
            let w = (w, self.weight.dims());
            match &self.bias {
                Some(b) => with_values(b, |b| conv2d_on_values(x, w, Some(b), padding, stride)),
                None => Ok(conv2d_on_values(x, w, None, padding, stride)),
            }
        })?
    }

    fn on_storage(&self, input: Storage, layout: &Layout) -> candle_core::Result<Tensor> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("frozen layer: the input must be contiguous from offset 0");
        }
        let x = Tensor::from_storage(input, layout.shape().clone(), BackpropOp::none(), false);
        self.forward_untracked(&x)?.contiguous()
    }
}

/// The storage and shape of `y` (a copy, which the custom op hands back to candle).
pub(super) fn output_storage(y: &Tensor) -> candle_core::Result<(Storage, Shape)> {
    let (storage, layout) = y.storage_and_layout();
    Ok((storage.try_clone(layout)?, y.shape().clone()))
}

impl CustomOp1 for FrozenLayer {
    fn name(&self) -> &'static str {
        "mifo-frozen-layer"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if let Some(y) = self.cpu_conv(storage, layout)? {
            return Ok(y);
        }
        let y = self.on_storage(Storage::Cpu(storage.clone()), layout)?;
        match output_storage(&y)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("frozen layer: the output left the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.on_storage(Storage::Cuda(storage.try_clone(layout)?), layout)?;
        match output_storage(&y)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("frozen layer: the output left the device"),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dx = match self.kind {
            Kind::Linear => grad.matmul(&self.weight)?,
            Kind::Conv2d { padding, stride } => super::conv::conv2d_input_grad(
                grad,
                &self.weight,
                padding,
                stride,
                (arg.dim(2)?, arg.dim(3)?),
            )?,
        };
        Ok(Some(dx))
    }
}
