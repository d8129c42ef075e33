//! The workbench over a real engine ([`EngineBackend`] to an engine serving a temp store in this
//! process, over its unix socket): opening 10,000 runs (timed and printed, not asserted), the
//! backend operations, the launch form's overlap toggle, and a learning run launched from the
//! form on the tiny model, watched to the end, opened, and re-run bit-identically.

mod engine_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mifo::learn::LearnConfig;
use mifo::store::{
    now_ms, Digest, NewRun, RunId, RunKind, RunOutcome, RunSpec, RunStatus, Store, StoreOptions,
};
use mifo::tui::app::View;
use mifo::tui::backend::{Backend, JobState, RerunRequest};
use mifo::tui::driver::SyncDriver;
use mifo::tui::EngineBackend;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Starts an engine on `store_dir` in this process and connects the workbench's backend to it,
/// with `model` as the default model folder (never taken from the environment).
fn engine_backend(store_dir: &Path, model: Option<PathBuf>) -> EngineBackend {
    engine_support::serve_in_thread(store_dir, 1);
    EngineBackend::connect(store_dir.to_path_buf(), model, "cpu").unwrap()
}

fn learn_spec(seed: u64, inputs: BTreeMap<String, Digest>) -> RunSpec {
    let cfg = LearnConfig {
        lr: 0.001 + (seed % 7) as f64 * 1e-4,
        ..LearnConfig::paper()
    };
    RunSpec {
        kind: RunKind::Learn,
        config: serde_json::json!({"preset": "paper", "dtype": "f32", "learn": cfg}),
        seed,
        inputs,
        parent: None,
        model_fingerprint: Digest::of(b"model"),
        code_version: "mifo test".into(),
    }
}

/// Fills `dir` with `n` finished runs (a few with metrics and images), one left running.
fn fill_store(dir: &Path, n: usize) -> Vec<RunId> {
    let store = Store::open_with(
        dir,
        true,
        StoreOptions {
            sync: false,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let scenes = root().join("fixtures/scenes");
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "image".into(),
        store.put_blob_file(&scenes.join("coffee_128.png")).unwrap(),
    );
    inputs.insert(
        "mask0".into(),
        store
            .put_blob_file(&scenes.join("coffee_128_mask0_cup.png"))
            .unwrap(),
    );
    inputs.insert(
        "mask1".into(),
        store
            .put_blob_file(&scenes.join("coffee_128_mask1_spoon.png"))
            .unwrap(),
    );
    let preview = std::fs::read(scenes.join("coins_128.png")).unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let spec = learn_spec(i as u64, inputs.clone());
        let rec = store
            .create_run(
                &spec,
                NewRun {
                    scene: Some(if i % 2 == 0 { "coffee" } else { "coins" }.into()),
                    config_deltas: vec![(
                        "learn.lr".into(),
                        format!("{}", 0.001 + (i % 7) as f64 * 1e-4),
                    )],
                    rerun_of: None,
                    model_source: None,
                },
            )
            .unwrap();
        store.start_run(&rec.id, "host", "cpu").unwrap();
        let detailed = i % 1000 == 0;
        let steps = if detailed { 50 } else { 3 };
        for s in 0..steps {
            store
                .append_metric(
                    &rec.id,
                    "loss/total",
                    s,
                    1.0 / (1.0 + s as f64 + i as f64 * 1e-4),
                )
                .unwrap();
            store
                .append_metric(&rec.id, "phase", s, if s < 20 { 0.0 } else { 1.0 })
                .unwrap();
        }
        if detailed {
            store.put_output(&rec.id, "preview.png", &preview).unwrap();
        }
        if i + 1 < n {
            store.finish_run(&rec.id, RunOutcome::Done).unwrap();
        }
        if i % 500 == 0 {
            store.add_tag(&rec.id, "milestone").unwrap();
        }
        ids.push(rec.id);
    }
    store.flush().unwrap();
    ids
}

