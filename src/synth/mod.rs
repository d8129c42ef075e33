//! The synthesis stage (paper Algorithm 2, notes §4): Stable Diffusion with box control.
//!
//! [`run`] draws `samples` images of `prompt`, each subject named by a [`BoxSpec`] confined to
//! its box: masks in every attention layer at every step, latent optimisation in the first
//! `guided_steps` steps, and from then on the boxes replaced by self-attention cluster masks.
//! See [`control`] for the masks, the loss and the token rules, [`cluster`] for the refinement,
//! [`config::SynthConfig`] for every knob.
//!
//! # One denoising step i (t = `timesteps[i]`; notes §4.7)
//! 1. If `i < guided_steps` (and `latent_opt`): up to `gd_iters` gradient iterations on the
//!    conditional half (batch 1, the latent a `Var`, UNet weights constant). Before each
//!    iteration the loop stops if the previous iteration's loss/(batch·subjects) was below
//!    `loss_threshold`; each iteration computes the loss L and sets z ← z − β_i·∇_z L. One
//!    more forward pass without gradient measures the loss at the final z.
//! 2. If `i ≥ guided_steps` and `(i − guided_steps) % refine_every == 0` (and `refine`): the
//!    cluster masks are rebuilt from the running-mean maps of all earlier normal passes.
//! 3. The normal pass on `[z, z]` with `[uncond, cond]` text, classifier-free guidance and the
//!    DDIM (eta 0) update.
//!
//! # What is reported through the [`RunSink`]
//! Metric steps are global: the step of denoising step i of sample k is `k·steps + i`, so the
//! curves of several samples follow each other.
//! * `loss/box` — the latent-optimisation loss L at the start of a guided step (before any
//!   update); `loss/box_after` — L at the latent after the step's updates (both un-normalised,
//!   i.e. summed over subjects); `gd_iters` — gradient updates done; `alpha` — α(t) used. Only
//!   at guided steps with `box_control` and `latent_opt`.
//! * `leak/<subject>` — every step when `attn_metrics`: the share of the subject's cross-attention
//!   outside its box, read from the attention before the box bias (definition in [`control`]).
//! * Artifacts per sample k: `sample_{k}.png`, `boxes_{k}.png`, `masks_{k}.png` (the refined
//!   masks, or the boxes when no refinement ran), `attn/{subject}_{k}.png` (the last step's
//!   cross-attention of the subject's tokens, head-mean over `cluster_layers`, when
//!   `attn_metrics`).
//! * A progress report after every step; [`RunSink::should_stop`] is checked before every step,
//!   and a stop ends the run with `Ok(report)` where `report.cancelled` is true (samples already
//!   finished keep their artifacts; the interrupted one emits none). With `joint_stop` the
//!   samples run in lockstep (step i of every sample before step i + 1, the guidance iterations
//!   of a step stopped together on the loss summed over samples), so a stop leaves none.

pub mod boxes;
pub mod cluster;
pub mod config;
pub mod control;
pub mod render;

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

pub use boxes::{parse_box, BoxSpec};
pub use config::{LossForm, SynthConfig, SynthMethod};
pub use control::{TokenPlan, STOP_WORDS};

use crate::error::{Error, Result};
use crate::imageio::{heat_overlay, png_bytes, tensor_to_rgb};
use crate::model::ddim::{timesteps_tensor, Ddim, DdimConfig};
use crate::model::unet::UNetConfig;
use crate::model::{Conditioning, StableDiffusion, UNet};
use crate::sink::{Progress, RunSink};
use cluster::{KMeansOptions, RefineInput};
use control::{layer_mean, path_matches, plan_tokens, ControlHook, Pass, Regions};

/// Overlap (as a fraction of the smaller box) above which [`validate`] warns.
pub const OVERLAP_WARN_FRACTION: f64 = 0.5;

/// Everything one synthesis run needs.
#[derive(Clone)]
pub struct SynthRequest<'a> {
    /// The model; its tokenizer already knows the placeholders of the learned run.
    pub sd: &'a StableDiffusion,
    /// Embedding rows `[N, hidden]` of the placeholders, for token ids `vocab..vocab+N` of the
    /// text encoder's vocabulary; `None` for a plain model.
    pub placeholder_rows: Option<Tensor>,
    /// The prompt, e.g. `a photo of <v0> and <v1> on the beach`.
    pub prompt: String,
    /// One box per controlled subject.
    pub boxes: Vec<BoxSpec>,
    /// Number of images.
    pub samples: usize,
    /// Sample k starts from the latent drawn with seed `seed + k`.
    pub seed: u64,
    /// The configuration.
    pub config: SynthConfig,
}

