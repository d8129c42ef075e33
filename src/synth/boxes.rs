//! User boxes: parsing `subject=x0,y0,x1,y1`, boxes → binary masks at a feature-map resolution
//! (the released code's rule, notes §4.2), mask resizing, and overlap checks.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One box: the subject it controls and where it goes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoxSpec {
    /// The subject as written in the prompt: a placeholder such as `<v0>` or plain word(s) such
    /// as `dog` (all BPE tokens of those words are the subject's tokens).
    pub subject: String,
    /// `[x0, y0, x1, y1]`, normalised to [0, 1], origin at the top-left corner.
    pub rect: [f32; 4],
}

/// The boxes a stored synthesis spec's config holds (`"boxes": ["<v0>=x0,y0,x1,y1", …]`).
pub fn stored_boxes(config: &serde_json::Value) -> Result<Vec<BoxSpec>> {
    config
        .get("boxes")
        .and_then(|b| b.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(parse_box)
        .collect()
}

impl BoxSpec {
    /// Checks the coordinates: finite, inside [0, 1], x0 < x1 and y0 < y1; and a non-empty
    /// subject. The message names the box as the user wrote it.
    pub fn check(&self) -> Result<()> {
        let [x0, y0, x1, y1] = self.rect;
        let name = self.to_string();
        if self.subject.trim().is_empty() {
            return Err(Error::Input(format!("--box {name}: the subject is empty")));
        }
        if self
            .rect
            .iter()
            .any(|v| !v.is_finite() || *v < 0.0 || *v > 1.0)
        {
            return Err(Error::Input(format!(
                "--box {name}: coordinates must lie in [0, 1] (normalised, origin top-left)"
            )));
        }
        if x0 >= x1 {
            return Err(Error::Input(format!(
                "--box {name}: x0 must be smaller than x1"
            )));
        }
        if y0 >= y1 {
            return Err(Error::Input(format!(
                "--box {name}: y0 must be smaller than y1"
            )));
        }
        Ok(())
    }

    /// Area in normalised units.
    pub fn area(&self) -> f64 {
        let [x0, y0, x1, y1] = self.rect.map(decimal);
        (x1 - x0).max(0.0) * (y1 - y0).max(0.0)
    }

    /// Area of the intersection with `other`, normalised units.
    pub fn intersection(&self, other: &BoxSpec) -> f64 {
        let [ax0, ay0, ax1, ay1] = self.rect.map(decimal);
        let [bx0, by0, bx1, by1] = other.rect.map(decimal);
        let w = (ax1.min(bx1) - ax0.max(bx0)).max(0.0);
        let h = (ay1.min(by1) - ay0.max(by0)).max(0.0);
        w * h
    }
}

impl std::fmt::Display for BoxSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [x0, y0, x1, y1] = self.rect;
        write!(f, "{}={x0},{y0},{x1},{y1}", self.subject)
    }
}

/// Parses `subject=x0,y0,x1,y1`, e.g. `<v0>=0.1,0.2,0.5,0.9` or `dog=0,0,0.5,1`, and checks it
/// with [`BoxSpec::check`]. The subject is everything before the last `=`.
pub fn parse_box(text: &str) -> Result<BoxSpec> {
    let syntax = || {
        Error::Input(format!(
            "--box {text}: expected SUBJECT=x0,y0,x1,y1 with four numbers in [0, 1], e.g. \"<v0>=0.1,0.2,0.5,0.9\""
        ))
    };
    let (subject, coords) = text.rsplit_once('=').ok_or_else(syntax)?;
    let parts: Vec<&str> = coords.split(',').map(str::trim).collect();
    if parts.len() != 4 {
        return Err(syntax());
    }
    let mut rect = [0f32; 4];
    for (slot, p) in rect.iter_mut().zip(&parts) {
        *slot = p.parse::<f32>().map_err(|_| syntax())?;
    }
    let spec = BoxSpec {
        subject: subject.trim().to_string(),
        rect,
    };
    spec.check()?;
    Ok(spec)
}

/// The decimal value the user typed for an `f32` coordinate (its shortest round-trip text read
/// as f64), so that `0.1 × 5` rounds like Python's `0.1 * 5` does.
fn decimal(v: f32) -> f64 {
    v.to_string().parse::<f64>().unwrap_or(v as f64)
}

/// Python's `round()` on a float: to the nearest integer, ties to even, clamped to `[0, max]`.
pub fn round_half_even(v: f64, max: usize) -> usize {
    (v.round_ties_even().max(0.0) as usize).min(max)
}

/// The box as a row-major `h × w` mask: rows `round(y0·h) .. round(y1·h)` and columns
/// `round(x0·w) .. round(x1·w)` with Python's round-half-to-even (the released code's rule).
/// A box can be empty at a low resolution.
pub fn box_mask(rect: &[f32; 4], h: usize, w: usize) -> Vec<bool> {
    let [x0, y0, x1, y1] = rect.map(decimal);
    let (r0, r1) = (
        round_half_even(y0 * h as f64, h),
        round_half_even(y1 * h as f64, h),
    );
    let (c0, c1) = (
        round_half_even(x0 * w as f64, w),
        round_half_even(x1 * w as f64, w),
    );
    let mut m = vec![false; h * w];
    for r in r0..r1 {
        for c in c0..c1 {
            m[r * w + c] = true;
        }
    }
    m
}

