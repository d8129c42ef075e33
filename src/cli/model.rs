//! `mifo model …`: parity checks against diffusers references.

use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;

use candle_core::Tensor;

use crate::model::attention::{AttentionHook, AttnCall, AttnKind};
use crate::model::{enable_precision, parse_device, resolve_dtype, StableDiffusion};
use crate::verify;

/// `mifo model` subcommands.
#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Load every component of a model folder and print what mifo sees: the resolved configs,
    /// parameter counts, and the attention layers a hook can address (execution index,
    /// self/cross, module path, feature-map size) for one UNet forward at the given size.
    Info {
        /// The model: a diffusers Stable Diffusion folder, a single-file .safetensors checkpoint
        /// (SD 1.x/2.x/XL, A1111 / ComfyUI layout) or a Hugging Face repo id in the local cache.
        model_dir: PathBuf,
        /// `--revision` / `--model-config` for the model.
        #[command(flatten)]
        source: crate::cli::SourceArgs,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Weight dtype for the forward: f32, tf32, f16 or bf16 (tf32 and bf16: CUDA only).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Image size (pixels, square) for the attention table; default: the UNet's
        /// `sample_size` × the VAE factor (512 for SD 2.1 base).
        #[arg(long)]
        size: Option<usize>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Run this implementation on the inputs stored in a reference file dumped from
    /// diffusers/transformers and compare every output tensor (one line per tensor; exit 1 on
    /// any FAIL). Tolerances: max |err| / max |ref| ≤ 1e-4 forward, ≤ 1e-3 gradients.
    Verify {
        /// The model: a diffusers Stable Diffusion folder (model_index.json, tokenizer/,
        /// text_encoder/, unet/, vae/, scheduler/), a single-file .safetensors checkpoint or a
        /// Hugging Face repo id in the local cache.
        model_dir: PathBuf,
        /// `--revision` / `--model-config` for the model.
        #[command(flatten)]
        source: crate::cli::SourceArgs,
        /// The reference tensors (`reference.safetensors`; `reference.json` must sit beside it);
        /// default: `reference.safetensors` in the model folder.
        reference: Option<PathBuf>,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Run with TF32 matrix products (`--dtype tf32`; CUDA only) to see their error against
        /// the same f32 references and tolerances.
        #[arg(long)]
        tf32: bool,
        /// Print the result as one JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `mifo model` subcommand.
pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Info {
            model_dir,
            source,
            device,
            dtype,
            size,
            json,
        } => {
            let model = crate::jobs::model_source(&source.flags(Some(model_dir)))?;
            info(&model, &device, &dtype, size, json)
        }
        ModelCommand::Verify {
            model_dir,
            source,
            reference,
            device,
            tf32,
            json,
        } => {
            let device = parse_device(&device)?;
            if tf32 && device.is_cpu() {
                anyhow::bail!("--tf32: TF32 is a mode of NVIDIA GPUs; use it with --device cuda");
            }
            enable_precision(if tf32 { "tf32" } else { "f32" });
            let model = crate::jobs::model_source(&source.flags(Some(model_dir)))?;
            let reference = match reference {
                Some(r) => r,
                None if model.path.is_dir() => model.path.join("reference.safetensors"),
                None => bail!(
                    "mifo model verify: name the reference file (the model {} is not a folder)",
                    model.path.display()
                ),
            };
            let checks = verify::verify_source(&model, &reference, &device)?;
            let failed = checks.iter().filter(|c| !c.ok).count();
            if json {
                let rows: Vec<_> = checks
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "name": c.name, "shape": c.shape,
                            "max_abs_err": finite(c.max_abs), "max_rel_err": finite(c.max_rel),
                            "tolerance": c.tolerance, "ok": c.ok, "note": c.note,
                        })
                    })
                    .collect();
                let doc = serde_json::json!({
                    "source": source_json(&model), "checks": rows, "failed": failed,
                    "total": checks.len(),
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("model: {}", model.describe());
                let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(10);
                println!(
                    "{:<width$}  {:<18}  {:>10}  {:>10}  result",
                    "tensor", "shape", "max abs", "max rel"
                );
                for c in &checks {
                    let shape = format!("{:?}", c.shape);
                    let verdict = if c.ok { "ok" } else { "FAIL" };
                    let note = c
                        .note
                        .as_deref()
                        .map(|n| format!("  ({n})"))
                        .unwrap_or_default();
                    println!(
                        "{:<width$}  {:<18}  {:>10.3e}  {:>10.3e}  {verdict}{note}",
                        c.name, shape, c.max_abs, c.max_rel
                    );
                }
                println!(
                    "{} checked, {} ok, {} failed",
                    checks.len(),
                    checks.len() - failed,
                    failed
                );
            }
            if failed > 0 {
                bail!(
                    "{failed} of {} tensors differ from the reference",
                    checks.len()
                );
            }
            Ok(())
        }
    }
}

