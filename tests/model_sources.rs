//! Where models come from (issue #20 part 2): a Hugging Face repo id resolved offline in a fake
//! cache tree, and a single-file checkpoint in the original SD 2.x layout
//! (`fixtures/tiny-sd21-single.safetensors`, written and checked against diffusers by
//! `tools/make_single_file.py`), with the one-line refusals of bad inputs.

mod cli_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use cli_support::{err_line, json, root, scratch};
use mifo::model::single_file::{self, Family};
use mifo::model::source::resolve;
use mifo::model::{ModelSource, SourceKind, StableDiffusion};

const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

fn folder() -> PathBuf {
    root().join("fixtures/tiny-sd21")
}

fn single() -> PathBuf {
    root().join("fixtures/tiny-sd21-single.safetensors")
}

/// `mifo ARGS…` from the checkout with `env` set, no `MIFO_MODEL`, no Hugging Face variables
/// of the caller and `HOME` at `home`.
fn mifo_env(home: &Path, store: &Path, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mifo"));
    cmd.current_dir(root())
        .env("MIFO_ENGINE_IDLE", "3")
        .env_remove("MIFO_MODEL")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME")
        .env("HOME", home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.arg("--store").arg(store).args(args).output().unwrap()
}

/// A Hugging Face cache under `hub` holding `models--org--tiny` as the real hub lays it out:
/// `blobs/<name>` with the contents, `snapshots/<HASH>/…` relative symlinks into `blobs/`,
/// `refs/main` and `refs/v1` naming the snapshot. Returns the snapshot folder.
fn fake_cache(hub: &Path) -> PathBuf {
    let repo = hub.join("models--org--tiny");
    let blobs = repo.join("blobs");
    let snapshot = repo.join("snapshots").join(HASH);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), HASH).unwrap();
    std::fs::write(repo.join("refs/v1"), format!("{HASH}\n")).unwrap();
    fn link_tree(from: &Path, to: &Path, depth: usize, blobs: &Path, n: &mut usize) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                link_tree(&e.path(), &target, depth + 1, blobs, n);
            } else {
                *n += 1;
                let name = format!("{:064x}", *n);
                std::fs::copy(e.path(), blobs.join(&name)).unwrap();
                let up = "../".repeat(depth + 2);
                std::os::unix::fs::symlink(format!("{up}blobs/{name}"), &target).unwrap();
            }
        }
    }
    let mut n = 0;
    link_tree(&folder(), &snapshot, 0, &blobs, &mut n);
    assert!(std::fs::symlink_metadata(snapshot.join("unet/config.json"))
        .unwrap()
        .file_type()
        .is_symlink());
    snapshot
}

/// Asserts that `ours` equals `other` to 1e-6 in absolute terms (the library's parity
/// comparison, [`mifo::verify::compare`]).
/// `runs ls --json` without the runs' ages, which move with the clock: what a refused command
/// must leave as it was.
fn listing(home: &Path, store: &Path) -> serde_json::Value {
    fn drop_ages(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("age_s");
                m.values_mut().for_each(drop_ages);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(drop_ages),
            _ => {}
        }
    }
    let mut v = json(&mifo_env(home, store, &[], &["runs", "ls", "--json"]));
    drop_ages(&mut v);
    v
}

fn assert_same(what: &str, ours: &Tensor, other: &Tensor) {
    let check = mifo::verify::compare(what, ours, other, f64::INFINITY);
    assert!(check.max_abs <= 1e-6, "{check:?}");
}

const PLAIN_BOXES: [&str; 4] = ["--box", "cat=0,0.4,0.5,1", "--box", "dog=0.5,0.4,1,1"];

fn plain_synth<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "synth",
        "--model",
        model,
        "--prompt",
        "a photo of a cat and a dog",
        "--seed",
        "2",
        "--json",
        "--set",
        "synth.steps=2",
        "--set",
        "synth.guided_steps=1",
    ];
    args.extend(PLAIN_BOXES);
    args.extend(extra);
    args
}

