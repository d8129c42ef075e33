//! The `mifo runs` operations on an open store, as typed requests and replies: the engine
//! executes them for its clients (as `Request::Runs`), and the CLI only parses
//! arguments into a [`RunsRequest`] and formats the [`RunsReply`].
//!
//! Replies are data, never text: listing, showing, comparing, removing, tagging, collecting,
//! checking and exporting runs. Errors keep the store's one-line messages (`no run matches
//! 'zz'`, `run prefix … is ambiguous`) without a prefix.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::store::{
    diff_runs, export_run, CheckReport, ExportReport, GcReport, RemoveReport, RunDiff, RunId,
    RunKind, RunRecord, RunSpec, RunStatus, SeriesSummary, Store, StoreError,
};

/// The series whose last value `runs ls` shows as the run's loss.
pub const LOSS_SERIES: &str = "loss/total";

/// A `runs` operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RunsRequest {
    /// The runs that pass a filter, newest first (`runs ls`).
    List(LsFilter),
    /// Everything about one run (`runs show`).
    Show {
        /// Run id or unique prefix.
        run: String,
    },
    /// One run's record, for a question about it (`runs rm` asks before removing).
    Record {
        /// Run id or unique prefix.
        run: String,
    },
    /// The bytes of a run's output (`runs show --image`).
    Output {
        /// Run id or unique prefix.
        run: String,
        /// Output name.
        name: String,
    },
    /// Compares two runs (`runs diff`).
    Diff {
        /// Run A (id or unique prefix).
        a: String,
        /// Run B (id or unique prefix).
        b: String,
        /// List equal config keys, fields and inputs too.
        all: bool,
    },
    /// Removes a run, its metrics and log, and the blobs no other run uses (`runs rm`).
    Remove {
        /// Run id or unique prefix.
        run: String,
    },
    /// Adds tags to a run, or removes them (`runs tag`).
    Tag {
        /// Run id or unique prefix.
        run: String,
        /// The tags.
        tags: Vec<String>,
        /// Remove instead of add.
        remove: bool,
    },
    /// Removes what no run refers to (`runs gc`).
    Gc,
    /// Re-hashes every blob and validates every record (`runs check`).
    Check,
    /// Writes a run's config, metrics, images and embeddings into a folder (`runs export`).
    Export {
        /// Run id or unique prefix.
        run: String,
        /// The folder to create; absolute, since the engine may run in another directory.
        dir: PathBuf,
    },
}

/// Which runs [`RunsRequest::List`] lists.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LsFilter {
    /// Only this kind.
    pub kind: Option<RunKind>,
    /// Only this status.
    pub status: Option<RunStatus>,
    /// Only runs with this tag.
    pub tag: Option<String>,
}

/// The answer to a [`RunsRequest`] (same-named variants).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RunsReply {
    /// The runs listed.
    List(Listing),
    /// One run in full.
    Show(Box<RunShow>),
    /// A run's id, and its record when it can be read.
    Record {
        /// The resolved id.
        id: RunId,
        /// Its record; `None` when the record is unreadable.
        record: Option<Box<RunRecord>>,
    },
    /// An output's bytes.
    Output(Vec<u8>),
    /// The comparison (carried as JSON text: config values are free-form JSON).
    Diff(#[serde(with = "json_text")] Box<RunDiff>),
    /// What the removal freed.
    Removed(RemoveReport),
    /// The run's tags after the change.
    Tags {
        /// The resolved id.
        id: RunId,
        /// Its tags, sorted.
        tags: Vec<String>,
    },
    /// What `gc` freed.
    Gc(GcReport),
    /// What `check` found.
    Check {
        /// The report.
        report: CheckReport,
        /// The store's folder (named in the error of a failed check).
        store: PathBuf,
    },
    /// What `export` wrote.
    Exported(ExportReport),
}

/// What [`RunsRequest::List`] found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Listing {
    /// The runs that pass the filter, newest first.
    pub rows: Vec<ListedRun>,
    /// Shortest id prefix (at least 8) that tells every run in the store apart, filtered out
    /// or not.
    pub id_width: usize,
    /// Records that could not be read (one line each), left out of `rows`.
    pub unreadable: Vec<String>,
}

/// One listed run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListedRun {
    /// Its record.
    pub record: RunRecord,
    /// Last value of [`LOSS_SERIES`] (from the summary, or the stored points of a live run).
    pub final_loss: Option<f64>,
    /// Its tags, sorted.
    pub tags: Vec<String>,
}

/// Everything [`RunsRequest::Show`] returns about one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunShow {
    /// The record.
    pub record: RunRecord,
    /// The spec (carried as JSON text: its config is free-form JSON).
    #[serde(with = "json_text")]
    pub spec: RunSpec,
    /// Every metric series: name → (step, value) points.
    pub metrics: BTreeMap<String, Vec<(u64, f64)>>,
    /// Per-series summaries (the record's once finished, else computed from the points).
    pub summaries: BTreeMap<String, SeriesSummary>,
    /// Tags, sorted.
    pub tags: Vec<String>,
    /// Every log line.
    pub logs: Vec<String>,
    /// The model folder the store knows for the run's model, while it still holds that model.
    pub model_dir: Option<PathBuf>,
    /// The `--model-config` folder noted with a single-file model.
    pub model_config: Option<PathBuf>,
    /// Size in bytes of each output's blob file; `None` when the file is missing.
    pub output_sizes: BTreeMap<String, Option<u64>>,
}