/// Per-sample outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleReport {
    /// Sample index k.
    pub index: usize,
    /// Seed of its initial latent (`seed + k`).
    pub seed: u64,
    /// `leak/<subject>` at the final step (empty without `attn_metrics`).
    pub final_leak: BTreeMap<String, f64>,
    /// Steps at which the latent optimisation ran.
    pub guided_steps: usize,
    /// Of those, the steps where `loss/box_after` < `loss/box`.
    pub guided_lowered: usize,
    /// Mask refinements done.
    pub refinements: usize,
    /// Subjects whose refined mask came out empty at least once and fell back to the box.
    pub mask_fallbacks: Vec<String>,
    /// Wall time of this sample (denoising, decoding and rendering), seconds.
    pub wall_seconds: f64,
    /// Wall time of each mask refinement (K-means and mask update), milliseconds.
    pub refine_ms: Vec<f64>,
}

/// The outcome of [`run`].
#[derive(Clone, Debug, PartialEq)]
pub struct SynthReport {
    /// Finished samples, in order.
    pub samples: Vec<SampleReport>,
    /// Warnings from [`validate`] (also logged).
    pub warnings: Vec<String>,
    /// The token plan (subject token positions, EOS, stop words).
    pub plan: TokenPlan,
    /// True when [`RunSink::should_stop`] ended the run early.
    pub cancelled: bool,
    /// Wall time of the whole run, seconds (text encoding included).
    pub wall_seconds: f64,
}

/// Module-path prefixes of the UNet's transformer blocks (`down_blocks.i.attentions.j`,
/// `mid_block.attentions.0`, `up_blocks.i.attentions.j`), from its config.
pub fn attention_blocks(cfg: &UNetConfig) -> Vec<String> {
    let n = cfg.block_out_channels.len();
    let mut out = Vec::new();
    for i in 0..n {
        if cfg.down_attn[i] {
            for j in 0..cfg.layers_per_block[i] {
                out.push(format!("down_blocks.{i}.attentions.{j}"));
            }
        }
    }
    out.push("mid_block.attentions.0".to_string());
    for i in 0..n {
        if cfg.up_attn[i] {
            for j in 0..cfg.layers_per_block[n - 1 - i] + 1 {
                out.push(format!("up_blocks.{i}.attentions.{j}"));
            }
        }
    }
    out
}

fn check_layers(key: &str, prefixes: &[String], blocks: &[String]) -> Result<()> {
    for p in prefixes {
        let hit = blocks.iter().any(|b| {
            path_matches(b, std::slice::from_ref(p)) || path_matches(p, std::slice::from_ref(b))
        });
        if !hit {
            return Err(Error::Config(format!(
                "synth.{key}: `{p}` matches no attention layer of this UNet (its blocks: {})",
                blocks.join(", ")
            )));
        }
    }
    if prefixes.is_empty() {
        return Err(Error::Config(format!(
            "synth.{key}: needs at least one layer prefix"
        )));
    }
    Ok(())
}

/// On SDXL, the default layer lists (written for SD: the mid block and the first decoder level
/// with attention, `up_blocks.1` there) name the same structural levels of this UNet: the mid block
/// and its first decoder level with attention (`up_blocks.0` in SDXL base, 32² latents at
/// 1024 px). Lists the user set are kept as given.
fn xl_layer_defaults(config: &mut SynthConfig, unet: &UNetConfig) {
    let defaults = SynthConfig::default();
    let Some(first_up) = unet.up_attn.iter().position(|&a| a) else {
        return;
    };
    let level = format!("up_blocks.{first_up}");
    if config.loss_layers == defaults.loss_layers {
        config.loss_layers = vec!["mid_block".into(), level.clone()];
    }
    if config.cluster_layers == defaults.cluster_layers {
        config.cluster_layers = vec![level];
    }
}

struct Prepared {
    plan: TokenPlan,
    warnings: Vec<String>,
}

