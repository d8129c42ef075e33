//! `LearnConfig`: every knob of the learning stage, with the `paper` and `official` presets.
//! See `docs/mifo-impl-notes.md` §3 for where each value comes from.

use serde::{Deserialize, Serialize};

use super::method::LearnMethod;
use crate::error::{Error, Result};
use crate::imageio::ImageFit;

/// The presets `--preset` takes: MIFO's two (`paper`, `official`), then one per baseline
/// method with that method's published values, named as its `learn.method`.
pub const PRESETS: [&str; 5] = ["paper", "official", "break-a-scene", "ti-m", "db-m"];

/// The learning-stage configuration (`[learn]` in TOML, `--set learn.KEY=VALUE`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnConfig {
    /// The learning method: `mifo`, `break-a-scene`, `ti-m` or `db-m` (see [`LearnMethod`]):
    /// which phases run, what each trains and which attention loss it adds. The other keys
    /// keep their meaning; a key of a loss or phase the method does not run is not read.
    /// Runs stored before this key existed read `mifo`, which is what they ran.
    #[serde(default = "default_method")]
    pub method: String,
    /// Phase A.1: embedding steps with the attention *reward* term.
    pub reward_steps: u64,
    /// Phase A.2: embedding steps with the attention *penalty* term.
    pub penalty_steps: u64,
    /// Phase B: DreamBooth steps after the embedding phase (0 = none).
    pub dreambooth_steps: u64,
    /// Phase B mode: `full` (fine-tune all UNet and text-encoder weights with the tokens),
    /// `lora` (train rank-`lora_rank` adapters on their attention projections instead), `none`.
    pub dreambooth: String,
    /// Rank of the LoRA adapters (`dreambooth = "lora"`).
    pub lora_rank: u64,
    /// Phase A learning rate (AdamW on the placeholder rows).
    pub lr: f64,
    /// Phase B learning rate.
    pub dreambooth_lr: f64,
    /// LR schedule of phase A: `constant` or `cosine` (cosine decay over phase A after a
    /// linear warm-up of `warmup_steps`).
    pub lr_schedule: String,
    /// Linear warm-up steps of phase A.
    pub warmup_steps: u64,
    /// The warm-up starts from 0: step s of the warm-up uses lr·s/`warmup_steps`, so the first
    /// step does not move the tokens (diffusers' scheduler, as the released code runs it).
    /// `false` uses lr·(s + 1)/`warmup_steps`, so every step trains. Runs stored before this key
    /// existed read `false`, which is what they ran.
    #[serde(default)]
    pub warmup_from_zero: bool,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_eps: f64,
    /// AdamW decoupled weight decay (applies to the trained tensors only).
    pub weight_decay: f64,
    /// Clip the global gradient norm of the trained tensors to this (0 = off).
    pub grad_clip: f64,
    /// Whether the clipped gradient norm also counts the gradients of the prompt's word rows
    /// (`a`, `photo`, `of`, `and`, start, end and padding tokens, and the class prompt's words
    /// with prior preservation), as the released code does: it trains the whole embedding
    /// table, clips over it, and then restores every row but the placeholders'. Only the
    /// placeholder rows are updated either way; what changes is the clipping factor. `false`
    /// counts the trained variables alone (the paper preset); `true` in the `official` preset.
    /// SD only: an SDXL run with it on is refused. Runs stored before this key existed read
    /// `false`, which is what they ran.
    #[serde(default)]
    pub grad_clip_word_rows: bool,
    /// Weight of the masked reconstruction loss.
    pub lambda_rec: f64,
    /// Weight of the attention reward term (phase A.1).
    pub lambda_reward: f64,
    /// Weight of the attention penalty term (phase A.2).
    pub lambda_penalty: f64,
    /// α in the reward ‖α·M − A‖².
    pub reward_alpha: f64,
    /// The attention loss applies only when the sampled timestep t ≤ this.
    pub t_max_attn: u64,
    /// Cross-attention layers of the attention loss, as module-path prefixes (decoder 16² and
    /// 32² for SD 2.1 at 512 px: `up_blocks.1`, `up_blocks.2`).
    pub attn_layers: Vec<String>,
    /// Placeholder initialisation: `mean` (vocabulary mean) or comma-separated words, one per
    /// token (`dog,cat`): each token starts at its word's first BPE row.
    pub init: String,
    /// Probability of flipping image and masks horizontally each step.
    pub flip_p: f64,
    /// Probability that a step learns from a recomposed image instead of the scene: the step's
    /// instances Λ alone, each cut out by its mask and put down at a random place (kept at its
    /// size) on the scene's background colour, so that a token cannot carry where its
    /// instance stood or the other instances (`learn::recompose`; not in the paper or the
    /// released code, 0 in every preset). Runs stored before this key existed read 0, which is
    /// what they ran.
    #[serde(default)]
    pub recompose_p: f64,
    /// Largest L2 norm a placeholder row may reach: after each update a longer row is scaled
    /// back onto this sphere (0 = no bound, the paper and the released code). Runs stored
    /// before this key existed read 0, which is what they ran.
    #[serde(default)]
    pub max_token_norm: f64,
    /// Which instances each step learns: `random` (a random non-empty subset Λ, its tokens in
    /// the prompt and its masks' union in the loss: the paper's joint sampling, App. C.5) or
    /// `all` (every instance every step). Runs stored before this key existed read `random`,
    /// which is what they ran.
    #[serde(default = "default_subsets")]
    pub subsets: String,
    /// How the image and masks are brought to the model's square size: `crop` (resize the
    /// short side, centre-crop: the paper, App. C.1) or `stretch` (resize both sides, the
    /// aspect ratio is not kept: the released code's `Resize([512, 512])`). Runs stored before
    /// this key existed read `crop`, which is what they ran.
    #[serde(default = "default_image_fit")]
    pub image_fit: String,
    /// Encode the image with a VAE *sample* (as the released code) instead of the mean.
    pub vae_sample: bool,
    /// Phase B: extra penalty weight on the layers of `dreambooth_penalty_layers` (0 = off).
    pub dreambooth_penalty: f64,
    /// Phase B penalty layers (module-path prefixes; 16² down and up blocks in the official code).
    pub dreambooth_penalty_layers: Vec<String>,
    /// Phase B with prior preservation: the penalty's `t_max_attn` gate reads the *class*
    /// sample's timestep, as the released code does (`timesteps[0]` of a batch whose first item
    /// is the class image); `false` gates on the instance's own timestep. Runs stored before
    /// this key existed read `false`, which is what they ran.
    #[serde(default)]
    pub dreambooth_gate_on_class: bool,
    /// Phase B: DreamBooth prior preservation (each step also trains on a class image generated
    /// by the base model from `class_prompt`; the released code does this with chairs).
    pub prior_preservation: bool,
    /// Prompt of the class images.
    pub class_prompt: String,
    /// Number of class images (generated once per model and prompt, then reused from the store).
    pub class_images: u64,
    /// DDIM steps used to generate each class image.
    pub class_image_steps: u64,
    /// Weight of the class (prior) reconstruction loss.
    pub prior_weight: f64,
    /// Checkpoint every this many steps (0 = only at the end of each phase).
    pub checkpoint_every: u64,
    /// Render `preview.png` (a sample of "a photo of <v0> and <v1> …") at the end.
    pub preview: bool,
    /// DDIM steps of the preview sample.
    pub preview_steps: u64,
    /// CFG scale of the preview sample.
    pub preview_guidance: f64,
}

