//! The Slurm executor against a real Slurm: these tests NEED a running cluster (`sinfo`
//! answering) and fail without one; `scripts/slurm-local.sh` starts a one-node cluster on this
//! machine and `.ci/run` calls it first. Each test uses a store of its own; its jobs are named
//! `mifo-<run id>`.
//!
//! A sweep through Slurm ends `done` with the same embeddings as the same sweep run by a local
//! engine; a job cancelled with `scancel` leaves its run `cancelled`; a worker killed with
//! SIGKILL is resubmitted, and one that Slurm requeues goes on, from its checkpoint to the same
//! embeddings; an engine stopped mid-sweep and started again ends every run once; bad
//! `--executor slurm` input (no sbatch, an unknown partition, nodes that cannot run mifo) is
//! refused at `engine start` with nothing queued; a run whose node goes down is interrupted
//! and resumed when the node returns (that test has the cluster to itself). A sweep is one job
//! array (throttled by `--array-limit`) whose tasks are cancelled one at a time; a synthesis
//! run goes through Slurm too, to the samples a local engine makes, and cancels.

mod cli_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cli_support::{err_line, json, ok, root, scratch};

/// The node-down test takes the cluster for itself; the others share it.
static CLUSTER: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared_cluster() -> std::sync::RwLockReadGuard<'static, ()> {
    CLUSTER.read().unwrap_or_else(|p| p.into_inner())
}

/// Fails (does not skip) when no Slurm answers: CI starts one.
fn require_slurm() {
    let answered = Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false);
    assert!(
        answered,
        "this test needs a running Slurm cluster (`sinfo` does not answer): run scripts/slurm-local.sh"
    );
}

/// `mifo --store STORE ARGS…` with a fast Slurm poll.
fn mifo(store: &Path, args: &[&str]) -> Output {
    mifo_env(store, args, &[])
}