#[test]
fn ten_thousand_runs_open_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("runs");
    let t = Instant::now();
    let ids = fill_store(&store_dir, 10_000);
    eprintln!(
        "filled a store with {} runs in {:.1} s",
        ids.len(),
        t.elapsed().as_secs_f64()
    );

    // Startup as `mifo` does it: the engine opens the store (marking the stale running run
    // interrupted), the workbench connects, lists every run, draws the first frame.
    let t = Instant::now();
    let backend = engine_backend(&store_dir, None);
    let opened = t.elapsed();
    let mut d = SyncDriver::new(backend, 160, 48, now_ms(), false);
    let listed = t.elapsed();
    let screen = d.draw();
    let first_frame = t.elapsed();
    assert_eq!(d.app.runs.rows.len(), 10_000);
    assert!(screen.contains("Runs 10000"), "{screen}");
    // The engine marked the run left `running` interrupted before it answered.
    assert_eq!(d.app.runs.rows[0].status, RunStatus::Interrupted);

    // Frame render time of the runs view (averaged), and of the detail view with a chart.
    let frames = 50;
    let t = Instant::now();
    for i in 0..frames {
        d.press(if i % 2 == 0 { "j" } else { "k" });
        d.draw();
    }
    let runs_frame = t.elapsed() / frames;
    let t = Instant::now();
    d.press("/coffee<Enter>");
    let filtered = t.elapsed();
    assert_eq!(d.app.runs.shown.len(), 5_000);
    d.press("<Esc>G<Enter>"); // the oldest run has 50 steps of metrics and a preview
    let screen = d.draw();
    assert!(screen.contains("loss (1/1)"), "{screen}");
    let t = Instant::now();
    for _ in 0..frames {
        d.draw();
    }
    let detail_frame = t.elapsed() / frames;
    eprintln!(
        "10,000 runs: store open {:.1} ms, listed {:.1} ms, first frame drawn {:.1} ms after start; \
         runs frame {:.2} ms, detail frame {:.2} ms, filter keystroke {:.1} ms",
        opened.as_secs_f64() * 1e3,
        listed.as_secs_f64() * 1e3,
        first_frame.as_secs_f64() * 1e3,
        runs_frame.as_secs_f64() * 1e3,
        detail_frame.as_secs_f64() * 1e3,
        filtered.as_secs_f64() * 1e3 / 7.0,
    );
}

#[test]
fn engine_backend_reads_tags_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("runs");
    let ids = fill_store(&store_dir, 3);
    // No model folder: launches are refused with a clear message.
    let backend = engine_backend(&store_dir, None);
    let rows = backend.list_runs().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].id, ids[2]); // newest first
    assert_eq!(rows[0].status, RunStatus::Interrupted);
    assert_eq!(rows[2].tags, vec!["milestone".to_string()]);
    assert!(rows[1].final_loss.is_some());
    let detail = backend.run_detail(&ids[0], 10).unwrap();
    assert_eq!(detail.spec.as_ref().unwrap().inputs.len(), 3);
    assert!(detail.outputs.contains_key("preview.png"));
    let metrics = backend.metrics(&ids[0]).unwrap();
    assert_eq!(metrics["loss/total"].len(), 50);
    let png = backend.blob(&detail.outputs["preview.png"]).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    backend.tag(&ids[1], "keep").unwrap();
    assert!(backend.tag(&ids[1], "two words").is_err());
    assert_eq!(
        backend.list_runs().unwrap()[1].tags,
        vec!["keep".to_string()]
    );
    backend.untag(&ids[1], "keep").unwrap();
    assert!(backend.untag(&ids[1], "keep").is_err());
    backend.delete(&ids[1]).unwrap();
    assert_eq!(backend.list_runs().unwrap().len(), 2);
    assert!(backend.cancel(&ids[0]).is_err()); // not running
    let e = backend
        .rerun(&ids[0], RerunRequest::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no model folder"), "{e}");
}

fn wait_for<B: Backend>(d: &mut SyncDriver<B>, what: &str, done: impl Fn(&SyncDriver<B>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !done(d) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
        d.tick(now_ms());
    }
}

