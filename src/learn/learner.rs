//! The learner: the state of one learning run (placeholder rows, optimiser, the models phase B
//! trains, cached latents and prompts) and one method per part of a step of Algorithm 1 —
//! joint sampling ([`Learner::draw`]), the noisy latent, the forward pass with the attention
//! recorder, the objective of Eq. 5 ([`Learner::objective`]), the update and the report.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;

use super::config::LearnConfig;
use super::inputs::Scene;
use super::losses;
use super::method::{AttnLoss, LearnMethod};
use super::optim::{AdamW, AdamWParams};
use super::recompose::HostScene;
use super::sampling::{draw_subset, union_mask};
use super::{
    safetensors_bytes, token_name, tokenizer_with_placeholders, Checkpoint, LearnReport,
    LearnRequest, Phase,
};
use crate::error::{Error, Result};
use crate::imageio::{heat_overlay, mask_to_tensor, png_bytes, rgb_to_tensor, tensor_to_rgb};
use crate::model::clip::ClipTextModel;
use crate::model::conditioning::{split_rows, Conditioning};
use crate::model::hooks::ColumnRecorder;
use crate::model::nn::{resize_bilinear, resize_nearest_hw};
use crate::model::sample::{seeded_normal, Sampler};
use crate::model::sdxl;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet;
use crate::model::weights::WeightFile;
use crate::model::StableDiffusion;
use crate::sink::{Progress, RunSink};

/// Per-step RNG: seeded by (run seed, step) so that resuming reproduces the same draws.
fn step_rng(seed: u64, step: u64) -> StdRng {
    let mut key = [0u8; 32];
    let h = blake3::hash(&[seed.to_le_bytes(), step.to_le_bytes()].concat());
    key.copy_from_slice(h.as_bytes());
    StdRng::from_seed(key)
}

fn normal_tensor(rng: &mut StdRng, shape: &[usize], device: &Device) -> Result<Tensor> {
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
    /// Host copies of (plain, flipped) for recomposition, made on first use.
    host: [Option<HostScene>; 2],
}

