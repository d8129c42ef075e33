//! `mifo synth`: draw learned instances (or plain words) into a new scene, each in its box.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::engine::Request;
use crate::jobs::synth::SynthJob;
use crate::synth::SynthConfig;

/// Arguments of `mifo synth`.
#[derive(Args, Debug)]
#[command(
    after_help = "Boxes are normalised x0,y0,x1,y1 with the origin at the top left.\n\nExamples:\n  mifo synth --from 01m8c --model fixtures/tiny-sd21 --prompt \"a photo of <v0> and <v1> on the beach\" \\\n      --box \"<v0>=0.05,0.3,0.45,0.9\" --box \"<v1>=0.55,0.3,0.95,0.9\" --samples 2 --seed 1\n  mifo synth --model ~/sd21-base --prompt \"a dog and a cat in a park\" --box \"dog=0,0.4,0.5,1\" --box \"cat=0.5,0.4,1,1\"\n  mifo synth --suite editability --from 01m8c --model fixtures/tiny-sd21 --tag ours   (then: mifo eval --tag ours)"
)]
pub struct SynthArgs {
    /// The finished learning run (id or unique prefix) whose tokens <v0>, <v1>, … to use.
    #[arg(long)]
    pub from: Option<String>,
    /// The model: a diffusers folder, a single-file .safetensors checkpoint or a Hugging Face
    /// repo id in the local cache [env: MIFO_MODEL]. With --from it must hold the weights the
    /// run learned on, and may be left out: the store remembers where they were.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `--revision` / `--model-config` for --model.
    #[command(flatten)]
    pub source: crate::cli::SourceArgs,
    /// The prompt; name each boxed subject in it (`<v0>`, or a word like `dog`).
    #[arg(long, required_unless_present = "suite", conflicts_with = "suite")]
    pub prompt: Option<String>,
    /// One box per subject: `SUBJECT=x0,y0,x1,y1` (repeatable). With --suite: replaces the
    /// suite's default box of that subject.
    #[arg(long = "box", value_name = "SUBJECT=x0,y0,x1,y1")]
    pub boxes: Vec<String>,
    /// Number of images (sample k starts from seed + k).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Seed (default: random, printed and stored; with --suite: 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run a prompt suite from the --from run instead of one prompt: `editability` (the
    /// paper's Table 4 templates for each instance and for all together, one run per prompt,
    /// same seed, all tagged with --tag).
    #[arg(long, value_name = "NAME", requires = "from")]
    pub suite: Option<String>,
    /// With --suite: the tag of its runs (default `<suite>-<learning run id>`), for
    /// `mifo eval --tag`.
    #[arg(long, requires = "suite")]
    pub tag: Option<String>,
    /// Configuration preset: `paper` or `official`.
    #[arg(long, default_value = "paper")]
    pub preset: String,
    /// A TOML file whose [synth] table overrides the preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. --set synth.steps=30 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Device: auto (a free device of the engine's pool: its GPUs), cpu, cuda or cuda:N (the
    /// run waits for that one). Default: auto in a CUDA build, cpu otherwise.
    #[arg(long, default_value = crate::jobs::pool::default_device())]
    pub device: String,
    /// Weight dtype: f32, tf32 (f32 with TF32 matrix products), f16 or bf16; tf32 and bf16 on
    /// CUDA only.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Run again even though a finished run has exactly this spec.
    #[arg(long)]
    pub rerun: bool,
    /// Print the finished run's record as one JSON document.
    #[arg(long)]
    pub json: bool,
    /// Queue the run and return at once with its id.
    #[arg(long)]
    pub detach: bool,
}

/// Resolves the config: preset, then --config, then --set.
pub fn resolve_config(args: &SynthArgs) -> anyhow::Result<SynthConfig> {
    let base = SynthConfig::preset(&args.preset)?;
    let cfg = crate::config::resolve(&base, "synth", args.config.as_deref(), &args.sets)?;
    cfg.check()?;
    Ok(cfg)
}

