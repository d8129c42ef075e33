//! `mifo runs …` commands end to end on temp-folder stores: arguments parsed by clap, output
//! captured, errors checked to leave the store unchanged.

mod store_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use mifo::cli::runs::{run_with, Console, RunsCommand};
use mifo::store::{NewRun, RunId, RunKind, RunOutcome, Store};
use serde_json::Value;
use store_support::{finished_run, learn_spec, png_bytes, store_state, temp_store};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: RunsCommand,
}

/// Parses `args` as `mifo runs …` and runs them; returns (result, stdout).
fn runs_cmd(store: &Path, args: &[&str]) -> (anyhow::Result<()>, String) {
    runs_cmd_confirming(store, args, None)
}

fn runs_cmd_confirming(
    store: &Path,
    args: &[&str],
    answer: Option<bool>,
) -> (anyhow::Result<()>, String) {
    let cli = Cli::try_parse_from(std::iter::once("runs").chain(args.iter().copied()))
        .expect("arguments parse");
    let mut out = Vec::new();
    let mut asked = |_: &str| Ok(answer.unwrap_or(false));
    let mut console = Console {
        out: &mut out,
        confirm: if answer.is_some() {
            Some(&mut asked)
        } else {
            None
        },
    };
    let result = run_with(cli.cmd, store, &mut console);
    (result, String::from_utf8(out).expect("utf-8 output"))
}

/// A store with: a learn run (done, PNG + embeddings outputs, tag `best`), a synth run made from it
/// (done), a failed learn run, and a running one left by a dead process.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    learn: RunId,
    synth: RunId,
    failed: RunId,
    stale: RunId,
}

fn fixture() -> Fixture {
    let (dir, store) = temp_store();
    let root = store.root().to_path_buf();
    let png = png_bytes(4, 3);
    let learn = finished_run(
        &store,
        &learn_spec(1),
        &[("image0", &png), ("embeddings", b"not safetensors")],
        None,
    )
    .id;
    store.add_tag(&learn, "best").unwrap();
    let mut synth_spec = learn_spec(2);
    synth_spec.kind = RunKind::Synth;
    synth_spec.parent = Some(learn.clone());
    synth_spec.config = serde_json::json!({"prompt": "a photo of <v0>", "steps": 50});
    let synth = finished_run(&store, &synth_spec, &[("image0", &png)], None).id;
    let failed = store
        .create_run(&learn_spec(3), NewRun::default())
        .unwrap()
        .id;
    store.start_run(&failed, "h", "cpu").unwrap();
    store
        .finish_run(&failed, RunOutcome::Failed("boom".into()))
        .unwrap();
    let stale = store
        .create_run(&learn_spec(4), NewRun::default())
        .unwrap()
        .id;
    store.start_run(&stale, "h", "cpu").unwrap();
    store.append_metric(&stale, "loss/total", 0, 0.75).unwrap();
    store.flush_metrics(&stale).unwrap();
    drop(store);
    Fixture {
        _dir: dir,
        root,
        learn,
        synth,
        failed,
        stale,
    }
}

// === ls ===

