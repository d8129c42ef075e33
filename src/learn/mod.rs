//! The learning stage (paper Algorithm 1): from one image and N instance masks, learn the
//! placeholder tokens `<v0>…<vN-1>` with joint sampling, a masked reconstruction loss and the
//! cross-attention reward (phase A.1) then penalty (phase A.2), followed by an optional
//! DreamBooth phase (B) that fine-tunes the UNet and text encoder together with the tokens.
//!
//! Determinism: every random draw of step `s` comes from an RNG seeded by `(seed, s)`, so a run
//! resumed from a checkpoint (placeholder rows, optimiser moments, fine-tuned weights) continues
//! exactly as the uninterrupted run would have.

pub mod config;
pub mod inputs;
pub mod losses;
pub mod optim;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;

pub use config::LearnConfig;
pub use inputs::{load_scene, scene_files, Scene, SceneFiles};

use crate::error::{Error, Result};
use crate::imageio::{heat_overlay, mask_to_tensor, png_bytes, rgb_to_tensor, tensor_to_rgb};
use crate::model::clip::ClipTextModel;
use crate::model::hooks::ColumnRecorder;
use crate::model::nn::{resize_bilinear, resize_nearest_hw};
use crate::model::sample::{seeded_normal, Sampler};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet;
use crate::model::weights::WeightFile;
use crate::model::StableDiffusion;
use crate::sink::{Progress, RunSink};
use optim::{AdamW, AdamWParams};

/// The placeholder token of instance `i`.
pub fn token_name(i: usize) -> String {
    format!("<v{i}>")
}

/// The phase of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A.1: embeddings with the attention reward.
    Reward,
    /// A.2: embeddings with the attention penalty.
    Penalty,
    /// B: DreamBooth fine-tuning.
    DreamBooth,
}

impl Phase {
    /// Lower-case name (metric value order: reward 0, penalty 1, dreambooth 2).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Reward => "reward",
            Phase::Penalty => "penalty",
            Phase::DreamBooth => "dreambooth",
        }
    }
}

/// A saved state to resume from.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Steps completed.
    pub step: u64,
    /// Placeholder rows, optimiser moments and (phase B) fine-tuned weights.
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Serialises to safetensors bytes (the step in the metadata).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut meta = BTreeMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert("format".to_string(), "mifo-learn-checkpoint-1".to_string());
        safetensors_bytes(&self.tensors, meta)
    }

    /// Parses bytes written by [`Checkpoint::to_bytes`].
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Input(format!("checkpoint is not valid safetensors: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::Input(format!("checkpoint metadata: {e}")))?;
        let step = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("mifo"))
            .and_then(|s| serde_json::from_str::<BTreeMap<String, String>>(s).ok())
            .and_then(|m| m.get("step").and_then(|s| s.parse().ok()))
            .ok_or_else(|| Error::Input("checkpoint has no step".into()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let t = candle_core::safetensors::Load::load(&view, device)?;
            tensors.insert(name, t);
        }
        Ok(Self { step, tensors })
    }
}

/// Serialises named tensors (moved to CPU) with metadata. The metadata goes in as a single
/// key, `mifo`, holding a JSON object with sorted keys: safetensors writes its metadata map in
/// hash order, which would make equal files differ byte for byte.
pub fn safetensors_bytes(
    tensors: &HashMap<String, Tensor>,
    meta: BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let meta: HashMap<String, String> = [(
        "mifo".to_string(),
        serde_json::to_string(&meta).unwrap_or_default(),
    )]
    .into();
    let mut cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(cpu.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| Error::Input(format!("safetensors serialisation failed: {e}")))
}

/// What one learning run needs.
pub struct LearnRequest<'a> {
    /// The base model.
    pub sd: &'a StableDiffusion,
    /// The validated scene (at the model's resolution).
    pub scene: &'a Scene,
    /// The resolved configuration.
    pub config: LearnConfig,
    /// The run's seed.
    pub seed: u64,
    /// Continue from this checkpoint.
    pub resume: Option<Checkpoint>,
    /// Class images made earlier for the same model and `class_prompt` (prior preservation);
    /// missing ones are generated. Image `i` is always generated from seed `i`.
    pub class_images: Vec<image::RgbImage>,
    /// Benchmarks (`mifo bench`): run the steps only, with no checkpoints and no outputs.
    pub measure_only: bool,
}

