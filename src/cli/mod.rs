//! Command line: clap definitions and dispatch. Library errors become one-line messages here.

mod bench;
mod demo;
pub mod engine;
pub mod eval;
pub mod learn;
mod model;
pub mod runs;
pub mod sweep;
pub mod synth;
pub mod world;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// mifo: learn several object instances from one image (one mask each) and draw them into new
/// scenes, each in its own box, with Stable Diffusion (MIFO, candle).
#[derive(Parser, Debug)]
#[command(
    name = "mifo",
    version,
    about,
    long_about = None,
    after_help = "With no command, mifo opens the workbench (a terminal UI) on the run store.\nNew here? Run `mifo demo`: it learns two instances with the bundled world model and draws them."
)]
pub struct Cli {
    /// The run store folder.
    #[arg(long, global = true, env = "MIFO_STORE", default_value = "runs")]
    pub store: PathBuf,
    /// Workbench images: auto, kitty, sixel, iterm2, halfblocks or off (also for the workbench
    /// that `mifo demo` opens: `mifo --image-protocol halfblocks demo`).
    #[arg(long, default_value = "auto", value_parser = parse_image_mode)]
    pub image_protocol: crate::tui::images::ImageMode,
    /// Default model for launches from the workbench: a diffusers folder, a single-file
    /// .safetensors checkpoint, or a Hugging Face repo id in the local cache [env: MIFO_MODEL].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `--revision` / `--model-config` of the workbench's default model.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Default device for launches from the workbench: auto (a free device of the engine's
    /// pool), cpu, cuda or cuda:N. Default: auto in a CUDA build, cpu otherwise.
    #[arg(long, default_value = crate::jobs::pool::default_device())]
    pub device: String,
    /// The subcommand; none opens the workbench (a terminal UI over the store's engine).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `--revision` and `--model-config`: how `--model` is read when it is a Hugging Face repo id or a
/// single-file checkpoint (flattened next to every `--model`).
#[derive(Args, Debug, Clone, Default)]
pub struct SourceArgs {
    /// With a Hugging Face repo id as --model: the branch, tag or commit hash to take from the
    /// local cache (never downloaded) [default: main].
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// With a single-file .safetensors checkpoint as --model: a diffusers folder (or a repo id
    /// in the local cache) whose configs and tokenizer go with its weights [default: configs
    /// inferred from the checkpoint's keys, mifo's bundled CLIP tokenizer].
    #[arg(long, value_name = "DIR")]
    pub model_config: Option<PathBuf>,
}

impl SourceArgs {
    /// These flags with `--model`.
    pub fn flags(&self, model: Option<PathBuf>) -> crate::jobs::ModelFlags {
        crate::jobs::ModelFlags {
            model,
            revision: self.revision.clone(),
            config: self.model_config.clone(),
        }
    }
}

fn parse_image_mode(s: &str) -> Result<crate::tui::images::ImageMode, String> {
    s.parse()
}

/// Opens the workbench on the store's engine (starting the engine if needed); the default model
/// is `model`, else `$MIFO_MODEL`, resolved now (a repo id or a single file too).
pub fn workbench(
    store: &std::path::Path,
    model: crate::jobs::ModelFlags,
    device: &str,
    mode: crate::tui::images::ImageMode,
) -> anyhow::Result<()> {
    let model = if model.named() {
        Some(crate::jobs::model_source(&model)?)
    } else {
        None
    };
    crate::tui::run(crate::tui::TuiOptions {
        store: store.to_path_buf(),
        model,
        device: device.to_string(),
        image_protocol: mode,
    })
}

/// Top-level subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// The first thing to try: learn two similar instances of a world scene with the bundled
    /// world model, draw them swapped, print the oracle's verdict, open the workbench.
    Demo(demo::DemoArgs),
    /// Learn one placeholder token <vK> per instance mask from one image (paper Algorithm 1;
    /// the baselines with --set learn.method=break-a-scene|ti-m|db-m).
    Learn(Box<learn::LearnArgs>),
    /// Draw learned instances into a new scene, each in its box (paper Algorithm 2).
    Synth(Box<synth::SynthArgs>),
    /// Grids of config values × seeds as runs (`sweep learn|synth`, all tagged with the sweep's
    /// name; finished specs are skipped) and their table (`sweep show NAME --by METRIC`).
    #[command(subcommand)]
    Sweep(sweep::SweepCommand),
    /// List, inspect, compare, export and maintain stored runs.
    #[command(subcommand)]
    Runs(runs::RunsCommand),
    /// Inspect and check Stable Diffusion model folders.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// The background process that owns the store and runs the jobs.
    #[command(subcommand)]
    Engine(engine::EngineCommand),
    /// Score finished runs as the paper does (SIM-C, SIM-D, NSIM-D, CS with CLIP and DINO),
    /// store the scores with them, and print the mean tables of tagged runs.
    Eval(Box<eval::EvalArgs>),
    /// Time the pipeline's operations (learning and synthesis iterations, components) on a
    /// model folder or on SD 2.1-base shapes with random weights; prints a table.
    Bench(bench::BenchArgs),
    /// The procedural world: seeded scenes of flat shapes with exact masks, the data set of its
    /// base model (`fixtures/world-sd/`), and the oracle that scores synthesis on it.
    #[command(subcommand)]
    World(world::WorldCommand),
    /// Run one learning or synthesis run of the store on this machine without its database
    /// (what a Slurm job of an engine started with --executor slurm runs on a compute node).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// `mifo worker`'s flags.
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// The run (its job file is `<store>/work/<run>/job.json`).
    #[arg(long, required_unless_present_any = ["probe", "manifest"])]
    pub run: Option<String>,
    /// Run the run on line SLURM_ARRAY_TASK_ID (0-based) of FILE, one run id per line (a task
    /// of the Slurm job array a sweep is submitted as).
    #[arg(long, value_name = "FILE", conflicts_with = "run")]
    pub manifest: Option<std::path::PathBuf>,
    /// Write this host's name into FILE and exit (the engine's check that compute nodes can
    /// run mifo and write into the store).
    #[arg(long, value_name = "FILE")]
    pub probe: Option<std::path::PathBuf>,
}

