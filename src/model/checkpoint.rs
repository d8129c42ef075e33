//! Gradient checkpointing: units of a frozen model whose activations are not kept for the
//! backward pass but recomputed there.
//!
//! candle keeps every input of every recorded op alive until the backward pass has used it.
//! When learning trains only a few rows of the text embedding (phase A) the gradient still has
//! to cross the whole frozen UNet, so a forward pass keeps all of the UNet's activations: at
//! SD 2.1-base shapes and 512 px, gigabytes at the 64² level alone. A checkpointed unit runs
//! its forward outside the graph and enters the graph as one op whose inputs are the unit's
//! inputs; its backward runs the unit again, on the graph this time, and back-propagates the
//! incoming gradient through that copy (`torch.utils.checkpoint`'s recomputation). The pass
//! then holds only the units' inputs and outputs, plus one unit's activations at a time
//! during the backward, for about one more forward pass of those units' arithmetic.
//!
//! The recomputation gives gradients to the op's tensor inputs only, so a model checkpoints
//! only when none of its parameters is trained, and a unit only when no attention hook reads
//! it (see [`super::attention::AttentionHook::may_read`]). The units are small (a ResNet block;
//! in a transformer block the self-attention, the cross-attention and the feed-forward, each
//! with its norm and residual; a text-encoder layer), so the backward holds one unit's
//! activations at a time, and a level a hook reads still gets everything but the hooked
//! attention checkpointed. [`Checkpointing`] says which units: by default those whose input
//! holds at least [`LARGE_UNIT_VALUES`] values (every layer of Stable Diffusion at 256 px and
//! more but the 4² level's; none of the small world and test models) on the CPU, none on
//! CUDA until it has been measured there; `MIFO_CHECKPOINT=off` keeps every activation,
//! `large` or `all` (every unit) choose explicitly.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor, Var};

use crate::error::Result;

/// A unit's input size from which [`Checkpointing::Large`] checkpoints it: 32 Ki values
/// (Stable Diffusion's text states are 77 × 768 or 1024 per image; its smallest UNet level at
/// 256 px is 8² × 1280).
pub const LARGE_UNIT_VALUES: usize = 1 << 15;

/// Which units of a frozen model are recomputed in the backward pass instead of kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpointing {
    /// None: every activation is kept (fastest, most memory).
    Off,
    /// Units whose input holds at least [`LARGE_UNIT_VALUES`] values: the default.
    Large,
    /// Every unit (tests, and the tightest memory).
    All,
}

impl Checkpointing {
    /// `MIFO_CHECKPOINT` (`off`, `large` or `all`) for a model on `device`; unset (or
    /// anything else), `large` on the CPU and `off` on other devices, where the path has not
    /// been measured yet.
    pub fn from_env(device: &candle_core::Device) -> Self {
        match std::env::var("MIFO_CHECKPOINT").as_deref() {
            Ok("off") => Self::Off,
            Ok("all") => Self::All,
            Ok("large") => Self::Large,
            _ if device.is_cpu() => Self::Large,
            _ => Self::Off,
        }
    }

    /// Whether a unit whose input is `input` is checkpointed (when the model may be).
    pub fn covers(self, input: &Tensor) -> bool {
        match self {
            Self::Off => false,
            Self::Large => input.elem_count() >= LARGE_UNIT_VALUES,
            Self::All => true,
        }
    }

    /// The name `MIFO_CHECKPOINT` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Large => "large",
            Self::All => "all",
        }
    }
}

/// A model's checkpointing: the policy in force, held at [`Checkpointing::Off`] for a model
/// with trainable parameters, whose gradients the recomputation would not carry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ModelCheckpointing {
    trainable: bool,
    policy: Checkpointing,
}

impl ModelCheckpointing {
    /// For a model just loaded from `weights` on `device`: trainable when the file handed out
    /// any variable (the LoRA adapters included), else `MIFO_CHECKPOINT`'s policy.
    pub(crate) fn at_load(
        weights: &super::weights::WeightFile,
        device: &candle_core::Device,
    ) -> Self {
        let trainable = !weights.vars().is_empty();
        let mut m = Self {
            trainable,
            policy: Checkpointing::Off,
        };
        m.set(Checkpointing::from_env(device));
        m
    }