#[test]
fn ls_lists_newest_first_with_loss_and_filters() {
    let f = fixture();
    let (result, out) = runs_cmd(&f.root, &["ls"]);
    result.unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID"), "{out}");
    assert_eq!(lines.len(), 5, "{out}");
    let order: Vec<&str> = [&f.stale, &f.failed, &f.synth, &f.learn]
        .iter()
        .map(|id| &id.as_str()[..8])
        .collect();
    for (line, prefix) in lines[1..].iter().zip(order) {
        assert!(
            line.starts_with(prefix),
            "{line} should start with {prefix}"
        );
    }
    let learn_line = lines[4];
    assert!(
        learn_line.contains("learn")
            && learn_line.contains("done")
            && learn_line.contains("two-cats"),
        "{learn_line}"
    );
    assert!(
        learn_line.contains("0.1000"),
        "final loss 1/10: {learn_line}"
    );
    assert!(
        learn_line.contains("learn.lr=0.0005") && learn_line.contains("[best]"),
        "{learn_line}"
    );
    assert!(
        lines[3].contains(&format!("^{}", &f.learn.as_str()[..8])),
        "synth shows its parent: {}",
        lines[3]
    );
    assert!(
        lines[1].contains("running") && lines[1].contains("0.7500"),
        "a live run's loss comes from its series: {}",
        lines[1]
    );

    let (_, out) = runs_cmd(&f.root, &["ls", "--kind", "synth"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    let (_, out) = runs_cmd(&f.root, &["ls", "--status", "failed"]);
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .starts_with(&f.failed.as_str()[..8]),
        "{out}"
    );
    let (_, out) = runs_cmd(&f.root, &["ls", "--tag", "best"]);
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[test]
fn ls_json_is_one_document() {
    let f = fixture();
    let (result, out) = runs_cmd(&f.root, &["ls", "--json", "--kind", "learn"]);
    result.unwrap();
    let doc: Value = serde_json::from_str(&out).expect("one JSON document");
    let runs = doc.as_array().unwrap();
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[2]["id"], f.learn.as_str());
    assert_eq!(runs[2]["final_loss"], 0.1);
    assert_eq!(runs[2]["tags"][0], "best");
    assert_eq!(runs[2]["config_deltas"]["learn.lr"], "0.0005");
    assert_eq!(runs[1]["status"], "failed");
}

// === show ===

#[test]
fn show_json_has_the_contract_fields() {
    let f = fixture();
    let prefix = &f.learn.as_str()[..12];
    let (result, out) = runs_cmd(&f.root, &["show", prefix, "--json"]);
    result.unwrap();
    let doc: Value = serde_json::from_str(&out).expect("one JSON document");
    for key in [
        "id",
        "kind",
        "status",
        "spec_hash",
        "config",
        "seed",
        "inputs",
        "parent",
        "metrics",
        "outputs",
        "error",
        "created_at",
        "started_at",
        "finished_at",
        "duration_s",
    ] {
        assert!(doc.get(key).is_some(), "missing {key}");
    }
    assert_eq!(doc["id"], f.learn.as_str());
    assert_eq!(doc["kind"], "learn");
    assert_eq!(doc["status"], "done");
    assert_eq!(doc["seed"], 1);
    assert_eq!(doc["config"]["learn"]["steps"], 400);
    assert_eq!(doc["parent"], Value::Null);
    let loss = doc["metrics"]["loss/total"].as_array().unwrap();
    assert_eq!(loss.len(), 10);
    assert_eq!(loss[1], serde_json::json!([1, 0.5]));
    assert_eq!(doc["outputs"]["image0"].as_str().unwrap().len(), 64);
    assert_eq!(doc["tags"][0], "best");

    let (_, out) = runs_cmd(&f.root, &["show", f.synth.as_str(), "--json"]);
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["parent"], f.learn.as_str());
    let (_, out) = runs_cmd(&f.root, &["show", f.failed.as_str(), "--json"]);
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["error"], "boom");
}

#[test]
fn show_text_lists_config_metrics_and_outputs() {
    let f = fixture();
    let (result, out) = runs_cmd(&f.root, &["show", f.learn.as_str()]);
    result.unwrap();
    assert!(
        out.contains(&format!("run        {}  (learn done)", f.learn)),
        "{out}"
    );
    assert!(out.contains("learn.lr = 0.0005"), "{out}");
    assert!(out.contains("loss/total"), "{out}");
    assert!(out.contains("image0"), "{out}");
    assert!(out.contains("tags       best"), "{out}");
}

#[test]
fn show_image_errors_name_the_output() {
    let f = fixture();
    let (result, _) = runs_cmd(&f.root, &["show", f.learn.as_str(), "--image", "nope"]);
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("no output named 'nope'") && err.contains("image0"),
        "{err}"
    );
    let (result, _) = runs_cmd(
        &f.root,
        &["show", f.learn.as_str(), "--image", "embeddings"],
    );
    assert!(result.unwrap_err().to_string().contains("not a PNG"));
}

/// Child mode of `show_image_prints_the_png_in_the_terminal`: prints an image to real stdout.
#[test]
#[ignore = "child process of show_image_prints_the_png_in_the_terminal"]
fn show_image_child() {
    let (Ok(root), Ok(run)) = (
        std::env::var("MIFO_TEST_STORE"),
        std::env::var("MIFO_TEST_RUN"),
    ) else {
        panic!(
            "MIFO_TEST_STORE/MIFO_TEST_RUN unset: this helper is the parent test's child process, not a test"
        );
    };
    let cmd = RunsCommand::Show {
        run,
        json: false,
        image: Some("image0".into()),
    };
    mifo::cli::runs::run(cmd, Path::new(&root)).expect("show --image");
}