#[test]
fn repo_ids_resolve_offline_in_the_hugging_face_cache() {
    let tmp = scratch("sources-hub");
    let hub = tmp.join("hf-hub");
    let snapshot = fake_cache(&hub);
    let home = tmp.join("home");
    let store = tmp.join("store");
    let folder_fp = mifo::store::model_fingerprint(&folder()).unwrap();
    // Symlinks into blobs/ are followed and the names are the snapshot's: the same identity.
    assert_eq!(
        mifo::store::model_fingerprint(&snapshot).unwrap(),
        folder_fp
    );

    // $HF_HUB_CACHE: `model info` loads it and names the source.
    let out = mifo_env(
        &home,
        &store,
        &[("HF_HUB_CACHE", &hub)],
        &["model", "info", "org/tiny", "--json"],
    );
    let info = json(&out);
    assert_eq!(info["source"]["kind"], "hub-cache");
    assert_eq!(info["source"]["given"], "org/tiny");
    assert_eq!(
        PathBuf::from(info["source"]["path"].as_str().unwrap()),
        snapshot.canonicalize().unwrap()
    );
    assert_eq!(
        info["unet"]["block_out_channels"],
        serde_json::json!([16, 32, 32, 32])
    );

    // $HF_HOME/hub, with a revision that is a commit hash naming the snapshot directly (no
    // ref file for it) and one that is a tag in refs/.
    let hf_home = tmp.join("hf-home");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::os::unix::fs::symlink(&hub, hf_home.join("hub")).unwrap();
    for rev in [HASH, "v1"] {
        let out = mifo_env(
            &home,
            &store,
            &[("HF_HOME", &hf_home)],
            &["model", "info", "org/tiny", "--revision", rev],
        );
        let text = cli_support::ok(&out);
        assert!(text.contains("hub-cache org/tiny@"), "{text}");
    }

    // ~/.cache/huggingface/hub, and a run through the engine: the spec has the folder's
    // fingerprint, the record the source as given.
    std::fs::create_dir_all(home.join(".cache/huggingface")).unwrap();
    std::os::unix::fs::symlink(&hub, home.join(".cache/huggingface/hub")).unwrap();
    let run = json(&mifo_env(&home, &store, &[], &plain_synth("org/tiny", &[])));
    assert_eq!(run["status"], "done");
    assert_eq!(run["model_fingerprint"], folder_fp.to_hex());
    assert_eq!(run["model_source"], "org/tiny");
    // The same weights named as a folder make the same spec: refused as already run.
    let folder_arg = folder().to_string_lossy().into_owned();
    let again = err_line(&mifo_env(
        &home,
        &store,
        &[],
        &plain_synth(&folder_arg, &[]),
    ));
    assert!(again.contains("--rerun"), "{again}");

    // An unknown repo id: one line naming every path tried, saying mifo never downloads; the
    // store is untouched.
    let listed = listing(&home, &store);
    let before = std::fs::read_dir(store.join("blobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    let out = mifo_env(
        &home,
        &store,
        &[("HF_HUB_CACHE", &hub)],
        &plain_synth("org/missing", &[]),
    );
    let line = err_line(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
    assert!(line.contains("org/missing@main"), "{line}");
    assert!(line.contains("never downloads"), "{line}");
    let tried = hub.join("models--org--missing/refs/main");
    assert!(line.contains(tried.to_str().unwrap()), "{line}");
    // A revision that is not in the cache names the ref file and the snapshot path.
    let out = mifo_env(
        &home,
        &store,
        &[("HF_HUB_CACHE", &hub)],
        &["model", "info", "org/tiny", "--revision", "abcdef1234567"],
    );
    let line = err_line(&out);
    for p in [
        hub.join("models--org--tiny/refs/abcdef1234567"),
        hub.join("models--org--tiny/snapshots/abcdef1234567"),
    ] {
        assert!(line.contains(p.to_str().unwrap()), "{line}");
    }
    assert_eq!(listing(&home, &store), listed);
    assert_eq!(
        std::fs::read_dir(store.join("blobs"))
            .map(|d| d.count())
            .unwrap_or(0),
        before
    );
    // An existing local path wins over a repo id of the same spelling.
    let local = tmp.join("org/tiny");
    cli_support::copy_dir(&folder(), &local);
    let out = Command::new(env!("CARGO_BIN_EXE_mifo"))
        .current_dir(&tmp)
        .env_remove("MIFO_MODEL")
        .env("HF_HUB_CACHE", &hub)
        .args(["model", "info", "org/tiny", "--json"])
        .output()
        .unwrap();
    assert_eq!(json(&out)["source"]["kind"], "folder");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Loads the folder and a source; compares text encoder, UNet and VAE outputs.
fn assert_same_model(source: &ModelSource) {
    let dev = Device::Cpu;
    let a = StableDiffusion::load(&folder(), DType::F32, &dev).unwrap();
    let b = StableDiffusion::load_source(source, DType::F32, &dev, Vec::new()).unwrap();
    let prompt = "a photo of a cat!";
    assert_eq!(
        a.tokenizer.encode(prompt).unwrap(),
        b.tokenizer.encode(prompt).unwrap()
    );
    let ids = Tensor::new(a.tokenizer.encode(prompt).unwrap(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (ta, tb) = (
        a.text_encoder.forward(&ids, None).unwrap(),
        b.text_encoder.forward(&ids, None).unwrap(),
    );
    assert_same("text", &ta, &tb);
    let lat = Tensor::randn(0f32, 1.0, (1, 4, 16, 16), &dev).unwrap();
    let t = Tensor::new(&[500f32], &dev).unwrap();
    let (ua, ub) = (
        a.unet.forward_hooked(&lat, &t, &ta, None).unwrap(),
        b.unet.forward_hooked(&lat, &t, &ta, None).unwrap(),
    );
    assert_same("unet", &ua, &ub);
    let (da, db) = (a.vae.decode(&lat).unwrap(), b.vae.decode(&lat).unwrap());
    assert_same("vae", &da, &db);
    assert_eq!(a.scheduler.config(), b.scheduler.config());
}

#[test]
fn a_single_file_with_its_config_folder_is_the_folders_model() {
    let given = single().to_string_lossy().into_owned();
    let cfg = folder().to_string_lossy().into_owned();
    let source = resolve(&given, None, Some(&cfg)).unwrap();
    assert_eq!(source.kind, SourceKind::SingleFile);
    assert_same_model(&source);

    // An SD 1.x-layout file (transformers CLIP under cond_stage_model.transformer.): made here
    // from the SD 2.x one with the folder's text encoder.
    let tmp = scratch("sources-sd1");
    let sd1 = tmp.join("sd1.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(single(), &Device::Cpu).unwrap();
    tensors.retain(|k, _| !k.starts_with("cond_stage_model."));
    let te = candle_core::safetensors::load(
        folder().join("text_encoder/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (k, v) in te {
        tensors.insert(format!("cond_stage_model.transformer.{k}"), v);
    }
    candle_core::safetensors::save(&tensors, &sd1).unwrap();
    let source = resolve(sd1.to_str().unwrap(), None, Some(&cfg)).unwrap();
    let plan = single_file::Plan::inspect(&sd1, Some(&folder())).unwrap();
    assert_eq!(plan.family, Family::Sd1);
    assert_same_model(&source);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn model_verify_passes_on_the_single_file_and_names_its_kind() {
    let tmp = scratch("sources-verify");
    let reference = folder().join("reference.safetensors");
    verify_single_file(&tmp, &single(), &reference, &folder());
    let info = json(&cli_support::mifo(
        &tmp,
        &[
            "model",
            "info",
            single().to_str().unwrap(),
            "--model-config",
            folder().to_str().unwrap(),
            "--json",
        ],
    ));
    assert_eq!(info["source"]["kind"], "single-file");
    assert!(info["layout"]
        .as_str()
        .unwrap()
        .starts_with("SD 2.x single file"));
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn configs_inferred_from_the_keys_match_the_folder() {
    let inf = single_file::infer(&single(), Family::Sd2).unwrap();
    assert_eq!(inf.unet_channels, vec![16, 32, 32, 32]);
    assert_eq!(inf.unet_attention, vec![true, true, true, false]);
    assert_eq!(inf.unet_layers, 2);
    assert_eq!(inf.unet_in_out, (4, 4));
    assert_eq!(inf.cross_attention_dim, 32);
    assert!(inf.linear_projection);
    assert_eq!(inf.vae_channels, vec![8, 16, 32, 32]);
    assert_eq!(inf.vae_layers, 2);
    assert_eq!(inf.latent_channels, 4);
    // The file holds 3 OpenCLIP blocks; SD 2.x uses all but the last.
    assert_eq!(inf.text, (32, 2, 64, 49408, 77));
    // The bundled CLIP vocabulary tokenizes as the folder's SD 2.x tokenizer does.
    let bundled = mifo::model::tokenizer::ClipTokenizer::bundled("!").unwrap();
    let theirs =
        mifo::model::tokenizer::ClipTokenizer::from_dir(&folder().join("tokenizer")).unwrap();
    assert_eq!(bundled.vocab_size(), 49408);
    for p in ["a photo of a cat!!", "Two DOGS, on the beach; 3 cups", ""] {
        assert_eq!(bundled.encode(p).unwrap(), theirs.encode(p).unwrap(), "{p}");
    }
}

/// A copy of the single file with `edit` applied to its tensors.
fn edited(dir: &Path, name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut tensors = candle_core::safetensors::load(single(), &Device::Cpu).unwrap();
    edit(&mut tensors);
    let path = dir.join(name);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn bad_single_files_are_refused_in_one_line() {
    let tmp = scratch("sources-bad");
    let store = tmp.join("store");
    let cfg = folder().to_string_lossy().into_owned();
    let refused = |file: &Path, with_config: bool, needles: &[&str]| {
        let mut args = vec!["model", "info", file.to_str().unwrap()];
        if with_config {
            args.extend(["--model-config", &cfg]);
        }
        let out = cli_support::mifo(&store, &args);
        let line = err_line(&out);
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim().lines().count(),
            1,
            "{line}"
        );
        assert!(line.contains(file.to_str().unwrap()), "{line}");
        for n in needles {
            assert!(line.contains(n), "`{n}` not in: {line}");
        }
    };
    // Truncated.
    let bytes = std::fs::read(single()).unwrap();
    let cut = tmp.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    refused(&cut, true, &["truncated"]);
    // A key of no known layout.
    let unknown = edited(&tmp, "unknown.safetensors", |t| {
        t.insert(
            "mystery.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    refused(&unknown, true, &["unknown key `mystery.weight`"]);
    // Nothing of Stable Diffusion at all.
    let foreign = edited(&tmp, "foreign.safetensors", |t| {
        t.retain(|k, _| k.starts_with("cond_stage_model."));
    });
    refused(&foreign, true, &["no UNet"]);
    // SDXL: its text encoders live under conditioner.embedders.
    let sdxl = edited(&tmp, "sdxl.safetensors", |t| {
        let keys: Vec<String> = t.keys().cloned().collect();
        for k in keys {
            if let Some(rest) = k.strip_prefix("cond_stage_model.") {
                let v = t.remove(&k).unwrap();
                t.insert(format!("conditioner.embedders.1.{rest}"), v);
            }
        }
    });
    refused(
        &sdxl,
        false,
        &["SDXL", "without its CLIP ViT-L text encoder"],
    );
    // The tiny model's sizes are not SD's: without --model-config its configs cannot be
    // inferred, and the refusal says what to pass.
    refused(&single(), false, &["--model-config"]);
    // A pickle is not read.
    let ckpt = tmp.join("model.ckpt");
    std::fs::write(&ckpt, b"not read").unwrap();
    refused(&ckpt, false, &["pickled"]);
    // Nothing was written to the store.
    assert!(!store.join("db").exists());
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn single_file_fingerprints_and_runs_record_the_source() {
    let tmp = scratch("sources-fp");
    let store = tmp.join("store");
    let with = mifo::store::model_fingerprint_with(&single(), Some(&folder())).unwrap();
    let bare = mifo::store::model_fingerprint_with(&single(), None).unwrap();
    let dir = mifo::store::model_fingerprint(&folder()).unwrap();
    assert_ne!(
        with, bare,
        "the config folder is part of a single file's identity"
    );
    assert_ne!(with, dir, "a converted file is other bytes than the folder");
    // Another config folder with the same configs but no weights: same identity.
    let configs = tmp.join("configs");
    cli_support::copy_dir(&folder(), &configs);
    for f in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "reference.safetensors",
    ] {
        std::fs::remove_file(configs.join(f)).unwrap();
    }
    assert_eq!(
        mifo::store::model_fingerprint_with(&single(), Some(&configs)).unwrap(),
        with
    );

    let file = single().to_string_lossy().into_owned();
    let cfg = configs.to_string_lossy().into_owned();
    let run = json(&cli_support::mifo(
        &store,
        &plain_synth(&file, &["--model-config", &cfg]),
    ));
    assert_eq!(run["status"], "done");
    assert_eq!(run["model_fingerprint"], with.to_hex());
    assert_eq!(run["model_source"], file.as_str());
    let shown = json(&cli_support::mifo(
        &store,
        &["runs", "show", run["id"].as_str().unwrap(), "--json"],
    ));
    assert_eq!(shown["model_source"], file.as_str());
    assert_eq!(
        shown["model_dir"].as_str().map(PathBuf::from),
        Some(single().canonicalize().unwrap())
    );
    assert_eq!(
        shown["model_config"].as_str().map(PathBuf::from),
        Some(configs.canonicalize().unwrap())
    );
    // A re-run finds the file and its config folder from the store alone.
    let rerun = json(&cli_support::mifo(
        &store,
        &["runs", "rerun", run["id"].as_str().unwrap(), "--json"],
    ));
    assert_eq!(rerun["rerun_identical"], true, "{rerun}");
    // A sweep takes `mifo synth`'s --model-config too: its runs have the single file's
    // fingerprint with that folder and record the source as given.
    let mut sweep = vec!["sweep"];
    sweep.extend(plain_synth(&file, &["--model-config", &cfg]));
    sweep.retain(|a| *a != "--seed" && *a != "2");
    sweep.extend(["--seeds", "3,4", "--name", "single"]);
    let doc = json(&cli_support::mifo(&store, &sweep));
    assert_eq!(doc["queued"], 2, "{doc}");
    for r in doc["runs"].as_array().unwrap() {
        assert_eq!(r["status"], "done", "{doc}");
        let shown = json(&cli_support::mifo(
            &store,
            &["runs", "show", r["id"].as_str().unwrap(), "--json"],
        ));
        assert_eq!(shown["model_fingerprint"], with.to_hex());
        assert_eq!(shown["model_source"], file.as_str());
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

fn xl_folder() -> PathBuf {
    root().join("fixtures/tiny-sdxl")
}

/// `fixtures/tiny-sdxl` as one SDXL single file, its tensors stored in float16
/// (`tools/make_single_file_sdxl.py`).
fn xl_single() -> PathBuf {
    root().join("fixtures/tiny-sdxl-single.safetensors")
}

/// The tensors of the folder's component `part`, as stored (float32).
fn folder_part(part: single_file::Part) -> HashMap<String, Tensor> {
    let file = match part {
        single_file::Part::Unet => "unet/diffusion_pytorch_model.safetensors",
        single_file::Part::Vae => "vae/diffusion_pytorch_model.safetensors",
        single_file::Part::TextEncoder => "text_encoder/model.safetensors",
        single_file::Part::TextEncoder2 => "text_encoder_2/model.safetensors",
    };
    candle_core::safetensors::load(xl_folder().join(file), &Device::Cpu).unwrap()
}

/// Read with the folder's configs, the SDXL single file gives every UNet, VAE and text-encoder
/// tensor of the folder, rounded to float16 as the file stores them, exactly (nothing more,
/// nothing less), and loads as an SDXL pipeline.
#[test]
fn an_sdxl_single_file_holds_the_folders_tensors() {
    use single_file::Part;
    let plan = single_file::Plan::inspect(&xl_single(), Some(&xl_folder())).unwrap();
    assert_eq!(plan.family, Family::Sdxl);
    let parts = plan.load(DType::F32, &Device::Cpu).unwrap();
    for part in [Part::Unet, Part::Vae, Part::TextEncoder, Part::TextEncoder2] {
        let ours = &parts[&part];
        let theirs = folder_part(part);
        let mut a: Vec<&String> = ours.keys().collect();
        let mut b: Vec<&String> = theirs.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{part:?}");
        for (name, t) in &theirs {
            let rounded = t
                .to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let d = (&ours[name] - &rounded)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{part:?} {name}");
        }
    }
    let source = resolve(
        xl_single().to_str().unwrap(),
        None,
        Some(xl_folder().to_str().unwrap()),
    )
    .unwrap();
    let sd = StableDiffusion::load_source(&source, DType::F32, &Device::Cpu, Vec::new()).unwrap();
    let xl = sd.xl.as_ref().expect("an SDXL pipeline");
    assert!(xl.force_zeros_for_empty_prompt);
    assert_eq!(xl.text_encoder_2.config().projection_dim, Some(40));
    assert!(sd.layout.starts_with("SDXL single file"), "{}", sd.layout);
    let prompt = "a photo of a cat!";
    let theirs =
        mifo::model::tokenizer::ClipTokenizer::from_dir(&xl_folder().join("tokenizer_2")).unwrap();
    assert_eq!(
        xl.tokenizer_2.encode(prompt).unwrap(),
        theirs.encode(prompt).unwrap()
    );
}

/// The f16 file with every tensor replaced by the folder's float32 value at the name it maps
/// to: the same layout, the folder's exact weights.
fn xl_single_f32(dir: &Path) -> PathBuf {
    use single_file::Target;
    let plan = single_file::Plan::inspect(&xl_single(), Some(&xl_folder())).unwrap();
    let mut folder: HashMap<single_file::Part, HashMap<String, Tensor>> = HashMap::new();
    let mut tensors = candle_core::safetensors::load(xl_single(), &Device::Cpu).unwrap();
    for (key, target) in plan.mapping() {
        let file_shape = tensors[key].dims().to_vec();
        let mut get = |part: &single_file::Part, name: &str| {
            folder.entry(*part).or_insert_with(|| folder_part(*part))[name].clone()
        };
        let value = match target {
            Target::Ignore => tensors[key].to_dtype(DType::F32).unwrap(),
            Target::Plain(p, n) => get(p, n),
            Target::Squeeze(p, n) => get(p, n).reshape(file_shape.as_slice()).unwrap(),
            Target::Transpose(p, n) => get(p, n).t().unwrap().contiguous().unwrap(),
            Target::SplitQkv(p, names) => {
                let parts: Vec<Tensor> = names.iter().map(|n| get(p, n)).collect();
                Tensor::cat(&parts, 0).unwrap()
            }
        };
        assert_eq!(value.dims(), file_shape.as_slice(), "{key}");
        let value = if tensors[key].dtype() == DType::I64 {
            tensors[key].clone()
        } else {
            value
        };
        tensors.insert(key.clone(), value);
    }
    let path = dir.join("tiny-sdxl-single-f32.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

/// `mifo model verify` passes on the SDXL single file, in the file's own layout holding the
/// folder's float32 weights (the f16 fixture's rounding is beyond the references' 1e-4).
#[test]
fn model_verify_passes_on_an_sdxl_single_file() {
    let tmp = scratch("sources-xl-verify");
    let file = xl_single_f32(&tmp);
    let reference = xl_folder().join("reference.safetensors");
    let text = verify_single_file(&tmp, &file, &reference, &xl_folder());
    assert!(
        text.lines().filter(|l| l.ends_with(" ok")).count() >= 59,
        "{text}"
    );
    let info = json(&cli_support::mifo(
        &tmp,
        &[
            "model",
            "info",
            xl_single().to_str().unwrap(),
            "--model-config",
            xl_folder().to_str().unwrap(),
            "--json",
        ],
    ));
    assert!(info["layout"]
        .as_str()
        .unwrap()
        .starts_with("SDXL single file"));
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn sdxl_shapes_are_inferred_from_the_keys() {
    let inf = single_file::infer(&xl_single(), Family::Sdxl).unwrap();
    assert_eq!(inf.unet_channels, vec![16, 32, 64]);
    assert_eq!(inf.unet_attention, vec![false, true, true]);
    assert_eq!(inf.transformer_depth, vec![1, 1, 2]);
    assert_eq!(inf.unet_layers, 2);
    assert_eq!(inf.cross_attention_dim, 80);
    assert_eq!(inf.added, Some((8, 88)));
    assert_eq!(inf.vae_channels, vec![8, 16, 32, 32]);
    assert_eq!(inf.text, (32, 2, 64, 49408, 77));
    assert_eq!(inf.text_2, Some(((48, 3, 96, 49408, 77), 40)));
}

#[test]
fn bad_sdxl_single_files_are_refused_in_one_line() {
    let tmp = scratch("sources-xl-bad");
    let store = tmp.join("store");
    let xl_cfg = xl_folder().to_string_lossy().into_owned();
    let sd_cfg = folder().to_string_lossy().into_owned();
    let refused = |file: &Path, config: Option<&str>, needles: &[&str]| {
        let mut args = vec!["model", "info", file.to_str().unwrap()];
        if let Some(c) = config {
            args.extend(["--model-config", c]);
        }
        let out = cli_support::mifo(&store, &args);
        let line = err_line(&out);
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim().lines().count(),
            1,
            "{line}"
        );
        assert!(line.contains(file.to_str().unwrap()), "{line}");
        for n in needles {
            assert!(line.contains(n), "`{n}` not in: {line}");
        }
    };
    let edited = |name: &str, edit: &dyn Fn(&mut HashMap<String, Tensor>)| {
        let mut tensors = candle_core::safetensors::load(xl_single(), &Device::Cpu).unwrap();
        edit(&mut tensors);
        let path = tmp.join(name);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        path
    };
    // Truncated.
    let bytes = std::fs::read(xl_single()).unwrap();
    let cut = tmp.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    refused(&cut, Some(xl_cfg.as_str()), &["truncated"]);
    // A key of no known layout.
    let unknown = edited("unknown.safetensors", &|t| {
        t.insert(
            "conditioner.embedders.1.model.mystery".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    refused(
        &unknown,
        Some(xl_cfg.as_str()),
        &[
            "unknown key `conditioner.embedders.1.model.mystery`",
            "SDXL",
        ],
    );
    // Only OpenCLIP under conditioner.embedders (as an SDXL refiner has it): not SDXL base.
    let refiner = edited("refiner.safetensors", &|t| {
        t.retain(|k, _| !k.starts_with("conditioner.embedders.0."));
    });
    refused(
        &refiner,
        Some(xl_cfg.as_str()),
        &["SDXL", "CLIP ViT-L", "refiner"],
    );
    // The tiny model's sizes are not SDXL base's: configs are not inferred.
    refused(&xl_single(), None, &["SDXL layout", "--model-config"]);
    // An SDXL file with an SD 2.x config folder, and the other way round.
    refused(&xl_single(), Some(sd_cfg.as_str()), &["SDXL", "text_time"]);
    refused(&single(), Some(xl_cfg.as_str()), &["SD 2.x", "text_time"]);
    assert!(!store.join("db").exists());
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `mifo model verify FILE REFERENCE --model-config CONFIG` on a single-file checkpoint: it
/// reads the file as one and every tensor passes; the report's text.
fn verify_single_file(tmp: &Path, file: &Path, reference: &Path, config: &Path) -> String {
    let out = cli_support::mifo(
        tmp,
        &[
            "model",
            "verify",
            file.to_str().unwrap(),
            reference.to_str().unwrap(),
            "--model-config",
            config.to_str().unwrap(),
        ],
    );
    let text = cli_support::ok(&out);
    assert!(
        text.lines()
            .next()
            .unwrap()
            .starts_with("model: single-file "),
        "{text}"
    );
    assert!(text.contains(" 0 failed"), "{text}");
    text
}
