//! `mifo model verify`: run this implementation on the inputs stored in a reference file dumped
//! from diffusers / transformers and compare every output tensor it describes.
//!
//! The harness sits above both `model` and `learn`: besides the model's forward passes it checks
//! the learning losses (`learn::losses`) against the reference, so it lives at the top of the
//! library rather than inside either layer.
//!
//! The reference format is `fixtures/tiny-sd21/reference.json` + `reference.safetensors`; an SDXL
//! pipeline's reference (`fixtures/tiny-sdxl/`) has its own families, checked in [`xl`]. Which
//! checks run is decided by which tensors the reference contains (a group is skipped when its
//! inputs are absent), and every size comes from the model's configs and the reference itself.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::learn::losses;
use crate::model::attention::{AttentionHook, AttnCall, AttnKind};
use crate::model::loader::StableDiffusion;
use crate::model::nn::{resize_bilinear, resize_nearest_hw};
use crate::model::source::ModelSource;

mod synth;
mod xl;
pub use synth::verify_synth;

/// The synthesis reference's file name, beside a model's `reference.safetensors`.
pub const SYNTH_REFERENCE: &str = "synth_reference.safetensors";

/// Largest allowed `max |ours − ref| / max |ref|` for forward tensors (fp32).
pub const FORWARD_TOLERANCE: f64 = 1e-4;
/// Largest allowed relative error for gradients.
pub const GRADIENT_TOLERANCE: f64 = 1e-3;

/// The outcome of comparing one tensor.
#[derive(Clone, Debug)]
pub struct Check {
    /// Tensor name in the reference file.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// max |ours − ref|.
    pub max_abs: f64,
    /// max |ours − ref| / max |ref| (max_abs when the reference is all zeros).
    pub max_rel: f64,
    /// The tolerance applied to `max_rel`.
    pub tolerance: f64,
    /// Whether it passed.
    pub ok: bool,
    /// Why it failed before any number could be compared (shape mismatch, …).
    pub note: Option<String>,
}

/// A reference file: tensors + the JSON description.
pub struct Reference {
    tensors: HashMap<String, Tensor>,
    meta: Value,
    described: Vec<String>,
    path: std::path::PathBuf,
}

impl Reference {
    /// Loads `reference.safetensors` and the `reference.json` next to it (same stem).
    pub fn load(path: &Path) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::file(path, format!("cannot read reference tensors ({e})")))?;
        let json_path = path.with_extension("json");
        let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
        let doc: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&json_path, format!("invalid JSON: {e}")))?;
        let described = doc
            .get("tensors")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .ok_or_else(|| Error::file(&json_path, "missing object `tensors`"))?;
        let meta = doc.get("meta").cloned().unwrap_or(Value::Null);
        Ok(Self {
            tensors,
            meta,
            described,
            path: path.to_path_buf(),
        })
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::file(&self.path, format!("missing tensor `{name}`")))
    }

    fn f32(&self, name: &str, dev: &Device) -> Result<Tensor> {
        Ok(self.get(name)?.to_dtype(DType::F32)?.to_device(dev)?)
    }

    fn ids(&self, name: &str) -> Result<Vec<Vec<u32>>> {
        let t = self.get(name)?;
        let t = if t.rank() == 1 { t.unsqueeze(0)? } else { t };
        Ok(t.to_dtype(DType::I64)?
            .to_vec2::<i64>()?
            .into_iter()
            .map(|r| r.into_iter().map(|v| v as u32).collect())
            .collect())
    }

    fn usizes(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self
            .get(name)?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|v| v as usize)
            .collect())
    }

    /// The prompts of `meta.prompts`.
    fn prompts(&self) -> Vec<String> {
        self.meta
            .get("prompts")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The placeholders of `meta.new_tokens` with their ids, by id.
    fn new_tokens(&self) -> Vec<(String, u32)> {
        let mut new_tokens: Vec<(String, u32)> = self
            .meta
            .get("new_tokens")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_u64().map(|id| (k.clone(), id as u32)))
                    .collect()
            })
            .unwrap_or_default();
        new_tokens.sort_by_key(|(_, id)| *id);
        new_tokens
    }

    /// Token ids `name` [N, L] as a u32 tensor on `dev`.
    fn ids_tensor(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let rows = self.ids(name)?;
        let (n, l) = (rows.len(), rows.first().map(Vec::len).unwrap_or(0));
        Ok(Tensor::from_vec(rows.concat(), (n, l), dev)?)
    }

    fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .described
            .iter()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// Compares two tensors.
