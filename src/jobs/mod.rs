//! Jobs: a learning or synthesis run launched against the store (spec, inputs, record, sink),
//! and the [`runner`] whose workers execute them for the engine.

pub mod learn;
pub mod pool;
pub mod runner;
pub mod sink;
pub mod sweep;
pub mod synth;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The model folder: `--model DIR`, else `$MIFO_MODEL`.
pub fn model_dir(flag: Option<PathBuf>) -> Result<PathBuf> {
    let dir = flag
        .or_else(|| std::env::var_os("MIFO_MODEL").map(PathBuf::from))
        .ok_or_else(|| {
            Error::Input(
                "no model: pass --model DIR (a local diffusers Stable Diffusion folder) or set MIFO_MODEL"
                    .into(),
            )
        })?;
    if !dir.is_dir() {
        return Err(Error::file(&dir, "model folder does not exist"));
    }
    Ok(dir)
}

/// Whether the user named a model folder: `--model` given or `$MIFO_MODEL` set.
pub fn model_named(flag: &Option<PathBuf>) -> bool {
    flag.is_some() || std::env::var_os("MIFO_MODEL").is_some()
}

/// The model folder for work on a stored run (synthesis from it, a re-run, a resume):
/// `--model DIR`, else `$MIFO_MODEL`, else `known`, the folder the store noted for the run's
/// model while it still holds that model ([`crate::store::Store::model_dir_for`]).
pub fn model_dir_for_run(
    flag: Option<PathBuf>,
    known: Option<PathBuf>,
    run: &str,
) -> Result<PathBuf> {
    if model_named(&flag) {
        let dir = model_dir(flag)?;
        return Ok(std::fs::canonicalize(&dir).unwrap_or(dir));
    }
    known.ok_or_else(|| {
        Error::Input(format!(
            "no model: pass --model DIR or set MIFO_MODEL (this store knows no folder that still holds the model run {run} used)"
        ))
    })
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
    /// The model folder, remembered for the model's fingerprint.
    pub model: PathBuf,
    /// Validation warnings (e.g. overlapping boxes).
    pub warnings: Vec<String>,
}

/// Records a [`Checked`] job as a `queued` run: its input blobs, the record, the model folder.
pub fn record(store: &crate::store::Store, checked: &Checked) -> Result<crate::store::RunRecord> {
    for f in &checked.files {
        store.put_blob_file(f)?;
    }
    let record = store.create_run(&checked.spec, checked.new_run.clone())?;
    store.remember_model_dir(&checked.spec.model_fingerprint, &checked.model)?;
    Ok(record)
}
