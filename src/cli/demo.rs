//! `mifo demo`: the first thing to try. Learns the two instances of the bundled coffee scene
//! (cup, spoon) with the bundled tiny model, synthesises them into a new scene in two boxes,
//! and prints where everything went.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;

use super::engine::{follow, submit, Submitted};
use crate::engine::Request;
use crate::jobs::learn::LearnJob;
use crate::jobs::synth::SynthJob;
use crate::learn::{scene_files, LearnConfig};
use crate::synth::SynthConfig;

/// Arguments of `mifo demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder holding `tiny-sd21/` and `scenes/` (default: the checkout's `fixtures/`).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Run again even if the demo already ran in this store.
    #[arg(long)]
    pub fresh: bool,
    /// Do not open the workbench at the end.
    #[arg(long)]
    pub no_tui: bool,
}

pub(crate) fn fixtures_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let candidates = flag.into_iter().chain([
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
        PathBuf::from("fixtures"),
    ]);
    for c in candidates {
        if c.join("tiny-sd21/model_index.json").is_file() && c.join("scenes/coffee").is_dir() {
            return Ok(std::fs::canonicalize(&c).unwrap_or(c));
        }
    }
    bail!("cannot find the bundled fixtures (tiny-sd21/ and scenes/); run from the mifo checkout or pass --fixtures DIR")
}

fn run_job(store: &Path, request: Request, what: &str) -> anyhow::Result<String> {
    match submit(store, &request)? {
        Submitted::AlreadyRan(id) => {
            eprintln!("{what}: already done in this store as run {id} (use --fresh to redo)");
            Ok(id)
        }
        Submitted::Queued(id) => {
            eprintln!("{what}: run {id}");
            let status = follow(store, &id, false)?;
            if status != "done" {
                bail!("{what} run {id} ended {status}; see `mifo runs show {id}`");
            }
            Ok(id)
        }
    }
}

/// Runs the demo.
pub fn run(args: DemoArgs, store: &Path) -> anyhow::Result<()> {
    let fixtures = fixtures_dir(args.fixtures)?;
    let model = fixtures.join("tiny-sd21");
    let scene = fixtures.join("scenes/coffee");
    eprintln!(
        "mifo demo: the tiny random-weight model in {} learns the cup (<v0>) and the spoon (<v1>)",
        model.display()
    );
    eprintln!(
        "of {}, then draws them into a new scene, each in its own box.",
        scene.join("img.png").display()
    );
    eprintln!("(Random weights: the pictures are noise-like; the point is the whole pipeline. Use --model with real SD 2.1 weights for real images.)\n");

    let config = LearnConfig {
        reward_steps: 30,
        penalty_steps: 70,
        dreambooth_steps: 20,
        preview_steps: 20,
        checkpoint_every: 50,
        ..LearnConfig::paper()
    };
    let learn = LearnJob {
        model: model.clone(),
        files: scene_files(&scene)?,
        scene_dir: Some(scene),
        preset: "paper".into(),
        config,
        seed: 7,
        device: "cpu".into(),
        dtype: "f32".into(),
        allow_overlap: false,
        rerun: args.fresh,
    };
    let learned = run_job(store, Request::SubmitLearn(Box::new(learn)), "learning")?;

    let synth = SynthJob {
        from: Some(learned.clone()),
        model,
        prompt: "a photo of <v0> and <v1> on a wooden table".into(),
        boxes: vec![
            "<v0>=0.05,0.35,0.5,0.95".into(),
            "<v1>=0.55,0.35,0.95,0.95".into(),
        ],
        samples: 2,
        seed: 1,
        preset: "paper".into(),
        config: SynthConfig {
            steps: 30,
            guided_steps: 10,
            ..SynthConfig::preset("paper")?
        },
        device: "cpu".into(),
        dtype: "f32".into(),
        rerun: args.fresh,
    };
    let drawn = run_job(store, Request::SubmitSynth(Box::new(synth)), "synthesis")?;

    let s = store.display();
    eprintln!("\nEverything is in the run store {s}:");
    eprintln!("  mifo --store {s} runs ls                         every run, newest first");
    eprintln!(
        "  mifo --store {s} runs show {}          learned tokens, losses, outputs",
        &learned[..8.min(learned.len())]
    );
    eprintln!(
        "  mifo --store {s} runs show {} --image sample_0.png",
        &drawn[..8.min(drawn.len())]
    );
    eprintln!(
        "  mifo --store {s} runs diff {} {}",
        &learned[..8.min(learned.len())],
        &drawn[..8.min(drawn.len())]
    );
    eprintln!(
        "  mifo --store {s} runs export {} demo-out      PNGs, metrics CSV, config TOML",
        &drawn[..8.min(drawn.len())]
    );
    Ok(())
}
