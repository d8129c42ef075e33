//! `mifo bench`: median wall times of the pipeline's operations, each measured through the code
//! that runs them for real — the learning loop ([`crate::learn::run`]) for phase-A and phase-B
//! iterations, the synthesis loop ([`crate::synth::run`]) for denoising steps with and without
//! latent optimisation and with mask refinement — on a bundled or user model, or on Stable
//! Diffusion 2.1-base's shapes with seeded random weights (timing needs shapes, not weights).
//!
//! Step times come from the moments the loops report progress, so a row is one whole iteration
//! as a run does it (sampling, text encoding, UNet, losses, backward, optimiser, metrics). The
//! first step of each kind is a warm-up and is not counted. Row names are stable:
//! `tools/bench_diffusers.py` prints the same rows for diffusers/PyTorch.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, Luma, Rgb, RgbImage};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::learn::{LearnConfig, LearnRequest, Scene, SceneFiles};
use crate::model::{ModelShape, ModelSource, StableDiffusion};
use crate::sink::{Progress, RunSink};
use crate::synth::{BoxSpec, SynthConfig, SynthRequest};

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The model (its weights, or with `shape` only the tokenizer and scheduler of its diffusers
    /// folder).
    pub model: ModelSource,
    /// Time these component shapes with seeded random weights instead of the folder's weights.
    pub shape: Option<ModelShape>,
    /// Where to run.
    pub device: Device,
    /// Weight / activation dtype.
    pub dtype: DType,
    /// Timed repetitions per row (after one warm-up).
    pub iters: usize,
    /// Image side in pixels for `shape` (its UNet's `sample_size` is set to match); a model
    /// folder always runs at its own resolution.
    pub size: Option<u32>,
    /// Row names to run (all of [`ROWS`] when empty).
    pub only: Vec<String>,
    /// Also time the whole runs of [`FULL_ROWS`].
    pub full: bool,
    /// With the whole runs: this many steps per learning phase (A and B) and synthesis steps
    /// (a third of them with latent optimisation), and preview steps, instead of the paper
    /// preset's — a quick look at the breakdown; `None` runs the preset.
    pub full_steps: Option<u64>,
}

/// One row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// Stable row name (`learn_phase_a`, …).
    pub name: String,
    /// What was timed, for people.
    pub label: String,
    /// Median milliseconds.
    pub median_ms: f64,
    /// Fastest run, milliseconds.
    pub min_ms: f64,
    /// Timed runs.
    pub runs: usize,
    /// Peak memory while the row ran (resident set on CPU, device memory on CUDA), MiB.
    pub peak_mib: Option<f64>,
    /// Extra facts (latent-optimisation iterations per step, …).
    pub note: String,
}

/// The whole result.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// The model folder or shape name.
    pub model: String,
    /// Device, as `cpu` / `cuda:N`.
    pub device: String,
    /// dtype name.
    pub dtype: String,
    /// Image side, pixels.
    pub size: u32,
    /// CPU threads candle uses.
    pub threads: usize,
    /// What the peak-memory column measures.
    pub memory: String,
    /// The attention path of the calls no hook reads: `blocked` (the default; on the CPU) or
    /// `full` (`MIFO_ATTENTION=full`); see [`crate::model::blocked_attention`].
    pub attention: String,
    /// Which units of the frozen models a learning pass recomputes in its backward instead of
    /// keeping (`MIFO_CHECKPOINT`: `large`, the default, `all` or `off`); see
    /// [`crate::model::checkpoint`].
    pub checkpointing: String,
    /// The rows, in order.
    pub rows: Vec<BenchRow>,
    /// Where the whole runs' time and peak memory went, part by part (CPU only; empty without
    /// whole runs).
    pub breakdown: Vec<BreakdownRow>,
}

