//! The oracle: reads the world's attributes back from pixels and scores a generated image against
//! the instances that were learned.
//!
//! **Pixels.** A pixel is *background* when it lies within [`BACKGROUND_RADIUS`] (RGB distance)
//! of the world's background, else it is *foreground*; a foreground pixel takes the palette colour
//! nearest to it when that one lies within [`COLOUR_RADIUS`], else it is *other* (a blend).
//!
//! **Objects.** An object is a 4-connected component of pixels of one palette colour with at
//! least [`MIN_OBJECT_FRACTION`] of the image. Its shape is the one whose template, drawn into
//! the component's bounding box by the same rule the world draws with, overlaps it best (IoU).
//!
//! **Per boxed subject `<vK>`** (the instance learned as `<vK>` has colour `c` and shape `s`):
//! * `present`: the foreground pixels inside the box cover at least [`MIN_PRESENT_FRACTION`] of it.
//! * `colour`, `shape`: the object with most pixels inside the box has colour `c` / shape `s`;
//!   `identity`: both (0 when nothing is present).
//! * `leak`: the share of the box's foreground pixels that carry another instance's attribute.
//!   Against an instance of another colour `c'`, a pixel `p` counts by how far it sits from `c`
//!   towards `c'` on the segment between them, `t = clamp((p−c)·(c'−c)/|c'−c|², 0, 1)`, when it
//!   lies within [`COLOUR_RADIUS`] of that segment (a pure `c'` pixel counts 1, a half blend ½;
//!   shares within [`BLEND_DEAD_ZONE`] of 0 or 1 are rounded there, as pixel noise);
//!   against an instance of the same colour but another shape (their only difference), the
//!   whole box counts 1 when the object in it has that other shape. The largest over the other
//!   instances is the leak.
//! * `outside`: of all pixels of objects that have `<vK>`'s colour and shape, the share outside
//!   `<vK>`'s box (the instance drawn where it was not asked for; 0 when none is drawn).
//! * `elsewhere`: the part of `outside` in objects with no pixel in the box — the instance drawn
//!   at another place (a second copy, or the object away from its box) rather than its object
//!   spilling over the box's edge. `outside − elsewhere` is that spill, which on a model with
//!   8×8 latents is set by how precisely a box can place an object (a latent cell is 8 px).

use image::RgbImage;

use super::scene::{Colour, Shape, BACKGROUND, COLOURS, SHAPES};

/// RGB distance within which a pixel is background.
pub const BACKGROUND_RADIUS: f32 = 50.0;
/// RGB distance within which a pixel takes a palette colour (and within which a blend lies on
/// the segment between two colours).
pub const COLOUR_RADIUS: f32 = 110.0;
/// Blend shares within this distance of 0 or 1 count as 0 or 1: pixel noise (the world's own,
/// a decoder's) moves a pure colour a few hundredths along the segment to another.
pub const BLEND_DEAD_ZONE: f32 = 0.1;
/// Smallest object, as a fraction of the image's pixels (26 px at 64×64).
pub const MIN_OBJECT_FRACTION: f32 = 0.0064;
/// Smallest share of a box that its foreground must cover for the subject to be present.
pub const MIN_PRESENT_FRACTION: f32 = 0.15;

/// What one pixel shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelClass {
    /// The world's background.
    Background,
    /// A palette colour.
    Colour(Colour),
    /// Foreground that is no palette colour (a blend, a smudge).
    Other,
}

fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

fn rgbf(c: [u8; 3]) -> [f32; 3] {
    [c[0] as f32, c[1] as f32, c[2] as f32]
}

/// Classifies one pixel.
pub fn classify(px: [u8; 3]) -> PixelClass {
    let p = rgbf(px);
    if dist(p, rgbf(BACKGROUND)) < BACKGROUND_RADIUS {
        return PixelClass::Background;
    }
    let (best, d) = COLOURS
        .iter()
        .map(|&c| (c, dist(p, rgbf(c.rgb()))))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("palette is not empty");
    if d < COLOUR_RADIUS {
        PixelClass::Colour(best)
    } else {
        PixelClass::Other
    }
}

/// An object read from an image.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadObject {
    /// Its colour.
    pub colour: Colour,
    /// Its shape (best template).
    pub shape: Shape,
    /// Its pixels, as `y * width + x`.
    pub pixels: Vec<usize>,
    /// Its bounding box `[x0, y0, x1, y1)` in pixels.
    pub bbox: [u32; 4],
}