fn mifo_env(store: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mifo"));
    cmd.current_dir(root())
        .env("MIFO_ENGINE_IDLE", "5")
        .env("MIFO_SLURM_POLL_MS", "300")
        .env("MIFO_ENGINE_CPU_SLOTS", "2")
        .env_remove("MIFO_MODEL")
        .env_remove("MIFO_ENGINE_GPUS")
        .arg("--store")
        .arg(store)
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// `mifo engine start --executor slurm` with `extra` flags; the start must succeed.
fn start_slurm_engine(store: &Path, extra: &[&str]) {
    let mut args = vec!["engine", "start", "--executor", "slurm"];
    args.extend_from_slice(extra);
    let out = mifo(store, &args);
    assert!(
        out.status.success(),
        "engine start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stop_engine(store: &Path) {
    let _ = mifo(store, &["engine", "stop", "--force"]);
}

/// The learning flags of every run here: the tiny model, the coffee scene, `steps` steps.
fn learn_args(steps: u64) -> Vec<String> {
    let reward = steps / 3;
    [
        "--scene",
        "fixtures/scenes/coffee",
        "--model",
        "fixtures/tiny-sd21",
        "--set",
        &format!("learn.reward_steps={reward}"),
        "--set",
        &format!("learn.penalty_steps={}", steps - reward),
        "--set",
        "learn.dreambooth=none",
        "--set",
        "learn.preview=false",
        "--set",
        "learn.checkpoint_every=3",
        "--device",
        "auto",
        "--seed",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn sweep(store: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<String> = vec!["sweep".into(), "learn".into()];
    args.extend(learn_args(6));
    args.extend(
        [
            "--grid",
            "learn.lambda_penalty=0.005,0.02",
            "--grid",
            "learn.lr=0.005,0.01",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    json(&mifo(store, &args))
}

fn show(store: &Path, run: &str) -> serde_json::Value {
    json(&mifo(store, &["runs", "show", run, "--json"]))
}

/// Waits until run `run` is `done`, `failed` or `cancelled` (an `interrupted` run whose job
/// the engine resubmits runs again); returns its `runs show --json`.
fn wait_final(store: &Path, run: &str, limit: Duration) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let doc = show(store, run);
        let status = doc["status"].as_str().unwrap_or("").to_string();
        if ["done", "failed", "cancelled"].contains(&status.as_str()) {
            return doc;
        }
        assert!(
            t0.elapsed() < limit,
            "run {run} still {status} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn work_dir(store: &Path, run: &str) -> PathBuf {
    store.join("work").join(run)
}

/// The journal's text (empty before the worker wrote it).
fn journal(store: &Path, run: &str) -> String {
    std::fs::read_to_string(work_dir(store, run).join("journal")).unwrap_or_default()
}

/// Waits until the journal of `run` satisfies `ready`.
fn wait_journal(store: &Path, run: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let text = journal(store, run);
        if ready(&text) {
            return text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "run {run}: no {what} in its journal:\n{text}\n{}",
            std::fs::read_to_string(work_dir(store, run).join("slurm.out")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `(lambda_penalty, lr) → embeddings hash` of the runs of a sweep answer.
fn embeddings_by_config(store: &Path, doc: &serde_json::Value) -> Vec<((f64, f64), String)> {
    let mut out = Vec::new();
    for r in doc["runs"].as_array().unwrap() {
        let run = r["id"].as_str().unwrap();
        let s = show(store, run);
        assert_eq!(s["status"], "done", "{s}");
        let learn = &s["config"]["learn"];
        out.push((
            (
                learn["lambda_penalty"].as_f64().unwrap(),
                learn["lr"].as_f64().unwrap(),
            ),
            s["outputs"]["embeddings"].as_str().unwrap().to_string(),
        ));
    }
    out.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    out
}

#[test]
fn a_sweep_through_slurm_ends_done_with_the_embeddings_of_a_local_engine() {
    require_slurm();
    let _cluster = shared_cluster();
    let slurm_store = scratch("slurm-sweep");
    let local_store = scratch("slurm-sweep-local");
    start_slurm_engine(&slurm_store, &["--time", "10:00"]);
    // The local engine's sweep runs beside the Slurm one.
    let local = {
        let store = local_store.clone();
        std::thread::spawn(move || sweep(&store, &["--name", "grid"]))
    };
    // Followed to the end by the CLI, as a local sweep is.
    let remote = sweep(&slurm_store, &["--name", "grid"]);
    let local = local.join().unwrap();
    assert_eq!(remote["queued"], 4, "{remote}");
    let a = embeddings_by_config(&slurm_store, &remote);
    let b = embeddings_by_config(&local_store, &local);
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "Slurm and local embeddings differ");
    // One job array: each run one of its tasks, `ARRAY_i`, i = 0..3.
    let mut arrays = std::collections::BTreeSet::new();
    let mut tasks = std::collections::BTreeSet::new();
    for r in remote["runs"].as_array().unwrap() {
        let s = show(&slurm_store, r["id"].as_str().unwrap());
        let job = s["slurm_jobs"][0].as_str().unwrap();
        let (array, task) = job.split_once('_').unwrap_or_else(|| panic!("{s}"));
        arrays.insert(array.to_string());
        tasks.insert(task.parse::<u32>().unwrap());
    }
    assert_eq!(arrays.len(), 1, "not one job array: {arrays:?}");
    assert_eq!(tasks, (0..4).collect(), "{tasks:?}");
    for r in remote["runs"].as_array().unwrap() {
        let s = show(&slurm_store, r["id"].as_str().unwrap());
        // One job each, named in the record; metrics and log ingested from the journal.
        assert_eq!(s["slurm_jobs"].as_array().unwrap().len(), 1, "{s}");
        assert_eq!(s["summary"]["loss/total"]["count"], 6, "{}", s["summary"]);
        let log = s["log"].to_string();
        assert!(log.contains("worker started on"), "{log}");
    }
    for r in local["runs"].as_array().unwrap() {
        let s = show(&local_store, r["id"].as_str().unwrap());
        assert!(s["slurm_jobs"].as_array().unwrap().is_empty());
    }
    // The sweep table reads the ingested metrics.
    let table = ok(&mifo(&slurm_store, &["sweep", "show", "grid"]));
    assert_eq!(
        table.lines().filter(|l| l.contains("0.0")).count(),
        4,
        "{table}"
    );
    stop_engine(&slurm_store);
    stop_engine(&local_store);
}

/// One learning run of `steps` steps, detached; returns its id.
fn launch(store: &Path, steps: u64) -> String {
    let mut args: Vec<String> = vec!["learn".into()];
    args.extend(learn_args(steps));
    args.push("--detach".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = mifo(store, &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let id = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .find(|w| w.len() == 16 && w.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| panic!("no run id in {text:?}"))
        .to_string();
    id
}

fn pid_of_worker(journal: &str) -> i32 {
    let started = journal
        .lines()
        .rev()
        .find(|l| l.contains("\"kind\":\"started\""))
        .expect("a started record");
    let at = started.find("\"pid\":").unwrap() + 6;
    started[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

#[test]
fn a_killed_or_requeued_worker_resumes_to_the_same_embeddings_and_scancel_cancels() {
    require_slurm();
    let _cluster = shared_cluster();
    let store = scratch("slurm-kill");
    start_slurm_engine(&store, &["--time", "10:00"]);
    let steps = 45;
    let killed = launch(&store, steps);
    let cancelled = launch(&store, 600);
    // SIGKILL the worker after its first checkpoint and a step past it (which the resumed
    // worker runs again: its loss must not be stored twice).
    let text = wait_journal(&store, &killed, "step after a checkpoint", |t| {
        t.contains("\"kind\":\"checkpoint\"")
            && t.rsplit("\"kind\":\"checkpoint\"")
                .next()
                .unwrap()
                .contains("\"name\":\"loss/total\"")
    });
    assert!(
        !text.contains("\"kind\":\"ended\""),
        "ended before the kill"
    );
    let pid = pid_of_worker(&text);
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    // scancel the other once it runs.
    wait_journal(&store, &cancelled, "start", |t| {
        t.contains("\"kind\":\"started\"")
    });
    let job = show(&store, &cancelled)["slurm_jobs"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(Command::new("scancel")
        .arg(&job)
        .status()
        .unwrap()
        .success());

    // Once the resubmitted job has checkpointed, Slurm requeues it (same job id; released at
    // once instead of after Slurm's requeue delay): it continues from its journal's checkpoint.
    wait_journal(&store, &killed, "checkpoint after the resubmission", |t| {
        t.matches("\"kind\":\"started\"").count() == 2
            && t.rsplit("\"kind\":\"started\"")
                .next()
                .unwrap()
                .contains("\"kind\":\"checkpoint\"")
    });
    let second = show(&store, &killed)["slurm_jobs"][1]
        .as_str()
        .unwrap()
        .to_string();
    let requeued = Command::new("scontrol")
        .args(["requeue", &second])
        .status()
        .unwrap();
    assert!(requeued.success());
    // Slurm holds a requeued job for a while (reason BeginTime): release it as soon as it is
    // pending again.
    for _ in 0..100 {
        let state = Command::new("squeue")
            .args(["-h", "-j", &second, "-o", "%T %r"])
            .output()
            .unwrap();
        let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
        if state.starts_with("RUNNING") || state.is_empty() {
            break;
        }
        if state.starts_with("PENDING") {
            let _ = Command::new("scontrol")
                .args(["update", &format!("JobId={second}"), "StartTime=now"])
                .output();
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let k = wait_final(&store, &killed, Duration::from_secs(300));
    assert_eq!(k["status"], "done", "{k}");
    let jobs = k["slurm_jobs"].as_array().unwrap();
    assert_eq!(
        jobs.len(),
        2,
        "killed then resubmitted (a requeue keeps its id): {k}"
    );
    let text = journal(&store, &killed);
    assert_eq!(text.matches("\"kind\":\"started\"").count(), 3, "{text}");
    let log = k["log"].to_string();
    assert!(
        log.contains("resubmitted from the last checkpoint"),
        "{log}"
    );
    assert!(log.contains("from the checkpoint after step"), "{log}");
    // Every step's loss once, though steps after the checkpoint ran twice.
    assert_eq!(
        k["summary"]["loss/total"]["count"], steps,
        "{}",
        k["summary"]
    );
    let c = wait_final(&store, &cancelled, Duration::from_secs(120));
    assert_eq!(c["status"], "cancelled", "{c}");

    // The same spec run without a kill, by a local engine: the same embeddings.
    let local = scratch("slurm-kill-local");
    let again = launch(&local, steps);
    let l = wait_final(&local, &again, Duration::from_secs(300));
    assert_eq!(l["status"], "done");
    assert_eq!(k["spec_hash"], l["spec_hash"]);
    assert_eq!(k["outputs"]["embeddings"], l["outputs"]["embeddings"]);
    stop_engine(&store);
    stop_engine(&local);
}

#[test]
fn an_engine_stopped_and_started_mid_sweep_ends_every_run_once() {
    require_slurm();
    let _cluster = shared_cluster();
    let store = scratch("slurm-restart");
    start_slurm_engine(&store, &["--time", "10:00"]);
    let doc = sweep(&store, &["--name", "restart", "--detach"]);
    let runs: Vec<String> = doc["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(runs.len(), 4);
    // Stop the engine while the first run is under way: its jobs go on.
    wait_journal(&store, &runs[0], "start", |t| {
        t.contains("\"kind\":\"started\"")
    });
    let out = mifo(&store, &["engine", "stop"]);
    assert!(out.status.success());
    let t0 = Instant::now();
    // (A status asked while the engine exits may fail: asked again.)
    while !String::from_utf8_lossy(&mifo(&store, &["engine", "status"]).stdout)
        .contains("no engine is running")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the engine did not stop"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Started again: it follows the jobs it finds.
    start_slurm_engine(&store, &["--time", "10:00"]);
    let status = ok(&mifo(&store, &["engine", "status"]));
    assert!(status.contains("executor slurm"), "{status}");
    let log = std::fs::read_to_string(store.join("engine.log")).unwrap();
    assert!(
        log.contains("again (Slurm jobs"),
        "no run followed again:\n{log}"
    );
    for run in &runs {
        let s = wait_final(&store, run, Duration::from_secs(300));
        assert_eq!(s["status"], "done", "{s}");
        assert_eq!(s["slurm_jobs"].as_array().unwrap().len(), 1, "{s}");
        assert_eq!(s["summary"]["loss/total"]["count"], 6, "{}", s["summary"]);
        let log = s["log"].as_array().unwrap();
        let starts = log
            .iter()
            .filter(|l| l.as_str().unwrap_or("").contains("worker started on"))
            .count();
        assert_eq!(starts, 1, "{log:?}");
    }
    stop_engine(&store);
}

#[test]
fn bad_slurm_input_is_refused_at_engine_start_with_nothing_queued() {
    require_slurm();
    let _cluster = shared_cluster();
    let store = scratch("slurm-bad");
    // No sbatch on PATH.
    let out = mifo_env(
        &store,
        &["engine", "start", "--executor", "slurm"],
        &[("PATH", "/nonexistent")],
    );
    let line = err_line(&out);
    assert!(line.contains("`sbatch` is not on PATH"), "{line}");
    // A partition Slurm does not know.
    let out = mifo(
        &store,
        &[
            "engine",
            "start",
            "--executor",
            "slurm",
            "--partition",
            "nosuchpart",
        ],
    );
    let line = err_line(&out);
    assert!(
        line.contains("sbatch") && line.to_lowercase().contains("partition"),
        "{line}"
    );
    // An account Slurm refuses. The local cluster has no accounting, so its sbatch takes any
    // account; a stand-in sbatch first on PATH answers for an unknown one as a cluster that
    // enforces associations does, and hands every other call to the real one.
    let shim = scratch("slurm-bad-shim");
    let real = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v sbatch"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let script = shim.join("sbatch");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$*\" in *nosuchacct*) echo 'sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified' >&2; exit 1;; esac\nexec {} \"$@\"\n",
            real.trim()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", shim.display(), std::env::var("PATH").unwrap());
    let out = mifo_env(
        &store,
        &[
            "engine",
            "start",
            "--executor",
            "slurm",
            "--account",
            "nosuchacct",
        ],
        &[("PATH", &path)],
    );
    let line = err_line(&out);
    assert!(
        line.contains("Invalid account") && line.contains("sbatch"),
        "{line}"
    );
    assert!(!store.join("db").exists(), "the store was not created");
    // Slurm flags without the Slurm executor; an unknown executor.
    let line = err_line(&mifo(
        &store,
        &["engine", "start", "--executor", "local", "--gres", "gpu:1"],
    ));
    assert!(line.contains("--executor slurm"), "{line}");
    let line = err_line(&mifo(&store, &["engine", "start", "--executor", "k8s"]));
    assert!(line.contains("--executor k8s"), "{line}");
    // A bad engine.toml names itself.
    std::fs::write(store.join("engine.toml"), "[executor]\nkind = 3\n").unwrap();
    let line = err_line(&mifo(&store, &["engine", "start"]));
    assert!(line.contains("engine.toml"), "{line}");
    std::fs::remove_file(store.join("engine.toml")).unwrap();
    // Nothing started, nothing queued.
    let st = ok(&mifo(&store, &["engine", "status"]));
    assert!(st.contains("no engine is running"), "{st}");
    assert!(!store.join("db").exists(), "the store was not created");

    // The first tiny job: a compute node that cannot run mifo (here /bin/false stands for a
    // binary or store the nodes cannot reach) is refused in one line; the real binary passes.
    let opts = mifo::jobs::slurm::SlurmOptions::default();
    let err = mifo::jobs::slurm::preflight(
        &store,
        Path::new("/bin/false"),
        &opts,
        Duration::from_secs(120),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("could not run /bin/false and write into") && !err.contains('\n'),
        "{err}"
    );
    mifo::jobs::slurm::preflight(
        &store,
        Path::new(env!("CARGO_BIN_EXE_mifo")),
        &opts,
        Duration::from_secs(120),
    )
    .unwrap();
    // The probe leaves no marker or script behind.
    let left: Vec<_> = std::fs::read_dir(store.join("work"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".out"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Sets the node back to service when dropped (also when the test fails).
struct NodeBack(String);

impl Drop for NodeBack {
    fn drop(&mut self) {
        let _ = Command::new("scontrol")
            .args(["update", &format!("NodeName={}", self.0), "State=RESUME"])
            .output();
    }
}

#[test]
fn a_run_whose_node_goes_down_is_interrupted_and_resumed_when_it_returns() {
    require_slurm();
    let _cluster = CLUSTER.write().unwrap_or_else(|p| p.into_inner());
    let store = scratch("slurm-node");
    // Without Slurm's own requeue, a job on a failed node ends NODE_FAIL.
    start_slurm_engine(&store, &["--sbatch-arg=--no-requeue"]);
    let steps = 30;
    let run = launch(&store, steps);
    wait_journal(&store, &run, "checkpoint", |t| {
        t.contains("\"kind\":\"checkpoint\"")
    });
    let node = String::from_utf8_lossy(
        &Command::new("sinfo")
            .args(["-h", "-o", "%N"])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_string();
    let _back = NodeBack(node.clone());
    let down = Command::new("scontrol")
        .args([
            "update",
            &format!("NodeName={node}"),
            "State=DOWN",
            "Reason=mifo-test",
        ])
        .status()
        .unwrap();
    assert!(down.success());
    // The one-node cluster returns the node to service by itself (ReturnToService=2); the
    // resubmitted job waits for it.
    let r = wait_final(&store, &run, Duration::from_secs(300));
    assert_eq!(r["status"], "done", "{r}");
    assert_eq!(r["slurm_jobs"].as_array().unwrap().len(), 2, "{r}");
    let log = r["log"].to_string();
    assert!(log.contains("ended NODE_FAIL"), "{log}");
    assert!(log.contains("from the checkpoint after step"), "{log}");
    assert_eq!(
        r["summary"]["loss/total"]["count"], steps,
        "{}",
        r["summary"]
    );
    stop_engine(&store);
}

#[test]
fn an_interrupted_run_without_retries_left_resumes_through_slurm_with_learn_resume() {
    require_slurm();
    let _cluster = shared_cluster();
    let store = scratch("slurm-resume");
    start_slurm_engine(&store, &["--max-retries", "0"]);
    let steps = 30;
    let run = launch(&store, steps);
    let text = wait_journal(&store, &run, "checkpoint", |t| {
        t.contains("\"kind\":\"checkpoint\"")
    });
    assert!(Command::new("kill")
        .args(["-9", &pid_of_worker(&text).to_string()])
        .status()
        .unwrap()
        .success());
    // No retry left: the run stays interrupted.
    let t0 = Instant::now();
    let r = loop {
        let r = show(&store, &run);
        if r["status"] == "interrupted" {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{r}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(r["error"].as_str().unwrap().contains("ended FAILED"), "{r}");
    // `mifo learn --resume` sends it to Slurm again and follows it to the end.
    let out = mifo(&store, &["learn", "--resume", &run]);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("done"), "{text}");
    let r = show(&store, &run);
    assert_eq!(r["status"], "done", "{r}");
    assert_eq!(r["slurm_jobs"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(
        r["summary"]["loss/total"]["count"], steps,
        "{}",
        r["summary"]
    );
    stop_engine(&store);
}

/// The array job id and task of a run's first Slurm job (`ARRAY_TASK`).
fn array_task(store: &Path, run: &str) -> (String, u32) {
    let s = show(store, run);
    let job = s["slurm_jobs"][0].as_str().unwrap_or("").to_string();
    let (array, task) = job
        .split_once('_')
        .unwrap_or_else(|| panic!("run {run}: not an array task: {s}"));
    (array.to_string(), task.parse().unwrap())
}

fn cancel(store: &Path, run: &str) {
    let mut c = mifo::engine::Client::connect(store).unwrap();
    let reply = c
        .request(&mifo::engine::Request::Cancel {
            run: run.to_string(),
        })
        .unwrap();
    assert!(
        matches!(reply, mifo::engine::Response::Ok),
        "cancel: {reply:?}"
    );
}

#[test]
fn a_sweep_is_one_throttled_job_array_whose_tasks_cancel_alone() {
    require_slurm();
    let _cluster = shared_cluster();
    let store = scratch("slurm-array");
    start_slurm_engine(&store, &["--array-limit", "2"]);
    let mut args: Vec<String> = vec!["sweep".into(), "learn".into()];
    args.extend(learn_args(30));
    args.extend(
        [
            "--grid",
            "learn.lr=0.005,0.01,0.02,0.04",
            "--name",
            "arr",
            "--json",
            "--detach",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let doc = json(&mifo(&store, &args));
    assert_eq!(doc["queued"], 4, "{doc}");
    let runs: Vec<String> = doc["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let (array, _) = array_task(&store, &runs[0]);
    let mut tasks: Vec<u32> = runs
        .iter()
        .map(|r| {
            let (a, t) = array_task(&store, r);
            assert_eq!(a, array, "run {r} is not in the sweep's array");
            t
        })
        .collect();
    tasks.sort();
    assert_eq!(tasks, [0, 1, 2, 3]);
    // One sbatch --array with the throttle: Slurm says so.
    let job = String::from_utf8_lossy(
        &Command::new("scontrol")
            .args(["show", "job", &array])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    assert!(job.contains("ArrayTaskThrottle=2"), "{job}");
    // Cancel one task once it runs: the others go on to the end.
    wait_journal(&store, &runs[1], "start", |t| {
        t.contains("\"kind\":\"started\"")
    });
    cancel(&store, &runs[1]);
    let c = wait_final(&store, &runs[1], Duration::from_secs(120));
    assert_eq!(c["status"], "cancelled", "{c}");
    assert_eq!(c["slurm_jobs"].as_array().unwrap().len(), 1, "{c}");
    for (i, run) in runs.iter().enumerate() {
        if i == 1 {
            continue;
        }
        let s = wait_final(&store, run, Duration::from_secs(300));
        assert_eq!(s["status"], "done", "{s}");
        assert_eq!(s["summary"]["loss/total"]["count"], 30, "{}", s["summary"]);
        let log = s["log"].to_string();
        assert!(log.contains(&format!("as Slurm job {array}_")), "{log}");
    }
    // The same sweep again: the three done combinations are skipped; the cancelled one, the
    // only run queued, goes as a job of its own (no second array).
    let doc = json(&mifo(&store, &args));
    assert_eq!(doc["queued"], 1, "{doc}");
    assert_eq!(doc["skipped_done"], 3, "{doc}");
    let again = doc["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["status"] == "queued")
        .and_then(|r| r["id"].as_str())
        .unwrap()
        .to_string();
    assert!(!runs.contains(&again));
    let s = wait_final(&store, &again, Duration::from_secs(300));
    assert_eq!(s["status"], "done", "{s}");
    let job = s["slurm_jobs"][0].as_str().unwrap();
    assert!(
        !job.contains('_'),
        "a single run went as an array task: {s}"
    );
    let log = std::fs::read_to_string(store.join("engine.log")).unwrap();
    assert_eq!(
        log.matches("submitted as Slurm job array").count(),
        1,
        "{log}"
    );
    stop_engine(&store);
}

/// `mifo synth` flags of the synthesis runs here (from learning run `from`).
fn synth_args<'a>(from: &'a str, steps: &'a str, samples: &'a str) -> Vec<&'a str> {
    vec![
        "synth",
        "--from",
        from,
        "--model",
        "fixtures/tiny-sd21",
        "--prompt",
        "a photo of <v0> and <v1> on the beach",
        "--box",
        "<v0>=0.0,0.5,0.5,1.0",
        "--box",
        "<v1>=0.5,0.5,1.0,1.0",
        "--seed",
        "3",
        "--samples",
        samples,
        "--set",
        steps,
        "--set",
        "synth.guided_steps=3",
        "--set",
        "synth.refine_every=2",
        "--device",
        "auto",
    ]
}

/// The `sample_*.png` outputs of a run: name → blob hash.
fn samples(run: &serde_json::Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = run["outputs"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("sample_"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    out.sort();
    out
}

#[test]
fn a_synthesis_run_through_slurm_makes_the_samples_of_a_local_run_and_cancels() {
    require_slurm();
    let _cluster = shared_cluster();
    let store = scratch("slurm-synth");
    start_slurm_engine(&store, &["--time", "10:00"]);
    let learned = launch(&store, 6);
    let l = wait_final(&store, &learned, Duration::from_secs(300));
    assert_eq!(l["status"], "done", "{l}");
    // Followed to the end by the CLI.
    let mut args = synth_args(&learned, "synth.steps=8", "2");
    args.push("--json");
    let remote = json(&mifo(&store, &args));
    assert_eq!(remote["status"], "done", "{remote}");
    let run = remote["id"].as_str().unwrap().to_string();
    let r = show(&store, &run);
    assert_eq!(r["slurm_jobs"].as_array().unwrap().len(), 1, "{r}");
    assert!(r["log"].to_string().contains("worker started on"), "{r}");
    let journal_text = journal(&store, &run);
    assert!(
        journal_text.contains("\"kind\":\"output\""),
        "{journal_text}"
    );
    let slurm_samples = samples(&r);
    assert_eq!(slurm_samples.len(), 2, "{r}");

    // A long one, cancelled through the engine once it runs: scancel → cancelled.
    let mut args = synth_args(&learned, "synth.steps=400", "4");
    args.push("--detach");
    let out = mifo(&store, &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let long = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .find(|w| w.len() == 16 && w != &learned)
        .unwrap_or_else(|| panic!("no run id in {text:?}"))
        .to_string();
    wait_journal(&store, &long, "progress", |t| {
        t.contains("\"kind\":\"progress\"")
    });
    cancel(&store, &long);
    let c = wait_final(&store, &long, Duration::from_secs(120));
    assert_eq!(c["status"], "cancelled", "{c}");

    // The same synthesis spec on a local engine of the same store: the same sample bytes.
    stop_engine(&store);
    let t0 = Instant::now();
    while !String::from_utf8_lossy(&mifo(&store, &["engine", "status"]).stdout)
        .contains("no engine is running")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the engine did not stop"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut args = synth_args(&learned, "synth.steps=8", "2");
    args.extend(["--rerun", "--json"]);
    let local = json(&mifo(&store, &args));
    assert_eq!(local["status"], "done", "{local}");
    let l = show(&store, local["id"].as_str().unwrap());
    assert!(l["slurm_jobs"].as_array().unwrap().is_empty(), "{l}");
    assert_eq!(l["spec_hash"], r["spec_hash"]);
    assert_eq!(samples(&l), slurm_samples, "Slurm and local samples differ");
    stop_engine(&store);
}
