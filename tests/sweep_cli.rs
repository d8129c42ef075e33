//! `mifo sweep` from the command line: a 2 × 2 grid ends as 4 tagged `done` runs whose stored
//! configs carry the grid's values, the same sweep again queues nothing, `sweep show` orders
//! by the metric; bad grids, seeds, keys and devices are refused in one line with nothing
//! queued; `engine start --gpus 7` is refused; `engine status` names each slot's run.

mod cli_support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cli_support::{err_line, json, ok, root, scratch};

/// `mifo --store STORE ARGS…` with an engine whose pool is two CPU slots.
fn mifo(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mifo"))
        .current_dir(root())
        .env("MIFO_ENGINE_IDLE", "5")
        .env("MIFO_ENGINE_CPU_SLOTS", "2")
        .env_remove("MIFO_MODEL")
        .env_remove("MIFO_ENGINE_GPUS")
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .unwrap()
}

const BASE: [&str; 13] = [
    "sweep",
    "learn",
    "--scene",
    "fixtures/scenes/coffee",
    "--model",
    "fixtures/tiny-sd21",
    "--set",
    "learn.reward_steps=2",
    "--set",
    "learn.penalty_steps=3",
    "--set",
    "learn.dreambooth=none",
    "--grid",
];

fn sweep_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = BASE.to_vec();
    v.push("learn.lambda_penalty=0.005,0.02");
    v.extend([
        "--grid",
        "learn.lr=0.005,0.01",
        "--set",
        "learn.preview=false",
        "--device",
        "auto",
    ]);
    v.extend(extra);
    v
}

fn stop_engine(store: &Path) {
    let _ = mifo(store, &["engine", "stop", "--force"]);
}

