//! `mifo bench` on the tiny model: the rows it promises, with times and peak memory, and
//! one-line refusals of bad flags. Timings and memory are checked against what the test sees from
//! outside (the command's wall time, the kernel's peak resident set of the process), never
//! against fixed numbers.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

fn mifo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mifo"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .env_remove("MIFO_MODEL")
        .args(args)
        .output()
        .unwrap()
}

/// The largest resident set (MiB) of any child process this test process has waited for
/// (`getrusage(RUSAGE_CHILDREN)`; Linux reports `ru_maxrss` in KiB).
fn children_peak_rss_mib() -> f64 {
    // SAFETY: rusage is plain old data, for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the rusage we own and pass by unique reference.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0, "getrusage");
    usage.ru_maxrss as f64 / 1024.0
}

#[test]
fn bench_times_the_learning_and_synthesis_rows() {
    let rows = "text_encode,learn_phase_a,learn_phase_b_lora,synth_step,kmeans_refine";
    let started = Instant::now();
    let out = mifo(&["bench", "--iters", "2", "--only", rows, "--json"]);
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["size"], 128, "the tiny model's resolution");
    assert_eq!(report["memory"], "peak resident set of the process, MiB");
    let got: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(got, rows.split(',').collect::<Vec<_>>());
    // The timed iterations all happened inside the command: in milliseconds, their sum cannot
    // exceed its wall time (a wrong unit — µs, or seconds taken as ms twice — breaks this).
    let mut timed_ms = 0.0;
    // The bench process's own peak, measured by the kernel from outside it.
    let process_peak = children_peak_rss_mib();
    for r in report["rows"].as_array().unwrap() {
        assert_eq!(r["runs"], 2, "{r}");
        let median = r["median_ms"].as_f64().unwrap();
        let min = r["min_ms"].as_f64().unwrap();
        assert!(min > 0.0 && min <= median, "{r}");
        timed_ms += median * 2.0;
        // A row's peak is the process's resident set while it ran: at most the process's
        // peak, and not a small fraction of it either (the model and the runtime stay
        // resident throughout); a KiB/MiB or bytes mix-up is off by 1024.
        let peak = r["peak_mib"].as_f64().unwrap();
        assert!(
            peak <= process_peak + 1.0 && peak >= process_peak / 8.0,
            "{}: peak {peak} MiB, process peak {process_peak} MiB",
            r["name"]
        );
    }
    assert!(
        timed_ms <= wall_ms,
        "rows timed {timed_ms} ms in a command of {wall_ms} ms"
    );
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

/// `--full` splits each whole run into its parts (learning phases A and B, the outputs, the
/// preview; synthesis steps, decoding) with their times and peaks, and says what held each
/// peak: the parts add up to the run, every part's columns add up to at most its peak (and the
/// peak to at most the process's), the weights are the model files' tensors, the optimiser holds
/// AdamW's two moments per trained value, and phase B trains more than phase A (its adapters).
#[test]
fn full_runs_are_broken_down_by_part_and_memory_holder() {
    let started = Instant::now();
    let out = mifo(&["bench", "--full", "--full-steps", "4", "--json"]);
    let wall_s = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let process_peak = children_peak_rss_mib();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["breakdown"].as_array().unwrap();
    let parts = |run: &str| -> Vec<&serde_json::Value> {
        rows.iter().filter(|r| r["run"] == run).collect()
    };
    let names = |run: &str| -> Vec<&str> {
        parts(run)
            .iter()
            .map(|r| r["part"].as_str().unwrap())
            .collect()
    };
    assert_eq!(
        names("learn_run"),
        [
            "learning phase A",
            "learning phase B",
            "outputs",
            "preview rendering",
            "outputs"
        ]
    );
    assert_eq!(
        names("synth_image"),
        ["synthesis steps", "decoding and outputs"]
    );
    // The model's tensors as loaded: the f32 safetensors files less their headers.
    let files: u64 = ["unet", "vae"]
        .iter()
        .map(|c| format!("{c}/diffusion_pytorch_model.safetensors"))
        .chain(["text_encoder/model.safetensors".to_string()])
        .map(|f| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/tiny-sd21")
                .join(f);
            std::fs::metadata(p).unwrap().len()
        })
        .sum();
    let files_mib = files as f64 / 1048576.0;
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    for r in rows {
        let weights = f(r, "weights_mib");
        assert!(
            weights <= files_mib && weights >= 0.97 * files_mib,
            "{r}: weights against files of {files_mib} MiB"
        );
        let held: f64 = [
            "weights_mib",
            "trained_mib",
            "optimiser_mib",
            "conv_tiles_mib",
            "resident_before_mib",
            "working_mib",
        ]
        .iter()
        .map(|k| {
            let v = f(r, k);
            assert!(v >= 0.0, "{r}: {k}");
            v
        })
        .sum();
        let peak = f(r, "peak_mib");
        assert!(held <= peak + 1e-6, "{r}: columns add up to {held} MiB");
        assert!(
            peak <= process_peak + 1.0,
            "{r}: process peak {process_peak}"
        );
        let (trained, optimiser) = (f(r, "trained_mib"), f(r, "optimiser_mib"));
        assert!((optimiser - 2.0 * trained).abs() < 1e-9, "{r}");
    }
    let (a, b) = (&parts("learn_run")[0], &parts("learn_run")[1]);
    assert!(f(a, "trained_mib") > 0.0, "{a}");
    assert!(f(b, "trained_mib") > f(a, "trained_mib"), "{a} {b}");
    for s in parts("synth_image") {
        assert_eq!(f(s, "trained_mib"), 0.0, "{s}");
    }
    // Each run's parts add up to its timed row (give or take the clock's setup), and all of it
    // happened inside the command.
    let total_s: f64 = rows.iter().map(|r| f(r, "seconds")).sum();
    assert!(
        total_s <= wall_s,
        "parts {total_s} s in a command of {wall_s} s"
    );
    for run in ["learn_run", "synth_image"] {
        let row = report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == run)
            .unwrap();
        let run_s = f(row, "median_ms") / 1e3;
        let sum: f64 = parts(run).iter().map(|r| f(r, "seconds")).sum();
        assert!(
            (sum - run_s).abs() <= 0.05 * run_s + 0.05,
            "{run}: {sum} s against {run_s} s"
        );
    }
    // The table names every column.
    let table = mifo(&["bench", "--full", "--full-steps", "2"]);
    let text = String::from_utf8_lossy(&table.stdout);
    for needle in [
        "whole runs, part by part",
        "optimiser",
        "working",
        "preview rendering",
    ] {
        assert!(text.contains(needle), "{text}");
    }
}
