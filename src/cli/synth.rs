//! `mifo synth`: draw learned instances (or plain words) into a new scene, each in its box.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::engine::Request;
use crate::jobs::synth::SynthJob;
use crate::synth::SynthConfig;

/// Arguments of `mifo synth`.
#[derive(Args, Debug)]
#[command(
    after_help = "Boxes are normalised x0,y0,x1,y1 with the origin at the top left.\n\nExamples:\n  mifo synth --from 01m8c --model fixtures/tiny-sd21 --prompt \"a photo of <v0> and <v1> on the beach\" \\\n      --box \"<v0>=0.05,0.3,0.45,0.9\" --box \"<v1>=0.55,0.3,0.95,0.9\" --samples 2 --seed 1\n  mifo synth --model ~/sd21-base --prompt \"a dog and a cat in a park\" --box \"dog=0,0.4,0.5,1\" --box \"cat=0.5,0.4,1,1\""
)]
pub struct SynthArgs {
    /// The finished learning run (id or unique prefix) whose tokens <v0>, <v1>, … to use.
    #[arg(long)]
    pub from: Option<String>,
    /// Diffusers model folder (with --from: the one the run learned on) [env: MIFO_MODEL].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt; name each boxed subject in it (`<v0>`, or a word like `dog`).
    #[arg(long)]
    pub prompt: String,
    /// One box per subject: `SUBJECT=x0,y0,x1,y1` (repeatable).
    #[arg(long = "box", value_name = "SUBJECT=x0,y0,x1,y1")]
    pub boxes: Vec<String>,
    /// Number of images (sample k starts from seed + k).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Seed (default: random, printed and stored).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Configuration preset: `paper` or `official`.
    #[arg(long, default_value = "paper")]
    pub preset: String,
    /// A TOML file whose [synth] table overrides the preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. --set synth.steps=30 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight dtype: f32, f16 or bf16 (GPU).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Run again even though a finished run has exactly this spec.
    #[arg(long)]
    pub rerun: bool,
    /// Print the finished run's record as one JSON document.
    #[arg(long)]
    pub json: bool,
    /// Queue the run and return at once with its id.
    #[arg(long)]
    pub detach: bool,
}

/// Resolves the config: preset, then --config, then --set.
pub fn resolve_config(args: &SynthArgs) -> anyhow::Result<SynthConfig> {
    let base = SynthConfig::preset(&args.preset)?;
    let cfg = crate::config::resolve(&base, "synth", args.config.as_deref(), &args.sets)?;
    cfg.check()?;
    Ok(cfg)
}

/// Runs `mifo synth`.
pub fn run(args: SynthArgs, store: &Path) -> anyhow::Result<()> {
    let config = resolve_config(&args)?;
    for b in &args.boxes {
        crate::synth::parse_box(b)?;
    }
    let model = crate::jobs::model_dir(args.model.clone())?;
    let model = std::fs::canonicalize(&model).unwrap_or(model);
    if args.from.is_some() && !store.join("db").is_dir() {
        anyhow::bail!("--from: {} holds no runs yet", store.display());
    }
    let seed = args
        .seed
        .unwrap_or_else(|| u64::from(rand::random::<u32>()));
    if !args.json {
        eprintln!(
            "synthesising {} sample(s), seed {seed}, {} steps",
            args.samples, config.steps
        );
    }
    let job = SynthJob {
        from: args.from.clone(),
        model,
        prompt: args.prompt.clone(),
        boxes: args.boxes.clone(),
        samples: args.samples,
        seed,
        preset: args.preset.clone(),
        config,
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        rerun: args.rerun,
    };
    crate::cli::engine::submit_and_follow(
        store,
        &Request::SubmitSynth(Box::new(job)),
        args.json,
        args.detach,
    )
}
