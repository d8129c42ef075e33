//! `mifo synth` end to end through the engine and the store: from a stored learning run, on a
//! plain model, and the one-line refusals.

mod cli_support;

use std::path::PathBuf;
use std::process::Output;

use cli_support::{copy_dir, json, mifo, root};

fn err_line(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err.trim().lines().last().unwrap_or("").to_string()
}

const BOXES: [&str; 4] = [
    "--box",
    "<v0>=0.0,0.5,0.5,1.0",
    "--box",
    "<v1>=0.5,0.5,1.0,1.0",
];

#[test]
fn synthesis_from_a_stored_learning_run() {
    let store = std::env::temp_dir().join(format!("mifo-synth-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let learn = json(&mifo(
        &store,
        &[
            "learn",
            "--scene",
            "fixtures/scenes/coins",
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
            "learn.dreambooth=lora",
            "--set",
            "learn.dreambooth_steps=2",
            "--set",
            "learn.preview=false",
        ],
    ));
    let from = learn["id"].as_str().unwrap().to_string();
    let mut args = vec![
        "synth",
        "--from",
        &from[..10],
        "--model",
        "fixtures/tiny-sd21",
        "--prompt",
        "a photo of <v0> and <v1> on the beach",
        "--seed",
        "3",
        "--samples",
        "2",
        "--json",
        "--set",
        "synth.steps=8",
        "--set",
        "synth.guided_steps=3",
        "--set",
        "synth.refine_every=2",
    ];
    args.extend(BOXES);
    let run = json(&mifo(&store, &args));
    assert_eq!(run["kind"], "synth");
    assert_eq!(run["status"], "done");
    assert_eq!(run["parent"], learn["id"]);
    for name in [
        "sample_0.png",
        "sample_1.png",
        "boxes_0.png",
        "masks_1.png",
        "attn/<v0>_0.png",
        "attn/<v1>_1.png",
    ] {
        assert!(
            run["outputs"][name].is_string(),
            "missing {name}: {}",
            run["outputs"]
        );
    }
    for metric in ["loss/box", "alpha", "gd_iters", "leak/<v0>", "leak/<v1>"] {
        assert!(run["metrics"][metric].is_array(), "missing metric {metric}");
    }
    // Same spec again → refused; with --rerun → identical pixels.
    let again = mifo(&store, &args);
    assert!(err_line(&again).contains("--rerun"));
    args.push("--rerun");
    let rerun = json(&mifo(&store, &args));
    assert_eq!(
        rerun["outputs"]["sample_0.png"],
        run["outputs"]["sample_0.png"]
    );
    assert_eq!(rerun["rerun_identical"], true);

    // Without --model, --from finds the folder the run learned on: the same spec, so the same
    // pixels again.
    let mut no_model = args.clone();
    let pos = no_model.iter().position(|a| *a == "--model").unwrap();
    no_model.drain(pos..pos + 2);
    let found = json(&mifo(&store, &no_model));
    assert_eq!(found["rerun_identical"], true, "{found}");
    assert_eq!(
        found["outputs"]["sample_0.png"],
        run["outputs"]["sample_0.png"]
    );
    let shown = json(&mifo(&store, &["runs", "show", &from, "--json"]));
    assert_eq!(
        shown["model_dir"].as_str().map(PathBuf::from),
        Some(root().join("fixtures/tiny-sd21").canonicalize().unwrap())
    );
    // Once the folder last used with that model is gone, it asks for --model.
    let copy = store.join("model-copy");
    copy_dir(&root().join("fixtures/tiny-sd21"), &copy);
    let mut elsewhere = args.clone();
    elsewhere[pos + 1] = copy.to_str().unwrap();
    elsewhere.retain(|a| *a != "--rerun");
    let seed = elsewhere.iter().position(|a| *a == "--seed").unwrap();
    elsewhere[seed + 1] = "4";
    json(&mifo(&store, &elsewhere));
    std::fs::remove_dir_all(&copy).unwrap();
    let lost = err_line(&mifo(&store, &no_model));
    assert!(lost.contains("pass --model DIR"), "{lost}");

    // The stored sample carries its provenance in a PNG text chunk.
    let out = mifo(
        &store,
        &[
            "runs",
            "export",
            &run["id"].as_str().unwrap()[..10],
            store.join("export").to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(store.join("export/sample_0.png")).unwrap();
    let text = String::from_utf8_lossy(&png);
    assert!(text.contains("a photo of <v0> and <v1> on the beach"));

    // --from a synthesis run, or an unknown one, is refused.
    let mut bad = args.clone();
    let pos = bad.iter().position(|a| *a == "--from").unwrap();
    let synth_id = run["id"].as_str().unwrap().to_string();
    bad[pos + 1] = &synth_id;
    assert!(err_line(&mifo(&store, &bad)).contains("finished learning run"));
    bad[pos + 1] = "zzzz";
    assert!(err_line(&mifo(&store, &bad)).contains("zzzz"));
    // A box for a token the prompt lacks.
    let out = mifo(
        &store,
        &[
            "synth",
            "--from",
            &from,
            "--model",
            "fixtures/tiny-sd21",
            "--prompt",
            "a photo of <v0>",
            "--box",
            "<v1>=0,0,0.5,0.5",
        ],
    );
    assert!(err_line(&out).contains("<v1>"));
    // A box outside [0, 1].
    let out = mifo(
        &store,
        &[
            "synth",
            "--from",
            &from,
            "--model",
            "fixtures/tiny-sd21",
            "--prompt",
            "a photo of <v0>",
            "--box",
            "<v0>=0,0,1.5,0.5",
        ],
    );
    assert!(err_line(&out).contains("1.5") || err_line(&out).contains("[0, 1]"));
    let _ = std::fs::remove_dir_all(store);
}

#[test]
fn plain_model_with_words_as_subjects() {
    let store = std::env::temp_dir().join(format!("mifo-synth-plain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let run = json(&mifo(
        &store,
        &[
            "synth",
            "--model",
            "fixtures/tiny-sd21",
            "--prompt",
            "a dog and a cat in a park",
            "--box",
            "dog=0,0.4,0.5,1",
            "--box",
            "cat=0.5,0.4,1,1",
            "--seed",
            "1",
            "--json",
            "--set",
            "synth.steps=6",
            "--set",
            "synth.guided_steps=2",
        ],
    ));
    assert_eq!(run["status"], "done");
    assert!(run["parent"].is_null());
    assert!(
        run["outputs"]["attn/dog_0.png"].is_string(),
        "{}",
        run["outputs"]
    );
    let _ = std::fs::remove_dir_all(store);
}
