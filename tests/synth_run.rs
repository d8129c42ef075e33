//! End-to-end synthesis on the tiny SD 2.1-style fixture (CPU, shortened schedules): box control
//! confines the placeholders' cross-attention, the latent optimisation lowers the box loss, runs
//! are reproducible, every artifact and metric is there, and cancellation stops cleanly.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mifo::model::StableDiffusion;
use mifo::sink::MemorySink;
use mifo::synth::{self, parse_box, SynthConfig, SynthReport, SynthRequest};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

const PROMPT: &str = "a photo of <v0> and <v1> on the beach";
const STEPS: usize = 10;
const GUIDED: usize = 5;

/// The tiny model with `<v0>`, `<v1>` added to its tokenizer, and seeded random embedding rows
/// (scaled to the vocabulary's spread).
fn model() -> (StableDiffusion, Tensor) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd21");
    let mut sd = StableDiffusion::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let mut tok = sd.tokenizer.clone();
    tok.add_tokens(&["<v0>".to_string(), "<v1>".to_string()])
        .unwrap();
    sd.tokenizer = tok;
    let hidden = sd.text_encoder.config().hidden_size;
    let std = sd
        .text_encoder
        .token_table()
        .flatten_all()
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let data: Vec<f32> = (0..2 * hidden)
        .map(|_| {
            let v: f32 = StandardNormal.sample(&mut rng);
            v * std
        })
        .collect();
    let rows = Tensor::from_vec(data, (2, hidden), &Device::Cpu).unwrap();
    (sd, rows)
}

/// A short schedule: 10 steps, 5 guided, refinement at steps 5 and 8, 10 K-means restarts.
fn short_config() -> SynthConfig {
    SynthConfig {
        steps: STEPS,
        guided_steps: GUIDED,
        refine_every: 3,
        kmeans_restarts: 10,
        ..SynthConfig::default()
    }
}

/// Two subjects side by side in the lower half; the upper half is background at every
/// resolution down to the 2×2 mid block. (Boxes that tile the whole image leave no background,
/// and then the box loss is exactly 0: with the masks on, a subject's attention can only fall in
/// its own box or the background.)
fn request<'a>(
    sd: &'a StableDiffusion,
    rows: &Tensor,
    config: SynthConfig,
    seed: u64,
    samples: usize,
) -> SynthRequest<'a> {
    SynthRequest {
        sd,
        placeholder_rows: Some(rows.clone()),
        prompt: PROMPT.to_string(),
        boxes: vec![
            parse_box("<v0>=0,0.5,0.5,1").unwrap(),
            parse_box("<v1>=0.5,0.5,1,1").unwrap(),
        ],
        samples,
        seed,
        config,
    }
}

fn run(req: &SynthRequest) -> (SynthReport, MemorySink) {
    let mut sink = MemorySink::default();
    let report = synth::run(req, &mut sink).unwrap();
    (report, sink)
}

fn final_leak(sink: &MemorySink, name: &str) -> f64 {
    sink.metrics[name].last().unwrap().1
}

