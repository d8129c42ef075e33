//! SDXL: parity with diffusers on the bundled tiny SDXL pipeline (`fixtures/tiny-sdxl`, made by
//! diffusers with seeded random weights), the checks that catch a broken model, and the
//! refusals of inconsistent SDXL folders.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use mifo::model::config::ConfigJson;
use mifo::model::unet::UNetConfig;
use mifo::model::StableDiffusion;
use mifo::verify;
use serde_json::json;

mod cli_support;
use cli_support::copy_dir;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sdxl")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mifo-sdxl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    copy_dir(&fixture(), &d);
    d
}

fn failed(checks: &[verify::Check]) -> Vec<String> {
    checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{} rel {:.3e} {:?}", c.name, c.max_rel, c.note))
        .collect()
}

/// Every tensor of the SDXL reference that mifo can compute matches diffusers / transformers:
/// both tokenizers, both encoders, the pooled projection, the concatenated states, the UNet with
/// the added conditioning, its attention maps, the VAE, the gradients to both encoders'
/// placeholder rows and to the latent, and 5 guided DDIM steps with zeros for the empty negative
/// prompt.
#[test]
fn tiny_sdxl_matches_diffusers() {
    let dir = fixture();
    let checks = verify::verify(&dir, &dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let bad = failed(&checks);
    assert!(bad.is_empty(), "tensors differ from diffusers: {bad:#?}");
    let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
    for must in [
        "tokens.prompt_input_ids",
        "tokens.prompt_input_ids_2",
        "text.penultimate_hidden_state",
        "text_2.penultimate_hidden_state",
        "text_2.text_embeds",
        "text.prompt_embeds",
        "unet.time_ids",
        "unet.eps",
        "attn_probs.up_blocks.0.attentions.0.transformer_blocks.1.attn2",
        "attn_probs.up_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "vae.encoder_mean",
        "vae.decoder_output",
        "grad_a.token_embedding_rows",
        "grad_a.token_embedding_rows_2",
        "grad_b.token_embedding_rows",
        "grad_b.token_embedding_rows_2",
        "grad_c2.latent",
        "e2e.step_latents",
        "e2e.image",
    ] {
        assert!(names.contains(&must), "{must} was not checked");
    }
    assert!(checks.len() >= 59, "only {} tensors checked", checks.len());
}

/// A 1% change to the second encoder's `text_projection` must fail the pooled embedding and
/// everything downstream of it, while the first encoder still passes: the check is not vacuous.
#[test]
fn a_perturbed_text_projection_is_caught() {
    let dir = scratch("proj");
    let file = dir.join("text_encoder_2/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let t = tensors.get("text_projection.weight").unwrap();
    tensors.insert("text_projection.weight".into(), (t * 1.01).unwrap());
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let checks =
        verify::verify(&dir, &fixture().join("reference.safetensors"), &Device::Cpu).unwrap();
    let bad = failed(&checks);
    for must_fail in ["text_2.text_embeds", "e2e.step_latents"] {
        assert!(
            bad.iter().any(|f| f.starts_with(&format!("{must_fail} "))),
            "{must_fail} not caught: {bad:?}"
        );
    }
    assert!(!bad
        .iter()
        .any(|f| f.starts_with("text.penultimate_hidden_state ")));
    assert!(!bad.iter().any(|f| f.starts_with("unet.eps ")));
    let _ = std::fs::remove_dir_all(dir);
}

/// `mifo model verify` finds `reference.safetensors` in the folder and prints one line per
/// tensor.
#[test]
fn model_verify_cli_passes_on_tiny_sdxl() {
    let out = Command::new(env!("CARGO_BIN_EXE_mifo"))
        .args(["model", "verify", fixture().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAIL"));
    assert!(stdout.lines().filter(|l| l.ends_with(" ok")).count() >= 59);
}

fn load_err(dir: &Path) -> String {
    match StableDiffusion::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// SDXL folders whose parts do not fit together are refused in one line naming what is wrong.
#[test]
fn inconsistent_sdxl_folders_are_refused() {
    // No second encoder: the UNet's added conditioning has nothing to read.
    let d = scratch("no-te2");
    std::fs::remove_dir_all(d.join("text_encoder_2")).unwrap();
    std::fs::remove_dir_all(d.join("tokenizer_2")).unwrap();
    let index = d.join("model_index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["text_encoder_2"] = json!([null, null]);
    v["tokenizer_2"] = json!([null, null]);
    std::fs::write(&index, v.to_string()).unwrap();
    let e = load_err(&d);
    assert!(e.contains("text_encoder_2"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    let _ = std::fs::remove_dir_all(&d);

    // A cross-attention width that is not the two encoders' widths together.
    let d = scratch("width");
    let p = d.join("unet/config.json");
    let cfg = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        cfg.replace("\"cross_attention_dim\": 80", "\"cross_attention_dim\": 48"),
    )
    .unwrap();
    let e = load_err(&d);
    assert!(e.contains("cross_attention_dim"), "{e}");
    let _ = std::fs::remove_dir_all(&d);

    // A second encoder without a projection.
    let d = scratch("noproj");
    let p = d.join("text_encoder_2/config.json");
    let cfg = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        cfg.replace("CLIPTextModelWithProjection", "CLIPTextModel"),
    )
    .unwrap();
    let e = load_err(&d);
    assert!(e.contains("CLIPTextModelWithProjection"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

fn unet_config(extra: serde_json::Value) -> mifo::Result<UNetConfig> {
    let mut v = json!({
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
        "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128
    });
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    UNetConfig::from_json(&ConfigJson::from_value("unet/config.json", v)?)
}

/// SDXL base's UNet config: per-block transformer depths (1, 2, 10), no attention in the first
/// down block, the text-time conditioning sizes; an integer depth applies to every block; other
/// addition types are refused rather than ignored.
#[test]
fn sdxl_unet_configs_parse() {
    let c = unet_config(json!({})).unwrap();
    assert_eq!(c.transformer_layers, vec![1, 2, 10]);
    assert_eq!(c.down_attn, vec![false, true, true]);
    let tt = c.text_time.as_ref().unwrap();
    assert_eq!((tt.time_embed_dim, tt.input_dim), (256, 2816));
    // Down: 2×2 + 2×10 blocks, mid: 10, up: 3×2 + 3×10 (reversed depths); two calls each.
    assert_eq!(
        c.attention_calls(),
        2 * (2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2)
    );
    let c = unet_config(json!({"transformer_layers_per_block": 2})).unwrap();
    assert_eq!(c.transformer_layers, vec![2, 2, 2]);
    let e = unet_config(json!({"addition_embed_type": "image"}))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("addition_embed_type"), "{e}");
    let e = unet_config(json!({"addition_time_embed_dim": null}))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("addition_time_embed_dim"), "{e}");
}

/// The tiny SDXL model with `<v0>`, `<v1>` added to both tokenizers, and seeded random rows for
/// both encoders side by side ([N, h1 + h2]).
fn model_with_placeholders() -> (StableDiffusion, candle_core::Tensor) {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut sd = StableDiffusion::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let names = ["<v0>".to_string(), "<v1>".to_string()];
    sd.tokenizer.add_tokens(&names).unwrap();
    sd.xl
        .as_mut()
        .unwrap()
        .tokenizer_2
        .add_tokens(&names)
        .unwrap();
    let width = sd.placeholder_width();
    assert_eq!(width, 32 + 48);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let data: Vec<f32> = (0..2 * width)
        .map(|_| {
            let v: f32 = rand_distr::StandardNormal.sample(&mut rng);
            v * 0.5
        })
        .collect();
    let rows = candle_core::Tensor::from_vec(data, (2, width), &Device::Cpu).unwrap();
    (sd, rows)
}

/// The conditioning synthesis uses (`encode_prompt`, `encode_negative` with zeros for the empty
/// negative prompt, both halves' time ids, classifier-free guidance) reproduces diffusers' 5-step
/// SDXL run from its initial latent.
#[test]
fn sdxl_plain_sampling_matches_diffusers_e2e() {
    use mifo::model::sample::Sampler;
    let sd = StableDiffusion::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let reference =
        candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    let size = (128, 128);
    let cond = sd.encode_prompt("a photo of a cat", None, size).unwrap();
    let uncond = sd.encode_negative("", None, size).unwrap();
    assert_eq!(
        uncond
            .context
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let sampler = Sampler {
        text_encoder: &sd.text_encoder,
        unet: &sd.unet,
        vae: &sd.vae,
        scheduler: &sd.scheduler,
    };
    let image = sampler
        .generate_cond(&cond, &uncond, &reference["e2e.initial_latents"], 5, 5.0)
        .unwrap();
    let c = verify::compare("e2e.image", &image, &reference["e2e.image"], 1e-4);
    assert!(c.ok, "{c:?}");
    // The negative prompt encoded like any other (no zeros) gives another image.
    let encoded_negative = sd.encode_prompt("", None, size).unwrap();
    let other = sampler
        .generate_cond(
            &cond,
            &encoded_negative,
            &reference["e2e.initial_latents"],
            5,
            5.0,
        )
        .unwrap();
    assert!(!verify::compare("e2e.image", &other, &reference["e2e.image"], 1e-4).ok);
}

/// Box-controlled synthesis runs on SDXL: latent optimisation on every guided step (the loss
/// layers default to the mid block and the first decoder level with attention, `up_blocks.0`),
/// mask refinement, guidance with the added conditioning for both halves, every artifact.
#[test]
fn box_controlled_synthesis_runs_on_sdxl() {
    use mifo::sink::MemorySink;
    use mifo::synth::{self, parse_box, SynthConfig, SynthRequest};
    let (sd, rows) = model_with_placeholders();
    let req = SynthRequest {
        sd: &sd,
        placeholder_rows: Some(rows.clone()),
        prompt: "a photo of <v0> and <v1> on the beach".into(),
        boxes: vec![
            parse_box("<v0>=0,0.5,0.5,1").unwrap(),
            parse_box("<v1>=0.5,0.5,1,1").unwrap(),
        ],
        samples: 1,
        seed: 3,
        config: SynthConfig {
            steps: 3,
            guided_steps: 2,
            refine_every: 1,
            kmeans_restarts: 2,
            ..SynthConfig::default()
        },
    };
    let mut sink = MemorySink::default();
    let report = synth::run(&req, &mut sink).unwrap();
    let s = &report.samples[0];
    assert_eq!(s.guided_steps, 2);
    assert_eq!(s.refinements, 1);
    let losses = &sink.metrics["loss/box"];
    assert_eq!(losses.len(), 2);
    assert!(
        losses.iter().all(|(_, v)| v.is_finite() && *v > 0.0),
        "{losses:?}"
    );
    for name in ["leak/<v0>", "leak/<v1>"] {
        assert!(sink.metrics.contains_key(name), "{name} missing");
    }
    for a in ["sample_0.png", "boxes_0.png", "masks_0.png"] {
        assert!(sink.artifacts.contains_key(a), "{a} missing");
    }
    // Rows of the wrong width (one encoder's only) are refused before anything runs.
    let narrow = SynthRequest {
        placeholder_rows: Some(rows.narrow(1, 0, 32).unwrap()),
        ..req
    };
    let e = synth::validate(&narrow).unwrap_err().to_string();
    assert!(e.contains("80"), "{e}");
}

/// Learning on SDXL: each placeholder has a row in both encoders (side by side, 32 + 48), both
/// halves are trained by phase A, phase B trains LoRA adapters on the UNet and both encoders,
/// and the attention losses use SDXL's decoder levels.
#[test]
fn learning_trains_both_encoders_rows_and_lora() {
    use mifo::learn::{self, LearnConfig, LearnRequest};
    use mifo::sink::MemorySink;
    let sd = StableDiffusion::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = learn::scene_files(&root.join("fixtures/scenes/coffee")).unwrap();
    let size = (sd.unet.config().sample_size * sd.vae.config().factor()) as u32;
    let scene = learn::load_scene(&files, size, false, mifo::imageio::ImageFit::Crop).unwrap();
    let config = LearnConfig {
        reward_steps: 2,
        penalty_steps: 2,
        dreambooth_steps: 2,
        dreambooth: "lora".into(),
        t_max_attn: 1000,
        checkpoint_every: 0,
        preview_steps: 2,
        init: "dog,cat".into(),
        ..LearnConfig::paper()
    };
    let mut sink = MemorySink::default();
    learn::run(
        LearnRequest {
            sd: &sd,
            scene: &scene,
            config,
            seed: 5,
            resume: None,
            class_images: Vec::new(),
            measure_only: false,
        },
        &mut sink,
    )
    .unwrap();
    assert!(
        sink.logs
            .iter()
            .any(|l| l.contains("[\"up_blocks.0\", \"up_blocks.1\"]")),
        "{:?}",
        sink.logs
    );
    for a in ["embeddings", "lora", "preview.png", "attn/<v0>.png"] {
        assert!(sink.artifacts.contains_key(a), "{a} missing");
    }
    let emb =
        candle_core::safetensors::load_buffer(&sink.artifacts["embeddings"], &Device::Cpu).unwrap();
    let v0 = &emb["<v0>"];
    assert_eq!(v0.dims(), &[80]);
    // Both halves moved away from their initial word ("dog") rows.
    let dog = sd.tokenizer.encode("dog").unwrap()[1];
    let init = candle_core::Tensor::cat(
        &[
            &sd.text_encoder.token_rows(&[dog]).unwrap(),
            &sd.xl
                .as_ref()
                .unwrap()
                .text_encoder_2
                .token_rows(&[dog])
                .unwrap(),
        ],
        1,
    )
    .unwrap()
    .squeeze(0)
    .unwrap();
    let moved = (v0 - &init).unwrap().abs().unwrap();
    for (start, len) in [(0, 32), (32, 48)] {
        let m = moved.narrow(0, start, len).unwrap().max(0).unwrap();
        assert!(
            m.to_scalar::<f32>().unwrap() > 0.0,
            "half at {start} not trained"
        );
    }
    let lora =
        candle_core::safetensors::load_buffer(&sink.artifacts["lora"], &Device::Cpu).unwrap();
    for prefix in ["unet.", "text_encoder.", "text_encoder_2."] {
        assert!(
            lora.keys().any(|k| k.starts_with(prefix)),
            "no {prefix} adapters: {:?}",
            lora.keys().take(5).collect::<Vec<_>>()
        );
    }
    // The UNet's ResNets per level, which kohya's SDXL names need, are in the metadata.
    let (_, meta) = safetensors::SafeTensors::read_metadata(&sink.artifacts["lora"]).unwrap();
    let mifo_meta: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["mifo"]).unwrap();
    assert_eq!(mifo_meta["unet_layers_per_block"], "2,2,2", "{mifo_meta}");
}

/// `mifo bench --shape sdxl-base` times SDXL base 1.0's real shapes: its configs parse through
/// the same readers as a folder (2.6B-parameter UNet layout, both encoders, the text-time sizes).
#[test]
fn the_sdxl_base_shape_has_sdxl_sizes() {
    let shape = mifo::model::ModelShape::sdxl_base().unwrap();
    assert_eq!(shape.unet.cross_attention_dim, 768 + 1280);
    assert_eq!(shape.unet.transformer_layers, vec![1, 2, 10]);
    assert_eq!(shape.unet.attention_calls(), 140);
    let te2 = shape.text_encoder_2.as_ref().unwrap();
    assert_eq!((te2.hidden_size, te2.projection_dim), (1280, Some(1280)));
    let tt = shape.unet.text_time.as_ref().unwrap();
    assert_eq!(tt.input_dim, 1280 + 6 * tt.time_embed_dim);
    assert_eq!(shape.unet.sample_size * shape.vae.factor(), 1024);
    assert!(mifo::model::ModelShape::sd21_base()
        .unwrap()
        .text_encoder_2
        .is_none());
}

/// Learning's joined placeholder row ([N, h1 + h2], cut per encoder) gets diffusers' gradients:
/// the masked loss of the reference through SDXL's prompt encoding gives `grad_a.token_embedding_rows`
/// in its first 32 columns and `grad_a.token_embedding_rows_2` in the other 48.
#[test]
fn joined_rows_get_both_encoders_gradients() {
    use candle_core::{Tensor, Var};
    use mifo::model::conditioning::split_rows;
    use mifo::model::nn::resize_nearest_hw;
    use mifo::model::sdxl;
    let sd = StableDiffusion::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let r = candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu)
        .unwrap();
    let ids = |n: &str| r[n].to_dtype(DType::U32).unwrap();
    let rows = Var::from_tensor(
        &Tensor::cat(
            &[
                &r["text.new_token_embeddings"],
                &r["text_2.new_token_embeddings"],
            ],
            1,
        )
        .unwrap(),
    )
    .unwrap();
    let (r1, r2) = split_rows(rows.as_tensor(), 32).unwrap();
    let xl = sd.xl.as_ref().unwrap();
    let p = sdxl::encode_with(
        &sd.text_encoder,
        &xl.text_encoder_2,
        &ids("train.input_ids"),
        Some(&r1),
        &ids("train.input_ids_2"),
        Some(&r2),
    )
    .unwrap();
    let eps = sd
        .unet
        .forward_cond(
            &r["train.noisy_latents"],
            &r["train.timesteps"].to_dtype(DType::F32).unwrap(),
            &p.context,
            Some(&p.added(&r["train.time_ids"])),
            None,
        )
        .unwrap();
    let masks = &r["masks.image"];
    let m = Tensor::cat(
        &[
            &masks.max_keepdim(0).unwrap(),
            &masks.narrow(0, 0, 1).unwrap(),
        ],
        0,
    )
    .unwrap();
    let m = resize_nearest_hw(&m, 16, 16).unwrap();
    let d = (&eps - &r["train.noise"])
        .unwrap()
        .sqr()
        .unwrap()
        .broadcast_mul(&m.unsqueeze(1).unwrap())
        .unwrap();
    let denom = 4.0 * m.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let loss = (d.sum_all().unwrap() / denom).unwrap();
    let g = loss.backward().unwrap();
    let g = g.get(rows.as_tensor()).unwrap();
    for (start, len, name) in [
        (0, 32, "grad_a.token_embedding_rows"),
        (32, 48, "grad_a.token_embedding_rows_2"),
    ] {
        let c = verify::compare(name, &g.narrow(1, start, len).unwrap(), &r[name], 1e-3);
        assert!(c.ok, "{c:?}");
    }
}

/// `force_upcast`: a VAE whose config asks for it (tiny-sdxl's, as SDXL base's) computes in f32
/// in an f16 or bf16 run, from a folder or a single file, giving what the f32 model gives on the
/// same (f16) latents; without the key (tiny-sd21) or in an f32 run the VAE keeps the run's
/// dtype.
#[test]
fn a_force_upcast_vae_runs_in_f32_in_half_precision_runs() {
    use mifo::model::vae::VaeConfig;
    let vae = |extra: serde_json::Value| {
        let mut c = json!({"block_out_channels": [8, 16], "norm_num_groups": 8,
                           "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
                           "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        VaeConfig::from_json(&ConfigJson::from_value("vae/config.json", c).unwrap()).unwrap()
    };
    let up = vae(json!({"force_upcast": true}));
    for (run, want) in [
        (DType::F16, DType::F32),
        (DType::BF16, DType::F32),
        (DType::F32, DType::F32),
        (DType::F64, DType::F64),
    ] {
        assert_eq!(up.compute_dtype(run), want, "{run:?}");
    }
    for plain in [vae(json!({"force_upcast": false})), vae(json!({}))] {
        for run in [DType::F16, DType::BF16, DType::F32] {
            assert_eq!(plain.compute_dtype(run), run);
        }
    }

    let dev = Device::Cpu;
    let full = StableDiffusion::load(&fixture(), DType::F32, &dev).unwrap();
    assert_eq!(full.vae.dtype(), DType::F32);
    let half = StableDiffusion::load(&fixture(), DType::F16, &dev).unwrap();
    assert_eq!(half.vae.dtype(), DType::F32);
    assert_eq!(
        half.unet_weights
            .get("conv_in.weight", (16, 4, 3, 3))
            .unwrap()
            .dtype(),
        DType::F16
    );
    let lat = candle_core::Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let ours = half.vae.decode(&lat).unwrap();
    assert_eq!(ours.dtype(), DType::F16);
    let f32_model = full
        .vae
        .decode(&lat.to_dtype(DType::F32).unwrap())
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let diff = (ours.to_dtype(DType::F32).unwrap() - f32_model.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    let (mean, _) = half.vae.encode(&ours).unwrap();
    assert_eq!(mean.dtype(), DType::F16);

    // The single-file SDXL checkpoint reads its VAE in f32 for an f16 run too.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = mifo::model::source::resolve(
        root.join("fixtures/tiny-sdxl-single.safetensors")
            .to_str()
            .unwrap(),
        None,
        Some(fixture().to_str().unwrap()),
    )
    .unwrap();
    let single = StableDiffusion::load_source(&source, DType::F16, &dev, Vec::new()).unwrap();
    assert_eq!(single.vae.dtype(), DType::F32);
    // A VAE config without `force_upcast` (as SD 1.x / 2.x folders written before diffusers
    // had the key) keeps the run's dtype.
    let dir = std::env::temp_dir().join(format!("mifo-sdxl-{}-no-upcast", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&root.join("fixtures/tiny-sd21"), &dir);
    let config = dir.join("vae/config.json");
    let mut vae_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert!(vae_json
        .as_object_mut()
        .unwrap()
        .remove("force_upcast")
        .is_some());
    std::fs::write(&config, vae_json.to_string()).unwrap();
    let sd = StableDiffusion::load(&dir, DType::F16, &dev).unwrap();
    assert_eq!(sd.vae.dtype(), DType::F16);
    let _ = std::fs::remove_dir_all(&dir);
}
