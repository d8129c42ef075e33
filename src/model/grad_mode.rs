//! Inference scopes: forward passes that build no autograd graph even over trained weights.
//!
//! candle records an op on the graph whenever one of its inputs is a variable, and keeps every
//! input of every recorded op alive while the output lives. A forward pass over trainable
//! weights (a learning run's preview and final attention maps, drawn with phase B's LoRA
//! adapters or fully trained copies) therefore holds all of its activations until its output is
//! dropped: at SD sizes that is the whole UNet's activations of a CFG batch, gigabytes that no
//! backward pass will ever read. Inside [`no_grad`] the model's layers read their parameters
//! through [`param`], which hands out detached views (same storage, no copy), so nothing of the
//! pass is recorded — the role `torch.no_grad()` plays in PyTorch.

use std::cell::Cell;
use std::marker::PhantomData;

use candle_core::Tensor;

thread_local! {
    /// How many [`NoGrad`] guards are alive on this thread.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// While alive, the model's layers on this thread record no gradients (see the module docs).
/// Guards nest; not `Send`, since the scope belongs to the thread that opened it.
#[must_use = "the scope ends when the guard is dropped"]
pub struct NoGrad {
    _not_send: PhantomData<*const ()>,
}

/// Opens an inference scope on this thread (see [`NoGrad`]).
pub fn no_grad() -> NoGrad {
    DEPTH.with(|d| d.set(d.get() + 1));
    NoGrad {
        _not_send: PhantomData,
    }
}

impl Drop for NoGrad {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Whether an inference scope is open on this thread.
pub fn is_no_grad() -> bool {
    DEPTH.with(|d| d.get() > 0)
}

/// A layer's parameter as the forward pass should use it: detached inside [`no_grad`] when
/// autograd would track it, otherwise the tensor itself.
pub(crate) fn param(t: &Tensor) -> Tensor {
    if t.track_op() && is_no_grad() {
        t.detach()
    } else {
        t.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn parameters_are_detached_only_inside_the_scope_and_scopes_nest() {
        let v = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert!(param(v.as_tensor()).track_op());
        {
            let _outer = no_grad();
            {
                let _inner = no_grad();
                assert!(!param(v.as_tensor()).track_op());
            }
            // The outer scope is still open after the inner one closes.
            assert!(is_no_grad());
            let p = param(v.as_tensor());
            assert!(!p.track_op());
            assert_eq!(p.to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        }
        assert!(!is_no_grad());
        assert!(param(v.as_tensor()).track_op());
    }

    /// The UNet and text encoder over phase B's trainable weights (LoRA adapters, or fully
    /// trainable copies) record their forward pass outside the scope and nothing inside it,
    /// with the same values.
    #[test]
    fn trained_models_run_inside_the_scope_without_a_graph() {
        use crate::model::weights::LoraConfig;
        use crate::model::{ClipTextModel, StableDiffusion, UNet};
        use candle_core::DType;
        use std::rc::Rc;

        let dev = Device::Cpu;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd21");
        let sd = StableDiffusion::load(&root, DType::F32, &dev).unwrap();
        let c = sd.unet.config();
        let side = c.sample_size;
        let x = Tensor::randn(0f32, 1.0, (1, c.in_channels, side, side), &dev).unwrap();
        let t = Tensor::new(&[500f32], &dev).unwrap();
        let ids = Tensor::new(sd.tokenizer.encode("a photo of a cat").unwrap(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        for lora in [Some(LoraConfig { rank: 2, seed: 3 }), None] {
            let mut uw = sd.unet_weights.derive();
            let mut tw = sd.text_encoder_weights.derive();
            for w in [&mut uw, &mut tw] {
                w.set_trainable(lora.is_none());
                w.set_lora(lora.clone());
            }
            let unet = UNet::load(c.clone(), Rc::new(uw), DType::F32, &dev).unwrap();
            let te =
                ClipTextModel::load(sd.text_encoder.config().clone(), Rc::new(tw), &dev).unwrap();
            let ctx = te.forward(&ids, None).unwrap();
            let y = unet.forward_cond(&x, &t, &ctx, None, None).unwrap();
            assert!(
                ctx.track_op() && y.track_op(),
                "trainable weights are tracked"
            );
            let _scope = no_grad();
            let ctx_ng = te.forward(&ids, None).unwrap();
            let y_ng = unet.forward_cond(&x, &t, &ctx_ng, None, None).unwrap();
            assert!(!ctx_ng.track_op(), "text encoder, lora {lora:?}");
            assert!(!y_ng.track_op(), "unet, lora {lora:?}");
            let diff = (y - y_ng).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }
}
