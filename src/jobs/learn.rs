//! Learning runs against the store: [`prepare`] validates a job and records it as queued
//! (nothing is written when validation fails); [`start`] loads the model and runs it;
//! [`resume`] continues an interrupted run from its checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::DType;

use super::sink::{Observer, StoreSink, CHECKPOINT_OUTPUT};
use crate::error::{Error, Result};
use crate::learn::{self, Checkpoint, LearnConfig, LearnRequest, SceneFiles};
use crate::model::{
    dtype_name, enable_precision, parse_device, resolve_dtype, ModelSource, StableDiffusion,
};
use crate::store::{
    code_version, host_name, NewRun, RunId, RunKind, RunOutcome, RunRecord, RunSpec, RunStatus,
    Store,
};

/// Everything that defines a learning run, as the user asked for it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LearnJob {
    /// The model: a diffusers folder, a cache snapshot named by a repo id, or a single file.
    pub model: ModelSource,
    /// Image and masks.
    pub files: SceneFiles,
    /// The scene folder, when given (for listings).
    pub scene_dir: Option<PathBuf>,
    /// Preset the config started from.
    pub preset: String,
    /// Fully resolved config.
    pub config: LearnConfig,
    /// Seed.
    pub seed: u64,
    /// `auto` (the engine's pool chooses a free device), `cpu`, `cuda`, `cuda:N`; the runner
    /// sets the device the run got before it starts.
    pub device: String,
    /// `f32`, `f16`, `bf16`.
    pub dtype: String,
    /// Accept masks that overlap by more than 5%.
    pub allow_overlap: bool,
    /// Run again even if a finished run has the same spec.
    pub rerun: bool,
}

/// How a run is executed.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Draw a progress bar on stderr (in-process runs from a terminal).
    pub progress_bar: bool,
    /// Cancel: stop at the next step, keep the checkpoint, mark the run `cancelled`.
    pub stop: Arc<AtomicBool>,
    /// Shut down: stop at the next step, keep the checkpoint, leave the run to be marked
    /// `interrupted` (resumable) when the store is next opened.
    pub shutdown: Arc<AtomicBool>,
    /// Receives every metric, log line, progress report and output.
    pub observer: Option<Observer>,
    /// Print a progress line to stderr every 50 steps when there is no progress bar.
    pub progress_lines: bool,
}

/// The spec's config document: preset, dtype and the resolved `learn` table.
fn spec_config(preset: &str, dtype: &str, cfg: &LearnConfig) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "preset": preset,
        "dtype": dtype,
        "learn": serde_json::to_value(cfg).map_err(|e| Error::Config(e.to_string()))?,
    }))
}

/// Validates the job (config, device, model configs, scene) and records it as a queued run.
/// Nothing is written to the store when validation fails.
pub fn prepare(store: &Store, job: &LearnJob) -> Result<RunRecord> {
    super::record(store, &check(store, job)?)
}

/// Validates the job (config, device, model configs, scene) and computes its spec, writing
/// nothing; [`super::record`] stores it. A spec that already finished is an
/// [`Error::AlreadyRan`] unless `job.rerun`.
pub fn check(store: &Store, job: &LearnJob) -> Result<super::Checked> {
    job.config.validate()?;
    LearnConfig::preset(&job.preset)?;
    let device = parse_device(&job.device)?;
    let dtype = resolve_dtype(&job.dtype, &device)?;
    if dtype != DType::F32 && job.config.dreambooth == "full" {
        return Err(Error::Input(format!(
            "--dtype {}: learn.dreambooth=full trains every weight in the model's dtype, and its updates (lr {}) round away in half precision; use --dtype f32, or learn.dreambooth=lora (adapters and embeddings are kept in f32)",
            job.dtype, job.config.dreambooth_lr
        )));
    }
    // The model is loaded only when the run starts: refuse broken weight files (and a single
    // file of an unknown layout) now, while the store is untouched.
    let resolution = crate::model::loader::check_source(&job.model)?;
    let scene = learn::load_scene(&job.files, resolution, job.allow_overlap, job.config.fit())?;
    if job.config.init != "mean" {
        let words = job.config.init.split(',').count();
        if words != scene.masks.len() {
            return Err(Error::Input(format!(
                "learn.init: {words} words for {} masks (one word per mask, or `mean`)",
                scene.masks.len()
            )));
        }
    }
    // Hash the inputs before writing anything, so a refused re-run stores nothing.
    let mut inputs = BTreeMap::new();
    let hash_file = |p: &Path| -> Result<crate::store::BlobHash> {
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        Ok(crate::store::Digest::of(&bytes))
    };
    inputs.insert("image".to_string(), hash_file(&job.files.image)?);
    for (i, m) in job.files.masks.iter().enumerate() {
        inputs.insert(format!("mask{i}"), hash_file(m)?);
    }
    if let Some(world) = &job.files.world {
        let bytes = std::fs::read(world).map_err(|e| Error::io(world, e))?;
        let file = crate::world::SceneFile::parse(&bytes, world)?;
        if file.objects.len() != job.files.masks.len() {
            return Err(Error::file(
                world,
                format!(
                    "describes {} objects, the scene has {} masks",
                    file.objects.len(),
                    job.files.masks.len()
                ),
            ));
        }
        inputs.insert(
            crate::world::WORLD_INPUT.to_string(),
            crate::store::Digest::of(&bytes),
        );
    }
    let spec = RunSpec {
        kind: RunKind::Learn,
        config: spec_config(&job.preset, &job.dtype, &job.config)?,
        seed: job.seed,
        inputs,
        parent: None,
        model_fingerprint: super::fingerprint(store, &job.model)?,
        code_version: code_version(),
    };
    let rerun_of = super::rerun_of(store, &spec, job.rerun)?;
    let defaults = LearnConfig::preset(&job.preset)?;
    Ok(super::Checked {
        spec_hash: spec.spec_hash()?,
        spec,
        new_run: NewRun {
            scene: Some(super::scene_label(
                &job.files.image,
                job.scene_dir.as_deref(),
            )),
            config_deltas: config_deltas(&defaults, &job.config),
            rerun_of,
            model_source: Some(job.model.given.clone()),
        },
        files: std::iter::once(&job.files.image)
            .chain(&job.files.masks)
            .chain(&job.files.world)
            .cloned()
            .collect(),
        model: job.model.clone(),
        warnings: Vec::new(),
    })
}

