//! `mifo model …`: parity checks against diffusers references.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::model::{parse_device, verify};

/// `mifo model` subcommands.
#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Run this implementation on the inputs stored in a reference file dumped from
    /// diffusers/transformers and compare every output tensor (one line per tensor; exit 1 on
    /// any FAIL). Tolerances: max |err| / max |ref| ≤ 1e-4 forward, ≤ 1e-3 gradients.
    Verify {
        /// A diffusers Stable Diffusion folder (model_index.json, tokenizer/, text_encoder/,
        /// unet/, vae/, scheduler/).
        model_dir: PathBuf,
        /// The reference tensors (`reference.safetensors`; `reference.json` must sit beside it).
        reference: PathBuf,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print the result as one JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `mifo model` subcommand.
pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Verify {
            model_dir,
            reference,
            device,
            json,
        } => {
            let device = parse_device(&device)?;
            let checks = verify::verify(&model_dir, &reference, &device)
                .with_context(|| format!("verify {}", model_dir.display()))?;
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
                let doc = serde_json::json!({"checks": rows, "failed": failed, "total": checks.len()});
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(10);
                println!(
                    "{:<width$}  {:<18}  {:>10}  {:>10}  result",
                    "tensor", "shape", "max abs", "max rel"
                );
                for c in &checks {
                    let shape = format!("{:?}", c.shape);
                    let verdict = if c.ok { "ok" } else { "FAIL" };
                    let note = c.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default();
                    println!(
                        "{:<width$}  {:<18}  {:>10.3e}  {:>10.3e}  {verdict}{note}",
                        c.name, shape, c.max_abs, c.max_rel
                    );
                }
                println!("{} checked, {} ok, {} failed", checks.len(), checks.len() - failed, failed);
            }
            if failed > 0 {
                bail!("{failed} of {} tensors differ from the reference", checks.len());
            }
            Ok(())
        }
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}
