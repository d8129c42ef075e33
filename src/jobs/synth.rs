//! Synthesis runs against the store: [`prepare`] validates a job (prompt, boxes, the learned
//! run it draws from) and records it as queued; [`start`] runs it.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::learn::RunOptions;
use super::sink::StoreSink;
use crate::error::{Error, Result};
use crate::learn::tokenizer_with_placeholders;
use crate::model::{enable_precision, parse_device, resolve_dtype, ModelSource, StableDiffusion};
use crate::sink::{Progress, RunSink};
use crate::store::{
    add_png_text_chunks, code_version, host_name, BlobHash, BlobStore, NewRun, RunId, RunKind,
    RunOutcome, RunRecord, RunSpec, RunStatus, Store,
};
use crate::synth::{self, parse_box, BoxSpec, SynthConfig, SynthRequest};

/// Everything that defines a synthesis run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SynthJob {
    /// The finished learning run whose tokens (and phase-B weights) to use; `None` for a plain
    /// model with ordinary words as subjects.
    pub from: Option<String>,
    /// The model (for `from`, the one the learning run used: its fingerprint is checked).
    pub model: ModelSource,
    /// Prompt, e.g. `a photo of <v0> and <v1> on the beach`.
    pub prompt: String,
    /// Boxes as typed: `<v0>=x0,y0,x1,y1`.
    pub boxes: Vec<String>,
    /// Number of images.
    pub samples: usize,
    /// Seed (sample k uses seed + k).
    pub seed: u64,
    /// Preset the config started from.
    pub preset: String,
    /// Resolved config.
    pub config: SynthConfig,
    /// Device, as for [`super::learn::LearnJob::device`].
    pub device: String,
    /// Dtype.
    pub dtype: String,
    /// Run again even if a finished run has the same spec.
    pub rerun: bool,
}

/// The outputs of a finished learning run that a synthesis draws on, by blob: what the engine
/// hands a [worker](super::worker) (which never opens the store's database) along with the job.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LearnedRef {
    /// The learning run.
    pub id: RunId,
    /// Its scene label.
    pub scene: Option<String>,
    /// The `embeddings` output (blob hash, hex).
    pub embeddings: String,
    /// The phase-B outputs that override model weights (`weights`, `lora`), as blob hashes.
    pub overrides: Vec<String>,
}

/// What a learned run contributes: placeholder count, rows, phase-B tensors.
struct Learned {
    id: RunId,
    scene: Option<String>,
    rows: Tensor,
    overrides: Vec<(String, Tensor)>,
}

/// Finds the finished learning run `prefix` names and checks that `model` is the model it
/// learned on; returns its outputs by blob.
pub fn learned_ref(store: &Store, prefix: &str, model: &ModelSource) -> Result<LearnedRef> {
    let id = store.resolve(prefix)?;
    let rec = store.get_run(&id)?;
    if rec.kind != RunKind::Learn || rec.status != RunStatus::Done {
        return Err(Error::Input(format!(
            "--from {prefix}: run {id} is a {} {} run; synthesis needs a finished learning run",
            rec.status.as_str(),
            rec.kind.as_str()
        )));
    }
    let spec = store.spec(&rec.spec_hash)?;
    if super::fingerprint(store, model)? != spec.model_fingerprint {
        return Err(Error::file(
            &model.path,
            format!("not the model run {id} learned on (fingerprint differs); pass its --model"),
        ));
    }
    let emb = rec
        .outputs
        .get("embeddings")
        .ok_or_else(|| Error::Input(format!("run {id} has no `embeddings` output")))?;
    let overrides = ["weights", "lora"]
        .into_iter()
        .filter_map(|name| rec.outputs.get(name).map(|h| h.to_hex()))
        .collect();
    Ok(LearnedRef {
        scene: rec.scene.clone(),
        embeddings: emb.to_hex(),
        overrides,
        id,
    })
}

fn blob_hash(id: &RunId, hex: &str) -> Result<BlobHash> {
    hex.parse()
        .map_err(|_| Error::Input(format!("run {id}: `{hex}` is not a blob hash")))
}

/// Loads the tensors of a [`LearnedRef`] from the store's blobs.
fn load_learned(
    blobs: &BlobStore,
    learned: &LearnedRef,
    device: &candle_core::Device,
) -> Result<Learned> {
    let id = &learned.id;
    let bytes = blobs.read(&blob_hash(id, &learned.embeddings)?)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::Input(format!("run {id}: embeddings unreadable ({e})")))?;
    let mut rows = Vec::new();
    for i in 0..tensors.len() {
        let name = crate::learn::token_name(i);
        let t = tensors
            .get(&name)
            .ok_or_else(|| Error::Input(format!("run {id}: embeddings lack `{name}`")))?;
        rows.push(t.clone());
    }
    let rows = Tensor::stack(&rows, 0)?;
    let mut overrides = Vec::new();
    for hex in &learned.overrides {
        let bytes = blobs.read(&blob_hash(id, hex)?)?;
        let t = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| Error::Input(format!("run {id}: phase-B weights unreadable ({e})")))?;
        overrides.extend(t);
    }
    Ok(Learned {
        id: id.clone(),
        scene: learned.scene.clone(),
        rows,
        overrides,
    })
}

