//! The engine over its real unix socket: two clients watching one run see the same live
//! events; status, cancel, and the protocol-version handshake.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod engine_support;

use engine_support::{serve_with_idle_exit, start_engine_with};
use mifo::engine::protocol::{read_frame, write_frame};
use mifo::engine::{Client, Event, EventKind, Request, Response};
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
        model: mifo::model::ModelSource::folder(root().join("fixtures/tiny-sd21")),
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
    let done_rx = serve_with_idle_exit(&store, Duration::from_secs(1));
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

/// A raw connection to the engine's socket, for frames no [`Client`] would send.
fn raw(store: &Path) -> std::os::unix::net::UnixStream {
    let s = std::os::unix::net::UnixStream::connect(mifo::engine::socket_path(store)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// The error the engine answered on `stream`, after which it closed the connection.
fn refused_and_closed(mut stream: std::os::unix::net::UnixStream, what: &str) -> String {
    let reply: Option<Response> = read_frame(&mut stream).unwrap();
    let Some(Response::Error(e)) = reply else {
        panic!("{what}: expected an error, got {reply:?}")
    };
    let after: Option<Response> = read_frame(&mut stream).unwrap();
    assert!(after.is_none(), "{what}: connection left open ({after:?})");
    e
}

/// The engine still answers a well-behaved client.
fn still_serving(store: &Path, after: &str) {
    let mut c = Client::try_connect(store)
        .unwrap()
        .unwrap_or_else(|| panic!("engine gone after {after}"));
    assert!(
        matches!(c.request(&Request::Status).unwrap(), Response::Status(_)),
        "no status after {after}"
    );
}

#[test]
fn malformed_frames_are_refused_and_the_engine_keeps_serving() {
    use std::io::Write;
    let store = start_engine("frames");

    // A length prefix beyond the frame limit: refused before anything is allocated.
    let mut s = raw(&store);
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    let e = refused_and_closed(s, "oversized length");
    assert!(e.contains("bad frame") && e.contains("exceeds"), "{e}");
    still_serving(&store, "an oversized length prefix");

    // Bytes that decode to no request (variant 200 does not exist).
    let mut s = raw(&store);
    let garbage = [200u8, 7, 7, 7, 7, 7, 7, 7];
    s.write_all(&(garbage.len() as u32).to_be_bytes()).unwrap();
    s.write_all(&garbage).unwrap();
    let e = refused_and_closed(s, "garbage");
    assert!(e.starts_with("bad frame"), "{e}");
    still_serving(&store, "garbage");

    // A frame cut short: 100 bytes announced, 10 sent, then the client stops writing.
    let mut s = raw(&store);
    s.write_all(&100u32.to_be_bytes()).unwrap();
    s.write_all(&[0u8; 10]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let e = refused_and_closed(s, "truncated frame");
    assert!(e.starts_with("bad frame"), "{e}");
    still_serving(&store, "a truncated frame");

    // A valid request before the handshake.
    let mut s = raw(&store);
    write_frame(&mut s, &Request::Status).unwrap();
    let e = refused_and_closed(s, "request before Hello");
    assert!(e.contains("expected a Hello first"), "{e}");
    still_serving(&store, "a request before Hello");

    // A second Hello on a greeted connection: refused, and the connection still works.
    let mut s = raw(&store);
    let hello = Request::Hello {
        version: mifo::engine::protocol::PROTOCOL_VERSION,
    };
    write_frame(&mut s, &hello).unwrap();
    let first: Response = read_frame(&mut s).unwrap().unwrap();
    assert!(matches!(first, Response::Hello { .. }), "{first:?}");
    write_frame(&mut s, &hello).unwrap();
    let again: Response = read_frame(&mut s).unwrap().unwrap();
    assert!(
        matches!(&again, Response::Error(e) if e.contains("already greeted")),
        "{again:?}"
    );
    write_frame(&mut s, &Request::Status).unwrap();
    let status: Response = read_frame(&mut s).unwrap().unwrap();
    assert!(matches!(status, Response::Status(_)), "{status:?}");
    drop(s);
    still_serving(&store, "a second Hello");
}

/// A client that connects and never sends is dropped after the handshake timeout, so the
/// engine still exits when idle (before the fix it waited for that Hello for ever).
#[test]
fn a_silent_client_does_not_block_the_idle_exit() {
    let store = std::env::temp_dir().join(format!("mifo-engine-{}-silent", std::process::id()));
    let done_rx = serve_with_idle_exit(&store, Duration::from_secs(1));
    let mut silent = None;
    for _ in 0..200 {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(mifo::engine::socket_path(&store)) {
            silent = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut silent = silent.expect("engine did not come up");
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let exited = done_rx.recv_timeout(Duration::from_secs(15));
    assert_eq!(
        exited,
        Ok(true),
        "the engine did not exit while a client that never sent anything was connected"
    );
    // The silent client was told why it was dropped.
    let reply: Option<Response> = read_frame(&mut silent).unwrap();
    assert!(
        matches!(&reply, Some(Response::Error(e)) if e.contains("no Hello")),
        "{reply:?}"
    );
    let _ = std::fs::remove_dir_all(&store);
}

/// The peer-uid check behind the socket's permissions: a process of another user that reaches
/// the socket (here because the test loosens its mode) is refused. Needs root, to run that
/// process as `nobody`.
#[test]
fn a_client_of_another_user_is_refused() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        println!(
            "SKIPPED a_client_of_another_user_is_refused: not root, so no process of another uid can be started"
        );
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let store = start_engine("peer-uid");
    // Open the way to the socket for everyone: only the uid check is left between them.
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = mifo::engine::socket_path(&store);
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mifo"))
        .arg("--store")
        .arg(&store)
        .args(["engine", "status"])
        .env_remove("MIFO_MODEL")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "another user got an answer: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains("connection refused: the engine serves its own user only"),
        "{err}"
    );
    still_serving(&store, "another user's connection");
}

/// `mifo engine run` on `store` as a child process (killed when dropped), appending its log
/// to `<store>.log` (shared by the engines of one store, in the order they ran).
struct EngineProcess {
    child: std::process::Child,
    store: PathBuf,
}

impl EngineProcess {
    fn start(store: &Path) -> EngineProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(store.with_extension("log"))
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mifo"))
            .arg("--store")
            .arg(store)
            .args(["engine", "run", "--idle-exit", "60"])
            .env_remove("MIFO_MODEL")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut engine = EngineProcess {
            child,
            store: store.to_path_buf(),
        };
        for _ in 0..500 {
            if Client::try_connect(store).ok().flatten().is_some() {
                return engine;
            }
            if let Some(status) = engine.child.try_wait().unwrap() {
                panic!("engine exited ({status}): {}", engine.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("engine did not come up: {}", engine.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.store.with_extension("log")).unwrap_or_default()
    }

    /// Waits up to `secs` for the process to exit; its exit status, if it did.
    fn exited_within(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh store folder for an engine process.
fn process_store(name: &str) -> PathBuf {
    let store = std::env::temp_dir().join(format!("mifo-engine-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let _ = std::fs::remove_file(store.with_extension("log"));
    store
}

/// Queues a long run (`steps` penalty steps, no periodic checkpoint) and a second run behind
/// it, and waits until the first has done `at` steps; returns (running, queued).
fn long_run_and_a_queued_one(c: &mut Client, steps: u64, at: u64) -> (String, String) {
    let mut long = job(steps, 21);
    long.config.checkpoint_every = 0;
    let mut ids = Vec::new();
    for j in [long, job(steps, 22)] {
        let Response::Queued { run, .. } = c.request(&Request::SubmitLearn(Box::new(j))).unwrap()
        else {
            panic!("not queued")
        };
        ids.push(run);
    }
    loop {
        let Response::Status(st) = c.request(&Request::Status).unwrap() else {
            panic!()
        };
        if st.progress.as_ref().is_some_and(|p| p.0 >= at) {
            assert_eq!(st.queue, vec![ids[1].clone()]);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (ids[0].clone(), ids[1].clone())
}

/// Status, log and outputs of `run`, read through a new engine on `store`.
fn record_of(c: &mut Client, run: &str) -> (String, Vec<String>, Vec<String>, usize) {
    let Response::Detail { record, logs, .. } =
        c.request(&Request::Detail { run: run.into() }).unwrap()
    else {
        panic!("no detail for {run}")
    };
    let Response::Metrics(m) = c.request(&Request::Metrics { run: run.into() }).unwrap() else {
        panic!("no metrics for {run}")
    };
    (
        record.status.as_str().to_string(),
        logs,
        record.outputs.keys().cloned().collect(),
        m.get("loss/total").map_or(0, Vec::len),
    )
}

/// Runs `mifo --store STORE engine stop ARGS…`, which must succeed; its stderr.
fn engine_stop(store: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mifo"))
        .arg("--store")
        .arg(store)
        .args(["engine", "stop"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// `mifo engine stop`: the running step finishes and checkpoints, the run is `interrupted`
/// (resumable), the queued run is cancelled, and the engine exits.
#[test]
fn graceful_stop_checkpoints_the_running_run_and_cancels_the_queue() {
    let store = process_store("graceful");
    let mut engine = EngineProcess::start(&store);
    let mut c = Client::connect(&store).unwrap();
    let (running, queued) = long_run_and_a_queued_one(&mut c, 2000, 2);
    drop(c);
    assert!(engine_stop(&store, &[]).contains("after the current step"));
    let status = engine
        .exited_within(30)
        .unwrap_or_else(|| panic!("engine still running after stop: {}", engine.log()));
    assert!(status.success(), "{status}: {}", engine.log());

    let _next = EngineProcess::start(&store);
    let mut c = Client::connect(&store).unwrap();
    let (status, logs, outputs, steps) = record_of(&mut c, &running);
    assert_eq!(status, "interrupted", "{logs:?}");
    assert!(
        outputs.iter().any(|o| o == "checkpoint"),
        "no checkpoint kept by the graceful stop: {outputs:?}"
    );
    assert!((2..2002).contains(&steps), "{steps} steps recorded");
    let (status, logs, _, steps) = record_of(&mut c, &queued);
    assert_eq!(status, "cancelled", "{logs:?}");
    assert_eq!(steps, 0);
    assert!(
        engine
            .log()
            .contains(&format!("run {queued} was still queued: marked cancelled")),
        "{}",
        engine.log()
    );
}

/// `mifo engine stop --force` exits at once (no checkpoint); the next engine marks the
/// running run `interrupted` and cancels the run that was still queued.
#[test]
fn forced_stop_exits_at_once_and_a_restart_cancels_the_queue() {
    let store = process_store("forced");
    let mut engine = EngineProcess::start(&store);
    let mut c = Client::connect(&store).unwrap();
    let (running, queued) = long_run_and_a_queued_one(&mut c, 2000, 2);
    drop(c);
    assert!(engine_stop(&store, &["--force"]).contains("stopping now"));
    let status = engine
        .exited_within(5)
        .unwrap_or_else(|| panic!("engine still running after a forced stop: {}", engine.log()));
    assert!(status.success(), "{status}: {}", engine.log());
    assert!(
        !mifo::engine::socket_path(&store).exists(),
        "a forced stop left its socket behind"
    );

    let next = EngineProcess::start(&store);
    let mut c = Client::connect(&store).unwrap();
    let (status, logs, outputs, steps) = record_of(&mut c, &running);
    assert_eq!(status, "interrupted", "{logs:?}");
    assert!(
        !outputs.iter().any(|o| o == "checkpoint"),
        "a forced stop waited for a checkpoint: {outputs:?}"
    );
    assert!(steps < 2002, "{steps} steps recorded");
    let (status, logs, _, _) = record_of(&mut c, &queued);
    assert_eq!(status, "cancelled", "{logs:?}");
    assert!(
        next.log().contains(&format!(
            "run {queued} was queued when the last engine stopped: marked cancelled"
        )),
        "{}",
        next.log()
    );
}

/// A second engine on a store that has one is refused in one line and changes nothing: the
/// first engine's running and queued runs go on.
#[test]
fn a_second_engine_on_the_same_store_is_refused() {
    let store = process_store("second");
    let _first = EngineProcess::start(&store);
    let mut c = Client::connect(&store).unwrap();
    let (running, queued) = long_run_and_a_queued_one(&mut c, 2000, 1);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mifo"))
        .arg("--store")
        .arg(&store)
        .args(["engine", "run"])
        .env_remove("MIFO_MODEL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second engine started: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // The first engine is still the one new clients reach (its socket is still there).
    let fresh = Client::try_connect(&store)
        .unwrap()
        .expect("the first engine no longer answers on its socket");
    assert_eq!(fresh.engine_pid, c.engine_pid);
    let Response::Status(st) = c.request(&Request::Status).unwrap() else {
        panic!()
    };
    assert_eq!(st.running.as_deref(), Some(running.as_str()));
    assert_eq!(st.queue, vec![queued.clone()]);
    assert_eq!(record_of(&mut c, &running).0, "running");
    assert_eq!(record_of(&mut c, &queued).0, "queued");
    for run in [queued, running] {
        assert!(matches!(
            c.request(&Request::Cancel { run }).unwrap(),
            Response::Ok
        ));
    }
}
