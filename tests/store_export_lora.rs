//! `runs export` of learned LoRA adapters (diffusers / PEFT and kohya layouts) and of fully
//! fine-tuned weights.

mod store_support;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mifo::learn::safetensors_bytes;
use mifo::store::{export_run, ExportReport, RunId, Store};
use safetensors::SafeTensors;
use store_support::{finished_run, learn_spec, temp_store};

const RANK: usize = 4;

const UNET_Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
const UNET_K: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
const UNET_OUT: &str = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0";
const TE_Q: &str = "text_model.encoder.layers.0.self_attn.q_proj";

/// A tensor of `shape` with distinct, non-round values (so a swapped or reordered factor shows).
fn tensor(shape: &[usize], salt: f32, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| ((i as f32 + salt) * 0.618).sin() / (1.0 + salt))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A `lora` output as `learn` writes it: `(prefixed module, in, out)` adapters of rank `rank`,
/// metadata `mifo = {"format":"mifo-lora-1","rank":"<rank>"}`.
fn lora_bytes(modules: &[(&str, usize, usize)], rank: usize, dtype: DType) -> Vec<u8> {
    let mut tensors = HashMap::new();
    for (i, (module, in_dim, out_dim)) in modules.iter().enumerate() {
        let salt = i as f32 * 10.0;
        tensors.insert(
            format!("{module}.lora_A.weight"),
            tensor(&[rank, *in_dim], salt + 1.0, dtype),
        );
        tensors.insert(
            format!("{module}.lora_B.weight"),
            tensor(&[*out_dim, rank], salt + 2.0, dtype),
        );
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "mifo-lora-1".to_string());
    meta.insert("rank".to_string(), rank.to_string());
    safetensors_bytes(&tensors, meta).unwrap()
}

/// An SD 2.x style adapter set: cross-attention width 1024.
fn sd2_lora() -> Vec<u8> {
    lora_bytes(
        &[
            (&format!("unet.{UNET_Q}"), 320, 320),
            (&format!("unet.{UNET_K}"), 1024, 320),
            (&format!("unet.{UNET_OUT}"), 640, 640),
            (&format!("text_encoder.{TE_Q}"), 1024, 1024),
        ],
        RANK,
        DType::F32,
    )
}

/// A finished learning run with outputs `outputs`.
fn run_with(store: &Store, seed: u64, outputs: &[(&str, &[u8])]) -> RunId {
    finished_run(store, &learn_spec(seed), outputs, None).id
}

