//! `mifo learn`: learn one placeholder token per mask from one image.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::engine::Request;
use crate::jobs::learn::LearnJob;
use crate::learn::{scene_files, LearnConfig, SceneFiles};

/// Arguments of `mifo learn`.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  mifo learn --scene fixtures/scenes/coffee --model fixtures/tiny-sd21 --seed 7\n  mifo learn --image img.jpg --mask cup.png --mask spoon.png --model ~/sd21-base --device cuda:0\n  mifo learn --scene DIR --preset official --set learn.penalty_steps=300\n  mifo learn --scene DIR --set learn.method=break-a-scene   (a baseline: break-a-scene, ti-m or db-m, with its published values)\n  mifo learn --resume 01HX3 --model ~/sd21-base\n  mifo learn --scene DIR --model stabilityai/stable-diffusion-2-1-base   (a repo id from the local Hugging Face cache)\n  mifo learn --scene DIR --model v2-1_512-ema-pruned.safetensors   (a single-file checkpoint)"
)]
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
    /// The model: a diffusers Stable Diffusion folder, a single-file .safetensors checkpoint
    /// (SD 1.x/2.x/XL, A1111 / ComfyUI layout) or a Hugging Face repo id in the local cache
    /// [env: MIFO_MODEL]; with --resume, default: the model the run learned on, while the store
    /// still finds it.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `--revision` / `--model-config` for --model.
    #[command(flatten)]
    pub source: crate::cli::SourceArgs,
    /// Configuration preset: `paper` (the paper's values), `official` (the released code's), or
    /// a baseline's published values: `break-a-scene`, `ti-m`, `db-m` [default: paper, or the
    /// method's own preset when --set/--config choose learn.method].
    #[arg(long)]
    pub preset: Option<String>,
    /// A TOML file whose [learn] table overrides the preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. --set learn.penalty_steps=300 (repeatable; after --config).
    /// learn.method=mifo|break-a-scene|ti-m|db-m chooses the method (MIFO, or the baselines
    /// Break-a-Scene, TI-m and DB-m of the paper's Table 2).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Seed (default: a random one, printed and stored).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Device: auto (a free device of the engine's pool: its GPUs), cpu, cuda or cuda:N (the
    /// run waits for that one). Default: auto in a CUDA build, cpu otherwise.
    #[arg(long, default_value = crate::jobs::pool::default_device())]
    pub device: String,
    /// Weight dtype: f32 (default), tf32 (f32 with TF32 matrix products), f16 or bf16; tf32 and
    /// bf16 on CUDA only.
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
    /// Queue the run and return at once with its id (it runs in the engine).
    #[arg(long)]
    pub detach: bool,
}

/// Resolves the config: preset, then --config, then --set ([`LearnConfig::resolve`]); returns
/// the preset's name with it.
pub fn resolve_config(args: &LearnArgs) -> anyhow::Result<(String, LearnConfig)> {
    let (preset, cfg) =
        LearnConfig::resolve(args.preset.as_deref(), args.config.as_deref(), &args.sets)?;
    cfg.validate()?;
    Ok((preset, cfg))
}

/// The job `mifo learn ARGS` submits (not a resume): config resolved and checked, model and
/// input files found and made absolute, the seed drawn when not given.
pub fn build_job(args: &LearnArgs) -> anyhow::Result<LearnJob> {
    let (preset, config) = resolve_config(args)?;
    let model = crate::jobs::model_source(&args.source.flags(args.model.clone()))?;
    let (files, scene_dir) = match (&args.scene, &args.image) {
        (Some(dir), _) => (scene_files(dir)?, Some(dir.clone())),
        (None, Some(image)) => (SceneFiles::new(image.clone(), args.mask.clone()), None),
        (None, None) => {
            anyhow::bail!("give --scene DIR, or --image IMG with one --mask per instance")
        }
    };
    for p in std::iter::once(&files.image).chain(&files.masks) {
        if !p.is_file() {
            anyhow::bail!("{}: no such file", p.display());
        }
    }
    // The engine may run in another directory: send absolute paths.
    let abs = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
    let files = SceneFiles {
        image: abs(&files.image),
        masks: files.masks.iter().map(abs).collect(),
        world: files.world.as_ref().map(abs),
    };
    let seed = args
        .seed
        .unwrap_or_else(|| u64::from(rand::random::<u32>()));
    Ok(LearnJob {
        model,
        files,
        scene_dir: scene_dir.map(|d| abs(&d)),
        preset,
        config,
        seed,
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        allow_overlap: args.allow_overlap,
        rerun: args.rerun,
    })
}

/// Runs `mifo learn`: validates locally what needs no model, submits the job to the engine
/// (which validates the rest and queues it), then follows it unless `--detach`.
pub fn run(args: LearnArgs, store_dir: &Path) -> anyhow::Result<()> {
    let request = if let Some(prefix) = &args.resume {
        let flags = args.source.flags(args.model.clone());
        let known = if flags.named() {
            None
        } else {
            crate::cli::engine::known_model(store_dir, prefix)?
        };
        let model = crate::jobs::model_for_run(&flags, known, prefix)?;
        Request::ResumeLearn {
            run: prefix.clone(),
            model,
            device: args.device.clone(),
        }
    } else {
        let job = build_job(&args)?;
        if !args.json {
            eprintln!(
                "learning {} instance(s) with method {}, preset {}, seed {}, {} steps",
                job.files.masks.len(),
                job.config.method,
                job.preset,
                job.seed,
                job.config.total_steps()
            );
        }
        Request::SubmitLearn(Box::new(job))
    };
    crate::cli::engine::submit_and_follow(store_dir, &request, args.json, args.detach)
}
