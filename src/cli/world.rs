//! `mifo world …`: the procedural world (scenes with exact masks, the base model's data set).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand};

use super::eval::{BlobCache, EngineSource};
use crate::engine::{Client, Request, Response};
use crate::store::RunStatus;
use crate::world::quality::{self, QualityOptions};
use crate::world::score::{mean_of_runs, report, score_run};
use crate::world::{self, Attribute, SceneSpec, ORACLE_PREFIX};

/// `mifo world` subcommands.
#[derive(Subcommand, Debug)]
pub enum WorldCommand {
    /// Draw a seeded scene of flat shapes into a folder that `mifo learn --scene` reads as it is
    /// (`img.png`, `mask0.png`… exact masks, mask i = `<vi>`) plus `scene.json` (each object's
    /// shape, colour and box).
    Scene(SceneArgs),
    /// Write the base model's training set: `images.u8` (raw RGB, back to back), `labels.u8`
    /// (exact object maps),
    /// `captions.txt` (one per image, naming the objects) and `dataset.json`.
    Dataset(DatasetArgs),
    /// Score synthesis runs whose instances were learned on a world scene: per boxed
    /// placeholder, present / identity (colour and shape) / leak / outside, read from the
    /// pixels; stored with each run as `oracle/*` scores (shown by `runs show`, `runs diff` and
    /// the workbench).
    Score(ScoreArgs),
    /// How well a base model draws the world from plain prompts (DDIM, CFG): one-object and
    /// two-object prompts read back by the oracle, against the bars the world model must meet.
    Quality(QualityArgs),
    /// MIFO on the world: learn two similar instances from each of N world scenes, draw each
    /// pair with swapped and with moved boxes over several seeds, for MIFO, reward-only
    /// learning and each synthesis ablation; every run is stored and tagged, the oracle scores
    /// them, and the table of present / identity / leak / outside / elsewhere per row is
    /// printed. Runs that already finished (same spec) are reused, so an interrupted bench
    /// resumes.
    Bench(BenchArgs),
}

/// Arguments of `mifo world bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Number of scenes (seeds 1000, 1001, …; even ones differ in colour, odd ones in shape).
    #[arg(long, default_value_t = 12)]
    pub scenes: usize,
    /// Samples (seeds) per synthesis run.
    #[arg(long, default_value_t = 4)]
    pub seeds: usize,
    /// Rows to run, comma-separated (default: all): mifo, reward-only, bounded-attention,
    /// plain, box-control-off, sa-control-off, ca-control-off, out-of-box-off,
    /// alpha-decay-off, latent-opt-off, refine-off, and `words` (no learning: the plain model
    /// draws the scene's caption with the boxes on its words, the ceiling for the tokens); the
    /// learning-method rows break-a-scene, ti-m, db-m only when named here or in --methods.
    #[arg(long, value_delimiter = ',')]
    pub rows: Vec<String>,
    /// Methods to compare, comma-separated: synthesis methods mifo, bounded-attention, plain
    /// (each draws MIFO's learned tokens; `synth.method`) and learning methods break-a-scene,
    /// ti-m, db-m (each learns every scene with its own preset, and MIFO's synthesis draws its
    /// tokens; `learn.method`). Adds their rows to --rows; alone, runs just those rows.
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// The model: a diffusers folder, a single-file checkpoint or a cached repo id [env:
    /// MIFO_MODEL; default: the bundled fixtures/world-sd].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `--revision` / `--model-config` for --model.
    #[command(flatten)]
    pub source: crate::cli::SourceArgs,
    /// Tag prefix: runs are tagged `PREFIX/ROW` (learning runs `PREFIX/learn-VARIANT`).
    #[arg(long, default_value = "world-bench")]
    pub tag: String,
    /// Device: auto (a free device of the engine's pool: its GPUs), cpu, cuda or cuda:N (the
    /// run waits for that one). Default: auto in a CUDA build, cpu otherwise.
    #[arg(long, default_value = crate::jobs::pool::default_device())]
    pub device: String,
    /// The synthesis configuration the rows start from: `world` (the `paper` preset mapped to
    /// the world model's 8×8 latents: loss layers at 4² and 8², refinement at 8², 25 guided
    /// steps, each move of the latent bounded at 0.2 RMS) or `paper` (the preset as it is on
    /// SD). Give each its own --tag.
    #[arg(long, value_enum, default_value_t = PresetMapping::World)]
    pub synthesis: PresetMapping,
    /// The learning configurations: `world` (the `paper` preset with the attention loss
    /// weighted 0.1 instead of 0.01 in both phases, phase B at `learn.dreambooth_lr=1.2e-5`
    /// instead of 2e-6, and every step learning from a recomposed image,
    /// `learn.recompose_p=1`; Break-a-Scene's loss on the world UNet's 4×4 down and up
    /// layers) or `paper` (the presets as they are on SD). Give each its own --tag.
    #[arg(long, value_enum, default_value_t = PresetMapping::World)]
    pub learning: PresetMapping,
    /// Override one key of every row (repeatable): `synth.KEY=VALUE` changes the synthesis
    /// base before each row's own change, `learn.KEY=VALUE` both learning variants (a
    /// `learn.penalty_steps` given here also reaches reward-only). Give each variant its own
    /// --tag.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// How the learning runs initialise the placeholder rows: `preset` (the preset's
    /// `learn.init`, the vocabulary mean) or `class` (both tokens from the word the two
    /// instances share, as one starts tokens from a class noun: the shape word when they
    /// differ in colour, the colour word when they differ in shape). Give each its own --tag.
    #[arg(long, value_enum, default_value_t = BenchInit::Preset)]
    pub init: BenchInit,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// How `mifo world bench --init` starts the placeholder rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchInit {
    /// The preset's `learn.init`.
    Preset,
    /// The word both instances share, for both tokens.
    Class,
}