    /// Sets the policy (refused, left off, for a trainable model).
    pub(crate) fn set(&mut self, c: Checkpointing) {
        self.policy = if self.trainable {
            Checkpointing::Off
        } else {
            c
        };
    }

    /// The policy in force.
    pub(crate) fn policy(self) -> Checkpointing {
        self.policy
    }
}

/// Whether a forward pass should checkpoint at all: the model's policy when a graph is being
/// built through `inputs` (something upstream is trained) outside an inference scope.
pub(crate) fn policy_for(model: Checkpointing, inputs: &[&Tensor]) -> Checkpointing {
    if model == Checkpointing::Off
        || super::grad_mode::is_no_grad()
        || !inputs.iter().any(|t| t.track_op())
    {
        Checkpointing::Off
    } else {
        model
    }
}

/// The computation a checkpointed unit runs, on one to three inputs. It must be deterministic
/// and its parameters must take no gradient.
pub(crate) type Unit = dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync;

thread_local! {
    /// Units checkpointed by forward passes on this thread.
    static UNITS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many units forward passes on this thread have checkpointed so far (how tests and the
/// bench see that the path ran).
pub fn units_on_this_thread() -> usize {
    UNITS.with(|u| u.get())
}

/// `unit(inputs)` on the autograd graph as one op that keeps only the inputs (one to three)
/// and the output; the backward recomputes the unit (see the module docs).
///
/// The forward runs here, on the inputs detached (no copies); the op recorded afterwards only
/// hands that output over to candle, so its own forward reads none of its arguments.
pub(crate) fn checkpointed(unit: Arc<Unit>, inputs: &[&Tensor]) -> Result<Tensor> {
    let (Some(&first), true) = (inputs.first(), inputs.len() <= 3) else {
        return Err(crate::error::Error::Input(format!(
            "a checkpointed unit takes one to three inputs, not {}",
            inputs.len()
        )));
    };
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let output = unit(&detached)?;
    drop(detached);
    UNITS.with(|u| u.set(u.get() + 1));
    // Unused argument slots repeat the first input; the backward reads only `inputs.len()`.
    let arg = |i: usize| inputs.get(i).copied().unwrap_or(first);
    let op = Checkpointed {
        unit,
        inputs: inputs.len(),
        output: Mutex::new(Some(output)),
    };
    Ok(arg(0).apply_op3(arg(1), arg(2), op)?)
}

struct Checkpointed {
    unit: Arc<Unit>,
    /// How many of the op's three arguments the unit reads.
    inputs: usize,
    /// The forward's output, computed before the op was recorded; taken by the op's forward.
    output: Mutex<Option<Tensor>>,
}

impl Checkpointed {
    /// The precomputed output's storage (a copy, which candle takes over).
    fn take_output(&self) -> candle_core::Result<(Storage, Shape)> {
        let y = self
            .output
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpointed unit: poisoned output".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpointed unit: output taken".into()))?;
        super::frozen::output_storage(&y.contiguous()?)
    }
}

