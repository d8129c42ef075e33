//! Run-store benchmark (issue 3): fill a store with synthetic runs, then time open, `runs ls` and
//! `runs show`, and compare the store's size on disk with the raw data it holds.
//!
//! `cargo bench --bench store` (10,000 runs × 6 series × 1,200 points). `MIFO_BENCH_RUNS=N` changes
//! the run count; `MIFO_BENCH_DIR=PATH` keeps the store there instead of a temp folder, and a later
//! run with the same path measures that store again without refilling it (e.g. after dropping the
//! OS page cache, for a cold open).
//! Targets: open ≤ 200 ms, ls ≤ 100 ms, size ≤ 2× raw.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use mifo::cli::runs::{write_ls, write_show, LsFilter};
use mifo::store::{Digest, NewRun, RunKind, RunOutcome, RunSpec, Store, StoreOptions};

const SERIES: [&str; 6] = [
    "loss/total",
    "loss/rec",
    "loss/attn",
    "leak/<v0>",
    "leak/<v1>",
    "lr",
];
const POINTS: u64 = 1200;

fn main() {
    let runs: usize = std::env::var("MIFO_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let temp = tempfile::tempdir().expect("temp dir");
    let dir =
        std::env::var_os("MIFO_BENCH_DIR").map_or_else(|| temp.path().join("store"), Into::into);

    if dir.join("db").is_dir() {
        println!("reusing the store at {}", dir.display());
    } else {
        let started = Instant::now();
        fill(&dir, runs);
        println!(
            "filled {runs} runs x {} series x {POINTS} points in {:.1} s",
            SERIES.len(),
            started.elapsed().as_secs_f64()
        );
    }

    // The first open after writing replays the log written since the last open (sled rebuilds its
    // snapshot then); later opens read the fresh snapshot. Both are printed.
    let mut open_times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let store = Store::open(&dir).expect("open");
        open_times.push(t.elapsed());
        drop(store);
    }
    let store = Store::open(&dir).expect("open");

    let mut ls_times = Vec::new();
    let mut ls_bytes = 0;
    for _ in 0..3 {
        let mut out = Vec::with_capacity(1 << 20);
        let t = Instant::now();
        write_ls(&store, &LsFilter::default(), false, &mut out).expect("ls");
        ls_times.push(t.elapsed());
        ls_bytes = out.len();
    }
    let mut ls_json_times = Vec::new();
    for _ in 0..3 {
        let mut out = Vec::with_capacity(1 << 22);
        let t = Instant::now();
        write_ls(&store, &LsFilter::default(), true, &mut out).expect("ls --json");
        ls_json_times.push(t.elapsed());
    }

    let raw_bytes = raw_size(&store);
    let newest = store.runs().next().expect("a run").expect("record").id;
    let mut show_times = Vec::new();
    let mut show_bytes = 0;
    for _ in 0..3 {
        let mut out = Vec::new();
        let t = Instant::now();
        write_show(&store, &newest, true, &mut out).expect("show --json");
        show_times.push(t.elapsed());
        show_bytes = out.len();
    }
    drop(store);

    let (apparent, allocated) = disk_usage(&dir);
    let best = |times: &[Duration]| times.iter().min().copied().unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "open:          {:8.1} ms first (replays the log since the last open), {:.1} ms after (best of 2)",
        ms(open_times[0]),
        ms(best(&open_times[1..]))
    );
    println!(
        "ls:            {:8.1} ms (best of 3, {runs} rows, {ls_bytes} bytes of text)",
        ms(best(&ls_times))
    );
    println!(
        "ls --json:     {:8.1} ms (best of 3)",
        ms(best(&ls_json_times))
    );
    println!(
        "show --json:   {:8.1} ms (best of 3, {} points, {show_bytes} bytes)",
        ms(best(&show_times)),
        SERIES.len() as u64 * POINTS
    );
    println!(
        "raw data:      {:8.1} MiB (16 bytes per point + spec and record bytes)",
        mib(raw_bytes)
    );
    println!(
        "on disk:       {:8.1} MiB apparent, {:.1} MiB allocated ({:.2}x raw)",
        mib(apparent),
        mib(allocated),
        allocated as f64 / raw_bytes as f64
    );
    let _ = std::io::stdout().flush();
}

/// Raw data held by the store: 16 bytes per metric point (u64 step + f64 value), plus each run's
/// canonical spec and encoded record.
fn raw_size(store: &Store) -> u64 {
    let mut raw = 0u64;
    for record in store.runs() {
        let record = record.expect("record");
        raw += record.summary.values().map(|s| 16 * s.count).sum::<u64>();
        raw += record.encode().expect("encode").len() as u64;
        raw += store
            .spec(&record.spec_hash)
            .expect("spec")
            .canonical_bytes()
            .expect("spec")
            .len() as u64;
    }
    raw
}

/// Fills a new store at `dir` with `runs` finished runs.
fn fill(dir: &Path, runs: usize) {
    let options = StoreOptions {
        sync: false,
        ..StoreOptions::default()
    };
    let store = Store::open_with(dir, true, options).expect("create store");
    let model = Digest::of(b"bench model");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut points = Vec::with_capacity(POINTS as usize);
    for i in 0..runs {
        let lr = [1e-4, 5e-4, 1e-3][i % 3];
        let spec = RunSpec {
            kind: if i % 4 == 0 {
                RunKind::Synth
            } else {
                RunKind::Learn
            },
            config: serde_json::json!({
                "preset": "paper",
                "learn": {"steps": POINTS, "lr": lr, "lambda_attn": 0.01, "batch": 1},
                "scene": format!("scene{}", i % 17),
            }),
            seed: i as u64,
            inputs: Default::default(),
            parent: None,
            model_fingerprint: model,
            code_version: "mifo bench".into(),
        };
        let new = NewRun {
            scene: Some(format!("scene{}", i % 17)),
            config_deltas: vec![("learn.lr".into(), lr.to_string())],
            rerun_of: None,
            model_source: None,
        };
        let record = store.create_run(&spec, new).expect("create");
        store
            .start_run(&record.id, "bench-host", "cpu")
            .expect("start");
        for (s, name) in SERIES.iter().enumerate() {
            points.clear();
            for step in 0..POINTS {
                // Losses come out of candle as f32 and are widened to f64, as in real runs.
                let noise = (next() >> 40) as f32 / (1u64 << 24) as f32 * 0.05;
                let value = 0.8 * (-(step as f32) / (300.0 + 50.0 * s as f32)).exp() + 0.1 + noise;
                points.push((step, f64::from(value)));
            }
            store
                .append_points(&record.id, name, &points)
                .expect("append");
        }
        store
            .finish_run(&record.id, RunOutcome::Done)
            .expect("finish");
    }
    store.flush().expect("flush");
}

fn disk_usage(dir: &Path) -> (u64, u64) {
    let mut apparent = 0;
    let mut allocated = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                apparent += meta.len();
                #[cfg(unix)]
                {
                    use std::os::unix::fs::MetadataExt;
                    allocated += meta.blocks() * 512;
                }
                #[cfg(not(unix))]
                {
                    allocated += meta.len();
                }
            }
        }
    }
    (apparent, allocated)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
