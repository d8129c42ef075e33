//! The evaluation pipeline with stand-in encoders whose features can be worked out by hand
//! (CLIP image / DINO feature = mean RGB of the image DINO or CLIP is given; CLIP text = a fixed
//! vector per word): cosines, means, CS, the masking (black outside the instance, crop to its
//! box, square padding), regions read back from a stored synthesis run, and the scores stored
//! with the run in one transaction (invalid scores change nothing).

use std::collections::BTreeMap;

use image::{Rgb, RgbImage};
use mifo::eval::run::{prepare, RunSource};
use mifo::eval::{
    evaluate, CropMode, Encoders, EvalInput, Reference, Region, RegionKind, Sample, Subject,
};
use mifo::store::{Digest, NewRun, RunKind, RunOutcome, RunSpec, Store};

/// Mean RGB, the stand-in for every image feature.
fn mean_rgb(img: &RgbImage) -> Vec<f32> {
    let n = (img.width() * img.height()) as f32;
    let mut s = [0f32; 3];
    for p in img.pixels() {
        for c in 0..3 {
            s[c] += f32::from(p[c]);
        }
    }
    s.iter().map(|v| v / n).collect()
}

struct HandEncoders;

impl Encoders for HandEncoders {
    fn clip_images(&self, images: &[RgbImage]) -> mifo::Result<Vec<Vec<f32>>> {
        Ok(images.iter().map(mean_rgb).collect())
    }
    fn clip_text(&self, text: &str) -> mifo::Result<Vec<f32>> {
        Ok(if text.contains("cup") {
            vec![1.0, 1.0, 0.0]
        } else {
            vec![0.0, 0.0, 1.0]
        })
    }
    fn dino(&self, images: &[RgbImage]) -> mifo::Result<Vec<Vec<f32>>> {
        Ok(images.iter().map(mean_rgb).collect())
    }
}

fn halves(w: u32, h: u32, left: [u8; 3], right: [u8; 3]) -> RgbImage {
    RgbImage::from_fn(w, h, |x, _| Rgb(if x < w / 2 { left } else { right }))
}

fn half_mask(w: u32, h: u32, left: bool) -> Vec<bool> {
    (0..w * h).map(|i| (i % w < w / 2) == left).collect()
}

const A: [u8; 3] = [200, 100, 0];
const B: [u8; 3] = [0, 100, 200];
const C: [u8; 3] = [200, 50, 0];
const D: [u8; 3] = [0, 0, 200];

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

/// Reference: <v0> = left half in A, <v1> = right half in B. Sample: left half C, right half D,
/// except a green 2x2 corner at the top left that the <v0> mask leaves out.
fn input() -> EvalInput {
    let reference = halves(8, 8, A, B);
    let mut sample = halves(8, 8, C, D);
    let mut v0 = half_mask(8, 8, true);
    for (x, y) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
        sample.put_pixel(x, y, Rgb([0, 255, 0]));
        v0[(y * 8 + x) as usize] = false;
    }
    EvalInput {
        text: Some("a photo of cup".into()),
        references: vec![
            Reference {
                name: "<v0>".into(),
                image: reference.clone(),
                region: Region {
                    kind: RegionKind::Mask,
                    pixels: Some(half_mask(8, 8, true)),
                },
            },
            Reference {
                name: "<v1>".into(),
                image: reference,
                region: Region {
                    kind: RegionKind::Mask,
                    pixels: Some(half_mask(8, 8, false)),
                },
            },
        ],
        samples: vec![Sample {
            name: "sample_0.png".into(),
            image: sample,
            subjects: vec![
                Subject {
                    name: "<v0>".into(),
                    instance: 0,
                    region: Region {
                        kind: RegionKind::Mask,
                        pixels: Some(v0),
                    },
                },
                Subject {
                    name: "<v1>".into(),
                    instance: 1,
                    region: Region {
                        kind: RegionKind::Box,
                        pixels: Some(half_mask(8, 8, false)),
                    },
                },
            ],
        }],
    }
}