impl LearnConfig {
    /// The paper's values (Sec. 4.1, App. B–C): 200 reward + 600 penalty steps at lr 5e-3,
    /// attention loss for t ≤ 700 with λ 0.01 for both terms, then 400 DreamBooth steps at 2e-6
    /// without prior preservation.
    pub fn paper() -> Self {
        Self {
            method: default_method(),
            reward_steps: 200,
            penalty_steps: 600,
            dreambooth_steps: 400,
            dreambooth: "full".into(),
            lora_rank: 4,
            lr: 5e-3,
            dreambooth_lr: 2e-6,
            lr_schedule: "constant".into(),
            warmup_steps: 0,
            warmup_from_zero: false,
            adam_beta1: 0.9,
            adam_beta2: 0.99,
            adam_eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 1.0,
            grad_clip_word_rows: false,
            lambda_rec: 1.0,
            lambda_reward: 0.01,
            lambda_penalty: 0.01,
            reward_alpha: 0.5,
            t_max_attn: 700,
            attn_layers: vec!["up_blocks.1".into(), "up_blocks.2".into()],
            init: "mean".into(),
            flip_p: 0.0,
            recompose_p: 0.0,
            image_fit: default_image_fit(),
            subsets: default_subsets(),
            max_token_norm: 0.0,
            vae_sample: true,
            dreambooth_penalty: 0.0,
            dreambooth_penalty_layers: vec!["down_blocks.2".into(), "up_blocks.1".into()],
            dreambooth_gate_on_class: false,
            prior_preservation: false,
            class_prompt: "a photo of a chair".into(),
            class_images: 100,
            class_image_steps: 50,
            prior_weight: 1.0,
            checkpoint_every: 100,
            preview: true,
            preview_steps: 50,
            preview_guidance: 7.5,
        }
    }

