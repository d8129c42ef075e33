//! Mask refinement (notes §4.6, Bounded Attention's cluster masks): K-means over the rows of the
//! running-mean self-attention map, then each cluster goes to the subject whose soft
//! cross-attention mask covers it best.
//!
//! Everything here works on small host vectors (SD: 256 pixels × 256 features), so it is plain
//! deterministic Rust with a seeded RNG.

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;

/// Normalisation epsilon of the maps (Bounded Attention's `EPSILON`).
pub const MAP_EPS: f64 = 1e-5;

/// The outcome of one K-means fit.
#[derive(Clone, Debug, PartialEq)]
pub struct KMeansFit {
    /// Cluster index per point.
    pub labels: Vec<usize>,
    /// Centres, `k × dim` row-major.
    pub centres: Vec<f32>,
    /// Sum of squared distances of the points to their centres.
    pub inertia: f64,
}

/// K-means options.
#[derive(Clone, Debug, PartialEq)]
pub struct KMeansOptions {
    /// Number of clusters.
    pub k: usize,
    /// Random restarts (the best inertia wins); ignored when `init` is given.
    pub restarts: usize,
    /// Most Lloyd iterations per run.
    pub max_iters: usize,
    /// Stop when the summed squared centre shift is below this.
    pub tol: f64,
    /// Seed of the random initialisation (k distinct points as centres).
    pub seed: u64,
}

fn dist2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x - *y) as f64;
            d * d
        })
        .sum()
}

/// Assigns each point to its nearest centre (lowest index on ties); returns the inertia.
fn assign(points: &[f32], dim: usize, centres: &[f32], labels: &mut [usize]) -> f64 {
    let k = centres.len() / dim;
    let mut inertia = 0.0;
    for (p, label) in points.chunks(dim).zip(labels.iter_mut()) {
        let mut best = (f64::INFINITY, 0);
        for c in 0..k {
            let d = dist2(p, &centres[c * dim..(c + 1) * dim]);
            if d < best.0 {
                best = (d, c);
            }
        }
        *label = best.1;
        inertia += best.0;
    }
    inertia
}

