//! mifo: MIFO (learning and synthesising multiple instances from one image) on Stable Diffusion
//! with candle, plus a reproducible run store and a terminal workbench.

pub mod cli;
pub mod error;
pub mod learn;
pub mod model;
pub mod store;

pub use error::{Error, Result};