#[test]
fn scores_match_hand_computed_values() {
    let s = evaluate(&input(), &HandEncoders, CropMode::Crop).unwrap();
    // DINO stand-in: the masked crops' mean colours point along C = (4,1,0) and D = (0,0,1)
    // (the green corner is black, so it does not count); the references along (2,1,0) and
    // (0,1,2).
    let sim0 = 9.0 / 85f64.sqrt(); // cos((4,1,0),(2,1,0))
    let nsim0 = 1.0 / 85f64.sqrt(); // cos((4,1,0),(0,1,2))
    let sim1 = 2.0 / 5f64.sqrt(); // cos((0,0,1),(0,1,2))
    let nsim1 = 0.0; // cos((0,0,1),(2,1,0))
    let subj = &s.samples[0].subjects;
    assert!(close(subj[0].sim_d, sim0), "{}", subj[0].sim_d);
    assert!(close(subj[0].nsim_d.unwrap(), nsim0));
    assert!(close(subj[1].sim_d, sim1));
    assert!(close(subj[1].nsim_d.unwrap(), nsim1));
    assert_eq!(subj[0].region, RegionKind::Mask);
    assert_eq!(subj[1].region, RegionKind::Box);
    // CLIP stand-in: the sample's mean colour (with the green corner) against (1,1,0).
    let (r, g, b) = (
        (28.0 * 200.0) / 64.0,
        (28.0 * 50.0 + 4.0 * 255.0) / 64.0,
        (32.0 * 200.0) / 64.0,
    );
    let sim_c: f64 = (r + g) / f64::sqrt(r * r + g * g + b * b) / 2f64.sqrt();
    assert!(close(s.sim_c.unwrap(), sim_c), "{:?} vs {sim_c}", s.sim_c);
    let (sim_d, nsim_d) = ((sim0 + sim1) / 2.0, (nsim0 + nsim1) / 2.0);
    assert!(close(s.sim_d.unwrap(), sim_d));
    assert!(close(s.nsim_d.unwrap(), nsim_d));
    assert!(close(s.cs.unwrap(), sim_c * sim_d * (1.0 - nsim_d)));
    let m: BTreeMap<String, f64> = s.metrics().into_iter().collect();
    let names: Vec<&str> = m.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "eval/cs",
            "eval/nsim_d",
            "eval/nsim_d/<v0>",
            "eval/nsim_d/<v1>",
            "eval/sim_c",
            "eval/sim_d",
            "eval/sim_d/<v0>",
            "eval/sim_d/<v1>"
        ]
    );
    assert!(close(m["eval/sim_d/<v0>"], sim0));
}

#[test]
fn masking_framing_and_whole_image_regions_change_the_scores_as_they_should() {
    // Without the black outside the mask, the green corner would tint the <v0> crop.
    let mut leaky = input();
    leaky.samples[0].subjects[0].region.kind = RegionKind::Box;
    leaky.samples[0].subjects[0].region.pixels = Some(half_mask(8, 8, true));
    let s = evaluate(&leaky, &HandEncoders, CropMode::Crop).unwrap();
    let g = (4.0 * 255.0) / 32.0;
    let (r, gg) = (28.0 * 200.0 / 32.0, (28.0 * 50.0) / 32.0 + g);
    let want: f64 = (2.0 * r + gg) / f64::sqrt(r * r + gg * gg) / 5f64.sqrt();
    assert!(close(s.samples[0].subjects[0].sim_d, want));
    // Mean colours point the same way cropped or not: crop and full agree here …
    let full = evaluate(&input(), &HandEncoders, CropMode::Full).unwrap();
    let crop = evaluate(&input(), &HandEncoders, CropMode::Crop).unwrap();
    assert!(close(full.sim_d.unwrap(), crop.sim_d.unwrap()));
    // … and a whole-image region scores the whole sample and has no NSIM-D (so no CS).
    let mut whole = input();
    for s in &mut whole.samples[0].subjects {
        s.region = Region::whole();
    }
    let s = evaluate(&whole, &HandEncoders, CropMode::Crop).unwrap();
    assert!(s.samples[0].subjects.iter().all(|x| x.nsim_d.is_none()));
    assert_eq!((s.nsim_d, s.cs), (None, None));
    let mean = [
        28.0 * 200.0 / 64.0,
        (28.0 * 50.0 + 4.0 * 255.0) / 64.0,
        200.0 / 2.0,
    ];
    let want =
        (2.0 * mean[0] + mean[1]) / (mean.iter().map(|v| v * v).sum::<f64>()).sqrt() / 5f64.sqrt();
    assert!(close(s.samples[0].subjects[0].sim_d, want));
    // An empty region is an error naming the sample and instance.
    let mut empty = input();
    empty.samples[0].subjects[1].region.pixels = Some(vec![false; 64]);
    let e = evaluate(&empty, &HandEncoders, CropMode::Crop)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sample_0.png <v1>"), "{e}");
}

