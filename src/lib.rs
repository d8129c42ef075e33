//! mifo: MIFO (learning and synthesising multiple instances from one image) on Stable Diffusion
//! with candle, plus a reproducible run store and a terminal workbench.

pub mod bench;
pub mod cli;
pub mod config;
pub mod cpu_threads;
pub mod engine;
pub mod error;
pub mod eval;
pub mod imageio;
pub mod jobs;
pub mod learn;
pub mod model;
pub mod runs;
pub mod sink;
pub mod store;
pub mod synth;
pub mod tui;
pub mod verify;
pub mod world;

pub use error::{Error, Result};