#[test]
fn a_grid_sweep_runs_every_combination_once_and_shows_best_first() {
    let store = scratch("sweep-grid");
    let doc = json(&mifo(&store, &sweep_args(&["--name", "pen", "--json"])));
    assert_eq!(doc["name"], "pen");
    assert_eq!(doc["queued"], 4);
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    assert!(runs.iter().all(|r| r["status"] == "done"), "{runs:?}");

    // Four done runs tagged `pen`, ran on the pool's slots, whose configs carry the grid.
    let listed = json(&mifo(&store, &["runs", "ls", "--tag", "pen", "--json"]));
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 4);
    let mut pairs = Vec::new();
    for r in listed {
        assert_eq!(r["status"], "done");
        let id = r["id"].as_str().unwrap();
        let show = json(&mifo(&store, &["runs", "show", id, "--json"]));
        let device = show["device"].as_str().unwrap();
        assert!(device == "cpu:0" || device == "cpu:1", "{device}");
        let learn = &show["config"]["learn"];
        assert_eq!(learn["penalty_steps"], 3, "the --set values are kept");
        pairs.push((
            learn["lambda_penalty"].as_f64().unwrap(),
            learn["lr"].as_f64().unwrap(),
        ));
        assert_eq!(show["seed"], 0);
    }
    pairs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(
        pairs,
        [(0.005, 0.005), (0.005, 0.01), (0.02, 0.005), (0.02, 0.01)]
    );

    // The same sweep again (with the default name): nothing new runs, every run is skipped as
    // done and tagged with the default name, which is the same both times.
    let again = mifo(&store, &sweep_args(&["--detach"]));
    let text = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(again.status.success(), "{text}");
    assert!(text.contains("queued 0, skipped 4 already done"), "{text}");
    let name = text
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    assert!(name.starts_with("learn-lambda_penalty-lr-"), "{name}");
    let doc = json(&mifo(&store, &sweep_args(&["--json", "--detach"])));
    assert_eq!(
        (doc["name"].as_str(), &doc["queued"]),
        (Some(name.as_str()), &0.into())
    );
    let tagged = json(&mifo(&store, &["runs", "ls", "--tag", &name, "--json"]));
    assert_eq!(tagged.as_array().unwrap().len(), 4);

    // `sweep show`: the varied keys against the final loss, best (lowest) first; `:max` turns
    // the order round.
    let table = json(&mifo(&store, &["sweep", "show", "pen", "--json"]));
    assert_eq!(
        table["keys"],
        serde_json::json!(["learn.lambda_penalty", "learn.lr"])
    );
    assert_eq!(table["metrics"], serde_json::json!(["loss/total"]));
    let losses = |t: &serde_json::Value| -> Vec<f64> {
        t["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["metrics"]["loss/total"].as_f64().unwrap())
            .collect()
    };
    let up = losses(&table);
    assert_eq!(up.len(), 4);
    assert!(up.windows(2).all(|w| w[0] <= w[1]), "{up:?}");
    let down = losses(&json(&mifo(
        &store,
        &["sweep", "show", "pen", "--by", "loss/total:max", "--json"],
    )));
    assert!(down.windows(2).all(|w| w[0] >= w[1]), "{down:?}");
    assert_ne!(
        up, down,
        "the losses are all equal: the order tests nothing"
    );
    let text = ok(&mifo(&store, &["sweep", "show", "pen"]));
    let header = text.lines().nth(1).unwrap();
    assert!(
        header.contains("learn.lambda_penalty") && header.contains("loss/total"),
        "{text}"
    );
    let e = err_line(&mifo(&store, &["sweep", "show", "nosuch"]));
    assert!(e.contains("sweep nosuch: no run is tagged nosuch"), "{e}");

    // `runs ls --tag`: the sweep's table (the same as `sweep show`), best first; `--by`
    // orders it. Run ids in the table's order:
    let order = |text: &str| -> Vec<String> {
        text.lines()
            .skip(2)
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect()
    };
    let shown = order(&ok(&mifo(&store, &["sweep", "show", "pen"])));
    let listed = ok(&mifo(&store, &["runs", "ls", "--tag", "pen"]));
    assert!(
        listed.starts_with("sweep pen · 4 runs · best first by loss/total (lower is better)"),
        "{listed}"
    );
    let header = listed.lines().nth(1).unwrap();
    assert!(
        header.contains("learn.lambda_penalty")
            && header.contains("learn.lr")
            && header.contains("loss/total"),
        "{listed}"
    );
    assert_eq!(order(&listed), shown);
    let by_max = ok(&mifo(
        &store,
        &["runs", "ls", "--tag", "pen", "--by", "loss/total:max"],
    ));
    let mut reversed = shown.clone();
    reversed.reverse();
    assert_eq!(order(&by_max), reversed, "{by_max}");
    // Runs alike under a tag (here one run) list as runs; --json always lists.
    let one = &shown[0];
    ok(&mifo(&store, &["runs", "tag", one, "solo"]));
    let solo = ok(&mifo(&store, &["runs", "ls", "--tag", "solo"]));
    assert!(
        !solo.starts_with("sweep") && solo.contains(&one[..8]),
        "{solo}"
    );
    let out = mifo(&store, &["runs", "ls", "--by", "loss/total"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--tag <TAG>"), "{e}");
    stop_engine(&store);
    let _ = std::fs::remove_dir_all(store);
}

/// The number of runs in the store (0 when there is none).
fn run_count(store: &Path) -> usize {
    if !store.join("db").is_dir() {
        return 0;
    }
    let out = mifo(store, &["runs", "ls", "--json"]);
    json(&out).as_array().unwrap().len()
}

#[test]
fn bad_sweeps_are_refused_in_one_line_and_queue_nothing() {
    let store = scratch("sweep-bad");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["learn.lr=0.01,fast"],
            "--grid learn.lr=fast: expected a number",
        ),
        (vec!["learn.nope=1,2"], "--grid learn.nope=1: unknown key"),
        (vec!["learn.lr"], "--grid learn.lr: expected section.key="),
        (
            vec!["synth.steps=1,2"],
            "--grid synth.steps=1,2: a learn sweep",
        ),
        (
            vec!["learn.lr=0.01,0"],
            "--grid: combination 2 of 2 (learn.lr=0 seed 0): learn.lr",
        ),
        (
            vec!["learn.lr=0.01", "--set", "learn.nope=1"],
            "--set learn.nope=1: unknown key",
        ),
        (
            vec!["learn.lr=0.01", "--seeds", "3..1"],
            "--seeds 3..1: the range is empty",
        ),
        (
            vec!["learn.lr=0.01", "--device", "cuda:3"],
            "--device cuda:3:",
        ),
        // Passes the command line's checks, fails the engine's (one word per mask): the
        // first combination is fine, and still nothing is queued.
        (
            vec![r#"learn.init=mean,"cup,spoon,fork""#],
            "--grid: combination 2 of 2",
        ),
    ];
    for (grid, needle) in cases {
        let mut args: Vec<&str> = BASE.to_vec();
        args.extend(grid);
        let e = err_line(&mifo(&store, &args));
        assert!(e.contains(needle), "{args:?}: {e}");
        assert_eq!(run_count(&store), 0, "{args:?} queued a run");
    }
    let e = err_line(&mifo(&store, &sweep_args(&["--resume", "x"])));
    assert!(e.contains("--resume"), "{e}");
    let e = err_line(&mifo(&store, &sweep_args(&["--name", "a b"])));
    assert!(e.contains("--name a b:"), "{e}");
    assert_eq!(run_count(&store), 0);
    stop_engine(&store);

    // A GPU the machine does not have is refused at `engine start`, and no engine starts.
    let fresh = scratch("sweep-gpus");
    let e = err_line(&cli_support::mifo(
        &fresh,
        &["engine", "start", "--gpus", "7"],
    ));
    assert!(e.contains("--gpus 7: there is no GPU 7"), "{e}");
    let st = ok(&mifo(&fresh, &["engine", "status"]));
    assert!(st.contains("no engine is running"), "{st}");
    let _ = std::fs::remove_dir_all(store);
    let _ = std::fs::remove_dir_all(fresh);
}

#[test]
fn engine_status_names_the_run_each_slot_holds() {
    let store = scratch("sweep-status");
    let out = mifo(
        &store,
        &[
            "sweep",
            "learn",
            "--scene",
            "fixtures/scenes/coffee",
            "--model",
            "fixtures/tiny-sd21",
            "--device",
            "auto",
            "--set",
            "learn.reward_steps=1",
            "--set",
            "learn.penalty_steps=400",
            "--set",
            "learn.dreambooth=none",
            "--set",
            "learn.preview=false",
            "--seeds",
            "0..3",
            "--detach",
            "--json",
        ],
    );
    let doc = json(&out);
    let ids: Vec<String> = doc["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = json(&mifo(&store, &["engine", "status", "--json"]));
        let held: Vec<&str> = st["pool"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["device"].as_str().unwrap().starts_with("cpu:"))
            .filter_map(|d| d["runs"][0].as_str())
            .collect();
        if held.len() == 2 {
            break st;
        }
        assert!(Instant::now() < deadline, "two slots never held runs: {st}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // The third run waits for any slot.
    let waiting = st["waiting"].as_array().unwrap();
    assert_eq!(waiting.len(), 1, "{st}");
    assert_eq!(waiting[0][1], "auto");
    let text = ok(&mifo(&store, &["engine", "status"]));
    let slot_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("cpu:"))
        .collect();
    assert_eq!(slot_lines.len(), 2, "{text}");
    for line in slot_lines {
        assert!(ids.iter().any(|id| line.contains(id.as_str())), "{line}");
    }
    assert!(text.contains("(waits for auto)"), "{text}");
    stop_engine(&store);
    let _ = std::fs::remove_dir_all(store);
}
