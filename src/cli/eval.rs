//! `mifo eval`: SIM-C, SIM-D, NSIM-D and CS of finished runs (see [`crate::eval`]), stored with
//! each run as `eval/*` metrics, and the mean tables of tagged runs in the layout of the paper's
//! Tables 2–3.
//!
//! The scores are computed here, in the client, with CLIP and DINO loaded from local folders;
//! the run data come from the engine, and the scores go back to it in one `RecordScores`
//! request, which the engine writes in one store transaction (nothing is written when a run
//! cannot be evaluated).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use serde_json::json;

use crate::engine::{Client, Request, Response};
use crate::error::{Error, Result};
use crate::eval::run::{prepare, PreparedRun, RunSource};
use crate::eval::table::{render, row, TableRow};
use crate::eval::{evaluate, CropMode, Models, Scores, METRIC_PREFIX};
use crate::store::{BlobHash, RunRecord, RunSpec, RunStatus};

pub use crate::eval::SETUP_METRIC;

/// Arguments of `mifo eval`.
#[derive(Args, Debug)]
#[command(
    after_help = "Models are local Hugging Face folders: a CLIPModel (openai/clip-vit-large-patch14) and a DINO ViTModel (facebook/dino-vits16).\n\nExamples:\n  mifo eval 01m8c --clip fixtures/tiny-clip --dino fixtures/tiny-dino\n  mifo synth --suite editability --from 01m8c --model fixtures/tiny-sd21 --tag ours\n  mifo eval --tag ours --clip ~/models/clip-vit-large-patch14 --dino ~/models/dino-vits16"
)]
pub struct EvalArgs {
    /// Runs to evaluate (ids or unique prefixes): synthesis runs, or learning runs (their
    /// preview.png).
    pub runs: Vec<String>,
    /// Evaluate the finished runs with this tag and print the mean tables (repeatable: one
    /// row per tag).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// CLIP folder (a transformers CLIPModel, e.g. openai/clip-vit-large-patch14).
    #[arg(long, env = "MIFO_CLIP", value_name = "DIR")]
    pub clip: Option<PathBuf>,
    /// DINO folder (a transformers ViTModel, e.g. facebook/dino-vits16).
    #[arg(long, env = "MIFO_DINO", value_name = "DIR")]
    pub dino: Option<PathBuf>,
    /// Class word of a placeholder in the SIM-C text, `<vK>=WORD` (repeatable; default: the
    /// learning run's learn.init words; placeholders without one are dropped).
    #[arg(long = "class", value_name = "<vK>=WORD")]
    pub classes: Vec<String>,
    /// How an instance reaches DINO: black outside it and cut to its bounding box padded
    /// square (crop), or black outside it in the whole image (full).
    #[arg(long, value_enum, default_value = "crop")]
    pub region: CropMode,
    /// With --tag: evaluate again runs that already have scores from these models and options.
    #[arg(long)]
    pub force: bool,
    /// Device for CLIP and DINO: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Runs and blobs through the engine (blobs cached: the reference photo of a tag's runs is
/// read once).
pub(crate) struct EngineSource<'a> {
    pub(crate) client: &'a mut Client,
    pub(crate) cache: &'a mut BlobCache,
}

/// Blobs already fetched (cleared past 256 MiB).
#[derive(Default)]
pub(crate) struct BlobCache {
    blobs: HashMap<BlobHash, Vec<u8>>,
    bytes: usize,
}

impl RunSource for EngineSource<'_> {
    fn run(&mut self, run: &str) -> Result<(RunRecord, RunSpec)> {
        let stored = self.client.stored_run(run)?;
        Ok((stored.record, stored.spec))
    }

    fn blob(&mut self, hash: &BlobHash) -> Result<Vec<u8>> {
        if let Some(b) = self.cache.blobs.get(hash) {
            return Ok(b.clone());
        }
        match self.client.request(&Request::Blob {
            hash: hash.to_hex(),
        })? {
            Response::Bytes(b) => {
                if self.cache.bytes + b.len() > 256 << 20 {
                    self.cache.blobs.clear();
                    self.cache.bytes = 0;
                }
                self.cache.bytes += b.len();
                self.cache.blobs.insert(*hash, b.clone());
                Ok(b)
            }
            Response::Error(e) => Err(Error::Input(e)),
            other => Err(Error::Input(format!("engine: unexpected reply {other:?}"))),
        }
    }
}

