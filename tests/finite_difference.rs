//! Gradients of the UNet and the text encoder against central finite differences in f64, on a
//! tiny configuration built in code (conv projections, quick-GELU, 2 levels: variants the
//! bundled fixture does not cover). This is what proves the model layer never uses an op whose
//! backward is missing or wrong (candle's fused softmax / layer norm drop gradients silently).

use std::rc::Rc;

use candle_core::{DType, Device, Tensor, Var};
use mifo::model::attention::{AttentionHook, AttnCall, AttnKind};
use mifo::model::clip::{ClipConfig, ClipTextModel};
use mifo::model::config::ConfigJson;
use mifo::model::unet::{UNet, UNetConfig};
use mifo::model::weights::WeightFile;
use serde_json::json;

fn tiny_unet(weights: Rc<WeightFile>) -> UNet {
    let cfg = json!({
        "block_out_channels": [8, 16],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": [2, 2],
        "cross_attention_dim": 8,
        "norm_num_groups": 4,
        "use_linear_projection": false,
        "in_channels": 4, "out_channels": 4,
        "flip_sin_to_cos": true, "freq_shift": 0
    });
    let cfg =
        UNetConfig::from_json(&ConfigJson::from_value("tiny-unet.json", cfg).unwrap()).unwrap();
    UNet::load(cfg, weights, DType::F64, &Device::Cpu).unwrap()
}

fn tiny_clip(weights: Rc<WeightFile>) -> ClipTextModel {
    let cfg = json!({
        "vocab_size": 40, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 6,
        "hidden_act": "quick_gelu", "model_type": "clip_text_model"
    });
    let cfg =
        ClipConfig::from_json(&ConfigJson::from_value("tiny-clip.json", cfg).unwrap()).unwrap();
    ClipTextModel::load(cfg, weights, &Device::Cpu).unwrap()
}

/// Squares the head-mean cross-attention probability of key 2 in every cross-attention layer
/// (an attention-map loss, like MIFO's), and adds a logit bias to the self-attention layers
/// (like box control), so both hook paths are on the gradient path.
struct MapLoss {
    total: Option<Tensor>,
}

impl AttentionHook for MapLoss {
    fn logit_bias(&mut self, call: &AttnCall) -> mifo::Result<Option<Tensor>> {
        if call.kind == AttnKind::SelfAttn {
            let n = call.height * call.width;
            let bias: Vec<f64> = (0..n * n)
                .map(|i| if i % 3 == 0 { -2.0 } else { 0.0 })
                .collect();
            return Ok(Some(Tensor::from_vec(bias, (n, n), &Device::Cpu)?));
        }
        Ok(None)
    }