#[test]
fn box_control_confines_cross_attention() {
    let (sd, rows) = model();
    let (on, on_sink) = run(&request(&sd, &rows, short_config(), 11, 1));
    let off_cfg = SynthConfig {
        box_control: false,
        ..short_config()
    };
    let (off, off_sink) = run(&request(&sd, &rows, off_cfg, 11, 1));
    let leak_on = [
        final_leak(&on_sink, "leak/<v0>"),
        final_leak(&on_sink, "leak/<v1>"),
    ];
    let leak_off = [
        final_leak(&off_sink, "leak/<v0>"),
        final_leak(&off_sink, "leak/<v1>"),
    ];
    println!("final leak with box control {leak_on:?}, without {leak_off:?}");
    println!(
        "wall per image: control {:.2}s, plain {:.2}s; refinements {}, fallbacks {:?}",
        on.samples[0].wall_seconds,
        off.samples[0].wall_seconds,
        on.samples[0].refinements,
        on.samples[0].mask_fallbacks
    );
    // The report's final leak is the last point of the stored series.
    assert_eq!(
        on.samples[0]
            .final_leak
            .values()
            .copied()
            .collect::<Vec<_>>(),
        leak_on.to_vec()
    );
    // The leak is read before the box bias, so it is not 0 by construction (the masks hide a
    // subject's tokens outside its box; a leak read after them would be 0 here).
    assert!(
        leak_on.iter().all(|&l| l > 0.1),
        "an unbiased map leaks: {leak_on:?}"
    );
    // The first step's latent optimisation gathers each subject's own attention in its box:
    // at step 0 the unbiased leak is lower than in the same run without control. (On these
    // random weights later steps drift back: by the last step the two runs are within 0.02.)
    let first = |sink: &MemorySink, name: &str| sink.metrics[name][0].1;
    for name in ["leak/<v0>", "leak/<v1>"] {
        let (on, off) = (first(&on_sink, name), first(&off_sink, name));
        assert!(
            on < off - 0.03,
            "{name} at step 0: with box control {on:.3}, without {off:.3}"
        );
    }
    assert_eq!(on.samples[0].refinements, 2);
    // Without box control nothing is optimised or refined.
    assert!(!off_sink.metrics.contains_key("loss/box"));
    assert_eq!(off.samples[0].refinements, 0);
}

#[test]
fn latent_optimisation_lowers_the_box_loss() {
    for form in ["paper", "official"] {
        latent_optimisation_lowers_the_box_loss_in(form);
    }
}

/// The optimisation lowers the loss it optimises, in either `synth.loss_form`.
fn latent_optimisation_lowers_the_box_loss_in(form: &str) {
    let (sd, rows) = model();
    let cfg = SynthConfig {
        steps: STEPS,
        guided_steps: GUIDED,
        refine: false,
        loss_form: form.into(),
        ..SynthConfig::default()
    };
    let (_, sink) = run(&request(&sd, &rows, cfg, 3, 1));
    let before = &sink.metrics["loss/box"];
    let after = &sink.metrics["loss/box_after"];
    assert_eq!(before.len(), GUIDED);
    let lowered = before.iter().zip(after).filter(|(b, a)| a.1 < b.1).count();
    println!(
        "{form}: loss/box before {:?}\nloss/box after  {:?}\ngd_iters {:?}\nlowered in {lowered} of {GUIDED}",
        before.iter().map(|p| p.1).collect::<Vec<_>>(),
        after.iter().map(|p| p.1).collect::<Vec<_>>(),
        sink.metrics["gd_iters"].iter().map(|p| p.1).collect::<Vec<_>>()
    );
    assert!(
        lowered * 2 > GUIDED,
        "{form}: lowered in {lowered} of {GUIDED} guided steps"
    );
    // α follows the paper preset: 0.5, 0.35, 0.2, then the cosine stage down to α_final at N.
    let alpha: Vec<f64> = sink.metrics["alpha"].iter().map(|p| p.1).collect();
    assert!(
        (alpha[0] - 0.5).abs() < 1e-12 && (alpha[2] - 0.2).abs() < 1e-12,
        "{alpha:?}"
    );
    assert!((alpha[4] - 0.1).abs() < 1e-12, "{alpha:?}");
}

/// With a step far too large, plain gradient steps raise the box loss; `synth.backtrack`
/// halves the step and keeps the best latent, so no guided step ends above where it began.
#[test]
fn backtracking_never_ends_a_step_above_its_start() {
    let (sd, rows) = model();
    // The tiny model's box-loss gradients are small: steps of 1e5 and more overshoot it.
    let beta = 1e6;
    let cfg = |backtrack: bool| SynthConfig {
        steps: STEPS,
        guided_steps: GUIDED,
        refine: false,
        loss_threshold: 0.0,
        step_size_start: beta,
        step_size_end: beta,
        backtrack,
        ..SynthConfig::default()
    };
    let raised = |sink: &MemorySink| {
        sink.metrics["loss/box"]
            .iter()
            .zip(&sink.metrics["loss/box_after"])
            .filter(|(b, a)| a.1 > b.1)
            .count()
    };
    let (_, fixed) = run(&request(&sd, &rows, cfg(false), 3, 1));
    assert!(
        raised(&fixed) > 0,
        "a step of 1e6 should overshoot: before {:?} after {:?}",
        fixed.metrics["loss/box"],
        fixed.metrics["loss/box_after"]
    );
    let (_, backtracked) = run(&request(&sd, &rows, cfg(true), 3, 1));
    assert_eq!(
        raised(&backtracked),
        0,
        "before {:?} after {:?}",
        backtracked.metrics["loss/box"],
        backtracked.metrics["loss/box_after"]
    );
}

