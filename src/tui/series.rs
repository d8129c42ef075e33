//! Chart data prepared outside `view`: metric groups, EMA smoothing, log-y, downsampling,
//! autoscaled bounds and tick labels, phase boundaries (pure functions, unit-tested).

use super::backend::{phase_name, Metrics};

/// Points kept per series after downsampling (min and max of each bucket).
pub const MAX_BUCKETS: usize = 400;
/// Weight of the previous value in the EMA (TensorBoard's default smoothing).
pub const EMA_WEIGHT: f64 = 0.9;

/// How a chart is drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChartOptions {
    /// log10 y axis (values ≤ 0 dropped).
    pub log_y: bool,
    /// Draw EMA-smoothed lines over the raw points.
    pub smooth: bool,
}

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct PlotSeries {
    /// Legend name (`None` for raw points under a smoothed line, and phase markers).
    pub name: Option<String>,
    /// `(x, y)` points, y already log10 when the chart is log-y.
    pub points: Vec<(f64, f64)>,
    /// Palette index of its colour.
    pub color: usize,
    /// Drawn dim (raw points under a smoothed line).
    pub dim: bool,
}

/// A phase of a learning run: `[start, end]` steps.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseSpan {
    /// Phase name (`reward`, `penalty`, `dreambooth`).
    pub name: String,
    /// First step.
    pub start: u64,
    /// Last step.
    pub end: u64,
}

/// Everything a chart widget needs, computed once per data or option change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChartModel {
    /// The plotted lines.
    pub series: Vec<PlotSeries>,
    /// Vertical lines at phase starts (after the first), drawn dim.
    pub markers: Vec<PlotSeries>,
    /// x axis bounds (steps).
    pub x_bounds: [f64; 2],
    /// y axis bounds (log10 units when log-y).
    pub y_bounds: [f64; 2],
    /// x axis labels (evenly spaced).
    pub x_labels: Vec<String>,
    /// y axis labels (evenly spaced, in data units).
    pub y_labels: Vec<String>,
    /// Phases found in the `phase` series.
    pub phases: Vec<PhaseSpan>,
    /// Options used.
    pub options: ChartOptions,
    /// Why nothing is plotted, when nothing is.
    pub empty: Option<String>,
}

/// The chart groups of a metric set: the part before `/` (`loss`, `leak`) or the whole name
/// (`lr`, `t`), without `phase` and the evaluation scores (`eval/…`, one point each: the
/// views print them instead); `loss` first, then by name.
pub fn metric_groups(metrics: &Metrics) -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    for name in metrics.keys() {
        if name == "phase" || crate::store::is_score(name) {
            continue;
        }
        let g = name.split('/').next().unwrap_or(name).to_string();
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    groups.sort_by_key(|g| (g != "loss", g.clone()));
    groups
}

