//! The engine over its real unix socket: two clients watching one run see the same live
//! events; status, cancel, and the protocol-version handshake.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod engine_support;

use engine_support::start_engine_with;
use mifo::engine::protocol::{read_frame, write_frame};
use mifo::engine::{serve, Client, EngineOptions, Event, EventKind, Request, Response};
use mifo::jobs::learn::LearnJob;
use mifo::jobs::sink::SinkEvent;
use mifo::learn::{scene_files, LearnConfig};
use mifo::runs::{RunsReply, RunsRequest};
use mifo::store::RunStatus;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn start_engine(name: &str) -> PathBuf {
    start_engine_with(name, 1)
}

fn job(steps: u64, seed: u64) -> LearnJob {
    let config = LearnConfig {
        reward_steps: 2,
        penalty_steps: steps,
        dreambooth: "none".into(),
        preview: false,
        ..LearnConfig::paper()
    };
    LearnJob {
        model: root().join("fixtures/tiny-sd21"),
        files: scene_files(&root().join("fixtures/scenes/coffee")).unwrap(),
        scene_dir: None,
        preset: "paper".into(),
        config,
        seed,
        device: "cpu".into(),
        dtype: "f32".into(),
        allow_overlap: false,
        rerun: false,
    }
}

fn collect(store: &Path, run: &str) -> std::thread::JoinHandle<Vec<Event>> {
    let events = Client::connect(store)
        .unwrap()
        .subscribe(Some(run))
        .unwrap();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        for ev in events {
            let ev = ev.unwrap();
            let end = matches!(&ev.kind, EventKind::Status { status, .. } if status == "done" || status == "failed" || status == "cancelled");
            out.push(ev);
            if end {
                break;
            }
        }
        out
    })
}

#[test]
fn two_clients_see_the_same_live_events() {
    let store = start_engine("two");
    let mut c = Client::connect(&store).unwrap();
    // Queue a first run so the second one is still queued when both watchers subscribe.
    let Response::Queued { run: first, .. } = c
        .request(&Request::SubmitLearn(Box::new(job(6, 1))))
        .unwrap()
    else {
        panic!("not queued")
    };
    let Response::Queued { run, .. } = c
        .request(&Request::SubmitLearn(Box::new(job(4, 2))))
        .unwrap()
    else {
        panic!("not queued")
    };
    let a = collect(&store, &run);
    let b = collect(&store, &run);
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_eq!(a, b, "the two clients saw different events");
    let progress: Vec<u64> = a
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Run(SinkEvent::Progress { step, .. }) => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(progress, (1..=6).collect::<Vec<_>>());
    assert!(a.iter().any(|e| matches!(&e.kind, EventKind::Run(SinkEvent::Metric { name, .. }) if name == "loss/total")));
    assert!(
        matches!(&a.last().unwrap().kind, EventKind::Status { status, .. } if status == "done")
    );

    let Response::Status(st) = c.request(&Request::Status).unwrap() else {
        panic!()
    };
    assert_eq!(st.pid, std::process::id());
    assert!(st.queue.is_empty());
    let RunsReply::Show(show) = c.runs(RunsRequest::Show { run: first.clone() }).unwrap() else {
        panic!("runs show failed")
    };
    assert_eq!(show.record.status, RunStatus::Done);

    // The data requests front ends (the workbench) use.
    let Response::Records(records) = c.request(&Request::ListRecords).unwrap() else {
        panic!()
    };
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].0.id.to_string(), run, "newest first");
    assert!(matches!(
        c.request(&Request::Tag {
            run: first.clone(),
            tag: "keep".into(),
            remove: false
        })
        .unwrap(),
        Response::Ok
    ));
    let Response::Detail {
        record,
        spec_json,
        logs,
        tags,
        ..
    } = c.request(&Request::Detail { run: first.clone() }).unwrap()
    else {
        panic!()
    };
    assert_eq!(tags, vec!["keep".to_string()]);
    let spec: mifo::store::RunSpec = serde_json::from_str(&spec_json.unwrap()).unwrap();
    assert_eq!(spec.seed, 1);
    assert!(!logs.is_empty());
    let Response::Metrics(m) = c.request(&Request::Metrics { run: first.clone() }).unwrap() else {
        panic!()
    };
    assert_eq!(m["loss/total"].len(), 8);
    let hash = record.outputs["embeddings"].to_string();
    let Response::Bytes(bytes) = c.request(&Request::Blob { hash }).unwrap() else {
        panic!()
    };
    let emb = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).unwrap();
    assert!(emb.contains_key("<v0>") && emb.contains_key("<v1>"));
    assert!(matches!(
        c.request(&Request::Remove { run: first.clone() }).unwrap(),
        Response::Ok
    ));
    let Response::Records(records) = c.request(&Request::ListRecords).unwrap() else {
        panic!()
    };
    assert_eq!(records.len(), 1);
}