/// The model (with the learned run's weights and tokens) and the synthesis request.
fn build(
    store: &Store,
    job: &SynthJob,
) -> Result<(StableDiffusion, Option<Learned>, Vec<BoxSpec>)> {
    let learned = job
        .from
        .as_deref()
        .map(|p| learned_ref(store, p, &job.model))
        .transpose()?;
    build_from(store.blobs(), job, learned.as_ref())
}

/// [`build`] from a learned run's outputs by blob (a worker's way: no database).
fn build_from(
    blobs: &BlobStore,
    job: &SynthJob,
    learned: Option<&LearnedRef>,
) -> Result<(StableDiffusion, Option<Learned>, Vec<BoxSpec>)> {
    job.config.check()?;
    let device = parse_device(&job.device)?;
    let dtype = resolve_dtype(&job.dtype, &device)?;
    let boxes = job
        .boxes
        .iter()
        .map(|b| parse_box(b))
        .collect::<Result<Vec<_>>>()?;
    let learned = learned
        .map(|l| load_learned(blobs, l, &device))
        .transpose()?;
    let overrides = learned
        .as_ref()
        .map(|l| l.overrides.clone())
        .unwrap_or_default();
    let mut sd = StableDiffusion::load_source(&job.model, dtype, &device, overrides)?;
    if let Some(l) = &learned {
        sd.tokenizer = tokenizer_with_placeholders(&sd.tokenizer, l.rows.dim(0)?)?.0;
        if let Some(xl) = &mut sd.xl {
            xl.tokenizer_2 = tokenizer_with_placeholders(&xl.tokenizer_2, l.rows.dim(0)?)?.0;
        }
    }
    Ok((sd, learned, boxes))
}

fn request<'a>(
    sd: &'a StableDiffusion,
    learned: Option<&Learned>,
    boxes: Vec<BoxSpec>,
    job: &SynthJob,
) -> Result<SynthRequest<'a>> {
    Ok(SynthRequest {
        sd,
        placeholder_rows: learned.map(|l| l.rows.to_dtype(sd.dtype)).transpose()?,
        prompt: job.prompt.clone(),
        boxes,
        samples: job.samples,
        seed: job.seed,
        config: job.config.clone(),
    })
}

/// Validates and records a queued synthesis run; returns it and the validation warnings.
pub fn prepare(store: &Store, job: &SynthJob) -> Result<(RunRecord, Vec<String>)> {
    let checked = check(store, job)?;
    Ok((super::record(store, &checked)?, checked.warnings))
}

/// Validates a synthesis job (loading the model on its device to check the prompt and boxes)
/// and computes its spec, writing nothing; [`super::record`] stores it. A spec that already
/// finished is an [`Error::AlreadyRan`] unless `job.rerun`.
pub fn check(store: &Store, job: &SynthJob) -> Result<super::Checked> {
    if job.samples == 0 {
        return Err(Error::Input("--samples must be at least 1".into()));
    }
    let defaults = SynthConfig::preset(&job.preset)?;
    let (sd, learned, boxes) = build(store, job)?;
    let warnings = synth::validate(&request(&sd, learned.as_ref(), boxes, job)?)?;
    let spec = RunSpec {
        kind: RunKind::Synth,
        config: serde_json::json!({
            "preset": job.preset,
            "dtype": job.dtype,
            "prompt": job.prompt,
            "boxes": job.boxes,
            "samples": job.samples,
            "synth": serde_json::to_value(&job.config).map_err(|e| Error::Config(e.to_string()))?,
        }),
        seed: job.seed,
        inputs: BTreeMap::new(),
        parent: learned.as_ref().map(|l| l.id.clone()),
        model_fingerprint: super::fingerprint(store, &job.model)?,
        code_version: code_version(),
    };
    let rerun_of = super::rerun_of(store, &spec, job.rerun)?;
    let values = serde_json::to_value(&job.config).unwrap_or_default();
    let deltas = crate::config::changed_keys(&defaults, &job.config)
        .into_iter()
        .map(|k| {
            (
                format!("synth.{k}"),
                values.get(&k).map(|v| v.to_string()).unwrap_or_default(),
            )
        })
        .collect();
    Ok(super::Checked {
        spec_hash: spec.spec_hash()?,
        new_run: NewRun {
            scene: learned
                .as_ref()
                .and_then(|l| l.scene.clone())
                .or_else(|| Some(job.prompt.clone())),
            config_deltas: deltas,
            rerun_of,
            model_source: Some(job.model.given.clone()),
        },
        spec,
        files: Vec::new(),
        model: job.model.clone(),
        warnings,
    })
}

/// Adds a PNG text chunk (prompt, boxes, seed, spec hash) to every `sample_K.png`; the run id
/// is left out so that re-runs of one spec stay byte-identical (`runs export` adds it).
struct SampleTextSink<'a> {
    inner: &'a mut dyn RunSink,
    texts: Vec<(String, String)>,
}

