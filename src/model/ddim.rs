//! DDIM scheduler: the noise schedule (ᾱ), inference timesteps with configurable spacing and
//! `steps_offset`, `add_noise` with one timestep per sample, and the deterministic (eta 0) step
//! for epsilon and v-prediction models.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::json;

use super::config::ConfigJson;
use crate::error::{Error, Result};

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The added noise ε (SD 1.x, SD 2.x base).
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀ (SD 2.x 768).
    VPrediction,
}

/// How inference timesteps are spread over the training steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    /// `i · (T / n)` for i in 0..n, descending, plus `steps_offset`.
    Leading,
    /// `round(T − i·T/n) − 1`, descending.
    Trailing,
    /// `round(linspace(0, T−1, n))`, descending.
    Linspace,
}

/// Scheduler configuration (from `scheduler/scheduler_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct DdimConfig {
    /// Training steps T.
    pub train_steps: usize,
    /// First β.
    pub beta_start: f64,
    /// Last β.
    pub beta_end: f64,
    /// `scaled_linear` (true) or `linear` (false).
    pub scaled_linear: bool,
    /// Whether ᾱ before step 0 is 1 (else ᾱ₀).
    pub set_alpha_to_one: bool,
    /// Added to every inference timestep (diffusers default 1 for SD; MIFO uses 0).
    pub steps_offset: usize,
    /// Model output type.
    pub prediction: Prediction,
    /// Timestep spacing.
    pub spacing: Spacing,
    /// Clip the x₀ estimate to ±`clip_sample_range`.
    pub clip_sample: Option<f64>,
}

impl DdimConfig {
    /// Reads and validates a diffusers scheduler config (DDIM, PNDM, Euler… configs carry the
    /// same schedule fields; the sampler is always DDIM here).
    pub fn from_json(c: &ConfigJson) -> Result<Self> {
        c.require_null("trained_betas")?;
        c.require_one_of("thresholding", &[json!(false)])?;
        c.require_one_of("rescale_betas_zero_snr", &[json!(false)])?;
        let schedule = c.str_or("beta_schedule", "scaled_linear")?;
        let scaled_linear = match schedule.as_str() {
            "scaled_linear" => true,
            "linear" => false,
            o => {
                return Err(Error::file(
                    c.path(),
                    format!("key `beta_schedule`: `{o}` is not supported by mifo"),
                ))
            }
        };
        let prediction = match c.str_or("prediction_type", "epsilon")?.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            o => {
                return Err(Error::file(
                    c.path(),
                    format!("key `prediction_type`: `{o}` is not supported by mifo"),
                ))
            }
        };
        let spacing = match c.str_or("timestep_spacing", "leading")?.as_str() {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            o => {
                return Err(Error::file(
                    c.path(),
                    format!("key `timestep_spacing`: `{o}` is not supported by mifo"),
                ))
            }
        };
        let clip_sample = if c.bool_or("clip_sample", false)? {
            Some(c.f64_or("clip_sample_range", 1.0)?)
        } else {
            None
        };
        Ok(Self {
            train_steps: c.usize_or("num_train_timesteps", 1000)?,
            beta_start: c.f64_or("beta_start", 0.00085)?,
            beta_end: c.f64_or("beta_end", 0.012)?,
            scaled_linear,
            set_alpha_to_one: c.bool_or("set_alpha_to_one", false)?,
            steps_offset: c.usize_or("steps_offset", 0)?,
            prediction,
            spacing,
            clip_sample,
        })
    }

    /// Reads `scheduler_config.json` from a folder.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        Self::from_json(&ConfigJson::read(&dir.join("scheduler_config.json"))?)
    }
}

/// The DDIM scheduler.
#[derive(Clone, Debug)]
pub struct Ddim {
    config: DdimConfig,
    alphas_cumprod: Vec<f64>,
}

/// Result of one DDIM step.
pub struct DdimStep {
    /// x_{t-Δ}.
    pub prev_sample: Tensor,
    /// The x₀ estimate.
    pub pred_original: Tensor,
}

