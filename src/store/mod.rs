//! The run store: every run's spec, record, metrics, logs, tags and output blobs.
//!
//! This file opens a store and runs the run lifecycle (create, start, resume, finish, outputs,
//! lookup); the other parts of the [`Store`] API live with their data: metric series in
//! `metrics`, log lines in `logs`, tags in `tags`, model fingerprints and folders in
//! `model_dirs`, scores added after a run in `scores`, and removal, garbage collection and
//! checks in `maintenance`.
//!
//! Layout of a store folder (default `./runs`):
//! ```text
//! <store>/db/                 sled 0.34 database, metadata only, trees:
//!     specs    spec hash (32 bytes)          -> canonical spec bytes (see `spec`)
//!     runs     run id (16 bytes)             -> RunRecord (see `record`)
//!     metrics  run id ++ name ++ 0 ++ u32 BE -> chunk of points (see `metrics`)
//!     logs     run id ++ u64 BE line number  -> log line (UTF-8)
//!     tags     run id ++ tag                 -> empty
//!     meta     "schema_version"              -> u32 BE; fingerprint cache entries;
//!              "model-dir/" ++ fingerprint hex -> the model folder (or single file) last used with it
//!              "model-config/" ++ fingerprint hex -> a single file's --model-config folder
//! <store>/blobs/<2 hex>/<64 hex>   content-addressed blob files (see `blobs`)
//! <store>/blobs/tmp/               blobs being written
//! ```
//! sled takes an exclusive lock on the database, so one process at a time has a store open; the
//! engine will be that process. A `running` run that this handle did not start therefore belongs to
//! a process that is gone, which is what [`Store::mark_stale_running_interrupted`] relies on.
//!
//! Writes are ordered so that a crash (kill -9) at any point leaves a store that opens and checks
//! clean: blobs are written and fsynced before a record names them, a spec before the record that
//! uses it, metric chunks before the record that summarises them, and every status change is flushed.
//! What a crash can leave behind is garbage (unreferenced blobs and specs, temp files), which
//! [`Store::gc`] removes and [`Store::check`] reports without calling it a problem.

mod blobs;
mod diff;
mod error;
mod export;
mod fingerprint;
mod ids;
mod logs;
mod maintenance;
mod metrics;
mod model_dirs;
mod png;
mod record;
mod scores;
mod spec;
mod tags;
mod time;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

pub use blobs::{BlobEntry, BlobStore};
pub use diff::{diff_runs, ConfigDelta, MetricDelta, OutputDelta, RunDiff, ValueDelta};
pub use error::{StoreError, StoreResult};
pub use export::{export_run, ExportReport, EMBEDDINGS_OUTPUT};
pub use ids::{normalize_run_prefix, BlobHash, Digest, RunId, SpecHash, RUN_ID_LEN};
pub use logs::MAX_LOG_LINE;
pub use maintenance::{CheckReport, GcReport, Problem, RemoveReport};
pub use metrics::{Point, CHUNK_POINTS};
pub use model_dirs::{model_fingerprint, model_fingerprint_with};
pub use png::{add_png_text_chunks, png_text_chunks};
pub use record::{RunRecord, RunStatus, SeriesSummary, MAX_RECORD_BYTES};
pub use scores::{is_score, SCORE_PREFIXES};
pub use spec::{code_version, write_canonical_json, RunKind, RunSpec, SPEC_ENCODING_PREFIX};
pub use tags::{validate_tag, MAX_TAG_LEN};
pub use time::{format_age, format_duration, format_utc, now_ms};

use error::DbContext;
use metrics::SeriesBuffer;

/// The store layout and encodings this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
const SCHEMA_KEY: &[u8] = b"schema_version";
/// Longest output or input name.
pub const MAX_NAME_LEN: usize = 128;

/// How a store handle behaves.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Flush (fsync) the database after every status change (create, start, finish, interrupt,
    /// remove). On by default; turning it off trades durability of the last changes for speed
    /// (bulk imports, benchmarks).
    pub sync: bool,
    /// sled page cache size in bytes.
    pub cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            sync: true,
            cache_bytes: 64 << 20,
        }
    }
}

/// Launcher-provided facts about a new run that are not part of its spec.
#[derive(Clone, Debug, Default)]
pub struct NewRun {
    /// Short label of the inputs for listings (e.g. the scene folder's name).
    pub scene: Option<String>,
    /// Config keys the user set away from their defaults, for listings.
    pub config_deltas: Vec<(String, String)>,
    /// The earlier run with the same spec that this run repeats (`--rerun`).
    pub rerun_of: Option<RunId>,
    /// The model source as the user gave it (see [`RunRecord::model_source`]).
    pub model_source: Option<String>,
}