impl RunSink for SampleTextSink<'_> {
    fn metric(&mut self, name: &str, step: u64, value: f64) -> Result<()> {
        self.inner.metric(name, step, value)
    }
    fn log(&mut self, line: &str) -> Result<()> {
        self.inner.log(line)
    }
    fn progress(&mut self, p: &Progress) {
        self.inner.progress(p)
    }
    fn artifact(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let bytes = if name.starts_with("sample_") && name.ends_with(".png") {
            let texts: Vec<(&str, &str)> = self
                .texts
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            add_png_text_chunks(&bytes, &texts)?
        } else {
            bytes
        };
        self.inner.artifact(name, bytes)
    }
    fn checkpoint(&mut self, step: u64, bytes: Vec<u8>) -> Result<()> {
        self.inner.checkpoint(step, bytes)
    }
    fn should_stop(&self) -> bool {
        self.inner.should_stop()
    }
}

/// Runs synthesis job `job` of the run whose spec hash is `spec_hash`, from `learned` (outputs
/// by blob, read from `blobs`), reporting to `sink`: the same for the engine's own runs
/// ([`start`]) and a Slurm [worker](super::worker), so both give byte-identical samples.
pub fn synthesise(
    blobs: &BlobStore,
    job: &SynthJob,
    learned: Option<&LearnedRef>,
    spec_hash: &str,
    sink: &mut dyn RunSink,
) -> Result<synth::SynthReport> {
    let (sd, learned, boxes) = build_from(blobs, job, learned)?;
    enable_precision(&job.dtype);
    let req = request(&sd, learned.as_ref(), boxes, job)?;
    let mut sink = SampleTextSink {
        inner: sink,
        texts: vec![
            ("prompt".into(), job.prompt.clone()),
            ("boxes".into(), job.boxes.join(" ")),
            ("seed".into(), job.seed.to_string()),
            ("spec".into(), spec_hash.to_string()),
            ("software".into(), code_version()),
        ],
    };
    sink.log(&format!(
        "synthesise {} sample(s) of \"{}\" from {}",
        job.samples,
        job.prompt,
        learned
            .as_ref()
            .map(|l| l.id.to_string())
            .unwrap_or_else(|| "the plain model".into())
    ))?;
    synth::run(&req, &mut sink)
}

/// Runs the queued synthesis run `id` (made by [`prepare`] from `job`).
pub fn start(
    store: &Store,
    id: &RunId,
    job: &SynthJob,
    opts: &RunOptions,
    on_started: &dyn Fn(),
) -> Result<RunRecord> {
    store.start_run(id, &host_name(), &job.device)?;
    on_started();
    let rec = store.get_run(id)?;
    let result = (|| {
        let learned = job
            .from
            .as_deref()
            .map(|p| learned_ref(store, p, &job.model))
            .transpose()?;
        let mut sink = StoreSink::new(
            store.clone(),
            id.clone(),
            opts.progress_bar,
            vec![opts.stop.clone(), opts.shutdown.clone()],
        )
        .with_observer(opts.observer.clone())
        .with_progress_lines(opts.progress_lines);
        let report = synthesise(
            store.blobs(),
            job,
            learned.as_ref(),
            &rec.spec_hash.to_string(),
            &mut sink,
        )?;
        sink.finish();
        Ok::<_, Error>(report)
    })();
    let outcome = match &result {
        Ok(r) if r.cancelled => RunOutcome::Cancelled,
        Ok(_) => RunOutcome::Done,
        Err(e) => RunOutcome::Failed(e.to_string()),
    };
    let record = store.finish_run(id, outcome)?;
    result?;
    Ok(record)
}

/// The job that re-runs a stored synthesis spec (its prompt, boxes, samples, parent and config
/// with `sets` applied; its seed or `seed`) on `model` / `device`.
pub fn job_from_spec(
    spec: &RunSpec,
    model: ModelSource,
    device: &str,
    sets: &[String],
    seed: Option<u64>,
) -> Result<SynthJob> {
    let c = &spec.config;
    let text = |k: &str| c.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let stored: SynthConfig =
        serde_json::from_value(c.get("synth").cloned().unwrap_or_default())
            .map_err(|e| Error::Input(format!("stored synth config does not parse ({e})")))?;
    let config = crate::config::resolve(&stored, "synth", None, sets)?;
    Ok(SynthJob {
        from: spec.parent.as_ref().map(|p| p.to_string()),
        model,
        prompt: text("prompt").ok_or_else(|| Error::Input("spec has no prompt".into()))?,
        boxes: c
            .get("boxes")
            .and_then(|b| b.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        samples: c.get("samples").and_then(|v| v.as_u64()).unwrap_or(1) as usize,
        seed: seed.unwrap_or(spec.seed),
        preset: text("preset").unwrap_or_else(|| "paper".into()),
        config,
        device: device.to_string(),
        dtype: text("dtype").unwrap_or_else(|| "f32".into()),
        rerun: true,
    })
}