impl SynthRequest<'_> {
    /// The request with the configuration the sampler runs ([`SynthConfig::effective`]).
    fn effective(&self) -> Self {
        let mut config = self.config.effective();
        if self.sd.is_xl() {
            xl_layer_defaults(&mut config, self.sd.unet.config());
        }
        Self {
            config,
            ..self.clone()
        }
    }
}

fn prepare(req: &SynthRequest) -> Result<Prepared> {
    let cfg = &req.config;
    cfg.check()?;
    if req.samples == 0 {
        return Err(Error::Input("--samples must be at least 1".into()));
    }
    for b in &req.boxes {
        b.check()?;
    }
    if cfg.box_control && req.boxes.is_empty() {
        return Err(Error::Input(
            "box control needs at least one --box SUBJECT=x0,y0,x1,y1 (or set synth.box_control=false)".into(),
        ));
    }
    let subjects: Vec<String> = req.boxes.iter().map(|b| b.subject.clone()).collect();
    let plan = plan_tokens(&req.sd.tokenizer, &req.prompt, &subjects)?;
    let base = req.sd.text_encoder.config().vocab_size;
    let rows = match &req.placeholder_rows {
        Some(r) => r.dim(0)?,
        None => 0,
    };
    if let Some(r) = &req.placeholder_rows {
        let (want, got) = (req.sd.placeholder_width(), r.dim(1)?);
        if got != want {
            return Err(Error::Input(format!(
                "placeholder embeddings are {got} wide, the model's text encoders take {want}"
            )));
        }
    }
    for (id, tok) in plan.ids.iter().zip(&plan.tokens) {
        if *id as usize >= base + rows {
            return Err(Error::Input(format!(
                "prompt token `{tok}` (id {id}) is a placeholder without an embedding: {rows} placeholder rows were given"
            )));
        }
    }
    let blocks = attention_blocks(req.sd.unet.config());
    check_layers("loss_layers", &cfg.loss_layers, &blocks)?;
    check_layers("cluster_layers", &cfg.cluster_layers, &blocks)?;
    let mut warnings = boxes::overlap_warnings(&req.boxes, OVERLAP_WARN_FRACTION);
    if !cfg.box_control && !req.boxes.is_empty() {
        warnings.push(if cfg.synth_method() == SynthMethod::Plain {
            "synth.method=plain: the boxes are only drawn as overlays".into()
        } else {
            "synth.box_control=false: the boxes are only used for the leak metric and the overlays"
                .into()
        });
    }
    Ok(Prepared { plan, warnings })
}

/// Checks a request without running it: the config, every box (coordinates, a subject that
/// occurs in the prompt and is not a stop word, no subject twice), placeholder embeddings for
/// every placeholder in the prompt, and that the layer prefixes exist in the UNet. Errors are
/// one line ([`Error::Input`] / [`Error::Config`]); the result is the list of warnings (boxes
/// overlapping by more than half of the smaller one). A placeholder in the prompt that no box
/// names is fine: it is just not box-controlled.
pub fn validate(req: &SynthRequest) -> Result<Vec<String>> {
    Ok(prepare(&req.effective())?.warnings)
}

/// The seeded initial latent [1, C, h, w] (host RNG, standard normal).
pub fn initial_latent(sd: &StableDiffusion, seed: u64) -> Result<Tensor> {
    let c = sd.unet.config().in_channels;
    let s = sd.unet.config().sample_size;
    let mut rng = StdRng::seed_from_u64(seed);
    let data: Vec<f32> = (0..c * s * s)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(data, (1, c, s, s), &sd.device)?.to_dtype(sd.dtype)?)
}

/// The image size (height, width) in pixels of the model's default latent.
fn image_size(sd: &StableDiffusion) -> (usize, usize) {
    let s = sd.unet.config().sample_size;
    sd.image_size((s, s))
}

/// Result of the gradient iterations of one guided step.
struct GuidedStep {
    z: Tensor,
    before: f64,
    after: f64,
    iters: usize,
    /// α of the CA term of the step's first iteration.
    alpha: f64,
}