/// One part of a whole run (`--full`): its time, its peak resident set, and what held that
/// peak. The sizes of the weights, the trained variables, the optimiser state and the
/// convolution tiles are exact (bytes of the tensors and buffers held); `resident_before_mib`
/// is measured (the resident set when the part began, less what is counted before it: the
/// program, the allocator's free memory, what earlier parts left behind); `working_mib` is an
/// estimate — the peak less everything else, which is the activations kept for the backward and
/// the step's transient buffers. The columns add up to the peak (each is clamped at zero).
#[derive(Clone, Debug, Serialize)]
pub struct BreakdownRow {
    /// The whole run: `learn_run` or `synth_image`.
    pub run: String,
    /// The part: `learning phase A`, `learning phase B`, `outputs` (attention maps, learned
    /// weights), `preview rendering`; `synthesis steps`, `decoding and outputs`.
    pub part: String,
    /// Wall time of the part, seconds.
    pub seconds: f64,
    /// Peak resident set over the part, MiB (measured).
    pub peak_mib: f64,
    /// The model's weights as loaded, MiB (exact).
    pub weights_mib: f64,
    /// The variables the phase trains (placeholder rows; LoRA adapters or trainable copies of
    /// the weights in phase B), MiB (exact).
    pub trained_mib: f64,
    /// AdamW's two moments per trained variable, MiB (exact).
    pub optimiser_mib: f64,
    /// The CPU convolution's im2col tiles, kept between calls (a cache), MiB (exact).
    pub conv_tiles_mib: f64,
    /// Resident when the part began and not counted above, MiB (measured).
    pub resident_before_mib: f64,
    /// The rest of the peak: activations kept for the backward and transient buffers, MiB
    /// (estimate).
    pub working_mib: f64,
}

/// One part of a whole run as it was measured.
#[derive(Clone, Debug)]
struct Part {
    name: String,
    ms: f64,
    peak_mib: f64,
    start_rss_mib: f64,
    start_tiles: usize,
    end_tiles: usize,
}

/// Splits a whole run into parts at the loops' progress reports and artifacts, with the peak
/// resident set of each (VmHWM, reset at every mark).
struct PartMeter {
    last: Instant,
    last_rss_mib: f64,
    last_tiles: usize,
    parts: Vec<Part>,
}

/// A field of `/proc/self/status` in MiB (`VmHWM`, `VmRSS`).
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

impl PartMeter {
    fn new() -> Self {
        // "5" resets the peak resident set (Linux ≥ 4.0).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        Self {
            last: Instant::now(),
            last_rss_mib: status_mib("VmRSS:").unwrap_or(0.0),
            last_tiles: crate::model::cpu_conv::scratch_bytes(),
            parts: Vec::new(),
        }
    }

    /// Ends the current stretch, which belongs to part `name`.
    fn mark(&mut self, name: &str) {
        let now = Instant::now();
        let ms = now.duration_since(self.last).as_secs_f64() * 1e3;
        let peak = status_mib("VmHWM:").unwrap_or(0.0);
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let tiles = crate::model::cpu_conv::scratch_bytes();
        match self.parts.last_mut() {
            Some(p) if p.name == name => {
                p.ms += ms;
                p.peak_mib = p.peak_mib.max(peak);
                p.end_tiles = tiles;
            }
            _ => self.parts.push(Part {
                name: name.to_string(),
                ms,
                peak_mib: peak,
                start_rss_mib: self.last_rss_mib,
                start_tiles: self.last_tiles,
                end_tiles: tiles,
            }),
        }
        self.last = Instant::now();
        self.last_rss_mib = status_mib("VmRSS:").unwrap_or(0.0);
        self.last_tiles = tiles;
    }
}