/// Summary of a finished run.
#[derive(Clone, Debug, Default)]
pub struct LearnReport {
    /// Steps run in this call (after a resume: only the remaining ones).
    pub steps_run: u64,
    /// Whether the run stopped early because the sink asked it to.
    pub cancelled: bool,
    /// Final leak per token (fraction of attention outside its mask, last measurement).
    pub final_leak: BTreeMap<String, f64>,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Per-step RNG: seeded by (run seed, step) so that resuming reproduces the same draws.
fn step_rng(seed: u64, step: u64) -> rand::rngs::StdRng {
    let mut key = [0u8; 32];
    let h = blake3::hash(&[seed.to_le_bytes(), step.to_le_bytes()].concat());
    key.copy_from_slice(h.as_bytes());
    rand::rngs::StdRng::from_seed(key)
}

fn normal_tensor(rng: &mut rand::rngs::StdRng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(rng))
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// The image-side tensors of a scene, plain and flipped, with cached VAE encodings.
struct SceneTensors {
    /// [1, 3, H, W] in [-1, 1] for (plain, flipped).
    images: [Tensor; 2],
    /// [N, H, W] in [0, 1] for (plain, flipped).
    masks: [Tensor; 2],
    /// VAE (mean, logvar) for (plain, flipped).
    latents: [Option<(Tensor, Tensor)>; 2],
}

impl SceneTensors {
    fn new(scene: &Scene, device: &Device) -> Result<Self> {
        let img = rgb_to_tensor(&scene.image, device)?;
        let masks = scene
            .masks
            .iter()
            .map(|m| mask_to_tensor(m, device))
            .collect::<Result<Vec<_>>>()?;
        let masks = Tensor::stack(&masks, 0)?;
        let flip = |t: &Tensor| -> Result<Tensor> {
            let w = t.dim(candle_core::D::Minus1)?;
            let idx: Vec<u32> = (0..w as u32).rev().collect();
            Ok(t.index_select(&Tensor::new(idx, device)?, t.rank() - 1)?)
        };
        Ok(Self {
            images: [img.clone(), flip(&img)?],
            masks: [masks.clone(), flip(&masks)?],
            latents: [None, None],
        })
    }

    fn latent_dist(&mut self, sd: &StableDiffusion, flipped: bool) -> Result<(Tensor, Tensor)> {
        let i = usize::from(flipped);
        if self.latents[i].is_none() {
            let x = self.images[i].to_dtype(sd.dtype)?;
            self.latents[i] = Some(sd.vae.encode(&x)?);
        }
        Ok(self.latents[i].clone().expect("just set"))
    }
}

/// The models phase B trains (or phase A's frozen ones).
struct Models<'a> {
    text_encoder: ModelRef<'a, ClipTextModel>,
    unet: ModelRef<'a, UNet>,
    /// Trainable weights of phase B with their prefixed names (`unet.…`, `text_encoder.…`).
    trained: Vec<(String, Var)>,
}

enum ModelRef<'a, T> {
    Base(&'a T),
    Owned(T),
}

impl<T> std::ops::Deref for ModelRef<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            ModelRef::Base(t) => t,
            ModelRef::Owned(t) => t,
        }
    }
}