pub fn compare(name: &str, ours: &Tensor, reference: &Tensor, tolerance: f64) -> Check {
    let shape = reference.dims().to_vec();
    let fail = |note: String| Check {
        name: name.to_string(),
        shape: shape.clone(),
        max_abs: f64::NAN,
        max_rel: f64::NAN,
        tolerance,
        ok: false,
        note: Some(note),
    };
    if ours.dims() != reference.dims() {
        return fail(format!("shape {:?} ≠ reference {:?}", ours.dims(), shape));
    }
    let flat = |t: &Tensor| -> candle_core::Result<Vec<f64>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()
    };
    let (a, b) = match (flat(ours), flat(reference)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return fail(e.to_string()),
    };
    let max_ref = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    let mut max_abs = 0f64;
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        if d.is_nan() {
            max_abs = f64::NAN;
            break;
        }
        max_abs = max_abs.max(d);
    }
    let max_rel = if max_ref > 0.0 {
        max_abs / max_ref
    } else {
        max_abs
    };
    Check {
        name: name.to_string(),
        shape,
        max_abs,
        max_rel,
        tolerance,
        ok: max_rel <= tolerance,
        note: None,
    }
}

/// Records post-softmax probabilities of chosen layers (full maps, or head-means of chosen key
/// columns), keeping them on the autograd graph.
#[derive(Default)]
struct Recorder {
    full: BTreeMap<String, Tensor>,
    want_full: Vec<String>,
    /// (layer path → head-mean probabilities [B, q, keys]) for `columns`.
    columns: Vec<usize>,
    want_columns: Vec<String>,
    head_mean: BTreeMap<String, (Tensor, usize, usize)>,
}

impl AttentionHook for Recorder {
    fn wants(&mut self, call: &AttnCall) -> bool {
        let p = call.path.to_string();
        self.want_full.contains(&p) || self.want_columns.contains(&p)
    }

    fn probs(&mut self, call: &AttnCall, probs: &Tensor) -> Result<()> {
        let p = call.path.to_string();
        if self.want_full.contains(&p) {
            self.full.insert(p.clone(), probs.clone());
        }
        if self.want_columns.contains(&p) && call.kind == AttnKind::CrossAttn {
            let mean = probs.mean(1)?; // [B, q, k]
            let idx = Tensor::new(
                self.columns.iter().map(|&c| c as u32).collect::<Vec<_>>(),
                probs.device(),
            )?;
            let cols = mean.index_select(&idx, D::Minus1)?; // [B, q, J]
            self.head_mean.insert(p, (cols, call.height, call.width));
        }
        Ok(())
    }
}

impl Recorder {
    /// Head-mean map of column `j` for layer `path`: [B, h, w].
    fn map(&self, path: &str, j: usize) -> Result<Tensor> {
        let (cols, h, w) = self
            .head_mean
            .get(path)
            .ok_or_else(|| Error::Input(format!("attention layer `{path}` was never called")))?;
        let b = cols.dim(0)?;
        Ok(cols.narrow(2, j, 1)?.squeeze(2)?.reshape((b, *h, *w))?)
    }
}

fn layer_of(name: &str, prefix: &str) -> String {
    name[prefix.len()..].to_string()
}

/// Runs every check the reference supports against the model in `model_dir`.
pub fn verify(model_dir: &Path, reference: &Path, device: &Device) -> Result<Vec<Check>> {
    verify_source(&ModelSource::folder(model_dir), reference, device)
}