    /// The released code's values: 200 + 400 steps, t < 500, reward 0.01 / penalty 0.02,
    /// cosine schedule with 10 warm-up steps from lr 0, images stretched to the model's size,
    /// flips with p 0.5, and during DreamBooth prior
    /// preservation (100 class images of "a photo of a chair", weight 1) plus the extra 0.02
    /// penalty on the 16² layers.
    pub fn official() -> Self {
        Self {
            penalty_steps: 400,
            lambda_penalty: 0.02,
            t_max_attn: 499,
            lr_schedule: "cosine".into(),
            warmup_steps: 10,
            warmup_from_zero: true,
            grad_clip_word_rows: true,
            flip_p: 0.5,
            image_fit: "stretch".into(),
            dreambooth_penalty: 0.02,
            dreambooth_gate_on_class: true,
            prior_preservation: true,
            ..Self::paper()
        }
    }

    /// Break-a-Scene as `google/break-a-scene` (`train.py` at b142cf2) runs by default: phase 1
    /// = 400 token steps at 5e-4, phase 2 = 400 steps of tokens, UNet and text encoder at 2e-6,
    /// constant rates, AdamW β (0.9, 0.999), ε 1e-8, weight decay 0.01, clip 1; its attention
    /// loss with λ 0.01 at every timestep in both phases on the 16² cross-attention layers of
    /// SD 2.1 at 512 px (`down_blocks.2`, `up_blocks.1`), the mask itself as the target (α 1);
    /// flips with p 0.5; prior preservation with 100 images of "a photo at the beach", weight 1.
    pub fn break_a_scene() -> Self {
        Self {
            method: "break-a-scene".into(),
            reward_steps: 400,
            penalty_steps: 0,
            dreambooth_steps: 400,
            dreambooth: "full".into(),
            lr: 5e-4,
            dreambooth_lr: 2e-6,
            lr_schedule: "constant".into(),
            warmup_steps: 0,
            warmup_from_zero: false,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 1.0,
            lambda_rec: 1.0,
            lambda_reward: 0.01,
            lambda_penalty: 0.0,
            reward_alpha: 1.0,
            t_max_attn: 999,
            attn_layers: vec!["down_blocks.2".into(), "up_blocks.1".into()],
            flip_p: 0.5,
            dreambooth_penalty: 0.0,
            prior_preservation: true,
            class_prompt: "a photo at the beach".into(),
            class_images: 100,
            class_image_steps: 50,
            prior_weight: 1.0,
            ..Self::paper()
        }
    }