impl CustomOp3 for Checkpointed {
    fn name(&self) -> &'static str {
        "mifo-checkpointed-unit"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.take_output()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("checkpointed unit: the output left the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match self.take_output()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("checkpointed unit: the output left the device"),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Leaves for the inputs the outer graph wants a gradient for; the others as constants.
        let args = [a, b, c];
        let mut vars: [Option<Var>; 3] = [None, None, None];
        let mut inputs = Vec::with_capacity(self.inputs);
        for (i, t) in args.iter().take(self.inputs).enumerate() {
            if t.track_op() {
                let v = Var::from_tensor(&t.detach())?;
                inputs.push(v.as_tensor().clone());
                vars[i] = Some(v);
            } else {
                inputs.push(t.detach());
            }
        }
        if vars.iter().all(Option::is_none) {
            return Ok((None, None, None));
        }
        let y = (self.unit)(&inputs).map_err(candle_core::Error::wrap)?;
        drop(inputs);
        // d/dx Σ y ⊙ g = the incoming gradient carried back through the recomputed unit.
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        let [ga, gb, gc] = vars.map(|v| v.and_then(|v| grads.get(v.as_tensor()).cloned()));
        Ok((ga, gb, gc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap();
        let b = b.to_dtype(DType::F64).unwrap();
        let err = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = a.abs().unwrap().max_all().unwrap();
        err.to_scalar::<f64>().unwrap() / scale.to_scalar::<f64>().unwrap()
    }

    /// `softmax(a · bᵀ) · b + tanh(c)`: nonlinear in every input, with broadcast and reduction.
    fn toy(x: &[Tensor]) -> Result<Tensor> {
        let s = candle_nn::ops::softmax(&x[0].matmul(&x[1].t()?)?, D::Minus1)?;
        Ok(s.matmul(&x[1])?.broadcast_add(&x[2].tanh()?)?)
    }

    #[test]
    fn the_recomputed_backward_equals_the_kept_one_and_skips_constants() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f64, 1.0, (5, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, (4, 3), &dev).unwrap()).unwrap();
        let c = Tensor::randn(0f64, 1.0, (1, 3), &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, (5, 3), &dev).unwrap();
        let loss = |y: Tensor| (y.sqr().unwrap() * &w).unwrap().sum_all().unwrap();

        let inputs = [a.as_tensor().clone(), b.as_tensor().clone(), c.clone()];
        let kept = toy(&inputs).unwrap();
        let before = units_on_this_thread();
        let ck = checkpointed(Arc::new(toy), &[a.as_tensor(), b.as_tensor(), &c]).unwrap();
        assert_eq!(units_on_this_thread(), before + 1);
        assert!(ck.track_op());
        assert_eq!(rel(&kept, &ck), 0.0, "same forward");

        let g_kept = loss(kept).backward().unwrap();
        let g_ck = loss(ck).backward().unwrap();
        for v in [&a, &b] {
            let r = rel(
                g_kept.get(v.as_tensor()).unwrap(),
                g_ck.get(v.as_tensor()).unwrap(),
            );
            assert!(r < 1e-12, "relative gradient error {r}");
        }
        assert!(g_ck.get(&c).is_none(), "no gradient for a constant input");

        // One input: the unused slots are constants, not gradients.
        let one = checkpointed(Arc::new(|x: &[Tensor]| Ok(x[0].exp()?)), &[a.as_tensor()]).unwrap();
        let g = one.sum_all().unwrap().backward().unwrap();
        let expected = a.as_tensor().exp().unwrap();
        assert!(rel(&expected, g.get(a.as_tensor()).unwrap()) < 1e-15);
        assert!(checkpointed(Arc::new(toy), &[]).is_err());
    }

    #[test]
    fn the_policy_covers_units_by_size_and_only_when_a_graph_is_built() {
        let dev = Device::Cpu;
        let small = Tensor::zeros((1, 77, 64), DType::F32, &dev).unwrap();
        let large = Tensor::zeros((1, 77, 1024), DType::F32, &dev).unwrap();
        assert!(!Checkpointing::Large.covers(&small));
        assert!(Checkpointing::Large.covers(&large));
        assert!(Checkpointing::All.covers(&small));
        assert!(!Checkpointing::Off.covers(&large));
        let tracked = Var::zeros((1, 4), DType::F32, &dev).unwrap();
        assert_eq!(
            policy_for(Checkpointing::All, &[&small]),
            Checkpointing::Off,
            "nothing to differentiate"
        );
        assert_eq!(
            policy_for(Checkpointing::All, &[&small, tracked.as_tensor()]),
            Checkpointing::All
        );
        let _scope = super::super::grad_mode::no_grad();
        assert_eq!(
            policy_for(Checkpointing::All, &[tracked.as_tensor()]),
            Checkpointing::Off,
            "inference scope"
        );
    }

