//! Model timings on the bundled tiny pipeline: `cargo bench --bench model`.
//!
//! Prints the median (and min) of repeated runs for the UNet forward without gradients, the
//! UNet forward + backward to the latent and to the placeholder rows (through the text
//! encoder), a hooked forward recording the learning-stage attention maps, the text encoder and
//! the VAE. Set `MIFO_BENCH_MODEL=DIR` to time another diffusers folder and
//! `MIFO_BENCH_ITERS=N` for the repeat count.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use mifo::model::attention::{AttentionHook, AttnCall, AttnKind};
use mifo::model::StableDiffusion;

struct RecordCross {
    maps: Vec<Tensor>,
}

impl AttentionHook for RecordCross {
    fn wants(&mut self, call: &AttnCall) -> bool {
        call.kind == AttnKind::CrossAttn && call.path.starts_with("up_blocks")
    }
    fn probs(&mut self, _call: &AttnCall, probs: &Tensor) -> mifo::Result<()> {
        self.maps.push(probs.mean(1)?);
        Ok(())
    }
}

fn time<F: FnMut() -> mifo::Result<()>>(name: &str, iters: usize, mut f: F) {
    f().expect(name); // warm-up
    let mut ms: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f().expect(name);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    println!("{name:<44} {:>10.2} {:>10.2}", ms[ms.len() / 2], ms[0]);
}

fn main() -> mifo::Result<()> {
    let dir = std::env::var("MIFO_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd21"));
    let iters: usize = std::env::var("MIFO_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dev = Device::Cpu;
    let sd = StableDiffusion::load(&dir, DType::F32, &dev)?;
    let mut tok = sd.tokenizer.clone();
    tok.add_tokens(&["<v0>".to_string(), "<v1>".to_string()])?;
    let ids = tok.encode("a photo of <v0> and <v1>")?;
    let ids = Tensor::new(ids, &dev)?.unsqueeze(0)?;
    let hidden = sd.text_encoder.config().hidden_size;
    let rows0 = Tensor::randn(0f32, 0.5, (2, hidden), &dev)?;
    let uc = sd.unet.config();
    let f = sd.vae.config().factor();
    let (lh, lw) = (128 / f, 128 / f);
    let latent = Tensor::randn(0f32, 1.0, (1, uc.in_channels, lh, lw), &dev)?;
    let t = Tensor::new(&[500f32], &dev)?;
    let ctx = sd.text_encoder.forward(&ids, Some(&rows0))?;
    let image = Tensor::randn(0f32, 0.5, (1, 3, lh * f, lw * f), &dev)?;

    println!("model: {} (CPU, f32, {iters} runs)", dir.display());
    println!("{:<44} {:>10} {:>10}", "operation", "median ms", "min ms");
    time("text encoder forward (1x77)", iters, || {
        sd.text_encoder.forward(&ids, Some(&rows0)).map(|_| ())
    });
    time("unet forward, no grad (batch 1)", iters, || {
        sd.unet.forward(&latent, &t, &ctx).map(|_| ())
    });
    let latent2 = Tensor::cat(&[&latent, &latent], 0)?;
    let ctx2 = Tensor::cat(&[&ctx, &ctx], 0)?;
    time("unet forward, no grad (batch 2, CFG)", iters, || {
        sd.unet.forward(&latent2, &t, &ctx2).map(|_| ())
    });
    time("unet forward+backward to latent", iters, || {
        let z = Var::from_tensor(&latent)?;
        let eps = sd.unet.forward(z.as_tensor(), &t, &ctx)?;
        eps.sqr()?.sum_all()?.backward()?;
        Ok(())
    });
    time("text enc + unet fwd+bwd to placeholder rows", iters, || {
        let rows = Var::from_tensor(&rows0)?;
        let c = sd.text_encoder.forward(&ids, Some(rows.as_tensor()))?;
        let eps = sd.unet.forward(&latent, &t, &c)?;
        eps.sqr()?.sum_all()?.backward()?;
        Ok(())
    });
    time("  same, with up-block attention maps hooked", iters, || {
        let rows = Var::from_tensor(&rows0)?;
        let c = sd.text_encoder.forward(&ids, Some(rows.as_tensor()))?;
        let mut hook = RecordCross { maps: Vec::new() };
        let eps = sd.unet.forward_hooked(&latent, &t, &c, Some(&mut hook))?;
        let mut loss = eps.sqr()?.sum_all()?;
        for m in &hook.maps {
            loss = (loss + m.sqr()?.sum_all()?)?;
        }
        loss.backward()?;
        Ok(())
    });
    time("vae encode (mean)", iters, || {
        sd.vae.encode(&image).map(|_| ())
    });
    time("vae decode", iters, || sd.vae.decode(&latent).map(|_| ()));
    Ok(())
}