/// What `mifo world bench --synthesis` and `--learning` start from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PresetMapping {
    /// The paper preset mapped to the world model (`world::synth_config`,
    /// `world::learn_config`).
    World,
    /// The paper preset unchanged.
    Paper,
}

impl PresetMapping {
    /// The synthesis configuration the bench rows start from.
    fn synth_config(self) -> crate::synth::SynthConfig {
        match self {
            PresetMapping::World => world::synth_config(),
            PresetMapping::Paper => crate::synth::SynthConfig::default(),
        }
    }

    /// The learning configuration of `method` the learning variants start from.
    fn learn_config(self, method: crate::learn::LearnMethod) -> crate::learn::LearnConfig {
        match self {
            PresetMapping::World => world::method_learn_config(method),
            PresetMapping::Paper => crate::learn::LearnConfig::method_preset(method),
        }
    }

    /// `world` / `paper`, as on the command line.
    fn name(self) -> &'static str {
        match self {
            PresetMapping::World => "world",
            PresetMapping::Paper => "paper",
        }
    }

    /// What the table's header says of it.
    fn described(self) -> &'static str {
        match self {
            PresetMapping::World => "world (the paper preset mapped to the world model)",
            PresetMapping::Paper => "paper (unmapped)",
        }
    }
}

/// Arguments of `mifo world score`.
#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Synthesis runs (ids or unique prefixes).
    pub runs: Vec<String>,
    /// Also score every finished synthesis run with this tag and print one mean row per tag
    /// (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `mifo world quality`.