/// Runs `mifo synth`.
pub fn run(args: SynthArgs, store: &Path) -> anyhow::Result<()> {
    if args.suite.is_some() {
        return run_suite(args, store);
    }
    let job = build_job(&args, store)?;
    if !args.json {
        eprintln!(
            "synthesising {} sample(s), seed {}, {} steps",
            job.samples, job.seed, job.config.steps
        );
    }
    crate::cli::engine::submit_and_follow(
        store,
        &Request::SubmitSynth(Box::new(job)),
        args.json,
        args.detach,
    )
}

/// The job `mifo synth ARGS` submits (one prompt, not a suite): config resolved and checked,
/// boxes parsed, the model resolved (for --from, the one the store remembers unless given),
/// the seed drawn when not given.
pub fn build_job(args: &SynthArgs, store: &Path) -> anyhow::Result<SynthJob> {
    let prompt = args
        .prompt
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--prompt is required"))?;
    let config = resolve_config(args)?;
    for b in &args.boxes {
        crate::synth::parse_box(b)?;
    }
    if args.from.is_some() && !store.join("db").is_dir() {
        anyhow::bail!("--from: {} holds no runs yet", store.display());
    }
    let flags = args.source.flags(args.model.clone());
    let model = match &args.from {
        Some(from) if !flags.named() => {
            let known = crate::cli::engine::known_model(store, from)?;
            learned_model(&flags, known, from, args.json)?
        }
        _ => crate::jobs::model_source(&flags)?,
    };
    let seed = args
        .seed
        .unwrap_or_else(|| u64::from(rand::random::<u32>()));
    Ok(SynthJob {
        from: args.from.clone(),
        model,
        prompt,
        boxes: args.boxes.clone(),
        samples: args.samples,
        seed,
        preset: args.preset.clone(),
        config,
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        rerun: args.rerun,
    })
}

/// [`crate::jobs::model_for_run`], saying so when the model came from the store.
fn learned_model(
    flags: &crate::jobs::ModelFlags,
    known: Option<crate::model::ModelSource>,
    from: &str,
    quiet: bool,
) -> anyhow::Result<crate::model::ModelSource> {
    let from_store = !flags.named();
    let model = crate::jobs::model_for_run(flags, known, from)?;
    if from_store && !quiet {
        eprintln!(
            "model: {} (the model run {from} learned on)",
            model.path.display()
        );
    }
    Ok(model)
}