/// A classified image: one class per pixel.
pub struct Reading {
    width: u32,
    height: u32,
    classes: Vec<PixelClass>,
    /// The objects found, largest first.
    pub objects: Vec<ReadObject>,
}

impl Reading {
    /// Classifies every pixel and finds the objects.
    pub fn of(image: &RgbImage) -> Reading {
        let (width, height) = image.dimensions();
        let classes: Vec<PixelClass> = image.pixels().map(|p| classify(p.0)).collect();
        let min_pixels = ((MIN_OBJECT_FRACTION * (width * height) as f32).round() as usize).max(1);
        let mut seen = vec![false; classes.len()];
        let mut objects = Vec::new();
        for start in 0..classes.len() {
            let PixelClass::Colour(colour) = classes[start] else {
                continue;
            };
            if seen[start] {
                continue;
            }
            seen[start] = true;
            let mut stack = vec![start];
            let mut pixels = Vec::new();
            while let Some(i) = stack.pop() {
                pixels.push(i);
                let (x, y) = ((i as u32) % width, (i as u32) / width);
                let mut visit = |nx: u32, ny: u32| {
                    let j = (ny * width + nx) as usize;
                    if !seen[j] && classes[j] == PixelClass::Colour(colour) {
                        seen[j] = true;
                        stack.push(j);
                    }
                };
                if x > 0 {
                    visit(x - 1, y);
                }
                if x + 1 < width {
                    visit(x + 1, y);
                }
                if y > 0 {
                    visit(x, y - 1);
                }
                if y + 1 < height {
                    visit(x, y + 1);
                }
            }
            if pixels.len() >= min_pixels {
                pixels.sort_unstable();
                let bbox = bounding_box(&pixels, width);
                let shape = best_shape(&pixels, bbox, width);
                objects.push(ReadObject {
                    colour,
                    shape,
                    pixels,
                    bbox,
                });
            }
        }
        objects.sort_by_key(|o| std::cmp::Reverse(o.pixels.len()));
        Reading {
            width,
            height,
            classes,
            objects,
        }
    }

    /// The class of pixel `i` (`y * width + x`).
    pub fn class(&self, i: usize) -> PixelClass {
        self.classes[i]
    }

    /// Image size `(width, height)`.
    pub fn dimensions(&self) -> (u32, u32) {
        (self.width, self.height)
    }
}

fn bounding_box(pixels: &[usize], width: u32) -> [u32; 4] {
    let mut b = [u32::MAX, u32::MAX, 0, 0];
    for &i in pixels {
        let (x, y) = ((i as u32) % width, (i as u32) / width);
        b[0] = b[0].min(x);
        b[1] = b[1].min(y);
        b[2] = b[2].max(x + 1);
        b[3] = b[3].max(y + 1);
    }
    b
}

/// The shape whose template over `bbox` has the highest IoU with `pixels` (sorted).
fn best_shape(pixels: &[usize], bbox: [u32; 4], width: u32) -> Shape {
    let (bw, bh) = ((bbox[2] - bbox[0]) as f32, (bbox[3] - bbox[1]) as f32);
    let mut best = (Shape::Square, -1.0f32);
    for &shape in &SHAPES {
        let (mut inter, mut template) = (0usize, 0usize);
        for y in bbox[1]..bbox[3] {
            for x in bbox[0]..bbox[2] {
                let u = (x - bbox[0]) as f32 + 0.5;
                let v = (y - bbox[1]) as f32 + 0.5;
                if shape.contains(u / bw, v / bh) {
                    template += 1;
                    if pixels.binary_search(&((y * width + x) as usize)).is_ok() {
                        inter += 1;
                    }
                }
            }
        }
        let union = template + pixels.len() - inter;
        let iou = inter as f32 / union.max(1) as f32;
        if iou > best.1 {
            best = (shape, iou);
        }
    }
    best.0
}

/// The oracle's verdict on one boxed subject in one image.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct SubjectVerdict {
    /// Something is drawn in the box.
    pub present: bool,
    /// The object in the box has the instance's colour.
    pub colour: bool,
    /// The object in the box has the instance's shape.
    pub shape: bool,
    /// Share of the box's foreground carrying another instance's attribute (0–1).
    pub leak: f64,
    /// Share of the instance's pixels drawn outside its box (0–1).
    pub outside: f64,
    /// Share of the instance's pixels in objects that do not reach into its box (0–1, at most
    /// `outside`).
    pub elsewhere: f64,
}