#[derive(Args, Debug)]
pub struct QualityArgs {
    /// The model: a diffusers folder, a single-file checkpoint or a cached repo id [env:
    /// MIFO_MODEL; default: the bundled fixtures/world-sd].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `--revision` / `--model-config` for --model.
    #[command(flatten)]
    pub source: crate::cli::SourceArgs,
    /// Images in all, half with one-object and half with two-object prompts.
    #[arg(long, default_value_t = 64)]
    pub images: usize,
    /// DDIM steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Seed of the first image (image i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON document (with every image's prompt and verdict).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `mifo world scene`.
#[derive(Args, Debug)]
pub struct SceneArgs {
    /// The RNG seed: the same seed and flags always give the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How many objects (1–4).
    #[arg(long, default_value_t = 2)]
    pub objects: usize,
    /// Make the objects share every attribute but this one (`colour` or `shape`): visually
    /// similar instances, the case MIFO is about. Without it no two objects are identical.
    #[arg(long, value_parser = parse_attribute)]
    pub differ: Option<Attribute>,
    /// Image side in pixels (the world model draws 64).
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Print `scene.json` to stdout.
    #[arg(long)]
    pub json: bool,
    /// The folder to write (created if missing).
    pub out: PathBuf,
}

/// Arguments of `mifo world dataset`.
#[derive(Args, Debug)]
pub struct DatasetArgs {
    /// Number of images.
    #[arg(long, default_value_t = 50_000)]
    pub count: usize,
    /// The data set's seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// The folder to write (created if missing).
    pub out: PathBuf,
}

/// The bundled world model, when this is a checkout that has it.
pub fn bundled_world_model() -> Option<PathBuf> {
    [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/world-sd"),
        PathBuf::from("fixtures/world-sd"),
    ]
    .into_iter()
    .find(|d| d.join("model_index.json").is_file())
}

fn parse_attribute(s: &str) -> Result<Attribute, String> {
    s.parse()
}

/// Runs a `mifo world` subcommand.
pub fn run(cmd: WorldCommand, store: &Path) -> anyhow::Result<()> {
    match cmd {
        WorldCommand::Score(a) => score(a, store),
        WorldCommand::Quality(a) => quality(a),
        WorldCommand::Bench(a) => bench(a, store),
        WorldCommand::Scene(a) => {
            let spec = SceneSpec {
                seed: a.seed,
                objects: a.objects,
                differ: a.differ,
                size: a.size,
            };
            let scene = spec.draw()?;
            let file = world::write_scene_folder(&scene, &a.out)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&file)?);
            } else {
                println!("{}: {}", a.out.display(), file.caption);
                for o in &file.objects {
                    let b = o.box_fractions;
                    println!(
                        "  {} {:<16} {}  box {:.3},{:.3},{:.3},{:.3}",
                        o.token,
                        o.object.noun_phrase(),
                        o.mask,
                        b[0],
                        b[1],
                        b[2],
                        b[3]
                    );
                }
            }
            Ok(())
        }
        WorldCommand::Dataset(a) => {
            let started = std::time::Instant::now();
            let info = world::dataset::write_dataset(&a.out, a.count, a.seed, a.size, |d, n| {
                eprint!("\rdrawing {d}/{n}");
            })?;
            eprintln!();
            println!(
                "{}: {} images of {}×{} ({} with one object, {} with two) in {:.1} s",
                a.out.display(),
                info.count,
                info.size,
                info.size,
                info.objects_histogram[0],
                info.objects_histogram[1],
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

/// `mifo world score`.
fn score(args: ScoreArgs, store: &Path) -> anyhow::Result<()> {
    if args.runs.is_empty() && args.tags.is_empty() {
        bail!("nothing to score: give synthesis RUN ids or --tag TAG");
    }
    if !store.join("db").is_dir() {
        bail!(
            "{}: no run store here (pass --store DIR or set MIFO_STORE)",
            store.display()
        );
    }
    let mut client = Client::connect(store)?;
    let mut targets: Vec<(String, bool)> = args.runs.iter().map(|r| (r.clone(), true)).collect();
    let mut tag_runs: Vec<(String, Vec<String>)> = Vec::new();
    if !args.tags.is_empty() {
        let Response::Summaries(all) = client.request(&Request::ListSummaries)? else {
            bail!("engine: unexpected reply to a run listing");
        };
        for tag in &args.tags {
            let ids: Vec<String> = all
                .iter()
                .rev()
                .filter(|s| s.tags.contains(tag) && s.status == RunStatus::Done)
                .filter(|s| s.kind == crate::store::RunKind::Synth)
                .map(|s| s.id.to_string())
                .collect();
            if ids.is_empty() {
                bail!("--tag {tag}: no finished synthesis run has this tag");
            }
            for id in &ids {
                if !targets.iter().any(|(t, _)| t == id) {
                    targets.push((id.clone(), false));
                }
            }
            tag_runs.push((tag.clone(), ids));
        }
    }
    let mut cache = BlobCache::default();
    let mut results = Vec::new();
    let mut stored: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for (run, explicit) in &targets {
        let verdicts = {
            let mut src = EngineSource {
                client: &mut client,
                cache: &mut cache,
            };
            score_run(&mut src, run).with_context(|| format!("run {run}"))?
        };
        let metrics = verdicts.metrics();
        let note = match (&verdicts.scene, &verdicts.learned) {
            (Some(scene), Some(learned)) => format!(
                "oracle: {} sample(s), instances learned on world scene seed {} in run {learned}",
                verdicts.samples.len(),
                scene.spec.seed,
            ),
            _ => format!(
                "oracle: {} sample(s), world objects named by the boxes (plain model)",
                verdicts.samples.len()
            ),
        };
        client.record_scores(&verdicts.run.to_string(), metrics.clone(), note)?;
        if !args.json && *explicit {
            print!("{}", report(&verdicts));
        }
        stored.insert(run.clone(), metrics.iter().cloned().collect());
        results.push(serde_json::json!({
            "id": verdicts.run.to_string(),
            "learned": verdicts.learned.as_ref().map(ToString::to_string),
            "prompt": verdicts.prompt,
            "samples": verdicts.samples,
            "metrics": metrics.into_iter().collect::<BTreeMap<_, _>>(),
        }));
    }
    let rows: Vec<(String, usize, BTreeMap<String, f64>)> = tag_runs
        .iter()
        .map(|(tag, ids)| {
            let mean = mean_of_runs(ids.iter().map(|id| &stored[id]));
            (tag.clone(), ids.len(), mean)
        })
        .collect();
    if args.json {
        let tables: Vec<_> = rows
            .iter()
            .map(|(tag, n, m)| serde_json::json!({"tag": tag, "runs": n, "means": m}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"runs": results, "tables": tables}))?
        );
        return Ok(());
    }
    if !rows.is_empty() {
        print!("{}", render_tag_table(&rows));
    }
    Ok(())
}

