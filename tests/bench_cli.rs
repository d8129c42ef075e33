//! `mifo bench` on the tiny model: the rows it promises, with times and peak memory, and
//! one-line refusals of bad flags. (Timings are printed, never asserted.)

use std::path::Path;
use std::process::{Command, Output};

fn mifo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mifo"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .env_remove("MIFO_MODEL")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bench_times_the_learning_and_synthesis_rows() {
    let rows = "text_encode,learn_phase_a,learn_phase_b_lora,synth_step,kmeans_refine";
    let out = mifo(&["bench", "--iters", "1", "--only", rows, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["size"], 128, "the tiny model's resolution");
    let got: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(got, rows.split(',').collect::<Vec<_>>());
    for r in report["rows"].as_array().unwrap() {
        assert_eq!(r["runs"], 1, "{r}");
        let ms = r["median_ms"].as_f64().unwrap();
        assert!(ms.is_finite() && ms > 0.0, "{r}");
        assert!(r["peak_mib"].as_f64().unwrap() > 1.0, "{r}");
    }
}

#[test]
fn bad_bench_flags_are_refused_in_one_line() {
    for (args, needle) in [
        (
            vec!["bench", "--only", "warp_drive"],
            "unknown row `warp_drive`",
        ),
        (
            vec!["bench", "--size", "256"],
            "--size applies to --shape only",
        ),
        (vec!["bench", "--shape", "sd99"], "--shape sd99: unknown"),
        (
            vec!["bench", "--shape", "sd21-base", "--size", "100"],
            "must be a positive multiple of 64",
        ),
        (vec!["bench", "--iters", "0"], "--iters must be at least 1"),
        (
            vec!["bench", "--dtype", "tf32"],
            "--dtype tf32: TF32 is a mode of NVIDIA GPUs",
        ),
        (
            vec!["bench", "--dtype", "bf16"],
            "--dtype bf16: candle has no bf16 convolution on CPU",
        ),
    ] {
        let out = mifo(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}
