//! Procedural scenes: flat shapes on a plain, slightly noisy background, with exact masks.
//!
//! Everything is drawn from one seeded RNG, so the same [`SceneSpec`] always gives the same
//! bytes. Objects never overlap and are drawn without anti-aliasing: a pixel belongs to an object
//! when its centre lies inside the shape, so the masks are exactly the object's pixels.

use std::fmt;
use std::str::FromStr;

use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The world's shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A disc inscribed in the object's square box.
    Circle,
    /// The whole square box.
    Square,
    /// An isosceles triangle, apex at the top centre, base along the box's bottom edge.
    Triangle,
}

/// The world's colours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// (215, 40, 40)
    Red,
    /// (35, 160, 60)
    Green,
    /// (40, 70, 215)
    Blue,
    /// (235, 195, 30)
    Yellow,
}

/// Every shape, in a fixed order.
pub const SHAPES: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];
/// Every colour, in a fixed order.
pub const COLOURS: [Colour; 4] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];
/// The background's mean colour (light, slightly warm grey).
pub const BACKGROUND: [u8; 3] = [226, 224, 218];
/// Standard deviation of the background's per-pixel noise (per channel, 0–255 scale).
pub const BACKGROUND_NOISE: f32 = 4.0;
/// Standard deviation of the objects' per-pixel noise.
pub const OBJECT_NOISE: f32 = 3.0;
/// Most objects in one scene.
pub const MAX_OBJECTS: usize = 4;
/// Object sides as fractions of the image side (20–30 px at 64 px).
pub const OBJECT_SIDE: (f32, f32) = (0.31, 0.47);

impl Colour {
    /// The colour's flat RGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 40, 40],
            Colour::Green => [35, 160, 60],
            Colour::Blue => [40, 70, 215],
            Colour::Yellow => [235, 195, 30],
        }
    }

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
        }
    }
}

impl Shape {
    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// Whether the point (u, v), in box fractions (0..1, v down), lies inside the shape.
    pub fn contains(self, u: f32, v: f32) -> bool {
        match self {
            Shape::Circle => (u - 0.5).powi(2) + (v - 0.5).powi(2) <= 0.25,
            Shape::Square => (0.0..=1.0).contains(&u) && (0.0..=1.0).contains(&v),
            Shape::Triangle => (0.0..=1.0).contains(&v) && (u - 0.5).abs() <= 0.5 * v,
        }
    }
}

macro_rules! word_enum {
    ($t:ty, $all:expr, $what:literal) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.word())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                let s = s.trim().to_ascii_lowercase();
                let s = if s == "color" {
                    "colour".to_string()
                } else {
                    s
                };
                $all.iter().copied().find(|v| v.word() == s).ok_or_else(|| {
                    let names: Vec<&str> = $all.iter().map(|v| v.word()).collect();
                    format!("unknown {} `{s}` (one of {})", $what, names.join(", "))
                })
            }
        }
    };
}
word_enum!(Shape, SHAPES, "shape");
word_enum!(Colour, COLOURS, "colour");

/// An attribute of an object that the oracle reads back from pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attribute {
    /// The object's colour.
    Colour,
    /// The object's shape.
    Shape,
}

/// Every attribute, in the order the oracle reports them.
pub const ATTRIBUTES: [Attribute; 2] = [Attribute::Colour, Attribute::Shape];

impl Attribute {
    /// The attribute's name (`colour`, `shape`).
    pub fn word(self) -> &'static str {
        match self {
            Attribute::Colour => "colour",
            Attribute::Shape => "shape",
        }
    }
}
word_enum!(Attribute, ATTRIBUTES, "attribute");

/// A pixel box: `x0 ≤ x < x1`, `y0 ≤ y < y1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PixelBox {
    /// Left column (inclusive).
    pub x0: u32,
    /// Top row (inclusive).
    pub y0: u32,
    /// Right column (exclusive).
    pub x1: u32,
    /// Bottom row (exclusive).
    pub y1: u32,
}

impl PixelBox {
    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.x1 - self.x0
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.y1 - self.y0
    }

    /// Whether pixel (x, y) lies inside.
    pub fn contains(&self, x: u32, y: u32) -> bool {
        x >= self.x0 && x < self.x1 && y >= self.y0 && y < self.y1
    }

    /// Whether the two boxes, each grown by `gap` pixels, overlap.
    fn near(&self, other: &PixelBox, gap: u32) -> bool {
        self.x0 < other.x1 + gap
            && other.x0 < self.x1 + gap
            && self.y0 < other.y1 + gap
            && other.y0 < self.y1 + gap
    }

    /// The box in image fractions `[x0, y0, x1, y1]`, as `--box` takes it.
    pub fn fractions(&self, size: u32) -> [f32; 4] {
        let s = size as f32;
        [
            self.x0 as f32 / s,
            self.y0 as f32 / s,
            self.x1 as f32 / s,
            self.y1 as f32 / s,
        ]
    }
}