/// A step's recomposed image [1, 3, H, W] and masks [N, H, W] (`learn.recompose_p`).
struct RecomposedTensors {
    image: Tensor,
    masks: Tensor,
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
            host: [None, None],
        })
    }

    /// The step's instances `subset` of the (possibly flipped) scene, recomposed
    /// ([`HostScene::recompose`]) with the step's RNG.
    fn recompose(
        &mut self,
        flipped: bool,
        subset: &[usize],
        rng: &mut StdRng,
    ) -> Result<RecomposedTensors> {
        let i = usize::from(flipped);
        let device = self.images[i].device().clone();
        let (_, _, h, w) = self.images[i].dims4()?;
        if self.host[i].is_none() {
            let masks = &self.masks[i];
            self.host[i] = Some(HostScene::new(
                h,
                w,
                self.images[i].flatten_all()?.to_vec1::<f32>()?,
                (0..masks.dim(0)?)
                    .map(|k| Ok(masks.get(k)?.flatten_all()?.to_vec1::<f32>()?))
                    .collect::<Result<Vec<_>>>()?,
            ));
        }
        let host = self.host[i].as_ref().expect("just set");
        let r = host.recompose(subset, rng);
        let n = r.masks.len();
        Ok(RecomposedTensors {
            image: Tensor::from_vec(r.image, (1, 3, h, w), &device)?,
            masks: Tensor::from_vec(r.masks.concat(), (n, h, w), &device)?,
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
    /// SDXL's second text encoder.
    text_encoder_2: Option<ModelRef<'a, ClipTextModel>>,
    unet: ModelRef<'a, UNet>,
    /// Trainable weights of phase B with their prefixed names (`unet.…`, `text_encoder.…`).
    trained: Vec<(String, Var)>,
}

enum ModelRef<'a, T> {
    Base(&'a T),
    Owned(T),
}

impl Models<'_> {
    /// SD's conditioning for `ids` [B, L] as [`Models::encode`] gives it, with a zero-valued
    /// variable added to the token embeddings [B, L, hidden]: its gradient is each prompt
    /// position's embedding gradient, from which the word rows' table gradients are summed
    /// (`learn.grad_clip_word_rows`). The value of the conditioning is unchanged.
    fn encode_probed(
        &self,
        ids: &Tensor,
        rows: Option<&Tensor>,
    ) -> Result<(Conditioning, WordProbe)> {
        let emb = self.text_encoder.embed_tokens(ids, rows)?;
        let probe = Var::zeros(emb.shape(), emb.dtype(), emb.device())?;
        let context = self
            .text_encoder
            .forward_embeds(&(emb + probe.as_tensor())?)?;
        let ids = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
        Ok((
            Conditioning {
                context,
                added: None,
            },
            WordProbe { probe, ids },
        ))
    }

    /// The UNet's conditioning for prompt ids [B, L] (`ids_2`: SDXL's second tokenizer's) with
    /// the placeholder `rows` ([N, hidden], for SDXL [N, h1 + h2]); SDXL's time ids are those of
    /// an image of `size` pixels. For SD this is the text encoder's output, as before.
    fn encode(
        &self,
        ids: &Tensor,
        ids_2: Option<&Tensor>,
        rows: Option<&Tensor>,
        size: (usize, usize),
    ) -> Result<Conditioning> {
        match (&self.text_encoder_2, ids_2) {
            (Some(te2), Some(ids_2)) => {
                let (r1, r2) = match rows {
                    Some(r) => {
                        let h1 = self.text_encoder.config().hidden_size;
                        let (a, b) = split_rows(r, h1)?;
                        (Some(a), Some(b))
                    }
                    None => (None, None),
                };
                let p = sdxl::encode_with(
                    &self.text_encoder,
                    te2,
                    ids,
                    r1.as_ref(),
                    ids_2,
                    r2.as_ref(),
                )?;
                let time_ids = sdxl::time_ids(size, (0, 0), size, ids.dim(0)?, ids.device())?;
                Ok(Conditioning {
                    added: Some(p.added(&time_ids)),
                    context: p.context,
                })
            }
            (None, _) => Ok(Conditioning {
                context: self.text_encoder.forward(ids, rows)?,
                added: None,
            }),
            (Some(_), None) => Err(Error::Input(
                "SDXL learning: the second tokenizer's ids are missing".into(),
            )),
        }
    }
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
    let te2 = match &sd.xl {
        Some(xl) => {
            let w = derive(&xl.text_encoder_2_weights, "text_encoder_2.");
            let m = ClipTextModel::load(xl.text_encoder_2.config().clone(), w.clone(), &sd.device)?;
            Some((m, w))
        }
        None => None,
    };
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
    if let Some((_, w)) = &te2 {
        trained.extend(
            w.vars()
                .into_iter()
                .filter(|(n, _)| !n.ends_with("token_embedding.weight"))
                .map(|(n, v)| (format!("text_encoder_2.{n}"), v)),
        );
    }
    Ok(Models {
        text_encoder: ModelRef::Owned(te),
        text_encoder_2: te2.map(|(m, _)| ModelRef::Owned(m)),
        unet: ModelRef::Owned(unet),
        trained,
    })
}

/// Phase-A learning rate at `step` (phase B uses a constant rate).
fn phase_a_lr(cfg: &LearnConfig, step: u64) -> f64 {
    let total = cfg.embedding_steps().max(1);
    if step < cfg.warmup_steps {
        let done = if cfg.warmup_from_zero { step } else { step + 1 };
        return cfg.lr * done as f64 / cfg.warmup_steps as f64;
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
        let mut mean = sd.text_encoder.mean_token_row()?;
        if let Some(xl) = &sd.xl {
            // SDXL: each encoder's own mean, side by side.
            mean = Tensor::cat(&[&mean, &xl.text_encoder_2.mean_token_row()?], 0)?;
        }
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
    let rows = sd.text_encoder.token_rows(&ids)?;
    Ok(match &sd.xl {
        // SDXL: the word's row in each encoder (the tokenizers share the vocabulary), side by
        // side.
        Some(xl) => Tensor::cat(&[&rows, &xl.text_encoder_2.token_rows(&ids)?], 1)?,
        None => rows,
    }
    .contiguous()?)
}

/// SDXL: `text` by the second tokenizer (with `placeholders` `<v0>…` added), [1, L]; `None`
/// for SD.
fn ids_2_of(sd: &StableDiffusion, text: &str, placeholders: usize) -> Result<Option<Tensor>> {
    match &sd.xl {
        Some(xl) => {
            let tok = tokenizer_with_placeholders(&xl.tokenizer_2, placeholders)?.0;
            Ok(Some(
                Tensor::new(tok.encode(text)?, &sd.device)?.unsqueeze(0)?,
            ))
        }
        None => Ok(None),
    }
}

/// The image size in pixels of the model's default latent (SDXL's time ids).
fn pixel_size(sd: &StableDiffusion) -> (usize, usize) {
    let s = sd.unet.config().sample_size;
    sd.image_size((s, s))
}

/// Prior-preservation data: class images (as tensors), their prompt's ids, cached latents.
struct ClassData {
    images: Vec<Tensor>,
    latents: Vec<Option<(Tensor, Tensor)>>,
    ids: Tensor,
    /// SDXL: the class prompt's ids by the second tokenizer.
    ids_2: Option<Tensor>,
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
                let t = if sd.is_xl() {
                    let px = sd.image_size((size, size));
                    sampler.generate_cond(
                        &sd.encode_prompt(&cfg.class_prompt, None, px)?,
                        &sd.encode_negative("", None, px)?,
                        &latent,
                        cfg.class_image_steps as usize,
                        7.5,
                    )?
                } else {
                    sampler.generate(
                        &ids,
                        uncond_ids,
                        None,
                        &latent,
                        cfg.class_image_steps as usize,
                        7.5,
                    )?
                };
                tensor_to_rgb(&t)?
            }
        };
        sink.artifact(&format!("class/{i}.png"), png_bytes(&img)?)?;
        images.push(rgb_to_tensor(&img, dev)?);
    }
    let ids_2 = ids_2_of(sd, &cfg.class_prompt, 0)?;
    Ok(ClassData {
        latents: vec![None; images.len()],
        images,
        ids,
        ids_2,
    })
}

/// What joint sampling drew for one step (App. C.5): the instance subset Λ, the flip, the
/// timestep, and the prompt `a photo of <vj1> and …` with each token's position in it.
struct Draw {
    /// The step's RNG, which the later draws of the step (noise, class sample) continue.
    rng: StdRng,
    /// Λ: the instances of this step, in prompt order.
    subset: Vec<usize>,
    /// Whether the image and masks are mirrored.
    flipped: bool,
    /// The diffusion timestep.
    t: usize,
    /// The prompt's token ids [1, 77].
    ids: Tensor,
    /// SDXL: the prompt's ids by the second tokenizer.
    ids_2: Option<Tensor>,
    /// The position of each `<vj>` of Λ in the prompt.
    positions: Vec<usize>,
    /// The step's recomposed image and masks, when it drew one (`learn.recompose_p`).
    recomposed: Option<RecomposedTensors>,
}