fn guidance_loss(
    unet: &UNet,
    hook: &mut ControlHook,
    z: &Tensor,
    t: &Tensor,
    cond: &Conditioning,
    alpha: (f64, f64),
) -> Result<Tensor> {
    hook.begin(Pass::Guidance);
    unet.forward_cond(z, t, &cond.context, cond.added.as_ref(), Some(hook))?;
    if !hook.has_loss_terms() {
        return Err(Error::Config(
            "synth.loss_layers: no attention layer of the enabled kinds (sa_control / ca_control) matched".into(),
        ));
    }
    hook.loss(alpha)
}

/// What the latent optimisation of one denoising step works with (besides the hook and the
/// latent it moves).
#[derive(Clone, Copy)]
struct GuidanceInputs<'a> {
    unet: &'a UNet,
    /// The step's timestep tensor.
    t: &'a Tensor,
    /// The prompt's text embedding (the guidance passes run without CFG).
    cond: &'a Conditioning,
    cfg: &'a SynthConfig,
    /// The denoising step's index (for α and the step size).
    step: usize,
    /// Number of subjects (the loss is normalised by it).
    subjects: usize,
}

/// One iteration's move of the latent, `step·grad`, scaled down to a root-mean-square of
/// `max_step` per element when it is larger and `max_step` > 0 (`synth.max_step`).
fn latent_move(grad: &Tensor, step: f64, max_step: f64) -> Result<Tensor> {
    let mv = (grad * step)?;
    if max_step <= 0.0 {
        return Ok(mv);
    }
    let rms = mv
        .to_dtype(DType::F64)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?
        .sqrt();
    Ok(if rms > max_step {
        (mv * (max_step / rms))?
    } else {
        mv
    })
}

/// Runs the latent optimisation of one guided step. `calls` counts the loss terms evaluated by
/// the optimisation so far in this sample (two per iteration: CA, SA), the released code's α
/// counter (`synth.alpha_index = code`); it is advanced here.
fn optimise_latent(
    hook: &mut ControlHook,
    z: &Tensor,
    inputs: GuidanceInputs,
    calls: &mut usize,
) -> Result<GuidedStep> {
    let GuidanceInputs {
        unet,
        t,
        cond,
        cfg,
        step,
        subjects,
    } = inputs;
    let first_alpha = cfg.alpha_pair(step, *calls).0;
    let beta = cfg.step_size(step);
    let norm = subjects.max(1) as f64; // batch 1 per sample
    let mut z = z.clone();
    let mut before = None;
    let mut prev_norm = f64::INFINITY;
    let mut iters = 0;
    // With `backtrack`: the last latent whose loss was measured, that loss, its gradient, and
    // the step scale (halved on each rejected iteration).
    let mut accepted: Option<(Tensor, f64, Tensor)> = None;
    let mut scale = 1.0;
    for _ in 0..cfg.gd_iters {
        if prev_norm < cfg.loss_threshold {
            break;
        }
        let var = Var::from_tensor(&z)?;
        let alpha = cfg.alpha_pair(step, *calls);
        *calls += 2;
        let loss = guidance_loss(unet, hook, var.as_tensor(), t, cond, alpha)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Input(format!(
                "latent optimisation: the box loss is {value} at step {step}"
            )));
        }
        if cfg.backtrack {
            if let Some((z0, v0, g0)) = &accepted {
                if value > *v0 {
                    hook.begin(Pass::Guidance); // drop the rejected latent's graph
                    scale *= 0.5;
                    z = (z0 - latent_move(g0, beta * scale, cfg.max_step)?)?.detach();
                    continue;
                }
            }
        }
        before.get_or_insert(value);
        prev_norm = value / norm;
        let grads = loss.backward()?;
        hook.begin(Pass::Guidance); // drop the graph held by the loss terms
        let g = grads.get(var.as_tensor()).ok_or_else(|| {
            Error::Input("latent optimisation: the loss does not depend on the latent".into())
        })?;
        z = (var.as_tensor() - latent_move(g, beta * scale, cfg.max_step)?)?.detach();
        if cfg.backtrack {
            accepted = Some((var.as_tensor().detach(), value, g.detach()));
        }
        iters += 1;
    }
    // Measured with the α the next iteration would use; not counted (the released code has no
    // such evaluation).
    let mut after = guidance_loss(unet, hook, &z, t, cond, cfg.alpha_pair(step, *calls))?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if let Some((z0, v0, _)) = accepted.filter(|(_, v0, _)| after > *v0) {
        z = z0;
        after = v0;
    }
    hook.begin(Pass::Normal);
    Ok(GuidedStep {
        z,
        before: before.unwrap_or(after),
        after,
        alpha: first_alpha,
        iters,
    })
}