/// One object of a scene.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldObject {
    /// Its shape.
    pub shape: Shape,
    /// Its colour.
    pub colour: Colour,
    /// Its square box in pixels (the shape fills it as [`Shape::contains`] says).
    #[serde(rename = "box")]
    pub bbox: PixelBox,
}

impl WorldObject {
    /// The object's attribute value as a word (`red`, `circle`).
    pub fn attribute(&self, attribute: Attribute) -> &'static str {
        match attribute {
            Attribute::Colour => self.colour.word(),
            Attribute::Shape => self.shape.word(),
        }
    }

    /// Its shape and colour: what the oracle judges.
    pub fn kind(&self) -> (Shape, Colour) {
        (self.shape, self.colour)
    }

    /// "red circle".
    pub fn noun_phrase(&self) -> String {
        format!("{} {}", self.colour.word(), self.shape.word())
    }

    /// Whether pixel (x, y) belongs to the object.
    pub fn covers(&self, x: u32, y: u32) -> bool {
        if !self.bbox.contains(x, y) {
            return false;
        }
        let u = (x - self.bbox.x0) as f32 + 0.5;
        let v = (y - self.bbox.y0) as f32 + 0.5;
        self.shape
            .contains(u / self.bbox.width() as f32, v / self.bbox.height() as f32)
    }
}

/// What to draw: the inputs that determine a scene's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SceneSpec {
    /// The RNG seed.
    pub seed: u64,
    /// How many objects (1–[`MAX_OBJECTS`]).
    pub objects: usize,
    /// With `Some(a)`, the objects share every attribute but `a`; with `None` they are drawn
    /// freely but no two are identical.
    pub differ: Option<Attribute>,
    /// The image side in pixels.
    pub size: u32,
}

/// A drawn scene: its spec, its objects and its pixels.
#[derive(Clone, Debug)]
pub struct WorldScene {
    /// What it was drawn from.
    pub spec: SceneSpec,
    /// The objects, mask `i` is object `i`.
    pub objects: Vec<WorldObject>,
    /// The image.
    pub image: RgbImage,
}

/// Smallest image side a scene may have.
pub const MIN_SIDE: u32 = 32;

impl SceneSpec {
    /// Checks the spec; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        if self.objects == 0 || self.objects > MAX_OBJECTS {
            return Err(Error::Input(format!(
                "--objects {}: a scene holds 1 to {MAX_OBJECTS} objects",
                self.objects
            )));
        }
        if self.size < MIN_SIDE || self.size > 4096 {
            return Err(Error::Input(format!(
                "--size {}: the image side must be {MIN_SIDE} to 4096 pixels",
                self.size
            )));
        }
        let most = match self.differ {
            Some(Attribute::Colour) => COLOURS.len(),
            Some(Attribute::Shape) => SHAPES.len(),
            None => COLOURS.len() * SHAPES.len(),
        };
        if self.objects > most {
            return Err(Error::Input(format!(
                "--objects {} with --differ {}: the world has only {most} {}s",
                self.objects,
                self.differ.map(|a| a.word()).unwrap_or("none"),
                self.differ.map(|a| a.word()).unwrap_or("kind"),
            )));
        }
        Ok(())
    }

    /// Draws the scene.
    pub fn draw(&self) -> Result<WorldScene> {
        self.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let kinds = pick_kinds(&mut rng, self.objects, self.differ);
        let boxes = place_boxes(&mut rng, self.size, self.objects).ok_or_else(|| {
            Error::Input(format!(
                "--size {}: {} objects do not fit without overlapping",
                self.size, self.objects
            ))
        })?;
        let objects: Vec<WorldObject> = kinds
            .into_iter()
            .zip(boxes)
            .map(|((shape, colour), bbox)| WorldObject {
                shape,
                colour,
                bbox,
            })
            .collect();
        let image = render(&mut rng, self.size, &objects);
        Ok(WorldScene {
            spec: *self,
            objects,
            image,
        })
    }
}

