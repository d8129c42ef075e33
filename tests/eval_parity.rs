//! Parity of mifo's evaluation models with transformers: the tiny CLIPModel and DINO ViTModel of
//! `fixtures/tiny-clip` and `fixtures/tiny-dino` (made by `tools/make_tiny_eval_models.py`) on
//! the inputs stored in their `reference.safetensors`. Float32; every tensor must agree within
//! 1e-4 of its largest absolute value; the image processors' `pixel_values` within 1e-5.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use mifo::eval::{ClipModel, Dino};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let diff: f32 = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f32 = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    diff / scale.max(1e-12)
}

fn check(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
    eprintln!("{what}: {e:.2e}");
}

fn images(r: &HashMap<String, Tensor>) -> Vec<RgbImage> {
    (0..)
        .map_while(|i| r.get(&format!("image_{i}")))
        .map(|t| {
            let (h, w, _) = t.dims3().unwrap();
            let data: Vec<u8> = t.flatten_all().unwrap().to_vec1().unwrap();
            RgbImage::from_raw(w as u32, h as u32, data).unwrap()
        })
        .collect()
}

fn pixel_values(imgs: &[RgbImage], f: impl Fn(&RgbImage) -> Vec<f32>) -> Tensor {
    let data: Vec<f32> = imgs.iter().flat_map(f).collect();
    let n = imgs.len();
    let side = ((data.len() / n / 3) as f64).sqrt() as usize;
    Tensor::from_vec(data, (n, 3, side, side), &Device::Cpu).unwrap()
}

#[test]
fn clip_matches_transformers() {
    let dir = fixture("tiny-clip");
    let r = reference(&dir);
    let clip = ClipModel::load(&dir, &Device::Cpu).unwrap();
    let imgs = images(&r);
    assert_eq!(imgs.len(), 3);
    // The image processor (PIL bicubic, shortest edge, centre crop, CLIP mean/std).
    let pixels = pixel_values(&imgs, |i| clip.processor().pixel_values(i));
    check("clip pixel_values", &pixels, &r["pixel_values"], 1e-5);
    // The vision tower and projection on the reference pixel values.
    let hidden = clip.vision_hidden(&r["pixel_values"]).unwrap();
    check(
        "clip vision last_hidden_state",
        &hidden,
        &r["vision_last_hidden_state"],
        1e-4,
    );
    let embeds = clip.image_embeds_from_pixels(&r["pixel_values"]).unwrap();
    check("clip image_embeds", &embeds, &r["image_embeds"], 1e-4);
    // End to end from the images.
    let from_images = clip.image_embeds(&imgs).unwrap();
    let flat: Vec<f32> = from_images.concat();
    let t = Tensor::from_vec(flat, r["image_embeds"].shape(), &Device::Cpu).unwrap();
    check(
        "clip image_embeds from images",
        &t,
        &r["image_embeds"],
        1e-4,
    );
    // Text: tokenizer ids, hidden states, projected features.
    for j in 0.. {
        let Some(prompt) = r.get(&format!("prompt_{j}")) else {
            assert_eq!(j, 4);
            break;
        };
        let prompt = String::from_utf8(prompt.to_vec1::<u8>().unwrap()).unwrap();
        let want: Vec<i64> = r[&format!("input_ids_{j}")].to_vec1().unwrap();
        let ids = clip.token_ids(&prompt).unwrap();
        assert_eq!(
            ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
            want,
            "ids of {prompt:?}"
        );
        let h = clip.text_hidden(&ids).unwrap();
        check(
            &format!("clip text last_hidden_state {j}"),
            &h,
            &r[&format!("text_last_hidden_state_{j}")],
            1e-4,
        );
        let e = clip.text_embeds(&prompt).unwrap();
        check(
            &format!("clip text_embeds {j}"),
            &e,
            &r[&format!("text_embeds_{j}")],
            1e-4,
        );
    }
}

#[test]
fn dino_matches_transformers() {
    let dir = fixture("tiny-dino");
    let r = reference(&dir);
    let dino = Dino::load(&dir, &Device::Cpu).unwrap();
    let imgs = images(&r);
    let pixels = pixel_values(&imgs, |i| dino.processor().pixel_values(i));
    check("dino pixel_values", &pixels, &r["pixel_values"], 1e-5);
    let hidden = dino.hidden(&r["pixel_values"]).unwrap();
    check(
        "dino last_hidden_state",
        &hidden,
        &r["last_hidden_state"],
        1e-4,
    );
    let cls = dino.cls_from_pixels(&r["pixel_values"]).unwrap();
    check("dino cls", &cls, &r["cls"], 1e-4);
    let from_images = dino.features(&imgs).unwrap().concat();
    let t = Tensor::from_vec(from_images, r["cls"].shape(), &Device::Cpu).unwrap();
    check("dino cls from images", &t, &r["cls"], 1e-4);
}

#[test]
fn missing_or_wrong_folders_are_named() {
    let nowhere = fixture("no-such-model");
    let e = ClipModel::load(&nowhere, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no-such-model") && e.contains("config.json"),
        "{e}"
    );
    // A DINO folder is not a CLIP model and the other way round.
    let e = ClipModel::load(&fixture("tiny-dino"), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model_type"), "{e}");
    let e = Dino::load(&fixture("tiny-clip"), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model_type"), "{e}");
}
