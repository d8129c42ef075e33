//! The synthesis configuration (`[synth]` in config files, `--set synth.key=value`), its presets,
//! and the two schedules that depend only on it: the penalty weight α(t) (paper Eq. 11) and the
//! latent step size β_i.
//!
//! Defaults follow the released MIFO code (`docs/mifo-impl-notes.md` §4–5) except the
//! α values, which follow the paper; the `official` preset switches those to the code's.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Every knob of the synthesis stage. Field names are the `--set synth.<name>` keys; scripts rely
/// on `steps`, `guided_steps`, `guidance_scale` and the seven ablation switches, so those names
/// are stable. Keys missing when deserialising (records written before a key existed) take
/// their defaults; unknown `--set` keys are rejected by [`crate::config::apply_overrides`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SynthConfig {
    /// Number of DDIM denoising steps (50: t = 981, 961, …, 1 with `steps_offset` 1).
    pub steps: usize,
    /// Steps 0..guided_steps run the latent optimisation and use the boxes as regions; mask
    /// refinement starts at this step (paper T_bound, code `num_guidance_steps` = 15). Also the
    /// N of the α schedule.
    pub guided_steps: usize,
    /// Classifier-free guidance scale with the empty prompt as the unconditional input (7.5).
    pub guidance_scale: f64,
    /// DDIM `steps_offset` used for synthesis, independent of the model folder's scheduler
    /// config (1 in both presets: the released code builds its scheduler without one, but
    /// diffusers' `StableDiffusionPipeline`, which its pipeline subclasses, resets 0 to 1, so it
    /// samples t = 981…1; `fixtures/*/synth_reference.*` records it). Records stored before
    /// 2026-12-07 ran 0 and keep it.
    pub steps_offset: usize,
    /// DDIM eta; only 0 (deterministic DDIM) is supported.
    pub eta: f64,

    /// The synthesis method (`mifo`, `bounded-attention` or `plain`, see [`SynthMethod`]).
    /// Records stored before the key existed ran `mifo`.
    pub method: String,
    /// Master switch: `false` is plain Stable Diffusion (no attention masks, no latent
    /// optimisation, no refinement; the attention is at most observed for the metrics).
    pub box_control: bool,
    /// Box control in the self-attention layers: the SA masks and the SA loss term.
    pub sa_control: bool,
    /// Box control in the cross-attention layers: the CA masks and the CA loss term.
    pub ca_control: bool,
    /// The out-of-box penalty `α(t)·log(1 + BG)` of the loss (paper Eq. 10); `false` sets α = 0.
    pub out_of_box: bool,
    /// Decay α over the guided steps (paper Eq. 11); `false` keeps α = `alpha_max`.
    pub alpha_decay: bool,
    /// Latent optimisation at steps < `guided_steps` (paper Eq. 15).
    pub latent_opt: bool,
    /// Replace the boxes by self-attention cluster masks from step `guided_steps` on.
    pub refine: bool,

    /// The box loss's form (`official` or `paper`, see [`LossForm`]). Records stored before
    /// the key existed ran the `official` form and read it back.
    #[serde(default = "default_loss_form")]
    pub loss_form: String,
    /// Most gradient iterations per guided step (5).
    pub gd_iters: usize,
    /// Stop the iterations of a step once loss/(batch·subjects) of the previous iteration is
    /// below this (0.2; checked before each iteration, as the released code does).
    pub loss_threshold: f64,
    /// Step size β at guided step 0 (8).
    pub step_size_start: f64,
    /// Step size the linear schedule heads for: β_i = start + (end − start)/guided_steps·i, so
    /// with 15 guided steps the last one uses 2.4, as in the released code (2).
    pub step_size_end: f64,
    /// When an iteration of the latent optimisation raised the box loss, go back to the latent
    /// before it and retry with half the step, and end each guided step on the latent with the
    /// lowest loss seen. Neither the paper nor the released code does this (`false` in both
    /// presets); on small latents a full step can throw the sample off the model's images.
    /// Records stored before the key existed read `false`, which is what they ran.
    #[serde(default)]
    pub backtrack: bool,
    /// Run a run's samples in lockstep and stop each guided step's iterations for all of them
    /// together, once the loss summed over samples and divided by samples·subjects falls below
    /// `loss_threshold`, as the released code does with its batch (`official` preset). `false`
    /// (the `paper` preset) stops each sample on its own loss. Each latent still moves by its
    /// own loss's gradient. Not with `backtrack`. Records stored before the key existed read
    /// `false`, which is what they ran.
    #[serde(default)]
    pub joint_stop: bool,
    /// A trust region for the latent optimisation: each iteration's move `β·∇` is scaled down
    /// so that its root-mean-square over the latent's elements is at most this (0 = no bound,
    /// both presets and records stored before the key existed). On the world model's 8×8
    /// latents 1 sample in 6 came out washed out without it and none with 0.2
    /// (`docs/performance.md`).
    #[serde(default)]
    pub max_step: f64,
    /// Weight of the cross-attention loss term (1.5).
    pub lambda_ca: f64,
    /// Weight of the self-attention loss term (0.5).
    pub lambda_sa: f64,
    /// α at the first guided step (paper 0.5, code 0.4).
    pub alpha_max: f64,
    /// α at the end of the linear stage, step `alpha_stage1_steps` (paper α_min 0.2, code 0.1).
    pub alpha_min: f64,
    /// α the cosine stage ends at, reached at u = `guided_steps` (paper 0.1, code 0.01).
    pub alpha_final: f64,
    /// Length S1 of the linear stage of α (3).
    pub alpha_stage1_steps: usize,
    /// The α index u of guided step i is `i + alpha_step_base`. 1 (paper preset) evaluates
    /// Eq. 11 on u = 1..N; 0 (official preset) reproduces the released code, whose counter makes
    /// u equal the step index (α(0) = 0.55 there, above α_max).
    pub alpha_step_base: usize,
    /// How α's index u advances: `step` (u = guided step + `alpha_step_base`) or `code` (the
    /// released code's counter: u = ⌊calls/10⌋, where `calls` counts the CA and SA loss terms
    /// evaluated by the latent optimisation so far, CA then SA in each iteration, so u lags
    /// the step when the early stop cuts iterations; `alpha_step_base` is not used).
    /// Records stored before the key existed ran `step`.
    #[serde(default = "default_alpha_index")]
    pub alpha_index: String,
    /// Prompt words of the stop-word list (see `synth::control`) that are not part of a subject
    /// are hidden from every pixel in the cross-attention (the released code's filter tokens).
    pub hide_stop_words: bool,

    /// Mask refinement every this many steps after the first one (5).
    pub refine_every: usize,
    /// K-means clusters per subject (3).
    pub clusters_per_subject: usize,
    /// Threshold σ_noun of the soft cross-attention masks: sigmoid(scale·(map − threshold)) (0.2).
    pub ca_threshold: f64,
    /// Clusters whose best subject score is below this become background (σ_cluster, 0.2).
    pub cluster_threshold: f64,
    /// Slope of the sigmoid of the soft cross-attention masks (10).
    pub sigmoid_scale: f64,
    /// Random restarts of the first K-means fit (100); later fits start from the previous centres.
    pub kmeans_restarts: usize,
    /// Most Lloyd iterations per K-means fit (100).
    pub kmeans_iters: usize,
    /// K-means stops when the centres move less than this (summed squared shift, 1e-4).
    pub kmeans_tol: f64,
    /// Seed of the K-means initialisation (123).
    pub kmeans_seed: u64,

    /// Module-path prefixes of the attention layers whose maps enter the loss and the leak
    /// metric (cross-attention layers for CA, self-attention layers for SA). A prefix matches
    /// whole dotted components: `up_blocks.1` matches `up_blocks.1.attentions.0…` but not
    /// `up_blocks.10…`. Default: the mid block and the first decoder level (SD: 8² and 16²).
    pub loss_layers: Vec<String>,
    /// Module-path prefixes of the layers whose maps are averaged for mask refinement and for
    /// the `attn/*` images (self- and cross-attention); they must share one resolution.
    /// Default: the first decoder level (SD: 16²).
    pub cluster_layers: Vec<String>,
    /// Record `leak/*` metrics and `attn/*` images. Only reads attention probabilities; with
    /// `box_control = false` and this `false`, the UNet runs with no hook at all.
    pub attn_metrics: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            steps: 50,
            guided_steps: 15,
            guidance_scale: 7.5,
            steps_offset: 1,
            eta: 0.0,
            method: "mifo".into(),
            box_control: true,
            sa_control: true,
            ca_control: true,
            out_of_box: true,
            alpha_decay: true,
            latent_opt: true,
            refine: true,
            loss_form: "paper".into(),
            gd_iters: 5,
            loss_threshold: 0.2,
            step_size_start: 8.0,
            step_size_end: 2.0,
            backtrack: false,
            joint_stop: false,
            max_step: 0.0,
            lambda_ca: 1.5,
            lambda_sa: 0.5,
            alpha_max: 0.5,
            alpha_min: 0.2,
            alpha_final: 0.1,
            alpha_stage1_steps: 3,
            alpha_step_base: 1,
            alpha_index: "step".into(),
            hide_stop_words: true,
            refine_every: 5,
            clusters_per_subject: 3,
            ca_threshold: 0.2,
            cluster_threshold: 0.2,
            sigmoid_scale: 10.0,
            kmeans_restarts: 100,
            kmeans_iters: 100,
            kmeans_tol: 1e-4,
            kmeans_seed: 123,
            loss_layers: vec!["mid_block".into(), "up_blocks.1".into()],
            cluster_layers: vec!["up_blocks.1".into()],
            attn_metrics: true,
        }
    }
}

