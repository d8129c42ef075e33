//! What the UNet is conditioned on, for SD and SDXL alike: the text states and, for SDXL, the
//! added conditioning (pooled text embedding and time ids).
//!
//! Placeholder rows: for SD a placeholder has one row of the text encoder's width; for SDXL it
//! has one row in each encoder, kept side by side as one row `[h1 + h2]` (the first encoder's
//! part first). [`split_rows`] cuts such rows apart.

use candle_core::{DType, Tensor};

use super::attention::AttentionHook;
use super::loader::StableDiffusion;
use super::sdxl;
use super::unet::AddedCond;
use crate::error::{Error, Result};

/// The UNet's conditioning for one batch.
#[derive(Clone, Debug)]
pub struct Conditioning {
    /// Text states [B, L, cross_attention_dim].
    pub context: Tensor,
    /// SDXL's pooled text embedding and time ids; `None` for SD 1.x / 2.x.
    pub added: Option<AddedCond>,
}

impl Conditioning {
    /// `a` then `b` along the batch (classifier-free guidance: uncond, cond).
    pub fn cat(a: &Self, b: &Self) -> Result<Self> {
        Ok(Self {
            context: Tensor::cat(&[&a.context, &b.context], 0)?,
            added: match (&a.added, &b.added) {
                (Some(x), Some(y)) => Some(AddedCond::cat(x, y)?),
                (None, None) => None,
                _ => {
                    return Err(Error::Input(
                        "conditioning: one half has SDXL's added conditioning, the other not"
                            .into(),
                    ))
                }
            },
        })
    }

    /// The same conditioning off the autograd graph.
    pub fn detach(&self) -> Self {
        Self {
            context: self.context.detach(),
            added: self.added.as_ref().map(AddedCond::detach),
        }
    }

    /// In `dtype` (the UNet's).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            context: self.context.to_dtype(dtype)?,
            added: match &self.added {
                Some(a) => Some(AddedCond {
                    text_embeds: a.text_embeds.to_dtype(dtype)?,
                    time_ids: a.time_ids.clone(),
                }),
                None => None,
            },
        })
    }
}

/// SDXL placeholder rows `[N, h1 + h2]` cut into the first encoder's `[N, h1]` and the second's
/// `[N, h2]`.
pub fn split_rows(rows: &Tensor, h1: usize) -> Result<(Tensor, Tensor)> {
    let (_, w) = rows.dims2()?;
    if w <= h1 {
        return Err(Error::Input(format!(
            "SDXL placeholder rows are {w} wide: expected the two text encoders' widths together (more than {h1})"
        )));
    }
    Ok((
        rows.narrow(1, 0, h1)?.contiguous()?,
        rows.narrow(1, h1, w - h1)?.contiguous()?,
    ))
}

impl StableDiffusion {
    /// Whether this is an SDXL pipeline (two text encoders, added conditioning).
    pub fn is_xl(&self) -> bool {
        self.xl.is_some()
    }

    /// Width of one placeholder row: the text encoder's hidden size, for SDXL both encoders'.
    pub fn placeholder_width(&self) -> usize {
        let h1 = self.text_encoder.config().hidden_size;
        match &self.xl {
            Some(xl) => h1 + xl.text_encoder_2.config().hidden_size,
            None => h1,
        }
    }

    /// The image size (height, width) in pixels of latents `h × w`.
    pub fn image_size(&self, latent_hw: (usize, usize)) -> (usize, usize) {
        let f = self.vae.config().factor();
        (latent_hw.0 * f, latent_hw.1 * f)
    }

    /// Encodes `text` (the tokenizers know the placeholders `rows` stand for) for images of
    /// `size` pixels: for SD the last hidden state; for SDXL both encoders' penultimate states,
    /// the pooled projection and the time ids (original = target = `size`, no crop). The result
    /// is in the UNet's dtype and on its device.
    pub fn encode_prompt(
        &self,
        text: &str,
        rows: Option<&Tensor>,
        size: (usize, usize),
    ) -> Result<Conditioning> {
        let ids = self.tokenizer.encode(text)?;
        self.encode_prompt_ids(&ids, text, rows, size)
    }

    /// [`StableDiffusion::encode_prompt`] with the first tokenizer's ids already made (`text`
    /// is tokenised again by SDXL's second tokenizer).
    pub fn encode_prompt_ids(
        &self,
        ids: &[u32],
        text: &str,
        rows: Option<&Tensor>,
        size: (usize, usize),
    ) -> Result<Conditioning> {
        let dev = &self.device;
        let ids_t = Tensor::new(ids, dev)?.unsqueeze(0)?;
        let rows = rows.map(|r| r.to_device(dev)).transpose()?;
        let cond = match &self.xl {
            None => Conditioning {
                context: self.text_encoder.forward(&ids_t, rows.as_ref())?,
                added: None,
            },
            Some(xl) => {
                let ids_2 = Tensor::new(xl.tokenizer_2.encode(text)?, dev)?.unsqueeze(0)?;
                let (r1, r2) = match &rows {
                    Some(r) => {
                        let (a, b) = split_rows(r, self.text_encoder.config().hidden_size)?;
                        (Some(a), Some(b))
                    }
                    None => (None, None),
                };
                let p = xl.encode(&self.text_encoder, &ids_t, r1.as_ref(), &ids_2, r2.as_ref())?;
                let time_ids = sdxl::time_ids(size, (0, 0), size, 1, dev)?;
                Conditioning {
                    added: Some(p.added(&time_ids)),
                    context: p.context,
                }
            }
        };
        cond.to_dtype(self.dtype)
    }

    /// The negative prompt's conditioning: as [`StableDiffusion::encode_prompt`], except that
    /// SDXL with `force_zeros_for_empty_prompt` gives zeros for an empty one (time ids kept).
    pub fn encode_negative(
        &self,
        text: &str,
        rows: Option<&Tensor>,
        size: (usize, usize),
    ) -> Result<Conditioning> {
        let c = self.encode_prompt(text, rows, size)?;
        match (&self.xl, &c.added) {
            (Some(xl), Some(a)) if xl.force_zeros_for_empty_prompt && text.is_empty() => {
                Ok(Conditioning {
                    context: c.context.zeros_like()?,
                    added: Some(AddedCond {
                        text_embeds: a.text_embeds.zeros_like()?,
                        time_ids: a.time_ids.clone(),
                    }),
                })
            }
            _ => Ok(c),
        }
    }

    /// One UNet forward on `x` at `timesteps` with `cond` (and an attention hook).
    pub fn unet_forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        cond: &Conditioning,
        hook: Option<&mut dyn AttentionHook>,
    ) -> Result<Tensor> {
        self.unet
            .forward_cond(x, timesteps, &cond.context, cond.added.as_ref(), hook)
    }
}