/// The latent optimisation of one guided step over all samples in lockstep
/// (`synth.joint_stop`, the released code's batch): each iteration moves every sample's latent
/// by its own gradient (the summed loss's gradient to one latent is that latent's own loss's),
/// and the loop stops for all of them once the previous iteration's loss summed over samples,
/// divided by samples·subjects, is below `loss_threshold`. The α counter advances by one
/// iteration for all. Backtracking is refused with it (`SynthConfig::check`).
fn optimise_latents_jointly(
    samples: &mut [Sample],
    inputs: GuidanceInputs,
) -> Result<Vec<GuidedStep>> {
    let GuidanceInputs {
        unet,
        t,
        cond,
        cfg,
        step,
        subjects,
    } = inputs;
    let beta = cfg.step_size(step);
    let norm = (samples.len() * subjects.max(1)) as f64;
    let mut before: Vec<Option<f64>> = vec![None; samples.len()];
    let mut iters = 0;
    let first_alpha: Vec<f64> = samples
        .iter()
        .map(|s| cfg.alpha_pair(step, s.alpha_calls).0)
        .collect();
    let mut prev_norm = f64::INFINITY;
    for _ in 0..cfg.gd_iters {
        if prev_norm < cfg.loss_threshold {
            break;
        }
        let mut total = 0.0;
        for (s, first) in samples.iter_mut().zip(before.iter_mut()) {
            let var = Var::from_tensor(&s.z)?;
            let alpha = cfg.alpha_pair(step, s.alpha_calls);
            s.alpha_calls += 2;
            let loss = guidance_loss(unet, &mut s.hook, var.as_tensor(), t, cond, alpha)?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(Error::Input(format!(
                    "latent optimisation: the box loss of sample {} is {value} at step {step}",
                    s.out.index
                )));
            }
            first.get_or_insert(value);
            total += value;
            let grads = loss.backward()?;
            s.hook.begin(Pass::Guidance);
            let g = grads.get(var.as_tensor()).ok_or_else(|| {
                Error::Input("latent optimisation: the loss does not depend on the latent".into())
            })?;
            s.z = (var.as_tensor() - latent_move(g, beta, cfg.max_step)?)?.detach();
        }
        prev_norm = total / norm;
        iters += 1;
    }
    samples
        .iter_mut()
        .zip(before)
        .zip(first_alpha)
        .map(|((s, before), alpha)| {
            let after = guidance_loss(
                unet,
                &mut s.hook,
                &s.z,
                t,
                cond,
                cfg.alpha_pair(step, s.alpha_calls),
            )?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
            s.hook.begin(Pass::Normal);
            Ok(GuidedStep {
                z: s.z.clone(),
                before: before.unwrap_or(after),
                after,
                alpha,
                iters,
            })
        })
        .collect()
}