/// Nearest resize of a row-major `sh × sw` mask to `h × w` with PyTorch's `nearest-exact` rule
/// (source index `floor((dst + 0.5)·in/out)`), as used to bring refined masks to each layer.
pub fn resize_mask(mask: &[bool], (sh, sw): (usize, usize), (h, w): (usize, usize)) -> Vec<bool> {
    if (sh, sw) == (h, w) {
        return mask.to_vec();
    }
    let src = |d: usize, inp: usize, out: usize| -> usize {
        (((d as f64 + 0.5) * inp as f64 / out as f64).floor() as usize).min(inp - 1)
    };
    let mut out = vec![false; h * w];
    for y in 0..h {
        let sy = src(y, sh, h);
        for x in 0..w {
            out[y * w + x] = mask[sy * sw + src(x, sw, w)];
        }
    }
    out
}

/// Pairs of boxes whose intersection is more than `fraction` of the smaller box's area, as
/// warning lines.
pub fn overlap_warnings(boxes: &[BoxSpec], fraction: f64) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..boxes.len() {
        for j in i + 1..boxes.len() {
            let (a, b) = (&boxes[i], &boxes[j]);
            let smaller = a.area().min(b.area());
            let inter = a.intersection(b);
            if smaller > 0.0 && inter > fraction * smaller {
                out.push(format!(
                    "boxes {} and {} overlap by {:.0}% of the smaller box; the overlap is shared by both subjects",
                    a.subject,
                    b.subject,
                    100.0 * inter / smaller
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_cols(m: &[bool], h: usize, w: usize) -> (Vec<usize>, Vec<usize>) {
        let rows = (0..h).filter(|&r| (0..w).any(|c| m[r * w + c])).collect();
        let cols = (0..w).filter(|&c| (0..h).any(|r| m[r * w + c])).collect();
        (rows, cols)
    }

    #[test]
    fn box_mask_rounds_half_to_even() {
        // 0.125·4 = 0.5 → 0, 0.375·4 = 1.5 → 2, 0.625·4 = 2.5 → 2, 0.875·4 = 3.5 → 4.
        let m = box_mask(&[0.125, 0.375, 0.625, 0.875], 4, 4);
        let (rows, cols) = rows_cols(&m, 4, 4);
        assert_eq!(rows, vec![2, 3]);
        assert_eq!(cols, vec![0, 1]);
        // Python: round(0.1 * 5) = round(0.5) = 0 and round(0.3 * 5) = round(1.5) = 2.
        let m = box_mask(&[0.1, 0.1, 0.3, 0.3], 5, 5);
        assert_eq!(rows_cols(&m, 5, 5), (vec![0, 1], vec![0, 1]));
        // Non-square: rows use h, columns use w.
        let m = box_mask(&[0.0, 0.0, 0.5, 0.25], 8, 4);
        assert_eq!(rows_cols(&m, 8, 4), (vec![0, 1], vec![0, 1]));
        // Empty at a low resolution: round(0.6) = 1 = round(0.8).
        assert!(box_mask(&[0.3, 0.3, 0.4, 0.4], 2, 2).iter().all(|v| !v));
        assert_eq!(box_mask(&[0.0, 0.0, 1.0, 1.0], 3, 3), vec![true; 9]);
    }

    #[test]
    fn resize_nearest_exact() {
        // 2×2 → 4×4 duplicates; 4×4 → 2×2 picks indices 1 and 3 (nearest-exact), not 0 and 2.
        let m = vec![true, false, false, false];
        let up = resize_mask(&m, (2, 2), (4, 4));
        assert_eq!(up.iter().filter(|v| **v).count(), 4);
        assert!(up[0] && up[1] && up[4] && up[5]);
        let mut big = vec![false; 16];
        big[5] = true; // (1, 1)
        let down = resize_mask(&big, (4, 4), (2, 2));
        assert_eq!(down, vec![true, false, false, false]);
        big[5] = false;
        big[0] = true; // (0, 0) is not sampled
        assert_eq!(resize_mask(&big, (4, 4), (2, 2)), vec![false; 4]);
    }

    #[test]
    fn parse_and_check() {
        let b = parse_box("<v0>=0.1,0.2,0.5,0.9").unwrap();
        assert_eq!(b.subject, "<v0>");
        assert_eq!(b.rect, [0.1, 0.2, 0.5, 0.9]);
        assert_eq!(parse_box(" dog = 0, 0, 1, 1").unwrap().subject, "dog");
        for bad in [
            "<v0>",
            "<v0>=0.1,0.2,0.5",
            "<v0>=a,0,1,1",
            "=0,0,1,1",
            "<v0>=0,0,1,1,1",
        ] {
            assert!(parse_box(bad).is_err(), "{bad}");
        }
        let e = parse_box("<v0>=0,0,1.5,1").unwrap_err().to_string();
        assert!(e.contains("[0, 1]"), "{e}");
        let e = parse_box("<v0>=0.5,0,0.5,1").unwrap_err().to_string();
        assert!(e.contains("x0 must be smaller"), "{e}");
        let e = parse_box("<v0>=0,0.7,1,0.2").unwrap_err().to_string();
        assert!(e.contains("y0 must be smaller"), "{e}");
    }

    #[test]
    fn overlap() {
        let a = parse_box("a=0,0,0.5,0.5").unwrap();
        let b = parse_box("b=0.1,0.1,0.6,0.6").unwrap();
        let c = parse_box("c=0.4,0.4,1,1").unwrap();
        assert_eq!(overlap_warnings(&[a.clone(), b], 0.5).len(), 1);
        assert!(overlap_warnings(&[a, c], 0.5).is_empty());
    }
}