#[test]
fn cancel_stops_a_running_job_and_keeps_its_checkpoint() {
    let store = start_engine("cancel");
    let mut c = Client::connect(&store).unwrap();
    let mut j = job(400, 3);
    j.config.checkpoint_every = 2;
    let Response::Queued { run, .. } = c.request(&Request::SubmitLearn(Box::new(j))).unwrap()
    else {
        panic!()
    };
    let watcher = collect(&store, &run);
    // Wait for some progress, then cancel.
    loop {
        let Response::Status(st) = c.request(&Request::Status).unwrap() else {
            panic!()
        };
        if st.progress.as_ref().is_some_and(|p| p.0 >= 3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(matches!(
        c.request(&Request::Cancel { run: run.clone() }).unwrap(),
        Response::Ok
    ));
    let events = watcher.join().unwrap();
    assert!(
        matches!(&events.last().unwrap().kind, EventKind::Status { status, .. } if status == "cancelled")
    );
    let RunsReply::Show(show) = c.runs(RunsRequest::Show { run }).unwrap() else {
        panic!("runs show failed")
    };
    assert!(
        show.record.outputs.contains_key("checkpoint"),
        "no checkpoint kept: {:?}",
        show.record.outputs
    );
    let steps = show.metrics["loss/total"].len();
    assert!(steps < 400, "ran to the end despite the cancel");
}

#[test]
fn a_client_with_another_protocol_version_is_refused() {
    let store = start_engine("version");
    let stream =
        std::os::unix::net::UnixStream::connect(mifo::engine::socket_path(&store)).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = stream;
    write_frame(&mut w, &Request::Hello { version: 9999 }).unwrap();
    let reply: Response = read_frame(&mut r).unwrap().unwrap();
    match reply {
        Response::Error(e) => assert!(e.contains("protocol mismatch"), "{e}"),
        other => panic!("accepted a wrong version: {other:?}"),
    }
    let meta = std::fs::metadata(mifo::engine::socket_path(&store)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn concurrency_is_configurable() {
    let store = start_engine_with("jobs2", 2);
    let mut c = Client::connect(&store).unwrap();
    let mut runs = Vec::new();
    for seed in [11, 12] {
        let Response::Queued { run, .. } = c
            .request(&Request::SubmitLearn(Box::new(job(200, seed))))
            .unwrap()
        else {
            panic!()
        };
        runs.push(run);
    }
    let mut both = false;
    for _ in 0..200 {
        let Response::Status(st) = c.request(&Request::Status).unwrap() else {
            panic!()
        };
        assert_eq!(st.workers, 2);
        if st.running_all.len() == 2 {
            both = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(both, "two jobs never ran at once with jobs = 2");
    for r in runs {
        assert!(matches!(
            c.request(&Request::Cancel { run: r }).unwrap(),
            Response::Ok
        ));
    }
}

/// A subscriber that disconnects between events no longer counts as a client: the engine
/// exits once idle (before the fix it stayed up for ever, waiting for an event to write).
#[test]
fn a_vanished_subscriber_does_not_keep_the_engine_alive() {
    let store = std::env::temp_dir().join(format!("mifo-engine-{}-idle", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let dir = store.clone();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = serve(
            &dir,
            EngineOptions {
                idle_exit: Some(Duration::from_secs(1)),
                jobs: 1,
            },
        );
        let _ = done_tx.send(r.is_ok());
    });
    let mut client = None;
    for _ in 0..200 {
        if let Some(c) = Client::try_connect(&store).ok().flatten() {
            client = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let events = client
        .expect("engine did not come up")
        .subscribe(None)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(events);
    let exited = done_rx.recv_timeout(Duration::from_secs(10));
    assert_eq!(
        exited,
        Ok(true),
        "the engine did not exit after its subscriber left"
    );
    let _ = std::fs::remove_dir_all(&store);
}
