//! The engine's device pool, over CPU slots (`cpu:0`, `cpu:1`: the pool code GPUs use, on a
//! machine without them): N slots run N runs at once and no more, a run naming a slot waits
//! for it (and a later `auto` run never takes it), the record names the slot, and a slot freed
//! by a finished, cancelled or failed run is used again. The status and the workbench's Jobs
//! rows say which run holds which slot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod engine_support;

use engine_support::serve_pool_in_thread;
use mifo::engine::{Client, EngineStatus, Request, Response};
use mifo::jobs::learn::LearnJob;
use mifo::jobs::pool::PoolOptions;
use mifo::learn::{scene_files, LearnConfig};
use mifo::store::{RunRecord, RunStatus};
use mifo::tui::backend::Backend;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// An engine whose pool is `slots` CPU slots, one run each.
fn start(name: &str, slots: usize) -> PathBuf {
    let store = std::env::temp_dir().join(format!("mifo-pool-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    serve_pool_in_thread(
        &store,
        PoolOptions {
            cpu_slots: Some(slots),
            per_device: 1,
            cpu_jobs: 1,
            gpus: None,
        },
    );
    store
}

fn job(steps: u64, seed: u64, device: &str) -> LearnJob {
    LearnJob {
        model: mifo::model::ModelSource::folder(root().join("fixtures/tiny-sd21")),
        files: scene_files(&root().join("fixtures/scenes/coffee")).unwrap(),
        scene_dir: None,
        preset: "paper".into(),
        config: LearnConfig {
            reward_steps: 1,
            penalty_steps: steps,
            dreambooth: "none".into(),
            preview: false,
            checkpoint_every: 1000,
            ..LearnConfig::paper()
        },
        seed,
        device: device.into(),
        dtype: "f32".into(),
        allow_overlap: false,
        rerun: false,
    }
}

fn submit(c: &mut Client, job: LearnJob) -> String {
    match c.request(&Request::SubmitLearn(Box::new(job))).unwrap() {
        Response::Queued { run, .. } => run,
        other => panic!("not queued: {other:?}"),
    }
}

fn status(c: &mut Client) -> EngineStatus {
    match c.request(&Request::Status).unwrap() {
        Response::Status(st) => st,
        other => panic!("{other:?}"),
    }
}

fn record(c: &mut Client, run: &str) -> RunRecord {
    match c.request(&Request::Detail { run: run.into() }).unwrap() {
        Response::Detail { record, .. } => *record,
        other => panic!("{other:?}"),
    }
}

/// Polls until `f` holds (30 s at most), returning the status it held on.
fn wait_for(c: &mut Client, what: &str, f: impl Fn(&EngineStatus) -> bool) -> EngineStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(c);
        if f(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_final(c: &mut Client, run: &str) -> RunRecord {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = record(c, run);
        if r.status.is_final() {
            return r;
        }
        assert!(Instant::now() < deadline, "run {run} never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn holder(st: &EngineStatus, device: &str) -> Vec<String> {
    st.pool
        .iter()
        .find(|d| d.device == device)
        .map(|d| d.runs.clone())
        .unwrap_or_default()
}

fn cancel(c: &mut Client, run: &str) {
    assert!(matches!(
        c.request(&Request::Cancel { run: run.into() }).unwrap(),
        Response::Ok
    ));
}

#[test]
fn n_slots_run_n_runs_at_once_and_a_freed_slot_is_reused() {
    let store = start("two", 2);
    let mut c = Client::connect(&store).unwrap();
    let runs: Vec<String> = (0..3).map(|s| submit(&mut c, job(12, s, "auto"))).collect();
    let mut most = 0;
    let mut ended = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ended.len() < runs.len() {
        let st = status(&mut c);
        assert_eq!(st.workers, 3, "2 slots + the plain cpu device");
        most = most.max(st.running_all.len());
        assert!(
            st.running_all.len() <= 2,
            "3 runs at once on 2 slots: {st:?}"
        );
        for (run, device, _) in &st.running_all {
            assert!(device == "cpu:0" || device == "cpu:1", "{device}");
            assert_eq!(
                holder(&st, device),
                std::slice::from_ref(run),
                "the pool names its holder"
            );
        }
        ended = runs
            .iter()
            .filter(|r| record(&mut c, r).status.is_final())
            .cloned()
            .collect();
        assert!(Instant::now() < deadline, "the runs never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(most, 2, "two slots never ran two runs at once");
    let records: Vec<RunRecord> = runs.iter().map(|r| record(&mut c, r)).collect();
    for r in &records {
        assert_eq!(r.status, RunStatus::Done, "{:?}", r.error);
    }
    // The records name the slots; the first two took one each, the third a freed one after
    // one of them ended.
    assert_ne!(records[0].device, records[1].device);
    let third = &records[2];
    let before = records[..2]
        .iter()
        .find(|r| r.device == third.device)
        .expect("the third run used one of the two slots");
    assert!(
        third.started_ms.unwrap() >= before.finished_ms.unwrap(),
        "the third run started on {} before its holder ended",
        third.device
    );
}

#[test]
fn a_run_naming_a_slot_waits_for_it_and_cancel_and_failure_free_it() {
    let store = start("named", 2);
    let mut c = Client::connect(&store).unwrap();
    // A holds cpu:0 for long; B asks for cpu:0 and waits; C (auto) runs on cpu:1 meanwhile.
    let a = submit(&mut c, job(5000, 1, "cpu:0"));
    wait_for(&mut c, "A on cpu:0", |st| {
        holder(st, "cpu:0") == [a.clone()]
    });
    let b = submit(&mut c, job(3, 2, "cpu:0"));
    let cpath = submit(&mut c, job(3, 3, "auto"));
    let cr = wait_final(&mut c, &cpath);
    assert_eq!((cr.status, cr.device.as_str()), (RunStatus::Done, "cpu:1"));
    let st = status(&mut c);
    assert!(
        st.waiting.contains(&(b.clone(), "cpu:0".to_string())),
        "B is not waiting for cpu:0: {:?}",
        st.waiting
    );
    assert_eq!(record(&mut c, &b).status, RunStatus::Queued);

    // The workbench's Jobs rows show who holds what (runs of another client included).
    let backend = mifo::tui::EngineBackend::connect(store.clone(), None, "auto").unwrap();
    let rows = backend.jobs().unwrap();
    let row = |run: &str| {
        rows.iter()
            .find(|r| r.run.as_ref().map(|r| r.to_string()).as_deref() == Some(run))
            .unwrap_or_else(|| panic!("no jobs row for {run}: {rows:?}"))
            .clone()
    };
    assert_eq!(row(&a).device, "cpu:0");
    assert_eq!(row(&b).device, "→cpu:0");

    // D (auto, later than B) waits behind the busy cpu:1 holder E and must not take cpu:0 when
    // A's cancel frees it: B, the older run waiting for cpu:0, gets it.
    let e = submit(&mut c, job(5000, 4, "auto"));
    wait_for(&mut c, "E on cpu:1", |st| {
        holder(st, "cpu:1") == [e.clone()]
    });
    let d = submit(&mut c, job(3, 5, "auto"));
    cancel(&mut c, &a);
    let ar = wait_final(&mut c, &a);
    assert_eq!(ar.status, RunStatus::Cancelled);
    let br = wait_final(&mut c, &b);
    assert_eq!((br.status, br.device.as_str()), (RunStatus::Done, "cpu:0"));
    let dr = wait_final(&mut c, &d);
    assert_eq!((dr.status, dr.device.as_str()), (RunStatus::Done, "cpu:0"));
    assert!(
        dr.started_ms.unwrap() >= br.finished_ms.unwrap(),
        "D took B's slot"
    );
    cancel(&mut c, &e);
    wait_final(&mut c, &e);

    // A run that fails frees its slot: F's image vanishes while it waits, so it fails when it
    // starts on cpu:0; G then runs there.
    let scene = std::env::temp_dir().join(format!("mifo-pool-{}-scene", std::process::id()));
    let _ = std::fs::remove_dir_all(&scene);
    std::fs::create_dir_all(&scene).unwrap();
    for f in std::fs::read_dir(root().join("fixtures/scenes/coffee")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), scene.join(f.file_name())).unwrap();
    }
    let h = submit(&mut c, job(5000, 6, "cpu:0"));
    wait_for(&mut c, "H on cpu:0", |st| {
        holder(st, "cpu:0") == [h.clone()]
    });
    let mut fjob = job(3, 7, "cpu:0");
    fjob.files = scene_files(&scene).unwrap();
    let f = submit(&mut c, fjob);
    std::fs::remove_dir_all(&scene).unwrap();
    cancel(&mut c, &h);
    let fr = wait_final(&mut c, &f);
    assert_eq!(fr.status, RunStatus::Failed, "F ran without its image");
    let g = submit(&mut c, job(3, 8, "cpu:0"));
    let gr = wait_final(&mut c, &g);
    assert_eq!((gr.status, gr.device.as_str()), (RunStatus::Done, "cpu:0"));
    // The job writes its final record a moment before the runner frees its slot: wait for it.
    wait_for(&mut c, "every slot free", |st| {
        st.pool.iter().all(|d| d.runs.is_empty())
    });
}

#[test]
fn a_device_outside_the_pool_is_refused_and_nothing_is_queued() {
    let store = start("outside", 2);
    let mut c = Client::connect(&store).unwrap();
    for device in ["cpu:2", "cuda:0", "tpu"] {
        match c
            .request(&Request::SubmitLearn(Box::new(job(3, 1, device))))
            .unwrap()
        {
            Response::Error(e) => assert!(e.starts_with(&format!("--device {device}")), "{e}"),
            other => panic!("{device} accepted: {other:?}"),
        }
    }
    let Response::Records(records) = c.request(&Request::ListRecords).unwrap() else {
        panic!()
    };
    assert!(records.is_empty(), "a refused run was recorded");
}
