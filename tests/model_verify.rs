//! Parity with diffusers / transformers on the bundled tiny SD 2.1-style pipeline, and one-line
//! errors for broken model folders.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use mifo::verify;

mod cli_support;
use cli_support::copy_dir;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd21")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mifo-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    copy_dir(&fixture(), &d);
    d
}

/// Runs the parity harness on a bundled model folder and its reference; every tensor must pass,
/// and each family of checks must have run.
fn assert_matches_diffusers(dir: &Path, at_least: usize) {
    let checks = verify::verify(dir, &dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{} rel {:.3e} {:?}", c.name, c.max_rel, c.note))
        .collect();
    assert!(
        failed.is_empty(),
        "{}: tensors differ from diffusers: {failed:#?}",
        dir.display()
    );
    let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
    for must in [
        "tokens.prompt_input_ids",
        "text.last_hidden_state",
        "unet.eps",
        "attn_probs.up_blocks.2.attentions.0.transformer_blocks.0.attn1",
        "vae.encoder_mean",
        "vae.decoder_output",
        "ddim.step_prev_sample",
        "grad_a.token_embedding_rows",
        "grad_b.token_embedding_rows",
        "grad_c.latent",
        "grad_c2.latent",
        "mifo.grad_penalty_phase.token_embedding_rows",
        "e2e.image",
        // synthesis against the released MIFO code (synth_reference.safetensors)
        "synth.tokens",
        "synth.timesteps",
        "synth.alpha",
        "synth.beta",
        "synth.loss.0.0",
        "synth.grad.0.0",
        "synth.grad.4.4",
        "synth.mask.cross.step0.normal",
        "synth.mask.self.step0.guidance",
        "synth.mask.cross.step5.normal",
        "synth.refine.self_map",
        "synth.refine.cross_map",
        "synth.refine.labels",
        "synth.refine.masks",
        "synth.latent.8",
    ] {
        assert!(
            names.contains(&must),
            "{}: {must} was not checked",
            dir.display()
        );
    }
    assert!(
        checks.len() >= at_least,
        "{}: only {} tensors checked",
        dir.display(),
        checks.len()
    );
}

#[test]
fn every_reference_tensor_matches_diffusers() {
    assert_matches_diffusers(&fixture(), 160);
}

/// The world's trained base model (another layout: 3 levels, one layer per block, cross-attention
/// in the middle block, 8×8 latents) against its own diffusers reference.
#[test]
fn the_world_model_matches_diffusers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/world-sd");
    assert_matches_diffusers(&dir, 140);
}

/// A model that differs from the reference by 1% in one attention weight must fail, so the
/// parity check is not vacuous.
#[test]
fn a_perturbed_weight_is_caught() {
    let dir = scratch("perturbed");
    let file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let key = "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight";
    let t = tensors.get(key).unwrap();
    tensors.insert(key.to_string(), (t * 1.01).unwrap());
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let checks =
        verify::verify(&dir, &fixture().join("reference.safetensors"), &Device::Cpu).unwrap();
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    assert!(
        failed.contains(&"unet.eps"),
        "perturbation not caught: {failed:?}"
    );
    // The tokenizer and text encoder are untouched and still pass.
    assert!(!failed.contains(&"text.last_hidden_state"));
    let _ = std::fs::remove_dir_all(dir);
}

fn mifo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mifo"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(dir: &Path, needle: &str) {
    let reference = fixture().join("reference.safetensors");
    let (code, _, err) = mifo(&[
        "model",
        "verify",
        dir.to_str().unwrap(),
        reference.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains(needle),
        "error does not mention `{needle}`: {err}"
    );
}

#[test]
fn broken_model_folders_give_one_line_errors() {
    // Missing component folder.
    let d = scratch("novae");
    std::fs::remove_dir_all(d.join("vae")).unwrap();
    assert_one_line_error(&d, "vae");
    let _ = std::fs::remove_dir_all(&d);

    // A config value we do not support.
    let d = scratch("badcfg");
    let p = d.join("unet/config.json");
    let cfg = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        cfg.replace(
            "\"attention_type\": \"default\"",
            "\"attention_type\": \"gated\"",
        ),
    )
    .unwrap();
    assert_one_line_error(&d, "attention_type");
    let _ = std::fs::remove_dir_all(&d);

    // A weight with the wrong shape.
    let d = scratch("badshape");
    let file = d.join("vae/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    tensors.insert(
        "decoder.conv_in.weight".into(),
        candle_core::Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    assert_one_line_error(&d, "decoder.conv_in.weight");
    let _ = std::fs::remove_dir_all(&d);

    // A truncated weight file.
    let d = scratch("truncated");
    let file = d.join("text_encoder/model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    assert_one_line_error(&d, "model.safetensors");
    let _ = std::fs::remove_dir_all(&d);

    // Not a model folder at all.
    let d = std::env::temp_dir().join(format!("mifo-test-{}-empty", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    assert_one_line_error(&d, "model_index.json");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn verify_prints_one_line_per_tensor_and_exits_zero() {
    let dir = fixture();
    let reference = dir.join("reference.safetensors");
    let (code, out, err) = mifo(&[
        "model",
        "verify",
        dir.to_str().unwrap(),
        reference.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.ends_with(" ok")).collect();
    assert!(rows.len() >= 80, "{out}");
    assert!(!out.contains("FAIL"));
}