#[test]
fn launch_watch_open_and_rerun_on_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("runs");
    let model = root().join("fixtures/tiny-sd21");
    let backend = engine_backend(&store_dir, Some(model));
    let mut d = SyncDriver::new(backend, 120, 40, now_ms(), true);
    assert!(d.draw().contains("No runs yet"));

    // Launch from the form.
    let scene = root().join("fixtures/scenes/coffee");
    d.press("L");
    d.press(&format!("<Down>{}", scene.display()));
    d.press("<Down><Down><Down><C-u>7<Down><Down><Down>");
    d.press("learn.reward_steps=3 learn.penalty_steps=4 learn.dreambooth_steps=2 learn.preview_steps=3 learn.checkpoint_every=2");
    let form = d.app.launch.as_ref().unwrap();
    assert!(form.check.errors.is_empty(), "{:?}", form.check.errors);
    d.press("<Enter>");
    assert_eq!(d.app.view, View::Jobs);
    assert!(
        d.app
            .status
            .as_ref()
            .unwrap()
            .text
            .contains("queued as job 1"),
        "{:?}",
        d.app.status
    );

    // Watch it finish.
    wait_for(&mut d, "the run to finish", |d| {
        d.app
            .jobs
            .rows
            .first()
            .is_some_and(|j| !j.state.is_active())
    });
    let job = d.app.jobs.rows[0].clone();
    assert_eq!(job.state, JobState::Finished, "{job:?}");
    let run = job.run.clone().unwrap();
    d.tick(now_ms() + 10_000);
    assert_eq!(d.app.row(&run).unwrap().status, RunStatus::Done);

    // Open it from the jobs view: chart, input image and outputs.
    d.press("<Enter>");
    assert_eq!(d.app.view, View::Detail);
    let screen = d.draw();
    assert!(screen.contains("loss (1/"), "{screen}");
    assert!(
        screen.contains("phases reward 0–2 │ penalty 3–6 │ dreambooth 7–8"),
        "{screen}"
    );
    assert!(screen.contains("Output 1/"), "{screen}");
    assert!(screen.contains("preview.png"), "{screen}");
    assert!(screen.contains("<v0>"), "{screen}");

    // Re-run it unchanged: the new run is bit-identical.
    d.press("ry");
    wait_for(&mut d, "the re-run to finish", |d| {
        d.app.jobs.rows.len() == 2 && !d.app.jobs.rows[0].state.is_active()
    });
    let rerun = d.app.jobs.rows[0].run.clone().unwrap();
    assert_eq!(
        d.app.jobs.rows[0].state,
        JobState::Finished,
        "{:?}",
        d.app.jobs.rows[0]
    );
    d.tick(now_ms() + 20_000);
    let row = d.app.row(&rerun).unwrap();
    assert_eq!(row.rerun_of.as_ref(), Some(&run));
    assert_eq!(row.rerun_identical, Some(true));

    // Mark both and compare: same spec, outputs bit-identical.
    d.press("1g<Space><Space>d");
    let screen = d.draw();
    assert!(screen.contains("outputs bit-identical ✓"), "{screen}");

    // Synthesise from the first run with the box editor's default boxes.
    d.press("<Esc>uGS");
    assert_eq!(d.app.view, View::Synth);
    // The official preset and Bounded Attention, chosen in the form.
    d.press(
        "<Down><Down><Down><Right><Down><Right><Down>synth.steps=3 synth.guided_steps=2<Enter>",
    );
    assert_eq!(d.app.view, View::Jobs, "{:?}", d.app.status);
    wait_for(&mut d, "the synthesis to finish", |d| {
        d.app.jobs.rows.len() == 3 && !d.app.jobs.rows[0].state.is_active()
    });
    let job = d.app.jobs.rows[0].clone();
    assert_eq!(job.state, JobState::Finished, "{job:?}");
    d.tick(now_ms() + 30_000);
    let row = d.app.row(job.run.as_ref().unwrap()).unwrap();
    assert_eq!((row.kind, row.status), (RunKind::Synth, RunStatus::Done));
    assert_eq!(row.parent.as_ref(), Some(&run));
    // Its changes are counted from the official preset (no α keys among them), the method first.
    let deltas: Vec<&str> = row.config_deltas.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        row.config_deltas
            .iter()
            .any(|(k, v)| k == "synth.method" && v.contains("bounded-attention")),
        "{:?}",
        row.config_deltas
    );
    assert!(
        !deltas.iter().any(|k| k.starts_with("synth.alpha")),
        "{deltas:?}"
    );
}