/// The source as `model info --json` / `model verify --json` give it.
fn source_json(model: &crate::model::ModelSource) -> serde_json::Value {
    serde_json::json!({
        "kind": model.kind, "given": model.given, "path": model.path, "config": model.config,
    })
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Lists every attention call of one forward.
#[derive(Default)]
struct ListCalls {
    rows: Vec<(usize, AttnKind, String, usize, usize, usize, usize)>,
}

impl AttentionHook for ListCalls {
    fn wants(&mut self, call: &AttnCall) -> bool {
        self.rows.push((
            call.index,
            call.kind,
            call.path.to_string(),
            call.height,
            call.width,
            call.heads,
            call.key_len,
        ));
        false
    }
}

fn info(
    model: &crate::model::ModelSource,
    device: &str,
    dtype_spec: &str,
    size: Option<usize>,
    json: bool,
) -> anyhow::Result<()> {
    let device = parse_device(device)?;
    let dtype = resolve_dtype(dtype_spec, &device)?;
    enable_precision(dtype_spec);
    let start = std::time::Instant::now();
    let sd = StableDiffusion::load_source(model, dtype, &device, Vec::new())?;
    let load_s = start.elapsed().as_secs_f64();
    let f = sd.vae.config().factor();
    let size = size.unwrap_or(sd.unet.config().sample_size * f);
    if size == 0 || !size.is_multiple_of(f) {
        bail!("--size {size}: must be a multiple of the VAE factor {f}");
    }
    let uc = sd.unet.config();
    let latent = Tensor::zeros((1, uc.in_channels, size / f, size / f), dtype, &device)?;
    let cond = sd.encode_prompt("", None, (size, size))?;
    let mut calls = ListCalls::default();
    let t = Tensor::new(&[500f32], &device)?;
    let start = std::time::Instant::now();
    sd.unet_forward(&latent, &t, &cond, Some(&mut calls))?;
    let fwd_ms = start.elapsed().as_secs_f64() * 1e3;
    let te = sd.text_encoder.config();
    let sched = sd.scheduler.config();
    if json {
        let doc = serde_json::json!({
            "model": model.path,
            "source": source_json(model),
            "layout": sd.layout,
            "text_encoder": {"layers": te.num_layers, "hidden": te.hidden_size, "heads": te.num_heads,
                              "activation": format!("{:?}", te.activation), "vocab": te.vocab_size},
            "tokenizer": {"pad_id": sd.tokenizer.pad_id(), "max_len": sd.tokenizer.max_len()},
            "unet": {"block_out_channels": uc.block_out_channels, "heads": uc.heads,
                     "layers_per_block": uc.layers_per_block, "cross_attention_dim": uc.cross_attention_dim,
                     "linear_projection": uc.linear_projection},
            "vae": {"block_out_channels": sd.vae.config().block_out_channels, "factor": f,
                    "scaling_factor": sd.vae.config().scaling_factor},
            "scheduler": {"prediction": format!("{:?}", sched.prediction), "steps_offset": sched.steps_offset,
                          "spacing": format!("{:?}", sched.spacing)},
            "load_seconds": load_s, "unet_forward_ms": fwd_ms, "image_size": size,
            "attention": calls.rows.iter().map(|(i, k, p, h, w, heads, keys)| serde_json::json!({
                "index": i, "kind": if *k == AttnKind::SelfAttn {"self"} else {"cross"},
                "path": p, "height": h, "width": w, "heads": heads, "keys": keys})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("model        {}", model.path.display());
    println!("source       {}", model.describe());
    println!("layout       {}", sd.layout);
    println!(
        "text encoder {} layers, hidden {}, {} heads, {:?}, vocab {} (pad id {}, {} tokens)",
        te.num_layers,
        te.hidden_size,
        te.num_heads,
        te.activation,
        te.vocab_size,
        sd.tokenizer.pad_id(),
        sd.tokenizer.max_len()
    );
    if let Some(xl) = &sd.xl {
        let te2 = xl.text_encoder_2.config();
        println!(
            "text enc. 2  {} layers, hidden {}, {} heads, {:?}, projection {} (pad id {}); empty negative prompt {}",
            te2.num_layers,
            te2.hidden_size,
            te2.num_heads,
            te2.activation,
            te2.projection_dim.unwrap_or(0),
            xl.tokenizer_2.pad_id(),
            if xl.force_zeros_for_empty_prompt {
                "= zeros"
            } else {
                "encoded"
            }
        );
    }
    println!(
        "unet         channels {:?}, heads {:?}, layers/block {:?}, cross dim {}, {} projection",
        uc.block_out_channels,
        uc.heads,
        uc.layers_per_block,
        uc.cross_attention_dim,
        if uc.linear_projection {
            "linear"
        } else {
            "conv"
        }
    );
    println!(
        "vae          channels {:?}, factor {f}, scaling {}",
        sd.vae.config().block_out_channels,
        sd.vae.config().scaling_factor
    );
    println!(
        "scheduler    {:?} prediction, {:?} spacing, steps_offset {}",
        sched.prediction, sched.spacing, sched.steps_offset
    );
    println!("loaded in {load_s:.2} s; one UNet forward at {size}x{size} px: {fwd_ms:.1} ms");
    println!();
    println!(
        "{:>5}  {:<5}  {:<56} {:>9}  {:>5}  {:>5}",
        "index", "kind", "path", "size", "heads", "keys"
    );
    for (i, k, p, h, w, heads, keys) in &calls.rows {
        let kind = if *k == AttnKind::SelfAttn {
            "self"
        } else {
            "cross"
        };
        println!(
            "{i:>5}  {kind:<5}  {p:<56} {:>9}  {heads:>5}  {keys:>5}",
            format!("{h}x{w}")
        );
    }
    Ok(())
}