/// A prior-preservation class sample riding along as batch item 1 (phase B).
struct ClassSample {
    /// Its noisy latent.
    zt: Tensor,
    /// Its own timestep.
    t: usize,
    /// What the UNet should predict for it.
    target: Tensor,
    /// The class prompt's ids.
    ids: Tensor,
    /// SDXL: by the second tokenizer.
    ids_2: Option<Tensor>,
}

/// The UNet's prediction for a step and the attention it recorded.
struct Forward {
    /// [B, C, h, w]: item 0 the instance image, item 1 the class sample (if any).
    eps: Tensor,
    /// The cross-attention maps of the placeholder tokens.
    attention: ColumnRecorder,
    /// With `learn.grad_clip_word_rows`: the instance prompt's and the class prompt's probes.
    word_probes: Vec<WordProbe>,
}

/// A zero-valued variable on one prompt's token embeddings, and the prompt's ids, whose
/// gradient gives the word rows' table gradients ([`Models::encode_probed`]).
struct WordProbe {
    probe: Var,
    ids: Vec<u32>,
}

/// The attention terms of one step.
struct AttentionTerms {
    /// λ_attn · L_attn (Eq. 3; phase B: its penalty weight); `None` when the step's t is above
    /// `t_max_attn`, the weight is zero, or no recorded layer is a loss layer.
    loss: Option<Tensor>,
    /// Per token of Λ: the fraction of its attention outside its mask, averaged over the
    /// `attn_layers` (measured in every phase, trained on only through `loss`); `None` when no
    /// layer was recorded.
    leak: Option<Vec<f64>>,
}

/// The loss of one step, term by term.
struct Objective {
    /// L, the tensor the update differentiates.
    total: Tensor,
    /// λ_rec · L_rec (Eq. 4).
    rec: Tensor,
    /// λ_attn · L_attn and the leak.
    attention: AttentionTerms,
    /// The prior-preservation loss, unweighted (phase B with prior preservation).
    prior: Option<Tensor>,
    /// The class sample's timestep (phase B with prior preservation).
    class_t: Option<usize>,
}

/// Whether the module path `path` lies under one of `prefixes`.
fn under_any(path: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| path.starts_with(p.as_str()))
}

/// The phase of step `step` (0-based): reward, then penalty, then DreamBooth.
fn phase_at(cfg: &LearnConfig, step: u64) -> Phase {
    if step < cfg.reward_steps {
        Phase::Reward
    } else if step < cfg.embedding_steps() {
        Phase::Penalty
    } else {
        Phase::DreamBooth
    }
}

/// A training prompt's ids (and SDXL's second tokenizer's) and each placeholder's position.
type PromptIds = (Tensor, Option<Tensor>, Vec<usize>);

/// One learning run in progress.
pub(super) struct Learner<'a> {
    sd: &'a StableDiffusion,
    cfg: &'a LearnConfig,
    seed: u64,
    /// Benchmarks: steps only, no checkpoints, no outputs.
    measure_only: bool,
    /// Class images from earlier runs (prior preservation).
    given_class_images: &'a [image::RgbImage],
    /// The tokenizer with the placeholders, their ids and names (`<v0>`, …).
    tok: ClipTokenizer,
    token_ids: Vec<u32>,
    token_names: Vec<String>,
    /// The empty prompt's ids (class images and the preview).
    uncond_ids: Tensor,
    scene: SceneTensors,
    /// Steps: the run's total, the end of phase A, and where this call starts.
    total: u64,
    embed_steps: u64,
    start_step: u64,
    /// The placeholder rows [N, hidden], an f32 master copy.
    rows: Var,
    opt: AdamW,
    models: Models<'a>,
    in_phase_b: bool,
    class: Option<ClassData>,
    /// Prompt ids and token positions per subset Λ.
    prompt_cache: HashMap<Vec<usize>, PromptIds>,
    report: LearnReport,
}