/// Lloyd iterations from `centres`; an empty cluster keeps its previous centre.
fn lloyd(points: &[f32], dim: usize, mut centres: Vec<f32>, opts: &KMeansOptions) -> KMeansFit {
    let n = points.len() / dim;
    let k = centres.len() / dim;
    let mut labels = vec![0usize; n];
    for _ in 0..opts.max_iters.max(1) {
        assign(points, dim, &centres, &mut labels);
        let mut sums = vec![0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (p, &l) in points.chunks(dim).zip(&labels) {
            counts[l] += 1;
            for (s, v) in sums[l * dim..(l + 1) * dim].iter_mut().zip(p) {
                *s += *v as f64;
            }
        }
        let mut shift = 0.0;
        for c in 0..k {
            if counts[c] == 0 {
                continue;
            }
            for j in 0..dim {
                let new = (sums[c * dim + j] / counts[c] as f64) as f32;
                let d = (new - centres[c * dim + j]) as f64;
                shift += d * d;
                centres[c * dim + j] = new;
            }
        }
        if shift < opts.tol {
            break;
        }
    }
    let inertia = assign(points, dim, &centres, &mut labels);
    KMeansFit {
        labels,
        centres,
        inertia,
    }
}

/// K-means (Euclidean) of `points` (`n × dim` row-major). With `init` (previous centres,
/// `k × dim`) one run starts from them; otherwise `opts.restarts` runs start from `k` distinct
/// random points drawn with a `StdRng` seeded by `opts.seed`, and the lowest inertia wins.
/// `k` is capped at the number of points.
pub fn kmeans(points: &[f32], dim: usize, opts: &KMeansOptions, init: Option<&[f32]>) -> KMeansFit {
    let n = points.len() / dim.max(1);
    let k = opts.k.min(n).max(1);
    if let Some(c) = init {
        if c.len() == k * dim {
            return lloyd(points, dim, c.to_vec(), opts);
        }
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut best: Option<KMeansFit> = None;
    for _ in 0..opts.restarts.max(1) {
        let idx = sample(&mut rng, n, k);
        let mut centres = Vec::with_capacity(k * dim);
        for i in idx.iter() {
            centres.extend_from_slice(&points[i * dim..(i + 1) * dim]);
        }
        let fit = lloyd(points, dim, centres, opts);
        if best.as_ref().is_none_or(|b| fit.inertia < b.inertia) {
            best = Some(fit);
        }
    }
    best.expect("at least one restart")
}

/// Inputs of one refinement, all at the cluster resolution `n = h·w`.
pub struct RefineInput<'a> {
    /// Running-mean self-attention map, head-mean, `n × n` (query-major).
    pub self_map: &'a [f32],
    /// Running-mean cross-attention of each subject's leading token, `n × subjects`.
    pub cross_map: &'a [f32],
    /// Each subject's current region: its previous refined mask, or its box the first time.
    pub existing: &'a [Vec<bool>],
    /// Each subject's box at this resolution (fallback for empty masks).
    pub boxes: &'a [Vec<bool>],
    /// Clusters per subject.
    pub clusters_per_subject: usize,
    /// σ_noun: soft-mask threshold.
    pub ca_threshold: f64,
    /// σ_cluster: clusters scoring below this become background.
    pub cluster_threshold: f64,
    /// Sigmoid slope of the soft masks.
    pub sigmoid_scale: f64,
}

impl<'a> RefineInput<'a> {
    /// The inputs of one refinement with the clustering keys of `cfg` (`clusters_per_subject`,
    /// `ca_threshold`, `cluster_threshold`, `sigmoid_scale`).
    pub fn new(
        cfg: &crate::synth::SynthConfig,
        self_map: &'a [f32],
        cross_map: &'a [f32],
        existing: &'a [Vec<bool>],
        boxes: &'a [Vec<bool>],
    ) -> Self {
        Self {
            self_map,
            cross_map,
            existing,
            boxes,
            clusters_per_subject: cfg.clusters_per_subject,
            ca_threshold: cfg.ca_threshold,
            cluster_threshold: cfg.cluster_threshold,
            sigmoid_scale: cfg.sigmoid_scale,
        }
    }
}

/// The outcome of one refinement.
#[derive(Clone, Debug)]
pub struct Refined {
    /// Per subject, the refined mask (`n` booleans).
    pub masks: Vec<Vec<bool>>,
    /// The K-means fit (its centres seed the next refinement).
    pub fit: KMeansFit,
    /// Subjects whose mask came out empty and fell back to their box.
    pub fallbacks: Vec<usize>,
}

/// Each subject's soft cross-attention mask: the map divided by its max over pixels,
/// `sigmoid(scale·(x − threshold))`, min-max normalised, times the existing region.
pub fn soft_cross_masks(input: &RefineInput) -> Vec<Vec<f64>> {
    let s = input.existing.len();
    let n = input.cross_map.len() / s.max(1);
    (0..s)
        .map(|j| {
            let col: Vec<f64> = (0..n).map(|p| input.cross_map[p * s + j] as f64).collect();
            let max = col.iter().cloned().fold(0.0, f64::max);
            let sig: Vec<f64> = col
                .iter()
                .map(|v| {
                    let x = v / (max + MAP_EPS);
                    1.0 / (1.0 + (-input.sigmoid_scale * (x - input.ca_threshold)).exp())
                })
                .collect();
            let lo = sig.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = sig.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            sig.iter()
                .zip(&input.existing[j])
                .map(|(v, &inside)| {
                    if inside {
                        (v - lo) / (hi - lo + MAP_EPS)
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

/// Self-attention features for clustering: each key column divided by its max over queries.
pub fn self_features(self_map: &[f32], n: usize) -> Vec<f32> {
    let mut colmax = vec![0f32; n];
    for row in self_map.chunks(n) {
        for (m, v) in colmax.iter_mut().zip(row) {
            *m = m.max(*v);
        }
    }
    self_map
        .chunks(n)
        .flat_map(|row| {
            row.iter()
                .zip(&colmax)
                .map(|(v, m)| (*v as f64 / (*m as f64 + MAP_EPS)) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Assigns clusters to subjects: score(s, c) = Σ_{p∈c} soft_s(p) / min(Σ_p soft_s(p), |c|);
/// each cluster goes to its best subject (lowest index on ties), and clusters scoring below
/// `threshold` go to the background.
pub fn assign_clusters(
    labels: &[usize],
    k: usize,
    soft: &[Vec<f64>],
    threshold: f64,
) -> Vec<Vec<bool>> {
    let n = labels.len();
    let s = soft.len();
    let mut size = vec![0usize; k];
    for &l in labels {
        size[l] += 1;
    }
    let area: Vec<f64> = soft.iter().map(|m| m.iter().sum()).collect();
    let mut owner: Vec<Option<usize>> = vec![None; k];
    for c in 0..k {
        let mut best: Option<(f64, usize)> = None;
        for j in 0..s {
            let inter: f64 = (0..n).filter(|&p| labels[p] == c).map(|p| soft[j][p]).sum();
            let denom = area[j].min(size[c] as f64);
            let score = if denom > 0.0 { inter / denom } else { 0.0 };
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, j));
            }
        }
        owner[c] = best.and_then(|(score, j)| (score >= threshold).then_some(j));
    }
    (0..s)
        .map(|j| labels.iter().map(|&l| owner[l] == Some(j)).collect())
        .collect()
}

/// Replaces each empty subject mask by its box, and removes that box from the other subjects'
/// masks (in subject order). Returns the subjects that fell back.
pub fn fix_empty_masks(masks: &mut [Vec<bool>], boxes: &[Vec<bool>]) -> Vec<usize> {
    let mut fell_back = Vec::new();
    for j in 0..masks.len() {
        if masks[j].iter().any(|v| *v) {
            continue;
        }
        fell_back.push(j);
        for (i, m) in masks.iter_mut().enumerate() {
            if i == j {
                m.clone_from(&boxes[j]);
            } else {
                for (v, b) in m.iter_mut().zip(&boxes[j]) {
                    *v = *v && !*b;
                }
            }
        }
    }
    fell_back
}

/// One refinement: features → K-means (`k = clusters_per_subject · subjects`, from
/// `previous_centres` when given) → soft CA masks → assignment → empty-mask fallback.
pub fn refine(
    input: &RefineInput,
    opts: &KMeansOptions,
    previous_centres: Option<&[f32]>,
) -> Refined {
    let s = input.existing.len();
    let n = input.existing.first().map_or(0, Vec::len);
    let feats = self_features(input.self_map, n);
    let opts = KMeansOptions {
        k: input.clusters_per_subject * s,
        ..opts.clone()
    };
    let fit = kmeans(&feats, n, &opts, previous_centres);
    let k = fit.centres.len() / n.max(1);
    let soft = soft_cross_masks(input);
    let mut masks = assign_clusters(&fit.labels, k, &soft, input.cluster_threshold);
    let fallbacks = fix_empty_masks(&mut masks, input.boxes);
    Refined {
        masks,
        fit,
        fallbacks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(k: usize) -> KMeansOptions {
        KMeansOptions {
            k,
            restarts: 10,
            max_iters: 100,
            tol: 1e-8,
            seed: 123,
        }
    }

    /// Three well separated blobs in 2-D are recovered exactly (as a partition), and the fit is
    /// reproducible from the seed.
    #[test]
    fn kmeans_toy_blobs() {
        let centres = [(0.0f32, 0.0f32), (10.0, 0.0), (0.0, 10.0)];
        let offsets = [(0.1, 0.2), (-0.2, 0.1), (0.0, -0.3), (0.3, 0.0)];
        let mut pts = Vec::new();
        let mut truth = Vec::new();
        for (c, (cx, cy)) in centres.iter().enumerate() {
            for (dx, dy) in offsets {
                pts.extend([cx + dx, cy + dy]);
                truth.push(c);
            }
        }
        let fit = kmeans(&pts, 2, &opts(3), None);
        for i in 0..truth.len() {
            for j in 0..truth.len() {
                assert_eq!(
                    truth[i] == truth[j],
                    fit.labels[i] == fit.labels[j],
                    "{i} {j}"
                );
            }
        }
        // Exact inertia: per blob Σ|offset − mean|², mean offset (0.05, 0.0).
        let per_blob: f64 = offsets
            .iter()
            .map(|(dx, dy)| (*dx as f64 - 0.05).powi(2) + (*dy as f64).powi(2))
            .sum();
        assert!(
            (fit.inertia - 3.0 * per_blob).abs() < 1e-4,
            "{}",
            fit.inertia
        );
        assert_eq!(fit, kmeans(&pts, 2, &opts(3), None));
        // Starting from the fitted centres converges immediately to the same partition.
        let again = kmeans(&pts, 2, &opts(3), Some(&fit.centres));
        assert_eq!(again.labels, fit.labels);
    }

    #[test]
    fn assignment_and_fallback() {
        // 4 pixels, 2 clusters {0,1} and {2,3}; subject 0 covers pixels 0-1, subject 1 nothing.
        let labels = vec![0, 0, 1, 1];
        let soft = vec![vec![1.0, 0.8, 0.05, 0.0], vec![0.0; 4]];
        let mut masks = assign_clusters(&labels, 2, &soft, 0.2);
        assert_eq!(masks[0], vec![true, true, false, false]);
        assert_eq!(masks[1], vec![false; 4]);
        // Subject 1 is empty → its box, carved out of subject 0.
        let boxes = vec![
            vec![true, true, false, false],
            vec![false, true, true, false],
        ];
        let fb = fix_empty_masks(&mut masks, &boxes);
        assert_eq!(fb, vec![1]);
        assert_eq!(masks[1], vec![false, true, true, false]);
        assert_eq!(masks[0], vec![true, false, false, false]);
    }
}
