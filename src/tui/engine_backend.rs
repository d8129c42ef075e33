//! [`EngineBackend`]: the workbench's [`Backend`] over the engine's socket, so the TUI is one
//! more client: closing it (or losing SSH) never stops a run, and CLI commands keep working
//! beside it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use anyhow::{anyhow, bail, Result};

use super::backend::{
    resolve_learn_config, Backend, BackendInfo, JobId, JobRow, JobState, LearnLaunch, LearnSource,
    Metrics, RerunRequest, RunDetail, RunProgress, RunRow, SynthLaunch,
};
use crate::engine::{Client, Request, Response};
use crate::jobs::learn::LearnJob;
use crate::jobs::sweep::SweepTable;
use crate::learn::{scene_files, SceneFiles};
use crate::model::ModelSource;
use crate::store::{now_ms, BlobHash, BlobStore, RunId, RunKind, RunSpec, RunStatus};

/// A job this client submitted (the engine itself knows runs, not job numbers).
struct Submitted {
    job: JobId,
    run: RunId,
    label: String,
    device: String,
    queued_ms: u64,
}

/// The workbench backend that talks to the store's engine.
pub struct EngineBackend {
    store_dir: PathBuf,
    model: Option<ModelSource>,
    device: String,
    submitted: Mutex<Vec<Submitted>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unexpected(r: Response) -> anyhow::Error {
    match r {
        Response::Error(e) => anyhow!(e),
        Response::AlreadyRan { run } => anyhow!(crate::Error::AlreadyRan { run }),
        other => anyhow!("engine: unexpected reply {other:?}"),
    }
}

impl EngineBackend {
    /// Connects to the engine of `store_dir` (starting it when none answers). `model` is the
    /// default model folder for launches (the caller resolves `--model` / `$MIFO_MODEL`),
    /// `device` the default device.
    pub fn connect(store_dir: PathBuf, model: Option<PathBuf>, device: &str) -> Result<Self> {
        Self::connect_source(store_dir, model.map(ModelSource::folder), device)
    }

    /// [`EngineBackend::connect`] with the default model already resolved (a repo id or a
    /// single file too).
    pub fn connect_source(
        store_dir: PathBuf,
        model: Option<ModelSource>,
        device: &str,
    ) -> Result<Self> {
        Client::connect(&store_dir)?;
        Ok(Self {
            store_dir,
            model,
            device: device.to_string(),
            submitted: Mutex::new(Vec::new()),
        })
    }

    fn request(&self, req: &Request) -> Result<Response> {
        Ok(Client::connect(&self.store_dir)?.request(req)?)
    }