impl<'a> Learner<'a> {
    /// Sets up the run of `req`: placeholder rows (initial or from the checkpoint), the
    /// optimiser, and for a checkpoint inside phase B the trainable models.
    pub(super) fn new(req: &'a LearnRequest<'a>, sink: &mut dyn RunSink) -> Result<Self> {
        let cfg = &req.config;
        cfg.validate()?;
        let sd = req.sd;
        if cfg.grad_clip_word_rows && sd.is_xl() {
            return Err(Error::Input(
                "learn.grad_clip_word_rows: counts one text encoder's word rows, and SDXL has two; set it to false".into(),
            ));
        }
        let dev = &sd.device;
        let n = req.scene.masks.len();
        let (tok, token_ids) = tokenizer_with_placeholders(&sd.tokenizer, n)?;
        let token_names: Vec<String> = (0..n).map(token_name).collect();
        let scene = SceneTensors::new(req.scene, dev)?;
        let total = cfg.total_steps();
        let embed_steps = cfg.embedding_steps();

        let resume = req.resume.as_ref();
        let start_step = resume.map(|c| c.step).unwrap_or(0);
        if start_step > total {
            return Err(Error::Input(format!(
                "checkpoint is at step {start_step}, beyond the run's {total} steps"
            )));
        }
        let rows0 = match resume {
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
        let opt = new_optimiser(cfg, vec![("rows".into(), rows.clone())])?;
        let uncond_ids = Tensor::new(tok.encode("")?, dev)?.unsqueeze(0)?;
        let mut learner = Self {
            sd,
            cfg,
            seed: req.seed,
            measure_only: req.measure_only,
            given_class_images: &req.class_images,
            tok,
            token_ids,
            token_names,
            uncond_ids,
            scene,
            total,
            embed_steps,
            start_step,
            rows,
            opt,
            models: Models {
                text_encoder: ModelRef::Base(&sd.text_encoder),
                text_encoder_2: sd.xl.as_ref().map(|x| ModelRef::Base(&x.text_encoder_2)),
                unet: ModelRef::Base(&sd.unet),
                trained: Vec::new(),
            },
            in_phase_b: false,
            class: None,
            prompt_cache: HashMap::new(),
            report: LearnReport::default(),
        };
        if let Some(c) = resume {
            if c.step > embed_steps {
                learner.start_phase_b(&c.tensors)?;
                learner.opt.load_state(&c.tensors, c.step - embed_steps)?;
            } else {
                learner.opt.load_state(&c.tensors, c.step)?;
            }
            sink.log(&format!("resumed at step {}", c.step))?;
        }
        Ok(learner)
    }

    /// Runs the remaining steps (stopping early when the sink asks), then writes the outputs.
    pub(super) fn run(mut self, sink: &mut dyn RunSink) -> Result<LearnReport> {
        for step in self.start_step..self.total {
            if sink.should_stop() {
                self.report.cancelled = true;
                if !self.measure_only {
                    sink.checkpoint(step, self.checkpoint(step).to_bytes()?)?;
                    sink.log(&format!("cancelled at step {step}; checkpoint kept"))?;
                }
                break;
            }
            self.step(step, sink)?;
        }
        if !self.report.cancelled && !self.measure_only {
            self.write_outputs(sink)?;
        }
        Ok(self.report)
    }

    /// One step of Algorithm 1: draw, noise, forward, objective (Eq. 5), update, report.
    fn step(&mut self, step: u64, sink: &mut dyn RunSink) -> Result<()> {
        let phase = phase_at(self.cfg, step);
        self.enter(phase, sink)?;
        let lr = match phase {
            Phase::DreamBooth => self.cfg.dreambooth_lr,
            _ => phase_a_lr(self.cfg, step),
        };
        let mut draw = self.draw(step)?;
        let (zt, target) = self.noisy_latent(&mut draw)?;
        let class_sample = match phase {
            Phase::DreamBooth => self.class_sample(&mut draw.rng)?,
            _ => None,
        };
        let forward = self.forward(phase, &draw, &zt, class_sample.as_ref())?;
        let objective = self.objective(phase, &draw, &forward, &target, class_sample.as_ref())?;
        if let Some(prior) = &objective.prior {
            sink.metric("loss/prior", step, scalar(prior)?)?;
        }
        self.update(&objective.total, lr, &forward.word_probes)?;
        self.report_step(step, phase, lr, &draw, &objective, sink)
    }

    /// Prepares `phase`: on the first DreamBooth step, trainable copies of the UNet and text
    /// encoder, a fresh optimiser, and (with prior preservation) the class images.
    fn enter(&mut self, phase: Phase, sink: &mut dyn RunSink) -> Result<()> {
        if phase == Phase::DreamBooth && !self.in_phase_b {
            sink.log(&format!(
                "phase B: DreamBooth ({}) of the UNet and text encoder",
                self.cfg.dreambooth
            ))?;
            self.start_phase_b(&HashMap::new())?;
        }
        let key = if phase == Phase::DreamBooth { "B" } else { "A" };
        if !self.report.memory.contains_key(key) {
            let memory = super::PhaseMemory {
                trained_bytes: self.opt.var_bytes(),
                optimiser_bytes: self.opt.state_bytes(),
            };
            self.report.memory.insert(key.to_string(), memory);
        }
        if phase == Phase::DreamBooth && self.cfg.prior_preservation && self.class.is_none() {
            self.class = Some(class_data(
                self.sd,
                &self.tok,
                self.cfg,
                self.given_class_images,
                &self.uncond_ids,
                sink,
            )?);
        }
        Ok(())
    }

    /// Switches to phase B's trainable models (with `restore`'s weights from a checkpoint) and
    /// an optimiser over them and the rows.
    fn start_phase_b(&mut self, restore: &HashMap<String, Tensor>) -> Result<()> {
        self.models = trainable_models(self.sd, self.cfg, self.seed, restore)?;
        let mut vars = vec![("rows".to_string(), self.rows.clone())];
        vars.extend(self.models.trained.iter().cloned());
        self.opt = new_optimiser(self.cfg, vars)?;
        self.in_phase_b = true;
        Ok(())
    }

    /// Joint sampling (App. C.5): Λ, a random subset of k ~ U{1..N} instances in random
    /// order, the flip and the timestep, all from the step's own RNG in a fixed order; and the
    /// prompt over Λ.
    fn draw(&mut self, step: u64) -> Result<Draw> {
        let n = self.token_names.len();
        let mut rng = step_rng(self.seed, step);
        let subset = draw_subset(&mut rng, n, self.cfg.subsets == "all");
        let flipped = rng.random::<f64>() < self.cfg.flip_p;
        let t = rng.random_range(0..self.sd.scheduler.config().train_steps);
        // Drawn only when recomposition is on, so runs without it keep their draws.
        let recomposed = if self.cfg.recompose_p > 0.0 && rng.random::<f64>() < self.cfg.recompose_p
        {
            Some(self.scene.recompose(flipped, &subset, &mut rng)?)
        } else {
            None
        };
        let (ids, ids_2, positions) = self.prompt(&subset)?;
        Ok(Draw {
            rng,
            subset,
            flipped,
            t,
            ids,
            ids_2,
            positions,
            recomposed,
        })
    }

    /// `a photo of <vj1> and <vj2> …` over `subset`: its ids and each token's position.
    fn prompt(&mut self, subset: &[usize]) -> Result<PromptIds> {
        if let Some(v) = self.prompt_cache.get(subset) {
            return Ok(v.clone());
        }
        let names = &self.token_names;
        let prompt = format!(
            "a photo of {}",
            subset
                .iter()
                .map(|&j| names[j].clone())
                .collect::<Vec<_>>()
                .join(" and ")
        );
        let enc = self.tok.encode(&prompt)?;
        let positions = subset
            .iter()
            .map(|&j| {
                enc.iter()
                    .position(|&id| id == self.token_ids[j])
                    .ok_or_else(|| Error::Input(format!("{} fell off the prompt", names[j])))
            })
            .collect::<Result<Vec<_>>>()?;
        let ids = Tensor::new(enc, &self.sd.device)?.unsqueeze(0)?;
        let ids_2 = ids_2_of(self.sd, &prompt, names.len())?;
        let v = (ids, ids_2, positions);
        self.prompt_cache.insert(subset.to_vec(), v.clone());
        Ok(v)
    }

    /// The noisy latent z_t of the (possibly flipped) image at the drawn t, and the UNet's
    /// target for it.
    fn noisy_latent(&mut self, draw: &mut Draw) -> Result<(Tensor, Tensor)> {
        let sd = self.sd;
        let (mean, logvar) = match &draw.recomposed {
            Some(r) => sd.vae.encode(&r.image.to_dtype(sd.dtype)?)?,
            None => self.scene.latent_dist(sd, draw.flipped)?,
        };
        let lshape = mean.dims().to_vec();
        let noise = normal_tensor(&mut draw.rng, &lshape, &sd.device)?.to_dtype(sd.dtype)?;
        let z0 = if self.cfg.vae_sample {
            let eps = normal_tensor(&mut draw.rng, &lshape, &sd.device)?;
            crate::model::Vae::sample(&mean, &logvar, &eps)?
        } else {
            mean.clone()
        };
        let z0 = (z0 * sd.vae.config().scaling_factor)?;
        let zt = sd.scheduler.add_noise(&z0, &noise, &[draw.t])?;
        let target = sd.scheduler.target(&z0, &noise, &[draw.t])?;
        Ok((zt, target))
    }

    /// With prior preservation: a class image, its own timestep and noise (phase B).
    fn class_sample(&mut self, rng: &mut StdRng) -> Result<Option<ClassSample>> {
        let sd = self.sd;
        let Some(cd) = &mut self.class else {
            return Ok(None);
        };
        let ci = rng.random_range(0..cd.images.len());
        let t_cls = rng.random_range(0..sd.scheduler.config().train_steps);
        if cd.latents[ci].is_none() {
            cd.latents[ci] = Some(sd.vae.encode(&cd.images[ci].to_dtype(sd.dtype)?)?);
        }
        let (cm, cl) = cd.latents[ci].clone().expect("just set");
        let cnoise = normal_tensor(rng, cm.dims(), &sd.device)?.to_dtype(sd.dtype)?;
        let cz0 = if self.cfg.vae_sample {
            let e = normal_tensor(rng, cm.dims(), &sd.device)?;
            crate::model::Vae::sample(&cm, &cl, &e)?
        } else {
            cm
        };
        let cz0 = (cz0 * sd.vae.config().scaling_factor)?;
        let czt = sd.scheduler.add_noise(&cz0, &cnoise, &[t_cls])?;
        let ctarget = sd.scheduler.target(&cz0, &cnoise, &[t_cls])?;
        Ok(Some(ClassSample {
            zt: czt,
            t: t_cls,
            target: ctarget,
            ids: cd.ids.clone(),
            ids_2: cd.ids_2.clone(),
        }))
    }

    /// The layers whose attention the loss of `phase` uses: phase A's `attn_layers`, MIFO's
    /// phase B its own penalty layers (Break-a-Scene keeps `attn_layers` in both phases).
    fn loss_layers(&self, phase: Phase) -> &'a [String] {
        match (self.cfg.learn_method(), phase) {
            (LearnMethod::Mifo, Phase::DreamBooth) => &self.cfg.dreambooth_penalty_layers,
            _ => &self.cfg.attn_layers,
        }
    }

