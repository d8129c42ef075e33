//! Removing runs, collecting garbage and checking a store.
//!
//! Garbage is what a crash or a removal can leave behind and nothing refers to: blobs no run or
//! spec names, specs no run uses, metric/log/tag entries of runs that no longer exist, temp files.
//! `check` counts garbage but does not call it a problem; `gc` removes it. Problems are things that
//! lose or misstate data: corrupt records or blobs, missing blobs or specs a record refers to.
//! Neither `rm` nor `gc` deletes a blob that any run or spec still refers to, and both refuse to
//! delete blobs while any run record is unreadable (they cannot know what it refers to).

use std::collections::{BTreeSet, HashSet};
use std::fs;

use serde::{Deserialize, Serialize};

use super::blobs::BlobEntry;
use super::error::{DbContext, StoreError, StoreResult};
use super::ids::{BlobHash, Digest, RunId, SpecHash, RUN_ID_LEN};
use super::record::{RunRecord, RunStatus};
use super::spec::RunSpec;
use super::{describe_run_key, lock, metrics, Store};

/// What [`Store::remove_run`] removed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RemoveReport {
    /// The run removed.
    pub run: String,
    /// Metric chunks, log lines and tags removed.
    pub keys_removed: usize,
    /// Whether its spec was removed (no other run used it).
    pub spec_removed: bool,
    /// Blobs removed (referenced by this run only).
    pub blobs_removed: usize,
    /// Bytes those blobs held.
    pub bytes_freed: u64,
    /// Blobs kept because another run or spec still refers to them.
    pub blobs_kept: usize,
    /// Why blobs and the spec were left for `gc` (an unreadable record elsewhere, or this run's).
    pub note: Option<String>,
}

/// What [`Store::gc`] removed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GcReport {
    /// Blobs no run or spec refers to.
    pub blobs_removed: usize,
    /// Bytes those blobs held.
    pub bytes_freed: u64,
    /// Specs no run uses.
    pub specs_removed: usize,
    /// Metric chunks, log lines and tags of runs that no longer exist.
    pub orphan_keys_removed: usize,
    /// Temp files left by interrupted blob writes.
    pub temp_files_removed: usize,
    /// Bytes those temp files held.
    pub temp_bytes_freed: u64,
}

/// One problem found by [`Store::check`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// What it is about: `run <id>`, `blob <hash>`, `spec <hash>`, `metric chunk …`, a path.
    pub subject: String,
    /// What is wrong.
    pub message: String,
}

/// What [`Store::check`] found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckReport {
    /// Run records read.
    pub runs_checked: usize,
    /// Specs read.
    pub specs_checked: usize,
    /// Blob files re-hashed.
    pub blobs_checked: usize,
    /// Bytes re-hashed.
    pub bytes_hashed: u64,
    /// Metric chunks decoded.
    pub metric_chunks_checked: usize,
    /// Problems: data that is lost, corrupt or misstated.
    pub problems: Vec<Problem>,
    /// Runs still marked `running` by a process that is gone (see
    /// [`Store::mark_stale_running_interrupted`]).
    pub stale_running: Vec<String>,
    /// Garbage that `gc` would remove: unreferenced blobs, unused specs, orphan keys, temp files.
    pub garbage_blobs: usize,
    /// Specs no run uses.
    pub garbage_specs: usize,
    /// Metric, log and tag keys of runs that do not exist.
    pub garbage_keys: usize,
    /// Temp files in `blobs/tmp`.
    pub temp_files: usize,
}

impl CheckReport {
    /// True when no problem was found (garbage and stale runs are not problems).
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, subject: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            subject: subject.into(),
            message: message.into(),
        });
    }
}

/// Blobs referenced by runs and specs, or the first run record that could not be read.
struct References {
    blobs: HashSet<BlobHash>,
    specs: HashSet<SpecHash>,
    runs: HashSet<RunId>,
}