/// `mifo synth --suite NAME --from RUN`: one synthesis run per prompt of the suite (see
/// [`crate::eval::suite`]), all with the same seed and samples, each tagged; then follows them.
/// A prompt whose exact spec already ran is not run again: the earlier run is tagged instead.
fn run_suite(args: SynthArgs, store: &Path) -> anyhow::Result<()> {
    use crate::engine::{Client, Response};
    use anyhow::{anyhow, bail};
    let suite = args.suite.clone().unwrap_or_default();
    let from = args
        .from
        .clone()
        .ok_or_else(|| anyhow!("--suite needs --from RUN (a finished learning run)"))?;
    let config = resolve_config(&args)?;
    let mut user_boxes = std::collections::BTreeMap::new();
    for b in &args.boxes {
        let spec = crate::synth::parse_box(b)?;
        user_boxes.insert(spec.subject.clone(), b.clone());
    }
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if !store.join("db").is_dir() {
        bail!("--from: {} holds no runs yet", store.display());
    }
    let mut client = Client::connect(store)?;
    let stored = client
        .stored_run(&from)
        .map_err(|e| anyhow!("--from {from}: {e}"))?;
    let known = stored.known_model();
    let crate::engine::StoredRun { record, spec, .. } = stored;
    let model = learned_model(
        &args.source.flags(args.model.clone()),
        known,
        &from,
        args.json,
    )?;
    if record.kind != crate::store::RunKind::Learn || record.status != crate::store::RunStatus::Done
    {
        bail!(
            "--from {from}: run {} is a {} {} run; the suite needs a finished learning run",
            record.id,
            record.status,
            record.kind
        );
    }
    let instances = spec.inputs.keys().filter(|k| k.starts_with("mask")).count();
    let prompts = crate::eval::suite::prompts(&suite, instances)?;
    for subject in user_boxes.keys() {
        if !prompts.iter().any(|p| p.subjects.contains(subject)) {
            bail!(
                "--box {subject}: the suite has no such subject (it draws <v0>…<v{}>)",
                instances - 1
            );
        }
    }
    let tag = args
        .tag
        .clone()
        .unwrap_or_else(|| crate::eval::suite::default_tag(&suite, record.id.as_str()));
    crate::store::validate_tag(&tag).map_err(|e| anyhow!("--tag: {e}"))?;
    let seed = args.seed.unwrap_or(0);
    let jobs: Vec<SynthJob> = prompts
        .iter()
        .map(|p| {
            let defaults = crate::eval::suite::default_boxes(&p.subjects);
            let boxes = p
                .subjects
                .iter()
                .zip(defaults)
                .map(|(s, d)| user_boxes.get(s).cloned().unwrap_or(d))
                .collect();
            SynthJob {
                from: Some(record.id.to_string()),
                model: model.clone(),
                prompt: p.prompt.clone(),
                boxes,
                samples: args.samples,
                seed,
                preset: args.preset.clone(),
                config: config.clone(),
                device: args.device.clone(),
                dtype: args.dtype.clone(),
                rerun: args.rerun,
            }
        })
        .collect();
    if !args.json {
        eprintln!(
            "suite {suite}: {} runs from {} ({instances} instances), seed {seed}, {} sample(s) each, tag {tag}",
            jobs.len(),
            record.id,
            args.samples
        );
    }
    let mut runs: Vec<(String, String, bool)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let submitted =
            crate::cli::engine::submit(store, &Request::SubmitSynth(Box::new(job.clone())));
        let (id, queued) = match submitted {
            Ok(crate::cli::engine::Submitted::Queued(id)) => (id, true),
            Ok(crate::cli::engine::Submitted::AlreadyRan(id)) => (id, false),
            Err(e) => {
                let done: Vec<&str> = runs.iter().map(|(id, _, _)| id.as_str()).collect();
                if done.is_empty() {
                    return Err(e);
                }
                bail!(
                    "{e} (prompt {} of {}; runs already queued and tagged {tag}: {})",
                    i + 1,
                    jobs.len(),
                    done.join(" ")
                );
            }
        };
        match client.request(&Request::Tag {
            run: id.clone(),
            tag: tag.clone(),
            remove: false,
        })? {
            Response::Ok => {}
            Response::Error(e) => bail!("tagging run {id}: {e}"),
            other => bail!("engine: unexpected reply {other:?}"),
        }
        if !args.json {
            eprintln!(
                "[{}/{}] {} {id}: {}",
                i + 1,
                jobs.len(),
                if queued { "queued" } else { "already ran as" },
                job.prompt
            );
        }
        runs.push((id, job.prompt.clone(), queued));
    }
    let mut statuses = Vec::new();
    let mut failed = 0;
    for (i, (id, prompt, queued)) in runs.iter().enumerate() {
        let status = if !queued {
            "done".to_string()
        } else if args.detach {
            "queued".to_string()
        } else {
            let s = crate::cli::engine::follow(store, id, true)?;
            if !args.json {
                eprintln!("[{}/{}] run {id} {s}", i + 1, runs.len());
            }
            s
        };
        if status != "done" && status != "queued" {
            failed += 1;
        }
        statuses.push(serde_json::json!({"id": id, "prompt": prompt, "status": status}));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "suite": suite,
                "tag": tag,
                "from": record.id.to_string(),
                "seed": seed,
                "runs": statuses,
            }))?
        );
    } else {
        eprintln!(
            "suite {suite}: {} runs tagged {tag}; score them with `mifo eval --tag {tag} --clip DIR --dino DIR`",
            runs.len()
        );
    }
    if failed > 0 {
        bail!("{failed} of {} suite runs did not finish", runs.len());
    }
    Ok(())
}