/// Runs the synthesis (see the module docs for the step order, metrics and artifacts).
pub fn run(req: &SynthRequest, sink: &mut dyn RunSink) -> Result<SynthReport> {
    let started = Instant::now();
    let req = &req.effective();
    let Prepared { plan, warnings } = prepare(req)?;
    for w in &warnings {
        sink.log(&format!("warning: {w}"))?;
    }
    for s in &plan.subjects {
        let toks: Vec<&str> = s
            .positions
            .iter()
            .map(|&p| plan.tokens[p].as_str())
            .collect();
        sink.log(&format!(
            "subject {}: token positions {:?} ({}), leading {}",
            s.name,
            s.positions,
            toks.join(" "),
            s.leading
        ))?;
    }
    let stops: Vec<&str> = plan
        .stop_positions
        .iter()
        .map(|&p| plan.tokens[p].as_str())
        .collect();
    sink.log(&format!(
        "eos position {}; stop words{}: {}",
        plan.eos,
        if req.config.hide_stop_words {
            " (hidden)"
        } else {
            " (not hidden)"
        },
        if stops.is_empty() {
            "none".to_string()
        } else {
            stops.join(" ")
        }
    ))?;

    let sd = req.sd;
    let cfg = &req.config;
    let ddim = Ddim::new(DdimConfig {
        steps_offset: cfg.steps_offset,
        ..sd.scheduler.config().clone()
    })?;
    let timesteps = ddim.timesteps(cfg.steps)?;
    let rows = req.placeholder_rows.as_ref();
    let size = image_size(sd);
    let cond = sd.encode_prompt_ids(&plan.ids, &req.prompt, rows, size)?;
    let uncond = sd.encode_negative("", rows, size)?;
    let context = Conditioning::cat(&uncond, &cond)?;

    let mut report = SynthReport {
        samples: Vec::new(),
        warnings,
        plan: plan.clone(),
        cancelled: false,
        wall_seconds: 0.0,
    };
    let setup = SampleSetup {
        plan: &plan,
        ddim: &ddim,
        timesteps: &timesteps,
        cond: &cond,
        context: &context,
    };
    if req.config.joint_stop && req.samples > 1 {
        // Lockstep: every sample takes step i before any takes step i + 1.
        let mut samples = (0..req.samples)
            .map(|k| Sample::new(req, &plan, k))
            .collect::<Result<Vec<_>>>()?;
        for (i, &t) in timesteps.iter().enumerate() {
            if sink.should_stop() {
                report.cancelled = true;
                sink.log(&format!(
                    "cancelled at step {i}: the {} samples, run in lockstep, are all unfinished",
                    req.samples
                ))?;
                break;
            }
            let guided = samples[0].guided_at(i);
            let steps: Vec<Option<GuidedStep>> = if guided {
                let t = timesteps_tensor(&[t], &sd.device)?;
                let inputs = guidance_inputs(req, setup, &t, i);
                optimise_latents_jointly(&mut samples, inputs)?
                    .into_iter()
                    .map(Some)
                    .collect()
            } else {
                (0..samples.len()).map(|_| None).collect()
            };
            for (s, g) in samples.iter_mut().zip(steps) {
                s.step(setup, i, g, sink)?;
            }
        }
        if !report.cancelled {
            for s in samples {
                report.samples.push(s.finish(sink)?);
            }
        }
    } else {
        for k in 0..req.samples {
            let mut s = Sample::new(req, &plan, k)?;
            let mut cancelled = false;
            for (i, &t) in timesteps.iter().enumerate() {
                if sink.should_stop() {
                    cancelled = true;
                    break;
                }
                let g = if s.guided_at(i) {
                    let t = timesteps_tensor(&[t], &sd.device)?;
                    let inputs = guidance_inputs(req, setup, &t, i);
                    let mut calls = s.alpha_calls;
                    let g = optimise_latent(&mut s.hook, &s.z, inputs, &mut calls)?;
                    s.alpha_calls = calls;
                    Some(g)
                } else {
                    None
                };
                s.step(setup, i, g, sink)?;
            }
            if cancelled {
                report.cancelled = true;
                sink.log(&format!("cancelled during sample {k}"))?;
                break;
            }
            report.samples.push(s.finish(sink)?);
        }
    }
    report.wall_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What every sample of one run shares: the token plan, the sampler and the encoded prompt.
#[derive(Clone, Copy)]
struct SampleSetup<'a> {
    plan: &'a TokenPlan,
    ddim: &'a Ddim,
    timesteps: &'a [usize],
    /// The prompt's text embedding.
    cond: &'a Conditioning,
    /// `[uncond; cond]`, the batch of the classifier-free-guidance pass.
    context: &'a Conditioning,
}

/// What the latent optimisation of step `i` works with.
fn guidance_inputs<'a>(
    req: &'a SynthRequest,
    setup: SampleSetup<'a>,
    t: &'a Tensor,
    i: usize,
) -> GuidanceInputs<'a> {
    GuidanceInputs {
        unet: &req.sd.unet,
        t,
        cond: setup.cond,
        cfg: &req.config,
        step: i,
        subjects: setup.plan.subjects.len(),
    }
}

/// One sample in the making: its hook (masks, running-mean maps), latent, α counter, cluster
/// centres and report.
struct Sample<'a> {
    req: &'a SynthRequest<'a>,
    plan: &'a TokenPlan,
    hook: ControlHook<'a>,
    z: Tensor,
    /// Loss terms evaluated by the latent optimisation so far (the released code's α counter).
    alpha_calls: usize,
    out: SampleReport,
    kmeans: KMeansOptions,
    centres: Option<Vec<f32>>,
    last_leak: Vec<f64>,
    started: Instant,
}