/// Entry point called by `main.rs`.
pub fn main() -> anyhow::Result<()> {
    crate::cpu_threads::settle();
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        let model = cli.source.flags(cli.model);
        return workbench(&cli.store, model, &cli.device, cli.image_protocol);
    };
    match command {
        Command::Demo(args) => demo::run(args, &cli.store, cli.image_protocol),
        Command::Learn(args) => learn::run(*args, &cli.store),
        Command::Synth(args) => synth::run(*args, &cli.store),
        Command::Sweep(cmd) => sweep::run(cmd, &cli.store),
        Command::Runs(cmd) => engine::runs(cmd, &cli.store),
        Command::Model(cmd) => model::run(cmd),
        Command::Engine(cmd) => engine::run(cmd, &cli.store),
        Command::Eval(args) => eval::run(*args, &cli.store),
        Command::Bench(args) => bench::run(args),
        Command::World(cmd) => world::run(cmd, &cli.store),
        Command::Worker(args) => worker(args, &cli.store),
    }
}

/// `mifo worker`: one run, or the probe.
fn worker(args: WorkerArgs, store: &std::path::Path) -> anyhow::Result<()> {
    if let Some(file) = args.probe {
        return Ok(crate::jobs::worker::probe(&file)?);
    }
    if let Some(manifest) = args.manifest {
        return Ok(crate::jobs::worker::run_array_task(store, &manifest)?);
    }
    let run = args.run.unwrap_or_default();
    let id: crate::store::RunId = run
        .parse()
        .map_err(|_| anyhow::anyhow!("--run {run}: not a run id"))?;
    Ok(crate::jobs::worker::run(store, &id)?)
}