/// Starts the queued run `id` (made by [`prepare`] from `job`) and runs it to the end.
pub fn start(store: &Store, id: &RunId, job: &LearnJob, opts: &RunOptions) -> Result<RunRecord> {
    start_with_hook(store, id, job, opts, &|| {})
}

/// [`start`], calling `on_started` once the run is marked running.
pub fn start_with_hook(
    store: &Store,
    id: &RunId,
    job: &LearnJob,
    opts: &RunOptions,
    on_started: &dyn Fn(),
) -> Result<RunRecord> {
    store.start_run(id, &host_name(), &job.device)?;
    on_started();
    let loaded = (|| {
        let device = parse_device(&job.device)?;
        let dtype = resolve_dtype(&job.dtype, &device)?;
        enable_precision(&job.dtype);
        let sd = StableDiffusion::load_source(&job.model, dtype, &device, Vec::new())?;
        let scene = learn::load_scene(
            &job.files,
            model_resolution(&sd),
            job.allow_overlap,
            job.config.fit(),
        )?;
        Ok::<_, Error>((sd, scene))
    })();
    let (sd, scene) = match loaded {
        Ok(v) => v,
        Err(e) => {
            store.finish_run(id, RunOutcome::Failed(e.to_string()))?;
            return Err(e);
        }
    };
    let run = LoadedRun {
        model: &job.model,
        sd: &sd,
        scene: &scene,
        config: job.config.clone(),
        seed: job.seed,
        resume: None,
    };
    execute(store, id, run, opts)
}

/// [`prepare`] then [`start`].
pub fn launch(store: &Store, job: &LearnJob, opts: &RunOptions) -> Result<RunRecord> {
    let record = prepare(store, job)?;
    start(store, &record.id, job, opts)
}

pub(crate) fn model_resolution(sd: &StableDiffusion) -> u32 {
    (sd.unet.config().sample_size * sd.vae.config().factor()) as u32
}

/// `key=value` strings of the config keys that differ from the preset.
pub fn config_deltas(defaults: &LearnConfig, cfg: &LearnConfig) -> Vec<(String, String)> {
    let values = serde_json::to_value(cfg).unwrap_or_default();
    crate::config::changed_keys(defaults, cfg)
        .into_iter()
        .map(|k| {
            let v = values.get(&k).map(|v| v.to_string()).unwrap_or_default();
            (format!("learn.{k}"), v)
        })
        .collect()
}

/// A learning run with its model and scene loaded, ready for [`execute`].
struct LoadedRun<'a> {
    /// The model (for the log line and the class-image cache's fingerprint).
    model: &'a ModelSource,
    sd: &'a StableDiffusion,
    scene: &'a learn::Scene,
    config: LearnConfig,
    seed: u64,
    /// The checkpoint to continue from (a resumed run).
    resume: Option<Checkpoint>,
}