    /// TI-m: textual inversion of the placeholder rows with the masked loss and joint sampling,
    /// no attention loss, no phase B: MIFO's token budget (800 steps, paper Sec. 4.1) at
    /// textual inversion's rate 5e-3 (Gal et al. 2022, also MIFO's phase-A rate).
    pub fn ti_m() -> Self {
        Self {
            method: "ti-m".into(),
            reward_steps: 800,
            penalty_steps: 0,
            dreambooth_steps: 0,
            dreambooth: "none".into(),
            lambda_reward: 0.0,
            lambda_penalty: 0.0,
            dreambooth_penalty: 0.0,
            prior_preservation: false,
            ..Self::paper()
        }
    }

    /// DB-m: DreamBooth with the masked loss and joint sampling, tokens, UNet and text encoder
    /// trained together from the first step, no attention loss: the paper preset's DreamBooth
    /// (400 steps at 2e-6, no prior preservation, paper App. B) as the whole run.
    pub fn db_m() -> Self {
        Self {
            method: "db-m".into(),
            reward_steps: 0,
            penalty_steps: 0,
            dreambooth_steps: 400,
            dreambooth: "full".into(),
            lambda_reward: 0.0,
            lambda_penalty: 0.0,
            dreambooth_penalty: 0.0,
            prior_preservation: false,
            ..Self::paper()
        }
    }