/// A scene folder whose two masks are the same (100% overlap).
fn overlapping_scene(dir: &Path) -> PathBuf {
    let scene = dir.join("twins");
    std::fs::create_dir_all(&scene).unwrap();
    let coffee = root().join("fixtures/scenes/coffee");
    let mut mask = None;
    for entry in std::fs::read_dir(&coffee).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("img.") {
            std::fs::copy(&path, scene.join(&name)).unwrap();
        } else if name.starts_with("mask") && mask.is_none() {
            mask = Some(path);
        }
    }
    let mask = mask.expect("a mask in fixtures/scenes/coffee");
    std::fs::copy(&mask, scene.join("mask0.png")).unwrap();
    std::fs::copy(&mask, scene.join("mask1.png")).unwrap();
    scene
}

/// The form's "allow overlapping masks" toggle reaches the engine: without it the engine refuses
/// the scene, with it the run is queued (the engine client used to send `false` always).
#[test]
fn the_overlap_toggle_reaches_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("runs");
    let scene = overlapping_scene(dir.path());
    let backend = engine_backend(&store_dir, Some(root().join("fixtures/tiny-sd21")));
    let mut d = SyncDriver::new(backend, 120, 40, now_ms(), false);
    let fill_form = |d: &mut SyncDriver<EngineBackend>| {
        d.press("L");
        d.press(&format!("<Down>{}", scene.display()));
        d.press("<Down><Down><Down><C-u>7<Down><Down><Down>");
        d.press("learn.reward_steps=1 learn.penalty_steps=1 learn.dreambooth_steps=0 learn.preview_steps=0");
    };

    fill_form(&mut d);
    assert!(!d.app.launch.as_ref().unwrap().allow_overlap);
    d.press("<Enter>");
    let refused = format!("{:?}", d.app.status);
    assert!(refused.contains("overlap"), "{refused}");
    assert!(d.app.jobs.rows.is_empty(), "{:?}", d.app.jobs.rows);

    d.press("<Esc>");
    fill_form(&mut d);
    d.press("<Down><Space>");
    assert!(d.app.launch.as_ref().unwrap().allow_overlap);
    d.press("<Enter>");
    let queued = format!("{:?}", d.app.status);
    assert!(queued.contains("queued as job 1"), "{queued}");
    let job = d.app.jobs.rows[0].clone();
    assert!(
        !matches!(job.state, JobState::Failed(_)),
        "the engine refused the launch: {job:?}"
    );
    d.backend.cancel_job(job.job).unwrap();
    wait_for(&mut d, "the cancelled run to end", |d| {
        !d.app.jobs.rows[0].state.is_active()
    });
}

#[test]
fn engine_backend_reads_a_sweep_table() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("runs");
    // Four runs, `learn.lr` and the seed varying; the first three done and tagged as a sweep.
    // Final losses: the first ran 50 steps (1/50), the others 3 (1/(3 + i·1e-4), falling).
    let ids = fill_store(&store_dir, 4);
    let backend = engine_backend(&store_dir, None);
    for id in &ids[..3] {
        backend.tag(id, "lr-sweep").unwrap();
    }
    let t = backend.sweep_table("lr-sweep", &[]).unwrap();
    assert_eq!(t.keys, ["learn.lr", "seed"]);
    assert_eq!(t.metrics, ["loss/total"]);
    assert!(t.available.contains(&"loss/total".to_string()));
    let order: Vec<&str> = t.rows.iter().map(|r| r.run.as_str()).collect();
    assert_eq!(
        order,
        [ids[0].as_str(), ids[2].as_str(), ids[1].as_str()],
        "best (lowest loss) first"
    );
    let t = backend
        .sweep_table("lr-sweep", &["loss/total:max".to_string()])
        .unwrap();
    assert_eq!(t.rows[0].run, ids[1].as_str());
    let e = backend.sweep_table("nope", &[]).unwrap_err().to_string();
    assert!(e.contains("no run is tagged nope"), "{e}");

    // The workbench over the engine: `w` on a tag filter shows the table.
    let mut d = SyncDriver::new(backend, 120, 20, now_ms(), false);
    d.press("/tag:lr-sweep<Enter>w");
    assert_eq!(d.app.view, View::Sweep);
    let screen = d.draw();
    assert!(screen.contains("Sweep lr-sweep · 3 runs"), "{screen}");
    assert!(screen.contains("learn.lr"), "{screen}");
    assert!(
        screen.contains("best first by loss/total (lower is better)"),
        "{screen}"
    );
}