/// `synth.max_step` is a trust region: with a step far too large, the unbounded optimisation
/// throws the sample far from the one drawn without optimisation, while a tiny bound keeps every
/// move so small that the image stays within a few grey levels of it.
#[test]
fn max_step_bounds_how_far_the_latent_moves() {
    let (sd, rows) = model();
    let cfg = |latent_opt: bool, max_step: f64| SynthConfig {
        steps: STEPS,
        guided_steps: GUIDED,
        refine: false,
        loss_threshold: 0.0,
        step_size_start: 1e6,
        step_size_end: 1e6,
        latent_opt,
        max_step,
        ..SynthConfig::default()
    };
    let image = |c: SynthConfig| {
        let (_, sink) = run(&request(&sd, &rows, c, 3, 1));
        image::load_from_memory(&sink.artifacts["sample_0.png"])
            .unwrap()
            .to_rgb8()
            .into_raw()
    };
    let mean_diff = |a: &[u8], b: &[u8]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).abs())
            .sum::<f64>()
            / a.len() as f64
    };
    let still = image(cfg(false, 0.0));
    let unbounded = mean_diff(&image(cfg(true, 0.0)), &still);
    let bounded = mean_diff(&image(cfg(true, 1e-5)), &still);
    assert!(
        unbounded > 5.0,
        "a step of 1e6 should move the sample: mean |Δ| {unbounded:.3}"
    );
    assert!(
        bounded < 1.0,
        "max_step 1e-5 should keep the sample: mean |Δ| {bounded:.3} (unbounded {unbounded:.3})"
    );
}

/// `plain` is Stable Diffusion with the prompt alone: whatever the box-control keys say, it
/// records nothing of the attention (no hook runs) and draws exactly what box control off with
/// no attention metrics draws; `bounded-attention` optimises the latent with its own loss (no
/// out-of-box penalty: α is recorded as 0) and draws something else than MIFO.
#[test]
fn synthesis_methods_do_what_their_papers_say() {
    let (sd, rows) = model();
    let plain = SynthConfig {
        method: "plain".into(),
        ..short_config()
    };
    let (_, plain_sink) = run(&request(&sd, &rows, plain, 9, 1));
    let bare = SynthConfig {
        box_control: false,
        attn_metrics: false,
        ..short_config()
    };
    let (_, bare_sink) = run(&request(&sd, &rows, bare, 9, 1));
    for sink in [&plain_sink, &bare_sink] {
        assert!(
            sink.metrics
                .keys()
                .all(|k| !k.starts_with("leak/") && k != "loss/box"),
            "{:?}",
            sink.metrics.keys().collect::<Vec<_>>()
        );
    }
    assert_eq!(
        plain_sink.artifacts["sample_0.png"],
        bare_sink.artifacts["sample_0.png"]
    );
    let bounded = SynthConfig {
        method: "bounded-attention".into(),
        ..short_config()
    };
    let (_, ba_sink) = run(&request(&sd, &rows, bounded, 9, 1));
    let (_, mifo_sink) = run(&request(&sd, &rows, short_config(), 9, 1));
    assert!(ba_sink.metrics["alpha"].iter().all(|p| p.1 == 0.0));
    assert!(mifo_sink.metrics["alpha"].iter().any(|p| p.1 > 0.0));
    assert!(ba_sink.metrics.contains_key("loss/box"));
    assert_ne!(
        ba_sink.artifacts["sample_0.png"],
        mifo_sink.artifacts["sample_0.png"]
    );
    assert_ne!(
        ba_sink.artifacts["sample_0.png"],
        plain_sink.artifacts["sample_0.png"]
    );
}

