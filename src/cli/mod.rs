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

use clap::{Parser, Subcommand};

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
    /// Default model folder for launches from the workbench [env: MIFO_MODEL].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Default device for launches from the workbench: auto (a free device of the engine's
    /// pool), cpu, cuda or cuda:N. Default: auto in a CUDA build, cpu otherwise.
    #[arg(long, default_value = crate::jobs::pool::default_device())]
    pub device: String,
    /// The subcommand; none opens the workbench (a terminal UI over the store's engine).
    #[command(subcommand)]
    pub command: Option<Command>,
}

fn parse_image_mode(s: &str) -> Result<crate::tui::images::ImageMode, String> {
    s.parse()
}

/// Opens the workbench on the store's engine (starting the engine if needed); the default model
/// folder is `model`, else `$MIFO_MODEL`.
pub fn workbench(
    store: &std::path::Path,
    model: Option<PathBuf>,
    device: &str,
    mode: crate::tui::images::ImageMode,
) -> anyhow::Result<()> {
    crate::tui::run(crate::tui::TuiOptions {
        store: store.to_path_buf(),
        model: model.or_else(|| std::env::var_os("MIFO_MODEL").map(PathBuf::from)),
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
    /// Learn one placeholder token <vK> per instance mask from one image (paper Algorithm 1).
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
}

/// Entry point called by `main.rs`.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        return workbench(&cli.store, cli.model, &cli.device, cli.image_protocol);
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
    }
}
