//! Run store library: specs, records, ids, metrics, logs, tags, blobs, fingerprints, re-runs,
//! remove, gc and check, on temp-folder stores.

mod store_support;

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, SystemTime};

use mifo::store::{
    diff_runs, model_fingerprint, Digest, NewRun, RunId, RunKind, RunOutcome, RunSpec, RunStatus,
    Store, StoreError, CHUNK_POINTS, SPEC_ENCODING_PREFIX,
};
use store_support::{finished_run, learn_spec, temp_store};

// === Specs ===

#[test]
fn spec_hash_is_pinned() {
    let mut inputs = BTreeMap::new();
    inputs.insert("image".to_string(), Digest::of(b"image bytes"));
    let spec = RunSpec {
        kind: RunKind::Synth,
        config: serde_json::json!({"prompt": "a photo of <v0>", "steps": 50, "guidance": 7.5, "boxes": [[0.1, 0.2, 0.5, 1.0]]}),
        seed: 42,
        inputs,
        parent: Some("01h0000000000000".parse().unwrap()),
        model_fingerprint: Digest::of(b"model"),
        code_version: "mifo 0.1.0".to_string(),
    };
    let bytes = spec.canonical_bytes().unwrap();
    let expected = format!(
        "mifo-runspec/1\n{{\"code_version\":\"mifo 0.1.0\",\"config\":{{\"boxes\":[[0.1,0.2,0.5,1]],\"guidance\":7.5,\"prompt\":\"a photo of <v0>\",\"steps\":50}},\"inputs\":{{\"image\":\"{}\"}},\"kind\":\"synth\",\"model_fingerprint\":\"{}\",\"parent\":\"01h0000000000000\",\"seed\":42}}",
        Digest::of(b"image bytes"),
        Digest::of(b"model")
    );
    assert_eq!(String::from_utf8(bytes.clone()).unwrap(), expected);
    assert!(bytes.starts_with(SPEC_ENCODING_PREFIX));
    // If this changes, every stored spec hash changes: bump the encoding version instead.
    assert_eq!(
        spec.spec_hash().unwrap().to_hex(),
        "2f8a04d1215a1d059077cf0dcc855317dccbe762f976da2850e08a6d14c8b442"
    );
    // Decoding the canonical form gives a spec with the same hash.
    let decoded = RunSpec::from_canonical(&bytes, "test spec").unwrap();
    assert_eq!(decoded.spec_hash().unwrap(), spec.spec_hash().unwrap());
}

#[test]
fn spec_hash_ignores_key_order_and_float_spelling_but_not_values() {
    let a = learn_spec(1);
    let mut b = learn_spec(1);
    b.config = serde_json::from_str(r#"{"tokens":["<v0>","<v1>"],"learn":{"lambda_attn":0.01,"lr":5e-4,"steps":400.0},"preset":"paper"}"#).unwrap();
    assert_eq!(a.spec_hash().unwrap(), b.spec_hash().unwrap());
    assert_ne!(a.spec_hash().unwrap(), learn_spec(2).spec_hash().unwrap());
    let mut c = learn_spec(1);
    c.config["learn"]["lr"] = serde_json::json!(0.0006);
    assert_ne!(a.spec_hash().unwrap(), c.spec_hash().unwrap());
    let mut d = learn_spec(1);
    d.code_version = "mifo 0.2.0".into();
    assert_ne!(a.spec_hash().unwrap(), d.spec_hash().unwrap());
}

#[test]
fn corrupt_spec_bytes_are_errors_naming_the_spec() {
    assert!(RunSpec::from_canonical(b"garbage", "spec X")
        .unwrap_err()
        .to_string()
        .contains("spec X"));
    let mut bytes = SPEC_ENCODING_PREFIX.to_vec();
    bytes.extend_from_slice(b"{\"kind\":\"learn\"");
    assert!(RunSpec::from_canonical(&bytes, "spec Y")
        .unwrap_err()
        .to_string()
        .contains("spec Y"));
}

// === Opening ===

#[test]
fn opening_a_missing_store_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nothing-here");
    let err = Store::open(&path).err().expect("must fail");
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    assert!(err.to_string().contains("nothing-here"));
    assert!(!path.exists());
}

#[test]
fn a_second_open_of_the_same_store_is_refused() {
    let (dir, _store) = temp_store();
    let err = Store::open(dir.path().join("runs")).err().expect("locked");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
}