/// The official preset's α counter runs through the whole sample: with 2 iterations per step
/// (4 loss terms) it reaches u = 1 only at step 3 (calls 12), where the step index would have
/// u = 3; the recorded α is the code's α(0) = 0.55 for steps 0–2 and α(1) = 0.4 for 3–4.
#[test]
fn the_code_alpha_counter_lags_when_iterations_are_cut() {
    let (sd, rows) = model();
    let cfg = SynthConfig {
        gd_iters: 2,
        loss_threshold: 0.0,
        refine: false,
        ..SynthConfig {
            steps: STEPS,
            guided_steps: GUIDED,
            ..SynthConfig::preset("official").unwrap()
        }
    };
    let (_, sink) = run(&request(&sd, &rows, cfg, 2, 1));
    let alpha: Vec<f64> = sink.metrics["alpha"].iter().map(|p| p.1).collect();
    let want = [0.55, 0.55, 0.55, 0.4, 0.4];
    assert_eq!(alpha.len(), want.len(), "{alpha:?}");
    for (got, want) in alpha.iter().zip(want) {
        assert!((got - want).abs() < 1e-12, "{alpha:?}");
    }
    assert!(sink.metrics["gd_iters"].iter().all(|p| p.1 == 2.0));
}

#[test]
fn same_seed_same_pixels_and_all_outputs() {
    let (sd, rows) = model();
    let cfg = SynthConfig {
        steps: 6,
        guided_steps: 2,
        refine_every: 2,
        gd_iters: 2,
        kmeans_restarts: 5,
        ..SynthConfig::default()
    };
    let (report, a) = run(&request(&sd, &rows, cfg.clone(), 5, 2));
    let (_, b) = run(&request(&sd, &rows, cfg.clone(), 5, 1));
    let (_, c) = run(&request(&sd, &rows, cfg, 6, 1));
    assert_eq!(a.artifacts["sample_0.png"], b.artifacts["sample_0.png"]);
    assert_ne!(a.artifacts["sample_0.png"], c.artifacts["sample_0.png"]);
    // Sample 1 of seed 5 starts from seed 6.
    assert_eq!(a.artifacts["sample_1.png"], c.artifacts["sample_0.png"]);
    assert!(!report.cancelled);

    let mut names: Vec<&str> = a.artifacts.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "attn/<v0>_0.png",
            "attn/<v0>_1.png",
            "attn/<v1>_0.png",
            "attn/<v1>_1.png",
            "boxes_0.png",
            "boxes_1.png",
            "masks_0.png",
            "masks_1.png",
            "sample_0.png",
            "sample_1.png",
        ]
    );
    for (name, bytes) in &a.artifacts {
        let img = image::load_from_memory(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(img.width() == 128 && img.height() >= 128, "{name}");
    }
    // Per-step metrics on global steps k·steps + i.
    let steps_of = |name: &str| a.metrics[name].iter().map(|p| p.0).collect::<Vec<_>>();
    assert_eq!(steps_of("leak/<v0>"), (0..12).collect::<Vec<_>>());
    assert_eq!(steps_of("leak/<v1>"), (0..12).collect::<Vec<_>>());
    for m in ["loss/box", "loss/box_after", "gd_iters", "alpha"] {
        assert_eq!(steps_of(m), vec![0, 1, 6, 7], "{m}");
    }
    assert!(a.metrics["gd_iters"]
        .iter()
        .all(|p| p.1 >= 1.0 && p.1 <= 2.0));
}

