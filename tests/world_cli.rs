//! `mifo world`: seeded scenes that `mifo learn` reads as they are, the oracle's scores stored
//! with a synthesis run and shown by `runs show` / `runs diff`, and the one-line refusals.

mod cli_support;

use std::path::Path;

use cli_support::{err_line, json, mifo, ok, root, scratch};

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn scenes_are_deterministic_and_describe_their_objects() {
    let dir = scratch("world-scene");
    let store = dir.join("store");
    let scene = |seed: &str, name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec!["world", "scene", "--seed", seed, "--json"];
        args.extend(extra);
        args.push(out.to_str().unwrap());
        (json(&mifo(&store, &args)), out)
    };
    let (a, a_dir) = scene("3", "a", &["--differ", "colour", "--objects", "3"]);
    let (_, b_dir) = scene("3", "b", &["--differ", "colour", "--objects", "3"]);
    let (_, c_dir) = scene("4", "c", &["--differ", "colour", "--objects", "3"]);
    let a_files = files_of(&a_dir);
    let names: Vec<&str> = a_files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "img.png",
            "mask0.png",
            "mask1.png",
            "mask2.png",
            "scene.json"
        ]
    );
    assert_eq!(a_files, files_of(&b_dir), "same seed, same bytes");
    assert_ne!(
        std::fs::read(a_dir.join("img.png")).unwrap(),
        std::fs::read(c_dir.join("img.png")).unwrap(),
        "another seed, another scene"
    );
    // --differ colour: one shape, three colours; the caption names each object.
    let objects = a["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 3);
    let shapes: std::collections::BTreeSet<&str> = objects
        .iter()
        .map(|o| o["shape"].as_str().unwrap())
        .collect();
    let colours: std::collections::BTreeSet<&str> = objects
        .iter()
        .map(|o| o["colour"].as_str().unwrap())
        .collect();
    assert_eq!((shapes.len(), colours.len()), (1, 3), "{a}");
    for o in objects {
        let phrase = format!(
            "a {} {}",
            o["colour"].as_str().unwrap(),
            o["shape"].as_str().unwrap()
        );
        assert!(a["caption"].as_str().unwrap().contains(&phrase), "{a}");
    }
    // The masks are exact: each mask's pixels are exactly the object's colour in the image.
    let img = image::open(a_dir.join("img.png")).unwrap().to_rgb8();
    for (i, o) in objects.iter().enumerate() {
        let mask = image::open(a_dir.join(format!("mask{i}.png")))
            .unwrap()
            .to_luma8();
        let want: [u8; 3] = match o["colour"].as_str().unwrap() {
            "red" => [215, 40, 40],
            "green" => [35, 160, 60],
            "blue" => [40, 70, 215],
            _ => [235, 195, 30],
        };
        let mut inside = 0;
        for (x, y, m) in mask.enumerate_pixels() {
            let p = img.get_pixel(x, y).0;
            let near = (0..3).all(|c| (p[c] as i32 - want[c] as i32).abs() <= 15);
            assert_eq!(m.0[0] == 255, near, "mask{i} at ({x},{y}): {p:?}");
            inside += usize::from(m.0[0] == 255);
        }
        assert!(inside > 100, "mask{i} has {inside} pixels");
    }
    // --differ shape: one colour, distinct shapes.
    let (s, _) = scene("9", "s", &["--differ", "shape"]);
    let objects = s["objects"].as_array().unwrap();
    assert_eq!(objects[0]["colour"], objects[1]["colour"]);
    assert_ne!(objects[0]["shape"], objects[1]["shape"]);
}

#[test]
fn bad_scene_flags_are_refused_in_one_line_and_write_nothing() {
    let dir = scratch("world-bad");
    let store = dir.join("store");
    let out = dir.join("out");
    let out_s = out.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--objects", "0"], "--objects 0"),
        (&["--objects", "5"], "--objects 5"),
        (&["--differ", "size"], "unknown attribute `size`"),
        (&["--differ", "shape", "--objects", "4"], "only 3 shapes"),
        (&["--size", "8"], "--size 8"),
    ];
    for (flags, says) in cases {
        let mut args = vec!["world", "scene"];
        args.extend(flags);
        args.push(out_s);
        let line = err_line(&mifo(&store, &args));
        assert!(line.contains(says), "{flags:?}: {line}");
        assert!(!out.exists(), "{flags:?} wrote {}", out.display());
    }
}

