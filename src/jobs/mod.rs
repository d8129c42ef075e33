//! Jobs: a learning or synthesis run launched against the store (spec, inputs, record, sink),
//! and the [`runner`] whose workers execute them for the engine.

pub mod journal;
pub mod learn;
pub mod pool;
pub mod runner;
pub mod sink;
pub mod slurm;
pub mod sweep;
pub mod synth;
pub mod worker;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::source::{resolve, ModelSource};

/// What the user said about the model: `--model` (else `$MIFO_MODEL`), `--revision`,
/// `--model-config`. [`model_source`] resolves it; every command that takes `--model` goes
/// through it.
#[derive(Clone, Debug, Default)]
pub struct ModelFlags {
    /// `--model`: a diffusers folder, a `.safetensors` checkpoint or a Hugging Face repo id.
    pub model: Option<PathBuf>,
    /// `--revision`: branch, tag or commit of a repo id (default `main`).
    pub revision: Option<String>,
    /// `--model-config`: the diffusers folder whose configs and tokenizer go with a single file.
    pub config: Option<PathBuf>,
}

impl ModelFlags {
    /// Only `--model` (no revision, no config folder).
    pub fn model(model: Option<PathBuf>) -> Self {
        Self {
            model,
            ..Self::default()
        }
    }

    /// Whether the user named a model: `--model` given or `$MIFO_MODEL` set.
    pub fn named(&self) -> bool {
        model_named(&self.model)
    }
}

/// The model source: `--model`, else `$MIFO_MODEL`, resolved by [`crate::model::source::resolve`]
/// (a local folder or file wins over a repo id) with its paths made absolute, as jobs handed to
/// the engine need.
pub fn model_source(flags: &ModelFlags) -> Result<ModelSource> {
    let given = flags
        .model
        .clone()
        .or_else(|| std::env::var_os("MIFO_MODEL").map(PathBuf::from))
        .ok_or_else(|| {
            Error::Input(
                "no model: pass --model (a diffusers folder, a .safetensors checkpoint or a Hugging Face repo id in the local cache) or set MIFO_MODEL"
                    .into(),
            )
        })?;
    let config = flags
        .config
        .as_ref()
        .map(|c| c.to_string_lossy().into_owned());
    Ok(resolve(
        &given.to_string_lossy(),
        flags.revision.as_deref(),
        config.as_deref(),
    )?
    .canonical())
}

/// Whether the user named a model folder: `--model` given or `$MIFO_MODEL` set.
pub fn model_named(flag: &Option<PathBuf>) -> bool {
    flag.is_some() || std::env::var_os("MIFO_MODEL").is_some()
}

/// The model for work on a stored run (synthesis from it, a re-run, a resume): `--model`,
/// else `$MIFO_MODEL` ([`model_source`]), else `known`, the place the store noted for the run's
/// model while it still holds that model ([`crate::store::Store::model_dir_for`]).
pub fn model_for_run(
    flags: &ModelFlags,
    known: Option<ModelSource>,
    run: &str,
) -> Result<ModelSource> {
    if flags.named() {
        return model_source(flags);
    }
    known.ok_or_else(|| {
        Error::Input(format!(
            "no model: pass --model DIR (or a single file, or a cached repo id) or set MIFO_MODEL (this store knows no folder that still holds the model run {run} used)"
        ))
    })
}

/// The store's fingerprint of a model source (see [`crate::store::model_fingerprint_with`]).
pub fn fingerprint(
    store: &crate::store::Store,
    model: &ModelSource,
) -> Result<crate::store::Digest> {
    Ok(store.model_fingerprint_with(&model.path, model.config.as_deref())?)
}

/// Notes where the model of `fingerprint` is, for later commands on its runs.
pub fn remember_model(
    store: &crate::store::Store,
    fingerprint: &crate::store::Digest,
    model: &ModelSource,
) -> Result<()> {
    Ok(store.remember_model_dir(fingerprint, &model.path, model.config.as_deref())?)
}

/// The model as a run's log names it: the path of a folder, else what the user gave and what
/// it resolved to.
pub fn model_label(model: &ModelSource) -> String {
    match model.kind {
        crate::model::SourceKind::Folder => model.path.display().to_string(),
        _ => format!("{} ({})", model.given, model.describe()),
    }
}

/// A short label for a scene: its folder name, or the image's file stem.
pub fn scene_label(image: &Path, scene_dir: Option<&Path>) -> String {
    scene_dir
        .and_then(|d| d.file_name())
        .or_else(|| image.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The earlier finished run with exactly this spec: an [`Error::AlreadyRan`] unless `rerun`,
/// in which case the new run records it as the run it repeats.
pub fn rerun_of(
    store: &crate::store::Store,
    spec: &crate::store::RunSpec,
    rerun: bool,
) -> Result<Option<crate::store::RunId>> {
    let earlier = store.done_runs_with_spec(&spec.spec_hash()?)?;
    match (earlier.first(), rerun) {
        (Some(r), false) => Err(Error::AlreadyRan {
            run: r.id.to_string(),
        }),
        (Some(r), true) => Ok(Some(r.id.clone())),
        (None, _) => Ok(None),
    }
}

/// A job that passed every check ([`learn::check`], [`synth::check`]) with the spec it will be
/// stored under; [`record`] writes it. Nothing is in the store yet.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The run's spec.
    pub spec: crate::store::RunSpec,
    /// Its hash (the store's identity of the run).
    pub spec_hash: crate::store::SpecHash,
    /// Listing facts of the new record.
    pub new_run: crate::store::NewRun,
    /// Input files to put into the store as blobs first.
    pub files: Vec<PathBuf>,
    /// The model, remembered for the model's fingerprint ([`remember_model`]).
    pub model: ModelSource,
    /// Validation warnings (e.g. overlapping boxes).
    pub warnings: Vec<String>,
}

/// Records a [`Checked`] job as a `queued` run: its input blobs, the record, where its model is
/// ([`remember_model`]).
pub fn record(store: &crate::store::Store, checked: &Checked) -> Result<crate::store::RunRecord> {
    for f in &checked.files {
        store.put_blob_file(f)?;
    }
    let record = store.create_run(&checked.spec, checked.new_run.clone())?;
    remember_model(store, &checked.spec.model_fingerprint, &checked.model)?;
    Ok(record)
}
