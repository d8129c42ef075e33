//! Command line: clap definitions and dispatch. Library errors become one-line messages here.

mod demo;
pub mod engine;
pub mod learn;
mod model;
pub mod runs;
pub mod synth;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mifo: learn several object instances from one image (one mask each) and draw them into new
/// scenes, each in its own box, with Stable Diffusion (MIFO, candle).
#[derive(Parser, Debug)]
#[command(name = "mifo", version, about, long_about = None)]
pub struct Cli {
    /// The run store folder.
    #[arg(long, global = true, env = "MIFO_STORE", default_value = "runs")]
    pub store: PathBuf,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Learn and synthesise on the bundled tiny model and scene: the first thing to try.
    Demo(demo::DemoArgs),
    /// Learn one placeholder token <vK> per instance mask from one image (paper Algorithm 1).
    Learn(Box<learn::LearnArgs>),
    /// Draw learned instances into a new scene, each in its box (paper Algorithm 2).
    Synth(Box<synth::SynthArgs>),
    /// List, inspect, compare, export and maintain stored runs.
    #[command(subcommand)]
    Runs(runs::RunsCommand),
    /// Inspect and check Stable Diffusion model folders.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// The background process that owns the store and runs the jobs.
    #[command(subcommand)]
    Engine(engine::EngineCommand),
}

/// Entry point called by `main.rs`.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::run(args, &cli.store),
        Command::Learn(args) => learn::run(*args, &cli.store),
        Command::Synth(args) => synth::run(*args, &cli.store),
        Command::Runs(cmd) => engine::runs(cmd, &cli.store),
        Command::Model(cmd) => model::run(cmd),
        Command::Engine(cmd) => engine::run(cmd, &cli.store),
    }
}
