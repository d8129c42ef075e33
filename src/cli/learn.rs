//! `mifo learn`: learn one placeholder token per mask from one image.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use clap::Args;

use crate::config::{apply_overrides, apply_toml_file, check_sections, parse_override};
use crate::jobs::learn::{launch, resume, LearnJob, RunOptions};
use crate::learn::{scene_files, LearnConfig, SceneFiles};
use crate::store::Store;

/// Arguments of `mifo learn`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  mifo learn --scene fixtures/scenes/coffee --model fixtures/tiny-sd21 --seed 7\n  mifo learn --image img.jpg --mask cup.png --mask spoon.png --model ~/sd21-base --device cuda:0\n  mifo learn --scene DIR --preset official --set learn.penalty_steps=300\n  mifo learn --resume 01HX3 --model ~/sd21-base")]
pub struct LearnArgs {
    /// A scene folder: img.png|jpg plus mask*.png (sorted by name: the first mask is <v0>).
    #[arg(long, conflicts_with_all = ["image", "resume"])]
    pub scene: Option<PathBuf>,
    /// The image (instead of --scene).
    #[arg(long, requires = "mask")]
    pub image: Option<PathBuf>,
    /// A mask per instance, in token order (white = instance; grey or RGBA first channel).
    #[arg(long)]
    pub mask: Vec<PathBuf>,
    /// Diffusers Stable Diffusion folder [env: MIFO_MODEL].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Configuration preset: `paper` (the paper's values) or `official` (the released code's).
    #[arg(long, default_value = "paper")]
    pub preset: String,
    /// A TOML file whose [learn] table overrides the preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. --set learn.penalty_steps=300 (repeatable; after --config).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Seed (default: a random one, printed and stored).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight dtype: f32 (default), f16 or bf16 (GPU).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Accept masks that overlap by more than 5% of the smaller one.
    #[arg(long)]
    pub allow_overlap: bool,
    /// Run again even though a finished run has exactly this spec.
    #[arg(long)]
    pub rerun: bool,
    /// Continue the interrupted learning run RUN (id or unique prefix) from its checkpoint.
    #[arg(long, value_name = "RUN")]
    pub resume: Option<String>,
    /// Print the finished run's record as one JSON document (like `runs show --json`).
    #[arg(long)]
    pub json: bool,
}

/// Resolves the config: preset, then --config, then --set.
pub fn resolve_config(args: &LearnArgs) -> anyhow::Result<LearnConfig> {
    let mut cfg = LearnConfig::preset(&args.preset)?;
    if let Some(path) = &args.config {
        cfg = apply_toml_file(&cfg, "learn", path)?;
    }
    let overrides = args
        .sets
        .iter()
        .map(|s| parse_override(s))
        .collect::<Result<Vec<_>, _>>()?;
    check_sections(&overrides, &["learn"])?;
    let cfg = apply_overrides(&cfg, "learn", &overrides)?;
    cfg.validate()?;
    Ok(cfg)
}

/// First Ctrl-C: stop after the current step (checkpoint kept, run marked cancelled).
/// Second Ctrl-C: quit at once (the run is marked interrupted next time the store opens).
pub fn install_ctrl_c(opts: &RunOptions) {
    let stop = opts.stop.clone();
    let _ = ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (the checkpoint is kept); Ctrl-C again quits now");
    });
}

/// Runs `mifo learn`.
pub fn run(args: LearnArgs, store_dir: &Path) -> anyhow::Result<()> {
    let opts = RunOptions {
        progress_bar: std::io::IsTerminal::is_terminal(&std::io::stderr()) && !args.json,
        ..Default::default()
    };
    if let Some(prefix) = &args.resume {
        let model = crate::jobs::model_dir(args.model.clone())?;
        let store = Store::open(store_dir)?;
        install_ctrl_c(&opts);
        let record = resume(&store, prefix, &model, &args.device, &opts)?;
        return finish(&store, &record.id, args.json);
    }
    let config = resolve_config(&args)?;
    let model = crate::jobs::model_dir(args.model.clone())?;
    let (files, scene_dir) = match (&args.scene, &args.image) {
        (Some(dir), _) => (scene_files(dir)?, Some(dir.clone())),
        (None, Some(image)) => (
            SceneFiles {
                image: image.clone(),
                masks: args.mask.clone(),
            },
            None,
        ),
        (None, None) => anyhow::bail!("give --scene DIR, or --image IMG with one --mask per instance"),
    };
    for p in std::iter::once(&files.image).chain(&files.masks) {
        if !p.is_file() {
            anyhow::bail!("{}: no such file", p.display());
        }
    }
    let seed = args.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let job = LearnJob {
        model,
        files,
        scene_dir,
        preset: args.preset.clone(),
        config,
        seed,
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        allow_overlap: args.allow_overlap,
        rerun: args.rerun,
    };
    if !args.json {
        eprintln!(
            "learning {} instance(s) with preset {} and seed {} ({} steps)",
            job.files.masks.len(),
            job.preset,
            job.seed,
            job.config.total_steps()
        );
    }
    let store = Store::create(store_dir)?;
    install_ctrl_c(&opts);
    let record = launch(&store, &job, &opts)?;
    finish(&store, &record.id, args.json)
}

fn finish(store: &Store, id: &crate::store::RunId, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        crate::cli::runs::write_show(store, id, true, &mut out)?;
    } else {
        let record = store.get_run(id)?;
        eprintln!(
            "run {} {} in store {}",
            record.id,
            record.status.as_str(),
            store.root().display()
        );
        for (name, hash) in &record.outputs {
            eprintln!("  {name:<16} {}", hash.short(12));
        }
        eprintln!("see it with: mifo runs show {}", record.id.as_str());
    }
    Ok(())
}