/// The oracle's mean scores per tag (or bench row), one row each.
pub fn render_tag_table(rows: &[(String, usize, BTreeMap<String, f64>)]) -> String {
    let measures = ["present", "identity", "leak", "outside", "elsewhere"];
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(3).max(3);
    let mut out = format!("{:<width$} {:>5}", "", "runs");
    for m in measures {
        out += &format!(" {m:>9}");
    }
    out.push('\n');
    for (tag, n, mean) in rows {
        out += &format!("{tag:<width$} {n:>5}");
        for m in measures {
            let v = mean.get(&format!("{ORACLE_PREFIX}{m}")).copied();
            out += &format!(
                " {:>9}",
                v.map(|v| format!("{:.1}%", 100.0 * v))
                    .unwrap_or("-".into())
            );
        }
        out.push('\n');
    }
    out
}

/// The model of a world command: `--model`, `$MIFO_MODEL` (any source
/// [`crate::jobs::model_source`] reads), or the bundled world model.
fn world_model(
    flag: Option<PathBuf>,
    source: &crate::cli::SourceArgs,
) -> anyhow::Result<crate::model::ModelSource> {
    let flags = source.flags(flag);
    if flags.named() {
        let model = crate::jobs::model_source(&flags)?;
        if !model.is_single_file() && !model.path.join("model_index.json").is_file() {
            bail!(
                "{}: not a diffusers model folder (no model_index.json)",
                model.path.display()
            );
        }
        return Ok(model);
    }
    let dir = bundled_world_model()
        .ok_or_else(|| anyhow!("no model: pass --model DIR or set MIFO_MODEL"))?;
    Ok(crate::model::ModelSource::folder(
        std::fs::canonicalize(&dir).unwrap_or(dir),
    ))
}

/// Tags run `id` with `tag` through the engine.
fn tag_run(client: &mut Client, id: &str, tag: &str) -> anyhow::Result<()> {
    match client.request(&Request::Tag {
        run: id.to_string(),
        tag: tag.to_string(),
        remove: false,
    })? {
        Response::Ok => Ok(()),
        Response::Error(e) => bail!(e),
        other => bail!("engine: unexpected reply {other:?}"),
    }
}

