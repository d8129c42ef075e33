//! `mifo demo`: the first thing to try. Draws a world scene of two similar instances (same
//! shape, different colours), learns them with the bundled world model (`fixtures/world-sd/`,
//! trained on the world's images), draws them with their places swapped, prints the oracle's
//! verdict (identity, leak, outside, elsewhere per instance) and opens the workbench on the runs.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;

use super::engine::{follow, submit, Submitted};
use super::eval::{BlobCache, EngineSource};
use crate::engine::{Client, Request};
use crate::jobs::learn::LearnJob;
use crate::jobs::synth::SynthJob;
use crate::learn::{scene_files, LearnConfig};
use crate::world::score::{report, score_run};
use crate::world::{Attribute, SceneSpec};

/// Arguments of `mifo demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder holding `world-sd/` (default: the checkout's `fixtures/`).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Run again even if the demo already ran in this store.
    #[arg(long)]
    pub fresh: bool,
    /// Do not open the workbench at the end.
    #[arg(long)]
    pub no_tui: bool,
}

/// The fixtures folder (`--fixtures`, else the checkout's) that holds the model folder `model`.
pub(crate) fn fixtures_dir(flag: Option<PathBuf>, model: &str) -> anyhow::Result<PathBuf> {
    let candidates = flag.into_iter().chain([
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
        PathBuf::from("fixtures"),
    ]);
    for c in candidates {
        if c.join(model).join("model_index.json").is_file() {
            return Ok(std::fs::canonicalize(&c).unwrap_or(c));
        }
    }
    bail!("cannot find the bundled model fixtures/{model}/; run from the mifo checkout or pass --fixtures DIR")
}

/// Submits a job and follows it to its end; a spec that already finished gives that run.
pub(crate) fn run_job(store: &Path, request: Request, what: &str) -> anyhow::Result<String> {
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

/// The demo's scene: two circles that differ only in colour.
const DEMO_SCENE: SceneSpec = SceneSpec {
    seed: 1,
    objects: 2,
    differ: Some(Attribute::Colour),
    size: 64,
};

/// Runs the demo; the workbench it opens at the end shows images with `image_mode`.
pub fn run(
    args: DemoArgs,
    store: &Path,
    image_mode: crate::tui::images::ImageMode,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let fixtures = fixtures_dir(args.fixtures, "world-sd")?;
    let model = fixtures.join("world-sd");
    let scene = DEMO_SCENE.draw()?;
    let scene_dir = store
        .join("demo")
        .join(format!("scene-{}", DEMO_SCENE.seed));
    std::fs::create_dir_all(store)?;
    let file = crate::world::write_scene_folder(&scene, &scene_dir)?;
    let (a, b) = (&file.objects[0], &file.objects[1]);
    eprintln!(
        "mifo demo: the world model {} (a small Stable Diffusion trained on this world's shapes)",
        model.display()
    );
    eprintln!(
        "learns the {} (<v0>) and the {} (<v1>) of one image, {},",
        a.object.noun_phrase(),
        b.object.noun_phrase(),
        scene_dir.join("img.png").display()
    );
    eprintln!(
        "then draws them with their places swapped, and the oracle reads back what it drew.\n"
    );

    let source = crate::model::ModelSource::folder(&model);
    let learn = LearnJob {
        model: source.clone(),
        files: scene_files(&scene_dir)?,
        scene_dir: Some(scene_dir.clone()),
        preset: "paper".into(),
        config: LearnConfig {
            checkpoint_every: 200,
            ..crate::world::learn_config()
        },
        seed: 7,
        device: "cpu".into(),
        dtype: "f32".into(),
        allow_overlap: false,
        rerun: args.fresh,
    };
    let learned = run_job(store, Request::SubmitLearn(Box::new(learn)), "learning")?;

    // Swapped: each instance goes where the other stood (its box keeps the instance's size).
    let boxes = crate::world::bench::Layout::Swapped.boxes(&file, false);
    let synth = SynthJob {
        from: Some(learned.clone()),
        model: source,
        prompt: "a photo of <v0> and <v1>".into(),
        boxes,
        samples: 4,
        seed: 1,
        preset: "paper".into(),
        config: crate::world::synth_config(),
        device: "cpu".into(),
        dtype: "f32".into(),
        rerun: args.fresh,
    };
    let drawn = run_job(store, Request::SubmitSynth(Box::new(synth)), "synthesis")?;

    let verdicts = {
        let mut client = Client::connect(store)?;
        let mut cache = BlobCache::default();
        let verdicts = score_run(
            &mut EngineSource {
                client: &mut client,
                cache: &mut cache,
            },
            &drawn,
        )?;
        client.record_scores(
            &drawn,
            verdicts.metrics(),
            "oracle: scored by mifo demo".into(),
        )?;
        verdicts
    };
    eprintln!(
        "\nThe oracle on the {} images (identity: colour and shape as learned; leak: share of the box in the other instance's colour; outside: share of the instance drawn outside its box; elsewhere: the part of it in objects that miss the box):",
        verdicts.samples.len()
    );
    print!("{}", report(&verdicts));

    let s = store.display();
    let short = |id: &str| id[..8.min(id.len())].to_string();
    eprintln!(
        "\nDone in {:.0} s. Everything is in the run store {s}:",
        started.elapsed().as_secs_f64()
    );
    eprintln!("  mifo --store {s} runs ls                         every run, newest first");
    eprintln!(
        "  mifo --store {s} runs show {} --image sample_0.png",
        short(&drawn)
    );
    eprintln!(
        "  mifo --store {s} runs diff {} {}",
        short(&learned),
        short(&drawn)
    );
    eprintln!(
        "  mifo --store {s} world score {}             the oracle again",
        short(&drawn)
    );
    if !args.no_tui && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        eprintln!("\nOpening the workbench (q quits; the runs stay in the store)…");
        return super::workbench(store, crate::jobs::ModelFlags::default(), "cpu", image_mode);
    }
    Ok(())
}