fn png(img: &RgbImage) -> Vec<u8> {
    mifo::imageio::png_bytes(img).unwrap()
}

fn grey_png(mask: &[bool], w: u32, h: u32) -> Vec<u8> {
    let g = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([if mask[(y * w + x) as usize] { 255 } else { 0 }])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageLuma8(g)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A store with a finished learning run (photo + two masks, init words) and a synthesis run
/// from it whose `masks_0.png` shows refined masks different from the boxes.
fn stored_runs(dir: &std::path::Path) -> (Store, String, String, Vec<bool>) {
    let store = Store::create(dir).unwrap();
    let photo = halves(16, 16, A, B);
    let mut inputs = BTreeMap::new();
    inputs.insert("image".to_string(), store.put_blob(&png(&photo)).unwrap());
    for (i, left) in [true, false].into_iter().enumerate() {
        let h = store
            .put_blob(&grey_png(&half_mask(16, 16, left), 16, 16))
            .unwrap();
        inputs.insert(format!("mask{i}"), h);
    }
    let learn = RunSpec {
        kind: RunKind::Learn,
        config: serde_json::json!({"learn": {"init": "cup,spoon"}}),
        seed: 1,
        inputs,
        parent: None,
        model_fingerprint: Digest::of(b"m"),
        code_version: "test".into(),
    };
    let lrec = store.create_run(&learn, NewRun::default()).unwrap();
    store.start_run(&lrec.id, "h", "cpu").unwrap();
    store.finish_run(&lrec.id, RunOutcome::Done).unwrap();
    let synth = RunSpec {
        kind: RunKind::Synth,
        config: serde_json::json!({
            "prompt": "a photo of <v0> and <v1> at the beach",
            "boxes": ["<v0>=0,0,0.5,1", "<v1>=0.5,0,1,1"],
        }),
        seed: 2,
        inputs: BTreeMap::new(),
        parent: Some(lrec.id.clone()),
        model_fingerprint: Digest::of(b"m"),
        code_version: "test".into(),
    };
    let srec = store.create_run(&synth, NewRun::default()).unwrap();
    store.start_run(&srec.id, "h", "cpu").unwrap();
    let sample = halves(16, 16, C, D);
    // Refined masks at 4x4: <v0> the left column pair minus its top cell, <v1> = its box.
    let mut m0 = vec![false; 16];
    for y in 1..4 {
        m0[y * 4] = true;
        m0[y * 4 + 1] = true;
    }
    let m1: Vec<bool> = (0..16).map(|i| i % 4 >= 2).collect();
    let drawn = mifo::synth::render::draw_regions(
        &sample,
        (4, 4),
        &[m0.clone(), m1],
        &["<v0>".into(), "<v1>".into()],
    );
    store
        .put_output(&srec.id, "sample_0.png", &png(&sample))
        .unwrap();
    store
        .put_output(&srec.id, "masks_0.png", &png(&drawn))
        .unwrap();
    store.finish_run(&srec.id, RunOutcome::Done).unwrap();
    // <v0>'s refined mask at 16x16: rows 4.., columns 0..8.
    let full: Vec<bool> = (0..256).map(|i| i % 16 < 8 && i / 16 >= 4).collect();
    (store, lrec.id.to_string(), srec.id.to_string(), full)
}

#[test]
fn a_stored_synthesis_run_is_read_back_scored_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, learn_id, synth_id, v0_mask) = stored_runs(dir.path());
    let src: &mut dyn RunSource = &mut store;
    let p = prepare(src, &synth_id, &BTreeMap::new()).unwrap();
    assert_eq!(
        p.learned.as_ref().map(ToString::to_string),
        Some(learn_id.clone())
    );
    // Class words from learn.init.
    assert_eq!(
        p.input.text.as_deref(),
        Some("a photo of cup and spoon at the beach")
    );
    assert_eq!(p.input.references.len(), 2);
    let subj = &p.input.samples[0].subjects;
    assert_eq!(subj[0].region.kind, RegionKind::Mask);
    assert_eq!(subj[0].region.pixels.as_ref().unwrap(), &v0_mask);
    assert_eq!(
        subj[1].region.kind,
        RegionKind::Box,
        "a mask equal to its box"
    );
    // --class overrides, and a placeholder without a word is dropped.
    let mut classes = BTreeMap::new();
    classes.insert("<v1>".to_string(), "saucer".to_string());
    let p2 = prepare(&mut store, &synth_id, &classes).unwrap();
    assert_eq!(
        p2.input.text.as_deref(),
        Some("a photo of cup and saucer at the beach")
    );

    let s = evaluate(&p.input, &HandEncoders, CropMode::Crop).unwrap();
    assert!(close(s.samples[0].subjects[0].sim_d, 9.0 / 85f64.sqrt()));
    let id = store.resolve(&synth_id).unwrap();
    let mut metrics = s.metrics();
    metrics.push(("eval/setup".into(), 7.0));
    // Invalid scores change nothing: NaN, a name outside eval/, a duplicate, a learning run
    // that is not done, an empty list.
    let before = store.metrics(&id).unwrap();
    let logs = store.logs(&id).unwrap().len();
    for bad in [
        vec![("eval/sim_c".to_string(), f64::NAN)],
        vec![("loss/total".to_string(), 1.0)],
        vec![("eval/cs".to_string(), 1.0), ("eval/cs".to_string(), 2.0)],
        vec![],
    ] {
        assert!(store.record_scores(&id, "eval/", &bad, "x").is_err());
    }
    assert_eq!(store.metrics(&id).unwrap(), before);
    assert_eq!(store.logs(&id).unwrap().len(), logs);
    store
        .record_scores(&id, "eval/", &metrics, "eval: test")
        .unwrap();
    let stored = store.metrics(&id).unwrap();
    assert_eq!(stored["eval/sim_c"], vec![(0, s.sim_c.unwrap())]);
    assert_eq!(stored["eval/setup"], vec![(0, 7.0)]);
    let rec = store.get_run(&id).unwrap();
    assert_eq!(rec.summary["eval/cs"].last, s.cs.unwrap());
    assert_eq!(store.logs(&id).unwrap().last().unwrap(), "eval: test");
    // Scoring again replaces every eval/ series (a series missing from the new set goes).
    store
        .record_scores(&id, "eval/", &[("eval/sim_c".into(), 0.5)], "again")
        .unwrap();
    let stored = store.metrics(&id).unwrap();
    assert_eq!(stored["eval/sim_c"], vec![(0, 0.5)]);
    assert!(!stored.contains_key("eval/cs"));
    assert!(!store.get_run(&id).unwrap().summary.contains_key("eval/cs"));
    assert!(stored.contains_key("leak/<v0>") == before.contains_key("leak/<v0>"));
    // The store checks clean afterwards.
    let report = store.check().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