    fn probs(&mut self, call: &AttnCall, probs: &Tensor) -> mifo::Result<()> {
        if call.kind == AttnKind::CrossAttn {
            let term = probs.mean(1)?.narrow(2, 2, 1)?.sqr()?.sum_all()?;
            self.total = Some(match self.total.take() {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        Ok(())
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let d = rand_distr::StandardNormal;
    let v: Vec<f64> = (0..n).map(|_| d.sample(&mut rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The scalar whose gradient is checked: UNet output weighted by fixed W, plus the map loss.
fn objective(unet: &UNet, latent: &Tensor, context: &Tensor, w: &Tensor) -> Tensor {
    let t = Tensor::new(&[321f64, 17.0], &Device::Cpu).unwrap();
    let mut hook = MapLoss { total: None };
    let eps = unet
        .forward_hooked(latent, &t, context, Some(&mut hook))
        .unwrap();
    let s = (eps * w).unwrap().sum_all().unwrap();
    (s + hook.total.unwrap()).unwrap()
}

/// Central differences on `n` elements of `var`, compared with `analytic`.
fn check_var(name: &str, var: &Var, analytic: &Tensor, f: &dyn Fn() -> f64, n: usize) {
    let base = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let grad = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let shape = var.as_tensor().shape().clone();
    let h = 1e-5;
    let stride = (base.len() / n).max(1);
    let mut worst = 0f64;
    let scale = grad.iter().fold(0f64, |m, g| m.max(g.abs())).max(1e-12);
    for k in 0..n.min(base.len()) {
        let i = (k * stride + k * 7) % base.len();
        let mut plus = base.clone();
        plus[i] += h;
        var.set(&Tensor::from_vec(plus, shape.clone(), &Device::Cpu).unwrap())
            .unwrap();
        let fp = f();
        let mut minus = base.clone();
        minus[i] -= h;
        var.set(&Tensor::from_vec(minus, shape.clone(), &Device::Cpu).unwrap())
            .unwrap();
        let fm = f();
        let numeric = (fp - fm) / (2.0 * h);
        worst = worst.max((numeric - grad[i]).abs() / scale);
    }
    var.set(&Tensor::from_vec(base, shape, &Device::Cpu).unwrap())
        .unwrap();
    assert!(
        worst < 1e-6,
        "{name}: finite-difference mismatch {worst:.3e} (relative to max |grad| {scale:.3e})"
    );
    assert!(scale > 1e-10, "{name}: gradient is all zeros");
}

#[test]
fn unet_gradients_match_finite_differences() {
    let mut file = WeightFile::synthetic("tiny-unet", 7, DType::F64, &Device::Cpu);
    file.set_trainable(true);
    let file = Rc::new(file);
    let unet = tiny_unet(file.clone());
    let latent = Var::from_tensor(&randn(&[2, 4, 8, 8], 1)).unwrap();
    let context = Var::from_tensor(&randn(&[2, 5, 8], 2)).unwrap();
    let w = randn(&[2, 4, 8, 8], 3);
    let value = objective(&unet, latent.as_tensor(), context.as_tensor(), &w);
    let grads = value.backward().unwrap();

    let vars = file.vars();
    let missing: Vec<&str> = vars
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(missing.is_empty(), "weights without gradient: {missing:?}");

    let f = || {
        objective(&unet, latent.as_tensor(), context.as_tensor(), &w)
            .to_scalar::<f64>()
            .unwrap()
    };
    check_var(
        "latent",
        &latent,
        grads.get(latent.as_tensor()).unwrap(),
        &f,
        8,
    );
    check_var(
        "context",
        &context,
        grads.get(context.as_tensor()).unwrap(),
        &f,
        8,
    );
    // The weights whose gradients candle's stock SD code loses: attention q/k and norms.
    for wanted in [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "up_blocks.1.attentions.0.transformer_blocks.0.norm1.weight",
        "mid_block.attentions.0.transformer_blocks.0.norm2.bias",
        "up_blocks.1.attentions.0.proj_in.weight",
        "time_embedding.linear_1.weight",
        // Group norms (mifo's fused op): a resnet's and a transformer's.
        "down_blocks.0.resnets.0.norm1.weight",
        "up_blocks.1.attentions.0.norm.bias",
    ] {
        let (_, var) = vars
            .iter()
            .find(|(n, _)| n == wanted)
            .unwrap_or_else(|| panic!("no var {wanted}"));
        check_var(wanted, var, grads.get(var.as_tensor()).unwrap(), &f, 4);
    }
}

/// Frozen weights (phase A, latent optimisation) take the input-only backward of
/// `mifo::model::frozen`; with LoRA on the frozen base only the adapters are variables.
#[test]
fn frozen_unet_gradients_match_finite_differences() {
    for lora in [false, true] {
        let mut file = WeightFile::synthetic("tiny-unet", 7, DType::F64, &Device::Cpu);
        if lora {
            file.set_lora(Some(mifo::model::weights::LoraConfig { rank: 2, seed: 3 }));
        }
        let file = Rc::new(file);
        let unet = tiny_unet(file.clone());
        let latent = Var::from_tensor(&randn(&[2, 4, 8, 8], 1)).unwrap();
        let context = Var::from_tensor(&randn(&[2, 5, 8], 2)).unwrap();
        let w = randn(&[2, 4, 8, 8], 3);
        // Non-zero up-projections, so that the adapters change the output.
        for (name, var) in file.vars() {
            if name.ends_with("lora_B.weight") {
                let dims = var.as_tensor().dims().to_vec();
                var.set(&(randn(&dims, 11) * 0.1).unwrap()).unwrap();
            }
        }
        let value = objective(&unet, latent.as_tensor(), context.as_tensor(), &w);
        let grads = value.backward().unwrap();
        let f = || {
            objective(&unet, latent.as_tensor(), context.as_tensor(), &w)
                .to_scalar::<f64>()
                .unwrap()
        };
        let tag = if lora { " (lora)" } else { "" };
        let g = grads.get(latent.as_tensor()).unwrap();
        check_var(&format!("latent{tag}"), &latent, g, &f, 8);
        let g = grads.get(context.as_tensor()).unwrap();
        check_var(&format!("context{tag}"), &context, g, &f, 8);
        let vars = file.vars();
        assert_eq!(vars.is_empty(), !lora, "only LoRA adapters are variables");
        for (name, var) in vars.iter().filter(|(n, _)| n.contains("attn2.to_k")) {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            check_var(name, var, g, &f, 4);
        }
    }
}

/// A cross-attention map loss that reads only the cross-attention calls (`all: false`, so the
/// self-attention calls take the blocked path of `mifo::model::blocked_attention`) or declares
/// it reads every call (`all: true`: every call computes its full probabilities).
struct CrossLoss {
    all: bool,
    total: Option<Tensor>,
}

impl AttentionHook for CrossLoss {
    fn wants(&mut self, call: &AttnCall) -> bool {
        self.all || call.kind == AttnKind::CrossAttn
    }

    fn probs(&mut self, call: &AttnCall, probs: &Tensor) -> mifo::Result<()> {
        if call.kind == AttnKind::CrossAttn {
            let term = probs.mean(1)?.narrow(2, 2, 1)?.sqr()?.sum_all()?;
            self.total = Some(match self.total.take() {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        Ok(())
    }
}

fn cross_objective(
    unet: &UNet,
    latent: &Tensor,
    context: &Tensor,
    w: &Tensor,
    all: bool,
) -> Tensor {
    let t = Tensor::new(&[321f64, 17.0], &Device::Cpu).unwrap();
    let mut hook = CrossLoss { all, total: None };
    let eps = unet
        .forward_hooked(latent, &t, context, Some(&mut hook))
        .unwrap();
    let s = (eps * w).unwrap().sum_all().unwrap();
    (s + hook.total.unwrap()).unwrap()
}

/// The UNet with its unhooked (self-attention) calls on the blocked path: the same value and
/// gradients as with every call on the full path, and gradients that match finite differences.
#[test]
fn blocked_attention_in_the_unet_matches_the_full_path() {
    let file = Rc::new(WeightFile::synthetic(
        "tiny-unet",
        7,
        DType::F64,
        &Device::Cpu,
    ));
    let unet = tiny_unet(file);
    let latent = Var::from_tensor(&randn(&[2, 4, 8, 8], 1)).unwrap();
    let context = Var::from_tensor(&randn(&[2, 5, 8], 2)).unwrap();
    let w = randn(&[2, 4, 8, 8], 3);
    let eval = |all: bool| {
        let before = mifo::model::blocked_attention::calls();
        let value = cross_objective(&unet, latent.as_tensor(), context.as_tensor(), &w, all);
        let blocked = mifo::model::blocked_attention::calls() - before;
        let grads = value.backward().unwrap();
        let g = [latent.as_tensor(), context.as_tensor()].map(|t| {
            grads
                .get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        });
        (value.to_scalar::<f64>().unwrap(), g, blocked)
    };
    let (v_full, g_full, _) = eval(true);
    let (v_blk, g_blk, blocked) = eval(false);
    // Other tests of this binary may run blocked calls at the same time: at least ours.
    assert!(
        blocked >= 3,
        "the self-attention calls took the blocked path ({blocked})"
    );
    assert!(
        (v_full - v_blk).abs() <= 1e-12 * v_full.abs().max(1.0),
        "{v_full} vs {v_blk}"
    );
    for (name, (a, b)) in ["latent", "context"].iter().zip(g_blk.iter().zip(&g_full)) {
        let top = b.iter().fold(0f64, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= 1e-10 * top,
            "{name}: blocked vs full {worst:.2e} (max {top:.2e})"
        );
    }
    let f = || {
        cross_objective(&unet, latent.as_tensor(), context.as_tensor(), &w, false)
            .to_scalar::<f64>()
            .unwrap()
    };
    let value = cross_objective(&unet, latent.as_tensor(), context.as_tensor(), &w, false);
    let grads = value.backward().unwrap();
    check_var(
        "latent",
        &latent,
        grads.get(latent.as_tensor()).unwrap(),
        &f,
        8,
    );
    check_var(
        "context",
        &context,
        grads.get(context.as_tensor()).unwrap(),
        &f,
        8,
    );
}

#[test]
fn text_encoder_gradients_match_finite_differences() {
    let mut file = WeightFile::synthetic("tiny-clip", 11, DType::F64, &Device::Cpu);
    file.set_trainable(true);
    let file = Rc::new(file);
    let clip = tiny_clip(file.clone());
    // Two placeholder rows: ids 40 and 41.
    let rows = Var::from_tensor(&randn(&[2, 8], 5)).unwrap();
    let ids = Tensor::new(
        &[[38u32, 3, 40, 7, 41, 39], [38, 41, 39, 0, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let w = randn(&[2, 6, 8], 6);
    let eval = || {
        let h = clip.forward(&ids, Some(rows.as_tensor())).unwrap();
        (h * &w).unwrap().sum_all().unwrap()
    };
    let value = eval();
    let grads = value.backward().unwrap();
    let missing: Vec<String> = file
        .vars()
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
        .map(|(n, _)| n.clone())
        .collect();
    // The frozen table is handed out as a Var too here; it must get gradient only through the
    // base ids, which it does. Every weight must be on the graph.
    assert!(missing.is_empty(), "weights without gradient: {missing:?}");
    let f = || eval().to_scalar::<f64>().unwrap();
    check_var(
        "placeholder rows",
        &rows,
        grads.get(rows.as_tensor()).unwrap(),
        &f,
        8,
    );
    let vars = file.vars();
    for wanted in [
        "encoder.layers.0.layer_norm1.weight",
        "encoder.layers.1.self_attn.k_proj.weight",
        "final_layer_norm.bias",
    ] {
        if let Some((_, var)) = vars.iter().find(|(n, _)| n.ends_with(wanted)) {
            check_var(wanted, var, grads.get(var.as_tensor()).unwrap(), &f, 4);
        } else {
            panic!("no var {wanted}");
        }
    }
}