#[test]
fn show_image_prints_the_png_in_the_terminal() {
    let f = fixture();
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "show_image_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MIFO_TEST_STORE", &f.root)
        .env("MIFO_TEST_RUN", f.learn.as_str())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // viuer draws with ANSI colour escapes (half blocks) when the terminal has no image protocol.
    assert!(stdout.matches("\u{1b}[").count() >= 6, "{stdout:?}");
}

// === diff ===

#[test]
fn diff_shows_only_what_differs_unless_all() {
    let f = fixture();
    let (result, out) = runs_cmd(&f.root, &["diff", f.learn.as_str(), f.failed.as_str()]);
    result.unwrap();
    assert!(out.contains("seed") && out.contains("1  |  3"), "{out}");
    assert!(out.contains("config: identical"), "{out}");
    assert!(!out.contains("preset"), "{out}");
    assert!(out.contains("image0") && out.contains("only in A"), "{out}");
    let (_, all) = runs_cmd(
        &f.root,
        &["diff", f.learn.as_str(), f.failed.as_str(), "--all"],
    );
    assert!(
        all.contains("preset") && all.contains("model_fingerprint"),
        "{all}"
    );
    let (result, out) = runs_cmd(
        &f.root,
        &["diff", f.learn.as_str(), f.synth.as_str(), "--json"],
    );
    result.unwrap();
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["a"], f.learn.as_str());
    assert!(doc["config"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["key"] == "prompt" && d["a"].is_null()));
    let image = doc["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "image0")
        .unwrap()
        .clone();
    assert_eq!(image["identical"], true, "same PNG bytes in both runs");
}

// === rm ===

#[test]
fn rm_asks_refuses_without_a_terminal_and_removes_with_yes() {
    let f = fixture();
    let before = store_state(&f.root);
    let (result, _) = runs_cmd(&f.root, &["rm", f.synth.as_str()]);
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("--yes") && err.contains(f.synth.as_str()),
        "{err}"
    );
    assert_eq!(store_state(&f.root), before, "refusal changes nothing");

    let (result, out) = runs_cmd_confirming(&f.root, &["rm", f.synth.as_str()], Some(false));
    result.unwrap();
    assert!(out.contains("kept"), "{out}");
    assert_eq!(store_state(&f.root), before);

    let (result, _) = runs_cmd(&f.root, &["rm", f.learn.as_str(), "--yes"]);
    assert!(
        result
            .unwrap_err()
            .to_string()
            .contains("remove them first"),
        "the synth run was made from it"
    );
    assert_eq!(store_state(&f.root), before);

    let (result, out) = runs_cmd_confirming(&f.root, &["rm", f.synth.as_str()], Some(true));
    result.unwrap();
    assert!(out.contains(&format!("removed run {}", f.synth)), "{out}");
    assert!(
        out.contains("1 kept"),
        "the PNG is shared with the learn run: {out}"
    );
    let (result, out) = runs_cmd(&f.root, &["rm", f.learn.as_str(), "-y"]);
    result.unwrap();
    assert!(out.contains("2 blobs"), "{out}");
    let store = Store::open(&f.root).unwrap();
    assert_eq!(store.run_count(), 2);
    assert!(store.check().unwrap().is_clean());
}

// === tag, gc, check ===

#[test]
fn tag_adds_and_removes() {
    let f = fixture();
    let (result, out) = runs_cmd(&f.root, &["tag", f.failed.as_str(), "oom", "retry"]);
    result.unwrap();
    assert!(out.contains("oom, retry"), "{out}");
    let (_, out) = runs_cmd(&f.root, &["tag", f.failed.as_str(), "oom", "--remove"]);
    assert!(out.trim_end().ends_with("tags: retry"), "{out}");
}

#[test]
fn gc_prints_what_it_freed() {
    let f = fixture();
    {
        let store = Store::open(&f.root).unwrap();
        store.put_blob(&[7u8; 2048]).unwrap();
    }
    let (result, out) = runs_cmd(&f.root, &["gc"]);
    result.unwrap();
    assert!(
        out.starts_with("gc freed 2.0 KiB: 1 unreferenced blobs"),
        "{out}"
    );
    let (_, out) = runs_cmd(&f.root, &["gc"]);
    assert!(
        out.starts_with("gc freed 0 B: 0 unreferenced blobs"),
        "{out}"
    );
}

