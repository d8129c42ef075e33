//! `mifo eval` and `mifo synth --suite` end to end through the engine on the tiny models
//! (fixtures/tiny-sd21, tiny-clip, tiny-dino): scores stored with the runs and shown by
//! `runs show` / `runs diff`, the refusals (missing or wrong model folders) leaving the store as
//! it was, the editability suite under a tag and the mean tables.

mod cli_support;

use std::path::Path;
use std::process::Output;

use cli_support::{json, mifo, ok};
use serde_json::Value;

fn err_line(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    lines[0].to_string()
}

const MODELS: [&str; 4] = [
    "--clip",
    "fixtures/tiny-clip",
    "--dino",
    "fixtures/tiny-dino",
];

fn learn(store: &Path) -> String {
    let out = json(&mifo(
        store,
        &[
            "learn",
            "--scene",
            "fixtures/scenes/coffee",
            "--model",
            "fixtures/tiny-sd21",
            "--seed",
            "5",
            "--json",
            "--set",
            "learn.reward_steps=2",
            "--set",
            "learn.penalty_steps=2",
            "--set",
            "learn.dreambooth=none",
            "--set",
            "learn.preview_steps=2",
            "--set",
            "learn.init=cup,spoon",
        ],
    ));
    out["id"].as_str().unwrap().to_string()
}

fn close(a: &Value, b: f64) -> bool {
    (a.as_f64().unwrap() - b).abs() < 1e-9
}