fn learn_args<'a>(scene: &'a str, seed: &'a str) -> Vec<&'a str> {
    vec![
        "learn",
        "--scene",
        scene,
        "--model",
        "fixtures/tiny-sd21",
        "--seed",
        seed,
        "--json",
        "--set",
        "learn.reward_steps=2",
        "--set",
        "learn.penalty_steps=2",
        "--set",
        "learn.dreambooth=none",
        "--set",
        "learn.preview=false",
    ]
}

fn synth(store: &Path, from: &str, boxes: &[String], seed: &str) -> serde_json::Value {
    synth_with(store, Some(from), "a photo of <v0> and <v1>", boxes, seed)
}

/// Two samples of `prompt` on the tiny model, from learning run `from` or the plain model.
fn synth_with(
    store: &Path,
    from: Option<&str>,
    prompt: &str,
    boxes: &[String],
    seed: &str,
) -> serde_json::Value {
    let mut args = vec![
        "synth",
        "--model",
        "fixtures/tiny-sd21",
        "--prompt",
        prompt,
        "--seed",
        seed,
        "--samples",
        "2",
        "--json",
        "--set",
        "synth.steps=4",
        "--set",
        "synth.guided_steps=1",
    ];
    if let Some(from) = from {
        args.extend(["--from", from]);
    }
    for b in boxes {
        args.extend(["--box", b.as_str()]);
    }
    json(&mifo(store, &args))
}

