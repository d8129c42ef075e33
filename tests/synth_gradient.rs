//! The box loss of the latent optimisation is differentiable end to end: its gradient with
//! respect to the latent (through the masked attention of the whole UNet) matches central
//! finite differences in f64 on the tiny model.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use mifo::model::ddim::timesteps_tensor;
use mifo::model::StableDiffusion;
use mifo::synth::control::{plan_tokens, ControlHook, Pass};
use mifo::synth::{initial_latent, parse_box, SynthConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

#[test]
fn box_loss_gradient_matches_finite_differences() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd21");
    let dev = Device::Cpu;
    let mut sd = StableDiffusion::load(&dir, DType::F64, &dev).unwrap();
    let mut tok = sd.tokenizer.clone();
    tok.add_tokens(&["<v0>".to_string(), "<v1>".to_string()])
        .unwrap();
    sd.tokenizer = tok;
    let prompt = "a photo of <v0> and <v1> on the beach";
    let boxes = vec![
        parse_box("<v0>=0,0.5,0.5,1").unwrap(),
        parse_box("<v1>=0.5,0.25,1,1").unwrap(),
    ];
    let subjects: Vec<String> = boxes.iter().map(|b| b.subject.clone()).collect();
    let plan = plan_tokens(&sd.tokenizer, prompt, &subjects).unwrap();
    let rows = Tensor::randn(0f64, 0.02, (2, 32), &dev).unwrap();
    let ids = Tensor::new(plan.ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let cond = sd.text_encoder.forward(&ids, Some(&rows)).unwrap();
    let cfg = SynthConfig::default();
    let t = timesteps_tensor(&[700], &dev).unwrap();
    let alpha = cfg.alpha_pair(1, 10);

    let mut hook = ControlHook::new(&cfg, &plan, &boxes, &dev, DType::F64);
    let mut loss_at = |z: &Tensor| -> Tensor {
        hook.begin(Pass::Guidance);
        sd.unet
            .forward_hooked(z, &t, &cond, Some(&mut hook))
            .unwrap();
        assert!(hook.has_loss_terms());
        hook.loss(alpha).unwrap()
    };

    let z = initial_latent(&sd, 4).unwrap();
    assert_eq!(z.dtype(), DType::F64);
    let var = Var::from_tensor(&z).unwrap();
    let loss = loss_at(var.as_tensor());
    let l0 = loss.to_scalar::<f64>().unwrap();
    assert!(l0 > 0.0, "loss {l0}");
    let grads = loss.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("gradient reaches the latent");
    let g_norm = g
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(g_norm > 0.0);

    let mut rng = StdRng::seed_from_u64(1);
    for trial in 0..3 {
        let d: Vec<f64> = (0..z.elem_count())
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let d = Tensor::from_vec(d, z.shape(), &dev).unwrap();
        let analytic = (g * &d)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let eps = 1e-5;
        let plus = loss_at(&(&z + (&d * eps).unwrap()).unwrap())
            .to_scalar::<f64>()
            .unwrap();
        let minus = loss_at(&(&z - (&d * eps).unwrap()).unwrap())
            .to_scalar::<f64>()
            .unwrap();
        let numeric = (plus - minus) / (2.0 * eps);
        let rel = (analytic - numeric).abs() / numeric.abs().max(1e-12);
        println!("trial {trial}: loss {l0:.6}, directional derivative analytic {analytic:.8e}, numeric {numeric:.8e}, rel {rel:.2e}");
        assert!(rel < 1e-4, "analytic {analytic} vs numeric {numeric}");
    }
}