impl<'a> Sample<'a> {
    fn new(req: &'a SynthRequest<'a>, plan: &'a TokenPlan, k: usize) -> Result<Self> {
        let sd = req.sd;
        let cfg = &req.config;
        let seed = req.seed.wrapping_add(k as u64);
        Ok(Self {
            req,
            plan,
            hook: ControlHook::new(cfg, plan, &req.boxes, &sd.device, sd.dtype),
            z: initial_latent(sd, seed)?,
            alpha_calls: 0,
            out: SampleReport {
                index: k,
                seed,
                final_leak: BTreeMap::new(),
                guided_steps: 0,
                guided_lowered: 0,
                refinements: 0,
                mask_fallbacks: Vec::new(),
                wall_seconds: 0.0,
                refine_ms: Vec::new(),
            },
            kmeans: KMeansOptions {
                k: 0,
                restarts: cfg.kmeans_restarts,
                max_iters: cfg.kmeans_iters,
                tol: cfg.kmeans_tol,
                seed: cfg.kmeans_seed,
            },
            centres: None,
            last_leak: vec![0.0; plan.subjects.len()],
            started: Instant::now(),
        })
    }

    /// Whether step `i` starts with latent optimisation.
    fn guided_at(&self, i: usize) -> bool {
        let cfg = &self.req.config;
        cfg.box_control
            && !self.plan.subjects.is_empty()
            && cfg.latent_opt
            && i < cfg.guided_steps
            && (cfg.ca_control || cfg.sa_control)
    }

    /// Step `i` after its latent optimisation `guided` (when it had one, its latent already
    /// moved): metrics, refinement, the normal pass and the DDIM update, progress.
    fn step(
        &mut self,
        setup: SampleSetup,
        i: usize,
        guided: Option<GuidedStep>,
        sink: &mut dyn RunSink,
    ) -> Result<()> {
        let SampleSetup {
            plan,
            ddim,
            timesteps,
            context,
            ..
        } = setup;
        let req = self.req;
        let sd = req.sd;
        let cfg = &req.config;
        let steps = timesteps.len();
        let k = self.out.index;
        let t = timesteps[i];
        let use_hook = cfg.box_control || cfg.attn_metrics;
        let control = cfg.box_control && !plan.subjects.is_empty();
        let hook = &mut self.hook;
        let out = &mut self.out;
        let mstep = (k * steps + i) as u64;
        let t_tensor = timesteps_tensor(&[t], &sd.device)?;
        let mut message = format!(
            "sample {}/{} step {}/{} t={t}",
            k + 1,
            req.samples,
            i + 1,
            steps
        );

        // 1. latent optimisation (done by the caller)
        let was_guided = guided.is_some();
        if let Some(g) = guided {
            self.z = g.z;
            sink.metric("loss/box", mstep, g.before)?;
            sink.metric("loss/box_after", mstep, g.after)?;
            sink.metric("gd_iters", mstep, g.iters as f64)?;
            sink.metric("alpha", mstep, g.alpha)?;
            out.guided_steps += 1;
            if g.after < g.before {
                out.guided_lowered += 1;
            }
            message.push_str(&format!(
                " loss {:.4}→{:.4} ({} it)",
                g.before, g.after, g.iters
            ));
        }
        // 2. mask refinement
        let refine_now = control && cfg.refines_at(i);
        if refine_now {
            let refine_started = Instant::now();
            if let (Some((self_map, cross_map)), Some(size)) = (hook.maps.means()?, hook.maps.size)
            {
                let boxes = hook.box_masks(size.0, size.1);
                let existing = hook.region_masks(size.0, size.1);
                let input = RefineInput::new(cfg, &self_map, &cross_map, &existing, &boxes);
                let refined = cluster::refine(&input, &self.kmeans, self.centres.as_deref());
                self.centres = Some(refined.fit.centres.clone());
                for &j in &refined.fallbacks {
                    let name = &plan.subjects[j].name;
                    sink.log(&format!(
                        "sample {k} step {i}: the refined mask of {name} is empty; using its box"
                    ))?;
                    if !out.mask_fallbacks.contains(name) {
                        out.mask_fallbacks.push(name.clone());
                    }
                }
                hook.set_regions(Regions::Masks {
                    size,
                    masks: refined.masks,
                });
                out.refinements += 1;
                out.refine_ms
                    .push(refine_started.elapsed().as_secs_f64() * 1e3);
                message.push_str(" (masks refined)");
            }
        }

        // 3. normal pass, CFG, DDIM
        hook.begin(Pass::Normal);
        hook.capture_maps = cfg.attn_metrics && i + 1 == steps;
        let x = Tensor::cat(&[&self.z, &self.z], 0)?;
        let eps = if use_hook {
            sd.unet_forward(&x, &t_tensor, context, Some(&mut *hook))?
        } else {
            sd.unet_forward(&x, &t_tensor, context, None)?
        };
        let (eu, ec) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
        let guided_eps = (&eu + ((&ec - &eu)? * cfg.guidance_scale)?)?;
        self.z = ddim.step(&guided_eps, t, &self.z, cfg.steps)?.prev_sample;

        if cfg.attn_metrics {
            hook.finish_pass()?;
            for (si, s) in plan.subjects.iter().enumerate() {
                let leak = layer_mean(&hook.stats.leak[si]);
                self.last_leak[si] = leak;
                sink.metric(&format!("leak/{}", s.name), mstep, leak)?;
            }
        }
        // Lockstep runs take every sample's step i before step i + 1.
        let done = if cfg.joint_stop && req.samples > 1 {
            i * req.samples + k + 1
        } else {
            k * steps + i + 1
        };
        sink.progress(&Progress {
            step: done as u64,
            total: (req.samples * steps) as u64,
            phase: if was_guided {
                "guided".into()
            } else {
                "denoise".into()
            },
            message,
        });
        Ok(())
    }

