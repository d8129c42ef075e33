//! Recomposition (`learn.recompose_p`, not in the paper or the released code): a training image
//! made for one step from the step's instances alone, each cut out by its mask and put down at
//! a random place on a plain background of the scene's own background colour.
//!
//! Why: with one learning image every step shows every instance where it stood. A token is
//! then free to carry the scene's layout (where its instance stood, and that there were two
//! objects): the masked reconstruction loss leaves the other instance's pixels unscored, so
//! nothing tells the token that they are not its own. Drawing the step's instances Λ alone,
//! at new places, takes both away. The same idea (cut-out subjects pasted at random places)
//! is MuDI's Seg-Mix (Jang et al. 2024); here it is one image per step, the instances of Λ
//! only, kept at their size.
//!
//! Everything is drawn from the step's RNG, so a resumed run recomposes as the uninterrupted
//! one did.

use rand::rngs::StdRng;
use rand::Rng;

/// Placements tried per instance before one that overlaps an earlier instance is accepted.
const PLACEMENT_TRIES: usize = 20;

/// A scene held on the host for recomposition: the image [3, H, W] (any value range) and the
/// instance masks [N, H, W] in [0, 1], row-major, with its background colour.
#[derive(Clone, Debug)]
pub struct HostScene {
    height: usize,
    width: usize,
    image: Vec<f32>,
    masks: Vec<Vec<f32>>,
    background: [f32; 3],
}

/// A recomposed image and its masks (zero for the instances left out), in [`HostScene`]'s
/// layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Recomposed {
    /// The image [3, H, W].
    pub image: Vec<f32>,
    /// One mask [H, W] per instance of the scene.
    pub masks: Vec<Vec<f32>>,
    /// Where each instance of the subset was put: the top-left corner of its mask's box.
    pub placed: Vec<(usize, usize)>,
}

/// A mask's box: the rows and columns holding a value above 0.5, `[y0, y1) × [x0, x1)`.
fn mask_box(mask: &[f32], height: usize, width: usize) -> Option<(usize, usize, usize, usize)> {
    let (mut y0, mut y1, mut x0, mut x1) = (height, 0, width, 0);
    for y in 0..height {
        for x in 0..width {
            if mask[y * width + x] > 0.5 {
                y0 = y0.min(y);
                y1 = y1.max(y + 1);
                x0 = x0.min(x);
                x1 = x1.max(x + 1);
            }
        }
    }
    (y0 < y1).then_some((y0, y1, x0, x1))
}

/// Each channel's mean over the `n` pixels of `image` that no mask covers (above 0.5), or over
/// all of them when the masks cover the image.
fn background_of(n: usize, image: &[f32], masks: &[Vec<f32>]) -> [f32; 3] {
    let free: Vec<usize> = (0..n)
        .filter(|&p| masks.iter().all(|m| m[p] <= 0.5))
        .collect();
    let pixels: Vec<usize> = if free.is_empty() {
        (0..n).collect()
    } else {
        free
    };
    let mut colour = [0f32; 3];
    for (c, v) in colour.iter_mut().enumerate() {
        let sum: f64 = pixels.iter().map(|&p| f64::from(image[c * n + p])).sum();
        *v = (sum / pixels.len() as f64) as f32;
    }
    colour
}

impl HostScene {
    /// A `height` × `width` scene: `image` channel-major [3, H, W], `masks` one [H, W] per
    /// instance. Its background colour is measured once, here.
    pub fn new(height: usize, width: usize, image: Vec<f32>, masks: Vec<Vec<f32>>) -> Self {
        let background = background_of(height * width, &image, &masks);
        Self {
            height,
            width,
            image,
            masks,
            background,
        }
    }

    /// The background colour: each channel's mean over the pixels no mask covers (above 0.5),
    /// or over the whole image when the masks cover it all.
    pub fn background(&self) -> [f32; 3] {
        self.background
    }