#[test]
fn observing_attention_does_not_change_plain_sd() {
    let (sd, rows) = model();
    let plain = |attn_metrics: bool| SynthConfig {
        steps: 4,
        box_control: false,
        attn_metrics,
        ..SynthConfig::default()
    };
    let (_, observed) = run(&request(&sd, &rows, plain(true), 9, 1));
    let (_, bare) = run(&request(&sd, &rows, plain(false), 9, 1));
    // The observed run's attention takes the full path (its hook reads every layer), the bare
    // run's the blocked one, so the two agree to float rounding, not bit for bit: at most one
    // grey level apart anywhere (a hook that changed the attention moves pixels by far more).
    let pixels = |sink: &MemorySink| {
        image::load_from_memory(&sink.artifacts["sample_0.png"])
            .unwrap()
            .to_rgb8()
            .into_raw()
    };
    let (a, b) = (pixels(&observed), pixels(&bare));
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(
        worst <= 1,
        "observing attention moved a pixel by {worst} grey levels"
    );
    assert!(!bare.metrics.contains_key("leak/<v0>"));
    assert!(!bare.artifacts.contains_key("attn/<v0>_0.png"));
    assert_eq!(observed.metrics["leak/<v0>"].len(), 4);
}

#[test]
fn cancellation_stops_between_steps() {
    let (sd, rows) = model();
    let cfg = SynthConfig {
        steps: 5,
        guided_steps: 1,
        ..SynthConfig::default()
    };
    let req = request(&sd, &rows, cfg, 1, 2);
    let mut sink = MemorySink {
        stop_after: Some(7),
        ..MemorySink::default()
    };
    let report = synth::run(&req, &mut sink).unwrap();
    assert!(report.cancelled);
    assert_eq!(report.samples.len(), 1);
    assert!(sink.artifacts.contains_key("sample_0.png"));
    assert!(!sink.artifacts.contains_key("sample_1.png"));
    assert_eq!(sink.metrics["leak/<v0>"].len(), 7);
}

/// `synth.joint_stop` (the `official` preset): the samples run in lockstep and stop a guided
/// step's iterations together on the loss summed over samples. Without an early stop the
/// lockstep run draws exactly the independent run's images (each latent moves by its own
/// gradient); with a threshold between the smaller sample's first loss and the mean of both,
/// the independent run stops that sample after one iteration while the joint run goes on
/// for both, and every guided step does as many iterations in each sample.
#[test]
fn joint_stop_runs_samples_in_lockstep_and_stops_them_together() {
    let (sd, rows) = model();
    let cfg = |joint: bool, threshold: f64| SynthConfig {
        steps: 4,
        guided_steps: 2,
        refine: false,
        joint_stop: joint,
        loss_threshold: threshold,
        ..SynthConfig::default()
    };
    let (_, free) = run(&request(&sd, &rows, cfg(false, 0.0), 3, 2));
    let (_, joint) = run(&request(&sd, &rows, cfg(true, 0.0), 3, 2));
    for k in 0..2 {
        let name = format!("sample_{k}.png");
        assert_eq!(free.artifacts[&name], joint.artifacts[&name], "{name}");
    }
    // First losses of step 0 (metric steps 0 and 4), per subject.
    let first: Vec<f64> = [0u64, 4]
        .iter()
        .map(|&s| {
            free.metrics["loss/box"]
                .iter()
                .find(|p| p.0 == s)
                .unwrap()
                .1
                / 2.0
        })
        .collect();
    let (lo, mean) = (first[0].min(first[1]), (first[0] + first[1]) / 2.0);
    assert!(
        lo < mean,
        "the two samples start at the same loss {first:?}"
    );
    let threshold = (lo + mean) / 2.0;
    let iters = |sink: &MemorySink, s: u64| {
        sink.metrics["gd_iters"]
            .iter()
            .find(|p| p.0 == s)
            .unwrap()
            .1
    };
    let lo_k = if first[0] < first[1] { 0 } else { 4 };
    let (_, free) = run(&request(&sd, &rows, cfg(false, threshold), 3, 2));
    assert_eq!(iters(&free, lo_k), 1.0);
    let (_, joint) = run(&request(&sd, &rows, cfg(true, threshold), 3, 2));
    assert!(iters(&joint, 0) >= 2.0 && iters(&joint, 4) >= 2.0);
    for i in 0..2 {
        assert_eq!(iters(&joint, i), iters(&joint, 4 + i), "step {i}");
    }
    // The joint stop cannot be combined with backtracking.
    let bad = SynthConfig {
        backtrack: true,
        ..cfg(true, 0.2)
    };
    assert!(bad
        .check()
        .unwrap_err()
        .to_string()
        .contains("synth.joint_stop"));
}