impl SubjectVerdict {
    /// Colour and shape both right (and present).
    pub fn identity(&self) -> bool {
        self.present && self.colour && self.shape
    }
}

/// Leak of one pixel from colour `own` towards colour `other`.
fn blend_towards(p: [f32; 3], own: [f32; 3], other: [f32; 3]) -> f32 {
    let d = [other[0] - own[0], other[1] - own[1], other[2] - own[2]];
    let len2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
    let t = (((p[0] - own[0]) * d[0] + (p[1] - own[1]) * d[1] + (p[2] - own[2]) * d[2]) / len2)
        .clamp(0.0, 1.0);
    let on_segment = [own[0] + t * d[0], own[1] + t * d[1], own[2] + t * d[2]];
    if dist(p, on_segment) >= COLOUR_RADIUS || t < BLEND_DEAD_ZONE {
        0.0
    } else if t > 1.0 - BLEND_DEAD_ZONE {
        1.0
    } else {
        t
    }
}

/// Scores subject `instance` (one of `instances`, the learned objects' shapes and colours) in
/// the region `box_mask` (`y * width + x`, true inside the box) of `image`.
pub fn judge(
    image: &RgbImage,
    reading: &Reading,
    instances: &[(Shape, Colour)],
    instance: usize,
    box_mask: &[bool],
) -> SubjectVerdict {
    let (my_shape, my_colour) = instances[instance];
    let (w, h) = reading.dimensions();
    assert_eq!(
        box_mask.len(),
        (w * h) as usize,
        "box mask matches the image"
    );
    let box_area = box_mask.iter().filter(|&&b| b).count();
    let foreground: Vec<usize> = (0..box_mask.len())
        .filter(|&i| box_mask[i] && reading.class(i) != PixelClass::Background)
        .collect();
    let present = box_area > 0 && foreground.len() as f32 >= MIN_PRESENT_FRACTION * box_area as f32;
    let main = reading
        .objects
        .iter()
        .map(|o| (o, o.pixels.iter().filter(|&&i| box_mask[i]).count()))
        .filter(|(_, n)| *n > 0)
        .max_by_key(|(_, n)| *n)
        .map(|(o, _)| o);
    let colour = present && main.is_some_and(|o| o.colour == my_colour);
    let shape = present && main.is_some_and(|o| o.shape == my_shape);

    let own = rgbf(my_colour.rgb());
    let mut leak = 0.0f64;
    for (j, &(other_shape, other_colour)) in instances.iter().enumerate() {
        if j == instance || (other_colour == my_colour && other_shape == my_shape) {
            continue;
        }
        let l = if other_colour != my_colour {
            if foreground.is_empty() {
                0.0
            } else {
                let to = rgbf(other_colour.rgb());
                let sum: f64 = foreground
                    .iter()
                    .map(|&i| {
                        let (x, y) = (i as u32 % w, i as u32 / w);
                        blend_towards(rgbf(image.get_pixel(x, y).0), own, to) as f64
                    })
                    .sum();
                sum / foreground.len() as f64
            }
        } else if present && main.is_some_and(|o| o.shape == other_shape) {
            1.0
        } else {
            0.0
        };
        leak = leak.max(l);
    }

    let (mut mine, mut out, mut away) = (0usize, 0usize, 0usize);
    for o in reading
        .objects
        .iter()
        .filter(|o| o.colour == my_colour && o.shape == my_shape)
    {
        mine += o.pixels.len();
        let outside_box = o.pixels.iter().filter(|&&i| !box_mask[i]).count();
        out += outside_box;
        if outside_box == o.pixels.len() {
            away += outside_box;
        }
    }
    let share = |n: usize| {
        if mine == 0 {
            0.0
        } else {
            n as f64 / mine as f64
        }
    };
    SubjectVerdict {
        present,
        colour,
        shape,
        leak,
        outside: share(out),
        elsewhere: share(away),
    }
}