    /// ε̂ = UNet(z_t, t, CLIP(prompt with the rows)), with the class sample as batch item 1,
    /// recording the placeholders' attention on the leak and loss layers.
    fn forward(
        &self,
        phase: Phase,
        draw: &Draw,
        zt: &Tensor,
        class_sample: Option<&ClassSample>,
    ) -> Result<Forward> {
        let models = &self.models;
        let size = pixel_size(self.sd);
        let probed = self.cfg.grad_clip_word_rows;
        let mut word_probes = Vec::new();
        let mut encode = |ids: &Tensor, ids_2: Option<&Tensor>, rows: Option<&Tensor>| {
            if probed {
                let (cond, probe) = models.encode_probed(ids, rows)?;
                word_probes.push(probe);
                Ok(cond)
            } else {
                models.encode(ids, ids_2, rows, size)
            }
        };
        let mut cond = encode(&draw.ids, draw.ids_2.as_ref(), Some(self.rows.as_tensor()))?;
        let mut zt_in = zt.clone();
        let mut t_in = vec![draw.t as f32];
        if let Some(c) = class_sample {
            let ccond = encode(&c.ids, c.ids_2.as_ref(), None)?;
            cond = Conditioning::cat(&cond, &ccond)?;
            zt_in = Tensor::cat(&[zt, &c.zt], 0)?;
            t_in.push(c.t as f32);
        }
        // Leak is measured on the attention-loss layers in every phase; phase B's penalty uses
        // its own layers.
        let mut recorded = self.cfg.attn_layers.clone();
        recorded.extend(self.loss_layers(phase).iter().cloned());
        let mut attention = ColumnRecorder::new(&recorded, &draw.positions);
        let tt = Tensor::new(t_in, &self.sd.device)?;
        let eps = models.unet.forward_cond(
            &zt_in,
            &tt,
            &cond.context,
            cond.added.as_ref(),
            Some(&mut attention),
        )?;
        Ok(Forward {
            eps,
            attention,
            word_probes,
        })
    }