/// Loads trainable copies of the UNet and text encoder (phase B), with `restore` weights
/// (from a checkpoint) over the base ones.
fn trainable_models<'a>(
    sd: &'a StableDiffusion,
    cfg: &LearnConfig,
    seed: u64,
    restore: &HashMap<String, Tensor>,
) -> Result<Models<'a>> {
    let lora = (cfg.dreambooth == "lora").then_some(crate::model::weights::LoraConfig {
        rank: cfg.lora_rank as usize,
        seed,
    });
    let full = lora.is_none();
    let pick = |prefix: &str| -> Vec<(String, Tensor)> {
        restore
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
            .collect()
    };
    // Phase B's models are built over the base weights already in memory (shared tensors):
    // LoRA adds adapters to frozen weights, full fine-tuning makes trainable copies.
    let derive = |base: &WeightFile, prefix: &str| {
        let mut w = base.derive();
        w.insert_all(pick(prefix));
        w.set_trainable(full);
        w.set_lora(lora.clone());
        // The placeholders live in `rows`; the vocabulary's table is never trained.
        w.freeze(&["token_embedding.weight"]);
        std::rc::Rc::new(w)
    };
    let unet_w = derive(&sd.unet_weights, "unet.");
    let unet = UNet::load(
        sd.unet.config().clone(),
        unet_w.clone(),
        sd.dtype,
        &sd.device,
    )?;
    let te_w = derive(&sd.text_encoder_weights, "text_encoder.");
    let te = ClipTextModel::load(sd.text_encoder.config().clone(), te_w.clone(), &sd.device)?;
    let mut trained: Vec<(String, Var)> = unet_w
        .vars()
        .into_iter()
        .map(|(n, v)| (format!("unet.{n}"), v))
        .collect();
    trained.extend(
        te_w.vars()
            .into_iter()
            .filter(|(n, _)| !n.ends_with("token_embedding.weight"))
            .map(|(n, v)| (format!("text_encoder.{n}"), v)),
    );
    Ok(Models {
        text_encoder: ModelRef::Owned(te),
        unet: ModelRef::Owned(unet),
        trained,
    })
}