    /// The instances of `subset`, in its order, each cut out by its (soft) mask and put down
    /// with its box at a uniformly drawn place inside the image, on the background colour; a
    /// place whose box overlaps an earlier instance's is drawn again, up to
    /// [`PLACEMENT_TRIES`] times, after which the last draw stands and the later instance
    /// covers the earlier one (whose mask loses the covered pixels). An instance with an empty
    /// mask is left out.
    pub fn recompose(&self, subset: &[usize], rng: &mut StdRng) -> Recomposed {
        let (h, w) = (self.height, self.width);
        let n = h * w;
        let bg = self.background;
        let mut image: Vec<f32> = (0..3 * n).map(|i| bg[i / n]).collect();
        let mut masks = vec![vec![0f32; n]; self.masks.len()];
        let mut boxes: Vec<(usize, usize, usize, usize)> = Vec::new();
        let mut placed = Vec::with_capacity(subset.len());
        for &j in subset {
            let src = &self.masks[j];
            let Some((y0, y1, x0, x1)) = mask_box(src, h, w) else {
                continue;
            };
            let (bh, bw) = (y1 - y0, x1 - x0);
            let mut at = (0, 0);
            for _ in 0..PLACEMENT_TRIES {
                at = (rng.random_range(0..=h - bh), rng.random_range(0..=w - bw));
                let (ty, tx) = at;
                let clear = boxes.iter().all(|&(by0, by1, bx0, bx1)| {
                    ty + bh <= by0 || by1 <= ty || tx + bw <= bx0 || bx1 <= tx
                });
                if clear {
                    break;
                }
            }
            let (ty, tx) = at;
            for dy in 0..bh {
                for dx in 0..bw {
                    let from = (y0 + dy) * w + x0 + dx;
                    let to = (ty + dy) * w + tx + dx;
                    let m = src[from];
                    if m <= 0.0 {
                        continue;
                    }
                    for c in 0..3 {
                        let px = &mut image[c * n + to];
                        *px = m * self.image[c * n + from] + (1.0 - m) * *px;
                    }
                    for (k, mask) in masks.iter_mut().enumerate() {
                        mask[to] = if k == j { m } else { mask[to] * (1.0 - m) };
                    }
                }
            }
            boxes.push((ty, ty + bh, tx, tx + bw));
            placed.push(at);
        }
        Recomposed {
            image,
            masks,
            placed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A 3-channel 16×16 scene on a (0.9, 0.8, 0.7) background with a 4×3 block of colour
    /// (0.1, 0.2, 0.3) at rows 2..6, cols 3..6 (instance 0) and a 2×5 block of (0.5, 0.6, 0.0)
    /// at rows 10..12, cols 8..13 (instance 1).
    fn scene() -> HostScene {
        let (h, w) = (16, 16);
        let n = h * w;
        let mut image = vec![0f32; 3 * n];
        let mut masks = vec![vec![0f32; n]; 2];
        for y in 0..h {
            for x in 0..w {
                let p = y * w + x;
                let (c, k) = if (2..6).contains(&y) && (3..6).contains(&x) {
                    ([0.1, 0.2, 0.3], Some(0))
                } else if (10..12).contains(&y) && (8..13).contains(&x) {
                    ([0.5, 0.6, 0.0], Some(1))
                } else {
                    ([0.9, 0.8, 0.7], None)
                };
                for ch in 0..3 {
                    image[ch * n + p] = c[ch];
                }
                if let Some(k) = k {
                    masks[k][p] = 1.0;
                }
            }
        }
        HostScene::new(h, w, image, masks)
    }

    fn pixel(img: &[f32], n: usize, p: usize) -> [f32; 3] {
        [img[p], img[n + p], img[2 * n + p]]
    }

    #[test]
    fn background_is_the_mean_of_the_uncovered_pixels() {
        assert_eq!(scene().background(), [0.9, 0.8, 0.7]);
    }

    #[test]
    fn each_instance_keeps_its_pixels_and_size_and_the_others_are_gone() {
        let s = scene();
        let n = 256;
        for seed in 0..50 {
            let mut rng = StdRng::seed_from_u64(seed);
            let r = s.recompose(&[1], &mut rng);
            // Instance 0 is left out: no mask, none of its colour.
            assert!(r.masks[0].iter().all(|&v| v == 0.0));
            assert!((0..n).all(|p| pixel(&r.image, n, p) != [0.1, 0.2, 0.3]));
            // Instance 1: the same 2×5 block, its mask where its colour is, the rest background.
            let (ty, tx) = r.placed[0];
            assert_eq!(r.masks[1].iter().filter(|&&v| v == 1.0).count(), 10);
            for p in 0..n {
                let (y, x) = (p / 16, p % 16);
                let inside = (ty..ty + 2).contains(&y) && (tx..tx + 5).contains(&x);
                assert_eq!(r.masks[1][p], if inside { 1.0 } else { 0.0 });
                let want = if inside {
                    [0.5, 0.6, 0.0]
                } else {
                    [0.9, 0.8, 0.7]
                };
                assert_eq!(pixel(&r.image, n, p), want, "seed {seed} pixel {p}");
            }
        }
    }

    #[test]
    fn places_are_spread_over_the_image_and_do_not_overlap_when_there_is_room() {
        let s = scene();
        let mut corners = std::collections::HashSet::new();
        for seed in 0..200 {
            let mut rng = StdRng::seed_from_u64(seed);
            let r = s.recompose(&[0, 1], &mut rng);
            assert_eq!(r.placed.len(), 2);
            let both = (0..256)
                .filter(|&p| r.masks[0][p] > 0.0 && r.masks[1][p] > 0.0)
                .count();
            assert_eq!(both, 0);
            assert_eq!(r.masks[0].iter().filter(|&&v| v == 1.0).count(), 12);
            assert_eq!(r.masks[1].iter().filter(|&&v| v == 1.0).count(), 10);
            corners.insert(r.placed[0]);
        }
        // 13 × 14 possible corners for instance 0; 200 draws reach far more than a handful,
        // and not only where it stood (2, 3).
        assert!(corners.len() > 80, "{} distinct places", corners.len());
    }

    #[test]
    fn the_same_rng_recomposes_the_same_image() {
        let s = scene();
        let a = s.recompose(&[1, 0], &mut StdRng::seed_from_u64(7));
        let b = s.recompose(&[1, 0], &mut StdRng::seed_from_u64(7));
        assert_eq!(a, b);
    }
}