    /// The paper's Eq. 5, the objective of semantic learning:
    ///
    /// L = λ_rec · L_rec + λ_attn · L_attn
    ///
    /// with L_rec the masked reconstruction loss of Eq. 4 over M_rec, the union of Λ's masks
    /// ([`losses::masked_rec_loss`]), and L_attn of Eq. 3 (see [`Learner::attention_terms`]):
    /// the reward of Eq. 1 in phase A.1, the penalty of Eq. 2 in phase A.2. Phase B
    /// (DreamBooth) keeps the same form with its own penalty weight and layers, plus the
    /// prior-preservation loss `prior_weight · mean((ε̂_cls − ε_cls)²)` when a class sample rides
    /// along.
    fn objective(
        &self,
        phase: Phase,
        draw: &Draw,
        forward: &Forward,
        target: &Tensor,
        class_sample: Option<&ClassSample>,
    ) -> Result<Objective> {
        let sd = self.sd;
        let cfg = self.cfg;
        let eps = forward.eps.narrow(0, 0, 1)?;
        let masks = match &draw.recomposed {
            Some(r) => &r.masks,
            None => &self.scene.masks[usize::from(draw.flipped)],
        };
        let sel = Tensor::new(
            draw.subset.iter().map(|&j| j as u32).collect::<Vec<_>>(),
            &sd.device,
        )?;
        let sel_masks = masks.index_select(&sel, 0)?; // [J, H, W]
        let factor = sd.vae.config().factor();
        let (lh, lw) = (masks.dim(1)? / factor, masks.dim(2)? / factor);
        let rec_mask =
            resize_nearest_hw(&union_mask(masks, &draw.subset)?, lh, lw)?.to_dtype(sd.dtype)?;
        let rec = (losses::masked_rec_loss(&eps, target, &rec_mask)? * cfg.lambda_rec)?;
        let prior = match class_sample {
            Some(c) => Some(
                (forward.eps.narrow(0, 1, 1)? - &c.target)?
                    .sqr()?
                    .mean_all()?,
            ),
            None => None,
        };
        // The timestep that gates the attention loss: the instance's, or in phase B with
        // `dreambooth_gate_on_class` the class sample's (the released code reads timesteps[0]).
        let gate_t = match (phase, class_sample) {
            (Phase::DreamBooth, Some(c)) if cfg.dreambooth_gate_on_class => c.t,
            _ => draw.t,
        };
        let attention =
            self.attention_terms(phase, draw, gate_t, &forward.attention, &sel_masks)?;
        let mut total = match &attention.loss {
            Some(a) => (&rec + a)?,
            None => rec.clone(),
        };
        if let Some(p) = &prior {
            total = (total + (p * cfg.prior_weight)?)?;
        }
        Ok(Objective {
            total,
            rec,
            attention,
            prior,
            class_t: class_sample.map(|c| c.t),
        })
    }