#[test]
fn scores_are_computed_stored_and_shown() {
    let store = std::env::temp_dir().join(format!("mifo-eval-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let l = learn(&store);
    let s = json(&mifo(
        &store,
        &[
            "synth",
            "--from",
            &l,
            "--model",
            "fixtures/tiny-sd21",
            "--prompt",
            "a photo of <v0> and <v1> on the beach",
            "--box",
            "<v0>=0.05,0.3,0.45,0.95",
            "--box",
            "<v1>=0.55,0.3,0.95,0.95",
            "--samples",
            "2",
            "--seed",
            "1",
            "--json",
            "--set",
            "synth.steps=4",
            "--set",
            "synth.guided_steps=2",
            "--set",
            "synth.refine_every=1",
        ],
    ))["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Missing or wrong model folders: one line naming the flag, nothing stored.
    let e = err_line(&mifo(&store, &["eval", &s]));
    assert!(e.contains("--clip DIR") && e.contains("MIFO_CLIP"), "{e}");
    let e = err_line(&mifo(&store, &["eval", &s, "--clip", "fixtures/tiny-clip"]));
    assert!(e.contains("--dino DIR") && e.contains("MIFO_DINO"), "{e}");
    let e = err_line(&mifo(
        &store,
        &[
            "eval",
            &s,
            "--clip",
            "no/such/dir",
            "--dino",
            "fixtures/tiny-dino",
        ],
    ));
    assert!(e.contains("--clip no/such/dir"), "{e}");
    let e = err_line(&mifo(
        &store,
        &[
            "eval",
            &s,
            "--clip",
            "fixtures/tiny-dino",
            "--dino",
            "fixtures/tiny-dino",
        ],
    ));
    assert!(
        e.contains("--clip fixtures/tiny-dino") && e.contains("model_type"),
        "{e}"
    );
    let e = err_line(&mifo(&store, &["eval", &s, "--class", "cup"]));
    assert!(e.contains("--class cup"), "{e}");
    let e = err_line(&mifo(
        &store,
        &["eval", "zzzz", MODELS[0], MODELS[1], MODELS[2], MODELS[3]],
    ));
    assert!(e.contains("zzzz"), "{e}");
    let shown = json(&mifo(&store, &["runs", "show", &s, "--json"]));
    assert!(shown["eval"].as_object().unwrap().is_empty());
    assert!(shown["metrics"].get("eval/sim_c").is_none());

    // Scores.
    let mut args = vec!["eval", s.as_str(), "--json"];
    args.extend(MODELS);
    let out = json(&mifo(&store, &args));
    let run = &out["runs"][0];
    let sc = &run["scores"];
    assert_eq!(sc["text"], "a photo of cup and spoon on the beach");
    let (c, d, n) = (
        sc["sim_c"].as_f64().unwrap(),
        sc["sim_d"].as_f64().unwrap(),
        sc["nsim_d"].as_f64().unwrap(),
    );
    assert!(close(&sc["cs"], c * d * (1.0 - n)));
    assert!((-1.0..=1.0).contains(&c) && (-1.0..=1.0).contains(&d));
    assert_eq!(sc["samples"].as_array().unwrap().len(), 2);
    for sample in sc["samples"].as_array().unwrap() {
        let subjects = sample["subjects"].as_array().unwrap();
        assert_eq!(subjects.len(), 2);
        for subj in subjects {
            assert!(["mask", "box"].contains(&subj["region"].as_str().unwrap()));
        }
    }
    // Stored with the run, shown by runs show.
    let shown = json(&mifo(&store, &["runs", "show", &s, "--json"]));
    for (k, v) in [("eval/sim_c", c), ("eval/sim_d", d), ("eval/nsim_d", n)] {
        assert!(close(&shown["metrics"][k][0][1], v), "{k}");
        assert!(close(&shown["eval"][k], v), "{k}");
    }
    assert!(shown["eval"]["eval/sim_d/<v0>"].is_f64());
    assert!(shown["log"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l.as_str().unwrap().starts_with("eval: SIM-C text")));
    let text = ok(&mifo(&store, &["runs", "show", &s]));
    assert!(text.contains("eval       SIM-C "), "{text}");
    assert!(text.contains("  <v1>  SIM-D "), "{text}");

    // A learning run: its preview, instances located by the whole image (no NSIM-D, no CS).
    let mut args = vec!["eval", l.as_str()];
    args.extend(MODELS);
    let text = ok(&mifo(&store, &args));
    assert!(
        text.contains("preview.png") && text.contains("whole"),
        "{text}"
    );
    assert!(
        text.contains("SIM-C text  \"a photo of cup and spoon\""),
        "{text}"
    );
    let shown = json(&mifo(&store, &["runs", "show", &l, "--json"]));
    assert!(shown["eval"]["eval/sim_c"].is_f64());
    assert!(shown["eval"].get("eval/cs").is_none());

    // runs diff lists the scores side by side.
    let diff = ok(&mifo(&store, &["runs", "diff", &l, &s]));
    assert!(diff.contains("scores (A  |  B  |  B - A)"), "{diff}");
    assert!(diff.contains("eval/sim_c"), "{diff}");
    assert!(!diff.contains("eval/setup"), "{diff}");

    // The store checks clean.
    let check = ok(&mifo(&store, &["runs", "check"]));
    assert!(check.contains(": 0 problems"), "{check}");
    let _ = mifo(&store, &["engine", "stop"]);
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn the_editability_suite_runs_under_a_tag_and_tables_its_means() {
    let store = std::env::temp_dir().join(format!("mifo-eval-suite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let l = learn(&store);
    let fast = [
        "--set",
        "synth.steps=2",
        "--set",
        "synth.guided_steps=1",
        "--set",
        "synth.gd_iters=1",
        "--set",
        "synth.kmeans_restarts=1",
    ];
    let mut args = vec![
        "synth",
        "--suite",
        "editability",
        "--from",
        l.as_str(),
        "--model",
        "fixtures/tiny-sd21",
        "--tag",
        "ours",
        "--json",
    ];
    args.extend(fast);
    let out = json(&mifo(&store, &args));
    let runs = out["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 30);
    assert_eq!(out["seed"], 0);
    assert!(runs.iter().all(|r| r["status"] == "done"));
    assert_eq!(runs[0]["prompt"], "a photo of <v0> at the beach");
    assert_eq!(
        runs[29]["prompt"],
        "a photo of <v0> and <v1> with the Eiffel tower in the background"
    );
    // Same suite again: nothing new runs, the same runs are tagged.
    let again = json(&mifo(&store, &args));
    let ids = |v: &Value| -> Vec<String> {
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&again), ids(&out));
    let listed = json(&mifo(&store, &["runs", "ls", "--tag", "ours", "--json"]));
    assert_eq!(listed.as_array().unwrap().len(), 30);
    // A single-instance prompt has one box, the pair two.
    let single = json(&mifo(
        &store,
        &["runs", "show", runs[0]["id"].as_str().unwrap(), "--json"],
    ));
    assert_eq!(
        single["config"]["boxes"],
        serde_json::json!(["<v0>=0.2,0.15,0.8,0.9"])
    );

    // The table.
    let mut args = vec!["eval", "--tag", "ours", "--json"];
    args.extend(MODELS);
    let out = json(&mifo(&store, &args));
    let row = &out["tables"][0];
    assert_eq!(row["label"], "ours");
    assert_eq!(row["runs"], 30);
    let (c, d, n) = (
        row["sim_c"].as_f64().unwrap(),
        row["sim_d"].as_f64().unwrap(),
        row["nsim_d"].as_f64().unwrap(),
    );
    assert!(close(&row["cs"], c * d * (1.0 - n)));
    assert!(close(&row["sim_d_x_nsim_d"], d * n));
    // The row means are the means of the stored per-run scores.
    let mut sum = 0.0;
    for r in out["runs"].as_array().unwrap() {
        sum += r["metrics"]["eval/sim_d"].as_f64().unwrap();
    }
    assert!((sum / 30.0 - d).abs() < 1e-9);
    // Text: both layouts; a second call reuses the stored scores.
    let mut args = vec!["eval", "--tag", "ours"];
    args.extend(MODELS);
    let out = mifo(&store, &args);
    let text = ok(&out);
    assert!(
        text.contains("Table 2 layout") && text.contains("SIM-D×NSIM-D↑"),
        "{text}"
    );
    assert!(
        text.contains("Table 3 layout") && text.contains("CS↑"),
        "{text}"
    );
    let row_line = text
        .lines()
        .filter(|l| l.starts_with("ours"))
        .nth(1)
        .unwrap()
        .to_string();
    assert!(row_line.contains(&format!("{c:.3}")), "{row_line}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("30 tagged run(s) already had scores"));
    let e = err_line(&mifo(
        &store,
        &[
            "eval", "--tag", "nosuch", MODELS[0], MODELS[1], MODELS[2], MODELS[3],
        ],
    ));
    assert!(e.contains("--tag nosuch"), "{e}");
    // The suite needs a finished learning run.
    let e = err_line(&mifo(
        &store,
        &[
            "synth",
            "--suite",
            "editability",
            "--from",
            runs[0]["id"].as_str().unwrap(),
            "--model",
            "fixtures/tiny-sd21",
        ],
    ));
    assert!(e.contains("finished learning run"), "{e}");
    let e = err_line(&mifo(
        &store,
        &[
            "synth",
            "--suite",
            "beauty",
            "--from",
            &l,
            "--model",
            "fixtures/tiny-sd21",
        ],
    ));
    assert!(e.contains("--suite beauty"), "{e}");
    let _ = mifo(&store, &["engine", "stop"]);
    let _ = std::fs::remove_dir_all(&store);
}