/// `mifo world bench`.
fn bench(args: BenchArgs, store: &Path) -> anyhow::Result<()> {
    use crate::jobs::learn::LearnJob;
    use crate::jobs::synth::SynthJob;
    use crate::world::bench::{
        learn_variants, rows, scene, Layout, LAYOUTS, LEARN_METHOD_ROWS, METHOD_ROWS, TARGETS,
    };

    if args.scenes == 0 || args.seeds == 0 {
        bail!("--scenes and --seeds must be at least 1");
    }
    let overrides = args
        .sets
        .iter()
        .map(|s| crate::config::parse_override(s))
        .collect::<Result<Vec<_>, _>>()?;
    crate::config::check_sections(&overrides, &["learn", "synth"])?;
    let base = crate::config::apply_overrides(&args.synthesis.synth_config(), "synth", &overrides)?;
    base.check()?;
    let mapping = args.learning;
    let config_of = move |m| mapping.learn_config(m);
    for variant in learn_variants(&config_of) {
        crate::config::apply_overrides(&variant.config, "learn", &overrides)?.validate()?;
    }
    let all_rows = rows(&base);
    if let Some(m) = args
        .methods
        .iter()
        .find(|m| !METHOD_ROWS.contains(&m.as_str()) && !LEARN_METHOD_ROWS.contains(&m.as_str()))
    {
        bail!(
            "--methods: unknown method `{m}` (synthesis: {}; learning: {})",
            METHOD_ROWS.join(", "),
            LEARN_METHOD_ROWS.join(", ")
        );
    }
    let mut wanted: Vec<String> = args.rows.clone();
    wanted.extend(
        args.methods
            .iter()
            .filter(|m| !args.rows.contains(m))
            .cloned(),
    );
    let chosen: Vec<_> = if wanted.is_empty() {
        all_rows
            .iter()
            .filter(|r| !LEARN_METHOD_ROWS.contains(&r.name))
            .cloned()
            .collect()
    } else {
        wanted
            .iter()
            .map(|name| {
                all_rows
                    .iter()
                    .find(|r| r.name == name)
                    .cloned()
                    .ok_or_else(|| {
                        let names: Vec<&str> = all_rows.iter().map(|r| r.name).collect();
                        anyhow!("--rows: unknown row `{name}` (one of {})", names.join(", "))
                    })
            })
            .collect::<anyhow::Result<_>>()?
    };
    crate::store::validate_tag(&format!("{}/learn-break-a-scene", args.tag))?;
    let model = world_model(args.model.clone(), &args.source)?;
    let started = std::time::Instant::now();
    std::fs::create_dir_all(store)?;
    let mut client = Client::connect(store)?;
    let mut cache = BlobCache::default();
    // row name -> per synthesis run, its mean oracle scores
    let mut per_row: BTreeMap<&str, Vec<BTreeMap<String, f64>>> = BTreeMap::new();
    let needed: Vec<&str> = learn_variants(&config_of)
        .iter()
        .map(|v| v.name)
        .filter(|v| chosen.iter().any(|r| r.learn == Some(*v)))
        .collect();
    let total = args.scenes * (needed.len() + chosen.len() * LAYOUTS.len());
    let mut done = 0usize;
    for i in 0..args.scenes {
        let spec = scene(i);
        let drawn = spec.draw()?;
        let dir = store
            .join("world-bench")
            .join(format!("scene-{}", spec.seed));
        let file = world::write_scene_folder(&drawn, &dir)?;
        let mut learned: BTreeMap<&str, String> = BTreeMap::new();
        for variant in learn_variants(&config_of)
            .into_iter()
            .filter(|v| needed.contains(&v.name))
        {
            done += 1;
            let what = format!(
                "[{done}/{total} {:.0} s] learn {} scene {} ({})",
                started.elapsed().as_secs_f64(),
                variant.name,
                spec.seed,
                file.caption
            );
            let mut config = crate::config::apply_overrides(&variant.config, "learn", &overrides)?;
            if args.init == BenchInit::Class {
                config.init = class_words(&file);
            }
            config.validate()?;
            let job = LearnJob {
                model: model.clone(),
                files: crate::learn::scene_files(&dir)?,
                scene_dir: Some(dir.clone()),
                preset: variant.preset.into(),
                config,
                seed: spec.seed,
                device: args.device.clone(),
                dtype: "f32".into(),
                allow_overlap: false,
                rerun: false,
            };
            let id = super::demo::run_job(store, Request::SubmitLearn(Box::new(job)), &what)?;
            tag_run(
                &mut client,
                &id,
                &format!("{}/learn-{}", args.tag, variant.name),
            )?;
            learned.insert(variant.name, id);
        }
        for row in &chosen {
            for layout in LAYOUTS {
                done += 1;
                let what = format!(
                    "[{done}/{total} {:.0} s] synth {} {} scene {}",
                    started.elapsed().as_secs_f64(),
                    row.name,
                    layout.name(),
                    spec.seed
                );
                let words = row.learn.is_none();
                let job = SynthJob {
                    from: row.learn.map(|l| learned[l].clone()),
                    model: model.clone(),
                    prompt: if words {
                        file.caption.clone()
                    } else {
                        "a photo of <v0> and <v1>".into()
                    },
                    boxes: Layout::boxes(layout, &file, words),
                    samples: args.seeds,
                    seed: 0,
                    preset: "paper".into(),
                    config: row.config.clone(),
                    device: args.device.clone(),
                    dtype: "f32".into(),
                    rerun: false,
                };
                let id = super::demo::run_job(store, Request::SubmitSynth(Box::new(job)), &what)?;
                tag_run(&mut client, &id, &format!("{}/{}", args.tag, row.name))?;
                let verdicts = score_run(
                    &mut EngineSource {
                        client: &mut client,
                        cache: &mut cache,
                    },
                    &id,
                )?;
                let metrics = verdicts.metrics();
                client.record_scores(
                    &id,
                    metrics.clone(),
                    "oracle: scored by mifo world bench".into(),
                )?;
                per_row
                    .entry(row.name)
                    .or_default()
                    .push(metrics.into_iter().collect());
            }
        }
    }
    let table: Vec<(String, usize, BTreeMap<String, f64>)> = chosen
        .iter()
        .map(|row| {
            let runs = &per_row[row.name];
            (row.name.to_string(), runs.len(), mean_of_runs(runs.iter()))
        })
        .collect();
    if args.json {
        let rows: Vec<_> = table
            .iter()
            .zip(&chosen)
            .map(|((name, n, m), row)| {
                serde_json::json!({"row": name, "change": row.change, "runs": n, "means": m})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "scenes": args.scenes,
                "seeds": args.seeds,
                "model": model.path,
                "tag": args.tag,
                "synthesis": args.synthesis.name(),
                "learning": args.learning.name(),
                "sets": args.sets,
                "init": format!("{:?}", args.init).to_lowercase(),
                "rows": rows,
            }))?
        );
        return Ok(());
    }
    println!(
        "\nmifo world bench: {} scenes × {} layouts × {} seeds per row, learning {}, synthesis {}, model {} ({:.0} s)",
        args.scenes,
        LAYOUTS.len(),
        args.seeds,
        args.learning.described(),
        args.synthesis.described(),
        model.path.display(),
        started.elapsed().as_secs_f64()
    );
    if !args.sets.is_empty() {
        println!("with --set {}", args.sets.join(" --set "));
    }
    if args.init == BenchInit::Class {
        println!("tokens initialised from the word the instances share (--init class)");
    }
    print!("{}", render_tag_table(&table));
    println!("{TARGETS}");
    Ok(())
}