/// Names accepted by [`SynthConfig::preset`].
pub const PRESETS: &[&str] = &["paper", "official"];

impl SynthConfig {
    /// A named preset: `paper` (the default: α 0.5 / 0.2 / 0.1, u = step + 1, the paper's loss
    /// form) or `official` (the released code's α 0.4 / 0.1 / 0.01 indexed by its counter of
    /// loss terms, `alpha_index = code`, and its loss form).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "paper" => Ok(Self::default()),
            "official" => Ok(Self {
                alpha_max: 0.4,
                alpha_min: 0.1,
                alpha_final: 0.01,
                alpha_step_base: 0,
                alpha_index: "code".into(),
                loss_form: "official".into(),
                joint_stop: true,
                ..Self::default()
            }),
            other => Err(Error::Input(format!(
                "unknown synth preset `{other}` (expected {})",
                PRESETS.join(" or ")
            ))),
        }
    }

    /// `method` as a [`SynthMethod`] (`mifo` for a value [`Self::check`] would refuse).
    pub fn synth_method(&self) -> SynthMethod {
        SynthMethod::parse(&self.method).unwrap_or(SynthMethod::Mifo)
    }

    /// The configuration the sampler runs: the keys as given for `mifo`; for
    /// `bounded-attention` no out-of-box penalty (α = 0; the hook also uses its loss ratio);
    /// for `plain` no box control and no attention metrics, so the UNet runs without a hook.
    pub fn effective(&self) -> SynthConfig {
        match self.synth_method() {
            SynthMethod::Mifo => self.clone(),
            SynthMethod::BoundedAttention => SynthConfig {
                out_of_box: false,
                ..self.clone()
            },
            SynthMethod::Plain => SynthConfig {
                box_control: false,
                attn_metrics: false,
                ..self.clone()
            },
        }
    }

    /// `loss_form` as a [`LossForm`] (`paper` for a value [`Self::check`] would refuse).
    pub fn form(&self) -> LossForm {
        LossForm::parse(&self.loss_form).unwrap_or(LossForm::Paper)
    }

    /// Checks values that serde cannot (ranges, supported features).
    pub fn check(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(Error::Config(format!("synth.{key}: {why}")));
        if self.steps == 0 {
            return bad("steps", "must be at least 1");
        }
        if self.eta != 0.0 {
            return bad("eta", "only 0 (deterministic DDIM) is supported");
        }
        if !self.guidance_scale.is_finite() {
            return bad("guidance_scale", "must be a finite number");
        }
        if SynthMethod::parse(&self.method).is_none() {
            return bad("method", "expected mifo, bounded-attention or plain");
        }
        if !["step", "code"].contains(&self.alpha_index.as_str()) {
            return bad("alpha_index", "expected step or code");
        }
        if LossForm::parse(&self.loss_form).is_none() {
            return bad("loss_form", "expected official or paper");
        }
        if self.refine_every == 0 {
            return bad("refine_every", "must be at least 1");
        }
        if self.clusters_per_subject == 0 {
            return bad("clusters_per_subject", "must be at least 1");
        }
        if self.kmeans_restarts == 0 {
            return bad("kmeans_restarts", "must be at least 1");
        }
        if self.alpha_stage1_steps == 0 {
            return bad("alpha_stage1_steps", "must be at least 1");
        }
        for (key, v) in [
            ("loss_threshold", self.loss_threshold),
            ("step_size_start", self.step_size_start),
            ("step_size_end", self.step_size_end),
            ("max_step", self.max_step),
            ("lambda_ca", self.lambda_ca),
            ("lambda_sa", self.lambda_sa),
            ("alpha_max", self.alpha_max),
            ("alpha_min", self.alpha_min),
            ("alpha_final", self.alpha_final),
            ("ca_threshold", self.ca_threshold),
            ("cluster_threshold", self.cluster_threshold),
            ("sigmoid_scale", self.sigmoid_scale),
            ("kmeans_tol", self.kmeans_tol),
        ] {
            if !v.is_finite() {
                return bad(key, "must be a finite number");
            }
        }
        if self.max_step < 0.0 {
            return bad("max_step", "must be 0 (no bound) or a positive number");
        }
        if self.joint_stop && self.backtrack {
            return bad(
                "joint_stop",
                "cannot be combined with synth.backtrack (samples in lockstep share no backtracking)",
            );
        }
        for (key, list) in [
            ("loss_layers", &self.loss_layers),
            ("cluster_layers", &self.cluster_layers),
        ] {
            if list.iter().any(|p| p.trim().is_empty()) {
                return bad(key, "contains an empty prefix");
            }
        }
        Ok(())
    }

    /// The penalty weight α for guided step `step` (0-based): 0 without `out_of_box`,
    /// `alpha_max` without `alpha_decay`, else paper Eq. 11 at u = step + `alpha_step_base`
    /// with S1 = `alpha_stage1_steps` and N = `guided_steps`:
    /// linear α_max → α_min over u = 1..S1 (extrapolated for u = 0), then
    /// α_final + (α_min − α_final)·(1 + cos(π(u − S1)/(N − S1)))/2 up to u = N, then α_final.
    pub fn alpha(&self, step: usize) -> f64 {
        self.alpha_at(step + self.alpha_step_base)
    }

    /// α of the CA and the SA term of a latent-optimisation iteration: both [`Self::alpha`] of
    /// the guided step with `alpha_index = step`; with `code`, Eq. 11 at u = ⌊calls/10⌋ for CA
    /// and ⌊(calls + 1)/10⌋ for SA, `calls` being the loss terms evaluated before this
    /// iteration in the sample (two per iteration), as the released code's counter runs.
    pub fn alpha_pair(&self, step: usize, calls: usize) -> (f64, f64) {
        if self.alpha_index == "code" {
            (self.alpha_at(calls / 10), self.alpha_at((calls + 1) / 10))
        } else {
            (self.alpha(step), self.alpha(step))
        }
    }

    /// Eq. 11 at index u (with the `out_of_box` and `alpha_decay` switches).
    fn alpha_at(&self, u: usize) -> f64 {
        if !self.out_of_box {
            return 0.0;
        }
        if !self.alpha_decay {
            return self.alpha_max;
        }
        let u = u as f64;
        let s1 = self.alpha_stage1_steps as f64;
        let n = self.guided_steps as f64;
        if u <= s1 {
            if self.alpha_stage1_steps <= 1 {
                return self.alpha_min;
            }
            self.alpha_max + (u - 1.0) / (s1 - 1.0) * (self.alpha_min - self.alpha_max)
        } else if u <= n {
            let c = (std::f64::consts::PI * (u - s1) / (n - s1)).cos();
            self.alpha_final + (1.0 + c) / 2.0 * (self.alpha_min - self.alpha_final)
        } else {
            self.alpha_final
        }
    }

    /// Whether the masks are refined before denoising step `step`: at `guided_steps` and every
    /// `refine_every` steps after it (with `refine` on).
    pub fn refines_at(&self, step: usize) -> bool {
        self.refine
            && step >= self.guided_steps
            && (step - self.guided_steps).is_multiple_of(self.refine_every)
    }

    /// The latent step size β_i = start + (end − start)/guided_steps·i for guided step i.
    pub fn step_size(&self, step: usize) -> f64 {
        let n = self.guided_steps.max(1) as f64;
        self.step_size_start + (self.step_size_end - self.step_size_start) / n * step as f64
    }
}