    /// A preset by name (one of [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "paper" => Ok(Self::paper()),
            "official" => Ok(Self::official()),
            "break-a-scene" => Ok(Self::break_a_scene()),
            "ti-m" => Ok(Self::ti_m()),
            "db-m" => Ok(Self::db_m()),
            o => Err(Error::Input(format!(
                "--preset {o}: unknown preset (expected paper, official, break-a-scene, ti-m or db-m)"
            ))),
        }
    }

    /// Resolves a config as every front end does: the preset `preset` (by default `paper`, or,
    /// when `--config`/`--set` choose a `learn.method` other than `mifo`, that method's own
    /// preset, so `--set learn.method=break-a-scene` runs Break-a-Scene's published values),
    /// then the `[learn]` table of `file`, then `sets`. Returns the preset's name with the config.
    pub fn resolve(
        preset: Option<&str>,
        file: Option<&std::path::Path>,
        sets: &[String],
    ) -> Result<(String, Self)> {
        let named = preset.unwrap_or("paper");
        let cfg = crate::config::resolve(&Self::preset(named)?, "learn", file, sets)?;
        if preset.is_none() && cfg.method != "mifo" && LearnMethod::parse(&cfg.method).is_some() {
            let own = cfg.method.clone();
            let cfg = crate::config::resolve(&Self::preset(&own)?, "learn", file, sets)?;
            return Ok((own, cfg));
        }
        Ok((named.to_string(), cfg))
    }

    /// The preset of `method`: `paper` for MIFO, else the baseline's own.
    pub fn method_preset(method: LearnMethod) -> Self {
        match method {
            LearnMethod::Mifo => Self::paper(),
            LearnMethod::BreakAScene => Self::break_a_scene(),
            LearnMethod::TiM => Self::ti_m(),
            LearnMethod::DbM => Self::db_m(),
        }
    }

    /// `method` as a [`LearnMethod`] (`mifo` for a value [`Self::validate`] would refuse).
    pub fn learn_method(&self) -> LearnMethod {
        LearnMethod::parse(&self.method).unwrap_or(LearnMethod::Mifo)
    }

    /// The configuration the learner runs: the keys as given, less the phases and losses the
    /// method does not have (`ti-m`: no phase B; `db-m`: no phase A; both: every attention
    /// weight 0).
    pub fn effective(&self) -> Self {
        let method = self.learn_method();
        let mut e = self.clone();
        if !method.has_token_phase() {
            e.reward_steps = 0;
            e.penalty_steps = 0;
        }
        if !method.has_weight_phase() {
            e.dreambooth = "none".into();
        }
        if matches!(method, LearnMethod::TiM | LearnMethod::DbM) {
            e.lambda_reward = 0.0;
            e.lambda_penalty = 0.0;
            e.dreambooth_penalty = 0.0;
        }
        e
    }

    /// Total steps of the phases the method runs (A and B for `mifo`).
    pub fn total_steps(&self) -> u64 {
        let e = self.effective();
        e.embedding_steps()
            + if e.dreambooth == "none" {
                0
            } else {
                e.dreambooth_steps
            }
    }

    /// Steps of phase A.
    pub fn embedding_steps(&self) -> u64 {
        self.reward_steps + self.penalty_steps
    }

    /// Checks value ranges and enumerations; one-line errors naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, m: &str| Err(Error::Input(format!("learn.{k}: {m}")));
        let Some(method) = LearnMethod::parse(&self.method) else {
            return bad("method", "expected mifo, break-a-scene, ti-m or db-m");
        };
        if !["full", "lora", "none"].contains(&self.dreambooth.as_str()) {
            return bad(
                "dreambooth",
                &format!("`{}` is not one of full, lora, none", self.dreambooth),
            );
        }
        if self.dreambooth == "lora" && self.lora_rank == 0 {
            return bad("lora_rank", "must be at least 1");
        }
        if !["constant", "cosine"].contains(&self.lr_schedule.as_str()) {
            return bad("lr_schedule", "expected constant or cosine");
        }
        if method.has_token_phase() && self.embedding_steps() == 0 {
            return bad(
                "reward_steps",
                "reward_steps + penalty_steps must be at least 1",
            );
        }
        if method == LearnMethod::DbM {
            if self.dreambooth == "none" {
                return bad(
                    "dreambooth",
                    "db-m trains the weights: expected full or lora",
                );
            }
            if self.dreambooth_steps == 0 {
                return bad(
                    "dreambooth_steps",
                    "db-m runs only phase B: must be at least 1",
                );
            }
        }
        if self.lr.is_nan()
            || self.lr <= 0.0
            || self.dreambooth_lr.is_nan()
            || self.dreambooth_lr < 0.0
        {
            return bad("lr", "learning rates must be positive");
        }
        if !(self.max_token_norm >= 0.0 && self.max_token_norm.is_finite()) {
            return bad(
                "max_token_norm",
                "expected a finite number ≥ 0 (0 = no bound)",
            );
        }
        if !["random", "all"].contains(&self.subsets.as_str()) {
            return bad("subsets", "expected random or all");
        }
        if !["crop", "stretch"].contains(&self.image_fit.as_str()) {
            return bad("image_fit", "expected crop or stretch");
        }
        if !(0.0..=1.0).contains(&self.flip_p) {
            return bad("flip_p", "must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.recompose_p) {
            return bad("recompose_p", "must be in [0, 1]");
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return bad("adam_beta1", "β must be in [0, 1)");
        }
        if self.prior_preservation && self.class_images == 0 {
            return bad(
                "class_images",
                "prior preservation needs at least one class image",
            );
        }
        if self.attn_layers.is_empty() && (self.lambda_reward != 0.0 || self.lambda_penalty != 0.0)
        {
            return bad("attn_layers", "no layers for a non-zero attention loss");
        }
        Ok(())
    }
}

impl LearnConfig {
    /// `image_fit` as the image layer's [`ImageFit`] (`crop` for a value [`Self::validate`]
    /// would refuse).
    pub fn fit(&self) -> ImageFit {
        ImageFit::parse(&self.image_fit).unwrap_or(ImageFit::Crop)
    }
}

/// `mifo`: the method of runs stored before `method` existed.
fn default_method() -> String {
    "mifo".into()
}

/// `random`: the value of `subsets` for runs stored before the key existed.
fn default_subsets() -> String {
    "random".into()
}

/// `crop`: the value of `image_fit` for runs stored before the key existed.
fn default_image_fit() -> String {
    "crop".into()
}
