//! Synthesis against the released MIFO code: `synth_reference.safetensors` + `.json`, written by
//! `tools/make_synth_reference.py`, which runs the released code's own pipeline, attention editor
//! and Bounded-Attention functions (Kareneveve/MIFO 27ca72c) on a model folder and a fixed input.
//!
//! Each check starts from the reference's own latent, so an error shows where it arises instead
//! of being carried into every later step:
//!
//! * `synth.tokens`: subject token positions, EOS, the hidden stop words;
//! * `synth.timesteps`, `synth.alpha` (every loss-term evaluation), `synth.beta`;
//! * per guided step i and gradient iteration j, from the reference's iterate: the box loss
//!   `synth.loss.{i}.{j}` and its gradient to the latent `synth.grad.{i}.{j}`, and the number of
//!   iterations the early stop allows (`synth.iterations`);
//! * `synth.mask.<kind>.step<i>.<pass>`: the masks (1 = hidden) one self- and one
//!   cross-attention layer add to the logits, cond half, in a guidance and a normal pass, before
//!   and after the refinement;
//! * the first refinement: the running-mean maps it reads (`synth.refine.self_map`,
//!   `synth.refine.cross_map`), K-means from the reference's centres (`synth.refine.labels`),
//!   and the refined masks from the reference's clusters (`synth.refine.masks`);
//! * `synth.latent.{i+1}`: one masked, classifier-free-guided DDIM step from the reference's
//!   latent after the optimisation.
//!
//! The run uses the `official` preset with the keys the reference's `meta.config` names.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use super::{compare, Check, Reference, FORWARD_TOLERANCE, GRADIENT_TOLERANCE};
use crate::error::{Error, Result};
use crate::model::attention::{AttentionHook, AttnCall};
use crate::model::ddim::{timesteps_tensor, Ddim, DdimConfig};
use crate::model::loader::StableDiffusion;
use crate::synth::cluster::{self, KMeansOptions, RefineInput};
use crate::synth::control::{plan_tokens, ControlHook, Pass, Regions};
use crate::synth::{BoxSpec, SynthConfig};

/// A mask the reference recorded: which layer call, in which step and pass.
struct Tap {
    name: String,
    step: usize,
    pass: Pass,
    layer: usize,
}

/// Passes every call to the control hook and keeps the biases of the tapped layer calls.
struct Tapped<'h, 'a> {
    inner: &'h mut ControlHook<'a>,
    /// (call index, tensor name) to keep in this pass.
    want: Vec<(usize, String)>,
    got: Vec<(String, Tensor)>,
}

impl AttentionHook for Tapped<'_, '_> {
    fn wants(&mut self, call: &AttnCall) -> bool {
        self.inner.wants(call) || self.want.iter().any(|(i, _)| *i == call.index)
    }

    fn logit_bias(&mut self, call: &AttnCall) -> Result<Option<Tensor>> {
        let bias = self.inner.logit_bias(call)?;
        if let Some((_, name)) = self.want.iter().find(|(i, _)| *i == call.index) {
            let (q, k) = (call.height * call.width, call.key_len);
            let hidden = match &bias {
                Some(b) => {
                    let b = b
                        .broadcast_as((call.batch, call.heads, q, k))?
                        .narrow(0, call.batch - 1, 1)?
                        .narrow(1, 0, 1)?
                        .reshape((q, k))?
                        .to_dtype(DType::F32)?;
                    // Masked entries hold the dtype's minimum; anything below -1e30 is one.
                    b.lt(-1e30f64)?.to_dtype(DType::F32)?
                }
                None => Tensor::zeros((q, k), DType::F32, &Device::Cpu)?,
            };
            self.got.push((name.clone(), hidden));
        }
        Ok(bias)
    }

    fn probs(&mut self, call: &AttnCall, probs: &Tensor) -> Result<()> {
        self.inner.probs(call, probs)
    }

    fn wants_unbiased(&mut self, call: &AttnCall) -> bool {
        self.inner.wants_unbiased(call)
    }

    fn unbiased_probs(&mut self, call: &AttnCall, probs: &Tensor) -> Result<()> {
        self.inner.unbiased_probs(call, probs)
    }
}

fn meta_str<'v>(meta: &'v Value, key: &str, file: &Path) -> Result<&'v str> {
    meta.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::file(file, format!("meta.{key}: expected a string")))
}

