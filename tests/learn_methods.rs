//! The learning methods (`learn.method`): each does what its paper says, on the tiny model with
//! a few steps. Break-a-Scene trains only the tokens in phase 1 and the weights too in phase 2,
//! with its own attention loss at every step; TI-m trains only the placeholder rows; DB-m trains
//! the weights from the first step; neither baseline has an attention loss. Union (joint)
//! sampling draws non-empty subsets and the loss reads the union of their masks.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mifo::learn::{self, Checkpoint, LearnConfig, LearnRequest};
use mifo::model::StableDiffusion;
use mifo::sink::MemorySink;
use rand::SeedableRng;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn setup() -> (StableDiffusion, learn::Scene) {
    let sd = StableDiffusion::load(&root().join("fixtures/tiny-sd21"), DType::F32, &Device::Cpu)
        .unwrap();
    let files = learn::scene_files(&root().join("fixtures/scenes/coffee")).unwrap();
    let size = (sd.unet.config().sample_size * sd.vae.config().factor()) as u32;
    let scene = learn::load_scene(&files, size, false, mifo::imageio::ImageFit::Crop).unwrap();
    (sd, scene)
}

fn run(
    sd: &StableDiffusion,
    scene: &learn::Scene,
    cfg: LearnConfig,
    stop: Option<u64>,
) -> MemorySink {
    let mut sink = MemorySink {
        stop_after: stop,
        ..Default::default()
    };
    learn::run(
        LearnRequest {
            sd,
            scene,
            config: cfg,
            seed: 3,
            resume: None,
            class_images: Vec::new(),
            measure_only: false,
        },
        &mut sink,
    )
    .unwrap();
    sink
}

fn tensors(bytes: &[u8]) -> HashMap<String, Tensor> {
    Checkpoint::from_bytes(bytes, &Device::Cpu).unwrap().tensors
}

fn safetensors(bytes: &[u8]) -> HashMap<String, Tensor> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                candle_core::safetensors::Load::load(&v, &Device::Cpu).unwrap(),
            )
        })
        .collect()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len()
}