impl Ddim {
    /// Builds the schedule.
    pub fn new(config: DdimConfig) -> Result<Self> {
        let n = config.train_steps;
        if n < 2 {
            return Err(Error::Config(
                "scheduler: num_train_timesteps must be ≥ 2".into(),
            ));
        }
        // Computed in f32 like diffusers, so ᾱ matches its values bit for bit where possible.
        let betas: Vec<f32> = (0..n)
            .map(|i| {
                let frac = i as f64 / (n - 1) as f64;
                if config.scaled_linear {
                    let (a, b) = (
                        config.beta_start.sqrt() as f32,
                        config.beta_end.sqrt() as f32,
                    );
                    let v = a + (b - a) * frac as f32;
                    v * v
                } else {
                    let (a, b) = (config.beta_start as f32, config.beta_end as f32);
                    a + (b - a) * frac as f32
                }
            })
            .collect();
        let mut acc = 1f32;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc as f64
            })
            .collect();
        Ok(Self {
            config,
            alphas_cumprod,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// ᾱ_t for t in 0..T.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Inference timesteps for `steps` steps, descending (t = 980 … 0 for 50 leading steps
    /// with offset 0).
    pub fn timesteps(&self, steps: usize) -> Result<Vec<usize>> {
        let t = self.config.train_steps;
        if steps == 0 || steps > t {
            return Err(Error::Input(format!(
                "number of inference steps must be in 1..={t}, got {steps}"
            )));
        }
        let mut ts: Vec<usize> = match self.config.spacing {
            Spacing::Leading => {
                let ratio = t / steps;
                (0..steps)
                    .map(|i| i * ratio + self.config.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = t as f64 / steps as f64;
                (0..steps)
                    .map(|i| ((t as f64 - i as f64 * ratio).round() as usize).saturating_sub(1))
                    .rev()
                    .collect()
            }
            Spacing::Linspace => (0..steps)
                .map(|i| {
                    let v = if steps == 1 {
                        0.0
                    } else {
                        i as f64 * (t - 1) as f64 / (steps - 1) as f64
                    };
                    v.round() as usize
                })
                .collect(),
        };
        ts.sort_unstable();
        ts.reverse();
        if let Some(&bad) = ts.iter().find(|&&x| x >= t) {
            return Err(Error::Config(format!(
                "scheduler: timestep {bad} ≥ num_train_timesteps {t} (steps_offset too large?)"
            )));
        }
        Ok(ts)
    }

    fn alpha(&self, t: i64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else if self.config.set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        }
    }

    fn per_sample(&self, values: &[f64], like: &Tensor) -> Result<Tensor> {
        let b = like.dim(0)?;
        let mut shape = vec![1usize; like.rank()];
        shape[0] = b;
        let data: Vec<f64> = if values.len() == 1 {
            vec![values[0]; b]
        } else {
            values.to_vec()
        };
        if data.len() != b {
            return Err(Error::Input(format!(
                "{} timesteps for a batch of {b}",
                values.len()
            )));
        }
        Ok(Tensor::from_vec(data, shape, like.device())?.to_dtype(like.dtype())?)
    }

    fn check_t(&self, t: usize) -> Result<()> {
        if t >= self.config.train_steps {
            return Err(Error::Input(format!(
                "timestep {t} is outside 0..{}",
                self.config.train_steps
            )));
        }
        Ok(())
    }

    /// `√ᾱ_t·x₀ + √(1−ᾱ_t)·noise` with one timestep per sample (or one for all).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        for &t in timesteps {
            self.check_t(t)?;
        }
        let a: Vec<f64> = timesteps.iter().map(|&t| self.alphas_cumprod[t]).collect();
        let sa = self.per_sample(&a.iter().map(|v| v.sqrt()).collect::<Vec<_>>(), x0)?;
        let sb = self.per_sample(&a.iter().map(|v| (1.0 - v).sqrt()).collect::<Vec<_>>(), x0)?;
        Ok((x0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?)
    }

    /// The training target for `noise` at `timesteps` (ε, or v for v-prediction models).
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.config.prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::VPrediction => {
                let a: Vec<f64> = timesteps.iter().map(|&t| self.alphas_cumprod[t]).collect();
                let sa = self.per_sample(&a.iter().map(|v| v.sqrt()).collect::<Vec<_>>(), x0)?;
                let sb =
                    self.per_sample(&a.iter().map(|v| (1.0 - v).sqrt()).collect::<Vec<_>>(), x0)?;
                Ok((noise.broadcast_mul(&sa)? - x0.broadcast_mul(&sb)?)?)
            }
        }
    }

    /// One deterministic DDIM step (eta 0) from `sample` at timestep `t` with the model's
    /// `output`; the previous timestep is `t − T/steps`.
    pub fn step(
        &self,
        output: &Tensor,
        t: usize,
        sample: &Tensor,
        steps: usize,
    ) -> Result<DdimStep> {
        self.check_t(t)?;
        let prev_t = t as i64 - (self.config.train_steps / steps.max(1)) as i64;
        let a_t = self.alphas_cumprod[t];
        let a_prev = self.alpha(prev_t);
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let dtype = sample.dtype();
        let (x0, eps) = match self.config.prediction {
            Prediction::Epsilon => {
                let x0 = ((sample - (output * sb)?)? / sa)?;
                (x0, output.clone())
            }
            Prediction::VPrediction => {
                let x0 = ((sample * sa)? - (output * sb)?)?;
                let eps = ((output * sa)? + (sample * sb)?)?;
                (x0, eps)
            }
        };
        let (x0, eps) = match self.config.clip_sample {
            Some(r) => {
                let x0 = x0.clamp(-r, r)?;
                // diffusers re-derives ε from the clipped x₀.
                let eps = ((sample - (&x0 * sa)?)? / sb)?;
                (x0, eps)
            }
            None => (x0, eps),
        };
        let prev = ((&x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?;
        Ok(DdimStep {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original: x0.to_dtype(dtype)?,
        })
    }
}

/// Converts a timestep list to an f32 tensor for the UNet.
pub fn timesteps_tensor(ts: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = ts.iter().map(|&t| t as f32).collect();
    Ok(Tensor::new(v, device)?.to_dtype(DType::F32)?)
}