    /// The tiny SD 2.1 UNet and text encoder, frozen, with the gradient flowing to the
    /// placeholder rows (phase A) and a hook reading one level's cross-attention: checkpointing
    /// every unit gives the same output, the same recorded maps and the same gradient as
    /// keeping every activation.
    #[test]
    fn frozen_models_checkpoint_every_unhooked_unit_with_the_same_gradients() {
        use crate::model::hooks::ColumnRecorder;
        use crate::model::weights::LoraConfig;
        use crate::model::{ClipTextModel, StableDiffusion, UNet};
        use std::rc::Rc;

        let dev = Device::Cpu;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd21");
        let sd = StableDiffusion::load(&root, DType::F32, &dev).unwrap();
        let c = sd.unet.config().clone();
        let load = |policy: Checkpointing| {
            let mut unet = UNet::load(
                c.clone(),
                Rc::new(sd.unet_weights.derive()),
                DType::F32,
                &dev,
            )
            .unwrap();
            let mut te = ClipTextModel::load(
                sd.text_encoder.config().clone(),
                Rc::new(sd.text_encoder_weights.derive()),
                &dev,
            )
            .unwrap();
            unet.set_checkpointing(policy);
            te.set_checkpointing(policy);
            (unet, te)
        };

        let side = c.sample_size;
        let x = Tensor::randn(0f32, 1.0, (1, c.in_channels, side, side), &dev).unwrap();
        let t = Tensor::new(&[400f32], &dev).unwrap();
        let hidden = sd.text_encoder.config().hidden_size;
        let rows0 = Tensor::randn(0f32, 0.02, (2, hidden), &dev).unwrap();
        let vocab = sd.text_encoder.config().vocab_size as u32;
        let mut ids = sd.tokenizer.encode("a photo of a cat and a dog").unwrap();
        ids[4] = vocab;
        ids[7] = vocab + 1;
        let ids = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
        let w = Tensor::randn(0f32, 1.0, x.shape(), &dev).unwrap();
        let hooked = vec!["up_blocks.1".to_string()];
        let run = |(unet, te): &(UNet, ClipTextModel)| {
            let rows = Var::from_tensor(&rows0).unwrap();
            let before = units_on_this_thread();
            let context = te.forward(&ids, Some(rows.as_tensor())).unwrap();
            let mut rec = ColumnRecorder::new(&hooked, &[4, 7]);
            let eps = unet
                .forward_hooked(&x, &t, &context, Some(&mut rec))
                .unwrap();
            let units = units_on_this_thread() - before;
            let layer = rec.layers()[0].clone();
            let map = rec.map(&layer, 1).unwrap();
            let loss = ((&eps * &w).unwrap().sum_all().unwrap()
                + (map.sqr().unwrap().sum_all().unwrap() * 10.0).unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(rows.as_tensor()).unwrap().clone();
            (eps, rec.layers().len(), map, g, units)
        };
        let (eps_k, n_k, map_k, g_k, units_k) = run(&load(Checkpointing::Off));
        let (eps_c, n_c, map_c, g_c, units_c) = run(&load(Checkpointing::All));
        assert_eq!(units_k, 0);
        // Text encoder: one unit per layer. UNet: a unit per ResNet block (8 down, 2 mid,
        // 12 up), per transformer's input and output (6 down, 1 mid, 9 up) and per transformer
        // block part (3 each), less the cross-attention of up_blocks.1's 3 blocks, which the
        // hook reads.
        let te_layers = sd.text_encoder.config().num_layers;
        let transformers = 6 + 1 + 9;
        assert_eq!(units_c, te_layers + 22 + transformers * 5 - 3);
        assert_eq!((n_k, n_c), (3, 3), "the hooked level is still recorded");
        assert!(rel(&eps_k, &eps_c) < 1e-5, "output {}", rel(&eps_k, &eps_c));
        assert!(rel(&map_k, &map_c) < 1e-5, "map {}", rel(&map_k, &map_c));
        assert!(rel(&g_k, &g_c) < 1e-5, "gradient {}", rel(&g_k, &g_c));

        // Trainable adapters: the recomputation would lose their gradients, so it stays off.
        let mut lw = sd.unet_weights.derive();
        lw.set_lora(Some(LoraConfig { rank: 2, seed: 1 }));
        let mut lora = UNet::load(c.clone(), Rc::new(lw), DType::F32, &dev).unwrap();
        lora.set_checkpointing(Checkpointing::All);
        assert_eq!(lora.checkpointing(), Checkpointing::Off);
    }
}
