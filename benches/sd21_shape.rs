//! One iteration of each model operation at Stable Diffusion 2.1-base shapes, with seeded
//! random weights built from the real configs (shapes are all timing needs; nothing is
//! downloaded): `cargo bench --bench sd21_shape`. Prints wall time per operation and the peak
//! resident memory. On CPU this is one iteration each (it takes minutes on 2 cores), and the
//! backward pass is timed at 256 px because at 512 px it needs more than 24 GiB.

use std::rc::Rc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use mifo::model::clip::{ClipConfig, ClipTextModel};
use mifo::model::config::ConfigJson;
use mifo::model::unet::{UNet, UNetConfig};
use mifo::model::vae::{Vae, VaeConfig};
use mifo::model::weights::WeightFile;
use serde_json::json;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

fn time<T>(name: &str, f: impl FnOnce() -> mifo::Result<T>) -> T {
    let t = Instant::now();
    let out = f().expect(name);
    println!(
        "{name:<48} {:>10.2} s   peak RSS {:>8.0} MiB",
        t.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    out
}

fn main() -> mifo::Result<()> {
    let dev = Device::Cpu;
    // The configs of stabilityai/stable-diffusion-2-1-base (values from its config.json files).
    let unet_cfg = UNetConfig::from_json(&ConfigJson::from_value(
        "sd21-base/unet/config.json",
        json!({
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "layers_per_block": 2,
            "norm_num_groups": 32, "use_linear_projection": true, "sample_size": 64,
            "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": true, "freq_shift": 0
        }),
    )?)?;
    let clip_cfg = ClipConfig::from_json(&ConfigJson::from_value(
        "sd21-base/text_encoder/config.json",
        json!({"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 23, "num_attention_heads": 16, "max_position_embeddings": 77,
               "hidden_act": "gelu", "model_type": "clip_text_model"}),
    )?)?;
    let vae_cfg = VaeConfig::from_json(&ConfigJson::from_value(
        "sd21-base/vae/config.json",
        json!({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
               "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
               "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"], "scaling_factor": 0.18215}),
    )?)?;
    println!("SD 2.1-base shapes, random weights, CPU f32, one iteration each");
    let unet = time("build UNet (865M random weights)", || {
        UNet::load(
            unet_cfg.clone(),
            Rc::new(WeightFile::synthetic("unet", 1, DType::F32, &dev)),
            DType::F32,
            &dev,
        )
    });
    let clip = time("build text encoder", || {
        ClipTextModel::load(
            clip_cfg.clone(),
            Rc::new(WeightFile::synthetic("clip", 2, DType::F32, &dev)),
            &dev,
        )
    });
    let vae = time("build VAE", || {
        Vae::load(
            vae_cfg.clone(),
            Rc::new(WeightFile::synthetic("vae", 3, DType::F32, &dev)),
        )
    });
    let ids = Tensor::new(&[[49406u32; 77]], &dev)?;
    let ctx = time("text encoder forward (1x77)", || clip.forward(&ids, None));
    let latent = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &dev)?;
    let t = Tensor::new(&[500f32], &dev)?;
    time("UNet forward, no grad (1x4x64x64)", || {
        unet.forward(&latent, &t, &ctx)
    });
    // At 64x64 the backward pass keeps every full-resolution attention matrix and its softmax
    // intermediates alive: it needs more than the 24 GiB of a CI-class machine (measured: killed
    // by the OOM killer). On CPU it is timed at 32x32 (256 px) instead.
    let small = Tensor::randn(0f32, 1.0, (1, 4, 32, 32), &dev)?;
    time("UNet forward + backward to the latent (1x4x32x32)", || {
        let z = Var::from_tensor(&small)?;
        let eps = unet.forward(z.as_tensor(), &t, &ctx)?;
        eps.sqr()?.sum_all()?.backward()?;
        Ok(())
    });
    time("VAE decode (1x4x64x64 -> 512x512)", || vae.decode(&latent));
    Ok(())
}