/// Parses `--class <vK>=WORD` flags.
pub fn parse_classes(flags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for f in flags {
        let (k, v) = f
            .split_once('=')
            .ok_or_else(|| anyhow!("--class {f}: expected <vK>=WORD"))?;
        let (k, v) = (k.trim(), v.trim());
        let valid = k
            .strip_prefix("<v")
            .and_then(|r| r.strip_suffix('>'))
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if !valid || v.is_empty() {
            bail!("--class {f}: expected <vK>=WORD, e.g. <v0>=cup");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn model_folder(
    flag: Option<&Path>,
    name: &str,
    env: &str,
    example: &str,
) -> anyhow::Result<PathBuf> {
    let dir = flag.ok_or_else(|| {
        anyhow!("no {name} model: pass --{} DIR (a local Hugging Face folder such as {example}) or set {env}", name.to_lowercase())
    })?;
    if !dir.is_dir() {
        bail!(
            "--{} {}: no such folder (point it at a local {example} folder)",
            name.to_lowercase(),
            dir.display()
        );
    }
    Ok(dir.to_path_buf())
}

/// The models, loaded from the flags (one-line errors naming the flag and folder).
pub fn load_models(
    clip: Option<&Path>,
    dino: Option<&Path>,
    device: &str,
) -> anyhow::Result<Models> {
    let clip_dir = model_folder(clip, "CLIP", "MIFO_CLIP", "openai/clip-vit-large-patch14")?;
    let dino_dir = model_folder(dino, "DINO", "MIFO_DINO", "facebook/dino-vits16")?;
    let device = crate::model::parse_device(device)?;
    let clip = crate::eval::ClipModel::load(&clip_dir, &device)
        .with_context(|| format!("--clip {}", clip_dir.display()))?;
    let dino = crate::eval::Dino::load(&dino_dir, &device)
        .with_context(|| format!("--dino {}", dino_dir.display()))?;
    Ok(Models { clip, dino })
}

/// The id of the models and options (48 bits of a blake3, exact in an f64).
pub fn setup_id(
    clip: &Path,
    dino: &Path,
    region: CropMode,
    classes: &BTreeMap<String, String>,
) -> anyhow::Result<(f64, String)> {
    let fc = crate::store::model_fingerprint(clip)?;
    let fd = crate::store::model_fingerprint(dino)?;
    let mut text = format!(
        "mifo-eval/1\nclip {}\ndino {}\nregion {}\n",
        fc.to_hex(),
        fd.to_hex(),
        region.as_str()
    );
    for (k, v) in classes {
        text.push_str(&format!("class {k}={v}\n"));
    }
    let h = blake3::hash(text.as_bytes());
    let mut b = [0u8; 8];
    b[2..].copy_from_slice(&h.as_bytes()[..6]);
    let label = format!(
        "CLIP {} ({}), DINO {} ({})",
        clip.display(),
        fc.short(12),
        dino.display(),
        fd.short(12)
    );
    Ok((u64::from_be_bytes(b) as f64, label))
}

fn fmt(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.4}"))
}

/// The per-run text report.
pub fn report(p: &PreparedRun, s: &Scores) -> String {
    let mut out = format!("run {} ({}) \"{}\"\n", p.id, p.kind.as_str(), p.prompt);
    if let Some(t) = &s.text {
        out.push_str(&format!("  SIM-C text  \"{t}\"\n"));
    }
    let width = s
        .samples
        .iter()
        .map(|x| x.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    out.push_str(&format!(
        "  {:<width$}  {:>7}  {:<8}  {:<6}  {:>7}  {:>7}\n",
        "sample", "SIM-C", "instance", "region", "SIM-D", "NSIM-D"
    ));
    for sample in &s.samples {
        if sample.subjects.is_empty() {
            out.push_str(&format!(
                "  {:<width$}  {:>7}\n",
                sample.name,
                fmt(sample.sim_c)
            ));
        }
        for (i, subj) in sample.subjects.iter().enumerate() {
            out.push_str(&format!(
                "  {:<width$}  {:>7}  {:<8}  {:<6}  {:>7}  {:>7}\n",
                if i == 0 { sample.name.as_str() } else { "" },
                if i == 0 {
                    fmt(sample.sim_c)
                } else {
                    String::new()
                },
                subj.name,
                subj.region.as_str(),
                fmt(Some(subj.sim_d)),
                fmt(subj.nsim_d)
            ));
        }
    }
    out.push_str(&format!(
        "  mean: SIM-C {}  SIM-D {}  NSIM-D {}  CS {}\n",
        fmt(s.sim_c),
        fmt(s.sim_d),
        fmt(s.nsim_d),
        fmt(s.cs)
    ));
    for n in &p.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    out
}

fn stored_eval(client: &mut Client, run: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    match client.request(&Request::Metrics { run: run.into() })? {
        Response::Metrics(m) => Ok(m
            .into_iter()
            .filter(|(k, _)| k.starts_with(METRIC_PREFIX))
            .filter_map(|(k, pts)| pts.last().map(|&(_, v)| (k, v)))
            .collect()),
        Response::Error(e) => Err(anyhow!(e)),
        other => Err(anyhow!("engine: unexpected reply {other:?}")),
    }
}

/// Runs `mifo eval`.
pub fn run(args: EvalArgs, store: &Path) -> anyhow::Result<()> {
    if args.runs.is_empty() && args.tags.is_empty() {
        bail!("nothing to evaluate: give RUN ids or --tag TAG");
    }
    let classes = parse_classes(&args.classes)?;
    if !store.join("db").is_dir() {
        bail!(
            "{}: no run store here (nothing has run yet, or pass --store DIR / set MIFO_STORE)",
            store.display()
        );
    }
    let models = load_models(args.clip.as_deref(), args.dino.as_deref(), &args.device)?;
    let (setup, setup_label) =
        setup_id(models.clip.dir(), models.dino.dir(), args.region, &classes)?;
    let mut client = Client::connect(store)?;

    // What to evaluate: the named runs, then every run of each tag.
    let mut targets: Vec<(String, bool)> = args.runs.iter().map(|r| (r.clone(), true)).collect();
    let mut tag_runs: Vec<(String, Vec<String>)> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    if !args.tags.is_empty() {
        let Response::Summaries(all) = client.request(&Request::ListSummaries)? else {
            bail!("engine: unexpected reply to a run listing");
        };
        for tag in &args.tags {
            let mut ids = Vec::new();
            // Oldest first: the order the suite queued them in.
            for s in all.iter().rev().filter(|s| s.tags.contains(tag)) {
                if s.status != RunStatus::Done {
                    skipped.push(format!("run {} ({tag}) is {}: skipped", s.id, s.status));
                    continue;
                }
                ids.push(s.id.to_string());
            }
            if ids.is_empty() && !skipped.iter().any(|l| l.contains(&format!("({tag})"))) {
                bail!("--tag {tag}: no run has this tag");
            }
            for id in &ids {
                if !targets.iter().any(|(t, _)| t == id) {
                    targets.push((id.clone(), false));
                }
            }
            tag_runs.push((tag.clone(), ids));
        }
    }

    let mut results = Vec::new();
    let mut reused = 0usize;
    let mut cache = BlobCache::default();
    for (run, explicit) in &targets {
        if !explicit && !args.force {
            let stored = stored_eval(&mut client, run)?;
            if stored.get(SETUP_METRIC) == Some(&setup) {
                reused += 1;
                results.push(json!({"id": run, "reused": true, "metrics": stored}));
                continue;
            }
        }
        let prepared = {
            let mut src = EngineSource {
                client: &mut client,
                cache: &mut cache,
            };
            prepare(&mut src, run, &classes).with_context(|| format!("run {run}"))?
        };
        let scores = evaluate(&prepared.input, &models, args.region)
            .with_context(|| format!("run {}", prepared.id))?;
        let mut metrics = scores.metrics();
        if metrics.is_empty() {
            bail!("run {}: nothing could be scored", prepared.id);
        }
        metrics.push((SETUP_METRIC.to_string(), setup));
        let note = format!(
            "eval: SIM-C text {:?}; {setup_label}; regions {}{}",
            scores.text.clone().unwrap_or_default(),
            args.region.as_str(),
            prepared
                .notes
                .iter()
                .map(|n| format!("; {n}"))
                .collect::<String>()
        );
        client.record_scores(&prepared.id.to_string(), metrics.clone(), note)?;
        if args.json {
            // Reported in the JSON document below.
        } else if *explicit {
            print!("{}", report(&prepared, &scores));
        } else {
            println!(
                "run {}  {}  \"{}\"",
                prepared.id,
                crate::eval::table::headline(&metrics.iter().cloned().collect())
                    .unwrap_or_default(),
                prepared.prompt
            );
        }
        results.push(json!({
            "id": prepared.id.to_string(),
            "kind": prepared.kind.as_str(),
            "prompt": prepared.prompt,
            "learned": prepared.learned.as_ref().map(ToString::to_string),
            "scores": scores,
            "metrics": metrics.iter().cloned().collect::<BTreeMap<_, _>>(),
            "notes": prepared.notes,
        }));
    }

    let mut rows: Vec<TableRow> = Vec::new();
    for (tag, ids) in &tag_runs {
        let mut per_run = Vec::new();
        for id in ids {
            per_run.push(stored_eval(&mut client, id)?);
        }
        rows.push(row(tag, &per_run));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "setup": setup_label,
                "region": args.region.as_str(),
                "runs": results,
                "skipped": skipped,
                "tables": rows,
            }))?
        );
        return Ok(());
    }
    for s in &skipped {
        eprintln!("{s}");
    }
    if reused > 0 {
        eprintln!(
            "{reused} tagged run(s) already had scores from these models and options: reused (--force evaluates them again)"
        );
    }
    if !rows.is_empty() {
        println!();
        print!("{}", render(&rows));
        println!("({setup_label}; regions {})", args.region.as_str());
    }
    Ok(())
}