/// How a running run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum RunOutcome {
    /// Finished with every output recorded.
    Done,
    /// Stopped by an error.
    Failed(String),
    /// Stopped on request.
    Cancelled,
}

/// A handle on an open store. Cheap to clone; clones share one database and one set of buffers.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    db: sled::Db,
    specs: sled::Tree,
    runs: sled::Tree,
    metrics: sled::Tree,
    logs: sled::Tree,
    tags: sled::Tree,
    meta: sled::Tree,
    blobs: BlobStore,
    options: StoreOptions,
    opened_at: SystemTime,
    /// Serialises read-modify-write of run records.
    record_lock: Mutex<()>,
    /// Runs this handle started and has not finished: the only `running` runs that are live.
    owned: Mutex<HashSet<RunId>>,
    /// The newest run id handed out, to keep ids increasing.
    last_id: Mutex<Option<RunId>>,
    /// Metric points not yet written as a chunk, per run and series.
    pending: Mutex<HashMap<RunId, BTreeMap<String, SeriesBuffer>>>,
    /// Next log line number per run.
    log_next: Mutex<HashMap<RunId, u64>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Store {
    /// Opens the existing store at `root`; fails with [`StoreError::NotAStore`] when there is none.
    pub fn open(root: impl AsRef<Path>) -> StoreResult<Store> {
        Store::open_with(root, false, StoreOptions::default())
    }

    /// Opens the store at `root`, creating it when missing.
    pub fn create(root: impl AsRef<Path>) -> StoreResult<Store> {
        Store::open_with(root, true, StoreOptions::default())
    }

    /// Opens (and with `create`, creates) the store at `root` with `options`.
    pub fn open_with(
        root: impl AsRef<Path>,
        create: bool,
        options: StoreOptions,
    ) -> StoreResult<Store> {
        let root = root.as_ref().to_path_buf();
        let db_path = root.join("db");
        if !db_path.is_dir() {
            if !create {
                return Err(StoreError::NotAStore { path: root });
            }
            blobs::create_dir_synced(&root)?;
        }
        let open = || {
            sled::Config::new()
                .path(&db_path)
                .mode(sled::Mode::LowSpace)
                .cache_capacity(options.cache_bytes)
                .open()
        };
        let locked = |e: &sled::Error| matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"));
        // A handle of this process that was just dropped releases the file lock only when
        // sled's background flusher has exited: retry briefly before calling it a conflict.
        let mut attempt = open();
        for _ in 0..50 {
            match &attempt {
                Err(e) if locked(e) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    attempt = open();
                }
                _ => break,
            }
        }
        let db = attempt.map_err(|e| {
            if locked(&e) {
                StoreError::Locked { path: root.clone() }
            } else {
                StoreError::Db {
                    context: format!("opening {}", db_path.display()),
                    source: e,
                }
            }
        })?;
        let tree = |name: &str| db.open_tree(name).db(|| format!("opening tree {name}"));
        let inner = Inner {
            specs: tree("specs")?,
            runs: tree("runs")?,
            metrics: tree("metrics")?,
            logs: tree("logs")?,
            tags: tree("tags")?,
            meta: tree("meta")?,
            db,
            blobs: BlobStore::new(root.join("blobs")),
            root,
            options,
            opened_at: SystemTime::now(),
            record_lock: Mutex::new(()),
            owned: Mutex::new(HashSet::new()),
            last_id: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            log_next: Mutex::new(HashMap::new()),
        };
        let store = Store {
            inner: Arc::new(inner),
        };
        store.check_schema_version()?;
        Ok(store)
    }

    fn check_schema_version(&self) -> StoreResult<()> {
        let meta = &self.inner.meta;
        match meta
            .get(SCHEMA_KEY)
            .db(|| "reading the schema version".into())?
        {
            None => {
                meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())
                    .db(|| "writing the schema version".into())?;
                self.inner.db.flush().db(|| "flushing".into())?;
                Ok(())
            }
            Some(bytes) => {
                let found = <[u8; 4]>::try_from(bytes.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| {
                        StoreError::corrupt("schema version key", format!("{} bytes", bytes.len()))
                    })?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::SchemaVersion {
                        path: self.inner.root.clone(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                Ok(())
            }
        }
    }

    /// The store folder.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The blob folder.
    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    /// Flushes buffered metric points and fsyncs the database.
    pub fn flush(&self) -> StoreResult<()> {
        let runs: Vec<RunId> = lock(&self.inner.pending).keys().cloned().collect();
        for run in runs {
            self.flush_metrics(&run)?;
        }
        self.inner.db.flush().db(|| "flushing".into())?;
        Ok(())
    }

    fn sync(&self) -> StoreResult<()> {
        if self.inner.options.sync {
            self.inner.db.flush().db(|| "flushing".into())?;
        }
        Ok(())
    }

    // === Blobs ===

    /// Stores `bytes` as a blob and returns its hash.
    pub fn put_blob(&self, bytes: &[u8]) -> StoreResult<BlobHash> {
        self.inner.blobs.put(bytes)
    }

    /// Stores the file at `path` as a blob and returns its hash.
    pub fn put_blob_file(&self, path: &Path) -> StoreResult<BlobHash> {
        self.inner.blobs.put_file(path)
    }

    /// Reads blob `hash`, checking its content against its name.
    pub fn read_blob(&self, hash: &BlobHash) -> StoreResult<Vec<u8>> {
        self.inner.blobs.read(hash)
    }

    // === Specs ===

    /// Stores `spec` (if new) and returns its hash.
    pub fn put_spec(&self, spec: &RunSpec) -> StoreResult<SpecHash> {
        let bytes = spec.canonical_bytes()?;
        let hash = Digest::of(&bytes);
        if !self
            .inner
            .specs
            .contains_key(hash.0)
            .db(|| format!("reading spec {hash}"))?
        {
            self.inner
                .specs
                .insert(hash.0, bytes)
                .db(|| format!("writing spec {hash}"))?;
        }
        Ok(hash)
    }

    /// Reads spec `hash`, checking that its bytes still hash to it.
    pub fn spec(&self, hash: &SpecHash) -> StoreResult<RunSpec> {
        let what = format!("spec {hash}");
        let bytes = self
            .inner
            .specs
            .get(hash.0)
            .db(|| format!("reading {what}"))?
            .ok_or_else(|| StoreError::MissingSpec {
                hash: hash.to_hex(),
            })?;
        if Digest::of(&bytes) != *hash {
            return Err(StoreError::corrupt(
                what,
                "content does not hash to its key",
            ));
        }
        RunSpec::from_canonical(&bytes, &what)
    }

    // === Runs ===

    /// Records a new `queued` run of `spec`. The spec's input blobs and parent run must exist; a
    /// re-run must name an earlier run with the same spec.
    pub fn create_run(&self, spec: &RunSpec, new: NewRun) -> StoreResult<RunRecord> {
        for (name, hash) in &spec.inputs {
            validate_name("input", name)?;
            if !self.inner.blobs.contains(hash) {
                return Err(StoreError::InvalidInput(format!(
                    "input {name}: blob {hash} is not in the store (put it first)"
                )));
            }
        }
        if let Some(parent) = &spec.parent {
            self.get_run(parent)?;
        }
        let spec_hash = spec.spec_hash()?;
        if let Some(earlier) = &new.rerun_of {
            let earlier_record = self.get_run(earlier)?;
            if earlier_record.spec_hash != spec_hash {
                return Err(StoreError::InvalidInput(format!(
                    "run {earlier} has spec {}, not {spec_hash}: a re-run repeats the same spec",
                    earlier_record.spec_hash.short(12)
                )));
            }
        }
        for (key, _) in &new.config_deltas {
            validate_name("config delta", key)?;
        }
        self.put_spec(spec)?;
        let record = RunRecord {
            id: self.next_run_id()?,
            spec_hash,
            kind: spec.kind,
            parent: spec.parent.clone(),
            status: RunStatus::Queued,
            created_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
            host: String::new(),
            device: String::new(),
            pid: None,
            scene: new.scene,
            config_deltas: new.config_deltas,
            outputs: BTreeMap::new(),
            summary: BTreeMap::new(),
            error: None,
            rerun_of: new.rerun_of,
            rerun_identical: None,
            model_source: new.model_source,
            slurm_jobs: Vec::new(),
        };
        {
            let _guard = lock(&self.inner.record_lock);
            self.write_record(&record)?;
        }
        self.sync()?;
        Ok(record)
    }

    fn next_run_id(&self) -> StoreResult<RunId> {
        let mut last = lock(&self.inner.last_id);
        if last.is_none() {
            if let Some((key, _)) = self
                .inner
                .runs
                .last()
                .db(|| "reading the newest run".into())?
            {
                *last = RunId::from_key(&key).ok();
            }
        }
        let mut id = RunId::from_parts(now_ms(), rand::random::<u32>());
        if let Some(previous) = last.as_ref() {
            if id <= *previous {
                // Same millisecond (or a clock step back): a random step past the newest id keeps
                // ids increasing and still far apart.
                id = previous.advanced_by(1 + rand::random::<u64>() % (1 << 20));
            }
        }
        *last = Some(id.clone());
        Ok(id)
    }

    /// Marks queued run `id` as running in this process on `host` / `device`.
    pub fn start_run(&self, id: &RunId, host: &str, device: &str) -> StoreResult<RunRecord> {
        let record = self.update_run(id, |record| {
            if record.status != RunStatus::Queued {
                return Err(StoreError::state(
                    id,
                    format!("is {}; only a queued run can start", record.status),
                ));
            }
            record.status = RunStatus::Running;
            record.started_ms = Some(now_ms());
            record.host = host.to_string();
            record.device = device.to_string();
            record.pid = Some(std::process::id());
            Ok(())
        })?;
        lock(&self.inner.owned).insert(id.clone());
        self.sync()?;
        Ok(record)
    }

    /// Marks an `interrupted` run as running again in this process (resuming from a checkpoint).
    /// Metric chunks and log lines continue after the ones already stored.
    pub fn resume_run(&self, id: &RunId, host: &str, device: &str) -> StoreResult<RunRecord> {
        let record = self.update_run(id, |record| {
            if record.status != RunStatus::Interrupted {
                return Err(StoreError::state(
                    id,
                    format!("is {}; only an interrupted run can resume", record.status),
                ));
            }
            record.status = RunStatus::Running;
            record.finished_ms = None;
            record.error = None;
            record.summary.clear();
            record.host = host.to_string();
            record.device = device.to_string();
            record.pid = Some(std::process::id());
            Ok(())
        })?;
        lock(&self.inner.owned).insert(id.clone());
        self.sync()?;
        Ok(record)
    }

    /// Ends run `id`: writes pending metric points, summarises every series, sets the final status
    /// and, for a finished re-run, whether its outputs are bit-identical to the earlier run's.
    pub fn finish_run(&self, id: &RunId, outcome: RunOutcome) -> StoreResult<RunRecord> {
        self.flush_metrics(id)?;
        let summary = self.summarise_metrics(id)?;
        let earlier_outputs = match self.get_run(id)?.rerun_of {
            Some(earlier) => self.try_get_run(&earlier)?.map(|r| r.outputs),
            None => None,
        };
        let record = self.update_run(id, |record| {
            let allowed = match outcome {
                RunOutcome::Done => record.status == RunStatus::Running,
                RunOutcome::Failed(_) | RunOutcome::Cancelled => !record.status.is_final(),
            };
            if !allowed {
                return Err(StoreError::state(
                    id,
                    format!("is {}; it cannot become {outcome:?}", record.status),
                ));
            }
            record.status = match &outcome {
                RunOutcome::Done => RunStatus::Done,
                RunOutcome::Failed(_) => RunStatus::Failed,
                RunOutcome::Cancelled => RunStatus::Cancelled,
            };
            if let RunOutcome::Failed(message) = &outcome {
                record.error = Some(message.clone());
            }
            record.finished_ms = Some(now_ms());
            record.summary = summary;
            if outcome == RunOutcome::Done {
                record.rerun_identical = earlier_outputs
                    .as_ref()
                    .map(|earlier| *earlier == record.outputs);
            }
            Ok(())
        })?;
        lock(&self.inner.owned).remove(id);
        lock(&self.inner.pending).remove(id);
        lock(&self.inner.log_next).remove(id);
        self.sync()?;
        Ok(record)
    }

    /// Marks every `running` run that this handle did not start as `interrupted` (its process is
    /// gone: sled lets one process at a time open the store). Returns the runs it marked. The engine
    /// decides when to call this; opening a store never does.
    pub fn mark_stale_running_interrupted(&self) -> StoreResult<Vec<RunId>> {
        let owned = lock(&self.inner.owned).clone();
        let mut stale = Vec::new();
        for entry in self.inner.runs.iter() {
            let (key, bytes) = entry.db(|| "listing runs".into())?;
            let Ok(record) = RunRecord::decode(&bytes, &describe_run_key(&key)) else {
                continue; // `check` names corrupt records; nothing to mark here.
            };
            if record.status == RunStatus::Running && !owned.contains(&record.id) {
                stale.push(record.id);
            }
        }
        for id in &stale {
            let summary = self.summarise_metrics(id)?;
            self.update_run(id, |record| {
                if record.status != RunStatus::Running {
                    return Ok(());
                }
                record.status = RunStatus::Interrupted;
                record.finished_ms = Some(now_ms());
                record.summary = summary;
                record.error = Some(format!(
                    "process {} on {} stopped while the run was running",
                    record
                        .pid
                        .map_or_else(|| "?".to_string(), |p| p.to_string()),
                    if record.host.is_empty() {
                        "?"
                    } else {
                        &record.host
                    }
                ));
                Ok(())
            })?;
        }
        if !stale.is_empty() {
            self.sync()?;
        }
        Ok(stale)
    }

    /// Takes over the `running` run `id` whose work goes on outside this process (a Slurm job
    /// this engine follows after a restart): this handle may append its metrics and log lines
    /// and finish it, and [`Self::mark_stale_running_interrupted`] leaves it alone.
    pub fn adopt_run(&self, id: &RunId) -> StoreResult<()> {
        let record = self.get_run(id)?;
        if record.status != RunStatus::Running {
            return Err(StoreError::state(
                id,
                format!("is {}; only a running run can be adopted", record.status),
            ));
        }
        lock(&self.inner.owned).insert(id.clone());
        Ok(())
    }

    /// Marks the running run `id` as `interrupted` (resumable from its last checkpoint) with
    /// `reason`, e.g. the Slurm job it ran under hit its time limit.
    pub fn interrupt_run(&self, id: &RunId, reason: &str) -> StoreResult<RunRecord> {
        self.flush_metrics(id)?;
        let summary = self.summarise_metrics(id)?;
        let record = self.update_run(id, |record| {
            if record.status != RunStatus::Running {
                return Err(StoreError::state(
                    id,
                    format!(
                        "is {}; only a running run can be interrupted",
                        record.status
                    ),
                ));
            }
            record.status = RunStatus::Interrupted;
            record.finished_ms = Some(now_ms());
            record.summary = summary;
            record.error = Some(reason.to_string());
            Ok(())
        })?;
        lock(&self.inner.owned).remove(id);
        lock(&self.inner.pending).remove(id);
        lock(&self.inner.log_next).remove(id);
        self.sync()?;
        Ok(record)
    }

    /// Adds Slurm job `job` to the jobs run `id` ran under (once; see
    /// [`RunRecord::slurm_jobs`]).
    pub fn add_slurm_job(&self, id: &RunId, job: &str) -> StoreResult<RunRecord> {
        validate_name("slurm job", job)?;
        let record = self.update_run(id, |record| {
            if !record.slurm_jobs.iter().any(|j| j == job) {
                record.slurm_jobs.push(job.to_string());
            }
            Ok(())
        })?;
        self.sync()?;
        Ok(record)
    }

    /// Records output `name` of running run `id` as blob `hash` (which must be in the store).
    pub fn set_output(&self, id: &RunId, name: &str, hash: BlobHash) -> StoreResult<()> {
        validate_name("output", name)?;
        if !self.inner.blobs.contains(&hash) {
            return Err(StoreError::MissingBlob {
                hash: hash.to_hex(),
            });
        }
        self.update_run(id, |record| {
            if record.status != RunStatus::Running {
                return Err(StoreError::state(
                    id,
                    format!("is {}; only a running run gets outputs", record.status),
                ));
            }
            record.outputs.insert(name.to_string(), hash);
            Ok(())
        })?;
        Ok(())
    }

    /// Stores `bytes` as a blob and records it as output `name` of running run `id`.
    pub fn put_output(&self, id: &RunId, name: &str, bytes: &[u8]) -> StoreResult<BlobHash> {
        validate_name("output", name)?;
        let hash = self.put_blob(bytes)?;
        self.set_output(id, name, hash)?;
        Ok(hash)
    }

    /// The record of run `id`.
    pub fn get_run(&self, id: &RunId) -> StoreResult<RunRecord> {
        self.try_get_run(id)?
            .ok_or_else(|| StoreError::UnknownRun(id.to_string()))
    }

    /// The record of run `id`, or `None` when there is no such run.
    pub fn try_get_run(&self, id: &RunId) -> StoreResult<Option<RunRecord>> {
        let what = format!("run {id}");
        match self
            .inner
            .runs
            .get(id.as_bytes())
            .db(|| format!("reading {what}"))?
        {
            Some(bytes) => Ok(Some(RunRecord::decode(&bytes, &what)?)),
            None => Ok(None),
        }
    }

    /// The run whose id starts with `prefix` (any case). Errors name an unknown or ambiguous prefix.
    pub fn resolve(&self, prefix: &str) -> StoreResult<RunId> {
        let normalized = normalize_run_prefix(prefix)?;
        let mut matches = Vec::new();
        let mut total = 0usize;
        for key in self.inner.runs.scan_prefix(normalized.as_bytes()).keys() {
            let key = key.db(|| format!("looking up run prefix {prefix}"))?;
            total += 1;
            if matches.len() < 5 {
                matches.push(String::from_utf8_lossy(&key).into_owned());
            }
        }
        match total {
            0 => Err(StoreError::UnknownRun(prefix.to_string())),
            1 => RunId::from_key(matches[0].as_bytes()),
            _ => Err(StoreError::AmbiguousRun {
                prefix: prefix.to_string(),
                matches,
                total,
            }),
        }
    }

    /// Every run record, newest first. A record that cannot be decoded is an `Err` item naming it.
    pub fn runs(&self) -> impl Iterator<Item = StoreResult<RunRecord>> + '_ {
        self.inner.runs.iter().rev().map(|entry| {
            let (key, bytes) = entry.db(|| "listing runs".into())?;
            RunRecord::decode(&bytes, &describe_run_key(&key))
        })
    }

    /// Number of runs.
    pub fn run_count(&self) -> usize {
        self.inner.runs.len()
    }

    /// Finished (`done`) runs of spec `hash`, newest first: the launcher's "already ran" check.
    pub fn done_runs_with_spec(&self, hash: &SpecHash) -> StoreResult<Vec<RunRecord>> {
        let mut found = Vec::new();
        for record in self.runs() {
            let Ok(record) = record else { continue };
            if record.spec_hash == *hash && record.status == RunStatus::Done {
                found.push(record);
            }
        }
        Ok(found)
    }

    fn write_record(&self, record: &RunRecord) -> StoreResult<()> {
        let bytes = record.encode()?;
        self.inner
            .runs
            .insert(record.id.as_bytes(), bytes)
            .db(|| format!("writing run {}", record.id))?;
        Ok(())
    }

    fn update_run(
        &self,
        id: &RunId,
        change: impl FnOnce(&mut RunRecord) -> StoreResult<()>,
    ) -> StoreResult<RunRecord> {
        let _guard = lock(&self.inner.record_lock);
        let mut record = self.get_run(id)?;
        change(&mut record)?;
        self.write_record(&record)?;
        Ok(record)
    }

    fn require_owned(&self, id: &RunId, what: &str) -> StoreResult<()> {
        if lock(&self.inner.owned).contains(id) {
            Ok(())
        } else {
            Err(StoreError::state(
                id,
                format!("{what} only while the run is running in this process"),
            ))
        }
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`, `/etc/hostname`, `$HOSTNAME`, or `unknown`).
pub fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}

fn describe_run_key(key: &[u8]) -> String {
    format!("run {}", String::from_utf8_lossy(key))
}

fn validate_name(role: &str, name: &str) -> StoreResult<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(StoreError::InvalidInput(format!(
            "{role} name {name:?} must be 1 to {MAX_NAME_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Best effort: write buffered metric points so a clean exit keeps them.
        let pending = std::mem::take(self.pending.get_mut().unwrap_or_else(|p| p.into_inner()));
        for (id, series) in pending {
            for (name, buffer) in series {
                if buffer.points.is_empty() {
                    continue;
                }
                let prefix = metrics::series_prefix(&id, &name);
                let seq = buffer.next_seq.or_else(|| {
                    let last = self.metrics.scan_prefix(&prefix).keys().next_back()?.ok()?;
                    metrics::parse_chunk_key(&last).map(|(_, _, s)| s + 1)
                });
                let _ = self.metrics.insert(
                    metrics::chunk_key(&id, &name, seq.unwrap_or(0)),
                    metrics::encode_chunk(&buffer.points),
                );
            }
        }
        let _ = self.db.flush();
    }
}
