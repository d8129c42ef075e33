//! `runs export`: config TOML, metrics CSV, PNG provenance chunks, textual-inversion embeddings.

mod store_support;

use std::fs;

use mifo::store::{export_run, png_text_chunks, NewRun, RunKind, RunOutcome};
use safetensors::SafeTensors;
use store_support::{embeddings_bytes, learn_spec, png_bytes, temp_store};

#[test]
fn export_writes_every_format() {
    let (dir, store) = temp_store();
    let mut spec = learn_spec(1234);
    spec.kind = RunKind::Synth;
    spec.config = serde_json::json!({
        "prompt": "a photo of <v0> and <v1> at the beach — ünïcode",
        "steps": 50,
        "guidance": 7.5,
        "negative": null,
        "boxes": [{"token": "<v0>", "xyxy": [0.1, 0.1, 0.5, 0.9]}],
    });
    let run = store.create_run(&spec, NewRun::default()).unwrap();
    store.start_run(&run.id, "h", "cpu").unwrap();
    for step in 0..3u64 {
        store
            .append_metric(&run.id, "loss/box", step, 0.5 / (step + 1) as f64)
            .unwrap();
        store
            .append_metric(&run.id, "leak/<v0>", step, 0.25)
            .unwrap();
    }
    store.append_log(&run.id, "done").unwrap();
    let png = png_bytes(5, 4);
    store.put_output(&run.id, "image0", &png).unwrap();
    store
        .put_output(
            &run.id,
            "embeddings",
            &embeddings_bytes(&["<v0>", "<v1>"], 8),
        )
        .unwrap();
    store
        .put_output(&run.id, "attn", b"raw attention bytes")
        .unwrap();
    store.finish_run(&run.id, RunOutcome::Done).unwrap();
    let out = dir.path().join("export");
    let report = export_run(&store, &run.id, &out).unwrap();
    assert_eq!(report.skipped_null_keys, ["negative"]);
    for file in &report.files {
        assert!(file.is_file(), "{}", file.display());
    }

    // config.toml parses back to the config (less the null key), with provenance in comments.
    let text = fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        text.contains(&format!("# spec hash {}", run.spec_hash)),
        "{text}"
    );
    assert!(text.contains("--seed 1234"), "{text}");
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    let mut expected = spec.config.clone();
    expected.as_object_mut().unwrap().remove("negative");
    assert_eq!(serde_json::to_value(&parsed).unwrap(), expected);

    // metrics.csv: one row per point.
    let csv = fs::read_to_string(out.join("metrics.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "series,step,value");
    assert_eq!(rows.len(), 7);
    assert!(rows.contains(&"loss/box,1,0.25"), "{csv}");
    assert!(rows.contains(&"leak/<v0>,2,0.25"), "{csv}");
    assert_eq!(fs::read_to_string(out.join("log.txt")).unwrap(), "done\n");

    // The PNG keeps its pixels and carries the provenance.
    let exported = fs::read(out.join("image0.png")).unwrap();
    let a = image::load_from_memory(&png).unwrap().to_rgb8();
    let b = image::load_from_memory(&exported).unwrap().to_rgb8();
    assert_eq!(a, b);
    let texts = png_text_chunks(&exported).unwrap();
    let parameters = &texts.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        parameters.starts_with("a photo of <v0> and <v1> at the beach — ünïcode\nSeed: 1234"),
        "{parameters}"
    );
    assert!(parameters.contains(run.id.as_str()) && parameters.contains(&run.spec_hash.to_hex()));
    let mifo: serde_json::Value =
        serde_json::from_str(&texts.iter().find(|(k, _)| k == "mifo").unwrap().1).unwrap();
    assert_eq!(mifo["run_id"], run.id.as_str());
    assert_eq!(mifo["seed"], 1234);
    assert_eq!(mifo["spec_hash"], run.spec_hash.to_hex());

    // diffusers: one key per token, same data.
    let learned = fs::read(out.join("learned_embeds.safetensors")).unwrap();
    let learned = SafeTensors::deserialize(&learned).unwrap();
    let mut names = learned.names();
    names.sort();
    assert_eq!(names, ["<v0>", "<v1>"]);
    let original = embeddings_bytes(&["<v0>", "<v1>"], 8);
    let original = SafeTensors::deserialize(&original).unwrap();
    assert_eq!(
        learned.tensor("<v1>").unwrap().data(),
        original.tensor("<v1>").unwrap().data()
    );
    let (_, meta) =
        SafeTensors::read_metadata(&fs::read(out.join("learned_embeds.safetensors")).unwrap())
            .unwrap();
    assert_eq!(
        meta.metadata().as_ref().unwrap()["mifo.run_id"],
        run.id.as_str()
    );

    // A1111: a file per token, one `emb_params` tensor of shape [vectors, dim].
    for (token, file) in [("<v0>", "v0"), ("<v1>", "v1")] {
        let bytes = fs::read(out.join("a1111").join(format!("{file}.safetensors"))).unwrap();
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(tensors.names(), ["emb_params"]);
        let emb = tensors.tensor("emb_params").unwrap();
        assert_eq!(emb.shape(), [1, 8]);
        assert_eq!(emb.data(), original.tensor(token).unwrap().data());
    }

    // Other outputs are copied as they are.
    assert_eq!(
        fs::read(out.join("attn.bin")).unwrap(),
        b"raw attention bytes"
    );
    assert_eq!(
        fs::read(out.join("embeddings.safetensors")).unwrap(),
        embeddings_bytes(&["<v0>", "<v1>"], 8)
    );
}

#[test]
fn export_refuses_a_corrupt_output_before_writing_anything() {
    let (dir, store) = temp_store();
    let run = store.create_run(&learn_spec(1), NewRun::default()).unwrap();
    store.start_run(&run.id, "h", "cpu").unwrap();
    let hash = store
        .put_output(&run.id, "image0", &png_bytes(2, 2))
        .unwrap();
    store.finish_run(&run.id, RunOutcome::Done).unwrap();
    fs::write(store.blobs().path(&hash), b"broken").unwrap();
    let out = dir.path().join("export");
    let err = export_run(&store, &run.id, &out).unwrap_err();
    assert!(err.to_string().contains(&hash.to_hex()), "{err}");
    assert!(!out.exists());
}