/// Runs `run` as the store's run `id`, recording its outcome.
fn execute(store: &Store, id: &RunId, run: LoadedRun, opts: &RunOptions) -> Result<RunRecord> {
    use crate::sink::RunSink;
    let LoadedRun {
        model,
        sd,
        scene,
        config,
        seed,
        resume,
    } = run;
    let needs_class = config.prior_preservation && config.dreambooth != "none";
    let class_key = (
        config.class_prompt.clone(),
        config.class_image_steps,
        config.class_images,
    );
    let mut sink = StoreSink::new(
        store.clone(),
        id.clone(),
        opts.progress_bar,
        vec![opts.stop.clone(), opts.shutdown.clone()],
    )
    .with_observer(opts.observer.clone())
    .with_progress_lines(opts.progress_lines);
    sink.log(&format!(
        "learn {} instances, model {}, seed {seed}",
        scene.masks.len(),
        super::model_label(model)
    ))?;
    let class_images = if needs_class {
        cached_class_images(store, sd, model, &class_key)?
    } else {
        Vec::new()
    };
    let result = learn::run(
        LearnRequest {
            sd,
            scene,
            config,
            seed,
            resume,
            class_images,
            measure_only: false,
        },
        &mut sink,
    );
    sink.finish();
    if opts.shutdown.load(Ordering::SeqCst) && result.as_ref().is_ok_and(|r| r.cancelled) {
        // Engine shutdown: the checkpoint is stored; the run stays `running` in this store
        // handle and is marked `interrupted` (resumable) when the store is next opened.
        store.flush_metrics(id)?;
        store.flush()?;
        return Ok(store.get_run(id)?);
    }
    let outcome = match &result {
        Ok(r) if r.cancelled => RunOutcome::Cancelled,
        Ok(_) => RunOutcome::Done,
        Err(e) => RunOutcome::Failed(e.to_string()),
    };
    let record = store.finish_run(id, outcome)?;
    result?;
    Ok(record)
}

/// Checks that `prefix` names an interrupted learning run and that `model` holds the weights
/// it started with; returns its id.
pub fn check_resumable(store: &Store, prefix: &str, model: &ModelSource) -> Result<RunId> {
    let id = store.resolve(prefix)?;
    let record = store.get_run(&id)?;
    if record.kind != RunKind::Learn {
        return Err(Error::Input(format!(
            "run {id} is a {} run, not a learning run",
            record.kind.as_str()
        )));
    }
    if record.status != RunStatus::Interrupted {
        return Err(Error::Input(format!(
            "run {id} is {}; only an interrupted run can be resumed",
            record.status.as_str()
        )));
    }
    let spec = store.spec(&record.spec_hash)?;
    if super::fingerprint(store, model)? != spec.model_fingerprint {
        return Err(Error::file(
            &model.path,
            format!("these are not the weights run {id} started with (fingerprint differs)"),
        ));
    }
    Ok(id)
}

/// Continues the interrupted learning run `id` from its last checkpoint (see
/// [`check_resumable`]).
pub fn resume(
    store: &Store,
    id: &RunId,
    model: &ModelSource,
    device: &str,
    opts: &RunOptions,
) -> Result<RunRecord> {
    resume_with_hook(store, id, model, device, opts, &|| {})
}

/// [`resume`], calling `on_started` once the run is marked running again.
pub fn resume_with_hook(
    store: &Store,
    id: &RunId,
    model: &ModelSource,
    device: &str,
    opts: &RunOptions,
    on_started: &dyn Fn(),
) -> Result<RunRecord> {
    let record = store.get_run(id)?;
    let spec = store.spec(&record.spec_hash)?;
    let dtype_name = spec
        .config
        .get("dtype")
        .and_then(|v| v.as_str())
        .unwrap_or("f32")
        .to_string();
    let config: LearnConfig =
        serde_json::from_value(spec.config.get("learn").cloned().unwrap_or_default())
            .map_err(|e| Error::Input(format!("run {id}: stored config does not parse ({e})")))?;
    let dev = parse_device(device)?;
    let dtype: DType = resolve_dtype(&dtype_name, &dev)?;
    enable_precision(&dtype_name);
    let sd = StableDiffusion::load_source(model, dtype, &dev, Vec::new())?;
    let blob = |name: &str| -> Result<PathBuf> {
        let h = spec.inputs.get(name).ok_or_else(|| {
            Error::Input(format!("run {id}: input `{name}` missing from its spec"))
        })?;
        Ok(store.blobs().path(h))
    };
    let mask_count = spec.inputs.keys().filter(|k| k.starts_with("mask")).count();
    let files = SceneFiles {
        image: blob("image")?,
        masks: (0..mask_count)
            .map(|i| blob(&format!("mask{i}")))
            .collect::<Result<_>>()?,
        world: spec
            .inputs
            .get(crate::world::WORLD_INPUT)
            .map(|h| store.blobs().path(h)),
    };
    let scene = learn::load_scene(&files, model_resolution(&sd), true, config.fit())?;
    let checkpoint = match record.outputs.get(CHECKPOINT_OUTPUT) {
        Some(h) => Some(Checkpoint::from_bytes(&store.read_blob(h)?, &dev)?),
        None => None,
    };
    store.resume_run(id, &host_name(), device)?;
    on_started();
    let run = LoadedRun {
        model,
        sd: &sd,
        scene: &scene,
        config,
        seed: spec.seed,
        resume: checkpoint,
    };
    execute(store, id, run, opts)
}