/// The base UNet's tensors, by name.
fn base_unet() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        root().join("fixtures/tiny-sd21/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// How many of the `weights` artifact's UNet tensors differ from the base model's, of how many.
fn unet_changed(weights: &[u8]) -> (usize, usize) {
    let base = base_unet();
    let w = safetensors(weights);
    let mut changed = 0;
    let mut total = 0;
    for (name, t) in &w {
        if let Some(n) = name.strip_prefix("unet.") {
            total += 1;
            if !same(t, &base[n].to_dtype(DType::F32).unwrap()) {
                changed += 1;
            }
        }
    }
    (changed, total)
}

fn embeddings(sink: &MemorySink) -> Vec<f32> {
    let e = safetensors(&sink.artifacts["embeddings"]);
    let mut out = e["<v0>"].to_vec1::<f32>().unwrap();
    out.extend(e["<v1>"].to_vec1::<f32>().unwrap());
    out
}

fn quiet(cfg: LearnConfig) -> LearnConfig {
    LearnConfig {
        preview: false,
        checkpoint_every: 0,
        ..cfg
    }
}

#[test]
fn break_a_scene_phase_one_leaves_the_unet_untouched_and_phase_two_trains_it() {
    let (sd, scene) = setup();
    let cfg = quiet(LearnConfig {
        reward_steps: 3,
        dreambooth_steps: 2,
        class_images: 1,
        class_image_steps: 2,
        ..LearnConfig::break_a_scene()
    });
    // Cut at the end of phase 1: the state holds the rows and their moments, nothing else.
    let cut = run(&sd, &scene, cfg.clone(), Some(3));
    let (step, bytes) = cut.checkpoint.clone().unwrap();
    assert_eq!(step, 3);
    let keys: BTreeSet<String> = tensors(&bytes).into_keys().collect();
    let want: BTreeSet<String> = ["rows", "adam.rows.m", "adam.rows.v"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(keys, want, "phase 1 trained more than the tokens");
    assert_eq!(
        cut.metrics["phase"].iter().map(|p| p.1).collect::<Vec<_>>(),
        [0.0; 3]
    );

    let full = run(&sd, &scene, cfg, None);
    let (changed, total) = unet_changed(&full.artifacts["weights"]);
    assert!(
        total > 0 && changed * 10 >= total * 9,
        "phase 2 changed {changed} of {total} UNet tensors"
    );
    // Its attention loss at every step of both phases (t_max_attn 999: no gate), and the
    // prior-preservation loss in phase 2.
    let attn: Vec<u64> = full.metrics["loss/attn"].iter().map(|p| p.0).collect();
    assert_eq!(attn, [0, 1, 2, 3, 4]);
    assert_eq!(full.metrics["loss/prior"].len(), 2);
    assert!(full.artifacts.contains_key("class/0.png"));
}

/// Break-a-Scene's loss on constructed maps: two layers averaged, divided by the maximum,
/// against the nearest-downsampled mask, summed over tokens, by hand.
#[test]
fn break_a_scene_attention_loss_matches_a_hand_computation() {
    let dev = Device::Cpu;
    // Two tokens, 2×2 maps in two layers.
    let l1 = Tensor::new(
        &[[[0.1f32, 0.2], [0.3, 0.4]], [[0.2, 0.2], [0.0, 0.4]]],
        &dev,
    )
    .unwrap();
    let l2 = Tensor::new(
        &[[[0.1f32, 0.0], [0.1, 0.0]], [[0.0, 0.2], [0.0, 0.0]]],
        &dev,
    )
    .unwrap();
    // Layer mean: token 0 [[0.1, 0.1], [0.2, 0.2]] → ÷ 0.2 = [[0.5, 0.5], [1, 1]];
    //             token 1 [[0.1, 0.2], [0.0, 0.2]] → ÷ 0.2 = [[0.5, 1], [0, 1]].
    // Masks 4×4; nearest to 2×2 reads pixels (0,0), (0,2), (2,0), (2,2).
    let mut m = vec![0f32; 2 * 16];
    m[0] = 1.0; // token 0: only pixel (0,0) → [[1, 0], [0, 0]] (bilinear would give 0.25)
    for (y, x) in [(0, 2), (0, 3), (1, 2), (1, 3), (2, 2), (3, 3)] {
        m[16 + y * 4 + x] = 1.0; // token 1: (0,2) and (2,2) → [[0, 1], [0, 1]]
    }
    let masks = Tensor::from_vec(m, (2, 4, 4), &dev).unwrap();
    let loss = learn::losses::bas_attn_loss(&[l1, l2], &masks, 1.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // token 0: ((1 − .5)² + (0 − .5)² + (0 − 1)² + (0 − 1)²) / 4 = 2.5 / 4
    // token 1: ((0 − .5)² + (1 − 1)² + (0 − 0)² + (1 − 1)²) / 4 = 0.25 / 4
    let want = 2.5 / 4.0 + 0.25 / 4.0;
    assert!((loss as f64 - want).abs() < 1e-6, "{loss} vs {want}");
}

#[test]
fn ti_m_trains_only_the_placeholder_rows_and_has_no_attention_loss() {
    let (sd, scene) = setup();
    // From the paper preset with learn.method=ti-m: its phase B and attention weights are not
    // read.
    let cfg = quiet(LearnConfig {
        method: "ti-m".into(),
        reward_steps: 2,
        penalty_steps: 2,
        dreambooth_steps: 3,
        t_max_attn: 1000,
        ..LearnConfig::paper()
    });
    assert_eq!(cfg.total_steps(), 4);
    let sink = run(&sd, &scene, cfg, None);
    assert_eq!(sink.metrics["loss/total"].len(), 4, "phase B ran");
    assert!(
        !sink.metrics.contains_key("loss/attn"),
        "an attention loss was recorded"
    );
    assert!(
        sink.metrics.keys().any(|k| k.starts_with("leak/")),
        "leak is still measured"
    );
    assert!(!sink.artifacts.contains_key("weights") && !sink.artifacts.contains_key("lora"));
    let (_, bytes) = sink.checkpoint.clone().unwrap();
    let keys: BTreeSet<String> = tensors(&bytes).into_keys().collect();
    assert_eq!(
        keys,
        ["rows", "adam.rows.m", "adam.rows.v"]
            .into_iter()
            .map(String::from)
            .collect(),
        "TI-m trained something besides the placeholder rows"
    );
    // The rows moved away from their start (the vocabulary mean).
    let mean: Vec<f32> = sd.text_encoder.mean_token_row().unwrap().to_vec1().unwrap();
    let rows = embeddings(&sink);
    assert!(rows[..mean.len()].iter().zip(&mean).any(|(a, b)| a != b));
    // The base model's vocabulary is untouched: the encoder of a prompt without placeholders
    // gives what the freshly loaded model gives.
    let fresh = StableDiffusion::load(&root().join("fixtures/tiny-sd21"), DType::F32, &Device::Cpu)
        .unwrap();
    let ids = Tensor::new(
        sd.tokenizer.encode("a photo of a cup").unwrap(),
        &Device::Cpu,
    )
    .unwrap()
    .unsqueeze(0)
    .unwrap();
    let a = sd.text_encoder.forward(&ids, None).unwrap();
    let b = fresh.text_encoder.forward(&ids, None).unwrap();
    assert!(same(&a, &b));
}

#[test]
fn db_m_trains_the_weights_from_the_first_step_without_attention_loss() {
    let (sd, scene) = setup();
    let cfg = quiet(LearnConfig {
        dreambooth_steps: 3,
        ..LearnConfig::db_m()
    });
    assert_eq!(cfg.total_steps(), 3);
    let sink = run(&sd, &scene, cfg, None);
    let phases: Vec<f64> = sink.metrics["phase"].iter().map(|p| p.1).collect();
    assert_eq!(phases, [2.0; 3], "DB-m has no token-only phase");
    assert!(
        !sink.metrics.contains_key("loss/attn"),
        "an attention loss was recorded"
    );
    let (changed, total) = unet_changed(&sink.artifacts["weights"]);
    assert!(
        total > 0 && changed * 10 >= total * 9,
        "changed {changed} of {total} UNet tensors"
    );
    // The tokens train with the weights.
    let mean: Vec<f32> = sd.text_encoder.mean_token_row().unwrap().to_vec1().unwrap();
    assert!(embeddings(&sink)[..mean.len()]
        .iter()
        .zip(&mean)
        .any(|(a, b)| a != b));
}

#[test]
fn union_sampling_draws_non_empty_subsets_and_the_union_of_their_masks() {
    let n = 3;
    let mut sizes = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for seed in 0..300u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let s = learn::sampling::draw_subset(&mut rng, n, false);
        assert!(!s.is_empty(), "empty subset");
        let set: BTreeSet<usize> = s.iter().copied().collect();
        assert_eq!(set.len(), s.len(), "repeated instance in {s:?}");
        assert!(s.iter().all(|&j| j < n));
        sizes.insert(s.len());
        seen.insert(s.clone());
    }
    assert_eq!(sizes, (1..=n).collect(), "every subset size is drawn");
    // Every order of every subset: 3 + 6 + 6 ordered subsets.
    assert_eq!(seen.len(), 15);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    assert_eq!(learn::sampling::draw_subset(&mut rng, n, true), [0, 1, 2]);

    let dev = Device::Cpu;
    let masks = Tensor::new(
        &[
            [[1f32, 0.0], [0.0, 0.0]],
            [[0.0, 0.5], [0.0, 0.0]],
            [[0.5, 0.0], [0.2, 0.0]],
        ],
        &dev,
    )
    .unwrap();
    let u: Vec<Vec<f32>> = learn::sampling::union_mask(&masks, &[2, 0])
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    // The pixelwise maximum of masks 2 and 0 (their sum would be 1.5 at the top left).
    assert_eq!(u, [[1.0, 0.0], [0.2, 0.0]]);
    assert!(learn::sampling::union_mask(&masks, &[]).is_err());
}

#[test]
fn a_bad_method_is_refused_and_old_records_read_mifo() {
    let cfg = LearnConfig {
        method: "dreambooth".into(),
        ..LearnConfig::paper()
    };
    let err = cfg.validate().unwrap_err().to_string();
    assert_eq!(err.lines().count(), 1);
    assert!(
        err.contains("learn.method: expected mifo, break-a-scene, ti-m or db-m"),
        "{err}"
    );
    // DB-m without a weight phase has nothing to train.
    let err = LearnConfig {
        dreambooth: "none".into(),
        ..LearnConfig::db_m()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("learn.dreambooth: db-m trains the weights"),
        "{err}"
    );
    // A record written before the key existed.
    let mut v = serde_json::to_value(LearnConfig::paper()).unwrap();
    v.as_object_mut().unwrap().remove("method");
    let old: LearnConfig = serde_json::from_value(v).unwrap();
    assert_eq!(old, LearnConfig::paper());
    assert_eq!(old.method, "mifo");
}

#[test]
fn setting_a_method_starts_from_its_preset_unless_a_preset_is_named() {
    let sets = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (preset, cfg) =
        LearnConfig::resolve(None, None, &sets(&["learn.method=break-a-scene"])).unwrap();
    assert_eq!(preset, "break-a-scene");
    assert_eq!(cfg, LearnConfig::break_a_scene());
    let (preset, cfg) = LearnConfig::resolve(
        None,
        None,
        &sets(&["learn.method=ti-m", "learn.reward_steps=5"]),
    )
    .unwrap();
    assert_eq!(
        (preset.as_str(), cfg.reward_steps, cfg.lr),
        ("ti-m", 5, 5e-3)
    );
    // A named preset keeps its numbers and changes only the method.
    let (preset, cfg) = LearnConfig::resolve(
        Some("official"),
        None,
        &sets(&["learn.method=break-a-scene"]),
    )
    .unwrap();
    assert_eq!(preset, "official");
    assert_eq!(
        cfg,
        LearnConfig {
            method: "break-a-scene".into(),
            ..LearnConfig::official()
        }
    );
    let (preset, cfg) = LearnConfig::resolve(None, None, &[]).unwrap();
    assert_eq!((preset.as_str(), cfg), ("paper", LearnConfig::paper()));
    for name in learn::PRESETS {
        let p = LearnConfig::preset(name).unwrap();
        p.validate().unwrap();
        assert!(learn::METHOD_NAMES.contains(&p.method.as_str()));
    }
}