/// The part a loop's phase belongs to.
fn part_of_phase(phase: &str) -> &str {
    match phase {
        "reward" | "penalty" => "learning phase A",
        "dreambooth" => "learning phase B",
        "denoise" | "guided" => "synthesis steps",
        other => other,
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// The breakdown rows of one whole run's parts; `memory` gives each learning phase's trained
/// variables and optimiser state (parts after a phase still hold its state).
fn breakdown_rows(
    run: &str,
    parts: &[Part],
    weights_bytes: u64,
    memory: &BTreeMap<String, crate::learn::PhaseMemory>,
) -> Vec<BreakdownRow> {
    let weights = weights_bytes as f64 / MIB;
    let mut held = crate::learn::PhaseMemory::default();
    parts
        .iter()
        .map(|p| {
            match p.name.as_str() {
                "learning phase A" => held = memory.get("A").copied().unwrap_or_default(),
                "learning phase B" => held = memory.get("B").copied().unwrap_or_default(),
                _ => {}
            }
            let trained = held.trained_bytes as f64 / MIB;
            let optimiser = held.optimiser_bytes as f64 / MIB;
            let tiles = p.end_tiles as f64 / MIB;
            let known = weights + trained + optimiser + tiles;
            let room = (p.peak_mib - known).max(0.0);
            let before = (p.start_rss_mib - weights - p.start_tiles as f64 / MIB).clamp(0.0, room);
            BreakdownRow {
                run: run.to_string(),
                part: p.name.clone(),
                seconds: p.ms / 1e3,
                peak_mib: p.peak_mib,
                weights_mib: weights,
                trained_mib: trained,
                optimiser_mib: optimiser,
                conv_tiles_mib: tiles,
                resident_before_mib: before,
                working_mib: room - before,
            }
        })
        .collect()
}

/// Every row name, in the order they run.
pub const ROWS: [&str; 10] = [
    "text_encode",
    "vae_encode",
    "vae_decode",
    "unet_forward",
    "learn_phase_a",
    "learn_phase_b_lora",
    "learn_phase_b_full",
    "synth_step",
    "synth_step_latent_opt",
    "kmeans_refine",
];

/// Whole runs, timed once each (with `--full` or when named): a complete learning run of the
/// paper preset with LoRA phase B (800 + 400 iterations, outputs and checkpoints included) and
/// one synthesised image of the paper preset (50 steps, 15 with latent optimisation, decoding
/// and rendering included).
pub const FULL_ROWS: [&str; 2] = ["synth_image", "learn_run"];

fn median_min(ms: &[f64]) -> (f64, f64) {
    let mut v = ms.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    (median, v[0])
}

/// Peak memory of this process: resident set (VmHWM, reset per row through
/// `/proc/self/clear_refs`) on CPU; on CUDA, `nvidia-smi`'s used memory of the device, sampled
/// every 100 ms by a thread (each query is a process; more often would load the CPU).
struct MemoryProbe {
    cuda: Option<CudaPoller>,
}

struct CudaPoller {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CudaPoller {
    fn start(ordinal: usize) -> Option<Self> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let query = move || -> Option<u64> {
            let out = std::process::Command::new("nvidia-smi")
                .args([
                    "--query-gpu=memory.used",
                    "--format=csv,noheader,nounits",
                    &format!("--id={ordinal}"),
                ])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        query()?;
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(mib) = query() {
                    p.fetch_max(mib, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        Some(Self { peak, stop })
    }
}

impl Drop for CudaPoller {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl MemoryProbe {
    fn new(device: &Device) -> Self {
        let cuda = match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => CudaPoller::start(gpu_id),
            _ => None,
        };
        Self { cuda }
    }

    fn describe(&self, device: &Device) -> String {
        match (&self.cuda, device.is_cpu()) {
            (Some(_), _) => "device memory used (nvidia-smi, whole GPU), MiB".into(),
            (None, true) => "peak resident set of the process, MiB".into(),
            (None, false) => "not measured (nvidia-smi not found)".into(),
        }
    }

    fn reset(&self) {
        match &self.cuda {
            Some(c) => c.peak.store(0, std::sync::atomic::Ordering::Relaxed),
            None => {
                // "5" resets the peak resident set (Linux ≥ 4.0); harmless where unsupported.
                let _ = std::fs::write("/proc/self/clear_refs", "5");
            }
        }
    }

    fn peak_mib(&self) -> Option<f64> {
        match &self.cuda {
            Some(c) => {
                std::thread::sleep(std::time::Duration::from_millis(150));
                Some(c.peak.load(std::sync::atomic::Ordering::Relaxed) as f64)
            }
            None => {
                let status = std::fs::read_to_string("/proc/self/status").ok()?;
                let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
                let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib / 1024.0)
            }
        }
    }
}

/// A sink that only notes when each step ended, its phase and its message, and the metrics.
struct StepClock {
    last: Instant,
    steps: Vec<(String, String, f64)>,
    metrics: BTreeMap<String, Vec<f64>>,
    /// For whole runs: the row's name and its start; every 100th step is reported on stderr,
    /// so that a run stopped part-way still shows its rate.
    echo: Option<(&'static str, Instant)>,
    /// For whole runs on the CPU: the parts and their peaks.
    meter: Option<PartMeter>,
}

impl StepClock {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            steps: Vec::new(),
            metrics: BTreeMap::new(),
            echo: None,
            meter: None,
        }
    }

    /// A clock that also reports every 100th step of a whole run on stderr, and on the CPU
    /// splits the run into parts with their peaks.
    fn echoing(row: &'static str, device: &Device) -> Self {
        Self {
            echo: Some((row, Instant::now())),
            meter: device.is_cpu().then(PartMeter::new),
            ..Self::new()
        }
    }

    /// Durations (ms) of the last `n` steps whose phase and message pass `keep` (the first
    /// such step is never among them: it is the warm-up).
    fn times(&self, n: usize, keep: impl Fn(&str, &str) -> bool) -> Vec<f64> {
        let all: Vec<f64> = self
            .steps
            .iter()
            .filter(|(p, m, _)| keep(p, m))
            .skip(1)
            .map(|s| s.2)
            .collect();
        all[all.len().saturating_sub(n)..].to_vec()
    }
}

impl RunSink for StepClock {
    fn metric(&mut self, name: &str, _step: u64, value: f64) -> Result<()> {
        self.metrics
            .entry(name.to_string())
            .or_default()
            .push(value);
        Ok(())
    }
    fn log(&mut self, _line: &str) -> Result<()> {
        Ok(())
    }
    fn progress(&mut self, p: &Progress) {
        let now = Instant::now();
        let ms = now.duration_since(self.last).as_secs_f64() * 1e3;
        self.last = now;
        self.steps.push((p.phase.clone(), p.message.clone(), ms));
        if let Some(m) = &mut self.meter {
            m.mark(part_of_phase(&p.phase));
        }
        if let Some((row, started)) = self.echo {
            if p.step.is_multiple_of(100) || p.step == p.total {
                eprintln!(
                    "  {row}: {} step {}/{} at {:.1} s",
                    p.phase,
                    p.step,
                    p.total,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    fn artifact(&mut self, name: &str, _bytes: Vec<u8>) -> Result<()> {
        let synthesis = self.echo.is_some_and(|(row, _)| row == "synth_image");
        if let Some(m) = &mut self.meter {
            m.mark(match name {
                _ if synthesis => "decoding and outputs",
                "preview.png" => "preview rendering",
                _ => "outputs",
            });
        }
        Ok(())
    }
}

/// A synthetic scene: a smooth colour pattern with two disc-shaped instances.
fn bench_scene(size: u32) -> Scene {
    let s = size as f32;
    let image = RgbImage::from_fn(size, size, |x, y| {
        let (u, v) = (x as f32 / s, y as f32 / s);
        Rgb([
            (255.0 * u) as u8,
            (255.0 * v) as u8,
            (255.0 * (0.5 + 0.5 * (6.0 * u + 4.0 * v).sin())) as u8,
        ])
    });
    let disc = |cx: f32, cy: f32, r: f32| {
        GrayImage::from_fn(size, size, |x, y| {
            let (dx, dy) = (x as f32 / s - cx, y as f32 / s - cy);
            Luma([if dx * dx + dy * dy <= r * r { 255 } else { 0 }])
        })
    };
    Scene {
        files: SceneFiles::new(
            "(bench scene)".into(),
            vec!["(disc 0)".into(), "(disc 1)".into()],
        ),
        image,
        masks: vec![disc(0.3, 0.5, 0.2), disc(0.72, 0.45, 0.16)],
    }
}

/// A plain-model request: "a photo of a cat and a dog", the cat boxed left, the dog right.
fn two_boxes(sd: &StableDiffusion, config: SynthConfig) -> SynthRequest<'_> {
    SynthRequest {
        sd,
        placeholder_rows: None,
        prompt: "a photo of a cat and a dog".into(),
        boxes: vec![
            BoxSpec {
                subject: "cat".into(),
                rect: [0.05, 0.2, 0.45, 0.8],
            },
            BoxSpec {
                subject: "dog".into(),
                rect: [0.55, 0.2, 0.95, 0.8],
            },
        ],
        samples: 1,
        seed: 3,
        config,
    }
}

fn time_op(iters: usize, device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    f()?;
    device.synchronize()?;
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// Checks the row names and counts (what [`run`] checks before loading anything).
pub fn validate(opts: &BenchOptions) -> Result<()> {
    for name in &opts.only {
        if !ROWS.contains(&name.as_str()) && !FULL_ROWS.contains(&name.as_str()) {
            return Err(Error::Input(format!(
                "--only: unknown row `{name}` (rows: {}, {})",
                ROWS.join(", "),
                FULL_ROWS.join(", ")
            )));
        }
    }
    if opts.iters == 0 {
        return Err(Error::Input("--iters must be at least 1".into()));
    }
    match (&opts.shape, opts.size) {
        (None, Some(_)) => Err(Error::Input(
            "--size applies to --shape only (a model folder runs at its own resolution)".into(),
        )),
        (Some(shape), Some(size)) => {
            let step = shape.vae.factor() * 8;
            if size == 0 || !(size as usize).is_multiple_of(step) {
                return Err(Error::Input(format!(
                    "--size {size}: must be a positive multiple of {step}"
                )));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Runs the benchmark; `progress` gets one line per finished row.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&BenchRow)) -> Result<BenchReport> {
    validate(opts)?;
    let dev = &opts.device;
    let sd = match &opts.shape {
        Some(shape) => {
            let mut shape = shape.clone();
            if let Some(size) = opts.size {
                shape.unet.sample_size = size as usize / shape.vae.factor();
            }
            if opts.model.is_single_file() {
                return Err(Error::Input(
                    "--shape takes its tokenizer and scheduler from a diffusers folder: --model cannot be a single-file checkpoint".into(),
                ));
            }
            StableDiffusion::synthetic(&opts.model.path, &shape, 0, opts.dtype, dev)?
        }
        None if opts.size.is_some() => {
            return Err(Error::Input(
                "--size applies to --shape only (a model folder runs at its own resolution)".into(),
            ))
        }
        None => StableDiffusion::load_source(&opts.model, opts.dtype, dev, Vec::new())?,
    };
    let factor = sd.vae.config().factor();
    let size = (sd.unet.config().sample_size * factor) as u32;
    let probe = MemoryProbe::new(dev);
    let named = |name: &str| opts.only.iter().any(|o| o == name);
    let wanted = |name: &str| {
        if FULL_ROWS.contains(&name) {
            named(name) || (opts.full && opts.only.is_empty())
        } else {
            named(name) || (opts.only.is_empty() && !opts.full)
        }
    };
    let mut rows = Vec::new();
    let mut push =
        |rows: &mut Vec<BenchRow>, name: &str, label: String, ms: &[f64], note: String| {
            let (median_ms, min_ms) = median_min(ms);
            let row = BenchRow {
                name: name.to_string(),
                label,
                median_ms,
                min_ms,
                runs: ms.len(),
                peak_mib: probe.peak_mib(),
                note,
            };
            progress(&row);
            rows.push(row);
        };
    let n = opts.iters;
    let lat = size as usize / factor;
    let in_ch = sd.unet.config().in_channels;

    // ---- components ----
    let ids = Tensor::new(sd.tokenizer.encode("a photo of a cat and a dog")?, dev)?.unsqueeze(0)?;
    if wanted("text_encode") {
        probe.reset();
        let ms = if sd.is_xl() {
            let px = (size as usize, size as usize);
            time_op(n, dev, || {
                sd.encode_prompt("a photo of a cat and a dog", None, px)
                    .map(|_| ())
            })?
        } else {
            time_op(n, dev, || sd.text_encoder.forward(&ids, None).map(|_| ()))?
        };
        push(
            &mut rows,
            "text_encode",
            if sd.is_xl() {
                "text encoding (1×77, both encoders, frozen)".into()
            } else {
                "text encoding (1×77, frozen)".into()
            },
            &ms,
            String::new(),
        );
    }
    let image = Tensor::randn(0f32, 0.5, (1, 3, size as usize, size as usize), dev)?
        .to_dtype(opts.dtype)?;
    let latent = Tensor::randn(0f32, 1.0, (1, in_ch, lat, lat), dev)?.to_dtype(opts.dtype)?;
    if wanted("vae_encode") {
        probe.reset();
        let ms = time_op(n, dev, || sd.vae.encode(&image).map(|_| ()))?;
        push(
            &mut rows,
            "vae_encode",
            format!("VAE encode ({size}² → {lat}²)"),
            &ms,
            String::new(),
        );
    }
    if wanted("vae_decode") {
        probe.reset();
        let ms = time_op(n, dev, || sd.vae.decode(&latent).map(|_| ()))?;
        push(
            &mut rows,
            "vae_decode",
            format!("VAE decode ({lat}² → {size}²)"),
            &ms,
            String::new(),
        );
    }
    if wanted("unet_forward") {
        let cond = sd.encode_prompt(
            "a photo of a cat and a dog",
            None,
            (size as usize, size as usize),
        )?;
        let ctx2 = crate::model::Conditioning::cat(&cond, &cond)?;
        let x2 = Tensor::cat(&[&latent, &latent], 0)?;
        let t = Tensor::new(&[500f32], dev)?.to_dtype(opts.dtype)?;
        probe.reset();
        let ms = time_op(n, dev, || sd.unet_forward(&x2, &t, &ctx2, None).map(|_| ()))?;
        push(
            &mut rows,
            "unet_forward",
            "UNet forward, CFG batch 2, no hook".into(),
            &ms,
            String::new(),
        );
    }

    // ---- learning: the real loop, timed per step ----
    let scene = bench_scene(size);
    let learn = |mode: &str, phase_a: u64, phase_b: u64| -> Result<StepClock> {
        let mut cfg = LearnConfig::paper();
        cfg.reward_steps = phase_a.div_ceil(2);
        cfg.penalty_steps = phase_a / 2;
        cfg.dreambooth = mode.to_string();
        cfg.dreambooth_steps = phase_b;
        cfg.preview = false;
        cfg.checkpoint_every = 0;
        cfg.prior_preservation = false;
        // Every step with its attention term (the paper applies it for t ≤ 700 only).
        cfg.t_max_attn = u64::MAX;
        let mut clock = StepClock::new();
        crate::learn::run(
            LearnRequest {
                sd: &sd,
                scene: &scene,
                config: cfg,
                seed: 1,
                resume: None,
                class_images: Vec::new(),
                measure_only: true,
            },
            &mut clock,
        )?;
        Ok(clock)
    };
    let is_a = |p: &str, _: &str| p == "reward" || p == "penalty";
    let is_b = |p: &str, _: &str| p == "dreambooth";
    if wanted("learn_phase_a") || wanted("learn_phase_b_lora") {
        probe.reset();
        let a = if wanted("learn_phase_a") {
            n as u64 + 1
        } else {
            1
        };
        let b = if wanted("learn_phase_b_lora") {
            n as u64 + 1
        } else {
            0
        };
        let clock = learn(if b > 0 { "lora" } else { "none" }, a, b)?;
        if wanted("learn_phase_a") {
            push(
                &mut rows,
                "learn_phase_a",
                "learning phase-A iteration (embeddings)".into(),
                &clock.times(n, is_a),
                "text enc + UNet fwd/bwd + attention loss + AdamW".into(),
            );
        }
        if b > 0 {
            push(
                &mut rows,
                "learn_phase_b_lora",
                "learning phase-B iteration, LoRA".into(),
                &clock.times(n, is_b),
                format!("rank {}", LearnConfig::paper().lora_rank),
            );
        }
    }
    if wanted("learn_phase_b_full") {
        probe.reset();
        let clock = learn("full", 1, n as u64 + 1)?;
        push(
            &mut rows,
            "learn_phase_b_full",
            "learning phase-B iteration, full fine-tuning".into(),
            &clock.times(n, is_b),
            String::new(),
        );
    }

    // ---- synthesis: the real loop on a plain prompt with two boxes ----
    let synth_rows = ["synth_step", "synth_step_latent_opt", "kmeans_refine"];
    if synth_rows.iter().any(|r| wanted(r)) {
        let mut cfg = SynthConfig::preset("paper")?;
        let reps = n + 1;
        cfg.guided_steps = if wanted("synth_step_latent_opt") {
            reps
        } else {
            0
        };
        cfg.refine_every = 2;
        // Alternating refine / plain steps; one pair more than needed, since the first
        // refinement point comes before any maps exist when no step is guided.
        cfg.steps = cfg.guided_steps + 2 * reps + 2;
        // Always the full number of descent iterations (random weights rarely reach the
        // loss threshold either; this fixes the work per step).
        cfg.loss_threshold = 0.0;
        let req = two_boxes(&sd, cfg.clone());
        probe.reset();
        let mut clock = StepClock::new();
        // The synthesis loop renders at the model's resolution.
        let report = crate::synth::run(&req, &mut clock)?;
        // The first refinement starts K-means from `kmeans_restarts` random draws; later ones
        // start from the previous centres.
        let all_refines: Vec<f64> = report
            .samples
            .iter()
            .flat_map(|s| s.refine_ms.iter().copied())
            .collect();
        let cold_ms = all_refines.first().copied().unwrap_or(f64::NAN);
        let warm = all_refines.get(1..).unwrap_or_default();
        let refine_ms = warm[warm.len().saturating_sub(n)..].to_vec();
        let plain = clock.times(n, |p, m| p == "denoise" && !m.contains("masks refined"));
        let guided = clock.times(n, |p, _| p == "guided");
        let iters = clock.metrics.get("gd_iters").cloned().unwrap_or_default();
        let mean_iters = iters.iter().sum::<f64>() / iters.len().max(1) as f64;
        if wanted("synth_step") {
            push(
                &mut rows,
                "synth_step",
                "synthesis step (CFG batch 2, box control)".into(),
                &plain,
                String::new(),
            );
        }
        if wanted("synth_step_latent_opt") {
            push(
                &mut rows,
                "synth_step_latent_opt",
                "synthesis step with latent optimisation".into(),
                &guided,
                format!("{mean_iters:.1} descent iterations + 1 loss pass per step"),
            );
        }
        if wanted("kmeans_refine") {
            push(
                &mut rows,
                "kmeans_refine",
                "K-means mask refinement".into(),
                &refine_ms,
                format!(
                    "{} clusters per subject, from the previous centres; the first, from {} random starts: {cold_ms:.2} ms",
                    cfg.clusters_per_subject, cfg.kmeans_restarts
                ),
            );
        }
    }

    // ---- whole runs ----
    let mut breakdown = Vec::new();
    let weights_bytes = sd.weight_bytes();
    if wanted("synth_image") {
        let mut cfg = SynthConfig::preset("paper")?;
        if let Some(n) = opts.full_steps {
            cfg.steps = n.max(1) as usize;
            cfg.guided_steps = cfg.steps / 3;
        }
        let req = two_boxes(&sd, cfg.clone());
        probe.reset();
        let started = Instant::now();
        let mut clock = StepClock::echoing("synth_image", dev);
        crate::synth::run(&req, &mut clock)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if let Some(mut m) = clock.meter.take() {
            m.mark("decoding and outputs");
            let none = BTreeMap::new();
            breakdown.extend(breakdown_rows(
                "synth_image",
                &m.parts,
                weights_bytes,
                &none,
            ));
        }
        push(
            &mut rows,
            "synth_image",
            "one synthesised image, paper preset".into(),
            &[ms],
            format!(
                "{} steps, {} with latent optimisation, decoding included",
                cfg.steps, cfg.guided_steps
            ),
        );
    }

    if wanted("learn_run") {
        let mut cfg = LearnConfig::paper();
        cfg.dreambooth = "lora".into();
        if let Some(n) = opts.full_steps {
            cfg.reward_steps = n.div_ceil(2);
            cfg.penalty_steps = n / 2;
            cfg.dreambooth_steps = n;
            cfg.preview_steps = n;
        }
        probe.reset();
        let mut clock = StepClock::echoing("learn_run", dev);
        let started = Instant::now();
        let report = crate::learn::run(
            LearnRequest {
                sd: &sd,
                scene: &scene,
                config: cfg.clone(),
                seed: 1,
                resume: None,
                class_images: Vec::new(),
                measure_only: false,
            },
            &mut clock,
        )?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if let Some(mut m) = clock.meter.take() {
            m.mark("outputs");
            let parts = &m.parts;
            breakdown.extend(breakdown_rows(
                "learn_run",
                parts,
                weights_bytes,
                &report.memory,
            ));
        }
        push(
            &mut rows,
            "learn_run",
            "whole learning run, paper preset, LoRA phase B".into(),
            &[ms],
            format!(
                "{} + {} iterations, outputs and checkpoints included",
                cfg.embedding_steps(),
                cfg.dreambooth_steps
            ),
        );
    }
    Ok(BenchReport {
        model: match &opts.shape {
            Some(s) => format!(
                "{} (random weights; tokenizer from {})",
                s.name,
                opts.model.path.display()
            ),
            None if opts.model.kind == crate::model::SourceKind::Folder => {
                opts.model.path.display().to_string()
            }
            None => opts.model.describe(),
        },
        device: match dev.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cpu".into(),
        },
        dtype: format!("{:?}", opts.dtype).to_lowercase(),
        size,
        threads: crate::cpu_threads::count(),
        memory: probe.describe(dev),
        attention: attention_path(dev).into(),
        checkpointing: crate::model::checkpoint::Checkpointing::from_env(dev)
            .name()
            .into(),
        rows,
        breakdown,
    })
}

/// The attention path the unhooked calls take on `dev`.
fn attention_path(dev: &Device) -> &'static str {
    use crate::model::blocked_attention::{path, AttentionPath};
    match path() {
        AttentionPath::Blocked if dev.is_cpu() => "blocked",
        _ => "full",
    }
}

/// The report as a table (what `mifo bench` prints).
pub fn table(report: &BenchReport) -> String {
    let mut out = format!(
        "model: {}\ndevice: {} ({} threads), dtype {}, image {}², attention {}, checkpointing {}; \
         peak memory: {}\n",
        report.model,
        report.device,
        report.threads,
        report.dtype,
        report.size,
        report.attention,
        report.checkpointing,
        report.memory
    );
    out.push_str(&format!(
        "{:<22} {:>11} {:>11} {:>5} {:>10}  {}\n",
        "row", "median ms", "min ms", "runs", "peak MiB", "what"
    ));
    for r in &report.rows {
        out.push_str(&row_line(r));
        out.push('\n');
    }
    if !report.breakdown.is_empty() {
        out.push_str(&breakdown_table(&report.breakdown));
    }
    out
}

/// The breakdown of the whole runs as a table.
pub fn breakdown_table(rows: &[BreakdownRow]) -> String {
    let mut out = String::from(
        "\nwhole runs, part by part (MiB): peak = measured peak resident set; weights, trained, \
         optimiser, conv tiles = exact sizes held; before = measured resident set at the part's \
         start not counted in those; working = estimate (peak less the rest: activations kept \
         for the backward, transient buffers)\n",
    );
    out.push_str(&format!(
        "{:<12} {:<21} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6} {:>7} {:>8}\n",
        "run",
        "part",
        "seconds",
        "peak",
        "weights",
        "trained",
        "optimiser",
        "tiles",
        "before",
        "working"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:<12} {:<21} {:>9.2} {:>8.1} {:>8.1} {:>8.2} {:>9.2} {:>6.1} {:>7.1} {:>8.1}\n",
            r.run,
            r.part,
            r.seconds,
            r.peak_mib,
            r.weights_mib,
            r.trained_mib,
            r.optimiser_mib,
            r.conv_tiles_mib,
            r.resident_before_mib,
            r.working_mib
        ));
    }
    out
}

/// One table line.
pub fn row_line(r: &BenchRow) -> String {
    let peak = r
        .peak_mib
        .map(|m| format!("{m:.0}"))
        .unwrap_or_else(|| "-".into());
    let what = if r.note.is_empty() {
        r.label.clone()
    } else {
        format!("{} [{}]", r.label, r.note)
    };
    format!(
        "{:<22} {:>11.2} {:>11.2} {:>5} {:>10}  {}",
        r.name, r.median_ms, r.min_ms, r.runs, peak, what
    )
}