/// Phase-A learning rate at `step` (phase B uses a constant rate).
fn phase_a_lr(cfg: &LearnConfig, step: u64) -> f64 {
    let total = cfg.embedding_steps().max(1);
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    match cfg.lr_schedule.as_str() {
        "cosine" => {
            let span = (total - cfg.warmup_steps.min(total)).max(1) as f64;
            let progress = (step - cfg.warmup_steps) as f64 / span;
            cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        _ => cfg.lr,
    }
}

/// Initial placeholder rows [N, hidden] per `config.init`.
fn init_rows(sd: &StableDiffusion, n: usize, init: &str) -> Result<Tensor> {
    if init == "mean" {
        let mean = sd.text_encoder.mean_token_row()?;
        return Ok(mean.unsqueeze(0)?.repeat((n, 1))?);
    }
    let words: Vec<&str> = init.split(',').map(str::trim).collect();
    if words.len() != n {
        return Err(Error::Input(format!(
            "learn.init: {} words for {n} instances (give one word per mask, or `mean`)",
            words.len()
        )));
    }
    let mut ids = Vec::new();
    for w in words {
        let enc = sd.tokenizer.encode(w)?;
        let id = enc
            .get(1)
            .copied()
            .filter(|&i| i != sd.tokenizer.eos_id())
            .ok_or_else(|| Error::Input(format!("learn.init: `{w}` has no tokens")))?;
        ids.push(id);
    }
    Ok(sd.text_encoder.token_rows(&ids)?.contiguous()?)
}

/// Prior-preservation data: class images (as tensors), their prompt's ids, cached latents.
struct ClassData {
    images: Vec<Tensor>,
    latents: Vec<Option<(Tensor, Tensor)>>,
    ids: Tensor,
}

/// Makes sure `count` class images exist (reusing `given`, generating the rest with the base
/// model) and reports each as the artifact `class/<i>.png`.
fn class_data(
    sd: &StableDiffusion,
    tok: &ClipTokenizer,
    cfg: &LearnConfig,
    given: &[image::RgbImage],
    uncond_ids: &Tensor,
    sink: &mut dyn RunSink,
) -> Result<ClassData> {
    let dev = &sd.device;
    let ids = Tensor::new(tok.encode(&cfg.class_prompt)?, dev)?.unsqueeze(0)?;
    let size = sd.unet.config().sample_size;
    let res = (size * sd.vae.config().factor()) as u32;
    let sampler = Sampler {
        text_encoder: &sd.text_encoder,
        unet: &sd.unet,
        vae: &sd.vae,
        scheduler: &sd.scheduler,
    };
    let mut images = Vec::new();
    let count = cfg.class_images as usize;
    let reused = given
        .iter()
        .filter(|g| g.dimensions() == (res, res))
        .count()
        .min(count);
    sink.log(&format!(
        "prior preservation: {count} class image(s) of \"{}\", {reused} reused from the store, {} to generate",
        cfg.class_prompt,
        count - reused
    ))?;
    for i in 0..count {
        let img = match given.get(i).filter(|g| g.dimensions() == (res, res)) {
            Some(g) => g.clone(),
            None => {
                let latent = seeded_normal(
                    &[1, sd.unet.config().in_channels, size, size],
                    i as u64,
                    dev,
                )?
                .to_dtype(sd.dtype)?;
                let t = sampler.generate(
                    &ids,
                    uncond_ids,
                    None,
                    &latent,
                    cfg.class_image_steps as usize,
                    7.5,
                )?;
                tensor_to_rgb(&t)?
            }
        };
        sink.artifact(&format!("class/{i}.png"), png_bytes(&img)?)?;
        images.push(rgb_to_tensor(&img, dev)?);
    }
    Ok(ClassData {
        latents: vec![None; images.len()],
        images,
        ids,
    })
}

/// The tokenizer with `<v0>…<vN-1>` added, and their ids.
pub fn tokenizer_with_placeholders(
    base: &ClipTokenizer,
    n: usize,
) -> Result<(ClipTokenizer, Vec<u32>)> {
    let mut tok = base.clone();
    let names: Vec<String> = (0..n).map(token_name).collect();
    let ids = tok.add_tokens(&names)?;
    Ok((tok, ids))
}

/// Runs the learning stage, reporting through `sink`. Artifacts: `embeddings`
/// (safetensors, one [hidden] tensor per token), `weights` (phase B full: fine-tuned UNet and
/// text-encoder tensors named `unet.…` / `text_encoder.…`) or `lora` (phase B LoRA: adapters
/// named `unet.<module>.lora_A.weight` / `lora_B.weight`, likewise for `text_encoder.`),
/// `attn/<vK>.png`, `preview.png`, and with prior preservation `class/<i>.png`.
pub fn run(req: LearnRequest, sink: &mut dyn RunSink) -> Result<LearnReport> {
    let started = Instant::now();
    let cfg = &req.config;
    cfg.validate()?;
    let sd = req.sd;
    let dev = &sd.device;
    let n = req.scene.masks.len();
    let (tok, token_ids) = tokenizer_with_placeholders(&sd.tokenizer, n)?;
    let token_names: Vec<String> = (0..n).map(token_name).collect();
    let mut scene = SceneTensors::new(req.scene, dev)?;
    let total = cfg.total_steps();
    let embed_steps = cfg.embedding_steps();

    let resume = req.resume.clone();
    let start_step = resume.as_ref().map(|c| c.step).unwrap_or(0);
    if start_step > total {
        return Err(Error::Input(format!(
            "checkpoint is at step {start_step}, beyond the run's {total} steps"
        )));
    }
    let rows0 = match &resume {
        Some(c) => c
            .tensors
            .get("rows")
            .cloned()
            .ok_or_else(|| Error::Input("checkpoint lacks `rows`".into()))?,
        None => init_rows(sd, n, &cfg.init)?,
    };
    // The placeholder rows (and LoRA adapters) are f32 master copies whatever the model's
    // dtype: half-precision updates of lr·m/√v would round away. They are cast where used.
    let rows = Var::from_tensor(&rows0.to_dtype(DType::F32)?)?;
    let adam = |lr_vars: Vec<(String, Var)>| {
        AdamW::new(
            lr_vars,
            AdamWParams {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_eps,
                weight_decay: cfg.weight_decay,
            },
        )
    };
    let mut opt = adam(vec![("rows".into(), rows.clone())])?;
    let mut models = Models {
        text_encoder: ModelRef::Base(&sd.text_encoder),
        unet: ModelRef::Base(&sd.unet),
        trained: Vec::new(),
    };
    let mut in_phase_b = false;
    let mut class: Option<ClassData> = None;
    let uncond_ids = Tensor::new(tok.encode("")?, dev)?.unsqueeze(0)?;
    if let Some(c) = &resume {
        if c.step > embed_steps {
            models = trainable_models(sd, cfg, req.seed, &c.tensors)?;
            let mut vars = vec![("rows".to_string(), rows.clone())];
            vars.extend(models.trained.iter().cloned());
            opt = adam(vars)?;
            in_phase_b = true;
            opt.load_state(&c.tensors, c.step - embed_steps)?;
        } else {
            opt.load_state(&c.tensors, c.step)?;
        }
        sink.log(&format!("resumed at step {}", c.step))?;
    }

    let checkpoint = |step: u64, rows: &Var, opt: &AdamW, models: &Models| -> Result<Checkpoint> {
        let mut tensors: HashMap<String, Tensor> = opt.state().into_iter().collect();
        tensors.insert("rows".into(), rows.as_tensor().clone());
        for (name, v) in &models.trained {
            tensors.insert(name.clone(), v.as_tensor().clone());
        }
        Ok(Checkpoint { step, tensors })
    };

    let mut report = LearnReport::default();
    let mut prompt_cache: HashMap<Vec<usize>, (Tensor, Vec<usize>)> = HashMap::new();
    let latent_hw =
        |h: usize, w: usize| (h / sd.vae.config().factor(), w / sd.vae.config().factor());

    for step in start_step..total {
        if sink.should_stop() {
            report.cancelled = true;
            if !req.measure_only {
                let c = checkpoint(step, &rows, &opt, &models)?;
                sink.checkpoint(step, c.to_bytes()?)?;
                sink.log(&format!("cancelled at step {step}; checkpoint kept"))?;
            }
            break;
        }
        let phase = if step < cfg.reward_steps {
            Phase::Reward
        } else if step < embed_steps {
            Phase::Penalty
        } else {
            Phase::DreamBooth
        };
        if phase == Phase::DreamBooth && !in_phase_b {
            // Enter phase B: trainable copies of the UNet and text encoder, fresh optimiser.
            sink.log(&format!(
                "phase B: DreamBooth ({}) of the UNet and text encoder",
                cfg.dreambooth
            ))?;
            models = trainable_models(sd, cfg, req.seed, &HashMap::new())?;
            let mut vars = vec![("rows".to_string(), rows.clone())];
            vars.extend(models.trained.iter().cloned());
            opt = adam(vars)?;
            in_phase_b = true;
        }
        if phase == Phase::DreamBooth && cfg.prior_preservation && class.is_none() {
            class = Some(class_data(
                sd,
                &tok,
                cfg,
                &req.class_images,
                &uncond_ids,
                sink,
            )?);
        }
        let lr = match phase {
            Phase::DreamBooth => cfg.dreambooth_lr,
            _ => phase_a_lr(cfg, step),
        };

        // ---- joint sampling (all draws from the step's own RNG, in a fixed order) ----
        let mut rng = step_rng(req.seed, step);
        let k = rng.random_range(1..=n);
        let subset: Vec<usize> = rand::seq::index::sample(&mut rng, n, k).into_vec();
        let flipped = rng.random::<f64>() < cfg.flip_p;
        let t = rng.random_range(0..sd.scheduler.config().train_steps);

        let (ids, positions) = match prompt_cache.get(&subset) {
            Some(v) => v.clone(),
            None => {
                let prompt = format!(
                    "a photo of {}",
                    subset
                        .iter()
                        .map(|&j| token_names[j].clone())
                        .collect::<Vec<_>>()
                        .join(" and ")
                );
                let enc = tok.encode(&prompt)?;
                let positions = subset
                    .iter()
                    .map(|&j| {
                        enc.iter()
                            .position(|&id| id == token_ids[j])
                            .ok_or_else(|| {
                                Error::Input(format!("{} fell off the prompt", token_names[j]))
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let ids = Tensor::new(enc, dev)?.unsqueeze(0)?;
                prompt_cache.insert(subset.clone(), (ids.clone(), positions.clone()));
                (ids, positions)
            }
        };

        let (mean, logvar) = scene.latent_dist(sd, flipped)?;
        let lshape = mean.dims().to_vec();
        let noise = normal_tensor(&mut rng, &lshape, dev)?.to_dtype(sd.dtype)?;
        let z0 = if cfg.vae_sample {
            let eps = normal_tensor(&mut rng, &lshape, dev)?;
            crate::model::Vae::sample(&mean, &logvar, &eps)?
        } else {
            mean.clone()
        };
        let z0 = (z0 * sd.vae.config().scaling_factor)?;
        let zt = sd.scheduler.add_noise(&z0, &noise, &[t])?;
        let target = sd.scheduler.target(&z0, &noise, &[t])?;

        // ---- forward ----
        // Prior preservation: a class sample rides along as batch item 1 with its own t.
        let prior = match (&mut class, phase) {
            (Some(cd), Phase::DreamBooth) => {
                let ci = rng.random_range(0..cd.images.len());
                let t_cls = rng.random_range(0..sd.scheduler.config().train_steps);
                if cd.latents[ci].is_none() {
                    cd.latents[ci] = Some(sd.vae.encode(&cd.images[ci].to_dtype(sd.dtype)?)?);
                }
                let (cm, cl) = cd.latents[ci].clone().expect("just set");
                let cnoise = normal_tensor(&mut rng, cm.dims(), dev)?.to_dtype(sd.dtype)?;
                let cz0 = if cfg.vae_sample {
                    let e = normal_tensor(&mut rng, cm.dims(), dev)?;
                    crate::model::Vae::sample(&cm, &cl, &e)?
                } else {
                    cm
                };
                let cz0 = (cz0 * sd.vae.config().scaling_factor)?;
                let czt = sd.scheduler.add_noise(&cz0, &cnoise, &[t_cls])?;
                let ctarget = sd.scheduler.target(&cz0, &cnoise, &[t_cls])?;
                Some((czt, t_cls, ctarget, cd.ids.clone()))
            }
            _ => None,
        };
        let mut ehs = models.text_encoder.forward(&ids, Some(rows.as_tensor()))?;
        let mut zt_in = zt.clone();
        let mut t_in = vec![t as f32];
        if let Some((czt, t_cls, _, cids)) = &prior {
            let cehs = models.text_encoder.forward(cids, None)?;
            ehs = Tensor::cat(&[&ehs, &cehs], 0)?;
            zt_in = Tensor::cat(&[&zt, czt], 0)?;
            t_in.push(*t_cls as f32);
        }
        // Leak is measured on the attention-loss layers in every phase; phase B's penalty uses
        // its own layers.
        let loss_layers = match phase {
            Phase::DreamBooth => &cfg.dreambooth_penalty_layers,
            _ => &cfg.attn_layers,
        };
        let in_any =
            |path: &str, prefixes: &[String]| prefixes.iter().any(|p| path.starts_with(p.as_str()));
        let mut recorded = cfg.attn_layers.clone();
        recorded.extend(loss_layers.iter().cloned());
        let mut rec = ColumnRecorder::new(&recorded, &positions);
        let tt = Tensor::new(t_in, dev)?;
        let eps_all = models
            .unet
            .forward_hooked(&zt_in, &tt, &ehs, Some(&mut rec))?;
        let eps = eps_all.narrow(0, 0, 1)?;

        let masks = &scene.masks[usize::from(flipped)];
        let sel = Tensor::new(subset.iter().map(|&j| j as u32).collect::<Vec<_>>(), dev)?;
        let sel_masks = masks.index_select(&sel, 0)?; // [J, H, W]
        let (lh, lw) = latent_hw(masks.dim(1)?, masks.dim(2)?);
        let rec_mask = resize_nearest_hw(&sel_masks.max_keepdim(0)?, lh, lw)?.to_dtype(sd.dtype)?;
        let l_rec = (losses::masked_rec_loss(&eps, &target, &rec_mask)? * cfg.lambda_rec)?;
        let l_prior = match &prior {
            Some((_, _, ctarget, _)) => {
                let l = (eps_all.narrow(0, 1, 1)? - ctarget)?.sqr()?.mean_all()?;
                sink.metric(
                    "loss/prior",
                    step,
                    l.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                )?;
                Some((l * cfg.prior_weight)?)
            }
            None => None,
        };

        let attn_active = t as u64 <= cfg.t_max_attn;
        let (weight, use_reward) = match phase {
            Phase::Reward => (cfg.lambda_reward, true),
            Phase::Penalty => (cfg.lambda_penalty, false),
            Phase::DreamBooth => (cfg.dreambooth_penalty, false),
        };
        let mut attn_sum: Option<Tensor> = None;
        let mut leak = vec![0f64; subset.len()];
        let n_leak_layers = rec
            .layers()
            .iter()
            .filter(|l| in_any(l, &cfg.attn_layers))
            .count()
            .max(1) as f64;
        for layer in rec.layers().to_vec() {
            let abar = rec.maps_of(&layer, 0)?; // [J, h, w]
            let (_, h, w) = abar.dims3()?;
            let m = resize_bilinear(&sel_masks, h, w)?.to_dtype(abar.dtype())?;
            let inv = (m.ones_like()? - &m)?;
            // leak: attention mass outside the mask / total mass, per token
            let outside: Vec<f32> = (&inv * &abar)?
                .sum((1, 2))?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let all: Vec<f32> = abar.sum((1, 2))?.to_dtype(DType::F32)?.to_vec1()?;
            if in_any(&layer, &cfg.attn_layers) {
                for (j, (o, a)) in outside.iter().zip(&all).enumerate() {
                    leak[j] += (*o as f64 / (*a as f64).max(1e-12)) / n_leak_layers;
                }
            }
            if attn_active && weight != 0.0 && in_any(&layer, loss_layers) {
                let term = if use_reward {
                    losses::attn_reward(&abar, &m, cfg.reward_alpha)?
                } else {
                    losses::attn_penalty(&abar, &m)?
                };
                attn_sum = Some(match attn_sum {
                    Some(s) => (s + term)?,
                    None => term,
                });
            }
        }
        let l_attn = match attn_sum {
            Some(s) => Some((s * weight)?),
            None => None,
        };
        let mut loss = match &l_attn {
            Some(a) => (&l_rec + a)?,
            None => l_rec.clone(),
        };
        if let Some(p) = &l_prior {
            loss = (loss + p)?;
        }

        // ---- update ----
        let grads = loss.backward()?;
        let scale = if cfg.grad_clip > 0.0 {
            let norm = opt.grad_norm(&grads)?;
            if norm > cfg.grad_clip {
                cfg.grad_clip / (norm + 1e-6)
            } else {
                1.0
            }
        } else {
            1.0
        };
        opt.update(&grads, lr, scale)?;

        // ---- report ----
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let total_v = scalar(&loss)?;
        let rec_v = scalar(&l_rec)?;
        sink.metric("loss/total", step, total_v)?;
        sink.metric("loss/rec", step, rec_v)?;
        let attn_v = match &l_attn {
            Some(a) => {
                let v = scalar(a)?;
                sink.metric("loss/attn", step, v)?;
                Some(v)
            }
            None => None,
        };
        if !rec.layers().is_empty() {
            for (j, &tokidx) in subset.iter().enumerate() {
                sink.metric(&format!("leak/{}", token_names[tokidx]), step, leak[j])?;
                report
                    .final_leak
                    .insert(token_names[tokidx].clone(), leak[j]);
            }
        }
        sink.metric("lr", step, lr)?;
        sink.metric("phase", step, phase as u8 as f64)?;
        sink.metric("t", step, t as f64)?;
        if !total_v.is_finite() {
            return Err(Error::Input(format!(
                "loss became {total_v} at step {step} (lower learn.lr?)"
            )));
        }
        sink.progress(&Progress {
            step: step + 1,
            total,
            phase: phase.name().into(),
            message: match attn_v {
                Some(a) => format!("loss {total_v:.4} rec {rec_v:.4} attn {a:.2e} t {t}"),
                None => format!("loss {total_v:.4} rec {rec_v:.4} t {t}"),
            },
        });
        report.steps_run += 1;
        let done = step + 1;
        let at_boundary = done == embed_steps || done == total;
        let checkpoint_due =
            (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0) || at_boundary;
        if checkpoint_due && !req.measure_only {
            let c = checkpoint(done, &rows, &opt, &models)?;
            sink.checkpoint(done, c.to_bytes()?)?;
        }
    }

    if !report.cancelled && !req.measure_only {
        write_outputs(
            sd,
            &tok,
            &token_names,
            &rows,
            &models,
            &mut scene,
            cfg,
            req.seed,
            &uncond_ids,
            sink,
        )?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn write_outputs(
    sd: &StableDiffusion,
    tok: &ClipTokenizer,
    token_names: &[String],
    rows: &Var,
    models: &Models,
    scene: &mut SceneTensors,
    cfg: &LearnConfig,
    seed: u64,
    uncond_ids: &Tensor,
    sink: &mut dyn RunSink,
) -> Result<()> {
    let dev = &sd.device;
    // Embeddings: one tensor per token.
    let mut emb = HashMap::new();
    for (i, name) in token_names.iter().enumerate() {
        emb.insert(name.clone(), rows.as_tensor().get(i)?.to_dtype(DType::F32)?);
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), "mifo-embeddings-1".into());
    meta.insert("tokens".into(), token_names.join(","));
    sink.artifact("embeddings", safetensors_bytes(&emb, meta)?)?;
    if !models.trained.is_empty() {
        let w: HashMap<String, Tensor> = models
            .trained
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let mut meta = BTreeMap::new();
        let lora = cfg.dreambooth == "lora";
        meta.insert(
            "format".into(),
            if lora {
                "mifo-lora-1"
            } else {
                "mifo-finetuned-1"
            }
            .into(),
        );
        if lora {
            meta.insert("rank".into(), cfg.lora_rank.to_string());
        }
        sink.artifact(
            if lora { "lora" } else { "weights" },
            safetensors_bytes(&w, meta)?,
        )?;
    }

    // Final attention maps of each token over the input image (all tokens in one prompt).
    let prompt = format!("a photo of {}", token_names.join(" and "));
    let enc = tok.encode(&prompt)?;
    let positions: Vec<usize> = token_names
        .iter()
        .filter_map(|name| {
            tok.token_to_id(name)
                .and_then(|id| enc.iter().position(|&x| x == id))
        })
        .collect();
    let ids = Tensor::new(enc, dev)?.unsqueeze(0)?;
    let (mean, _) = scene.latent_dist(sd, false)?;
    let z0 = (mean * sd.vae.config().scaling_factor)?;
    let t_map = (sd.scheduler.config().train_steps / 5).min(cfg.t_max_attn as usize);
    let noise = seeded_normal(z0.dims(), seed ^ 0x5EED, dev)?.to_dtype(z0.dtype())?;
    let zt = sd.scheduler.add_noise(&z0, &noise, &[t_map])?;
    let ehs = models.text_encoder.forward(&ids, Some(rows.as_tensor()))?;
    let layers = if cfg.attn_layers.is_empty() {
        vec!["up_blocks".to_string()]
    } else {
        cfg.attn_layers.clone()
    };
    let mut rec = ColumnRecorder::new(&layers, &positions);
    let tt = Tensor::new(&[t_map as f32], dev)?;
    models.unet.forward_hooked(&zt, &tt, &ehs, Some(&mut rec))?;
    let base = tensor_to_rgb(&((scene.images[0].get(0)? + 1.0)? / 2.0)?)?;
    for (j, name) in token_names.iter().enumerate() {
        let mut acc: Option<Tensor> = None;
        let (hh, ww) = (base.height() as usize / 8, base.width() as usize / 8);
        for layer in rec.layers() {
            let m = rec.map(layer, j)?.get(0)?.to_dtype(DType::F32)?;
            let m = resize_bilinear(&m, hh, ww)?;
            acc = Some(match acc {
                Some(a) => (a + m)?,
                None => m,
            });
        }
        if let Some(a) = acc {
            sink.artifact(
                &format!("attn/{name}.png"),
                png_bytes(&heat_overlay(&base, &a)?)?,
            )?;
        }
    }

    if cfg.preview {
        let size = sd.unet.config().sample_size;
        let latent = seeded_normal(&[1, sd.unet.config().in_channels, size, size], seed, dev)?
            .to_dtype(sd.dtype)?;
        let sampler = Sampler {
            text_encoder: &models.text_encoder,
            unet: &models.unet,
            vae: &sd.vae,
            scheduler: &sd.scheduler,
        };
        let img = sampler.generate(
            &ids,
            uncond_ids,
            Some(rows.as_tensor()),
            &latent,
            cfg.preview_steps as usize,
            cfg.preview_guidance,
        )?;
        sink.artifact("preview.png", png_bytes(&tensor_to_rgb(&img)?)?)?;
    }
    Ok(())
}