/// Class images already in the store for this model and class prompt: the `class/<i>.png`
/// outputs of finished learning runs with the same model fingerprint, dtype, class prompt and
/// generation steps (image `i` is always generated from seed `i`, so any run's image `i` will
/// do).
fn cached_class_images(
    store: &Store,
    sd: &StableDiffusion,
    model: &ModelSource,
    (prompt, steps, count): &(String, u64, u64),
) -> Result<Vec<image::RgbImage>> {
    let fingerprint = super::fingerprint(store, model)?;
    let mut found: BTreeMap<usize, crate::store::BlobHash> = BTreeMap::new();
    for record in store.runs() {
        let record = record?;
        if record.kind != RunKind::Learn || record.status != RunStatus::Done {
            continue;
        }
        let spec = store.spec(&record.spec_hash)?;
        let learn = spec.config.get("learn");
        let same = spec.model_fingerprint == fingerprint
            && learn
                .and_then(|l| l.get("class_prompt"))
                .and_then(|v| v.as_str())
                == Some(prompt.as_str())
            && learn
                .and_then(|l| l.get("class_image_steps"))
                .and_then(|v| v.as_u64())
                == Some(*steps)
            && spec.config.get("dtype").and_then(|v| v.as_str()) == Some(dtype_name(sd.dtype));
        if !same {
            continue;
        }
        for (name, hash) in &record.outputs {
            let index = name
                .strip_prefix("class/")
                .and_then(|r| r.strip_suffix(".png"))
                .and_then(|i| i.parse::<usize>().ok());
            if let Some(i) = index.filter(|&i| (i as u64) < *count) {
                found.entry(i).or_insert(*hash);
            }
        }
    }
    let mut images = Vec::new();
    for i in 0..*count as usize {
        let Some(hash) = found.get(&i) else { break };
        let bytes = store.read_blob(hash)?;
        let img = image::load_from_memory(&bytes)
            .map_err(|e| Error::Input(format!("cached class image {i}: {e}")))?;
        images.push(img.to_rgb8());
    }
    Ok(images)
}

/// The preset, dtype and learn config stored in a learning run's spec
/// (`{"preset": …, "dtype": …, "learn": {…}}`).
pub fn stored_config(spec: &RunSpec) -> Result<(String, String, LearnConfig)> {
    let text = |k: &str, default: &str| {
        spec.config
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or(default)
            .to_string()
    };
    let learn = spec
        .config
        .get("learn")
        .cloned()
        .ok_or_else(|| Error::Input("the stored config has no `learn` table".into()))?;
    let cfg: LearnConfig = serde_json::from_value(learn)
        .map_err(|e| Error::Input(format!("the stored learn config does not parse: {e}")))?;
    Ok((text("preset", "paper"), text("dtype", "f32"), cfg))
}

/// The job that re-runs a stored learning spec: its config with `sets` applied, its seed (or
/// `seed`), its input files straight from the blob folder `blobs`, on `model` / `device`;
/// `scene` is the original run's scene label (kept for listings).
pub fn job_from_spec(
    spec: &RunSpec,
    blobs: &crate::store::BlobStore,
    model: ModelSource,
    device: &str,
    sets: &[String],
    seed: Option<u64>,
    scene: Option<&str>,
) -> Result<LearnJob> {
    let (preset, dtype, stored) = stored_config(spec)?;
    let config = crate::config::resolve(&stored, "learn", None, sets)?;
    config.validate()?;
    let blob = |name: &str| -> Result<PathBuf> {
        let h = spec
            .inputs
            .get(name)
            .ok_or_else(|| Error::Input(format!("input `{name}` is missing from the spec")))?;
        Ok(blobs.path(h))
    };
    let n = spec.inputs.keys().filter(|k| k.starts_with("mask")).count();
    Ok(LearnJob {
        model,
        files: SceneFiles {
            image: blob("image")?,
            masks: (0..n)
                .map(|i| blob(&format!("mask{i}")))
                .collect::<Result<_>>()?,
            world: spec
                .inputs
                .get(crate::world::WORLD_INPUT)
                .map(|h| blobs.path(h)),
        },
        scene_dir: scene.map(PathBuf::from),
        preset,
        config,
        seed: seed.unwrap_or(spec.seed),
        device: device.to_string(),
        dtype,
        allow_overlap: true,
        rerun: true,
    })
}
