//! Helpers shared by the run-store integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use mifo::store::{Digest, NewRun, RunId, RunKind, RunOutcome, RunRecord, RunSpec, Store};

/// A learning spec with `seed` and a small nested config.
pub fn learn_spec(seed: u64) -> RunSpec {
    RunSpec {
        kind: RunKind::Learn,
        config: serde_json::json!({
            "preset": "paper",
            "learn": {"steps": 400, "lr": 0.0005, "lambda_attn": 0.01},
            "tokens": ["<v0>", "<v1>"],
        }),
        seed,
        inputs: BTreeMap::new(),
        parent: None,
        model_fingerprint: Digest::of(b"test model"),
        code_version: "mifo test".to_string(),
    }
}

/// Creates, starts and finishes a run of `spec` with `outputs` (name, bytes) and a short loss curve.
pub fn finished_run(
    store: &Store,
    spec: &RunSpec,
    outputs: &[(&str, &[u8])],
    rerun_of: Option<RunId>,
) -> RunRecord {
    let record = store
        .create_run(
            spec,
            NewRun {
                scene: Some("two-cats".into()),
                config_deltas: vec![("learn.lr".into(), "0.0005".into())],
                rerun_of,
                model_source: None,
            },
        )
        .expect("create");
    store
        .start_run(&record.id, "test-host", "cpu")
        .expect("start");
    for step in 0..10u64 {
        store
            .append_metric(&record.id, "loss/total", step, 1.0 / (1.0 + step as f64))
            .expect("metric");
    }
    for (name, bytes) in outputs {
        store.put_output(&record.id, name, bytes).expect("output");
    }
    store
        .finish_run(&record.id, RunOutcome::Done)
        .expect("finish")
}

/// A fresh store in a temp folder.
pub fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::create(dir.path().join("runs")).expect("create store");
    (dir, store)
}

/// A small RGB PNG (w × h) encoded with the image crate.
pub fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 40) as u8, (y * 40) as u8, 128])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

/// A safetensors file with one f32 tensor per token, shaped `[dim]` (a single vector each).
pub fn embeddings_bytes(tokens: &[&str], dim: usize) -> Vec<u8> {
    let data: Vec<Vec<u8>> = tokens
        .iter()
        .enumerate()
        .map(|(t, _)| {
            (0..dim)
                .flat_map(|i| ((t * 1000 + i) as f32).to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tokens
        .iter()
        .zip(&data)
        .map(|(tok, bytes)| {
            (
                tok.to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![dim], bytes)
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serialize")
}

/// Everything a user can see in the store at `dir` (records, specs, metrics, logs, tags, blob
/// files), as text: equal before and after a command means the command changed nothing.
pub fn store_state(dir: &Path) -> String {
    let store = Store::open(dir).expect("open store");
    let mut state = String::new();
    for record in store.runs() {
        let record = record.expect("record");
        state += &format!("{record:?}\n");
        state += &format!("{:?}\n", store.spec(&record.spec_hash).expect("spec"));
        state += &format!("{:?}\n", store.metrics(&record.id).expect("metrics"));
        state += &format!("{:?}\n", store.logs(&record.id).expect("logs"));
        state += &format!("{:?}\n", store.tags(&record.id).expect("tags"));
    }
    for entry in store.blobs().entries().expect("blobs") {
        state += &format!("{entry:?}\n");
    }
    state
}