    /// Decodes and renders the finished sample and reports it.
    fn finish(self, sink: &mut dyn RunSink) -> Result<SampleReport> {
        let Sample {
            req,
            plan,
            hook,
            z,
            mut out,
            last_leak,
            started,
            ..
        } = self;
        let sd = req.sd;
        let cfg = &req.config;
        let k = out.index;
        let seed = out.seed;
        // Decode and render.
        let scale = sd.vae.config().scaling_factor;
        let image = sd.vae.decode(&(&z / scale)?)?;
        let image = ((image.to_dtype(DType::F32)? + 1.0)? / 2.0)?.clamp(0f32, 1f32)?;
        let rgb = tensor_to_rgb(&image)?;
        sink.artifact(&format!("sample_{k}.png"), png_bytes(&rgb)?)?;
        sink.artifact(
            &format!("boxes_{k}.png"),
            png_bytes(&render::draw_boxes(&rgb, &req.boxes))?,
        )?;
        let names: Vec<String> = req.boxes.iter().map(|b| b.subject.clone()).collect();
        let regions_img = match hook.regions() {
            Regions::Masks { size, masks } => render::draw_regions(&rgb, *size, masks, &names),
            Regions::Boxes => {
                let (h, w) = (rgb.height() as usize, rgb.width() as usize);
                render::draw_regions(&rgb, (h, w), &render::box_regions(&req.boxes, h, w), &names)
            }
        };
        sink.artifact(&format!("masks_{k}.png"), png_bytes(&regions_img)?)?;
        if let Some((h, w)) = hook.stats.map_size {
            for (si, s) in plan.subjects.iter().enumerate() {
                let layers = hook.stats.map_layers.max(1) as f64;
                let data: Vec<f32> = hook.stats.maps[si]
                    .iter()
                    .map(|v| (v / layers) as f32)
                    .collect();
                let map = Tensor::from_vec(data, (h, w), &candle_core::Device::Cpu)?;
                let img = heat_overlay(&rgb, &map)?;
                sink.artifact(&format!("attn/{}_{k}.png", s.name), png_bytes(&img)?)?;
            }
        }
        for (si, s) in plan.subjects.iter().enumerate() {
            if cfg.attn_metrics {
                out.final_leak.insert(s.name.clone(), last_leak[si]);
            }
        }
        out.wall_seconds = started.elapsed().as_secs_f64();
        sink.log(&format!(
            "sample {k} (seed {seed}): {:.2}s, guided steps {} (loss lowered in {}), refinements {}, final leak {:?}",
            out.wall_seconds, out.guided_steps, out.guided_lowered, out.refinements, out.final_leak
        ))?;
        Ok(out)
    }
}