/// [`verify`] for any model source (a cache snapshot, a single-file checkpoint).
pub fn verify_source(model: &ModelSource, reference: &Path, device: &Device) -> Result<Vec<Check>> {
    let r = Reference::load(reference)?;
    let sd = StableDiffusion::load_source(model, DType::F32, device, Vec::new())?;
    if let Some(xl) = &sd.xl {
        return xl::verify(&r, &sd, xl, device);
    }
    let mut out = Vec::new();
    let fwd = FORWARD_TOLERANCE;
    let grd = GRADIENT_TOLERANCE;
    let dev = device;
    let cmp = |out: &mut Vec<Check>, name: &str, ours: &Tensor, tol: f64| -> Result<()> {
        out.push(compare(name, ours, &r.get(name)?, tol));
        Ok(())
    };

    // ---- tokenizer -------------------------------------------------------------------------
    let prompts = r.prompts();
    let new_tokens = r.new_tokens();
    let mut tok = sd.tokenizer.clone();
    let names: Vec<String> = new_tokens.iter().map(|(n, _)| n.clone()).collect();
    let added = tok.add_tokens(&names)?;
    let encode_all =
        |t: &crate::model::tokenizer::ClipTokenizer, texts: &[String]| -> Result<Tensor> {
            let rows = texts
                .iter()
                .map(|p| t.encode(p))
                .collect::<Result<Vec<_>>>()?;
            let n = rows.len();
            let l = rows.first().map(Vec::len).unwrap_or(0);
            let flat: Vec<i64> = rows.into_iter().flatten().map(i64::from).collect();
            Ok(Tensor::from_vec(flat, (n, l), &Device::Cpu)?)
        };
    if r.has("tokens.prompt_input_ids") && !prompts.is_empty() {
        cmp(
            &mut out,
            "tokens.prompt_input_ids",
            &encode_all(&tok, &prompts)?,
            0.0,
        )?;
    }
    if r.has("tokens.prompt_input_ids_base_tokenizer") && !prompts.is_empty() {
        let ours = encode_all(&sd.tokenizer, &prompts)?;
        cmp(
            &mut out,
            "tokens.prompt_input_ids_base_tokenizer",
            &ours,
            0.0,
        )?;
    }
    if r.has("tokens.uncond_input_ids") {
        let neg = r
            .meta
            .get("negative_prompt")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        cmp(
            &mut out,
            "tokens.uncond_input_ids",
            &encode_all(&tok, &[neg])?,
            0.0,
        )?;
    }
    if r.has("tokens.new_token_ids") {
        let ours = Tensor::new(
            added.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        cmp(&mut out, "tokens.new_token_ids", &ours, 0.0)?;
    }
    // Init words: the first BPE token of each word.
    let init_ids: Option<Vec<u32>> = r
        .meta
        .get("init_words")
        .and_then(Value::as_object)
        .map(|m| {
            new_tokens
                .iter()
                .filter_map(|(n, _)| m.get(n).and_then(Value::as_str))
                .filter_map(|w| {
                    sd.tokenizer
                        .encode(w)
                        .ok()
                        .and_then(|ids| ids.get(1).copied())
                })
                .collect()
        });
    if let (true, Some(ids)) = (r.has("tokens.init_token_ids"), &init_ids) {
        let ours = Tensor::new(
            ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        cmp(&mut out, "tokens.init_token_ids", &ours, 0.0)?;
    }
    if let (true, Some(ids)) = (r.has("text.new_token_embeddings"), &init_ids) {
        let rows = sd.text_encoder.token_rows(ids)?;
        cmp(&mut out, "text.new_token_embeddings", &rows, fwd)?;
    }

    // ---- text encoder ----------------------------------------------------------------------
    let extra = if r.has("text.new_token_embeddings") {
        Some(r.f32("text.new_token_embeddings", dev)?)
    } else {
        None
    };
    let te = &sd.text_encoder;
    let ids_tensor = |name: &str| -> Result<Tensor> {
        let rows = r.ids(name)?;
        let (n, l) = (rows.len(), rows.first().map(Vec::len).unwrap_or(0));
        Ok(Tensor::from_vec(rows.concat(), (n, l), dev)?)
    };
    if r.has("text.last_hidden_state") {
        let h = te.forward(&ids_tensor("tokens.prompt_input_ids")?, extra.as_ref())?;
        cmp(&mut out, "text.last_hidden_state", &h, fwd)?;
    }
    if r.has("text.uncond_last_hidden_state") {
        let h = te.forward(&ids_tensor("tokens.uncond_input_ids")?, extra.as_ref())?;
        cmp(&mut out, "text.uncond_last_hidden_state", &h, fwd)?;
    }

    // ---- UNet forward + attention maps + gradient w.r.t. the latent -------------------------
    if r.has("unet.eps") {
        let latent = Var::from_tensor(&r.f32("unet.latent", dev)?)?;
        let t = r.f32("unet.timesteps", dev)?;
        let ctx = r.f32("unet.encoder_hidden_states", dev)?;
        let prob_names = r.names_with_prefix("attn_probs.");
        let mut rec = Recorder {
            want_full: prob_names
                .iter()
                .map(|n| layer_of(n, "attn_probs."))
                .collect(),
            ..Default::default()
        };
        let eps = sd
            .unet
            .forward_hooked(latent.as_tensor(), &t, &ctx, Some(&mut rec))?;
        cmp(&mut out, "unet.eps", &eps, fwd)?;
        for n in &prob_names {
            let layer = layer_of(n, "attn_probs.");
            match rec.full.get(&layer) {
                Some(p) => cmp(&mut out, n, p, fwd)?,
                None => out.push(Check {
                    name: n.clone(),
                    shape: vec![],
                    max_abs: f64::NAN,
                    max_rel: f64::NAN,
                    tolerance: fwd,
                    ok: false,
                    note: Some(format!("no attention layer `{layer}` in this UNet")),
                }),
            }
        }
        if r.has("grad_c.latent") {
            let w = r.f32("grad_c.weights", dev)?;
            let s = (&eps * &w)?.sum_all()?;
            cmp(&mut out, "grad_c.scalar", &s.reshape(1)?, fwd)?;
            let grads = s.backward()?;
            let g = grads
                .get(latent.as_tensor())
                .ok_or_else(|| Error::Input("no gradient reached the latent".into()))?;
            cmp(&mut out, "grad_c.latent", g, grd)?;
        }
    }

    // ---- VAE ---------------------------------------------------------------------------------
    verify_vae(&r, &sd, dev, &mut out)?;

    // ---- DDIM ----------------------------------------------------------------------------------
    let sched = &sd.scheduler;
    if r.has("ddim.alphas_cumprod") {
        let ac = Tensor::new(sched.alphas_cumprod().to_vec(), &Device::Cpu)?;
        cmp(&mut out, "ddim.alphas_cumprod", &ac, fwd)?;
    }
    let n_steps = if r.has("ddim.timesteps_50") {
        let n = r.get("ddim.timesteps_50")?.dim(0)?;
        let ts: Vec<i64> = sched.timesteps(n)?.iter().map(|&t| t as i64).collect();
        cmp(
            &mut out,
            "ddim.timesteps_50",
            &Tensor::new(ts, &Device::Cpu)?,
            0.0,
        )?;
        n
    } else {
        50
    };
    if r.has("ddim.step_prev_sample") {
        let ts = r.usizes("ddim.step_timesteps")?;
        let eps = r.f32("ddim.step_eps", dev)?;
        let x = r.f32("ddim.step_sample", dev)?;
        let mut prev = Vec::new();
        let mut x0 = Vec::new();
        for (i, &t) in ts.iter().enumerate() {
            let st = sched.step(&eps.narrow(0, i, 1)?, t, &x.narrow(0, i, 1)?, n_steps)?;
            prev.push(st.prev_sample);
            x0.push(st.pred_original);
        }
        cmp(
            &mut out,
            "ddim.step_prev_sample",
            &Tensor::cat(&prev, 0)?,
            fwd,
        )?;
        if r.has("ddim.step_pred_original_sample") {
            cmp(
                &mut out,
                "ddim.step_pred_original_sample",
                &Tensor::cat(&x0, 0)?,
                fwd,
            )?;
        }
    }

    // ---- training gradients (a), (b), (c2) -----------------------------------------------------
    let key_pos = r
        .meta
        .get("asset0_token_index_in_prompt0")
        .and_then(Value::as_u64)
        .unwrap_or(4) as usize;
    if r.has("grad_a.loss") || r.has("grad_b.penalty") {
        let extra0 = r.f32("text.new_token_embeddings", dev)?;
        let ids = ids_tensor("train.input_ids")?;
        let noisy = r.f32("train.noisy_latents", dev)?;
        let t = r.f32("train.timesteps", dev)?;
        if r.has("train.noisy_latents") && r.has("train.x0") {
            let ts = r.usizes("train.timesteps")?;
            let ours =
                sched.add_noise(&r.f32("train.x0", dev)?, &r.f32("train.noise", dev)?, &ts)?;
            cmp(&mut out, "train.noisy_latents", &ours, fwd)?;
        }
        if r.has("grad_a.loss") {
            let mask_img = r.f32("train.loss_mask_image", dev)?;
            let (lh, lw) = (noisy.dim(2)?, noisy.dim(3)?);
            let m = resize_nearest_hw(&mask_img, lh, lw)?;
            cmp(&mut out, "train.loss_mask_latent", &m, fwd)?;
            let noise = r.f32("train.noise", dev)?;
            let channels = noisy.dim(1)? as f64;
            let loss_a = |eps: &Tensor| -> Result<Tensor> {
                let d = (eps - &noise)?.sqr()?.broadcast_mul(&m.unsqueeze(1)?)?;
                Ok((d.sum_all()? / (channels * m.sum_all()?.to_scalar::<f32>()? as f64))?)
            };
            // Through the text encoder to the placeholder rows.
            let rows = Var::from_tensor(&extra0)?;
            let ehs = te.forward(&ids, Some(rows.as_tensor()))?;
            let eps = sd.unet.forward(&noisy, &t, &ehs)?;
            cmp(&mut out, "grad_a.eps_pred", &eps, fwd)?;
            let loss = loss_a(&eps)?;
            cmp(&mut out, "grad_a.loss", &loss.reshape(1)?, fwd)?;
            let g = loss.backward()?;
            cmp(
                &mut out,
                "grad_a.token_embedding_rows",
                g.get(rows.as_tensor()).unwrap_or(&rows.zeros_like()?),
                grd,
            )?;
            // To the text states.
            let ehs_var = Var::from_tensor(&ehs.detach())?;
            let loss = loss_a(&sd.unet.forward(&noisy, &t, ehs_var.as_tensor())?)?;
            let g = loss.backward()?;
            cmp(
                &mut out,
                "grad_a.encoder_hidden_states",
                g.get(ehs_var.as_tensor()).unwrap_or(&ehs_var.zeros_like()?),
                grd,
            )?;
        }
        if r.has("grad_b.penalty") {
            let layers: Vec<String> = r
                .names_with_prefix("grad_b.abar.")
                .iter()
                .map(|n| layer_of(n, "grad_b.abar."))
                .collect();
            let mask0 = r.f32("masks.image", dev)?.narrow(0, 0, 1)?;
            let penalty =
                |ehs: &Tensor, latent: &Tensor, out: Option<&mut Vec<Check>>| -> Result<Tensor> {
                    let mut rec = Recorder {
                        want_columns: layers.clone(),
                        columns: vec![key_pos],
                        ..Default::default()
                    };
                    sd.unet.forward_hooked(latent, &t, ehs, Some(&mut rec))?;
                    let mut total: Option<Tensor> = None;
                    let mut out = out;
                    for l in &layers {
                        let abar = rec.map(l, 0)?; // [B, h, w]
                        let (b, h, w) = abar.dims3()?;
                        let m = resize_nearest_hw(&mask0, h, w)?.broadcast_as((b, h, w))?;
                        if let Some(o) = out.as_deref_mut() {
                            o.push(compare(
                                &format!("grad_b.abar.{l}"),
                                &abar,
                                &r.get(&format!("grad_b.abar.{l}"))?,
                                fwd,
                            ));
                            o.push(compare(
                                &format!("grad_b.mask.{l}"),
                                &m,
                                &r.get(&format!("grad_b.mask.{l}"))?,
                                fwd,
                            ));
                        }
                        let term = ((m.ones_like()? - &m)? * &abar)?.sqr()?.sum_all()?;
                        total = Some(match total {
                            Some(acc) => (acc + term)?,
                            None => term,
                        });
                    }
                    total.ok_or_else(|| Error::Input("reference lists no grad_b layers".into()))
                };
            let rows = Var::from_tensor(&extra0)?;
            let ehs = te.forward(&ids, Some(rows.as_tensor()))?;
            let p = penalty(&ehs, &noisy, Some(&mut out))?;
            cmp(&mut out, "grad_b.penalty", &p.reshape(1)?, fwd)?;
            let g = p.backward()?;
            cmp(
                &mut out,
                "grad_b.token_embedding_rows",
                g.get(rows.as_tensor()).unwrap_or(&rows.zeros_like()?),
                grd,
            )?;
            let ehs_var = Var::from_tensor(&ehs.detach())?;
            let g = penalty(ehs_var.as_tensor(), &noisy, None)?.backward()?;
            cmp(
                &mut out,
                "grad_b.encoder_hidden_states",
                g.get(ehs_var.as_tensor()).unwrap_or(&ehs_var.zeros_like()?),
                grd,
            )?;
            if r.has("grad_c2.latent") {
                let lat = Var::from_tensor(&noisy)?;
                let g = penalty(&ehs.detach(), lat.as_tensor(), None)?.backward()?;
                cmp(
                    &mut out,
                    "grad_c2.latent",
                    g.get(lat.as_tensor()).unwrap_or(&lat.zeros_like()?),
                    grd,
                )?;
            }
        }
    }

    // ---- MIFO losses as the released code computes them -----------------------------------------
    if r.has("mifo.loss_rec") {
        verify_mifo(&r, &sd, &tok, &added, dev, &mut out)?;
    }

    // ---- end to end: 5-step CFG sampling + decode ---------------------------------------------------
    if r.has("e2e.step_latents") {
        let cond = te.forward(&ids_tensor("e2e.input_ids")?, None)?;
        cmp(&mut out, "e2e.prompt_embeds", &cond, fwd)?;
        let uncond = te.forward(&ids_tensor("tokens.uncond_input_ids")?, None)?;
        cmp(&mut out, "e2e.negative_prompt_embeds", &uncond, fwd)?;
        let e2e = r.meta.get("e2e");
        let guidance = e2e
            .and_then(|e| e.get("guidance_scale"))
            .and_then(Value::as_f64)
            .unwrap_or(7.5);
        let n = r.get("e2e.timesteps")?.dim(0)?;
        let ts = sched.timesteps(n)?;
        let ts_i: Vec<i64> = ts.iter().map(|&t| t as i64).collect();
        cmp(
            &mut out,
            "e2e.timesteps",
            &Tensor::new(ts_i, &Device::Cpu)?,
            0.0,
        )?;
        let mut x = r.f32("e2e.initial_latents", dev)?;
        let ctx = Tensor::cat(&[&uncond, &cond], 0)?;
        let mut steps = Vec::new();
        for &t in &ts {
            let xin = Tensor::cat(&[&x, &x], 0)?;
            let tt = Tensor::new(&[t as f32], dev)?;
            let eps = sd.unet.forward(&xin, &tt, &ctx)?;
            let (eu, ec) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
            let guided = (&eu + ((&ec - &eu)? * guidance)?)?;
            x = sched.step(&guided, t, &x, n)?.prev_sample;
            steps.push(x.unsqueeze(0)?);
        }
        cmp(&mut out, "e2e.step_latents", &Tensor::cat(&steps, 0)?, fwd)?;
        if r.has("e2e.image") {
            let sf = sd.vae.config().scaling_factor;
            let img = sd.vae.decode(&(x / sf)?)?;
            let img = ((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
            cmp(&mut out, "e2e.image", &img, fwd)?;
        }
    }

    // ---- synthesis against the released MIFO code (beside the reference, when present) ----------
    let synth = reference.with_file_name(SYNTH_REFERENCE);
    if synth.exists() {
        out.extend(verify_synth(&sd, &synth, dev)?);
    }
    Ok(out)
}

/// The VAE encoder's mean (and log-variance) and the decoder's output, where the reference has
/// them.
fn verify_vae(
    r: &Reference,
    sd: &StableDiffusion,
    dev: &Device,
    out: &mut Vec<Check>,
) -> Result<()> {
    let fwd = FORWARD_TOLERANCE;
    if r.has("vae.encoder_mean") {
        let (mean, logvar) = sd.vae.encode(&r.f32("vae.encoder_input", dev)?)?;
        out.push(compare(
            "vae.encoder_mean",
            &mean,
            &r.get("vae.encoder_mean")?,
            fwd,
        ));
        if r.has("vae.encoder_logvar") {
            out.push(compare(
                "vae.encoder_logvar",
                &logvar,
                &r.get("vae.encoder_logvar")?,
                fwd,
            ));
        }
    }
    if r.has("vae.decoder_output") {
        let img = sd.vae.decode(&r.f32("vae.decoder_input", dev)?)?;
        out.push(compare(
            "vae.decoder_output",
            &img,
            &r.get("vae.decoder_output")?,
            fwd,
        ));
    }
    Ok(())
}

fn verify_mifo(
    r: &Reference,
    sd: &StableDiffusion,
    tok: &crate::model::tokenizer::ClipTokenizer,
    added: &[u32],
    dev: &Device,
    out: &mut Vec<Check>,
) -> Result<()> {
    let fwd = FORWARD_TOLERANCE;
    let grd = GRADIENT_TOLERANCE;
    let ids_rows = r.ids("mifo.input_ids")?;
    // Token positions: found by the program from the ids.
    let positions: Vec<usize> = added
        .iter()
        .filter_map(|id| ids_rows[0].iter().position(|x| x == id))
        .collect();
    let pos_t = Tensor::new(
        positions.iter().map(|&p| p as i64).collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    out.push(compare(
        "mifo.token_positions",
        &pos_t,
        &r.get("mifo.token_positions")?,
        0.0,
    ));
    let _ = tok;
    let l = ids_rows[0].len();
    let ids = Tensor::from_vec(ids_rows.concat(), (1, l), dev)?;
    let noisy = r.f32("mifo.noisy_latents", dev)?;
    let noise = r.f32("mifo.noise", dev)?;
    let t = r.f32("mifo.timesteps", dev)?;
    let masks = r.f32("masks.image", dev)?; // [J, H, W]
    let (lh, lw) = (noisy.dim(2)?, noisy.dim(3)?);
    let union = masks.max_keepdim(0)?;
    let rec_mask = resize_nearest_hw(&union, lh, lw)?;
    out.push(compare(
        "mifo.rec_mask_latent",
        &rec_mask,
        &r.get("mifo.rec_mask_latent")?,
        fwd,
    ));
    let layers: Vec<String> = r
        .names_with_prefix("mifo.abar.")
        .iter()
        .map(|n| layer_of(n, "mifo.abar."))
        .collect();
    let extra0 = r.f32("text.new_token_embeddings", dev)?;

    // One forward returning (L_rec, reward, penalty) as graph tensors.
    let run =
        |rows: &Tensor, report: Option<&mut Vec<Check>>| -> Result<(Tensor, Tensor, Tensor)> {
            let ehs = sd.text_encoder.forward(&ids, Some(rows))?;
            let mut rec = Recorder {
                want_columns: layers.clone(),
                columns: positions.clone(),
                ..Default::default()
            };
            let eps = sd.unet.forward_hooked(&noisy, &t, &ehs, Some(&mut rec))?;
            let l_rec = losses::masked_rec_loss(&eps, &noise, &rec_mask)?;
            let mut reward = Tensor::zeros((), DType::F32, dev)?;
            let mut penalty = Tensor::zeros((), DType::F32, dev)?;
            let mut report = report;
            for layer in &layers {
                let maps = (0..positions.len())
                    .map(|j| rec.map(layer, j))
                    .collect::<Result<Vec<_>>>()?;
                let abar = Tensor::cat(&maps, 0)?; // [J, h, w] (batch 1)
                let (_, h, w) = abar.dims3()?;
                let m = resize_bilinear(&masks, h, w)?;
                if let Some(o) = report.as_deref_mut() {
                    o.push(compare(
                        &format!("mifo.mask.{layer}"),
                        &m,
                        &r.get(&format!("mifo.mask.{layer}"))?,
                        fwd,
                    ));
                    o.push(compare(
                        &format!("mifo.abar.{layer}"),
                        &abar,
                        &r.get(&format!("mifo.abar.{layer}"))?,
                        fwd,
                    ));
                }
                reward = (reward + losses::attn_reward(&abar, &m, 0.5)?)?;
                penalty = (penalty + losses::attn_penalty(&abar, &m)?)?;
            }
            if let Some(o) = report {
                o.push(compare(
                    "mifo.eps_pred",
                    &eps,
                    &r.get("mifo.eps_pred")?,
                    fwd,
                ));
            }
            Ok((l_rec, (reward * 0.01)?, (penalty * 0.02)?))
        };
    let grad_rows = |loss: &Tensor, rows: &Var| -> Result<Tensor> {
        let g = loss.backward()?;
        Ok(g.get(rows.as_tensor())
            .cloned()
            .unwrap_or(rows.zeros_like()?))
    };
    let rows = Var::from_tensor(&extra0)?;
    let (l_rec, reward, penalty) = run(rows.as_tensor(), Some(out))?;
    out.push(compare(
        "mifo.loss_rec",
        &l_rec.reshape(1)?,
        &r.get("mifo.loss_rec")?,
        fwd,
    ));
    out.push(compare(
        "mifo.reward",
        &reward.reshape(1)?,
        &r.get("mifo.reward")?,
        fwd,
    ));
    out.push(compare(
        "mifo.penalty",
        &penalty.reshape(1)?,
        &r.get("mifo.penalty")?,
        fwd,
    ));
    type Pick = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>>;
    let checks: [(&str, Pick); 5] = [
        (
            "mifo.grad_rec.token_embedding_rows",
            Box::new(|a, _, _| Ok(a.clone())),
        ),
        (
            "mifo.grad_reward_term.token_embedding_rows",
            Box::new(|_, b, _| Ok(b.clone())),
        ),
        (
            "mifo.grad_penalty_term.token_embedding_rows",
            Box::new(|_, _, c| Ok(c.clone())),
        ),
        (
            "mifo.grad_reward_phase.token_embedding_rows",
            Box::new(|a, b, _| a + b),
        ),
        (
            "mifo.grad_penalty_phase.token_embedding_rows",
            Box::new(|a, _, c| a + c),
        ),
    ];
    for (name, pick) in checks.iter() {
        if !r.has(name) {
            continue;
        }
        let rows = Var::from_tensor(&extra0)?;
        let (a, b, c) = run(rows.as_tensor(), None)?;
        let loss = pick(&a, &b, &c)?;
        out.push(compare(name, &grad_rows(&loss, &rows)?, &r.get(name)?, grd));
    }
    Ok(())
}