impl Store {
    /// Every blob and spec that a run refers to (outputs, and the inputs of the specs runs use).
    /// Fails when a run record or a used spec cannot be read: deleting anything then could lose data.
    fn references(&self, skip_run: Option<&RunId>) -> StoreResult<References> {
        let mut refs = References {
            blobs: HashSet::new(),
            specs: HashSet::new(),
            runs: HashSet::new(),
        };
        for entry in self.inner.runs.iter() {
            let (key, bytes) = entry.db(|| "listing runs".into())?;
            if skip_run.is_some_and(|skip| skip.as_bytes() == key.as_ref()) {
                continue;
            }
            let record = RunRecord::decode(&bytes, &describe_run_key(&key))?;
            refs.blobs.extend(record.outputs.values().copied());
            refs.specs.insert(record.spec_hash);
            refs.runs.insert(record.id);
        }
        for hash in &refs.specs {
            match self.spec(hash) {
                Ok(spec) => refs.blobs.extend(spec.inputs.values().copied()),
                Err(StoreError::MissingSpec { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(refs)
    }

    /// Removes run `id`: its record, metrics, logs and tags, its spec when no other run uses it, and
    /// the blobs that no remaining run or spec refers to. Refuses a run that is live in this process
    /// or that other runs name as their parent.
    pub fn remove_run(&self, id: &RunId) -> StoreResult<RemoveReport> {
        if lock(&self.inner.owned).contains(id) {
            return Err(StoreError::state(
                id,
                "is running in this process; cancel it first",
            ));
        }
        // A corrupt record can be removed too; its blobs and spec are then left for `gc`.
        let record = match self.get_run(id) {
            Ok(record) => Some(record),
            Err(e @ StoreError::Corrupt { .. }) => {
                if !self
                    .inner
                    .runs
                    .contains_key(id.as_bytes())
                    .db(|| format!("reading run {id}"))?
                {
                    return Err(e);
                }
                None
            }
            Err(e) => return Err(e),
        };
        let children: Vec<String> = self
            .runs()
            .filter_map(Result::ok)
            .filter(|r| r.parent.as_ref() == Some(id))
            .map(|r| r.id.to_string())
            .collect();
        if !children.is_empty() {
            return Err(StoreError::state(
                id,
                format!(
                    "runs {} were made from it; remove them first",
                    children.join(", ")
                ),
            ));
        }
        let mut report = RemoveReport {
            run: id.to_string(),
            ..RemoveReport::default()
        };
        // Work out what stays referenced before deleting anything. When another record cannot be
        // read, nothing it might refer to can be deleted: keep every blob and the spec.
        let refs = match self.references(Some(id)) {
            Ok(refs) => Some(refs),
            Err(e @ (StoreError::Corrupt { .. } | StoreError::MissingSpec { .. })) => {
                report.note = Some(format!("blobs and spec kept for gc: {e}"));
                None
            }
            Err(e) => return Err(e),
        };
        if record.is_none() && report.note.is_none() {
            report.note =
                Some("the record was unreadable: its blobs and spec are left for gc".into());
        }

        // 1. The record: from here on the run is gone, and a crash leaves only garbage.
        self.inner
            .runs
            .remove(id.as_bytes())
            .db(|| format!("removing run {id}"))?;
        self.sync()?;
        // 2. Keys of the run in the other trees.
        for tree in [&self.inner.metrics, &self.inner.logs, &self.inner.tags] {
            report.keys_removed += remove_prefix(tree, id.as_bytes())?;
        }
        let (Some(record), Some(refs)) = (record, refs) else {
            self.sync()?;
            return Ok(report);
        };
        let spec = self.spec(&record.spec_hash).ok();
        // 3. The spec, when no other run uses it.
        if !refs.specs.contains(&record.spec_hash) {
            self.inner
                .specs
                .remove(record.spec_hash.0)
                .db(|| format!("removing spec {}", record.spec_hash))?;
            report.spec_removed = true;
        }
        // 4. Blobs referenced by this run only.
        let mut candidates: BTreeSet<BlobHash> = record.outputs.values().copied().collect();
        if report.spec_removed {
            if let Some(spec) = &spec {
                candidates.extend(spec.inputs.values().copied());
            }
        }
        for hash in candidates {
            if refs.blobs.contains(&hash) {
                report.blobs_kept += 1;
                continue;
            }
            report.bytes_freed += self.inner.blobs.remove(&hash)?;
            report.blobs_removed += 1;
        }
        self.sync()?;
        Ok(report)
    }

    /// Removes garbage: blobs no run or spec refers to, specs no run uses, keys of runs that do not
    /// exist, and temp files older than this handle. Refuses while this handle has live runs.
    pub fn gc(&self) -> StoreResult<GcReport> {
        if !lock(&self.inner.owned).is_empty() {
            return Err(StoreError::InvalidInput(
                "gc cannot run while runs are live in this process".to_string(),
            ));
        }
        let refs = self.references(None)?;
        let mut report = GcReport::default();
        for key in self.inner.specs.iter().keys() {
            let key = key.db(|| "listing specs".into())?;
            let used = <[u8; 32]>::try_from(key.as_ref())
                .map(|bytes| refs.specs.contains(&Digest(bytes)))
                .unwrap_or(false);
            if !used {
                self.inner
                    .specs
                    .remove(&key)
                    .db(|| "removing an unused spec".into())?;
                report.specs_removed += 1;
            }
        }
        // Spec inputs of removed specs are not in `refs.blobs`, so their blobs go below.
        for tree in [&self.inner.metrics, &self.inner.logs, &self.inner.tags] {
            let orphans: Vec<sled::IVec> = tree
                .iter()
                .keys()
                .filter_map(Result::ok)
                .filter(|key| !key_run(key).is_some_and(|run| refs.runs.contains(&run)))
                .collect();
            for key in orphans {
                tree.remove(key).db(|| "removing an orphan key".into())?;
                report.orphan_keys_removed += 1;
            }
        }
        for entry in self.inner.blobs.entries()? {
            match entry {
                BlobEntry::Blob { hash, .. } if !refs.blobs.contains(&hash) => {
                    report.bytes_freed += self.inner.blobs.remove(&hash)?;
                    report.blobs_removed += 1;
                }
                BlobEntry::Temp(path) => {
                    let Ok(meta) = fs::metadata(&path) else {
                        continue;
                    };
                    let older = meta
                        .modified()
                        .map(|m| m < self.inner.opened_at)
                        .unwrap_or(false);
                    if older {
                        fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
                        report.temp_files_removed += 1;
                        report.temp_bytes_freed += meta.len();
                    }
                }
                _ => {}
            }
        }
        self.inner.db.flush().db(|| "flushing".into())?;
        Ok(report)
    }

    /// Validates every record and spec, decodes every metric chunk, and re-hashes every blob. Names
    /// each problem; counts garbage separately.
    pub fn check(&self) -> StoreResult<CheckReport> {
        let mut report = CheckReport::default();
        let owned = lock(&self.inner.owned).clone();
        let mut runs: Vec<RunRecord> = Vec::new();
        let mut run_ids: HashSet<RunId> = HashSet::new();
        for entry in self.inner.runs.iter() {
            let (key, bytes) = entry.db(|| "listing runs".into())?;
            report.runs_checked += 1;
            let what = describe_run_key(&key);
            if let Err(e) = RunId::from_key(&key) {
                report.problem(what, format!("key is not a run id: {e}"));
                continue;
            }
            match RunRecord::decode(&bytes, &what) {
                Ok(record) if record.id.as_bytes() != key.as_ref() => {
                    report.problem(what, format!("record holds id {}", record.id));
                }
                Ok(record) => {
                    run_ids.insert(record.id.clone());
                    runs.push(record);
                }
                Err(e) => report.problem(what, e.to_string()),
            }
        }

        // Specs: each must hash to its key and decode.
        let mut specs: std::collections::HashMap<SpecHash, RunSpec> =
            std::collections::HashMap::new();
        for entry in self.inner.specs.iter() {
            let (key, bytes) = entry.db(|| "listing specs".into())?;
            report.specs_checked += 1;
            let Ok(raw) = <[u8; 32]>::try_from(key.as_ref()) else {
                report.problem(
                    format!("spec key {:?}", String::from_utf8_lossy(&key)),
                    "not a 32-byte hash",
                );
                continue;
            };
            let hash = Digest(raw);
            let what = format!("spec {hash}");
            if Digest::of(&bytes) != hash {
                report.problem(what, "content does not hash to its key");
                continue;
            }
            match RunSpec::from_canonical(&bytes, &what) {
                Ok(spec) => {
                    specs.insert(hash, spec);
                }
                Err(e) => report.problem(what, e.to_string()),
            }
        }

        // Blobs: re-hash each file.
        let mut present: HashSet<BlobHash> = HashSet::new();
        for entry in self.inner.blobs.entries()? {
            match entry {
                BlobEntry::Blob { hash, path } => {
                    report.blobs_checked += 1;
                    match self.inner.blobs.verify(&hash) {
                        Ok(size) => {
                            report.bytes_hashed += size;
                            present.insert(hash);
                        }
                        Err(e) => report
                            .problem(format!("blob {hash}"), format!("{e} ({})", path.display())),
                    }
                }
                BlobEntry::Temp(_) => report.temp_files += 1,
                BlobEntry::Unexpected(path) => report.problem(
                    path.display().to_string(),
                    "unexpected file in the blob folder",
                ),
            }
        }

        // Records against specs, blobs and each other.
        let mut referenced_blobs: HashSet<BlobHash> = HashSet::new();
        let mut used_specs: HashSet<SpecHash> = HashSet::new();
        for record in &runs {
            let subject = format!("run {}", record.id);
            used_specs.insert(record.spec_hash);
            match specs.get(&record.spec_hash) {
                None if self
                    .inner
                    .specs
                    .contains_key(record.spec_hash.0)
                    .unwrap_or(false) =>
                {
                    // Present but corrupt: already reported under the spec.
                }
                None => report.problem(
                    &subject,
                    format!("its spec {} is missing", record.spec_hash),
                ),
                Some(spec) => {
                    if spec.kind != record.kind {
                        report.problem(
                            &subject,
                            format!(
                                "record says {} but its spec says {}",
                                record.kind, spec.kind
                            ),
                        );
                    }
                    if spec.parent != record.parent {
                        report.problem(&subject, "record and spec disagree on the parent run");
                    }
                    for (name, hash) in &spec.inputs {
                        referenced_blobs.insert(*hash);
                        if !present.contains(hash) && !self.inner.blobs.contains(hash) {
                            report
                                .problem(&subject, format!("input {name}: blob {hash} is missing"));
                        }
                    }
                }
            }
            for (name, hash) in &record.outputs {
                referenced_blobs.insert(*hash);
                if !present.contains(hash) && !self.inner.blobs.contains(hash) {
                    report.problem(&subject, format!("output {name}: blob {hash} is missing"));
                }
            }
            if let Some(parent) = &record.parent {
                if !run_ids.contains(parent) {
                    report.problem(&subject, format!("its parent run {parent} is missing"));
                }
            }
            match record.status {
                RunStatus::Done
                | RunStatus::Failed
                | RunStatus::Cancelled
                | RunStatus::Interrupted
                    if record.finished_ms.is_none() =>
                {
                    report.problem(
                        &subject,
                        format!("is {} but has no finish time", record.status),
                    );
                }
                RunStatus::Running if record.started_ms.is_none() => {
                    report.problem(&subject, "is running but has no start time")
                }
                RunStatus::Running if !owned.contains(&record.id) => {
                    report.stale_running.push(record.id.to_string())
                }
                _ => {}
            }
        }
        report.garbage_specs = specs.keys().filter(|h| !used_specs.contains(h)).count();
        report.garbage_blobs = present
            .iter()
            .filter(|h| !referenced_blobs.contains(h))
            .count();

        // Metric chunks decode; metric, log and tag keys belong to existing runs.
        for entry in self.inner.metrics.iter() {
            let (key, bytes) = entry.db(|| "listing metrics".into())?;
            let Some((run, name, seq)) = metrics::parse_chunk_key(&key) else {
                report.problem(
                    format!("metric key {:?}", String::from_utf8_lossy(&key)),
                    "malformed",
                );
                continue;
            };
            let run_text = String::from_utf8_lossy(run).into_owned();
            let what = format!("metric chunk {name}#{seq} of run {run_text}");
            let mut points = Vec::new();
            report.metric_chunks_checked += 1;
            if let Err(e) = metrics::decode_chunk_into(&bytes, &mut points, &|| what.clone()) {
                report.problem(what.clone(), e.to_string());
            }
            if !key_run(&key).is_some_and(|r| run_ids.contains(&r)) {
                report.garbage_keys += 1;
            }
        }
        for (tree, label) in [(&self.inner.logs, "log line"), (&self.inner.tags, "tag")] {
            for entry in tree.iter() {
                let (key, bytes) = entry.db(|| format!("listing {label}s"))?;
                if label == "log line" && std::str::from_utf8(&bytes).is_err() {
                    report.problem(
                        format!(
                            "{label} of run {}",
                            String::from_utf8_lossy(&key[..key.len().min(RUN_ID_LEN)])
                        ),
                        "not UTF-8",
                    );
                }
                if !key_run(&key).is_some_and(|r| run_ids.contains(&r)) {
                    report.garbage_keys += 1;
                }
            }
        }
        Ok(report)
    }
}

/// The run id at the start of a metrics/logs/tags key.
fn key_run(key: &[u8]) -> Option<RunId> {
    if key.len() <= RUN_ID_LEN {
        return None;
    }
    RunId::from_key(&key[..RUN_ID_LEN]).ok()
}

fn remove_prefix(tree: &sled::Tree, prefix: &[u8]) -> StoreResult<usize> {
    let keys: Vec<sled::IVec> = tree
        .scan_prefix(prefix)
        .keys()
        .collect::<Result<_, _>>()
        .db(|| "listing keys to remove".into())?;
    let mut batch = sled::Batch::default();
    for key in &keys {
        batch.remove(key.clone());
    }
    tree.apply_batch(batch).db(|| "removing keys".into())?;
    Ok(keys.len())
}