/// Mean verdicts of one subject over several images, as the stored `oracle/*` scores.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SubjectScores {
    /// Images judged.
    pub samples: usize,
    /// Share with the subject present.
    pub present: f64,
    /// Share with colour and shape right.
    pub identity: f64,
    /// Share with the colour right.
    pub colour: f64,
    /// Share with the shape right.
    pub shape: f64,
    /// Mean leak.
    pub leak: f64,
    /// Mean outside share.
    pub outside: f64,
    /// Mean share drawn elsewhere (objects not reaching into the box).
    pub elsewhere: f64,
}

impl SubjectScores {
    /// Adds one image's verdict.
    pub fn add(&mut self, v: &SubjectVerdict) {
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        self.samples += 1;
        self.present += b(v.present);
        self.identity += b(v.identity());
        self.colour += b(v.present && v.colour);
        self.shape += b(v.present && v.shape);
        self.leak += v.leak;
        self.outside += v.outside;
        self.elsewhere += v.elsewhere;
    }

    /// The means (sums divided by the number of images).
    pub fn means(&self) -> SubjectScores {
        let n = self.samples.max(1) as f64;
        SubjectScores {
            samples: self.samples,
            present: self.present / n,
            identity: self.identity / n,
            colour: self.colour / n,
            shape: self.shape / n,
            leak: self.leak / n,
            outside: self.outside / n,
            elsewhere: self.elsewhere / n,
        }
    }

    /// `(metric, value)` pairs: `oracle/<what>/<token>` for each measure.
    pub fn metrics(&self, token: &str) -> Vec<(String, f64)> {
        self.named()
            .into_iter()
            .map(|(what, v)| (format!("{}{what}/{token}", super::ORACLE_PREFIX), v))
            .collect()
    }

    /// The measures by name, in report order.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("present", self.present),
            ("identity", self.identity),
            ("colour", self.colour),
            ("shape", self.shape),
            ("leak", self.leak),
            ("outside", self.outside),
            ("elsewhere", self.elsewhere),
        ]
    }
}

/// What a plain prompt asked for, read back: used for the base model's quality table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PromptVerdict {
    /// Every asked object is drawn (each matched by its own object with both attributes).
    pub all_right: bool,
    /// Every asked colour appears on some object.
    pub colours_right: bool,
    /// An object of a colour not asked for is drawn.
    pub extra_colour: bool,
}

/// Judges an image generated from a prompt asking for `asked`.
pub fn judge_prompt(reading: &Reading, asked: &[(Shape, Colour)]) -> PromptVerdict {
    let mut used = vec![false; reading.objects.len()];
    let mut all_right = true;
    for &(shape, colour) in asked {
        match reading
            .objects
            .iter()
            .enumerate()
            .position(|(i, o)| !used[i] && o.shape == shape && o.colour == colour)
        {
            Some(i) => used[i] = true,
            None => all_right = false,
        }
    }
    let colours_right = asked
        .iter()
        .all(|&(_, c)| reading.objects.iter().any(|o| o.colour == c));
    let extra_colour = reading
        .objects
        .iter()
        .any(|o| !asked.iter().any(|&(_, c)| c == o.colour));
    PromptVerdict {
        all_right,
        colours_right,
        extra_colour,
    }
}