/// Why a `runs` operation failed: the store's error, or a request that names something the run
/// does not have. One line either way.
#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    /// An error from the store (unknown or ambiguous prefix, unreadable record, I/O).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request names something that is not there.
    #[error("{0}")]
    Input(String),
}

/// Executes `request` on `store`.
pub fn execute(store: &Store, request: RunsRequest) -> Result<RunsReply, RunsError> {
    Ok(match request {
        RunsRequest::List(filter) => RunsReply::List(list(store, &filter)?),
        RunsRequest::Show { run } => RunsReply::Show(Box::new(show(store, &store.resolve(&run)?)?)),
        RunsRequest::Record { run } => {
            let id = store.resolve(&run)?;
            let record = store.get_run(&id).ok().map(Box::new);
            RunsReply::Record { id, record }
        }
        RunsRequest::Output { run, name } => RunsReply::Output(output(store, &run, &name)?),
        RunsRequest::Diff { a, b, all } => {
            let (a, b) = (store.resolve(&a)?, store.resolve(&b)?);
            RunsReply::Diff(Box::new(diff_runs(store, &a, &b, all)?))
        }
        RunsRequest::Remove { run } => RunsReply::Removed(store.remove_run(&store.resolve(&run)?)?),
        RunsRequest::Tag { run, tags, remove } => {
            let id = store.resolve(&run)?;
            for tag in &tags {
                if remove {
                    store.remove_tag(&id, tag)?;
                } else {
                    store.add_tag(&id, tag)?;
                }
            }
            let tags = store.tags(&id)?;
            RunsReply::Tags { id, tags }
        }
        RunsRequest::Gc => RunsReply::Gc(store.gc()?),
        RunsRequest::Check => RunsReply::Check {
            report: store.check()?,
            store: store.root().to_path_buf(),
        },
        RunsRequest::Export { run, dir } => {
            RunsReply::Exported(export_run(store, &store.resolve(&run)?, &dir)?)
        }
    })
}

/// The runs that pass `filter`, newest first. Reads run records and tags only; metrics are
/// read just for runs that have not finished.
pub fn list(store: &Store, filter: &LsFilter) -> Result<Listing, RunsError> {
    let tags = store.all_tags()?;
    let mut rows = Vec::new();
    let mut all_ids: Vec<RunId> = Vec::new();
    let mut unreadable = Vec::new();
    for record in store.runs() {
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                unreadable.push(e.to_string());
                continue;
            }
        };
        all_ids.push(record.id.clone());
        let run_tags = tags.get(&record.id).cloned().unwrap_or_default();
        if filter.kind.is_some_and(|k| k != record.kind)
            || filter.status.is_some_and(|s| s != record.status)
            || filter.tag.as_ref().is_some_and(|t| !run_tags.contains(t))
        {
            continue;
        }
        let final_loss = match record.summary.get(LOSS_SERIES) {
            Some(summary) => Some(summary.last),
            None if !record.status.is_final() => store
                .metric_series(&record.id, LOSS_SERIES)?
                .last()
                .map(|p| p.1),
            None => None,
        };
        rows.push(ListedRun {
            record,
            final_loss,
            tags: run_tags,
        });
    }
    Ok(Listing {
        rows,
        id_width: unique_prefix_width(&mut all_ids),
        unreadable,
    })
}

/// Shortest prefix length (at least 8) that tells every id apart.
fn unique_prefix_width(ids: &mut [RunId]) -> usize {
    ids.sort_unstable();
    let mut width = 8;
    for pair in ids.windows(2) {
        let common = pair[0]
            .as_bytes()
            .iter()
            .zip(pair[1].as_bytes())
            .take_while(|(a, b)| a == b)
            .count();
        width = width.max(common + 1);
    }
    width.min(crate::store::RUN_ID_LEN)
}

/// Everything about run `id`.
pub fn show(store: &Store, id: &RunId) -> Result<RunShow, RunsError> {
    let record = store.get_run(id)?;
    let spec = store.spec(&record.spec_hash)?;
    let output_sizes = record
        .outputs
        .iter()
        .map(|(name, hash)| {
            let size = std::fs::metadata(store.blobs().path(hash)).ok();
            (name.clone(), size.map(|m| m.len()))
        })
        .collect();
    Ok(RunShow {
        metrics: store.metrics(id)?,
        summaries: store.metric_summaries(&record)?,
        tags: store.tags(id)?,
        logs: store.logs(id)?,
        model_dir: store.model_dir_for(&spec.model_fingerprint)?,
        model_config: store.model_config_for(&spec.model_fingerprint)?,
        output_sizes,
        spec,
        record,
    })
}

/// The bytes of output `name` of run `run` (id or unique prefix); the error lists the outputs
/// the run has.
pub fn output(store: &Store, run: &str, name: &str) -> Result<Vec<u8>, RunsError> {
    let id = store.resolve(run)?;
    let record = store.get_run(&id)?;
    let Some(hash) = record.outputs.get(name) else {
        let names: Vec<&str> = record.outputs.keys().map(String::as_str).collect();
        return Err(RunsError::Input(format!(
            "run {id} has no output named '{name}' (outputs: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    };
    Ok(store.read_blob(hash)?)
}

/// (De)serialises a value as JSON text, for the values bincode cannot carry (free-form
/// `serde_json::Value`s need a self-describing format).
mod json_text {
    use serde::de::{DeserializeOwned, Error as _};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(value).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(D::Error::custom)
    }
}