    fn ok(&self, req: &Request) -> Result<()> {
        match self.request(req)? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The model of a launch: the form's (a folder, a single file or a cached repo id), else
    /// the workbench's default.
    fn model_dir(&self, model: Option<PathBuf>) -> Result<ModelSource> {
        if let Some(given) = model {
            return Ok(crate::jobs::model_source(&crate::jobs::ModelFlags::model(
                Some(given),
            ))?);
        }
        let model = self.model.clone().ok_or_else(|| {
            anyhow!("no model folder: start the workbench with --model DIR or set MIFO_MODEL")
        })?;
        if !model.path.exists() {
            bail!("{}: model folder does not exist", model.path.display());
        }
        Ok(model.canonical())
    }

    fn submit(&self, req: Request, label: String, device: String) -> Result<JobId> {
        let run = match self.request(&req)? {
            Response::Queued { run, .. } => run.parse::<RunId>()?,
            other => return Err(unexpected(other)),
        };
        let mut subs = lock(&self.submitted);
        let job = subs.len() as JobId + 1;
        subs.push(Submitted {
            job,
            run,
            label,
            device,
            queued_ms: now_ms(),
        });
        Ok(job)
    }

    /// A run's record and spec, and the model the store knows for it.
    fn spec_of(
        &self,
        id: &RunId,
    ) -> Result<(crate::store::RunRecord, RunSpec, Option<ModelSource>)> {
        let stored = Client::connect(&self.store_dir)?.stored_run(id.as_str())?;
        let known = stored.known_model();
        Ok((stored.record, stored.spec, known))
    }

    /// The workbench's model, else `known` (the one the store noted for a run's model).
    fn model_for_run(&self, known: Option<ModelSource>, id: &RunId) -> Result<ModelSource> {
        match (&self.model, known) {
            (None, Some(dir)) => Ok(dir),
            (None, None) => bail!(
                "no model folder: start the workbench with --model DIR or set MIFO_MODEL (the store knows no folder that still holds the model run {id} used)"
            ),
            (Some(_), _) => self.model_dir(None),
        }
    }

    fn status(&self) -> Result<crate::engine::EngineStatus> {
        match self.request(&Request::Status)? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }
}

fn progress(st: &crate::engine::EngineStatus, id: &RunId) -> Option<RunProgress> {
    st.running_all
        .iter()
        .find(|(r, _, _)| r == id.as_str())
        .and_then(|(_, _, p)| p.as_ref())
        .or_else(|| {
            st.slurm
                .iter()
                .find(|j| j.run == id.as_str())
                .and_then(|j| j.progress.as_ref())
        })
        .map(|(step, total, phase)| RunProgress {
            step: *step,
            total: *total,
            phase: Some(phase.clone()),
        })
}

/// The device a run holds (running), waits for (queued: `auto` or a name, shown `→NAME`),
/// its Slurm job (`slurm:41`), or the device it ran on (its record), else `fallback`.
fn device_of(
    st: &crate::engine::EngineStatus,
    id: &RunId,
    record: Option<&crate::store::RunRecord>,
    fallback: &str,
) -> String {
    if let Some((_, d, _)) = st.running_all.iter().find(|(r, _, _)| r == id.as_str()) {
        return d.clone();
    }
    if let Some((_, want)) = st.waiting.iter().find(|(r, _)| r == id.as_str()) {
        return format!("→{want}");
    }
    if let Some(j) = st.slurm.iter().find(|j| j.run == id.as_str()) {
        return format!("slurm:{}", j.job);
    }
    match record {
        Some(r) if !r.device.is_empty() => r.device.clone(),
        _ => fallback.to_string(),
    }
}

impl Backend for EngineBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: format!("engine {}", self.store_dir.display()),
            jobs_survive_quit: true,
            default_model: self.model.as_ref().map(|m| PathBuf::from(&m.given)),
            default_device: self.device.clone(),
        }
    }

    fn list_runs(&self) -> Result<Vec<RunRow>> {
        let rows = match self.request(&Request::ListSummaries)? {
            Response::Summaries(r) => r,
            other => return Err(unexpected(other)),
        };
        let st = self.status().ok();
        Ok(rows
            .into_iter()
            .map(|r| {
                let progress = st.as_ref().and_then(|s| progress(s, &r.id));
                RunRow {
                    progress,
                    ..RunRow::from(r)
                }
            })
            .collect())
    }

    fn run_detail(&self, id: &RunId, log_tail: usize) -> Result<RunDetail> {
        match self.request(&Request::Detail {
            run: id.to_string(),
        })? {
            Response::Detail {
                record,
                spec_json,
                logs,
                tags,
                ..
            } => {
                let (spec, spec_error) = match spec_json
                    .map_err(|e| e.to_string())
                    .and_then(|j| serde_json::from_str::<RunSpec>(&j).map_err(|e| e.to_string()))
                {
                    Ok(s) => (Some(s), None),
                    Err(e) => (None, Some(e)),
                };
                let mut row = RunRow::from_record(&record, tags);
                row.progress = self.status().ok().and_then(|s| progress(&s, id));
                let start = logs.len().saturating_sub(log_tail);
                Ok(RunDetail {
                    row,
                    spec,
                    spec_error,
                    host: record.host.clone(),
                    error: record.error.clone(),
                    outputs: record.outputs.clone(),
                    log_lines: logs.len(),
                    log_tail: logs[start..].to_vec(),
                })
            }
            other => Err(unexpected(other)),
        }
    }

    fn metrics(&self, id: &RunId) -> Result<Metrics> {
        match self.request(&Request::Metrics {
            run: id.to_string(),
        })? {
            Response::Metrics(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }

    fn blob(&self, hash: &BlobHash) -> Result<Vec<u8>> {
        match self.request(&Request::Blob {
            hash: hash.to_hex(),
        })? {
            Response::Bytes(b) => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    fn launch_learn(&self, l: LearnLaunch) -> Result<JobId> {
        let config = resolve_learn_config(&l.preset, &l.sets)?;
        let model = self.model_dir(l.model.clone())?;
        let (files, scene_dir) = match &l.source {
            LearnSource::Scene(dir) => (scene_files(dir)?, Some(dir.clone())),
            LearnSource::Files { image, masks } => {
                (SceneFiles::new(image.clone(), masks.clone()), None)
            }
        };
        if files.masks.is_empty() {
            bail!("give at least one mask");
        }
        let abs =
            |p: &PathBuf| std::fs::canonicalize(p).map_err(|e| anyhow!("{}: {e}", p.display()));
        let files = SceneFiles {
            image: abs(&files.image)?,
            masks: files.masks.iter().map(abs).collect::<Result<_>>()?,
            world: files.world.as_ref().map(abs).transpose()?,
        };
        let label = format!(
            "learn {} ({}, seed {})",
            crate::jobs::scene_label(&files.image, scene_dir.as_deref()),
            l.preset,
            l.seed
        );
        let job = LearnJob {
            model,
            files,
            scene_dir: scene_dir.map(|d| std::fs::canonicalize(&d).unwrap_or(d)),
            preset: l.preset.clone(),
            config,
            seed: l.seed,
            device: l.device.clone(),
            dtype: l.dtype.clone(),
            allow_overlap: l.allow_overlap,
            rerun: l.rerun,
        };
        self.submit(Request::SubmitLearn(Box::new(job)), label, l.device)
    }

    fn launch_synth(&self, l: SynthLaunch) -> Result<JobId> {
        let (record, spec, known) = self.spec_of(&l.from)?;
        if record.kind != RunKind::Learn || record.status != RunStatus::Done {
            bail!("run {} is not a finished learning run", l.from);
        }
        let model = self.model_for_run(known, &l.from)?;
        let job = super::backend::synth_job(&l, &spec, model, &self.device)?;
        let label = format!("synth from {} (seed {})", &l.from.as_str()[..8], l.seed);
        self.submit(
            Request::SubmitSynth(Box::new(job)),
            label,
            self.device.clone(),
        )
    }

    fn rerun(&self, id: &RunId, request: RerunRequest) -> Result<JobId> {
        let (record, spec, known) = self.spec_of(id)?;
        let model = self.model_for_run(known, id)?;
        let label = format!("re-run {} ({})", &id.as_str()[..8], record.kind.as_str());
        let req = match record.kind {
            RunKind::Learn => {
                let root = std::fs::canonicalize(&self.store_dir)
                    .unwrap_or_else(|_| self.store_dir.clone());
                let blobs = BlobStore::new(root.join("blobs"));
                Request::SubmitLearn(Box::new(crate::jobs::learn::job_from_spec(
                    &spec,
                    &blobs,
                    model,
                    &self.device,
                    &request.sets,
                    request.seed,
                    record.scene.as_deref(),
                )?))
            }
            RunKind::Synth => Request::SubmitSynth(Box::new(crate::jobs::synth::job_from_spec(
                &spec,
                model,
                &self.device,
                &request.sets,
                request.seed,
            )?)),
        };
        self.submit(req, label, self.device.clone())
    }

    fn resume(&self, id: &RunId) -> Result<JobId> {
        let label = format!("resume {}", &id.as_str()[..8]);
        let (_, _, known) = self.spec_of(id)?;
        self.submit(
            Request::ResumeLearn {
                run: id.to_string(),
                model: self.model_for_run(known, id)?,
                device: self.device.clone(),
            },
            label,
            self.device.clone(),
        )
    }

    fn cancel(&self, id: &RunId) -> Result<()> {
        self.ok(&Request::Cancel {
            run: id.to_string(),
        })
    }

    fn cancel_job(&self, job: JobId) -> Result<()> {
        let run = lock(&self.submitted)
            .iter()
            .find(|s| s.job == job)
            .map(|s| s.run.clone())
            .ok_or_else(|| anyhow!("no job {job}"))?;
        self.cancel(&run)
    }

    fn delete(&self, id: &RunId) -> Result<()> {
        self.ok(&Request::Remove {
            run: id.to_string(),
        })
    }

    fn tag(&self, id: &RunId, tag: &str) -> Result<()> {
        self.ok(&Request::Tag {
            run: id.to_string(),
            tag: tag.to_string(),
            remove: false,
        })
    }

    fn untag(&self, id: &RunId, tag: &str) -> Result<()> {
        self.ok(&Request::Tag {
            run: id.to_string(),
            tag: tag.to_string(),
            remove: true,
        })
    }

    fn jobs(&self) -> Result<Vec<JobRow>> {
        let st = self.status()?;
        let records: HashMap<RunId, crate::store::RunRecord> =
            match self.request(&Request::ListRecords)? {
                Response::Records(r) => r.into_iter().map(|(r, _)| (r.id.clone(), r)).collect(),
                other => return Err(unexpected(other)),
            };
        let subs = lock(&self.submitted);
        let mut rows: Vec<JobRow> = subs
            .iter()
            .map(|s| {
                let rec = records.get(&s.run);
                let state = match rec.map(|r| r.status) {
                    Some(RunStatus::Queued) | None => JobState::Queued,
                    Some(RunStatus::Running) => JobState::Running,
                    Some(RunStatus::Failed) => {
                        JobState::Failed(rec.and_then(|r| r.error.clone()).unwrap_or_default())
                    }
                    Some(RunStatus::Cancelled) => JobState::Cancelled,
                    Some(_) => JobState::Finished,
                };
                JobRow {
                    job: s.job,
                    label: s.label.clone(),
                    run: Some(s.run.clone()),
                    state,
                    progress: progress(&st, &s.run),
                    device: device_of(&st, &s.run, rec, &s.device),
                    queued_ms: s.queued_ms,
                    started_ms: rec.and_then(|r| r.started_ms),
                    finished_ms: rec.and_then(|r| r.finished_ms),
                }
            })
            .collect();
        // Runs other clients queued: shown too, with job numbers past ours.
        let ours: Vec<String> = subs.iter().map(|s| s.run.to_string()).collect();
        let others = st
            .running_all
            .iter()
            .map(|(r, _, _)| r)
            .chain(st.queue.iter())
            .chain(st.slurm.iter().map(|j| &j.run))
            .filter(|r| !ours.contains(r));
        for (i, r) in others.enumerate() {
            let id: RunId = r.parse()?;
            let rec = records.get(&id);
            rows.push(JobRow {
                job: 1_000_000 + i as JobId,
                label: format!(
                    "{} {} (another client)",
                    rec.map(|r| r.kind.as_str()).unwrap_or("run"),
                    rec.and_then(|r| r.scene.clone()).unwrap_or_default()
                ),
                state: if st.running_all.iter().any(|(x, _, _)| x == r)
                    || st.slurm.iter().any(|j| &j.run == r && j.state == "RUNNING")
                {
                    JobState::Running
                } else {
                    JobState::Queued
                },
                progress: progress(&st, &id),
                device: device_of(&st, &id, rec, ""),
                run: Some(id),
                queued_ms: rec.map(|r| r.created_ms).unwrap_or_default(),
                started_ms: rec.and_then(|r| r.started_ms),
                finished_ms: None,
            });
        }
        Ok(rows)
    }

    fn sweep_table(&self, name: &str, by: &[String]) -> Result<SweepTable> {
        match self.request(&Request::SweepTable {
            name: name.to_string(),
            by: by.to_vec(),
        })? {
            Response::SweepTable(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }
}