    /// λ_attn · L_attn of Eq. 3 over the recorded layers, for Λ's masks `sel_masks` [J, H, W]:
    /// phase A.1 (reward, Eq. 1) Σ_j Σ_l ‖α·M_j^l − A_j^l‖², phase A.2 (penalty, Eq. 2)
    /// Σ_j Σ_l ‖(1 − M_j^l) ⊙ A_j^l‖², each squared norm taken as a mean over pixels, on the
    /// loss layers only and only while the gating timestep `gate_t` ≤ `t_max_attn`; the method
    /// chooses the loss ([`LearnMethod::attention_loss`]: Break-a-Scene's
    /// [`losses::bas_attn_loss`] with weight `lambda_reward` in every phase, none for TI-m and
    /// DB-m). Also measures each token's leak.
    fn attention_terms(
        &self,
        phase: Phase,
        draw: &Draw,
        gate_t: usize,
        attention: &ColumnRecorder,
        sel_masks: &Tensor,
    ) -> Result<AttentionTerms> {
        let cfg = self.cfg;
        let loss_layers = self.loss_layers(phase);
        let attn_active = gate_t as u64 <= cfg.t_max_attn;
        let form = cfg.learn_method().attention_loss(phase);
        let weight = match (form, phase) {
            (None, _) => 0.0,
            (Some(AttnLoss::BreakAScene), _) => cfg.lambda_reward,
            (_, Phase::Reward) => cfg.lambda_reward,
            (_, Phase::Penalty) => cfg.lambda_penalty,
            (_, Phase::DreamBooth) => cfg.dreambooth_penalty,
        };
        let mut attn_sum: Option<Tensor> = None;
        // Break-a-Scene averages its layers' maps before its loss.
        let mut bas_maps: Vec<Tensor> = Vec::new();
        let mut leak = vec![0f64; draw.subset.len()];
        let n_leak_layers = attention
            .layers()
            .iter()
            .filter(|l| under_any(l, &cfg.attn_layers))
            .count()
            .max(1) as f64;
        for layer in attention.layers() {
            let abar = attention.maps_of(layer, 0)?; // [J, h, w]
            let (_, h, w) = abar.dims3()?;
            let m = resize_bilinear(sel_masks, h, w)?.to_dtype(abar.dtype())?;
            let inv = (m.ones_like()? - &m)?;
            // leak: attention mass outside the mask / total mass, per token
            let outside: Vec<f32> = (&inv * &abar)?
                .sum((1, 2))?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let all: Vec<f32> = abar.sum((1, 2))?.to_dtype(DType::F32)?.to_vec1()?;
            if under_any(layer, &cfg.attn_layers) {
                for (j, (o, a)) in outside.iter().zip(&all).enumerate() {
                    leak[j] += (*o as f64 / (*a as f64).max(1e-12)) / n_leak_layers;
                }
            }
            if attn_active && weight != 0.0 && under_any(layer, loss_layers) {
                let term = match form {
                    Some(AttnLoss::Reward) => losses::attn_reward(&abar, &m, cfg.reward_alpha)?,
                    Some(AttnLoss::Penalty) => losses::attn_penalty(&abar, &m)?,
                    Some(AttnLoss::BreakAScene) | None => {
                        bas_maps.push(abar);
                        continue;
                    }
                };
                attn_sum = Some(match attn_sum {
                    Some(s) => (s + term)?,
                    None => term,
                });
            }
        }
        if !bas_maps.is_empty() {
            attn_sum = Some(losses::bas_attn_loss(
                &bas_maps,
                sel_masks,
                cfg.reward_alpha,
            )?);
        }
        let loss = match attn_sum {
            Some(s) => Some((s * weight)?),
            None => None,
        };
        let leak = (!attention.layers().is_empty()).then_some(leak);
        Ok(AttentionTerms { loss, leak })
    }

    /// One AdamW step on ∇L at rate `lr`, the gradient scaled down to norm `grad_clip` when
    /// it is longer.
    fn update(&mut self, loss: &Tensor, lr: f64, word_probes: &[WordProbe]) -> Result<()> {
        let grads = loss.backward()?;
        let scale = if self.cfg.grad_clip > 0.0 {
            let mut norm = self.opt.grad_norm(&grads)?;
            if !word_probes.is_empty() {
                let te = self.models.text_encoder.config();
                let mut sq = norm * norm;
                for p in word_probes {
                    if let Some(g) = grads.get(p.probe.as_tensor()) {
                        let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        sq += super::optim::table_rows_norm_sq(
                            &g,
                            &p.ids,
                            te.hidden_size,
                            te.vocab_size as u32,
                        );
                    }
                }
                norm = sq.sqrt();
            }
            if norm > self.cfg.grad_clip {
                self.cfg.grad_clip / (norm + 1e-6)
            } else {
                1.0
            }
        } else {
            1.0
        };
        self.opt.update(&grads, lr, scale)?;
        if self.cfg.max_token_norm > 0.0 {
            self.bound_rows(self.cfg.max_token_norm)?;
        }
        Ok(())
    }

    /// Scales every placeholder row longer than `max_norm` back to that length.
    fn bound_rows(&self, max_norm: f64) -> Result<()> {
        let rows = self.rows.as_tensor();
        let norms = rows.sqr()?.sum_keepdim(1)?.sqrt()?;
        let factor = (norms.affine(1.0 / max_norm, 0.0)?.maximum(1.0)?).recip()?;
        self.rows.set(&rows.broadcast_mul(&factor)?)?;
        Ok(())
    }

    /// Reports the step (losses, leak per token, lr, phase, t, progress), fails on a
    /// non-finite loss, and checkpoints when one is due.
    fn report_step(
        &mut self,
        step: u64,
        phase: Phase,
        lr: f64,
        draw: &Draw,
        objective: &Objective,
        sink: &mut dyn RunSink,
    ) -> Result<()> {
        let total_v = scalar(&objective.total)?;
        let rec_v = scalar(&objective.rec)?;
        sink.metric("loss/total", step, total_v)?;
        sink.metric("loss/rec", step, rec_v)?;
        let attn_v = match &objective.attention.loss {
            Some(a) => {
                let v = scalar(a)?;
                sink.metric("loss/attn", step, v)?;
                Some(v)
            }
            None => None,
        };
        if let Some(leak) = &objective.attention.leak {
            for (j, &tokidx) in draw.subset.iter().enumerate() {
                let name = &self.token_names[tokidx];
                sink.metric(&format!("leak/{name}"), step, leak[j])?;
                self.report.final_leak.insert(name.clone(), leak[j]);
            }
        }
        sink.metric("lr", step, lr)?;
        sink.metric("phase", step, phase as u8 as f64)?;
        sink.metric("t", step, draw.t as f64)?;
        if let Some(t_class) = objective.class_t {
            sink.metric("t_class", step, t_class as f64)?;
        }
        if !total_v.is_finite() {
            return Err(Error::Input(format!(
                "loss became {total_v} at step {step} (lower learn.lr?)"
            )));
        }
        let t = draw.t;
        sink.progress(&Progress {
            step: step + 1,
            total: self.total,
            phase: phase.name().into(),
            message: match attn_v {
                Some(a) => format!("loss {total_v:.4} rec {rec_v:.4} attn {a:.2e} t {t}"),
                None => format!("loss {total_v:.4} rec {rec_v:.4} t {t}"),
            },
        });
        self.report.steps_run += 1;
        let done = step + 1;
        let at_boundary = done == self.embed_steps || done == self.total;
        let checkpoint_due = (self.cfg.checkpoint_every > 0
            && done.is_multiple_of(self.cfg.checkpoint_every))
            || at_boundary;
        if checkpoint_due && !self.measure_only {
            sink.checkpoint(done, self.checkpoint(done).to_bytes()?)?;
        }
        Ok(())
    }