#[test]
fn a_newer_schema_version_is_refused() {
    let (dir, store) = temp_store();
    drop(store);
    {
        let db = open_sled(&dir.path().join("runs/db"));
        db.open_tree("meta")
            .unwrap()
            .insert("schema_version", &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(dir.path().join("runs"))
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

// === Runs ===

#[test]
fn a_run_goes_through_its_life_and_survives_reopen() {
    let (dir, store) = temp_store();
    let spec = learn_spec(7);
    let created = store.create_run(&spec, NewRun::default()).unwrap();
    assert_eq!(created.status, RunStatus::Queued);
    assert_eq!(created.spec_hash, spec.spec_hash().unwrap());
    let started = store.start_run(&created.id, "host-a", "cuda:0").unwrap();
    assert_eq!(started.status, RunStatus::Running);
    assert_eq!(started.pid, Some(std::process::id()));
    assert!(
        store.start_run(&created.id, "host-a", "cpu").is_err(),
        "a running run cannot start again"
    );
    let hash = store
        .put_output(&created.id, "embeddings", b"tensor bytes")
        .unwrap();
    store
        .append_metric(&created.id, "loss/total", 0, 0.5)
        .unwrap();
    store
        .append_metric(&created.id, "loss/total", 1, 0.25)
        .unwrap();
    store.append_log(&created.id, "step 1").unwrap();
    let done = store.finish_run(&created.id, RunOutcome::Done).unwrap();
    assert_eq!(done.status, RunStatus::Done);
    assert!(done.finished_ms >= done.started_ms);
    assert_eq!(done.summary["loss/total"].last, 0.25);
    assert_eq!(done.summary["loss/total"].min, 0.25);
    assert_eq!(done.summary["loss/total"].count, 2);
    // A finished run is immutable.
    assert!(store.put_output(&created.id, "x", b"y").is_err());
    assert!(store
        .append_metric(&created.id, "loss/total", 2, 0.1)
        .is_err());
    assert!(store
        .finish_run(&created.id, RunOutcome::Cancelled)
        .is_err());
    drop(store);

    let store = Store::open(dir.path().join("runs")).unwrap();
    assert_eq!(store.get_run(&created.id).unwrap(), done);
    assert_eq!(store.spec(&done.spec_hash).unwrap(), spec);
    assert_eq!(store.read_blob(&hash).unwrap(), b"tensor bytes");
    assert_eq!(store.logs(&created.id).unwrap(), ["step 1"]);
}

#[test]
fn failed_and_cancelled_runs_keep_their_error() {
    let (_dir, store) = temp_store();
    let a = store.create_run(&learn_spec(1), NewRun::default()).unwrap();
    store.start_run(&a.id, "h", "cpu").unwrap();
    let failed = store
        .finish_run(&a.id, RunOutcome::Failed("out of memory".into()))
        .unwrap();
    assert_eq!(
        (failed.status, failed.error.as_deref()),
        (RunStatus::Failed, Some("out of memory"))
    );
    let b = store.create_run(&learn_spec(2), NewRun::default()).unwrap();
    let cancelled = store.finish_run(&b.id, RunOutcome::Cancelled).unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    let c = store.create_run(&learn_spec(3), NewRun::default()).unwrap();
    assert!(
        store.finish_run(&c.id, RunOutcome::Done).is_err(),
        "a queued run cannot be done"
    );
}

#[test]
fn run_ids_increase_and_list_newest_first() {
    let (_dir, store) = temp_store();
    let ids: Vec<RunId> = (0..300)
        .map(|i| {
            store
                .create_run(&learn_spec(i), NewRun::default())
                .unwrap()
                .id
        })
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids must be strictly increasing"
    );
    let listed: Vec<RunId> = store.runs().map(|r| r.unwrap().id).collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    assert_eq!(store.run_count(), 300);
    let age = ids[0].unix_ms().abs_diff(mifo::store::now_ms());
    assert!(age < 60_000, "ids encode the creation time");
}

#[test]
fn run_prefixes_resolve_or_say_what_is_wrong() {
    let (_dir, store) = temp_store();
    let a = store
        .create_run(&learn_spec(1), NewRun::default())
        .unwrap()
        .id;
    let b = store
        .create_run(&learn_spec(2), NewRun::default())
        .unwrap()
        .id;
    assert_eq!(store.resolve(a.as_str()).unwrap(), a);
    assert_eq!(store.resolve(&a.as_str().to_uppercase()).unwrap(), a);
    // The two ids share their time prefix: a short prefix is ambiguous and the error lists both.
    let common = a
        .as_str()
        .bytes()
        .zip(b.as_str().bytes())
        .take_while(|(x, y)| x == y)
        .count();
    assert!(common >= 4);
    let err = store.resolve(&a.as_str()[..common]).unwrap_err();
    assert!(
        matches!(err, StoreError::AmbiguousRun { total: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(a.as_str()) && err.to_string().contains(b.as_str()));
    assert_eq!(store.resolve(&b.as_str()[..common + 1]).unwrap(), b);
    let err = store.resolve("zzzz").unwrap_err();
    assert!(matches!(err, StoreError::UnknownRun(_)), "{err}");
    assert!(err.to_string().contains("zzzz"));
    let err = store.resolve("01-x").unwrap_err();
    assert!(matches!(err, StoreError::InvalidRunId(_)), "{err}");
    assert!(store.resolve("").is_err());
}

#[test]
fn create_run_checks_inputs_parent_and_rerun() {
    let (_dir, store) = temp_store();
    let mut spec = learn_spec(1);
    spec.inputs
        .insert("image".into(), Digest::of(b"never stored"));
    let err = store.create_run(&spec, NewRun::default()).unwrap_err();
    assert!(err.to_string().contains("input image"), "{err}");
    spec.inputs
        .insert("image".into(), store.put_blob(b"image").unwrap());
    store.create_run(&spec, NewRun::default()).unwrap();

    let mut synth = learn_spec(1);
    synth.kind = RunKind::Synth;
    synth.parent = Some(RunId::from_parts(1, 1));
    assert!(matches!(
        store.create_run(&synth, NewRun::default()),
        Err(StoreError::UnknownRun(_))
    ));

    let earlier = finished_run(&store, &learn_spec(5), &[], None);
    let new = NewRun {
        rerun_of: Some(earlier.id.clone()),
        ..NewRun::default()
    };
    let err = store.create_run(&learn_spec(6), new).unwrap_err();
    assert!(err.to_string().contains("same spec"), "{err}");
}

// === Re-runs ===

#[test]
fn finished_specs_are_found_and_reruns_record_bit_identity() {
    let (_dir, store) = temp_store();
    let spec = learn_spec(11);
    let hash = spec.spec_hash().unwrap();
    assert!(store.done_runs_with_spec(&hash).unwrap().is_empty());
    let first = finished_run(
        &store,
        &spec,
        &[("embeddings", b"E1"), ("image0", b"I1")],
        None,
    );
    assert_eq!(first.rerun_identical, None);
    let found = store.done_runs_with_spec(&hash).unwrap();
    assert_eq!(found.iter().map(|r| &r.id).collect::<Vec<_>>(), [&first.id]);

    let same = finished_run(
        &store,
        &spec,
        &[("embeddings", b"E1"), ("image0", b"I1")],
        Some(first.id.clone()),
    );
    assert_eq!(same.rerun_of.as_ref(), Some(&first.id));
    assert_eq!(same.rerun_identical, Some(true));
    let differs = finished_run(
        &store,
        &spec,
        &[("embeddings", b"E1"), ("image0", b"I2")],
        Some(first.id.clone()),
    );
    assert_eq!(differs.rerun_identical, Some(false));
    let missing = finished_run(
        &store,
        &spec,
        &[("embeddings", b"E1")],
        Some(first.id.clone()),
    );
    assert_eq!(
        missing.rerun_identical,
        Some(false),
        "a missing output is not identical"
    );
    assert_eq!(store.done_runs_with_spec(&hash).unwrap().len(), 4);
    // Runs that did not finish do not count as "already ran".
    let queued = store
        .create_run(&learn_spec(12), NewRun::default())
        .unwrap();
    assert!(store
        .done_runs_with_spec(&queued.spec_hash)
        .unwrap()
        .is_empty());
}

// === Metrics, logs, tags ===

#[test]
fn metrics_are_chunked_exact_and_visible_while_buffered() {
    let (dir, store) = temp_store();
    let run = store
        .create_run(&learn_spec(1), NewRun::default())
        .unwrap()
        .id;
    store.start_run(&run, "h", "cpu").unwrap();
    let n = CHUNK_POINTS * 2 + 100;
    let points: Vec<(u64, f64)> = (0..n as u64)
        .map(|s| (s * 10, (s as f64).sin() / 3.0))
        .collect();
    for &(step, value) in &points {
        store
            .append_metric(&run, "loss/total", step, value)
            .unwrap();
    }
    store.append_metric(&run, "alpha", 0, f64::NAN).unwrap();
    // 100 points are still buffered, yet visible.
    assert_eq!(store.metric_series(&run, "loss/total").unwrap(), points);
    assert!(store.metrics(&run).unwrap()["alpha"][0].1.is_nan());
    assert!(store.append_metric(&run, "", 0, 1.0).is_err());
    assert!(store.append_metric(&run, "bad\nname", 0, 1.0).is_err());
    let done = store.finish_run(&run, RunOutcome::Done).unwrap();
    assert_eq!(done.summary["loss/total"].count, n as u64);
    drop(store);

    // Stored as 3 chunks of the one series, not one key per point.
    let db = open_sled(&dir.path().join("runs/db"));
    let metrics = db.open_tree("metrics").unwrap();
    let loss_keys = metrics
        .scan_prefix(run.as_bytes())
        .keys()
        .filter(|k| k.as_ref().unwrap().windows(10).any(|w| w == b"loss/total"))
        .count();
    assert_eq!(loss_keys, 3);
    drop(metrics);
    drop(db);
    let store = Store::open(dir.path().join("runs")).unwrap();
    assert_eq!(store.metric_series(&run, "loss/total").unwrap(), points);
}

#[test]
fn metric_chunks_and_logs_continue_across_reopen() {
    let (dir, store) = temp_store();
    let run = store
        .create_run(&learn_spec(1), NewRun::default())
        .unwrap()
        .id;
    store.start_run(&run, "h", "cpu").unwrap();
    for step in 0..700u64 {
        store
            .append_metric(&run, "loss/total", step, step as f64)
            .unwrap();
    }
    store.append_log(&run, "first session").unwrap();
    drop(store); // a clean exit writes the 188 buffered points as a partial chunk

    let store = Store::open(dir.path().join("runs")).unwrap();
    assert_eq!(store.metric_series(&run, "loss/total").unwrap().len(), 700);
    assert!(
        store.append_metric(&run, "loss/total", 700, 1.0).is_err(),
        "not this process's run"
    );
    assert_eq!(
        store.mark_stale_running_interrupted().unwrap(),
        std::slice::from_ref(&run)
    );
    let interrupted = store.get_run(&run).unwrap();
    assert_eq!(interrupted.status, RunStatus::Interrupted);
    assert_eq!(interrupted.summary["loss/total"].last, 699.0);
    store.resume_run(&run, "h", "cpu").unwrap();
    for step in 700..1100u64 {
        store
            .append_metric(&run, "loss/total", step, step as f64)
            .unwrap();
    }
    store.append_log(&run, "second session").unwrap();
    store.finish_run(&run, RunOutcome::Done).unwrap();
    drop(store);

    let store = Store::open(dir.path().join("runs")).unwrap();
    let series = store.metric_series(&run, "loss/total").unwrap();
    assert_eq!(
        series,
        (0..1100u64).map(|s| (s, s as f64)).collect::<Vec<_>>()
    );
    assert_eq!(
        store.logs(&run).unwrap(),
        ["first session", "second session"]
    );
    assert!(store.check().unwrap().is_clean());
}

#[test]
fn stale_running_runs_are_marked_only_when_asked_and_only_if_not_live() {
    let (dir, store) = temp_store();
    let stale = store
        .create_run(&learn_spec(1), NewRun::default())
        .unwrap()
        .id;
    store.start_run(&stale, "h", "cpu").unwrap();
    let queued = store
        .create_run(&learn_spec(2), NewRun::default())
        .unwrap()
        .id;
    drop(store);

    let store = Store::open(dir.path().join("runs")).unwrap();
    assert_eq!(
        store.get_run(&stale).unwrap().status,
        RunStatus::Running,
        "open alone changes nothing"
    );
    assert_eq!(store.check().unwrap().stale_running, [stale.to_string()]);
    let live = store
        .create_run(&learn_spec(3), NewRun::default())
        .unwrap()
        .id;
    store.start_run(&live, "h", "cpu").unwrap();
    assert_eq!(
        store.mark_stale_running_interrupted().unwrap(),
        std::slice::from_ref(&stale)
    );
    let record = store.get_run(&stale).unwrap();
    assert_eq!(record.status, RunStatus::Interrupted);
    assert!(record.error.unwrap().contains("stopped"));
    assert_eq!(store.get_run(&live).unwrap().status, RunStatus::Running);
    assert_eq!(store.get_run(&queued).unwrap().status, RunStatus::Queued);
    assert!(store.mark_stale_running_interrupted().unwrap().is_empty());
}

#[test]
fn tags_are_added_listed_and_removed() {
    let (_dir, store) = temp_store();
    let a = store
        .create_run(&learn_spec(1), NewRun::default())
        .unwrap()
        .id;
    let b = store
        .create_run(&learn_spec(2), NewRun::default())
        .unwrap()
        .id;
    store.add_tag(&a, "best").unwrap();
    store.add_tag(&a, "paper").unwrap();
    store.add_tag(&b, "paper").unwrap();
    assert_eq!(store.tags(&a).unwrap(), ["best", "paper"]);
    let all = store.all_tags().unwrap();
    assert_eq!(all[&b], ["paper"]);
    assert!(store.remove_tag(&a, "best").unwrap());
    assert!(!store.remove_tag(&a, "best").unwrap());
    assert_eq!(store.tags(&a).unwrap(), ["paper"]);
    assert!(store.add_tag(&a, "two words").is_err());
    assert!(store.add_tag(&a, "").is_err());
    assert!(
        store.add_tag(&RunId::from_parts(1, 1), "x").is_err(),
        "unknown run"
    );
}

// === Blobs and corruption ===

#[test]
fn blobs_are_content_addressed_and_deduplicated() {
    let (dir, store) = temp_store();
    let hash = store.put_blob(b"hello").unwrap();
    assert_eq!(hash, Digest::of(b"hello"));
    assert_eq!(store.put_blob(b"hello").unwrap(), hash);
    let path = store.blobs().path(&hash);
    assert!(path.starts_with(dir.path().join("runs/blobs").join(&hash.to_hex()[..2])));
    let source = dir.path().join("big.bin");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(&source, &big).unwrap();
    let big_hash = store.put_blob_file(&source).unwrap();
    assert_eq!(big_hash, Digest::of(&big));
    assert_eq!(store.read_blob(&big_hash).unwrap(), big);
    assert!(
        fs::read_dir(dir.path().join("runs/blobs/tmp"))
            .unwrap()
            .next()
            .is_none(),
        "no temp files left"
    );
}

#[test]
fn corrupt_or_truncated_blobs_are_named_errors() {
    let (_dir, store) = temp_store();
    let hash = store.put_blob(b"some output bytes").unwrap();
    let path = store.blobs().path(&hash);
    fs::write(&path, b"some output").unwrap(); // truncated
    let err = store.read_blob(&hash).unwrap_err();
    assert!(matches!(err, StoreError::CorruptBlob { .. }));
    assert!(err.to_string().contains(&hash.to_hex()), "{err}");
    fs::remove_file(&path).unwrap();
    assert!(matches!(
        store.read_blob(&hash),
        Err(StoreError::MissingBlob { .. })
    ));
}

/// Opens the sled database under a store directly. sled lets go of its file lock when a dropped
/// handle's flusher thread exits, a moment after the drop, so this waits for it as
/// `Store::open` does.
fn open_sled(path: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}

/// Overwrites the stored record of `run` with `bytes` through sled directly.
fn overwrite_record(root: &std::path::Path, tree: &str, key: &[u8], bytes: &[u8]) {
    let db = open_sled(&root.join("db"));
    db.open_tree(tree).unwrap().insert(key, bytes).unwrap();
    db.flush().unwrap();
}

#[test]
fn corrupt_records_are_named_errors_not_panics_or_huge_allocations() {
    let (dir, store) = temp_store();
    let run = finished_run(&store, &learn_spec(1), &[], None);
    let good = run.encode().unwrap();
    drop(store);
    let root = dir.path().join("runs");
    let mut cut_after_id = vec![1u8, 16]; // format, id length 16, the id, then nothing
    cut_after_id.extend_from_slice(run.id.as_bytes());
    for (label, bytes) in [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("unknown format", [&[9u8][..], &good[1..]].concat()),
        ("trailing bytes", [&good[..], &[0u8, 1, 2][..]].concat()),
        ("cut after the id", cut_after_id),
        // The id's length field says u64::MAX bytes: the decode limit refuses it without allocating.
        (
            "hostile length",
            [&[1u8, 0xfd][..], &u64::MAX.to_le_bytes()[..]].concat(),
        ),
    ] {
        overwrite_record(&root, "runs", run.id.as_bytes(), &bytes);
        let store = Store::open(&root).unwrap();
        let err = store.get_run(&run.id).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{label}: {err}");
        assert!(err.to_string().contains(run.id.as_str()), "{label}: {err}");
        assert!(
            store.runs().next().unwrap().is_err(),
            "{label}: listing yields the error"
        );
        let report = store.check().unwrap();
        assert_eq!(report.problems.len(), 1, "{label}: {:?}", report.problems);
        assert!(report.problems[0].subject.contains(run.id.as_str()));
        assert!(
            store.gc().is_err(),
            "{label}: gc must not guess what an unreadable run refers to"
        );
    }
}

#[test]
fn corrupt_metric_chunks_are_named_errors() {
    let (dir, store) = temp_store();
    let run = finished_run(&store, &learn_spec(1), &[], None);
    drop(store);
    let root = dir.path().join("runs");
    let mut key = run.id.as_bytes().to_vec();
    key.extend_from_slice(b"loss/total\0");
    key.extend_from_slice(&0u32.to_be_bytes());
    overwrite_record(
        &root,
        "metrics",
        &key,
        &[1, 0xff, 0xff, 0xff, 0xff, 0x0f, 3],
    );
    let store = Store::open(&root).unwrap();
    let err = store.metrics(&run.id).unwrap_err();
    assert!(
        err.to_string().contains("loss/total#0") && err.to_string().contains(run.id.as_str()),
        "{err}"
    );
    let report = store.check().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
}

// === Remove, gc, check ===

#[test]
fn rm_never_deletes_a_blob_another_run_uses() {
    let (_dir, store) = temp_store();
    let shared_input = store.put_blob(b"scene image").unwrap();
    let mut spec = learn_spec(1);
    spec.inputs.insert("image".into(), shared_input);
    let a = finished_run(
        &store,
        &spec,
        &[("embeddings", b"shared"), ("image0", b"only a")],
        None,
    );
    let mut spec_b = learn_spec(2);
    spec_b.inputs.insert("image".into(), shared_input);
    let b = finished_run(&store, &spec_b, &[("embeddings", b"shared")], None);
    store.add_tag(&a.id, "x").unwrap();

    let report = store.remove_run(&a.id).unwrap();
    assert_eq!(report.blobs_removed, 1, "{report:?}");
    assert_eq!(report.blobs_kept, 2, "{report:?}"); // the shared output and the shared input
    assert!(report.spec_removed);
    assert!(report.keys_removed >= 2); // a metric chunk and a tag
    assert!(matches!(
        store.get_run(&a.id),
        Err(StoreError::UnknownRun(_))
    ));
    assert!(store.spec(&a.spec_hash).is_err());
    assert!(!store.blobs().contains(&Digest::of(b"only a")));
    assert_eq!(store.read_blob(&Digest::of(b"shared")).unwrap(), b"shared");
    assert_eq!(store.read_blob(&shared_input).unwrap(), b"scene image");
    assert!(store.metrics(&a.id).unwrap().is_empty());
    assert!(store.check().unwrap().is_clean());

    let report = store.remove_run(&b.id).unwrap();
    assert_eq!(
        (report.blobs_removed, report.blobs_kept),
        (2, 0),
        "{report:?}"
    );
    assert_eq!(store.blobs().entries().unwrap().len(), 0);
}

#[test]
fn rm_refuses_a_parent_and_a_live_run() {
    let (_dir, store) = temp_store();
    let learn = finished_run(&store, &learn_spec(1), &[("embeddings", b"E")], None);
    let mut synth = learn_spec(1);
    synth.kind = RunKind::Synth;
    synth.parent = Some(learn.id.clone());
    let child = finished_run(&store, &synth, &[], None);
    let err = store.remove_run(&learn.id).unwrap_err();
    assert!(err.to_string().contains(child.id.as_str()), "{err}");
    let live = store
        .create_run(&learn_spec(9), NewRun::default())
        .unwrap()
        .id;
    store.start_run(&live, "h", "cpu").unwrap();
    assert!(store.remove_run(&live).is_err());
    assert!(store.gc().is_err(), "gc waits for live runs");
    store.remove_run(&child.id).unwrap();
    store.remove_run(&learn.id).unwrap();
}

#[test]
fn rm_removes_a_corrupt_record_and_leaves_its_blobs_to_gc() {
    let (dir, store) = temp_store();
    let run = finished_run(&store, &learn_spec(1), &[("image0", b"pixels")], None);
    drop(store);
    let root = dir.path().join("runs");
    overwrite_record(&root, "runs", run.id.as_bytes(), b"\x01garbage");
    let store = Store::open(&root).unwrap();
    let report = store.remove_run(&run.id).unwrap();
    assert!(report.note.is_some());
    assert_eq!(report.blobs_removed, 0);
    assert!(store.check().unwrap().is_clean());
    let gc = store.gc().unwrap();
    assert_eq!((gc.blobs_removed, gc.specs_removed), (1, 1), "{gc:?}");
}

#[test]
fn gc_removes_only_garbage() {
    let (dir, store) = temp_store();
    let kept = finished_run(&store, &learn_spec(1), &[("image0", b"kept output")], None);
    let orphan_blob = store.put_blob(b"nobody refers to me").unwrap();
    let orphan_spec = store.put_spec(&learn_spec(99)).unwrap();
    let temp = dir.path().join("runs/blobs/tmp/dead.tmp");
    fs::write(&temp, b"half a blob").unwrap();
    let old = SystemTime::now() - Duration::from_secs(3600);
    fs::File::options()
        .write(true)
        .open(&temp)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let before = store.check().unwrap();
    assert!(
        before.is_clean(),
        "garbage is not a problem: {:?}",
        before.problems
    );
    assert_eq!(
        (
            before.garbage_blobs,
            before.garbage_specs,
            before.temp_files
        ),
        (1, 1, 1)
    );

    let report = store.gc().unwrap();
    assert_eq!(report.blobs_removed, 1);
    assert_eq!(report.bytes_freed, b"nobody refers to me".len() as u64);
    assert_eq!(report.specs_removed, 1);
    assert_eq!(report.temp_files_removed, 1);
    assert!(!store.blobs().contains(&orphan_blob));
    assert!(store.spec(&orphan_spec).is_err());
    assert!(!temp.exists());
    assert_eq!(
        store.read_blob(&Digest::of(b"kept output")).unwrap(),
        b"kept output"
    );
    assert_eq!(store.get_run(&kept.id).unwrap(), kept);
    let after = store.check().unwrap();
    assert!(after.is_clean());
    assert_eq!(
        (after.garbage_blobs, after.garbage_specs, after.temp_files),
        (0, 0, 0)
    );
    let again = store.gc().unwrap();
    assert_eq!((again.blobs_removed, again.specs_removed), (0, 0));
}

#[test]
fn check_names_every_problem() {
    let (dir, store) = temp_store();
    let run = finished_run(
        &store,
        &learn_spec(1),
        &[("image0", b"pixels"), ("embeddings", b"E")],
        None,
    );
    assert!(store.check().unwrap().is_clean());
    let corrupt = Digest::of(b"pixels");
    fs::write(store.blobs().path(&corrupt), b"pixelz").unwrap();
    let missing = Digest::of(b"E");
    fs::remove_file(store.blobs().path(&missing)).unwrap();
    fs::write(dir.path().join("runs/blobs/stray.txt"), b"?").unwrap();
    let report = store.check().unwrap();
    let text: Vec<String> = report
        .problems
        .iter()
        .map(|p| format!("{}: {}", p.subject, p.message))
        .collect();
    assert_eq!(report.problems.len(), 3, "{text:#?}"); // corrupt blob, missing output, stray file
    assert!(
        text.iter()
            .any(|t| t.starts_with(&format!("blob {corrupt}"))),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains(&format!("output embeddings: blob {missing} is missing"))),
        "{text:#?}"
    );
    assert!(text.iter().any(|t| t.contains("stray.txt")), "{text:#?}");
    assert!(text.iter().all(|t| !t.is_empty()));
    let _ = run;
}

// === Fingerprints ===

#[test]
fn model_fingerprints_cover_weights_and_configs_and_are_cached() {
    let (dir, store) = temp_store();
    let model = dir.path().join("model");
    fs::create_dir_all(model.join("unet")).unwrap();
    fs::create_dir_all(model.join(".git")).unwrap();
    fs::write(model.join("model_index.json"), b"{}").unwrap();
    fs::write(model.join("unet/config.json"), b"{\"a\":1}").unwrap();
    fs::write(
        model.join("unet/diffusion_pytorch_model.safetensors"),
        b"weights-1",
    )
    .unwrap();
    fs::write(model.join("README.md"), b"docs").unwrap();
    fs::write(model.join(".git/HEAD"), b"ref").unwrap();
    let first = model_fingerprint(&model).unwrap();
    assert_eq!(store.model_fingerprint(&model).unwrap(), first);
    // Files that are not weights or configs do not count.
    fs::write(model.join("README.md"), b"other docs").unwrap();
    assert_eq!(model_fingerprint(&model).unwrap(), first);
    // Nor does anything at the top level but model_index.json: the fixtures keep their parity
    // references there, and a new reference must not make the same weights another model.
    fs::write(model.join("reference.json"), b"{\"tensors\":{}}").unwrap();
    fs::write(model.join("synth_reference.safetensors"), b"tensors").unwrap();
    assert_eq!(model_fingerprint(&model).unwrap(), first);
    fs::write(model.join("model_index.json"), b"{\"x\":1}").unwrap();
    assert_ne!(model_fingerprint(&model).unwrap(), first);
    fs::write(model.join("model_index.json"), b"{}").unwrap();
    assert_eq!(model_fingerprint(&model).unwrap(), first);
    // A flat model folder (no model_index.json: a CLIP model for evaluation) counts its
    // top-level files.
    let flat = dir.path().join("flat");
    fs::create_dir_all(&flat).unwrap();
    fs::write(flat.join("config.json"), b"{}").unwrap();
    fs::write(flat.join("model.safetensors"), b"w1").unwrap();
    let flat_first = model_fingerprint(&flat).unwrap();
    fs::write(flat.join("model.safetensors"), b"w2").unwrap();
    assert_ne!(model_fingerprint(&flat).unwrap(), flat_first);
    // Content counts.
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let mtime = fs::metadata(&weights).unwrap().modified().unwrap();
    fs::write(&weights, b"weights-2").unwrap();
    let changed = model_fingerprint(&model).unwrap();
    assert_ne!(changed, first);
    // The store's cache trusts size + mtime: same size and restored mtime give the cached hash...
    fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(
        store.model_fingerprint(&model).unwrap(),
        first,
        "served from the cache"
    );
    // ...and a new mtime makes it hash again.
    fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_modified(mtime + Duration::from_secs(5))
        .unwrap();
    assert_eq!(store.model_fingerprint(&model).unwrap(), changed);
    // Relative paths count.
    fs::rename(
        model.join("unet/config.json"),
        model.join("unet/config2.json"),
    )
    .unwrap();
    assert_ne!(model_fingerprint(&model).unwrap(), changed);
    assert!(model_fingerprint(&dir.path().join("missing")).is_err());
    let empty = dir.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    assert!(model_fingerprint(&empty)
        .unwrap_err()
        .to_string()
        .contains("no model files"));
}

// === Diff ===

#[test]
fn diff_lists_what_differs() {
    let (_dir, store) = temp_store();
    let a = finished_run(
        &store,
        &learn_spec(1),
        &[("embeddings", b"E"), ("image0", b"A")],
        None,
    );
    let mut spec_b = learn_spec(2);
    spec_b.config["learn"]["lr"] = serde_json::json!(0.001);
    spec_b.config["learn"]["new_key"] = serde_json::json!(true);
    let b = finished_run(
        &store,
        &spec_b,
        &[("embeddings", b"E"), ("image0", b"B")],
        None,
    );
    let diff = diff_runs(&store, &a.id, &b.id, false).unwrap();
    let keys: Vec<&str> = diff.config.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["learn.lr", "learn.new_key"]);
    assert_eq!(diff.config[1].a, None);
    let fields: Vec<&str> = diff.fields.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(fields, ["seed", "spec_hash"]);
    assert_eq!(
        diff.outputs
            .iter()
            .map(|o| (o.name.as_str(), o.identical))
            .collect::<Vec<_>>(),
        [("embeddings", true), ("image0", false)]
    );
    assert_eq!(diff.metrics.len(), 1);
    assert_eq!(
        diff.metrics[0].a.unwrap().last,
        diff.metrics[0].b.unwrap().last
    );
    let all = diff_runs(&store, &a.id, &b.id, true).unwrap();
    assert!(all.config.len() > diff.config.len());
    assert!(all.config.iter().any(|c| c.key == "preset" && c.same));
}
