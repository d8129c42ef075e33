//! The checks of an SDXL pipeline's reference (`fixtures/tiny-sdxl/reference.json` describes
//! them): both tokenizers, both text encoders (penultimate states, the pooled projection, the
//! concatenated prompt embeddings), the UNet with its added conditioning and its attention maps,
//! the VAE, the masked-loss and penalty gradients to both encoders' placeholder rows and to the
//! latent, and a classifier-free-guided DDIM run with `force_zeros_for_empty_prompt`.
//!
//! As for SD, a family runs only when the reference holds its tensors, and every size comes from
//! the model's configs and the reference itself.

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use super::{
    compare, layer_of, verify_vae, Check, Recorder, Reference, FORWARD_TOLERANCE,
    GRADIENT_TOLERANCE,
};
use crate::error::{Error, Result};
use crate::model::clip::ClipTextModel;
use crate::model::loader::StableDiffusion;
use crate::model::nn::resize_nearest_hw;
use crate::model::sdxl::{self, XlPrompt, XlText};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::AddedCond;

/// Every check an SDXL reference supports.
pub(super) fn verify(
    r: &Reference,
    sd: &StableDiffusion,
    xl: &XlText,
    dev: &Device,
) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    let (fwd, grd) = (FORWARD_TOLERANCE, GRADIENT_TOLERANCE);
    let cmp = |out: &mut Vec<Check>, name: &str, ours: &Tensor, tol: f64| -> Result<()> {
        out.push(compare(name, ours, &r.get(name)?, tol));
        Ok(())
    };
    let (te1, te2) = (&sd.text_encoder, &xl.text_encoder_2);

    // ---- both tokenizers -------------------------------------------------------------------
    let prompts = r.prompts();
    let new_tokens = r.new_tokens();
    let names: Vec<String> = new_tokens.iter().map(|(n, _)| n.clone()).collect();
    let (mut tok1, mut tok2) = (sd.tokenizer.clone(), xl.tokenizer_2.clone());
    let added1 = tok1.add_tokens(&names)?;
    let added2 = tok2.add_tokens(&names)?;
    let encode_all = |t: &ClipTokenizer, texts: &[String]| -> Result<Tensor> {
        let rows = texts
            .iter()
            .map(|p| t.encode(p))
            .collect::<Result<Vec<_>>>()?;
        let (n, l) = (rows.len(), rows.first().map(Vec::len).unwrap_or(0));
        let flat: Vec<i64> = rows.into_iter().flatten().map(i64::from).collect();
        Ok(Tensor::from_vec(flat, (n, l), &Device::Cpu)?)
    };
    if !prompts.is_empty() {
        for (name, tok) in [
            ("tokens.prompt_input_ids", &tok1),
            ("tokens.prompt_input_ids_2", &tok2),
        ] {
            if r.has(name) {
                cmp(&mut out, name, &encode_all(tok, &prompts)?, 0.0)?;
            }
        }
    }
    // The training batch and the end-to-end prompt, tokenised here.
    for (name, tok) in [("train.input_ids", &tok1), ("train.input_ids_2", &tok2)] {
        if r.has(name) && !prompts.is_empty() {
            let n = r.get(name)?.dim(0)?;
            cmp(
                &mut out,
                name,
                &encode_all(tok, &vec![prompts[0].clone(); n])?,
                0.0,
            )?;
        }
    }
    let e2e_prompt = r
        .meta
        .get("e2e")
        .and_then(|e| e.get("prompt"))
        .and_then(Value::as_str)
        .map(String::from);
    if let Some(p) = &e2e_prompt {
        for (name, tok) in [("e2e.input_ids", &tok1), ("e2e.input_ids_2", &tok2)] {
            if r.has(name) {
                cmp(
                    &mut out,
                    name,
                    &encode_all(tok, std::slice::from_ref(p))?,
                    0.0,
                )?;
            }
        }
    }
    // The pipeline's default time ids (original = target = the image size, no crop).
    for (ids, latent) in [
        ("unet.time_ids", "unet.latent"),
        ("train.time_ids", "train.noisy_latents"),
    ] {
        if r.has(ids) && r.has(latent) {
            let lat = r.get(latent)?;
            let f = sd.vae.config().factor();
            let size = (lat.dim(2)? * f, lat.dim(3)? * f);
            let ours = sdxl::time_ids(size, (0, 0), size, lat.dim(0)?, &Device::Cpu)?;
            cmp(&mut out, ids, &ours, 0.0)?;
        }
    }
    if r.has("tokens.new_token_ids") {
        let as_tensor = |ids: &[u32]| {
            Tensor::new(
                ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                &Device::Cpu,
            )
        };
        cmp(&mut out, "tokens.new_token_ids", &as_tensor(&added1)?, 0.0)?;
        // The ids are described as those of both tokenizers.
        out.push(compare(
            "tokens.new_token_ids (tokenizer_2)",
            &as_tensor(&added2)?,
            &r.get("tokens.new_token_ids")?,
            0.0,
        ));
    }
    // Placeholder rows initialised from the first BPE token of each init word, per encoder.
    let init_words: Vec<String> = r
        .meta
        .get("init_words")
        .and_then(Value::as_object)
        .map(|m| {
            names
                .iter()
                .filter_map(|n| m.get(n).and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if init_words.len() == names.len() && !names.is_empty() {
        for (name, tok, te) in [
            ("text.new_token_embeddings", &sd.tokenizer, te1),
            ("text_2.new_token_embeddings", &xl.tokenizer_2, te2),
        ] {
            if !r.has(name) {
                continue;
            }
            let ids = init_words
                .iter()
                .map(|w| {
                    tok.encode(w)?
                        .get(1)
                        .copied()
                        .ok_or_else(|| Error::Input(format!("init word `{w}` has no token")))
                })
                .collect::<Result<Vec<_>>>()?;
            cmp(&mut out, name, &te.token_rows(&ids)?, fwd)?;
        }
    }

    // ---- both text encoders ----------------------------------------------------------------
    let rows_of = |name: &str| -> Result<Option<Tensor>> {
        if r.has(name) {
            Ok(Some(r.f32(name, dev)?))
        } else {
            Ok(None)
        }
    };
    let extra1 = rows_of("text.new_token_embeddings")?;
    let extra2 = rows_of("text_2.new_token_embeddings")?;
    if r.has("tokens.prompt_input_ids") && r.has("tokens.prompt_input_ids_2") {
        let ids1 = r.ids_tensor("tokens.prompt_input_ids", dev)?;
        let ids2 = r.ids_tensor("tokens.prompt_input_ids_2", dev)?;
        let s1 = te1.forward_states(&ids1, extra1.as_ref())?;
        let s2 = te2.forward_states(&ids2, extra2.as_ref())?;
        for (name, ours) in [
            ("text.penultimate_hidden_state", &s1.penultimate),
            ("text.last_hidden_state", &s1.last),
            ("text_2.penultimate_hidden_state", &s2.penultimate),
            ("text_2.last_hidden_state", &s2.last),
        ] {
            if r.has(name) {
                cmp(&mut out, name, ours, fwd)?;
            }
        }
        if r.has("text_2.text_embeds") {
            cmp(
                &mut out,
                "text_2.text_embeds",
                &te2.text_embeds(&s2.last, &ids2)?,
                fwd,
            )?;
        }
        if r.has("text.prompt_embeds") {
            let p = xl.encode(te1, &ids1, extra1.as_ref(), &ids2, extra2.as_ref())?;
            cmp(&mut out, "text.prompt_embeds", &p.context, fwd)?;
        }
    }

    // ---- UNet with the added conditioning, attention maps ----------------------------------------
    if r.has("unet.eps") {
        let added = AddedCond {
            text_embeds: r.f32("unet.text_embeds", dev)?,
            time_ids: r.f32("unet.time_ids", dev)?,
        };
        let prob_names = r.names_with_prefix("attn_probs.");
        let mut rec = Recorder {
            want_full: prob_names
                .iter()
                .map(|n| layer_of(n, "attn_probs."))
                .collect(),
            ..Default::default()
        };
        let eps = sd.unet.forward_cond(
            &r.f32("unet.latent", dev)?,
            &r.f32("unet.timesteps", dev)?,
            &r.f32("unet.encoder_hidden_states", dev)?,
            Some(&added),
            Some(&mut rec),
        )?;
        cmp(&mut out, "unet.eps", &eps, fwd)?;
        for n in &prob_names {
            let layer = layer_of(n, "attn_probs.");
            match rec.full.get(&layer) {
                Some(p) => cmp(&mut out, n, p, fwd)?,
                None => out.push(missing_layer(n, &layer)),
            }
        }
    }

    verify_vae(r, sd, dev, &mut out)?;

    // ---- training: masked loss (a), penalty (b), latent gradient (c2) --------------------------
    if r.has("grad_a.loss") || r.has("grad_b.penalty") {
        let sched = &sd.scheduler;
        let ids1 = r.ids_tensor("train.input_ids", dev)?;
        let ids2 = r.ids_tensor("train.input_ids_2", dev)?;
        let noisy = r.f32("train.noisy_latents", dev)?;
        let t = r.f32("train.timesteps", dev)?;
        let time_ids = r.f32("train.time_ids", dev)?;
        let rows1 = r.f32("text.new_token_embeddings", dev)?;
        let rows2 = r.f32("text_2.new_token_embeddings", dev)?;
        if r.has("train.x0") {
            let ts = r.usizes("train.timesteps")?;
            let ours =
                sched.add_noise(&r.f32("train.x0", dev)?, &r.f32("train.noise", dev)?, &ts)?;
            cmp(&mut out, "train.noisy_latents", &ours, fwd)?;
        }
        let masks = r.f32("masks.image", dev)?; // [J, H, W]
        let (lh, lw) = (noisy.dim(2)?, noisy.dim(3)?);
        // Both encoders' placeholder rows as variables, through SDXL's prompt encoding.
        let encode = |v1: &Var, v2: &Var| -> Result<XlPrompt> {
            sdxl::encode_with(
                te1,
                te2,
                &ids1,
                Some(v1.as_tensor()),
                &ids2,
                Some(v2.as_tensor()),
            )
        };
        let grad_of = |g: &candle_core::backprop::GradStore, v: &Var| -> Result<Tensor> {
            Ok(match g.get(v.as_tensor()) {
                Some(t) => t.clone(),
                None => v.zeros_like()?,
            })
        };
        if r.has("grad_a.loss") {
            // Row 0: the union of the masks; row 1: the first mask (the reference's batch).
            let union = masks.max_keepdim(0)?;
            let first = masks.narrow(0, 0, 1)?;
            let m = resize_nearest_hw(&Tensor::cat(&[&union, &first], 0)?, lh, lw)?;
            cmp(&mut out, "train.loss_mask_latent", &m, fwd)?;
            let noise = r.f32("train.noise", dev)?;
            let channels = noisy.dim(1)? as f64;
            let (v1, v2) = (Var::from_tensor(&rows1)?, Var::from_tensor(&rows2)?);
            let p = encode(&v1, &v2)?;
            let eps =
                sd.unet
                    .forward_cond(&noisy, &t, &p.context, Some(&p.added(&time_ids)), None)?;
            let d = (&eps - &noise)?.sqr()?.broadcast_mul(&m.unsqueeze(1)?)?;
            let loss = (d.sum_all()? / (channels * m.sum_all()?.to_scalar::<f32>()? as f64))?;
            cmp(&mut out, "grad_a.loss", &loss.reshape(1)?, fwd)?;
            let g = loss.backward()?;
            cmp(
                &mut out,
                "grad_a.token_embedding_rows",
                &grad_of(&g, &v1)?,
                grd,
            )?;
            cmp(
                &mut out,
                "grad_a.token_embedding_rows_2",
                &grad_of(&g, &v2)?,
                grd,
            )?;
        }
        if r.has("grad_b.penalty") {
            let key = r
                .meta
                .get("asset0_token_index")
                .or_else(|| r.meta.get("asset0_token_index_in_prompt0"))
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    Error::Input("reference.json: meta has no `asset0_token_index`".into())
                })? as usize;
            let layers: Vec<String> = r
                .names_with_prefix("grad_b.abar.")
                .iter()
                .map(|n| layer_of(n, "grad_b.abar."))
                .collect();
            let mask0 = masks.narrow(0, 0, 1)?;
            let penalty = |p: &XlPrompt,
                           latent: &Tensor,
                           mut report: Option<&mut Vec<Check>>|
             -> Result<Tensor> {
                let mut rec = Recorder {
                    want_columns: layers.clone(),
                    columns: vec![key],
                    ..Default::default()
                };
                sd.unet.forward_cond(
                    latent,
                    &t,
                    &p.context,
                    Some(&p.added(&time_ids)),
                    Some(&mut rec),
                )?;
                let mut total: Option<Tensor> = None;
                for l in &layers {
                    let abar = rec.map(l, 0)?; // [B, h, w]
                    let (b, h, w) = abar.dims3()?;
                    let m = resize_nearest_hw(&mask0, h, w)?.broadcast_as((b, h, w))?;
                    if let Some(o) = report.as_deref_mut() {
                        for (name, ours) in [
                            (format!("grad_b.abar.{l}"), &abar),
                            (format!("grad_b.mask.{l}"), &m),
                        ] {
                            o.push(compare(&name, ours, &r.get(&name)?, fwd));
                        }
                    }
                    let term = ((m.ones_like()? - &m)? * &abar)?.sqr()?.sum_all()?;
                    total = Some(match total {
                        Some(acc) => (acc + term)?,
                        None => term,
                    });
                }
                total.ok_or_else(|| Error::Input("reference lists no grad_b layers".into()))
            };
            let (v1, v2) = (Var::from_tensor(&rows1)?, Var::from_tensor(&rows2)?);
            let p = encode(&v1, &v2)?;
            let pen = penalty(&p, &noisy, Some(&mut out))?;
            cmp(&mut out, "grad_b.penalty", &pen.reshape(1)?, fwd)?;
            let g = pen.backward()?;
            cmp(
                &mut out,
                "grad_b.token_embedding_rows",
                &grad_of(&g, &v1)?,
                grd,
            )?;
            cmp(
                &mut out,
                "grad_b.token_embedding_rows_2",
                &grad_of(&g, &v2)?,
                grd,
            )?;
            if r.has("grad_c2.latent") {
                let lat = Var::from_tensor(&noisy)?;
                let fixed = XlPrompt {
                    context: p.context.detach(),
                    text_embeds: p.text_embeds.detach(),
                };
                let g = penalty(&fixed, lat.as_tensor(), None)?.backward()?;
                cmp(&mut out, "grad_c2.latent", &grad_of(&g, &lat)?, grd)?;
            }
        }
    }

    // ---- end to end: DDIM with CFG, the empty negative prompt as SDXL treats it ------------------
    if r.has("e2e.step_latents") {
        verify_e2e(r, sd, xl, dev, &mut out)?;
    }
    Ok(out)
}