    /// The state after `step` steps: rows, optimiser moments and phase B's weights.
    fn checkpoint(&self, step: u64) -> Checkpoint {
        let mut tensors: HashMap<String, Tensor> = self.opt.state().into_iter().collect();
        tensors.insert("rows".into(), self.rows.as_tensor().clone());
        for (name, v) in &self.models.trained {
            tensors.insert(name.clone(), v.as_tensor().clone());
        }
        Checkpoint { step, tensors }
    }

    /// Writes the run's outputs: `embeddings`, phase B's `weights` or `lora`, the attention map of
    /// each token over the input image (`attn/<vK>.png`) and the optional `preview.png`.
    fn write_outputs(&mut self, sink: &mut dyn RunSink) -> Result<()> {
        let Self {
            sd,
            cfg,
            seed,
            tok,
            token_names,
            rows,
            models,
            scene,
            uncond_ids,
            ..
        } = self;
        let (sd, cfg, seed) = (*sd, *cfg, *seed);
        let dev = &sd.device;
        // Nothing below trains: its forward passes (attention maps, preview) keep no graph.
        let _inference = crate::model::no_grad();
        // Embeddings: one tensor per token.
        let mut emb = HashMap::new();
        for (i, name) in token_names.iter().enumerate() {
            emb.insert(name.clone(), rows.as_tensor().get(i)?.to_dtype(DType::F32)?);
        }
        let mut meta = BTreeMap::new();
        meta.insert("format".into(), "mifo-embeddings-1".into());
        meta.insert("tokens".into(), token_names.join(","));
        if let Some(xl) = &sd.xl {
            // SDXL: each row is both encoders' rows side by side.
            meta.insert(
                "encoder_widths".into(),
                format!(
                    "{},{}",
                    sd.text_encoder.config().hidden_size,
                    xl.text_encoder_2.config().hidden_size
                ),
            );
        }
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
                if sd.xl.is_some() {
                    // kohya's SDXL LoRA names follow the original UNet layout, whose block
                    // numbers depend on the ResNets per level (see store::export).
                    meta.insert(
                        "unet_layers_per_block".into(),
                        sd.unet
                            .config()
                            .layers_per_block
                            .iter()
                            .map(usize::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                    );
                }
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
        let ids_2 = ids_2_of(sd, &prompt, token_names.len())?;
        let cond = models.encode(&ids, ids_2.as_ref(), Some(rows.as_tensor()), pixel_size(sd))?;
        let layers = if cfg.attn_layers.is_empty() {
            vec!["up_blocks".to_string()]
        } else {
            cfg.attn_layers.clone()
        };
        let mut rec = ColumnRecorder::new(&layers, &positions);
        let tt = Tensor::new(&[t_map as f32], dev)?;
        models
            .unet
            .forward_cond(&zt, &tt, &cond.context, cond.added.as_ref(), Some(&mut rec))?;
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
            let img = if sd.is_xl() {
                let px = pixel_size(sd);
                let uncond = if sd
                    .xl
                    .as_ref()
                    .is_some_and(|x| x.force_zeros_for_empty_prompt)
                {
                    let z = cond.detach();
                    Conditioning {
                        context: z.context.zeros_like()?,
                        added: z
                            .added
                            .map(|a| -> Result<_> {
                                Ok(crate::model::unet::AddedCond {
                                    text_embeds: a.text_embeds.zeros_like()?,
                                    time_ids: a.time_ids,
                                })
                            })
                            .transpose()?,
                    }
                } else {
                    let empty_2 = ids_2_of(sd, "", 0)?;
                    models.encode(uncond_ids, empty_2.as_ref(), None, px)?
                };
                sampler.generate_cond(
                    &cond,
                    &uncond,
                    &latent,
                    cfg.preview_steps as usize,
                    cfg.preview_guidance,
                )?
            } else {
                sampler.generate(
                    &ids,
                    uncond_ids,
                    Some(rows.as_tensor()),
                    &latent,
                    cfg.preview_steps as usize,
                    cfg.preview_guidance,
                )?
            };
            sink.artifact("preview.png", png_bytes(&tensor_to_rgb(&img)?)?)?;
        }
        Ok(())
    }
}

/// A tensor's value as f64.
fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// AdamW over `vars` with the run's moments and weight decay.
fn new_optimiser(cfg: &LearnConfig, vars: Vec<(String, Var)>) -> Result<AdamW> {
    AdamW::new(
        vars,
        AdamWParams {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        },
    )
}