/// The form of the latent optimisation's box loss (`synth.loss_form`;
/// `docs/mifo-impl-notes.md` §4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossForm {
    /// The released code: FG and BG are sums of head-summed probabilities, BG over the pixels
    /// in no box, and z moves along −∇ of the summed terms (λ_CA·Σ_i CA_i + λ_SA·Σ_i SA_i).
    Official,
    /// The paper's equations: FG and BG are squared L2 norms of the head-mean maps (Eqs. 6–7),
    /// BG over the complement (1 − M_i) of the subject's own box, and z moves along −∇ Σ_i L_i²
    /// (Eq. 15) with L_i = λ_CA·CA_i + λ_SA·SA_i.
    Paper,
}

impl LossForm {
    /// `official` or `paper`; anything else is `None`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "official" => Some(Self::Official),
            "paper" => Some(Self::Paper),
            _ => None,
        }
    }
}

/// The synthesis method (`synth.method`; `docs/mifo-impl-notes.md` §4.4a).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthMethod {
    /// MIFO's precise synthesis: box control with the reward and out-of-box penalty.
    Mifo,
    /// Bounded Attention (Dahary et al. 2024, `omer11a/bounded-attention`): the same masks,
    /// latent optimisation and refinement, with its loss (1 − FG/(FG + S·BG))² per subject
    /// (S = number of boxes; FG, BG as in the released MIFO code) and no out-of-box penalty.
    BoundedAttention,
    /// Stable Diffusion with the prompt alone: no masks, no optimisation, no hook.
    Plain,
}

