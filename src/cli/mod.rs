//! Command line: clap definitions and dispatch. Library errors become one-line messages here.

mod model;

use clap::{Parser, Subcommand};

/// mifo: learn several object instances from one image (one mask each) and draw them into new
/// scenes, each in its own box, with Stable Diffusion (MIFO, candle).
#[derive(Parser, Debug)]
#[command(name = "mifo", version, about, long_about = None)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Inspect and check Stable Diffusion model folders.
    #[command(subcommand)]
    Model(model::ModelCommand),
}

/// Entry point called by `main.rs`.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Model(cmd) => model::run(cmd),
    }
}