/// Picks (shape, colour) for each object, pairwise distinct.
fn pick_kinds(rng: &mut impl Rng, n: usize, differ: Option<Attribute>) -> Vec<(Shape, Colour)> {
    let shapes = shuffled(rng, &SHAPES);
    let colours = shuffled(rng, &COLOURS);
    match differ {
        Some(Attribute::Colour) => colours[..n].iter().map(|&c| (shapes[0], c)).collect(),
        Some(Attribute::Shape) => shapes[..n].iter().map(|&s| (s, colours[0])).collect(),
        None => {
            let all: Vec<(Shape, Colour)> = SHAPES
                .iter()
                .flat_map(|&s| COLOURS.iter().map(move |&c| (s, c)))
                .collect();
            shuffled(rng, &all)[..n].to_vec()
        }
    }
}

fn shuffled<T: Copy>(rng: &mut impl Rng, items: &[T]) -> Vec<T> {
    let mut v = items.to_vec();
    for i in (1..v.len()).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
    v
}

/// Places `n` square boxes with a gap of at least 2 px between them and 1 px from the border;
/// shrinks the sizes when a placement keeps failing. `None` when nothing fits.
fn place_boxes(rng: &mut impl Rng, size: u32, n: usize) -> Option<Vec<PixelBox>> {
    let mut scale = 1.0f32;
    for _ in 0..8 {
        'attempt: for _ in 0..400 {
            let mut boxes: Vec<PixelBox> = Vec::with_capacity(n);
            for _ in 0..n {
                let frac = rng.random_range(OBJECT_SIDE.0..=OBJECT_SIDE.1) * scale;
                let side = ((frac * size as f32).round() as u32).max(4);
                if side + 2 > size {
                    continue 'attempt;
                }
                let x0 = rng.random_range(1..=size - side - 1);
                let y0 = rng.random_range(1..=size - side - 1);
                let b = PixelBox {
                    x0,
                    y0,
                    x1: x0 + side,
                    y1: y0 + side,
                };
                if boxes.iter().any(|o| o.near(&b, 2)) {
                    continue 'attempt;
                }
                boxes.push(b);
            }
            return Some(boxes);
        }
        scale *= 0.85;
    }
    None
}

/// Draws the background and the objects (no anti-aliasing).
fn render(rng: &mut impl Rng, size: u32, objects: &[WorldObject]) -> RgbImage {
    let bg_noise = Normal::new(0.0f32, BACKGROUND_NOISE).expect("positive std");
    let obj_noise = Normal::new(0.0f32, OBJECT_NOISE).expect("positive std");
    let mut image = RgbImage::new(size, size);
    for y in 0..size {
        for x in 0..size {
            let (base, noise) = match objects.iter().find(|o| o.covers(x, y)) {
                Some(o) => (o.colour.rgb(), &obj_noise),
                None => (BACKGROUND, &bg_noise),
            };
            let mut px = [0u8; 3];
            for (c, v) in px.iter_mut().enumerate() {
                *v = (base[c] as f32 + noise.sample(rng))
                    .round()
                    .clamp(0.0, 255.0) as u8;
            }
            image.put_pixel(x, y, Rgb(px));
        }
    }
    image
}

impl WorldScene {
    /// The exact mask of object `i` (255 on its pixels, 0 elsewhere).
    pub fn mask(&self, i: usize) -> GrayImage {
        let o = self.objects[i];
        let size = self.spec.size;
        GrayImage::from_fn(size, size, |x, y| {
            Luma([if o.covers(x, y) { 255 } else { 0 }])
        })
    }

    /// "a photo of a red circle and a blue circle" (objects in mask order).
    pub fn caption(&self) -> String {
        caption(&self.objects)
    }
}

/// "a photo of a red circle", "a photo of a red circle and a blue square", "…, a … and a …".
pub fn caption(objects: &[WorldObject]) -> String {
    let kinds: Vec<(Shape, Colour)> = objects.iter().map(|o| (o.shape, o.colour)).collect();
    caption_of(&kinds)
}

/// The caption naming objects of these kinds, in order.
pub fn caption_of(kinds: &[(Shape, Colour)]) -> String {
    let phrases: Vec<String> = kinds
        .iter()
        .map(|(s, c)| format!("a {} {}", c.word(), s.word()))
        .collect();
    let list = match phrases.len() {
        0 => String::new(),
        1 => phrases[0].clone(),
        n => format!("{} and {}", phrases[..n - 1].join(", "), phrases[n - 1]),
    };
    format!("a photo of {list}")
}