#[test]
fn check_passes_a_good_store_and_fails_naming_problems() {
    let f = fixture();
    let (result, out) = runs_cmd(&f.root, &["check"]);
    result.unwrap();
    assert!(out.contains("0 problems"), "{out}");
    assert!(
        out.contains(&format!("note: run {} is marked running", f.stale)),
        "{out}"
    );
    let (result, out) = runs_cmd(&f.root, &["check", "--json"]);
    result.unwrap();
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["runs_checked"], 4);

    let png_hash = {
        let store = Store::open(&f.root).unwrap();
        let hash = store.get_run(&f.learn).unwrap().outputs["image0"];
        std::fs::write(store.blobs().path(&hash), b"not the png").unwrap();
        hash
    };
    let (result, out) = runs_cmd(&f.root, &["check"]);
    let err = result.unwrap_err().to_string();
    assert!(err.contains("1 problems"), "{err}");
    assert!(out.contains(&format!("problem: blob {png_hash}")), "{out}");
}

// === export ===

#[test]
fn export_writes_the_files_it_lists() {
    let f = fixture();
    let out_dir = f.root.parent().unwrap().join("export");
    let (result, out) = runs_cmd(
        &f.root,
        &["export", f.synth.as_str(), out_dir.to_str().unwrap()],
    );
    result.unwrap();
    for name in [
        "config.toml",
        "spec.json",
        "record.json",
        "metrics.csv",
        "image0.png",
    ] {
        assert!(out_dir.join(name).is_file(), "{name} missing");
        assert!(out.contains(name), "{out}");
    }
    let (result, _) = runs_cmd(
        &f.root,
        &["export", f.synth.as_str(), out_dir.to_str().unwrap()],
    );
    assert!(result.unwrap_err().to_string().contains("not empty"));
}

// === errors ===

#[test]
fn bad_prefixes_and_missing_stores_are_one_line_errors_that_change_nothing() {
    let f = fixture();
    let before = store_state(&f.root);
    let (result, out) = runs_cmd(&f.root, &["show", "zzzzzz"]);
    let err = result.unwrap_err().to_string();
    assert_eq!(err, "no run matches 'zzzzzz'");
    assert!(out.is_empty());
    let common: String = f.learn.as_str().chars().take(4).collect();
    let (result, _) = runs_cmd(&f.root, &["rm", &common, "--yes"]);
    let err = result.unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("run prefix '{common}' is ambiguous: it matches ")),
        "{err}"
    );
    assert!(!err.contains('\n'));
    let (result, _) = runs_cmd(&f.root, &["diff", f.learn.as_str(), "o0"]);
    assert!(result
        .unwrap_err()
        .to_string()
        .contains("'o0' is not a run id"));
    assert_eq!(store_state(&f.root), before);

    let missing = f.root.parent().unwrap().join("no-store");
    for args in [vec!["ls"], vec!["gc"], vec!["check"], vec!["show", "abc"]] {
        let (result, _) = runs_cmd(&missing, &args);
        let err = result.unwrap_err().to_string();
        assert!(
            err.starts_with("no run store at") && err.contains("no-store"),
            "{err}"
        );
    }
    assert!(!missing.exists(), "read commands never create a store");
}

#[test]
fn clap_definitions_are_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
    assert!(Cli::try_parse_from(["runs", "show", "abc", "--json", "--image", "x"]).is_err());
    assert!(Cli::try_parse_from(["runs", "ls", "--status", "bogus"]).is_err());
    assert!(
        Cli::try_parse_from(["runs", "tag", "abc"]).is_err(),
        "tag needs at least one tag"
    );
}

// === through the engine ===

/// `mifo --model runs runs ls` reaches the engine as a typed request: a global flag whose value
/// is `runs` (here a model folder of that name) is no longer taken for the subcommand (the client
/// used to forward everything after the first word `runs`, and the engine refused `runs ls`).
#[test]
fn a_model_folder_named_runs_does_not_confuse_the_client() {
    let f = fixture();
    let cwd = f.root.parent().unwrap();
    assert!(cwd.join("runs").is_dir());
    let mifo = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mifo"))
            .current_dir(cwd)
            .env("MIFO_ENGINE_IDLE", "3")
            .env_remove("MIFO_MODEL")
            .arg("--store")
            .arg(&f.root)
            .args(args)
            .output()
            .unwrap()
    };
    let out = mifo(&["--model", "runs", "runs", "ls", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = mifo(&["engine", "stop", "--force"]);
    assert!(out.status.success(), "{stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = doc
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [&f.stale, &f.failed, &f.synth, &f.learn].map(|id| id.as_str())
    );
}
