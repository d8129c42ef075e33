//! A fake workbench backend with synthetic runs, metrics, images and jobs, recording every
//! change it is asked for.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::sync::Mutex;

use anyhow::{anyhow, Result};
use image::{GrayImage, ImageFormat, Luma, Rgb, RgbImage};
use mifo::jobs::sweep::{flat_config, table_of, SweepRun, SweepTable};
use mifo::learn::LearnConfig;
use mifo::store::{BlobHash, Digest, RunId, RunKind, RunSpec, RunStatus};
use mifo::tui::backend::{
    Backend, BackendInfo, JobId, JobRow, JobState, LearnLaunch, Metrics, RerunRequest, RunDetail,
    RunProgress, RunRow, SynthLaunch,
};

/// "Now" in every test (2025-06-15T15:06:40Z).
pub const NOW: u64 = 1_750_000_000_000;

fn png(img: image::DynamicImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A 48×32 gradient scene.
pub fn scene_png() -> Vec<u8> {
    let img = RgbImage::from_fn(48, 32, |x, y| Rgb([(x * 5) as u8, (y * 7) as u8, 120]));
    png(img.into())
}

/// A mask with the rectangle `x0..x1 × y0..y1` set.
pub fn mask_png(x0: u32, x1: u32, y0: u32, y1: u32) -> Vec<u8> {
    let img = GrayImage::from_fn(48, 32, |x, y| {
        Luma([if (x0..x1).contains(&x) && (y0..y1).contains(&y) {
            255
        } else {
            0
        }])
    });
    png(img.into())
}

/// A solid output image.
pub fn output_png(r: u8, g: u8, b: u8) -> Vec<u8> {
    png(RgbImage::from_pixel(32, 32, Rgb([r, g, b])).into())
}

/// One synthetic run.
#[derive(Clone)]
pub struct FakeRun {
    pub detail: RunDetail,
    pub metrics: Metrics,
}

/// The fake backend.
pub struct FakeBackend {
    pub runs: Mutex<Vec<FakeRun>>,
    pub blobs: HashMap<BlobHash, Vec<u8>>,
    pub jobs: Mutex<Vec<JobRow>>,
    /// Every change asked for, as text (`tag 0j5… best`, `delete …`).
    pub calls: Mutex<Vec<String>>,
    /// Launches asked for.
    pub launches: Mutex<Vec<LearnLaunch>>,
    /// Re-runs asked for.
    pub reruns: Mutex<Vec<(RunId, RerunRequest)>>,
    pub survive_quit: bool,
}

/// Loss curves over `steps` steps in three phases (20% reward, 50% penalty, rest dreambooth).
pub fn curves(steps: u64, scale: f64) -> Metrics {
    let mut m: Metrics = BTreeMap::new();
    let phase = |s: u64| {
        if s < steps / 5 {
            0.0
        } else if s < steps * 7 / 10 {
            1.0
        } else {
            2.0
        }
    };
    for s in 0..steps {
        let t = s as f64;
        let rec = scale * (0.02 + 0.3 * (-t / 15.0).exp() + 0.01 * ((t * 1.7).sin()));
        let attn = scale * (0.05 * (-t / 25.0).exp() + 0.004);
        m.entry("loss/rec".into()).or_default().push((s, rec));
        m.entry("loss/attn".into()).or_default().push((s, attn));
        m.entry("loss/total".into())
            .or_default()
            .push((s, rec + attn));
        m.entry("lr".into()).or_default().push((s, 0.005));
        m.entry("phase".into()).or_default().push((s, phase(s)));
        m.entry("leak/<v0>".into())
            .or_default()
            .push((s, 0.3 * (-t / 30.0).exp()));
    }
    m
}

fn learn_config(lr: f64, penalty: u64) -> serde_json::Value {
    let cfg = LearnConfig {
        lr,
        penalty_steps: penalty,
        ..LearnConfig::paper()
    };
    serde_json::json!({"preset": "paper", "dtype": "f32", "learn": cfg})
}

impl FakeBackend {
    /// Six runs: done (two, one a re-run of the other), running, failed, queued, synth.
    pub fn new() -> Self {
        let image = scene_png();
        let masks = [mask_png(4, 20, 6, 26), mask_png(26, 44, 4, 28)];
        let outs = [
            output_png(200, 40, 40),
            output_png(40, 200, 40),
            output_png(40, 40, 200),
        ];
        let mut blobs = HashMap::new();
        let mut put = |b: &Vec<u8>| {
            let h = Digest::of(b);
            blobs.insert(h, b.clone());
            h
        };
        let image_h = put(&image);
        let mask_h: Vec<BlobHash> = masks.iter().map(&mut put).collect();
        let out_h: Vec<BlobHash> = outs.iter().map(&mut put).collect();
        let embeddings = Digest::of(b"embeddings");
        let mut inputs = BTreeMap::new();
        inputs.insert("image".to_string(), image_h);
        inputs.insert("mask0".to_string(), mask_h[0]);
        inputs.insert("mask1".to_string(), mask_h[1]);

        struct Def {
            minutes_ago: u64,
            kind: RunKind,
            status: RunStatus,
            scene: &'static str,
            lr: f64,
            penalty: u64,
            seed: u64,
            tags: &'static [&'static str],
            steps: u64,
            outputs: usize,
            rerun_of: Option<usize>,
            parent: Option<usize>,
        }
        let defs = [
            Def {
                minutes_ago: 300,
                kind: RunKind::Learn,
                status: RunStatus::Done,
                scene: "coffee",
                lr: 0.005,
                penalty: 600,
                seed: 7,
                tags: &["baseline"],
                steps: 60,
                outputs: 2,
                rerun_of: None,
                parent: None,
            },
            Def {
                minutes_ago: 240,
                kind: RunKind::Learn,
                status: RunStatus::Done,
                scene: "coffee",
                lr: 0.005,
                penalty: 600,
                seed: 7,
                tags: &[],
                steps: 60,
                outputs: 2,
                rerun_of: Some(0),
                parent: None,
            },
            Def {
                minutes_ago: 120,
                kind: RunKind::Learn,
                status: RunStatus::Done,
                scene: "coffee",
                lr: 0.001,
                penalty: 300,
                seed: 11,
                tags: &["best"],
                steps: 60,
                outputs: 3,
                rerun_of: None,
                parent: None,
            },
            Def {
                minutes_ago: 60,
                kind: RunKind::Learn,
                status: RunStatus::Failed,
                scene: "coins",
                lr: 0.05,
                penalty: 600,
                seed: 3,
                tags: &[],
                steps: 12,
                outputs: 0,
                rerun_of: None,
                parent: None,
            },
            Def {
                minutes_ago: 30,
                kind: RunKind::Synth,
                status: RunStatus::Done,
                scene: "coffee",
                lr: 0.005,
                penalty: 600,
                seed: 5,
                tags: &[],
                steps: 10,
                outputs: 1,
                rerun_of: None,
                parent: Some(2),
            },
            Def {
                minutes_ago: 5,
                kind: RunKind::Learn,
                status: RunStatus::Running,
                scene: "coins",
                lr: 0.002,
                penalty: 600,
                seed: 21,
                tags: &[],
                steps: 40,
                outputs: 0,
                rerun_of: None,
                parent: None,
            },
            Def {
                minutes_ago: 1,
                kind: RunKind::Learn,
                status: RunStatus::Queued,
                scene: "coffee",
                lr: 0.005,
                penalty: 900,
                seed: 99,
                tags: &[],
                steps: 0,
                outputs: 0,
                rerun_of: None,
                parent: None,
            },
        ];
        let mut runs: Vec<FakeRun> = Vec::new();
        let mut ids: Vec<RunId> = Vec::new();
        for (i, d) in defs.iter().enumerate() {
            let created = NOW - d.minutes_ago * 60_000;
            let id = RunId::from_parts(created, 1000 + i as u32);
            ids.push(id.clone());
            let config = match d.kind {
                RunKind::Learn => learn_config(d.lr, d.penalty),
                RunKind::Synth => {
                    serde_json::json!({"synth": {"prompt": "a photo of <v0> and <v1> on a beach", "steps": 50, "guidance": 7.5}})
                }
            };
            let spec = RunSpec {
                kind: d.kind,
                config,
                seed: d.seed,
                inputs: inputs.clone(),
                parent: d.parent.map(|p| ids[p].clone()),
                model_fingerprint: Digest::of(b"tiny"),
                code_version: "mifo 0.1.0".into(),
            };
            let spec_hash = spec.spec_hash().unwrap();
            let mut outputs = BTreeMap::new();
            let names = ["preview.png", "attn/<v0>.png", "attn/<v1>.png"];
            for (k, name) in names.iter().take(d.outputs).enumerate() {
                outputs.insert(name.to_string(), out_h[k]);
            }
            if d.kind == RunKind::Learn && d.outputs > 0 {
                outputs.insert("embeddings".into(), embeddings);
            }
            let metrics = if d.steps > 0 {
                curves(d.steps, 1.0 + i as f64 * 0.1)
            } else {
                BTreeMap::new()
            };
            let mut deltas = Vec::new();
            if d.lr != 0.005 {
                deltas.push(("learn.lr".to_string(), d.lr.to_string()));
            }
            if d.penalty != 600 {
                deltas.push(("learn.penalty_steps".to_string(), d.penalty.to_string()));
            }
            let final_loss = metrics
                .get("loss/total")
                .and_then(|p| p.last())
                .map(|p| p.1);
            let row = RunRow {
                id: id.clone(),
                kind: d.kind,
                status: d.status,
                created_ms: created,
                started_ms: (d.status != RunStatus::Queued).then_some(created + 1000),
                finished_ms: d.status.is_final().then_some(created + 61_000),
                scene: Some(d.scene.into()),
                parent: d.parent.map(|p| ids[p].clone()),
                rerun_of: d.rerun_of.map(|p| ids[p].clone()),
                rerun_identical: d.rerun_of.map(|_| true),
                spec_hash,
                config_deltas: deltas,
                final_loss: if d.status.is_final() {
                    final_loss
                } else {
                    None
                },
                tags: d.tags.iter().map(|t| t.to_string()).collect(),
                progress: (d.status == RunStatus::Running).then(|| RunProgress {
                    step: 40,
                    total: 1200,
                    phase: Some("reward".into()),
                }),
                device: if d.status == RunStatus::Queued {
                    String::new()
                } else {
                    "cpu".into()
                },
            };
            let log_tail: Vec<String> = (0..d.steps.min(30))
                .map(|s| format!("step {s}/{} loss {:.4}", d.steps, 0.3 / (s + 1) as f64))
                .collect();
            runs.push(FakeRun {
                detail: RunDetail {
                    row,
                    spec: Some(spec),
                    spec_error: None,
                    host: "gpu-box".into(),
                    error: (d.status == RunStatus::Failed)
                        .then(|| "NaN loss at step 12".to_string()),
                    outputs,
                    log_lines: log_tail.len(),
                    log_tail,
                },
                metrics,
            });
        }
        runs.reverse(); // newest first
        let jobs = vec![
            JobRow {
                job: 1,
                label: "learn coins (paper, seed 21)".into(),
                run: Some(runs[1].detail.row.id.clone()),
                state: JobState::Running,
                progress: Some(RunProgress {
                    step: 40,
                    total: 1200,
                    phase: Some("reward".into()),
                }),
                device: "cpu".into(),
                queued_ms: NOW - 300_000,
                started_ms: Some(NOW - 290_000),
                finished_ms: None,
            },
            JobRow {
                job: 2,
                label: "learn coffee (paper, seed 99)".into(),
                run: Some(runs[0].detail.row.id.clone()),
                state: JobState::Queued,
                progress: None,
                device: "cpu".into(),
                queued_ms: NOW - 60_000,
                started_ms: None,
                finished_ms: None,
            },
        ];
        FakeBackend {
            runs: Mutex::new(runs),
            blobs,
            jobs: Mutex::new(jobs),
            calls: Mutex::new(Vec::new()),
            launches: Mutex::new(Vec::new()),
            reruns: Mutex::new(Vec::new()),
            survive_quit: true,
        }
    }

    /// [`FakeBackend::new`] plus, newest, a sweep tagged `lr-sweep` of four done learning runs
    /// (`learn.lr` 0.002 / 0.004 × seed 0 / 1) whose final loss, SIM-D and CS order them three
    /// different ways: by loss b a d c, by SIM-D (higher is better) c a d b, by CS b c a d
    /// (a = lr 0.002 seed 0, b = 0.002 / 1, c = 0.004 / 0, d = 0.004 / 1).
    pub fn with_sweep() -> Self {
        let backend = FakeBackend::new();
        let inputs = backend.runs.lock().unwrap()[2]
            .detail
            .spec
            .as_ref()
            .unwrap()
            .inputs
            .clone();
        // (lr, seed, final loss, SIM-D, CS)
        let defs = [
            (0.002, 0, 0.031, 0.71, 0.020),
            (0.002, 1, 0.027, 0.64, 0.031),
            (0.004, 0, 0.045, 0.75, 0.025),
            (0.004, 1, 0.038, 0.69, 0.018),
        ];
        let mut runs = backend.runs.lock().unwrap();
        for (i, &(lr, seed, loss, sim_d, cs)) in defs.iter().enumerate() {
            let created = NOW - (40 - i as u64) * 1000;
            let id = RunId::from_parts(created, 2000 + i as u32);
            let spec = RunSpec {
                kind: RunKind::Learn,
                config: learn_config(lr, 600),
                seed,
                inputs: inputs.clone(),
                parent: None,
                model_fingerprint: Digest::of(b"tiny"),
                code_version: "mifo 0.1.0".into(),
            };
            let mut metrics: Metrics = BTreeMap::new();
            metrics.insert("loss/total".into(), vec![(0, 0.3), (10, 0.1), (20, loss)]);
            metrics.insert("loss/rec".into(), vec![(0, 0.2), (20, loss * 0.8)]);
            metrics.insert("eval/sim_d".into(), vec![(0, sim_d)]);
            metrics.insert("eval/cs".into(), vec![(0, cs)]);
            let row = RunRow {
                id: id.clone(),
                kind: RunKind::Learn,
                status: RunStatus::Done,
                created_ms: created,
                started_ms: Some(created + 100),
                finished_ms: Some(created + 30_000),
                scene: Some("coffee".into()),
                parent: None,
                rerun_of: None,
                rerun_identical: None,
                spec_hash: spec.spec_hash().unwrap(),
                config_deltas: vec![("learn.lr".into(), lr.to_string())],
                final_loss: Some(loss),
                tags: vec!["lr-sweep".into()],
                progress: None,
                device: "cpu".into(),
            };
            runs.insert(
                0,
                FakeRun {
                    detail: RunDetail {
                        row,
                        spec: Some(spec),
                        spec_error: None,
                        host: "gpu-box".into(),
                        error: None,
                        outputs: BTreeMap::new(),
                        log_tail: Vec::new(),
                        log_lines: 0,
                    },
                    metrics,
                },
            );
        }
        drop(runs);
        backend
    }

    /// The id of the `i`-th run, newest first.
    pub fn id(&self, i: usize) -> RunId {
        self.runs.lock().unwrap()[i].detail.row.id.clone()
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn find(&self, id: &RunId) -> Result<FakeRun> {
        self.runs
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.detail.row.id == *id)
            .cloned()
            .ok_or_else(|| anyhow!("unknown run {id}"))
    }

    fn call(&self, text: String) {
        self.calls.lock().unwrap().push(text);
    }
}