fn missing_layer(name: &str, layer: &str) -> Check {
    Check {
        name: name.to_string(),
        shape: vec![],
        max_abs: f64::NAN,
        max_rel: f64::NAN,
        tolerance: FORWARD_TOLERANCE,
        ok: false,
        note: Some(format!("no attention layer `{layer}` in this UNet")),
    }
}

fn verify_e2e(
    r: &Reference,
    sd: &StableDiffusion,
    xl: &XlText,
    dev: &Device,
    out: &mut Vec<Check>,
) -> Result<()> {
    let fwd = FORWARD_TOLERANCE;
    let te1: &ClipTextModel = &sd.text_encoder;
    let cond = xl.encode(
        te1,
        &r.ids_tensor("e2e.input_ids", dev)?,
        None,
        &r.ids_tensor("e2e.input_ids_2", dev)?,
        None,
    )?;
    let e2e = r.meta.get("e2e");
    let negative = e2e
        .and_then(|e| e.get("negative_prompt"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let uncond = if negative.is_empty() && xl.force_zeros_for_empty_prompt {
        cond.zeros_like()?
    } else {
        let enc = |t: &ClipTokenizer| -> Result<Tensor> {
            Ok(Tensor::new(t.encode(negative)?, dev)?.unsqueeze(0)?)
        };
        xl.encode(
            te1,
            &enc(&sd.tokenizer)?,
            None,
            &enc(&xl.tokenizer_2)?,
            None,
        )?
    };
    let guidance = e2e
        .and_then(|e| e.get("guidance_scale"))
        .and_then(Value::as_f64)
        .unwrap_or(5.0);
    let mut x = r.f32("e2e.initial_latents", dev)?;
    let (_, _, lh, lw) = x.dims4()?;
    let f = sd.vae.config().factor();
    // The pipeline's default time ids: original = target = the image size, no crop.
    let size = (lh * f, lw * f);
    let time_ids = sdxl::time_ids(size, (0, 0), size, 2, dev)?;
    let ctx = Tensor::cat(&[&uncond.context, &cond.context], 0)?;
    let added = AddedCond::cat(
        &uncond.added(&time_ids.narrow(0, 0, 1)?),
        &cond.added(&time_ids.narrow(0, 1, 1)?),
    )?;
    let sched = &sd.scheduler;
    let n = r.get("e2e.step_latents")?.dim(0)?;
    let mut steps = Vec::new();
    for t in sched.timesteps(n)? {
        let xin = Tensor::cat(&[&x, &x], 0)?;
        let tt = Tensor::new(&[t as f32], dev)?;
        let eps = sd.unet.forward_cond(&xin, &tt, &ctx, Some(&added), None)?;
        let (eu, ec) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
        let guided = (&eu + ((&ec - &eu)? * guidance)?)?;
        x = sched.step(&guided, t, &x, n)?.prev_sample;
        steps.push(x.unsqueeze(0)?);
    }
    out.push(compare(
        "e2e.step_latents",
        &Tensor::cat(&steps, 0)?,
        &r.get("e2e.step_latents")?,
        fwd,
    ));
    if r.has("e2e.image") {
        let sf = sd.vae.config().scaling_factor;
        let img = sd.vae.decode(&(x.to_dtype(DType::F32)? / sf)?)?;
        let img = ((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        out.push(compare("e2e.image", &img, &r.get("e2e.image")?, fwd));
    }
    Ok(())
}
