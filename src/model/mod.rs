//! Stable Diffusion in candle, with attention hooks and exact gradients.
//!
//! Every component is built from its own `config.json`, so SD 1.x, SD 2.x, SDXL and the tiny
//! test models load with the same code. Gradients flow through every op (see [`nn`]).

pub mod attention;
pub mod blocked_attention;
pub mod blocks;
pub mod checkpoint;
pub mod clip;
pub mod conditioning;
pub mod config;
pub(crate) mod conv;
pub(crate) mod cpu_conv;
#[cfg(feature = "cudnn")]
pub(crate) mod cudnn;
pub mod ddim;
pub mod frozen;
pub mod fused;
pub mod grad_mode;
pub mod hooks;
pub mod loader;
pub mod nn;
pub mod sample;
pub mod sdxl;
pub mod single_file;
pub mod source;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use attention::{AttentionHook, AttnCall, AttnKind};
pub use clip::ClipTextModel;
pub use conditioning::Conditioning;
pub use ddim::Ddim;
pub use grad_mode::{no_grad, NoGrad};
pub use loader::{Component, LoadOptions, ModelShape, StableDiffusion};
pub use source::{ModelSource, SourceKind};
pub use unet::UNet;
pub use vae::Vae;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Parses `cpu`, `cpu:N` (slot N of the engine's CPU test pool: the same CPU), `cuda`, or
/// `cuda:N`. `auto` is the engine's to resolve (its device pool), never a device here.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cpu:") => match s["cpu:".len()..].parse::<usize>() {
            Ok(_) => Ok(Device::Cpu),
            Err(_) => Err(Error::Input(format!(
                "--device {s}: expected cpu:N with N a number"
            ))),
        },
        "auto" => Err(Error::Input(
            "--device auto: only the engine's device pool resolves auto; name a device here (cpu, cuda:N)".into(),
        )),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| {
                    Error::Input(format!("--device {s}: expected cuda:N with N a number"))
                })?,
                None => 0,
            };
            Device::new_cuda(ordinal).map_err(|e| {
                let e = crate::error::first_line(&e);
                let hint = if cfg!(feature = "cuda") {
                    "check the NVIDIA driver and that libcuda.so.1 is the driver's"
                } else {
                    "build with `--features cuda`"
                };
                Error::Input(format!(
                    "--device {s}: cannot use CUDA device {ordinal} ({e}); {hint}"
                ))
            })
        }
        s => Err(Error::Input(format!(
            "--device {s}: expected cpu, cuda or cuda:N"
        ))),
    }
}

/// Parses the `--dtype` spelling: `f32`, `tf32`, `f16` or `bf16`. `tf32` is f32 weights and
/// activations whose matrix products (and the CUDA convolutions, which are built on them) run on
/// the GPU's TF32 tensor cores: inputs rounded to a 10-bit mantissa, sums in f32. It changes
/// nothing until [`enable_precision`] is called for the run about to execute.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" | "tf32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        s => Err(Error::Input(format!(
            "--dtype {s}: expected f32, tf32, f16 or bf16"
        ))),
    }
}

/// [`parse_dtype`] and the device check: bf16 and tf32 are refused on the CPU.
pub fn resolve_dtype(spec: &str, device: &Device) -> Result<DType> {
    let dtype = parse_dtype(spec)?;
    if spec == "tf32" && device.is_cpu() {
        return Err(Error::Input(
            "--dtype tf32: TF32 is a mode of NVIDIA GPUs; use f32 on the CPU".into(),
        ));
    }
    check_dtype_device(dtype, device)?;
    Ok(dtype)
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

/// Whether the run now executing asked for `tf32` (mirrors candle's process-wide switch, whose
/// getter answers `true` in builds without CUDA).
static TF32: AtomicBool = AtomicBool::new(false);

/// Sets candle's process-wide f32 matrix-product mode for a run about to execute with the
/// `--dtype` spelling `spec` (TF32 for `tf32`, full f32 otherwise). Call it where a run starts,
/// never while validating a queued one: the engine runs one job at a time.
pub fn enable_precision(spec: &str) {
    let tf32 = spec == "tf32";
    TF32.store(tf32, Ordering::Relaxed);
    candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
}

/// Whether the run now executing asked for `tf32` ([`enable_precision`]).
pub fn tf32_enabled() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// The `--dtype` spelling of the precision now in force for `dtype` (after
/// [`enable_precision`]).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ if tf32_enabled() => "tf32",
        _ => "f32",
    }
}

/// Helpers shared by the model layer's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::{DType, Tensor};

    /// Largest |a − b| relative to the largest |b|, computed in f64.
    pub(crate) fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (
            a.to_dtype(DType::F64).unwrap(),
            b.to_dtype(DType::F64).unwrap(),
        );
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        diff.to_scalar::<f64>().unwrap() / scale.max(1e-30)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_spellings_parse_and_name_the_precision_in_force() {
        assert_eq!(parse_dtype("tf32").unwrap(), DType::F32);
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("f64").is_err());
        assert!(resolve_dtype("tf32", &Device::Cpu).is_err());
        assert!(resolve_dtype("bf16", &Device::Cpu).is_err());
        assert_eq!(resolve_dtype("f16", &Device::Cpu).unwrap(), DType::F16);
        enable_precision("tf32");
        assert_eq!(dtype_name(DType::F32), "tf32");
        assert_eq!(dtype_name(DType::F16), "f16");
        enable_precision("f32");
        assert_eq!(dtype_name(DType::F32), "f32");
    }

    #[test]
    fn device_spellings_parse_and_say_what_is_wrong() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        let msg = |spec: &str| parse_device(spec).unwrap_err().to_string();
        assert!(msg("gpu").contains("--device gpu: expected cpu, cuda or cuda:N"));
        assert!(msg("cuda:x").contains("expected cuda:N with N a number"));
        if !cfg!(feature = "cuda") {
            let m = msg("cuda:0");
            assert!(
                m.starts_with("--device cuda:0: cannot use CUDA device 0"),
                "{m}"
            );
            assert!(m.ends_with("build with `--features cuda`"), "{m}");
        }
    }
}