fn meta_usizes(v: Option<&Value>) -> Vec<usize> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as usize))
                .collect()
        })
        .unwrap_or_default()
}

fn int_tensor(v: &[usize]) -> Result<Tensor> {
    let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
    Ok(Tensor::new(v, &Device::Cpu)?)
}

fn f64_tensor(v: &[f64]) -> Result<Tensor> {
    Ok(Tensor::new(v, &Device::Cpu)?)
}

fn bool_tensor(masks: &[Vec<bool>]) -> Result<Tensor> {
    let s = masks.len();
    let n = masks.first().map_or(0, Vec::len);
    let data: Vec<f32> = masks
        .iter()
        .flatten()
        .map(|&b| f32::from(u8::from(b)))
        .collect();
    Ok(Tensor::from_vec(data, (s, n), &Device::Cpu)?)
}

/// The official preset with the reference's `meta.config` keys set.
fn config_of(meta: &Value, file: &Path) -> Result<SynthConfig> {
    let mut cfg = serde_json::to_value(SynthConfig::preset("official")?)
        .map_err(|e| Error::Config(e.to_string()))?;
    if let (Some(obj), Some(over)) = (
        cfg.as_object_mut(),
        meta.get("config").and_then(Value::as_object),
    ) {
        for (k, v) in over {
            obj.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(cfg).map_err(|e| Error::file(file, format!("meta.config: {e}")))
}

/// Runs every synthesis check of one `synth_reference.safetensors` on a loaded model (f32).
pub fn verify_synth(sd: &StableDiffusion, path: &Path, dev: &Device) -> Result<Vec<Check>> {
    let r = Reference::load(path)?;
    let meta = &r.meta;
    let fwd = FORWARD_TOLERANCE;
    let grd = GRADIENT_TOLERANCE;
    let mut out = Vec::new();

    let cfg = config_of(meta, path)?;
    let prompt = meta_str(meta, "prompt", path)?;
    let subjects: Vec<String> = meta
        .get("subjects")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let rects: Vec<Vec<f64>> = meta
        .get("boxes")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|b| {
                    b.as_array()
                        .map(|v| v.iter().filter_map(Value::as_f64).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    if subjects.is_empty() || subjects.len() != rects.len() || rects.iter().any(|b| b.len() != 4) {
        return Err(Error::file(
            path,
            "meta: expected as many 4-number boxes as subjects",
        ));
    }
    let boxes: Vec<BoxSpec> = subjects
        .iter()
        .zip(&rects)
        .map(|(s, b)| BoxSpec {
            subject: s.clone(),
            rect: [b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32],
        })
        .collect();

    // Tokens: each subject's positions, EOS, the hidden stop words.
    let plan = plan_tokens(&sd.tokenizer, prompt, &subjects)?;
    let flat_plan = |positions: Vec<Vec<usize>>, eos: usize, stops: Vec<usize>| {
        let mut v: Vec<usize> = positions.into_iter().flatten().collect();
        v.push(eos);
        v.extend(stops);
        v
    };
    let ours = flat_plan(
        plan.subjects.iter().map(|s| s.positions.clone()).collect(),
        plan.eos,
        plan.stop_positions.clone(),
    );
    let theirs = flat_plan(
        meta.get("subject_token_indices")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|p| meta_usizes(Some(p))).collect())
            .unwrap_or_default(),
        meta.get("eos_token_index")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize,
        meta_usizes(meta.get("filter_token_indices")),
    );
    out.push(compare(
        "synth.tokens",
        &int_tensor(&ours)?,
        &int_tensor(&theirs)?,
        0.0,
    ));

    let ddim = Ddim::new(DdimConfig {
        steps_offset: cfg.steps_offset,
        ..sd.scheduler.config().clone()
    })?;
    let timesteps = ddim.timesteps(cfg.steps)?;
    out.push(compare(
        "synth.timesteps",
        &int_tensor(&timesteps)?,
        &r.get("synth.timesteps")?.to_dtype(DType::I64)?,
        0.0,
    ));

    let encode = |ids: &[u32]| -> Result<Tensor> {
        let t = Tensor::new(ids, dev)?.unsqueeze(0)?;
        sd.text_encoder.forward(&t, None)
    };
    let cond = encode(&plan.ids)?;
    let uncond = encode(&sd.tokenizer.encode("")?)?;
    let context = Tensor::cat(&[&uncond, &cond], 0)?;

    let taps: Vec<Tap> = meta
        .get("taps")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    Some(Tap {
                        name: format!("synth.mask.{}", t.get("name")?.as_str()?),
                        step: t.get("step")?.as_u64()? as usize,
                        pass: match t.get("pass")?.as_str()? {
                            "guidance" => Pass::Guidance,
                            _ => Pass::Normal,
                        },
                        layer: t.get("layer")?.as_u64()? as usize,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let want = |step: usize, pass: Pass| -> Vec<(usize, String)> {
        taps.iter()
            .filter(|t| t.step == step && t.pass == pass)
            .map(|t| (t.layer, t.name.clone()))
            .collect()
    };
    let iterations = meta.get("iterations").cloned().unwrap_or(Value::Null);
    let refine_step = meta
        .get("refine_step")
        .and_then(Value::as_u64)
        .map(|s| s as usize);

    let s = subjects.len();
    let mut hook = ControlHook::new(&cfg, &plan, &boxes, dev, DType::F32);
    let mut calls = 0usize;
    let (mut alphas, mut betas) = (Vec::new(), Vec::new());
    let mut masks_seen: Vec<(String, Tensor)> = Vec::new();
    let mut our_refine_step = None;
    for (i, &t) in timesteps.iter().enumerate() {
        if !r.has(&format!("synth.latent.{}", i + 1)) {
            break;
        }
        let t_tensor = timesteps_tensor(&[t], dev)?;
        let mut z = r.f32(&format!("synth.latent.{i}"), dev)?;
        if cfg.latent_opt && i < cfg.guided_steps {
            let beta = cfg.step_size(i);
            betas.push(beta);
            let n_iters = iterations
                .get(i.to_string())
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize;
            // The iterations our early stop allows: it stops before iteration j + 1 once the
            // loss of iteration j, per subject, is below the threshold.
            let mut ours_stop = cfg.gd_iters;
            for j in 0..n_iters {
                let var = Var::from_tensor(&r.f32(&format!("synth.iterate.{i}.{j}"), dev)?)?;
                let alpha = cfg.alpha_pair(i, calls);
                alphas.extend([alpha.0, alpha.1]);
                calls += 2;
                hook.begin(Pass::Guidance);
                let loss = {
                    let mut tapped = Tapped {
                        inner: &mut hook,
                        want: if j == 0 {
                            want(i, Pass::Guidance)
                        } else {
                            Vec::new()
                        },
                        got: Vec::new(),
                    };
                    sd.unet
                        .forward_hooked(var.as_tensor(), &t_tensor, &cond, Some(&mut tapped))?;
                    masks_seen.append(&mut tapped.got);
                    tapped.inner.loss(alpha)?
                };
                let name = format!("synth.loss.{i}.{j}");
                out.push(compare(&name, &loss.reshape(1)?, &r.f32(&name, dev)?, fwd));
                let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if ours_stop == cfg.gd_iters && value / (s as f64) < cfg.loss_threshold {
                    ours_stop = j + 1;
                }
                let grads = loss.backward()?;
                hook.begin(Pass::Guidance);
                let g = grads.get(var.as_tensor()).ok_or_else(|| {
                    Error::Input(
                        "synth reference: the box loss does not depend on the latent".into(),
                    )
                })?;
                let name = format!("synth.grad.{i}.{j}");
                out.push(compare(&name, g, &r.f32(&name, dev)?, grd));
            }
            out.push(compare(
                &format!("synth.iterations.{i}"),
                &int_tensor(&[ours_stop])?,
                &int_tensor(&[n_iters])?,
                0.0,
            ));
            z = r.f32(&format!("synth.guided.{i}"), dev)?;
        }

        let refine_now = cfg.refines_at(i);
        if refine_now && our_refine_step.is_none() {
            our_refine_step = Some(i);
            check_refinement(&r, &cfg, &mut hook, &mut out)?;
        }

        hook.begin(Pass::Normal);
        let eps = {
            let mut tapped = Tapped {
                inner: &mut hook,
                want: want(i, Pass::Normal),
                got: Vec::new(),
            };
            let x = Tensor::cat(&[&z, &z], 0)?;
            let eps = sd
                .unet
                .forward_hooked(&x, &t_tensor, &context, Some(&mut tapped))?;
            masks_seen.append(&mut tapped.got);
            eps
        };
        let (eu, ec) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
        let guided = (&eu + ((&ec - &eu)? * cfg.guidance_scale)?)?;
        let next = ddim.step(&guided, t, &z, cfg.steps)?.prev_sample;
        let name = format!("synth.latent.{}", i + 1);
        out.push(compare(&name, &next, &r.f32(&name, dev)?, fwd));
    }

    out.push(compare(
        "synth.refine_step",
        &int_tensor(&[our_refine_step.unwrap_or(usize::MAX)])?,
        &int_tensor(&[refine_step.unwrap_or(usize::MAX)])?,
        0.0,
    ));
    out.push(compare(
        "synth.alpha",
        &f64_tensor(&alphas)?,
        &r.get("synth.alpha")?,
        fwd,
    ));
    out.push(compare(
        "synth.beta",
        &f64_tensor(&betas)?,
        &r.get("synth.beta")?,
        fwd,
    ));
    for tap in &taps {
        match masks_seen.iter().find(|(n, _)| *n == tap.name) {
            Some((_, ours)) => out.push(compare(&tap.name, ours, &r.f32(&tap.name, dev)?, 0.0)),
            None => out.push(Check {
                name: tap.name.clone(),
                shape: Vec::new(),
                max_abs: f64::NAN,
                max_rel: f64::NAN,
                tolerance: 0.0,
                ok: false,
                note: Some("the layer call was never made".into()),
            }),
        }
    }
    Ok(out)
}

/// The first refinement: our running-mean maps against the reference's; K-means from the
/// reference's centres; the refined masks from the reference's clusters (which then become the
/// hook's regions, so later steps start from the same masks).
fn check_refinement(
    r: &Reference,
    cfg: &SynthConfig,
    hook: &mut ControlHook,
    out: &mut Vec<Check>,
) -> Result<()> {
    let fwd = FORWARD_TOLERANCE;
    let cpu = &Device::Cpu;
    let (Some((self_ours, cross_ours)), Some((h, w))) = (hook.maps.means()?, hook.maps.size) else {
        return Err(Error::Input(
            "synth reference: no maps were accumulated before the refinement".into(),
        ));
    };
    let n = h * w;
    let self_ref = r.f32("synth.refine.self_map", cpu)?;
    let cross_ref = r.f32("synth.refine.cross_map", cpu)?;
    let s = cross_ref.dim(1)?;
    out.push(compare(
        "synth.refine.self_map",
        &Tensor::from_vec(self_ours, (n, n), cpu)?,
        &self_ref,
        fwd,
    ));
    out.push(compare(
        "synth.refine.cross_map",
        &Tensor::from_vec(cross_ours, (n, s), cpu)?,
        &cross_ref,
        fwd,
    ));

    let self_map: Vec<f32> = self_ref.flatten_all()?.to_vec1()?;
    let cross_map: Vec<f32> = cross_ref.flatten_all()?.to_vec1()?;
    let labels_ref = r.get("synth.refine.labels")?;
    let centres_ref = r.f32("synth.refine.centres", cpu)?;
    let k = centres_ref.dim(0)?;
    let fit = cluster::kmeans(
        &cluster::self_features(&self_map, n),
        n,
        &KMeansOptions {
            k,
            restarts: 1,
            max_iters: cfg.kmeans_iters,
            tol: cfg.kmeans_tol,
            seed: cfg.kmeans_seed,
        },
        Some(&centres_ref.flatten_all()?.to_vec1::<f32>()?),
    );
    out.push(compare(
        "synth.refine.labels",
        &int_tensor(&fit.labels)?,
        &labels_ref.to_dtype(DType::I64)?,
        0.0,
    ));

    let labels: Vec<usize> = labels_ref
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|l| l as usize)
        .collect();
    let existing = hook.region_masks(h, w);
    let boxes = hook.box_masks(h, w);
    let input = RefineInput::new(cfg, &self_map, &cross_map, &existing, &boxes);
    let soft = cluster::soft_cross_masks(&input);
    let mut masks = cluster::assign_clusters(&labels, k, &soft, cfg.cluster_threshold);
    cluster::fix_empty_masks(&mut masks, &boxes);
    out.push(compare(
        "synth.refine.masks",
        &bool_tensor(&masks)?,
        &r.f32("synth.refine.masks", cpu)?,
        0.0,
    ));
    hook.set_regions(Regions::Masks {
        size: (h, w),
        masks,
    });
    Ok(())
}