impl Backend for FakeBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "fake store".into(),
            jobs_survive_quit: self.survive_quit,
            default_model: None,
            default_device: "cpu".into(),
        }
    }

    fn list_runs(&self) -> Result<Vec<RunRow>> {
        Ok(self
            .runs
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.detail.row.clone())
            .collect())
    }

    fn run_detail(&self, id: &RunId, log_tail: usize) -> Result<RunDetail> {
        let mut d = self.find(id)?.detail;
        let n = d.log_tail.len();
        d.log_tail = d.log_tail[n.saturating_sub(log_tail)..].to_vec();
        Ok(d)
    }

    fn metrics(&self, id: &RunId) -> Result<Metrics> {
        Ok(self.find(id)?.metrics)
    }

    fn blob(&self, hash: &BlobHash) -> Result<Vec<u8>> {
        self.blobs
            .get(hash)
            .cloned()
            .ok_or_else(|| anyhow!("blob {} is not in the store", hash.short(8)))
    }

    fn launch_learn(&self, launch: LearnLaunch) -> Result<JobId> {
        self.call(format!("launch {:?} seed {}", launch.sets, launch.seed));
        self.launches.lock().unwrap().push(launch);
        Ok(3)
    }

    fn launch_synth(&self, launch: SynthLaunch) -> Result<JobId> {
        self.call(format!(
            "synth {} {:?} {:?} seed {} preset {} method {}",
            launch.from, launch.prompt, launch.boxes, launch.seed, launch.preset, launch.method
        ));
        Ok(6)
    }

    fn rerun(&self, id: &RunId, request: RerunRequest) -> Result<JobId> {
        self.call(format!("rerun {id} {:?} {:?}", request.sets, request.seed));
        self.reruns.lock().unwrap().push((id.clone(), request));
        Ok(4)
    }

    fn resume(&self, id: &RunId) -> Result<JobId> {
        self.call(format!("resume {id}"));
        Ok(5)
    }

    fn cancel(&self, id: &RunId) -> Result<()> {
        self.call(format!("cancel {id}"));
        Ok(())
    }

    fn cancel_job(&self, job: JobId) -> Result<()> {
        self.call(format!("cancel job {job}"));
        Ok(())
    }

    fn delete(&self, id: &RunId) -> Result<()> {
        self.call(format!("delete {id}"));
        self.runs.lock().unwrap().retain(|r| r.detail.row.id != *id);
        Ok(())
    }

    fn tag(&self, id: &RunId, tag: &str) -> Result<()> {
        self.call(format!("tag {id} {tag}"));
        for r in self.runs.lock().unwrap().iter_mut() {
            if r.detail.row.id == *id {
                r.detail.row.tags.push(tag.to_string());
            }
        }
        Ok(())
    }

    fn untag(&self, id: &RunId, tag: &str) -> Result<()> {
        self.call(format!("untag {id} {tag}"));
        for r in self.runs.lock().unwrap().iter_mut() {
            if r.detail.row.id == *id {
                r.detail.row.tags.retain(|t| t != tag);
            }
        }
        Ok(())
    }

    fn jobs(&self) -> Result<Vec<JobRow>> {
        Ok(self.jobs.lock().unwrap().clone())
    }

    fn sweep_table(&self, name: &str, by: &[String]) -> Result<SweepTable> {
        self.call(format!("sweep {name} {by:?}"));
        let runs: Vec<SweepRun> = self
            .runs
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.detail.row.tags.iter().any(|t| t == name))
            .map(|r| SweepRun {
                run: r.detail.row.id.to_string(),
                kind: r.detail.row.kind,
                status: r.detail.row.status.as_str().to_string(),
                config: r.detail.spec.as_ref().map(flat_config).unwrap_or_default(),
                finals: r
                    .metrics
                    .iter()
                    .filter_map(|(m, p)| Some((m.clone(), p.last()?.1)))
                    .collect(),
            })
            .collect();
        Ok(table_of(name, &runs, by)?)
    }
}
