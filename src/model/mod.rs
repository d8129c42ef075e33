//! Stable Diffusion in candle, with attention hooks and exact gradients.
//!
//! Every component is built from its own `config.json`, so SD 1.x, SD 2.x and the tiny test
//! models load with the same code. Gradients flow through every op (see [`nn`]).

pub mod attention;
pub mod blocks;
pub mod clip;
pub mod config;
pub mod ddim;
pub mod frozen;
pub mod fused;
pub mod hooks;
pub mod loader;
pub mod nn;
pub mod sample;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod verify;
pub mod weights;

pub use attention::{AttentionHook, AttnCall, AttnKind};
pub use clip::ClipTextModel;
pub use ddim::Ddim;
pub use loader::{ModelShape, StableDiffusion};
pub use unet::UNet;
pub use vae::Vae;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Parses `cpu`, `cuda`, or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| {
                    Error::Input(format!("--device {s}: expected cuda:N with N a number"))
                })?,
                None => 0,
            };
            Device::new_cuda(ordinal).map_err(|e| {
                let e = crate::error::first_line(&e);
                Error::Input(format!(
                    "--device {s}: cannot use CUDA device {ordinal} ({e}); build with `--features cuda` and check the driver"
                ))
            })
        }
        s => Err(Error::Input(format!(
            "--device {s}: expected cpu, cuda or cuda:N"
        ))),
    }
}

/// Parses `f32`, `f16`, or `bf16`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        s => Err(Error::Input(format!(
            "--dtype {s}: expected f32, f16 or bf16"
        ))),
    }
}

/// Fails with a clear message for dtype/device pairs candle cannot run (bf16 on CPU).
pub fn check_dtype_device(dtype: DType, device: &Device) -> Result<()> {
    if dtype == DType::BF16 && device.is_cpu() {
        return Err(Error::Input(
            "--dtype bf16: candle has no bf16 convolution on CPU; use f32 or f16 there".into(),
        ));
    }
    Ok(())
}
