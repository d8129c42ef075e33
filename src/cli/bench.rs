//! `mifo bench`: the timing table of the pipeline's operations (see [`crate::bench`]).

use std::path::PathBuf;

use clap::Args;

use crate::bench::{self, BenchOptions};
use crate::model::{enable_precision, parse_device, resolve_dtype, ModelShape};

/// Arguments of `mifo bench`.
#[derive(Args, Debug)]
#[command(after_help = "\
Rows: text_encode, vae_encode, vae_decode, unet_forward, learn_phase_a, learn_phase_b_lora,
learn_phase_b_full, synth_step, synth_step_latent_opt, kmeans_refine. Learning and synthesis rows
time whole iterations of the real loops; the first iteration of each kind is a warm-up.
With --full (or named in --only): learn_run and synth_image, whole runs timed once.

Environment (for before/after comparisons; every command reads them):
  MIFO_ATTENTION=full     hold the [N, M] attention probabilities (default: blocked on the CPU)
  MIFO_CHECKPOINT=off     keep every activation of the frozen models for the backward (default
                          on the CPU `large`: recompute the units whose input has >= 32 Ki
                          values; `all`: every unit): learning phase A's memory against its time

Examples:
  mifo bench                                    # the bundled tiny model, CPU
  mifo bench --shape sd21-base --size 256 --iters 1   # SD 2.1-base shapes on a CPU box
  mifo bench --shape sd21-base --device cuda --iters 5 # SD 2.1-base at 512 on a GPU
  mifo bench --shape sdxl-base --device cuda --iters 3 # SDXL base 1.0 at 1024 on a GPU
  python tools/bench_diffusers.py               # the same rows with diffusers/PyTorch")]
pub struct BenchArgs {
    /// The model to time: a diffusers folder, a single-file checkpoint or a cached repo id
    /// [default: the bundled fixtures/tiny-sd21, for --shape sdxl-base fixtures/tiny-sdxl]; with
    /// --shape only the folder's tokenizers and scheduler are used.
    #[arg(long, env = "MIFO_MODEL")]
    pub model: Option<PathBuf>,
    /// `--revision` / `--model-config` for --model.
    #[command(flatten)]
    pub source: crate::cli::SourceArgs,
    /// Time a known architecture with seeded random weights instead of the folder's weights:
    /// `sd21-base` (Stable Diffusion 2.1-base: 865M-parameter UNet, OpenCLIP-H text encoder) or
    /// `sdxl-base` (SDXL base 1.0: 2.6B-parameter UNet, CLIP ViT-L and OpenCLIP bigG; the
    /// tokenizers come from the bundled fixtures/tiny-sdxl unless --model names an SDXL folder).
    #[arg(long)]
    pub shape: Option<String>,
    /// Image side in pixels for --shape [default: the shape's own (512 / 1024) on CUDA; 256 on CPU, where SD-sized
    /// backward passes at 512 need more memory than a typical workstation has].
    #[arg(long)]
    pub size: Option<u32>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight dtype: f32, tf32 (f32 with TF32 matrix products), f16 or bf16; tf32 and bf16 on
    /// CUDA only.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Timed runs per row, after one warm-up run.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Only these rows (comma-separated names, see below).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Time whole runs instead: one complete learning run of the paper preset (LoRA phase B,
    /// 800 + 400 iterations) and one synthesised image (50 steps, 15 with latent optimisation);
    /// on the CPU also each run part by part, with the part's peak memory and what held it.
    #[arg(long)]
    pub full: bool,
    /// With --full: N steps per learning phase (A and B), N synthesis steps (a third of them
    /// with latent optimisation) and N preview steps instead of the paper preset's — a quick
    /// look at the time and memory breakdown.
    #[arg(long, value_name = "N", requires = "full")]
    pub full_steps: Option<u64>,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `mifo bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let dtype = resolve_dtype(&args.dtype, &device)?;
    enable_precision(&args.dtype);
    let shape = match args.shape.as_deref() {
        None => None,
        Some("sd21-base") => Some(ModelShape::sd21_base()?),
        Some("sdxl-base") => Some(ModelShape::sdxl_base()?),
        Some(other) => anyhow::bail!("--shape {other}: unknown (known: sd21-base, sdxl-base)"),
    };
    // An SDXL shape takes both tokenizers from the bundled tiny SDXL folder.
    let fixture = if shape.as_ref().is_some_and(|s| s.text_encoder_2.is_some()) {
        "tiny-sdxl"
    } else {
        "tiny-sd21"
    };
    let model = match args.model.clone() {
        Some(m) => crate::jobs::model_source(&args.source.flags(Some(m)))?,
        None => crate::model::ModelSource::folder(
            super::demo::fixtures_dir(None, fixture)?.join(fixture),
        ),
    };
    let size = match (&shape, args.size) {
        (Some(_), None) if device.is_cpu() => Some(256),
        (_, s) => s,
    };
    let opts = BenchOptions {
        model,
        shape,
        device,
        dtype,
        iters: args.iters,
        size,
        only: args.only,
        full: args.full,
        full_steps: args.full_steps,
    };
    let json = args.json;
    bench::validate(&opts)?;
    if !json {
        eprintln!(
            "timing {} rows, {} runs each after a warm-up (one line per finished row)…",
            match (opts.only.len(), opts.full) {
                (0, false) => bench::ROWS.len(),
                (0, true) => bench::FULL_ROWS.len(),
                (n, _) => n,
            },
            opts.iters
        );
    }
    let report = bench::run(&opts, &mut |row| {
        if !json {
            eprintln!("  {}", bench::row_line(row));
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench::table(&report));
    }
    Ok(())
}