/// Stored `oracle/*` scores as text: a line of the means over placeholders, then one per
/// placeholder (`oracle     present 100% identity 75% leak 3.1% outside 0.0%`); empty when there
/// are none.
pub fn score_lines(scores: &std::collections::BTreeMap<String, f64>) -> Vec<String> {
    const SHOWN: [&str; 5] = ["present", "identity", "leak", "outside", "elsewhere"];
    let cells = |suffix: &str| -> Option<String> {
        let parts: Vec<String> = SHOWN
            .iter()
            .filter_map(|m| {
                let v = scores.get(&format!("{}{m}{suffix}", super::ORACLE_PREFIX))?;
                let digits = if ["leak", "outside", "elsewhere"].contains(m) {
                    1
                } else {
                    0
                };
                Some(format!("{m} {:.digits$}%", 100.0 * v))
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join("  "))
    };
    let mut out = Vec::new();
    if let Some(line) = cells("") {
        out.push(format!("oracle     {line}"));
    }
    let tokens: std::collections::BTreeSet<&str> = scores
        .keys()
        .filter_map(|k| k.strip_prefix(super::ORACLE_PREFIX)?.split_once('/'))
        .map(|(_, token)| token)
        .collect();
    for token in tokens {
        if let Some(line) = cells(&format!("/{token}")) {
            out.push(format!("  {token:<8} {line}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::boxes::box_mask;
    use crate::world::scene::{Attribute, SceneSpec, WorldObject};

    fn boxes_of(scene: &crate::world::WorldScene) -> Vec<Vec<bool>> {
        let s = scene.spec.size as usize;
        scene
            .objects
            .iter()
            .map(|o| box_mask(&o.bbox.fractions(scene.spec.size), s, s))
            .collect()
    }

    fn kinds(objects: &[WorldObject]) -> Vec<(Shape, Colour)> {
        objects.iter().map(WorldObject::kind).collect()
    }

    fn verdicts(
        image: &RgbImage,
        objects: &[WorldObject],
        boxes: &[Vec<bool>],
    ) -> Vec<SubjectVerdict> {
        let reading = Reading::of(image);
        (0..objects.len())
            .map(|k| judge(image, &reading, &kinds(objects), k, &boxes[k]))
            .collect()
    }

    #[test]
    fn ground_truth_scores_perfectly() {
        for seed in 0..40 {
            for differ in [None, Some(Attribute::Colour), Some(Attribute::Shape)] {
                let objects = 2 + (seed as usize % 2);
                let scene = SceneSpec {
                    seed,
                    objects,
                    differ,
                    size: 64,
                }
                .draw()
                .unwrap();
                let boxes = boxes_of(&scene);
                for (k, v) in verdicts(&scene.image, &scene.objects, &boxes)
                    .iter()
                    .enumerate()
                {
                    assert!(
                        v.identity(),
                        "seed {seed} {differ:?} <v{k}>: {v:?} {:?}",
                        scene.objects[k]
                    );
                    assert_eq!(v.leak, 0.0, "seed {seed} <v{k}>");
                    assert_eq!(v.outside, 0.0, "seed {seed} <v{k}>");
                    assert_eq!(v.elsewhere, 0.0, "seed {seed} <v{k}>");
                }
                let reading = Reading::of(&scene.image);
                assert_eq!(reading.objects.len(), objects, "seed {seed}: objects found");
            }
        }
    }

    #[test]
    fn swapped_boxes_report_full_leak_and_outside() {
        let scene = SceneSpec {
            seed: 7,
            objects: 2,
            differ: Some(Attribute::Colour),
            size: 64,
        }
        .draw()
        .unwrap();
        let mut boxes = boxes_of(&scene);
        boxes.swap(0, 1);
        // Both boxes are now the same size class, but each holds the other instance.
        for v in verdicts(&scene.image, &scene.objects, &boxes) {
            assert!(v.present);
            assert!(!v.identity());
            assert!(!v.colour);
            assert!((v.leak - 1.0).abs() < 0.02, "{v:?}");
            assert!((v.outside - 1.0).abs() < 1e-9, "{v:?}");
            assert_eq!(v.elsewhere, v.outside, "{v:?}");
        }
    }

    /// Scene 5: one object on the background.
    fn one_object_scene() -> crate::world::WorldScene {
        SceneSpec {
            seed: 5,
            objects: 1,
            differ: None,
            size: 64,
        }
        .draw()
        .unwrap()
    }

    /// A box a few pixels off its object: the spill counts as outside, not as elsewhere; the
    /// same object under a box it does not reach is all elsewhere.
    #[test]
    fn a_shifted_box_spills_and_a_missed_box_is_elsewhere() {
        let scene = one_object_scene();
        let b = scene.objects[0].bbox;
        let shift = if b.x0 >= 4 { -4.0 } else { 4.0 };
        let rect = [
            (b.x0 as f32 + shift) / 64.0,
            b.y0 as f32 / 64.0,
            (b.x1 as f32 + shift) / 64.0,
            b.y1 as f32 / 64.0,
        ];
        let reading = Reading::of(&scene.image);
        let judged = |rect: [f32; 4]| {
            judge(
                &scene.image,
                &reading,
                &kinds(&scene.objects),
                0,
                &box_mask(&rect, 64, 64),
            )
        };
        let v = judged(rect);
        let width = (b.x1 - b.x0) as f64;
        assert!(v.identity(), "{v:?}");
        assert!(v.outside > 0.0 && v.outside < 2.0 * 4.0 / width, "{v:?}");
        assert_eq!(v.elsewhere, 0.0, "{v:?}");
        let far = if b.x0 > 32 {
            [0.0, 0.0, 0.2, 0.2]
        } else {
            [0.8, 0.8, 1.0, 1.0]
        };
        let v = judged(far);
        assert_eq!((v.outside, v.elsewhere), (1.0, 1.0), "{v:?}");
    }

    #[test]
    fn blended_colours_report_their_share() {
        let scene = SceneSpec {
            seed: 3,
            objects: 2,
            differ: Some(Attribute::Colour),
            size: 64,
        }
        .draw()
        .unwrap();
        let boxes = boxes_of(&scene);
        let (a, b) = (scene.objects[0].colour.rgb(), scene.objects[1].colour.rgb());
        for share in [0.25f32, 0.5, 0.75] {
            let mut img = scene.image.clone();
            for (x, y, p) in img.enumerate_pixels_mut() {
                if scene.objects[0].covers(x, y) {
                    for c in 0..3 {
                        p.0[c] = ((1.0 - share) * a[c] as f32 + share * b[c] as f32).round() as u8;
                    }
                }
            }
            let v = verdicts(&img, &scene.objects, &boxes);
            assert!(
                (v[0].leak - share as f64).abs() < 0.03,
                "share {share}: {:?}",
                v[0]
            );
            assert_eq!(v[1].leak, 0.0);
        }
        // Half of the object's pixels painted in the other colour: leak one half.
        let mut img = scene.image.clone();
        let o = scene.objects[0];
        let mut painted = 0usize;
        let mut total = 0usize;
        for (x, y, p) in img.enumerate_pixels_mut() {
            if o.covers(x, y) {
                total += 1;
                if y < (o.bbox.y0 + o.bbox.y1) / 2 {
                    p.0 = b;
                    painted += 1;
                }
            }
        }
        let v = verdicts(&img, &scene.objects, &boxes);
        let expected = painted as f64 / total as f64;
        assert!(
            (v[0].leak - expected).abs() < 0.03,
            "{:?} vs {expected}",
            v[0]
        );
    }

    #[test]
    fn same_colour_instances_leak_by_shape() {
        let scene = SceneSpec {
            seed: 11,
            objects: 2,
            differ: Some(Attribute::Shape),
            size: 64,
        }
        .draw()
        .unwrap();
        let mut boxes = boxes_of(&scene);
        let v = verdicts(&scene.image, &scene.objects, &boxes);
        assert_eq!(v[0].leak, 0.0);
        boxes.swap(0, 1);
        let v = verdicts(&scene.image, &scene.objects, &boxes);
        assert!(v[0].colour && !v[0].shape);
        assert_eq!(v[0].leak, 1.0);
    }

    #[test]
    fn empty_box_is_absent() {
        let scene = one_object_scene();
        let o = scene.objects[0];
        // A box in a corner the object does not reach.
        let rect = if o.bbox.x0 > 32 {
            [0.0, 0.0, 0.2, 0.2]
        } else {
            [0.8, 0.8, 1.0, 1.0]
        };
        let mut img = scene.image.clone();
        // Repaint the corner as background so no stray pixel matters.
        for (x, y, p) in img.enumerate_pixels_mut() {
            if !o.covers(x, y) {
                p.0 = BACKGROUND;
            }
        }
        let reading = Reading::of(&img);
        let v = judge(
            &img,
            &reading,
            &kinds(&scene.objects),
            0,
            &box_mask(&rect, 64, 64),
        );
        assert!(!v.present && !v.identity());
        assert_eq!(v.outside, 1.0);
        assert_eq!(v.elsewhere, 1.0);
    }

    #[test]
    fn prompt_judge_counts_objects_and_extra_colours() {
        let scene = SceneSpec {
            seed: 2,
            objects: 2,
            differ: None,
            size: 64,
        }
        .draw()
        .unwrap();
        let asked: Vec<(Shape, Colour)> =
            scene.objects.iter().map(|o| (o.shape, o.colour)).collect();
        let r = Reading::of(&scene.image);
        let v = judge_prompt(&r, &asked);
        assert!(v.all_right && v.colours_right && !v.extra_colour);
        let v = judge_prompt(&r, &asked[..1]);
        assert!(v.all_right);
        assert_eq!(v.extra_colour, asked[0].1 != asked[1].1);
    }
}
