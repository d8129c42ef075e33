//! `mifo learn` from the command line: a stored run with all outputs, refusal and `--rerun` of a
//! finished spec, resume after kill -9 giving the uninterrupted result, and one-line validation
//! errors that leave the store untouched.

mod cli_support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use cli_support::{copy_dir, mifo, root};
use image::{GrayImage, Luma, Rgb, RgbImage};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mifo-learn-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const SHORT: [&str; 10] = [
    "--set",
    "learn.reward_steps=3",
    "--set",
    "learn.penalty_steps=4",
    "--set",
    "learn.dreambooth_steps=2",
    "--set",
    "learn.preview_steps=3",
    "--set",
    "learn.checkpoint_every=2",
];

fn learn_args<'a>(scene: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "learn",
        "--scene",
        scene,
        "--model",
        "fixtures/tiny-sd21",
        "--seed",
        "7",
    ];
    v.extend(SHORT);
    v.extend(extra);
    v
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn learn_stores_a_run_and_refuses_to_repeat_it_silently() {
    let store = tmp("store");
    std::env::set_current_dir(root()).unwrap();
    let mut args = learn_args("fixtures/scenes/coffee", &["--json"]);
    let out = mifo(&store, &args);
    let rec = json(&out);
    assert_eq!(rec["status"], "done");
    assert_eq!(rec["kind"], "learn");
    for name in [
        "embeddings",
        "weights",
        "preview.png",
        "attn/<v0>.png",
        "attn/<v1>.png",
    ] {
        assert!(
            rec["outputs"][name].is_string(),
            "missing {name}: {}",
            rec["outputs"]
        );
    }
    assert_eq!(rec["metrics"]["loss/total"].as_array().unwrap().len(), 9);
    assert!(rec["metrics"]["leak/<v0>"].is_array());

    // Same spec again: refused, nothing new stored.
    let again = mifo(&store, &args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--rerun"));

    // --rerun: runs, and records that its outputs are bit-identical.
    args.push("--rerun");
    let rerun = json(&mifo(&store, &args));
    assert_eq!(rerun["rerun_of"], rec["id"]);
    assert_eq!(
        rerun["rerun_identical"], true,
        "re-run outputs differ: {} vs {}",
        rerun["outputs"], rec["outputs"]
    );
    assert_eq!(rerun["outputs"]["embeddings"], rec["outputs"]["embeddings"]);

    // `runs rerun` runs the stored configuration again; with --set it runs a variant.
    let id = rec["id"].as_str().unwrap();
    let again = json(&mifo(
        &store,
        &[
            "runs",
            "rerun",
            &id[..10],
            "--model",
            "fixtures/tiny-sd21",
            "--json",
        ],
    ));
    assert_eq!(again["rerun_identical"], true);
    let variant = json(&mifo(
        &store,
        &[
            "runs",
            "rerun",
            &id[..10],
            "--model",
            "fixtures/tiny-sd21",
            "--json",
            "--set",
            "learn.penalty_steps=1",
        ],
    ));
    assert_eq!(
        variant["metrics"]["loss/total"].as_array().unwrap().len(),
        6
    );
    assert_ne!(variant["spec_hash"], rec["spec_hash"]);
    let _ = std::fs::remove_dir_all(store);
}

#[test]
fn resume_after_kill_matches_the_uninterrupted_run() {
    std::env::set_current_dir(root()).unwrap();
    let store = tmp("resume");
    let long = [
        "--set",
        "learn.reward_steps=10",
        "--set",
        "learn.penalty_steps=30",
        "--set",
        "learn.dreambooth=none",
        "--set",
        "learn.preview=false",
        "--set",
        "learn.checkpoint_every=5",
    ];
    let mut args: Vec<&str> = vec![
        "learn",
        "--scene",
        "fixtures/scenes/coins",
        "--model",
        "fixtures/tiny-sd21",
        "--seed",
        "3",
    ];
    args.extend(long);
    // Queue the run in the engine, wait until it has passed its first checkpoint (step 5),
    // then kill -9 the engine in the middle of the run.
    let mut detached = args.clone();
    detached.push("--detach");
    let out = mifo(&store, &detached);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (pid, step_at_kill) = kill_engine_at_step(&store, 6);
    println!("killed the engine at step {step_at_kill}/40");
    assert!(
        step_at_kill < 40,
        "the run had finished ({step_at_kill}/40) before the kill"
    );

    let ls = json(&mifo(&store, &["runs", "ls", "--json"]));
    let runs = ls
        .as_array()
        .or_else(|| ls["runs"].as_array())
        .expect("runs list")
        .clone();
    assert_eq!(runs.len(), 1);
    let id = runs[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        runs[0]["status"], "interrupted",
        "a run whose engine (pid {pid}) was killed at step {step_at_kill} must show as interrupted"
    );
    // The step-5 checkpoint is usually there, but the store fsyncs on status changes only, so
    // a kill within sled's flush interval can lose it; the resumed run must match either way
    // (from the checkpoint, or from the start).
    let killed = json(&mifo(&store, &["runs", "show", &id, "--json"]));
    println!(
        "checkpoint kept through the kill: {}",
        killed["outputs"]["checkpoint"].is_string()
    );
    let resumed = json(&mifo(
        &store,
        &[
            "learn",
            "--resume",
            &id[..8],
            "--model",
            "fixtures/tiny-sd21",
            "--json",
        ],
    ));
    assert_eq!(resumed["status"], "done");
    let first = json(&mifo(&store, &["runs", "show", &id, "--json"]));
    let steps: Vec<u64> = first["metrics"]["loss/total"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert_eq!(*steps.last().unwrap(), 39);

    let mut again = args.clone();
    again.extend(["--rerun", "--json"]);
    let clean = json(&mifo(&store, &again));
    assert_eq!(
        clean["outputs"]["embeddings"], first["outputs"]["embeddings"],
        "resumed run's embeddings differ from an uninterrupted run"
    );
    let _ = std::fs::remove_dir_all(store);
}

/// Polls the engine of `store` (through its socket, as any client) until its running job has
/// reported progress step `step` or later, then kills the engine with SIGKILL; returns the
/// engine's pid and the last step it reported.
fn kill_engine_at_step(store: &Path, step: u64) -> (u32, u64) {
    use mifo::engine::{Client, Request, Response};
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut client = Client::connect(store).expect("engine");
    loop {
        let Response::Status(st) = client.request(&Request::Status).expect("status") else {
            panic!("engine: unexpected reply to status")
        };
        let seen = st.progress.as_ref().map(|p| p.0);
        if let Some(at) = seen.filter(|&s| s >= step) {
            // SAFETY: kill(2) on the pid the engine reported; no memory is involved.
            let rc = unsafe { libc::kill(st.pid as libc::pid_t, libc::SIGKILL) };
            assert_eq!(rc, 0, "kill -9 {}", st.pid);
            // Wait for the socket to stop answering, so that the next command sees a dead
            // engine (and its store lock released).
            drop(client);
            while mifo::engine::Client::try_connect(store)
                .ok()
                .flatten()
                .is_some()
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
            return (st.pid, at);
        }
        if st.running.is_none() && st.queue.is_empty() {
            // Idle, or between the queue and the worker: the store says which.
            let Response::Summaries(runs) = client.request(&Request::ListSummaries).expect("ls")
            else {
                panic!("engine: unexpected reply to list")
            };
            assert!(
                runs.iter().all(|r| !r.status.is_final()),
                "the run ended before step {step} was observed: {runs:?}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "no progress past step {step} within 120 s: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn write_rgb(path: &Path, w: u32, h: u32) {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 3) as u8, (y * 5) as u8, 90]))
        .save(path)
        .unwrap();
}

fn write_mask(path: &Path, w: u32, h: u32, on: impl Fn(u32, u32) -> bool) {
    GrayImage::from_fn(w, h, |x, y| Luma([if on(x, y) { 255 } else { 0 }]))
        .save(path)
        .unwrap();
}

fn assert_rejected(store: &Path, args: &[&str], needle: &str) {
    let out = mifo(store, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {args:?}");
    assert!(!err.contains("panicked"), "{err}");
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.contains(needle),
        "error for {args:?} does not mention `{needle}`: {err}"
    );
    assert!(
        !store.join("db").exists() || store_is_empty(store),
        "store was written for {args:?}"
    );
}

fn store_is_empty(store: &Path) -> bool {
    let ls = mifo(store, &["runs", "ls", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap_or_default();
    v.as_array()
        .or_else(|| v["runs"].as_array())
        .map(|a| a.is_empty())
        .unwrap_or(true)
}

#[test]
fn bad_inputs_give_one_line_errors_and_store_nothing() {
    std::env::set_current_dir(root()).unwrap();
    let d = tmp("bad");
    let store = d.join("store");
    let img = d.join("img.png");
    write_rgb(&img, 96, 96);
    let m_left = d.join("left.png");
    write_mask(&m_left, 96, 96, |x, _| x < 40);
    let m_right = d.join("right.png");
    write_mask(&m_right, 96, 96, |x, _| x > 56);
    let m_overlap = d.join("overlap.png");
    write_mask(&m_overlap, 96, 96, |x, _| x < 60);
    let m_empty = d.join("empty.png");
    write_mask(&m_empty, 96, 96, |x, y| x == 0 && y == 0);
    let m_small = d.join("small.png");
    write_mask(&m_small, 80, 96, |x, _| x < 40);
    let tiny = d.join("tiny.png");
    write_rgb(&tiny, 48, 48);
    let tiny_mask = d.join("tiny_mask.png");
    write_mask(&tiny_mask, 48, 48, |x, _| x < 20);
    let junk = d.join("junk.png");
    std::fs::write(&junk, b"not a png").unwrap();
    // A wide image whose centre crop cuts the left instance away.
    let wide = d.join("wide.png");
    write_rgb(&wide, 192, 96);
    let wide_left = d.join("wide_left.png");
    write_mask(&wide_left, 192, 96, |x, _| x < 40);
    let wide_mid = d.join("wide_mid.png");
    write_mask(&wide_mid, 192, 96, |x, _| (80..120).contains(&x));
    // The tiny model with its UNet weights cut in half.
    let broken_model = d.join("broken-model");
    copy_dir(Path::new("fixtures/tiny-sd21"), &broken_model);
    let unet = broken_model.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let base = |image: &Path, masks: &[&Path]| -> Vec<String> {
        let mut v = vec![
            "learn".into(),
            "--model".into(),
            "fixtures/tiny-sd21".into(),
            "--image".into(),
            s(image),
        ];
        for m in masks {
            v.push("--mask".into());
            v.push(s(m));
        }
        v
    };
    let check = |args: Vec<String>, needle: &str| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_rejected(&store, &refs, needle);
    };
    check(base(&junk, &[&m_left]), "junk.png");
    check(base(&img, &[&junk]), "junk.png");
    check(base(&img, &[&m_left, &m_small]), "small.png");
    check(base(&img, &[&m_left, &m_empty]), "empty");
    check(base(&img, &[&m_left, &m_overlap]), "--allow-overlap");
    check(base(&tiny, &[&tiny_mask]), "at least 64");
    let nine: Vec<&Path> = vec![&m_left; 9];
    let mut a = base(&img, &nine);
    a.push("--allow-overlap".into());
    check(a, "at most 8");
    let mut a = base(&img, &[&m_left, &m_right]);
    a.extend(["--set".into(), "learn.no_such_key=1".into()]);
    check(a, "unknown key `learn.no_such_key`");
    let mut a = base(&img, &[&m_left, &m_right]);
    a.extend(["--set".into(), "learn.penalty_steps=lots".into()]);
    check(a, "expected an integer");
    let mut a = base(&img, &[&m_left, &m_right]);
    a.extend(["--preset".into(), "fancy".into()]);
    check(a, "unknown preset");
    let mut a = base(&img, &[&m_left, &m_right]);
    a.extend(["--set".into(), "learn.method=dreambooth".into()]);
    check(
        a,
        "learn.method: expected mifo, break-a-scene, ti-m or db-m",
    );
    let mut a = base(&img, &[&m_left, &m_right]);
    a.extend(["--dtype".into(), "f16".into()]);
    a.extend(["--set".into(), "learn.dreambooth=full".into()]);
    check(a, "learn.dreambooth=lora");
    let mut a = base(&img, &[&m_left, &m_right]);
    a.extend(["--dtype".into(), "tf32".into()]);
    check(a, "--dtype tf32: TF32 is a mode of NVIDIA GPUs");
    let mut a = base(&img, &[&m_left, &m_right]);
    a.extend(["--dtype".into(), "f64".into()]);
    check(a, "expected f32, tf32, f16 or bf16");
    let mut a = base(&img, &[&m_left, &m_right]);
    a[2] = s(&d.join("no-model"));
    check(a, "no-model");
    check(
        base(&wide, &[&wide_left, &wide_mid]),
        "wide_left.png: mask is empty after the centre crop",
    );
    let mut a = base(&img, &[&m_left, &m_right]);
    a[2] = s(&broken_model);
    check(
        a,
        "diffusion_pytorch_model.safetensors: not a valid safetensors file",
    );
    assert!(
        !store.exists() || store_is_empty(&store),
        "a rejected launch wrote to the store"
    );
    let _ = std::fs::remove_dir_all(d);
}

/// Class images are generated once per model and class prompt, then reused by later runs.
#[test]
fn class_images_are_reused_across_runs() {
    std::env::set_current_dir(root()).unwrap();
    let store = tmp("class");
    let args = |seed: &'static str| -> Vec<&'static str> {
        vec![
            "learn",
            "--scene",
            "fixtures/scenes/coffee",
            "--model",
            "fixtures/tiny-sd21",
            "--preset",
            "official",
            "--seed",
            seed,
            "--json",
            "--set",
            "learn.reward_steps=1",
            "--set",
            "learn.penalty_steps=1",
            "--set",
            "learn.dreambooth_steps=2",
            "--set",
            "learn.class_images=2",
            "--set",
            "learn.class_image_steps=2",
            "--set",
            "learn.preview=false",
        ]
    };
    let a = json(&mifo(&store, &args("1")));
    let b = json(&mifo(&store, &args("2")));
    assert_eq!(a["outputs"]["class/1.png"], b["outputs"]["class/1.png"]);
    let log = b["log"].to_string();
    assert!(
        log.contains("2 reused from the store"),
        "second run regenerated its class images: {log}"
    );
    let _ = std::fs::remove_dir_all(store);
}

/// Masks that overlap by more than 5 % are refused unless `--allow-overlap` is given; with it
/// the run trains both instances on them.
#[test]
fn allow_overlap_accepts_overlapping_masks() {
    std::env::set_current_dir(root()).unwrap();
    let d = tmp("overlap");
    let store = d.join("store");
    let img = d.join("img.png");
    write_rgb(&img, 96, 96);
    let left = d.join("left.png");
    write_mask(&left, 96, 96, |x, _| x < 56);
    let wide = d.join("wide.png");
    write_mask(&wide, 96, 96, |x, _| x >= 32);
    let args: Vec<String> = [
        "learn",
        "--model",
        "fixtures/tiny-sd21",
        "--image",
        img.to_str().unwrap(),
        "--mask",
        left.to_str().unwrap(),
        "--mask",
        wide.to_str().unwrap(),
        "--seed",
        "4",
        "--json",
        "--set",
        "learn.reward_steps=1",
        "--set",
        "learn.penalty_steps=1",
        "--set",
        "learn.dreambooth=none",
        "--set",
        "learn.preview=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_rejected(&store, &refs, "--allow-overlap");

    let mut allowed = refs.clone();
    allowed.push("--allow-overlap");
    let rec = json(&mifo(&store, &allowed));
    assert_eq!(rec["status"], "done");
    assert_eq!(rec["metrics"]["loss/total"].as_array().unwrap().len(), 2);
    // Both overlapping masks are the run's inputs, as given.
    assert!(rec["inputs"]["mask0"].is_string(), "{}", rec["inputs"]);
    assert!(rec["inputs"]["mask1"].is_string(), "{}", rec["inputs"]);
    assert_ne!(rec["inputs"]["mask0"], rec["inputs"]["mask1"]);
    let _ = std::fs::remove_dir_all(d);
}

/// `--set learn.method=break-a-scene` runs Break-a-Scene from its own preset (recorded as the
/// run's preset), its attention loss at every step; `mifo learn --help` names the methods.
#[test]
fn learn_runs_a_baseline_method_from_its_preset() {
    std::env::set_current_dir(root()).unwrap();
    let store = tmp("method");
    let rec = json(&mifo(
        &store,
        &[
            "learn",
            "--scene",
            "fixtures/scenes/coffee",
            "--model",
            "fixtures/tiny-sd21",
            "--seed",
            "7",
            "--set",
            "learn.method=break-a-scene",
            "--set",
            "learn.reward_steps=2",
            "--set",
            "learn.dreambooth_steps=1",
            "--set",
            "learn.class_images=1",
            "--set",
            "learn.class_image_steps=2",
            "--set",
            "learn.preview=false",
            "--json",
        ],
    ));
    assert_eq!(rec["status"], "done");
    assert_eq!(rec["metrics"]["loss/attn"].as_array().unwrap().len(), 3);
    assert!(rec["outputs"]["weights"].is_string());
    let shown = mifo(
        &store,
        &["runs", "show", rec["id"].as_str().unwrap(), "--json"],
    );
    let shown = json(&shown);
    let text = shown.to_string();
    assert!(text.contains("\"preset\":\"break-a-scene\""), "{text}");
    assert!(text.contains("\"lr\":0.0005"), "{text}");
    let help = mifo(&store, &["learn", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("learn.method=mifo|break-a-scene|ti-m|db-m"),
        "{help}"
    );
    let _ = std::fs::remove_dir_all(store);
}