fn metadata(bytes: &[u8]) -> HashMap<String, String> {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

fn sorted_names(tensors: &SafeTensors<'_>) -> Vec<String> {
    let mut names: Vec<String> = tensors.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
}

fn export(store: &Store, id: &RunId, out: &Path) -> ExportReport {
    let report = export_run(store, id, out).unwrap();
    for file in &report.files {
        assert!(file.is_file(), "{}", file.display());
    }
    report
}

#[test]
fn lora_exports_in_diffusers_and_kohya_layouts() {
    let (dir, store) = temp_store();
    let original = sd2_lora();
    let id = run_with(&store, 7, &[("lora", &original)]);
    let out = dir.path().join("export");
    let report = export(&store, &id, &out);
    for file in [
        "lora.safetensors",
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
    ] {
        assert!(
            report.files.contains(&out.join(file)),
            "{file} not in {:?}",
            report.files
        );
    }
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.starts_with("pytorch_lora_weights.safetensors") && n.contains("rank 4")),
        "{:?}",
        report.notes
    );
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.starts_with("lora_kohya.safetensors") && n.contains("sd_v2")),
        "{:?}",
        report.notes
    );
    // The stored file is copied as it is.
    assert_eq!(fs::read(out.join("lora.safetensors")).unwrap(), original);
    let source = SafeTensors::deserialize(&original).unwrap();

    // diffusers / PEFT: the stored keys, bit for bit, metadata `format = pt`.
    let diffusers_bytes = fs::read(out.join("pytorch_lora_weights.safetensors")).unwrap();
    let diffusers = SafeTensors::deserialize(&diffusers_bytes).unwrap();
    assert_eq!(sorted_names(&diffusers), sorted_names(&source));
    for name in source.names() {
        let (a, b) = (
            source.tensor(name).unwrap(),
            diffusers.tensor(name).unwrap(),
        );
        assert_eq!(a.shape(), b.shape(), "{name}");
        assert_eq!(a.dtype(), b.dtype(), "{name}");
        assert_eq!(a.data(), b.data(), "{name}");
    }
    let meta = metadata(&diffusers_bytes);
    assert_eq!(meta["format"], "pt");
    assert_eq!(meta["mifo.run_id"], id.as_str());
    assert!(!meta.contains_key("mifo"), "{meta:?}");

    // kohya: lora_unet_…/lora_te_… with lora_down = A, lora_up = B, alpha = rank.
    let kohya_bytes = fs::read(out.join("lora_kohya.safetensors")).unwrap();
    let kohya = SafeTensors::deserialize(&kohya_bytes).unwrap();
    let modules = [
        (
            format!("unet.{UNET_Q}"),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            [RANK, 320],
            [320, RANK],
        ),
        (
            format!("unet.{UNET_K}"),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
            [RANK, 1024],
            [320, RANK],
        ),
        (
            format!("unet.{UNET_OUT}"),
            "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0",
            [RANK, 640],
            [640, RANK],
        ),
        (
            format!("text_encoder.{TE_Q}"),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            [RANK, 1024],
            [1024, RANK],
        ),
    ];
    let mut expected_names: Vec<String> = modules
        .iter()
        .flat_map(|(_, k, _, _)| {
            [
                format!("{k}.lora_down.weight"),
                format!("{k}.lora_up.weight"),
                format!("{k}.alpha"),
            ]
        })
        .collect();
    expected_names.sort();
    assert_eq!(sorted_names(&kohya), expected_names);
    for (peft, k, a_shape, b_shape) in &modules {
        let down = kohya.tensor(&format!("{k}.lora_down.weight")).unwrap();
        let up = kohya.tensor(&format!("{k}.lora_up.weight")).unwrap();
        let a = source.tensor(&format!("{peft}.lora_A.weight")).unwrap();
        let b = source.tensor(&format!("{peft}.lora_B.weight")).unwrap();
        assert_eq!(down.shape(), a_shape, "{k}");
        assert_eq!(up.shape(), b_shape, "{k}");
        assert_eq!(down.data(), a.data(), "{k}: lora_down != lora_A");
        assert_eq!(up.data(), b.data(), "{k}: lora_up != lora_B");
        let alpha = kohya.tensor(&format!("{k}.alpha")).unwrap();
        assert_eq!(alpha.dtype(), safetensors::Dtype::F32);
        assert!(alpha.shape().is_empty(), "{:?}", alpha.shape());
        assert_eq!(alpha.data(), (RANK as f32).to_le_bytes());
    }
    let meta = metadata(&kohya_bytes);
    assert_eq!(meta["ss_network_module"], "networks.lora");
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_network_alpha"], "4");
    assert_eq!(meta["ss_training_comment"], format!("mifo run {id}"));
    assert_eq!(meta["ss_base_model_version"], "sd_v2");
    assert_eq!(meta["ss_v2"], "True");
    assert_eq!(meta["mifo.spec_hash"].len(), 64);

    // candle loads both files; the 0-dim alpha reads back as the rank.
    let loaded =
        candle_core::safetensors::load(out.join("lora_kohya.safetensors"), &Device::Cpu).unwrap();
    let alpha = &loaded["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"];
    assert_eq!(alpha.dims(), &[] as &[usize]);
    assert_eq!(alpha.to_scalar::<f32>().unwrap(), RANK as f32);
    let loaded =
        candle_core::safetensors::load(out.join("pytorch_lora_weights.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(loaded.len(), 8);
}

#[test]
fn sd1_half_precision_lora_keeps_dtype_and_gains_the_text_model_prefix() {
    let (dir, store) = temp_store();
    // A text encoder whose weight file has no `text_model.` prefix stores its modules without it.
    let original = lora_bytes(
        &[
            (&format!("unet.{UNET_K}"), 768, 320),
            (
                "text_encoder.encoder.layers.11.self_attn.out_proj",
                768,
                768,
            ),
        ],
        8,
        DType::F16,
    );
    let id = run_with(&store, 8, &[("lora", &original)]);
    let out = dir.path().join("export");
    export(&store, &id, &out);
    let source = SafeTensors::deserialize(&original).unwrap();
    let stored_a = source
        .tensor("text_encoder.encoder.layers.11.self_attn.out_proj.lora_A.weight")
        .unwrap();

    let bytes = fs::read(out.join("pytorch_lora_weights.safetensors")).unwrap();
    let diffusers = SafeTensors::deserialize(&bytes).unwrap();
    let a = diffusers
        .tensor("text_encoder.text_model.encoder.layers.11.self_attn.out_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.dtype(), safetensors::Dtype::F16);
    assert_eq!(a.data(), stored_a.data());

    let bytes = fs::read(out.join("lora_kohya.safetensors")).unwrap();
    let kohya = SafeTensors::deserialize(&bytes).unwrap();
    let down = kohya
        .tensor("lora_te_text_model_encoder_layers_11_self_attn_out_proj.lora_down.weight")
        .unwrap();
    assert_eq!(down.dtype(), safetensors::Dtype::F16);
    assert_eq!(down.shape(), [8, 768]);
    assert_eq!(down.data(), stored_a.data());
    let alpha = kohya
        .tensor("lora_te_text_model_encoder_layers_11_self_attn_out_proj.alpha")
        .unwrap();
    assert_eq!(alpha.data(), 8f32.to_le_bytes());
    let meta = metadata(&bytes);
    assert_eq!(meta["ss_network_dim"], "8");
    assert_eq!(meta["ss_base_model_version"], "sd_v1");
    assert_eq!(meta["ss_v2"], "False");
}

#[test]
fn unknown_width_is_reported_as_unknown() {
    let (dir, store) = temp_store();
    let original = lora_bytes(&[(&format!("unet.{UNET_K}"), 32, 16)], 2, DType::F32);
    let id = run_with(&store, 9, &[("lora", &original)]);
    let out = dir.path().join("export");
    export(&store, &id, &out);
    let meta = metadata(&fs::read(out.join("lora_kohya.safetensors")).unwrap());
    assert_eq!(meta["ss_base_model_version"], "unknown");
    assert!(!meta.contains_key("ss_v2"), "{meta:?}");
}

#[test]
fn finetuned_weights_are_exported_with_a_note() {
    let (dir, store) = temp_store();
    let mut tensors = HashMap::new();
    tensors.insert(
        format!("unet.{UNET_Q}.weight"),
        tensor(&[8, 8], 1.0, DType::F32),
    );
    tensors.insert(
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight".to_string(),
        tensor(&[4, 8], 2.0, DType::F32),
    );
    let meta = BTreeMap::from([("format".to_string(), "mifo-finetuned-1".to_string())]);
    let weights = safetensors_bytes(&tensors, meta).unwrap();
    let id = run_with(&store, 10, &[("weights", &weights)]);
    let out = dir.path().join("export");
    let report = export(&store, &id, &out);
    assert_eq!(
        fs::read(out.join("finetuned_weights.safetensors")).unwrap(),
        weights
    );
    assert!(!out.join("weights.safetensors").exists());
    let note = report
        .notes
        .iter()
        .find(|n| n.starts_with("finetuned_weights.safetensors"))
        .unwrap_or_else(|| panic!("{:?}", report.notes));
    assert!(
        note.contains("only the 2 fine-tuned tensors")
            && note.contains("unet.")
            && note.contains("text_encoder."),
        "{note}"
    );
}

/// Exports a run whose `lora` output is `bytes`; expects an error naming the run and the output,
/// and no export folder.
fn assert_lora_refused(bytes: &[u8], detail: &str) {
    let (dir, store) = temp_store();
    let id = run_with(&store, 11, &[("lora", bytes)]);
    let out = dir.path().join("export");
    let err = export_run(&store, &id, &out).unwrap_err().to_string();
    assert!(
        err.contains(&format!("output lora of run {id}")),
        "error does not name the output: {err}"
    );
    assert!(err.contains(detail), "expected `{detail}` in: {err}");
    assert!(!out.exists(), "a refused export wrote {}", out.display());
}

#[test]
fn a_garbage_lora_blob_is_refused_by_name() {
    assert_lora_refused(b"definitely not safetensors", "not a safetensors LoRA file");
}

#[test]
fn an_unexpected_lora_file_is_refused_by_name() {
    // A tensor that is no LoRA factor.
    let mut tensors = HashMap::new();
    tensors.insert(
        "unet.conv_in.weight".to_string(),
        tensor(&[4, 4], 0.0, DType::F32),
    );
    let bytes = safetensors_bytes(&tensors, BTreeMap::new()).unwrap();
    assert_lora_refused(&bytes, "unet.conv_in.weight");

    // A tensor outside unet./text_encoder.
    let mut tensors = HashMap::new();
    tensors.insert(
        "vae.decoder.lora_A.weight".to_string(),
        tensor(&[4, 4], 0.0, DType::F32),
    );
    let bytes = safetensors_bytes(&tensors, BTreeMap::new()).unwrap();
    assert_lora_refused(&bytes, "vae.decoder.lora_A.weight");

    // lora_A without lora_B.
    let mut tensors = HashMap::new();
    tensors.insert(
        format!("unet.{UNET_Q}.lora_A.weight"),
        tensor(&[4, 16], 0.0, DType::F32),
    );
    let bytes = safetensors_bytes(&tensors, BTreeMap::new()).unwrap();
    assert_lora_refused(&bytes, "has lora_A but no lora_B");

    // Factors whose ranks disagree.
    let mut tensors = HashMap::new();
    tensors.insert(
        format!("unet.{UNET_Q}.lora_A.weight"),
        tensor(&[4, 16], 0.0, DType::F32),
    );
    tensors.insert(
        format!("unet.{UNET_Q}.lora_B.weight"),
        tensor(&[16, 2], 0.0, DType::F32),
    );
    let bytes = safetensors_bytes(&tensors, BTreeMap::new()).unwrap();
    assert_lora_refused(&bytes, "expected [rank, in] and [out, rank]");

    // Metadata rank that the tensors contradict.
    let mut bytes = lora_bytes(&[(&format!("unet.{UNET_Q}"), 16, 16)], 4, DType::F32);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let at = text.find(r#"\"rank\":\"4\""#).expect("rank in metadata");
    let digit = at + r#"\"rank\":\""#.len();
    bytes[digit] = b'8';
    assert_lora_refused(&bytes, "metadata says rank 8 but the tensors have rank 4");

    // Fine-tuned weights stored under the LoRA output name.
    let mut tensors = HashMap::new();
    tensors.insert(
        format!("unet.{UNET_Q}.lora_A.weight"),
        tensor(&[4, 16], 0.0, DType::F32),
    );
    let meta = BTreeMap::from([("format".to_string(), "mifo-finetuned-1".to_string())]);
    let bytes = safetensors_bytes(&tensors, meta).unwrap();
    assert_lora_refused(&bytes, "expected \"mifo-lora-1\"");
}

/// An SDXL LoRA with an adapter on every attention projection of `fixtures/tiny-sdxl`'s UNet
/// (and one per text encoder): its kohya UNet names are the module paths of the same model in
/// the SDXL single-file layout (`fixtures/tiny-sdxl-single.safetensors`, written and checked
/// against diffusers by `tools/make_single_file_sdxl.py`) with `_` for `.`, each adapter the
/// shape of the single file's weight there; with the layer counts in the metadata (as `learn`
/// writes them) or read from the module names alike.
#[test]
fn sdxl_kohya_unet_names_are_the_single_file_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unet = candle_core::safetensors::load(
        root.join("fixtures/tiny-sdxl/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut modules: Vec<(String, usize, usize)> = unet
        .iter()
        .filter_map(|(k, t)| {
            let m = k.strip_suffix(".weight")?;
            ["to_q", "to_k", "to_v", "to_out.0"]
                .iter()
                .any(|e| m.ends_with(&format!(".{e}")))
                .then(|| (format!("unet.{m}"), t.dims()[1], t.dims()[0]))
        })
        .collect();
    modules.sort();
    let n_unet = modules.len();
    assert!(n_unet > 40, "{n_unet}");
    modules.push((format!("text_encoder.{TE_Q}"), 32, 32));
    modules.push((format!("text_encoder_2.{TE_Q}"), 48, 48));
    let refs: Vec<(&str, usize, usize)> = modules
        .iter()
        .map(|(m, i, o)| (m.as_str(), *i, *o))
        .collect();
    let plain = lora_bytes(&refs, 2, DType::F32);
    // The same adapters with the metadata `learn` writes for SDXL.
    let tensors = candle_core::safetensors::load_buffer(&plain, &Device::Cpu).unwrap();
    let with_layers = {
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "mifo-lora-1".to_string());
        meta.insert("rank".to_string(), "2".to_string());
        meta.insert("unet_layers_per_block".to_string(), "2,2,2".to_string());
        safetensors_bytes(&tensors, meta).unwrap()
    };
    // The single file's UNet modules (weights' names without `.weight`) and their shapes.
    let single = fs::read(root.join("fixtures/tiny-sdxl-single.safetensors")).unwrap();
    let single = SafeTensors::deserialize(&single).unwrap();
    let originals: HashMap<String, Vec<usize>> = single
        .tensors()
        .into_iter()
        .filter_map(|(k, v)| {
            let m = k
                .strip_prefix("model.diffusion_model.")?
                .strip_suffix(".weight")?;
            Some((m.replace('.', "_"), v.shape().to_vec()))
        })
        .collect();
    let (dir, store) = temp_store();
    let mut exported: Vec<Vec<String>> = Vec::new();
    for (seed, bytes) in [(11, &with_layers), (12, &plain)] {
        let id = run_with(&store, seed, &[("lora", bytes)]);
        let out = dir.path().join(format!("export-{seed}"));
        export(&store, &id, &out);
        let kohya = fs::read(out.join("lora_kohya.safetensors")).unwrap();
        assert_eq!(metadata(&kohya)["ss_base_model_version"], "sdxl_base_v1-0");
        let kohya = SafeTensors::deserialize(&kohya).unwrap();
        let mut names = Vec::new();
        for (name, view) in kohya.tensors() {
            let Some(module) = name
                .strip_prefix("lora_unet_")
                .and_then(|m| m.strip_suffix(".lora_down.weight"))
            else {
                continue;
            };
            let shape = originals
                .get(module)
                .unwrap_or_else(|| panic!("{name}: no such module in the single file"));
            // lora_down is [rank, in]; the weight there is [out, in].
            assert_eq!(view.shape()[1], shape[1], "{name}");
            names.push(module.to_string());
        }
        names.sort();
        assert_eq!(names.len(), n_unet);
        assert!(names.contains(&"input_blocks_4_1_transformer_blocks_0_attn1_to_q".to_string()));
        assert!(
            names.contains(&"output_blocks_0_1_transformer_blocks_1_attn2_to_out_0".to_string())
        );
        assert!(names.contains(&"middle_block_1_transformer_blocks_1_attn2_to_k".to_string()));
        exported.push(names);
    }
    assert_eq!(exported[0], exported[1]);
}