impl SynthMethod {
    /// The names `synth.method` takes, the default first.
    pub const NAMES: [&'static str; 3] = ["mifo", "bounded-attention", "plain"];

    /// `mifo`, `bounded-attention` or `plain`; anything else is `None`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "mifo" => Some(Self::Mifo),
            "bounded-attention" => Some(Self::BoundedAttention),
            "plain" => Some(Self::Plain),
            _ => None,
        }
    }
}

/// `step`: the α index of runs stored before `synth.alpha_index` existed.
fn default_alpha_index() -> String {
    "step".into()
}

/// `official`: the form of runs stored before `synth.loss_form` existed.
fn default_loss_form() -> String {
    "official".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn alpha_paper_preset() {
        let c = SynthConfig::preset("paper").unwrap();
        let want = [(0, 0.5), (1, 0.35), (2, 0.2), (14, 0.1), (20, 0.1)];
        for (i, a) in want {
            assert!(close(c.alpha(i), a), "step {i}: {} vs {a}", c.alpha(i));
        }
        // u = 9 is half-way through the cosine stage (S1 = 3, N = 15).
        assert!(close(c.alpha(8), 0.15), "{}", c.alpha(8));
        // Monotone non-increasing over the guided steps.
        for i in 0..15 {
            assert!(c.alpha(i + 1) <= c.alpha(i) + 1e-15);
        }
    }

    #[test]
    fn alpha_official_preset_matches_code_counter() {
        let c = SynthConfig::preset("official").unwrap();
        let want = [
            (0, 0.55),
            (1, 0.4),
            (2, 0.25),
            (3, 0.1),
            (9, 0.055),
            (15, 0.01),
        ];
        for (i, a) in want {
            assert!(close(c.alpha(i), a), "step {i}: {} vs {a}", c.alpha(i));
        }
    }

    /// The released code's counter: two loss terms per iteration, u = ⌊calls/10⌋ for CA and
    /// ⌊(calls + 1)/10⌋ for SA. With all 5 iterations every step u is the step; after an
    /// early stop it lags, and at a boundary CA and SA differ.
    #[test]
    fn alpha_code_counter_lags_after_early_stops() {
        let c = SynthConfig::preset("official").unwrap();
        assert_eq!(c.alpha_index, "code");
        // Full iterations: step i starts at calls = 10·i, so both terms use α(u = i).
        for i in 0..15 {
            let (ca, sa) = c.alpha_pair(i, 10 * i);
            assert!(close(ca, c.alpha(i)) && close(sa, c.alpha(i)), "step {i}");
        }
        // Steps 0 and 1 stopped after 2 iterations each (8 calls): step 2 still uses u = 0.
        assert!(close(c.alpha_pair(2, 8).0, 0.55));
        // Its second iteration (calls 10, 11) reaches u = 1 = 0.4 for both terms.
        assert!(close(c.alpha_pair(2, 10).0, 0.4) && close(c.alpha_pair(2, 10).1, 0.4));
        // A boundary inside an iteration: CA at calls 19 → u 1, SA at 20 → u 2.
        let (ca, sa) = c.alpha_pair(3, 19);
        assert!(close(ca, 0.4) && close(sa, 0.25), "{ca} {sa}");
        // The paper preset indexes by the step whatever the counter says.
        let p = SynthConfig::preset("paper").unwrap();
        assert_eq!(p.alpha_pair(4, 3), (p.alpha(4), p.alpha(4)));
    }

    #[test]
    fn alpha_switches() {
        let c = SynthConfig {
            alpha_decay: false,
            ..SynthConfig::default()
        };
        assert!(close(c.alpha(7), 0.5));
        let c = SynthConfig {
            out_of_box: false,
            ..SynthConfig::default()
        };
        assert!(close(c.alpha(0), 0.0));
    }

    #[test]
    fn step_size_schedule() {
        let c = SynthConfig::default();
        assert!(close(c.step_size(0), 8.0));
        assert!(close(c.step_size(14), 2.4));
        assert!(SynthConfig::preset("nope").is_err());
    }
}