/// `learn.init` for `--init class`: the attribute word the scene's objects share (the shape
/// word when they differ in colour, else the colour word), once per object.
fn class_words(scene: &world::SceneFile) -> String {
    use world::Attribute;
    let first = &scene.objects[0].object;
    let shared = if scene.objects.iter().all(|o| o.object.shape == first.shape) {
        first.attribute(Attribute::Shape)
    } else {
        first.attribute(Attribute::Colour)
    };
    vec![shared; scene.objects.len()].join(",")
}

/// `mifo world quality`.
fn quality(args: QualityArgs) -> anyhow::Result<()> {
    if args.images == 0 {
        bail!("--images 0: nothing to measure");
    }
    if args.steps == 0 {
        bail!("--steps 0: DDIM needs at least one step");
    }
    let model = world_model(args.model.clone(), &args.source)?;
    let device = crate::model::parse_device(&args.device)?;
    let started = std::time::Instant::now();
    let sd = crate::model::StableDiffusion::load_source(
        &model,
        candle_core::DType::F32,
        &device,
        Vec::new(),
    )?;
    let options = QualityOptions {
        images: args.images,
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
    };
    let report = quality::measure(&sd, options, |done, total| {
        if !args.json {
            eprint!(
                "\rsampling {done}/{total} ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    eprintln!();
    println!(
        "{}: {} images, DDIM {}, CFG {}, seeds {}..{} ({:.0} s)",
        model.path.display(),
        args.images,
        args.steps,
        args.guidance,
        args.seed,
        args.seed + args.images as u64 - 1,
        started.elapsed().as_secs_f64()
    );
    print!("{}", quality::render(&report));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::bench::scene;

    /// `--init class` starts both tokens from the attribute the instances share: the bench's
    /// even scenes differ in colour (so the shape word), odd ones in shape (the colour word).
    #[test]
    fn class_words_are_the_shared_attribute() {
        for i in 0..4 {
            let file = world::SceneFile::of(&scene(i).draw().unwrap());
            let (a, b) = (&file.objects[0].object, &file.objects[1].object);
            let want = if i % 2 == 0 {
                assert_eq!(a.shape, b.shape);
                a.shape.word()
            } else {
                assert_eq!(a.colour, b.colour);
                a.colour.word()
            };
            assert_eq!(class_words(&file), format!("{want},{want}"), "scene {i}");
        }
    }
}
