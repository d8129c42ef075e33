//! Mask refinement on synthetic maps: the refined masks follow the self-attention clusters and
//! the cross-attention, not the boxes (an object smaller than its box gets a smaller mask, one
//! that spills over its box edge keeps the spill-over cluster).

use mifo::synth::boxes::box_mask;
use mifo::synth::cluster::{refine, KMeansOptions, RefineInput};

const H: usize = 8;
const N: usize = H * H;

fn rect_pixels(x0: usize, y0: usize, x1: usize, y1: usize) -> Vec<bool> {
    (0..N)
        .map(|p| {
            let (y, x) = (p / H, p % H);
            (y0..y1).contains(&y) && (x0..x1).contains(&x)
        })
        .collect()
}

/// A self-attention map where pixels attend uniformly within their segment.
fn self_map(segments: &[Vec<bool>]) -> Vec<f32> {
    let seg_of = |p: usize| segments.iter().position(|s| s[p]).unwrap_or(segments.len());
    let mut m = vec![0f32; N * N];
    for q in 0..N {
        let members: Vec<usize> = (0..N).filter(|&k| seg_of(k) == seg_of(q)).collect();
        for &k in &members {
            m[q * N + k] = 1.0 / members.len() as f32;
        }
    }
    m
}

fn opts() -> KMeansOptions {
    KMeansOptions {
        k: 0,
        restarts: 20,
        max_iters: 100,
        tol: 1e-6,
        seed: 123,
    }
}

#[test]
fn refined_masks_follow_objects_not_boxes() {
    // Object A: a 2×2 blob inside box A (the left half of the lower half); object B spans
    // columns 4..8 of rows 3..8, i.e. one row above its box (rows 4..8).
    let obj_a = rect_pixels(1, 5, 3, 7);
    let obj_b = rect_pixels(4, 3, 8, 8);
    let box_a = box_mask(&[0.0, 0.5, 0.5, 1.0], H, H);
    let box_b = box_mask(&[0.5, 0.5, 1.0, 1.0], H, H);
    let sa = self_map(&[obj_a.clone(), obj_b.clone()]);
    // Cross-attention of the leading tokens: high on the object, low elsewhere.
    let mut ca = vec![0f32; N * 2];
    for p in 0..N {
        ca[p * 2] = if obj_a[p] { 1.0 } else { 0.02 };
        ca[p * 2 + 1] = if obj_b[p] { 1.0 } else { 0.02 };
    }
    let existing = vec![box_a.clone(), box_b.clone()];
    let input = RefineInput {
        self_map: &sa,
        cross_map: &ca,
        existing: &existing,
        boxes: &existing,
        clusters_per_subject: 3,
        ca_threshold: 0.2,
        cluster_threshold: 0.2,
        sigmoid_scale: 10.0,
    };
    let out = refine(&input, &opts(), None);
    assert!(out.fallbacks.is_empty());
    assert_eq!(
        out.masks[0], obj_a,
        "subject A's mask is its object, smaller than its box"
    );
    // Object B's pixels inside its box score high; the cluster is the whole object, so the mask
    // keeps the row above the box as well.
    assert_eq!(out.masks[1], obj_b, "subject B's mask is its whole object");
    assert_ne!(out.masks[1], box_b);

    // A second refinement from the previous centres gives the same masks.
    let existing2 = out.masks.clone();
    let input2 = RefineInput {
        existing: &existing2,
        ..input
    };
    let again = refine(&input2, &opts(), Some(&out.fit.centres));
    assert_eq!(again.masks, out.masks);
}

#[test]
fn empty_mask_falls_back_to_the_box() {
    // Subject B's cross-attention is flat (no evidence anywhere): after the sigmoid and the
    // min-max normalisation its soft mask is 0, so it wins no cluster and falls back to its box.
    let obj_a = rect_pixels(0, 4, 4, 8);
    let box_a = box_mask(&[0.0, 0.5, 0.5, 1.0], H, H);
    let box_b = box_mask(&[0.5, 0.5, 1.0, 1.0], H, H);
    let sa = self_map(std::slice::from_ref(&obj_a));
    let mut ca = vec![0f32; N * 2];
    for p in 0..N {
        ca[p * 2] = if obj_a[p] { 1.0 } else { 0.0 };
        ca[p * 2 + 1] = 0.3;
    }
    let existing = vec![box_a, box_b.clone()];
    let input = RefineInput {
        self_map: &sa,
        cross_map: &ca,
        existing: &existing,
        boxes: &existing,
        clusters_per_subject: 2,
        ca_threshold: 0.2,
        cluster_threshold: 0.2,
        sigmoid_scale: 10.0,
    };
    let out = refine(&input, &opts(), None);
    assert_eq!(out.fallbacks, vec![1]);
    assert_eq!(out.masks[1], box_b);
    assert_eq!(out.masks[0], obj_a);
}