/// The series of `metrics` in `group` (`loss` → `loss/total`, `loss/rec`, …), `total` first.
pub fn group_series<'a>(metrics: &'a Metrics, group: &str) -> Vec<(&'a str, &'a [(u64, f64)])> {
    let mut out: Vec<(&str, &[(u64, f64)])> = metrics
        .iter()
        .filter(|(name, _)| {
            name.as_str() == group
                || name
                    .strip_prefix(group)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .map(|(n, p)| (n.as_str(), p.as_slice()))
        .collect();
    out.sort_by_key(|(n, _)| (!n.ends_with("/total"), n.to_string()));
    out
}

/// Exponential moving average with TensorBoard's bias correction; non-finite values pass
/// through without updating the average.
pub fn ema(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let (mut acc, mut n) = (0.0, 0i32);
    for &(x, y) in points {
        if !y.is_finite() {
            out.push((x, y));
            continue;
        }
        acc = acc * weight + (1.0 - weight) * y;
        n += 1;
        let debias = 1.0 - weight.powi(n);
        out.push((x, if debias > 0.0 { acc / debias } else { y }));
    }
    out
}

/// At most `2 * buckets` points: the min and max of each x bucket, in x order.
pub fn downsample(points: &[(f64, f64)], buckets: usize) -> Vec<(f64, f64)> {
    if points.len() <= 2 * buckets || buckets == 0 {
        return points.to_vec();
    }
    let per = points.len().div_ceil(buckets);
    let mut out = Vec::with_capacity(2 * buckets);
    for chunk in points.chunks(per) {
        let (mut lo, mut hi) = (chunk[0], chunk[0]);
        for &p in chunk {
            if p.1 < lo.1 {
                lo = p;
            }
            if p.1 > hi.1 {
                hi = p;
            }
        }
        if lo.0 <= hi.0 {
            out.push(lo);
            if hi != lo {
                out.push(hi);
            }
        } else {
            out.push(hi);
            out.push(lo);
        }
    }
    out
}

/// Compact number text: `0.0123`, `1.5`, `2400`, `1.2e-5`.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        let digits = (3 - a.log10().floor() as i32).clamp(0, 4) as usize;
        let s = format!("{v:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

/// Phases of a run from its `phase` series (value 0, 1, 2 per step).
pub fn phases(points: &[(u64, f64)]) -> Vec<PhaseSpan> {
    let mut out: Vec<PhaseSpan> = Vec::new();
    for &(step, v) in points {
        let name = phase_name(v);
        match out.last_mut() {
            Some(last) if last.name == name => last.end = step,
            _ => out.push(PhaseSpan {
                name: name.to_string(),
                start: step,
                end: step,
            }),
        }
    }
    out
}

fn bounds(values: impl Iterator<Item = f64>, keep_non_negative: bool) -> Option<[f64; 2]> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    if hi - lo < 1e-12 {
        let pad = if lo.abs() > 1e-12 {
            lo.abs() * 0.1
        } else {
            1.0
        };
        return Some([lo - pad, hi + pad]);
    }
    let pad = (hi - lo) * 0.05;
    // Non-negative data (losses) keeps a non-negative axis.
    let floor = if keep_non_negative && lo >= 0.0 {
        (lo - pad).max(0.0)
    } else {
        lo - pad
    };
    Some([floor, hi + pad])
}

fn labels(b: [f64; 2], n: usize, log: bool) -> Vec<String> {
    (0..n)
        .map(|i| {
            let v = b[0] + (b[1] - b[0]) * i as f64 / (n.max(2) - 1) as f64;
            fmt_num(if log { 10f64.powf(v) } else { v })
        })
        .collect()
}

/// Builds a chart of `inputs` (name, points; palette colour = position) with optional phase
/// boundaries from a `phase` series.
pub fn build_chart(
    inputs: &[(String, &[(u64, f64)])],
    phase: Option<&[(u64, f64)]>,
    options: ChartOptions,
) -> ChartModel {
    let mut series = Vec::new();
    for (color, (name, points)) in inputs.iter().enumerate() {
        let mut pts: Vec<(f64, f64)> = points
            .iter()
            .filter(|(_, y)| y.is_finite() && (!options.log_y || *y > 0.0))
            .map(|&(x, y)| (x as f64, if options.log_y { y.log10() } else { y }))
            .collect();
        if pts.is_empty() {
            continue;
        }
        if options.smooth {
            let smooth = ema(&pts, EMA_WEIGHT);
            series.push(PlotSeries {
                name: None,
                points: downsample(&pts, MAX_BUCKETS),
                color,
                dim: true,
            });
            pts = smooth;
        }
        series.push(PlotSeries {
            name: Some(name.clone()),
            points: downsample(&pts, MAX_BUCKETS),
            color,
            dim: false,
        });
    }
    let phases = phase.map(phases).unwrap_or_default();
    if series.is_empty() {
        return ChartModel {
            phases,
            options,
            empty: Some(if inputs.is_empty() {
                "no metrics yet".into()
            } else if options.log_y {
                "no positive values to plot on a log scale".into()
            } else {
                "no finite values".into()
            }),
            ..ChartModel::default()
        };
    }
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x_lo = all().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_hi = all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let x_bounds = [x_lo, x_hi.max(x_lo + 1.0)];
    let y_bounds = bounds(all().map(|p| p.1), !options.log_y).unwrap_or([0.0, 1.0]);
    let markers = phases
        .iter()
        .skip(1)
        .map(|p| PlotSeries {
            name: None,
            points: vec![(p.start as f64, y_bounds[0]), (p.start as f64, y_bounds[1])],
            color: usize::MAX,
            dim: true,
        })
        .collect();
    ChartModel {
        series,
        markers,
        x_labels: (0..3)
            .map(|i| {
                let v = x_bounds[0] + (x_bounds[1] - x_bounds[0]) * i as f64 / 2.0;
                format!("{}", v.round() as i64)
            })
            .collect(),
        y_labels: labels(y_bounds, 3, options.log_y),
        x_bounds,
        y_bounds,
        phases,
        options,
        empty: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_is_debiased_and_smooth() {
        let pts: Vec<(f64, f64)> = (0..4).map(|i| (i as f64, 1.0)).collect();
        assert!(ema(&pts, 0.9).iter().all(|p| (p.1 - 1.0).abs() < 1e-12));
        let s = ema(&[(0.0, 0.0), (1.0, 10.0)], 0.5);
        assert_eq!(s[0].1, 0.0);
        assert!((s[1].1 - 10.0 * 0.5 / 0.75).abs() < 1e-9);
    }

    #[test]
    fn downsample_keeps_extremes() {
        let pts: Vec<(f64, f64)> = (0..10_000).map(|i| (i as f64, (i % 97) as f64)).collect();
        let d = downsample(&pts, 100);
        assert!(d.len() <= 200);
        assert_eq!(d.iter().map(|p| p.1).fold(0.0, f64::max), 96.0);
        assert!(d.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn phases_and_labels() {
        let pts = [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 2.0)];
        let p = phases(&pts);
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[1].name.as_str(), p[1].start, p[1].end),
            ("penalty", 2, 3)
        );
        assert_eq!(fmt_num(0.012345), "0.0123");
        assert_eq!(fmt_num(1200.0), "1200");
        assert_eq!(fmt_num(2e-6), "2.0e-6");
    }

    #[test]
    fn log_chart_drops_non_positive() {
        let pts = [(0u64, 1.0), (1, 0.0), (2, 100.0)];
        let c = build_chart(
            &[("loss/total".into(), &pts)],
            None,
            ChartOptions {
                log_y: true,
                smooth: false,
            },
        );
        assert_eq!(c.series[0].points.len(), 2);
        assert!(c.y_bounds[0] < 0.0 && c.y_bounds[1] > 2.0);
    }
}
