//! Plain classifier-free-guided DDIM sampling (no attention control): previews, class images.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::clip::ClipTextModel;
use super::conditioning::Conditioning;
use super::ddim::Ddim;
use super::unet::UNet;
use super::vae::Vae;
use crate::error::Result;

/// A standard-normal tensor from a seeded host RNG (candle's CPU RNG cannot be seeded).
pub fn seeded_normal(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Everything [`generate`] needs.
pub struct Sampler<'a> {
    /// Text encoder.
    pub text_encoder: &'a ClipTextModel,
    /// Denoiser.
    pub unet: &'a UNet,
    /// Decoder.
    pub vae: &'a Vae,
    /// Scheduler (its `steps_offset` decides t = 980…0 vs 981…1).
    pub scheduler: &'a Ddim,
}

impl Sampler<'_> {
    /// Generates one image [1, 3, H, W] in [0, 1] for prompt ids [1, L] (with optional
    /// placeholder rows) against the empty-prompt ids, from `latent` [1, C, h, w].
    pub fn generate(
        &self,
        ids: &Tensor,
        uncond_ids: &Tensor,
        placeholder_rows: Option<&Tensor>,
        latent: &Tensor,
        steps: usize,
        guidance: f64,
    ) -> Result<Tensor> {
        let _inference = super::no_grad();
        let cond = self.text_encoder.forward(ids, placeholder_rows)?;
        let uncond = self.text_encoder.forward(uncond_ids, None)?;
        let plain = |context: Tensor| Conditioning {
            context,
            added: None,
        };
        self.generate_cond(&plain(cond), &plain(uncond), latent, steps, guidance)
    }

    /// [`Sampler::generate`] from encoded prompts (SD or SDXL conditioning, see
    /// [`StableDiffusion::encode_prompt`](super::StableDiffusion::encode_prompt)).
    pub fn generate_cond(
        &self,
        cond: &Conditioning,
        uncond: &Conditioning,
        latent: &Tensor,
        steps: usize,
        guidance: f64,
    ) -> Result<Tensor> {
        // Inference only: nothing here may stay on the autograd graph. With trainable weights
        // (the learning run's preview) each pass would otherwise hold all its activations, and
        // every step's output the whole chain of earlier steps.
        let _inference = super::no_grad();
        let ctx = Conditioning::cat(uncond, cond)?.detach();
        let mut x = latent.detach();
        let dev = latent.device();
        for t in self.scheduler.timesteps(steps)? {
            let xin = Tensor::cat(&[&x, &x], 0)?;
            let tt = Tensor::new(&[t as f32], dev)?;
            let eps = self
                .unet
                .forward_cond(&xin, &tt, &ctx.context, ctx.added.as_ref(), None)?
                .detach();
            let (eu, ec) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
            let guided = (&eu + ((&ec - &eu)? * guidance)?)?;
            x = self.scheduler.step(&guided, t, &x, steps)?.prev_sample;
        }
        let img = self.vae.decode(&(x / self.vae.config().scaling_factor)?)?;
        Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}