#[test]
fn world_scenes_are_learned_and_their_synthesis_scored_and_stored() {
    let dir = scratch("world-score");
    let store = dir.join("store");
    let scene_dir = dir.join("scene");
    let scene = json(&mifo(
        &store,
        &[
            "world",
            "scene",
            "--seed",
            "2",
            "--differ",
            "colour",
            "--json",
            scene_dir.to_str().unwrap(),
        ],
    ));
    let learn = json(&mifo(&store, &learn_args(scene_dir.to_str().unwrap(), "1")));
    assert_eq!(learn["status"], "done");
    let learn_id = learn["id"].as_str().unwrap().to_string();
    let shown = json(&mifo(&store, &["runs", "show", &learn_id, "--json"]));
    assert!(
        shown["inputs"]["world"].is_string(),
        "scene.json kept with the run: {}",
        shown["inputs"]
    );
    // Swapped boxes: <v0> where <v1> stood and the other way round.
    let rect = |i: usize| {
        let b = scene["objects"][i]["box_fractions"].as_array().unwrap();
        let v: Vec<String> = b
            .iter()
            .map(|x| format!("{:.4}", x.as_f64().unwrap()))
            .collect();
        v.join(",")
    };
    let boxes = vec![format!("<v0>={}", rect(1)), format!("<v1>={}", rect(0))];
    let a = synth(&store, &learn_id, &boxes, "3");
    let b = synth(&store, &learn_id, &boxes, "4");
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());

    let scored = json(&mifo(&store, &["world", "score", a_id, b_id, "--json"]));
    let runs = scored["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        assert_eq!(r["samples"].as_array().unwrap().len(), 2);
        for name in [
            "oracle/present/<v0>",
            "oracle/identity/<v1>",
            "oracle/leak/<v0>",
            "oracle/outside/<v1>",
            "oracle/elsewhere/<v0>",
            "oracle/identity",
            "oracle/leak",
        ] {
            let v = r["metrics"][name].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&v), "{name} = {v}: {}", r["metrics"]);
        }
    }
    // Stored with the run: runs show (JSON and text) and runs diff carry them.
    let shown = json(&mifo(&store, &["runs", "show", a_id, "--json"]));
    assert_eq!(
        shown["oracle"]["oracle/leak/<v0>"],
        runs[0]["metrics"]["oracle/leak/<v0>"]
    );
    assert!(shown["metrics"]["oracle/identity"].is_array());
    let text = ok(&mifo(&store, &["runs", "show", a_id]));
    assert!(text.contains("oracle     present"), "{text}");
    assert!(text.contains("<v1>"), "{text}");
    let diff = ok(&mifo(&store, &["runs", "diff", a_id, b_id]));
    assert!(diff.contains("oracle/leak/<v0>"), "{diff}");
    // A second scoring replaces the scores (one point each), it does not append.
    json(&mifo(&store, &["world", "score", a_id, "--json"]));
    let shown = json(&mifo(&store, &["runs", "show", a_id, "--json"]));
    assert_eq!(shown["metrics"]["oracle/leak"].as_array().unwrap().len(), 1);

    // Refusals leave the store as it was.
    let before = json(&mifo(&store, &["runs", "show", &learn_id, "--json"]));
    let line = err_line(&mifo(&store, &["world", "score", &learn_id]));
    assert!(line.contains("is a learn run"), "{line}");
    let coins = json(&mifo(
        &store,
        &learn_args(root().join("fixtures/scenes/coins").to_str().unwrap(), "1"),
    ));
    let plain = synth(
        &store,
        coins["id"].as_str().unwrap(),
        &[
            "<v0>=0,0,0.5,0.5".to_string(),
            "<v1>=0.5,0.5,1,1".to_string(),
        ],
        "3",
    );
    let plain_id = plain["id"].as_str().unwrap();
    let line = err_line(&mifo(&store, &["world", "score", plain_id]));
    assert!(line.contains("not learned from a world scene"), "{line}");
    let line = err_line(&mifo(&store, &["world", "score", "zzzz"]));
    assert!(line.contains("zzzz"), "{line}");
    let after = json(&mifo(&store, &["runs", "show", &learn_id, "--json"]));
    assert_eq!(before["metrics"], after["metrics"]);
    let plain_after = json(&mifo(&store, &["runs", "show", plain_id, "--json"]));
    assert!(plain_after["oracle"].as_object().unwrap().is_empty());
    assert_eq!(plain_after["log"], plain["log"]);
}

/// A run of the plain model whose boxes name world objects (`red circle`) is scored against
/// those objects (the bench's `words` row); boxes that name anything else are refused.
#[test]
fn plain_model_runs_are_scored_by_the_objects_their_boxes_name() {
    let dir = scratch("world-words");
    let store = dir.join("store");
    let plain = |prompt: &str, boxes: &[&str]| {
        let boxes: Vec<String> = boxes.iter().map(|b| b.to_string()).collect();
        synth_with(&store, None, prompt, &boxes, "1")["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let words = plain(
        "a photo of a red circle and a green square",
        &["red circle=0,0,0.5,0.5", "green square=0.5,0.5,1,1"],
    );
    let scored = json(&mifo(&store, &["world", "score", &words, "--json"]));
    let run = &scored["runs"][0];
    assert!(run["learned"].is_null(), "{run}");
    assert_eq!(run["samples"].as_array().unwrap().len(), 2);
    for name in [
        "oracle/identity/red circle",
        "oracle/leak/green square",
        "oracle/outside",
    ] {
        let v = run["metrics"][name].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&v), "{name} = {v}: {}", run["metrics"]);
    }
    let text = ok(&mifo(&store, &["world", "score", &words]));
    assert!(text.contains("the plain model (world words)"), "{text}");
    assert!(text.contains("green square"), "{text}");

    let other = plain("a photo of a dog", &["dog=0,0,0.5,0.5"]);
    let line = err_line(&mifo(&store, &["world", "score", &other]));
    assert!(line.contains("do not all name world objects"), "{line}");
    let shown = json(&mifo(&store, &["runs", "show", &other, "--json"]));
    assert!(shown["oracle"].as_object().unwrap().is_empty());
}
