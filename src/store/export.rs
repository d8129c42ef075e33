//! `runs export RUN DIR`: a run in formats other tools read.
//!
//! Files written into `DIR` (which must be empty or absent):
//! - `config.toml`: the resolved config (loadable with `--config`); a header comment names the run,
//!   spec hash, seed, model and code. JSON `null` values have no TOML form: they are left out and
//!   listed in the header.
//! - `spec.json`, `record.json`: the full spec and run record as pretty JSON.
//! - `metrics.csv`: `series,step,value`, one row per point.
//! - `log.txt`: the run's log, when it has one.
//! - one file per output: PNG outputs as `<name>.png` with text chunks `parameters` (A1111 style:
//!   the prompt, then `Seed: …, mifo run: …, spec hash: …`) and `mifo` (JSON: run_id, spec_hash,
//!   seed, prompt); other outputs copied as they are (`.safetensors` or `.bin`).
//! - for an output named `embeddings` (a safetensors file with one tensor per token, named by the
//!   token, e.g. `<v0>`):
//!   - `learned_embeds.safetensors`: diffusers textual-inversion layout, one key per token holding
//!     its tensor. diffusers' `load_textual_inversion` takes a single-key file as is; for several
//!     tokens, load the file and pass each tensor with `token=`.
//!   - `a1111/<token>.safetensors` per token: one tensor under the key `emb_params`, shape
//!     `[vectors, dim]`. A1111 reads a single-tensor safetensors embedding whatever its key and names
//!     it after the file (so the prompt uses `v0`); `emb_params` is also the key kohya, InvokeAI and
//!     ComfyUI look for. (A1111's nested `string_to_param` dict exists only in its `.pt` pickles;
//!     safetensors files are flat, and we do not write pickles.)
//!
//!   Metadata in both: `mifo.run_id`, `mifo.spec_hash`, and `mifo.token` in the per-token files.
//!
//! - for an output named `lora` (`learn.dreambooth = "lora"`: a safetensors file holding
//!   `unet.<module>.lora_A.weight` [rank, in] / `unet.<module>.lora_B.weight` [out, rank] for the
//!   UNet attention projections and `text_encoder.<module>.lora_A.weight` / `lora_B.weight` for
//!   the CLIP self-attention projections, with scale 1, i.e. alpha = rank; see
//!   `model::weights::LoraConfig`):
//!   - `pytorch_lora_weights.safetensors`: the diffusers / PEFT layout that
//!     `StableDiffusionPipeline.load_lora_weights(DIR)` reads (that is its default file name):
//!     keys as stored (`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`,
//!     `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight`), metadata
//!     `format = pt`. The file carries no alphas, so diffusers takes alpha = rank: scale 1, as
//!     trained.
//!   - `lora_kohya.safetensors`: the kohya-ss `networks.lora` layout that A1111, ComfyUI and
//!     InvokeAI read: per module `lora_unet_<module>` or `lora_te_<module>` (dots replaced by
//!     underscores; text-encoder modules keep their `text_model_` part, as kohya names them for
//!     SD 1.x/2.x, e.g. `lora_te_text_model_encoder_layers_0_self_attn_q_proj`), each with
//!     `.lora_down.weight` (= lora_A), `.lora_up.weight` (= lora_B) and `.alpha` (an f32 scalar
//!     equal to the rank, so alpha / rank = 1). Metadata: `ss_network_module = networks.lora`,
//!     `ss_network_dim` and `ss_network_alpha` (the rank), `ss_training_comment = mifo run <id>`,
//!     `ss_base_model_version` (`sd_v1` / `sd_v2` from the cross-attention width: the `in`
//!     dimension of an `attn2.to_k` adapter, else the text encoder's hidden width; 768 → `sd_v1`,
//!     1024 → `sd_v2`, anything else `unknown`) and `ss_v2` (`True` / `False` when known; A1111
//!     sorts SD 2 LoRAs by it).
//!     An SDXL LoRA (one with `text_encoder_2.` adapters) gets `lora_te1_` / `lora_te2_` for its
//!     two text encoders, base model `sdxl_base_v1-0`, and UNet names in kohya's SDXL
//!     convention: the original (single-file) module tree, `lora_unet_input_blocks_4_1_…`,
//!     `lora_unet_middle_block_1_…`, `lora_unet_output_blocks_3_1_…`, derived from the
//!     diffusers block indices and the UNet's ResNets per level (the `mifo` metadata's
//!     `unet_layers_per_block`, else read from the module names); see [`sdxl_original_module`].
//!
//!   Both files hold the stored factors bit for bit (same dtype). Text-encoder modules stored
//!   without the `text_model.` prefix (text encoders whose weight file has none) get it added,
//!   since transformers and kohya both name the modules with it. Metadata in both:
//!   `mifo.run_id`, `mifo.spec_hash`. A `lora` blob that is not such a file (not safetensors,
//!   other tensor names, missing or mis-shaped factors, ranks that disagree) fails the export with
//!   an error naming the run and the output; nothing is written.
//! - an output named `weights` (a full fine-tune: only the tensors that were trained, named
//!   `unet.<name>` / `text_encoder.<name>`) is written as `finetuned_weights.safetensors`; it is
//!   not a whole checkpoint but an overlay on the base model's `unet/` and `text_encoder/` weights
//!   (the report's notes say so).
//!
//! Every output file is prepared before anything is written, so a corrupt output leaves no
//! half-written export.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::error::{StoreError, StoreResult};
use super::ids::RunId;
use super::png::{add_png_text_chunks, is_png};
use super::Store;

/// The output name whose blob holds learned token embeddings.
pub const EMBEDDINGS_OUTPUT: &str = "embeddings";

/// The output name whose blob holds LoRA adapters (`learn.dreambooth = "lora"`).
pub const LORA_OUTPUT: &str = "lora";

/// The output name whose blob holds fully fine-tuned tensors (`learn.dreambooth = "full"`).
pub const WEIGHTS_OUTPUT: &str = "weights";

/// File name of the diffusers / PEFT LoRA export.
pub const DIFFUSERS_LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// File name of the kohya / A1111 LoRA export.
pub const KOHYA_LORA_FILE: &str = "lora_kohya.safetensors";

/// File name of the fine-tuned weights export.
pub const FINETUNED_WEIGHTS_FILE: &str = "finetuned_weights.safetensors";

/// What [`export_run`] wrote.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExportReport {
    /// Every file written, in order.
    pub files: Vec<PathBuf>,
    /// Config keys with a `null` value, left out of `config.toml`.
    pub skipped_null_keys: Vec<String>,
    /// What some of the files are and how to load them (one sentence each), e.g. that
    /// `finetuned_weights.safetensors` holds only the changed tensors.
    pub notes: Vec<String>,
}

/// Exports run `id` into `dir` (created; must be empty if it exists).
pub fn export_run(store: &Store, id: &RunId, dir: &Path) -> StoreResult<ExportReport> {
    let record = store.get_run(id)?;
    let spec = store.spec(&record.spec_hash)?;
    // Read everything first, so a corrupt blob leaves no half-written export.
    let metrics = store.metrics(id)?;
    let logs = store.logs(id)?;
    let mut blobs = Vec::new();
    for (name, hash) in &record.outputs {
        blobs.push((name.clone(), store.read_blob(hash)?));
    }
    let provenance = Provenance {
        id,
        spec_hash: record.spec_hash.to_hex(),
        seed: spec.seed,
        prompt: spec.prompt().map(str::to_string),
    };
    let mut notes = Vec::new();
    let mut output_files = Vec::new();
    for (name, bytes) in &blobs {
        output_files.extend(output_files_for(name, bytes, &provenance, &mut notes)?);
    }

    if dir.exists() {
        let mut entries = fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))?;
        if entries.next().is_some() {
            return Err(StoreError::InvalidInput(format!(
                "{} is not empty; export into a new folder",
                dir.display()
            )));
        }
    }
    fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
    let mut files = Vec::new();
    let mut write = |name: &str, bytes: &[u8]| -> StoreResult<()> {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        }
        fs::write(&path, bytes).map_err(|e| StoreError::io(&path, e))?;
        files.push(path);
        Ok(())
    };

    // config.toml
    let mut skipped = Vec::new();
    let table = match json_to_toml(&spec.config, "", &mut skipped)? {
        Some(toml::Value::Table(table)) => table,
        Some(_) => {
            return Err(StoreError::InvalidInput(format!(
                "run {id}: config is not a JSON object, so it has no TOML form"
            )))
        }
        None => toml::Table::new(),
    };
    let body = toml::to_string_pretty(&table).map_err(|e| {
        StoreError::InvalidInput(format!("run {id}: config cannot be written as TOML: {e}"))
    })?;
    let mut config_toml = String::new();
    let _ = writeln!(config_toml, "# mifo {} run {id}", spec.kind);
    let _ = writeln!(config_toml, "# spec hash {}", record.spec_hash);
    let _ = writeln!(
        config_toml,
        "# seed {} (pass --seed {} to repeat it)",
        spec.seed, spec.seed
    );
    let _ = writeln!(
        config_toml,
        "# model fingerprint {}",
        spec.model_fingerprint
    );
    let _ = writeln!(config_toml, "# code {}", spec.code_version);
    if !skipped.is_empty() {
        let _ = writeln!(
            config_toml,
            "# keys left out (null in the config): {}",
            skipped.join(", ")
        );
    }
    config_toml.push('\n');
    config_toml.push_str(&body);
    write("config.toml", config_toml.as_bytes())?;

    write("spec.json", &to_pretty_json(&spec)?)?;
    write("record.json", &to_pretty_json(&record)?)?;

    // metrics.csv
    let mut csv = String::from("series,step,value\n");
    for (name, points) in &metrics {
        let series = csv_field(name);
        for (step, value) in points {
            let _ = writeln!(csv, "{series},{step},{value}");
        }
    }
    write("metrics.csv", csv.as_bytes())?;

    if !logs.is_empty() {
        let mut text = logs.join("\n");
        text.push('\n');
        write("log.txt", text.as_bytes())?;
    }

    for (name, bytes) in &output_files {
        write(name, bytes)?;
    }
    Ok(ExportReport {
        files,
        skipped_null_keys: skipped,
        notes,
    })
}

/// What a run's exported files say about where they came from.
struct Provenance<'a> {
    id: &'a RunId,
    spec_hash: String,
    seed: u64,
    prompt: Option<String>,
}

impl Provenance<'_> {
    /// `mifo.run_id` and `mifo.spec_hash`, the metadata of every safetensors file we derive.
    fn metadata(&self) -> HashMap<String, String> {
        HashMap::from([
            ("mifo.run_id".to_string(), self.id.to_string()),
            ("mifo.spec_hash".to_string(), self.spec_hash.clone()),
        ])
    }
}

/// The files (name in the export folder, contents) that output `name` becomes.
fn output_files_for<'a>(
    name: &str,
    bytes: &'a [u8],
    p: &Provenance<'_>,
    notes: &mut Vec<String>,
) -> StoreResult<Vec<(String, Cow<'a, [u8]>)>> {
    let id = p.id;
    let what = || format!("output {name} of run {id}");
    let file = safe_file_name(name);
    let mut files: Vec<(String, Cow<'a, [u8]>)> = Vec::new();
    if name == LORA_OUTPUT {
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| {
            StoreError::corrupt(what(), format!("not a safetensors LoRA file: {e}"))
        })?;
        let lora =
            parse_lora(bytes, &tensors).map_err(|detail| StoreError::corrupt(what(), detail))?;
        files.push((with_extension(&file, "safetensors"), Cow::Borrowed(bytes)));
        files.push((
            DIFFUSERS_LORA_FILE.to_string(),
            Cow::Owned(diffusers_lora(&lora, p).map_err(|e| StoreError::corrupt(what(), e))?),
        ));
        files.push((
            KOHYA_LORA_FILE.to_string(),
            Cow::Owned(kohya_lora(&lora, p).map_err(|e| StoreError::corrupt(what(), e))?),
        ));
        notes.push(format!(
            "{DIFFUSERS_LORA_FILE}: diffusers/PEFT LoRA ({} modules, rank {}, scale 1); \
             load with StableDiffusionPipeline.load_lora_weights on the export folder",
            lora.modules.len(),
            lora.rank
        ));
        notes.push(format!(
            "{KOHYA_LORA_FILE}: kohya/A1111 LoRA (lora_unet_…/lora_te_…, for SDXL lora_te1_…/\
             lora_te2_…, alpha = rank = {}, base model {})",
            lora.rank,
            lora.base_model_version()
        ));
    } else if name == WEIGHTS_OUTPUT {
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| {
            StoreError::corrupt(what(), format!("not a safetensors weights file: {e}"))
        })?;
        files.push((FINETUNED_WEIGHTS_FILE.to_string(), Cow::Borrowed(bytes)));
        notes.push(format!(
            "{FINETUNED_WEIGHTS_FILE}: only the {} fine-tuned tensors, named unet.<name> / \
             text_encoder.<name>; it is not a whole checkpoint: put them over the base model's \
             unet/ and text_encoder/ weights",
            tensors.len()
        ));
    } else if is_png(bytes) {
        let mut parameters = String::new();
        if let Some(prompt) = &p.prompt {
            parameters.push_str(prompt);
            parameters.push('\n');
        }
        let _ = write!(
            parameters,
            "Seed: {}, mifo run: {id}, spec hash: {}",
            p.seed, p.spec_hash
        );
        let provenance = serde_json::json!({
            "run_id": id.to_string(),
            "spec_hash": p.spec_hash,
            "seed": p.seed,
            "prompt": p.prompt,
        })
        .to_string();
        let tagged =
            add_png_text_chunks(bytes, &[("parameters", &parameters), ("mifo", &provenance)])
                .map_err(|e| StoreError::corrupt(what(), e))?;
        files.push((with_extension(&file, "png"), Cow::Owned(tagged)));
    } else if let Ok(tensors) = SafeTensors::deserialize(bytes) {
        files.push((with_extension(&file, "safetensors"), Cow::Borrowed(bytes)));
        if name == EMBEDDINGS_OUTPUT {
            let widths = sdxl_encoder_widths(bytes);
            for (path, contents) in export_embeddings(&tensors, widths, p)? {
                files.push((path, Cow::Owned(contents)));
            }
        }
    } else {
        files.push((with_extension(&file, "bin"), Cow::Borrowed(bytes)));
    }
    Ok(files)
}

fn with_extension(file: &str, ext: &str) -> String {
    if file.to_ascii_lowercase().ends_with(&format!(".{ext}")) {
        file.to_string()
    } else {
        format!("{file}.{ext}")
    }
}

/// The two text encoders' widths `(h1, h2)` an SDXL run's `embeddings` output names in its
/// `mifo` metadata (`encoder_widths = "h1,h2"`); `None` for SD runs.
fn sdxl_encoder_widths(bytes: &[u8]) -> Option<(usize, usize)> {
    let (_, meta) = SafeTensors::read_metadata(bytes).ok()?;
    let text = meta.metadata().as_ref()?.get("mifo")?.clone();
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let (a, b) = v.get("encoder_widths")?.as_str()?.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// An SDXL token's rows `[vectors, h1 + h2]` cut into `clip_l` `[vectors, h1]` and `clip_g`
/// `[vectors, h2]` (raw bytes, row-major).
fn split_sdxl_rows(
    view: &TensorView<'_>,
    vectors: usize,
    (h1, h2): (usize, usize),
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let elem = view.dtype().bitsize() / 8;
    let row = (h1 + h2) * elem;
    let data = view.data();
    if data.len() != vectors * row {
        return Err(format!(
            "holds {} bytes, expected {vectors} × ({h1} + {h2}) values",
            data.len()
        ));
    }
    let (mut l, mut g) = (Vec::new(), Vec::new());
    for r in data.chunks_exact(row) {
        l.extend_from_slice(&r[..h1 * elem]);
        g.extend_from_slice(&r[h1 * elem..]);
    }
    Ok((l, g))
}

fn export_embeddings(
    tensors: &SafeTensors<'_>,
    sdxl: Option<(usize, usize)>,
    p: &Provenance<'_>,
) -> StoreResult<Vec<(String, Vec<u8>)>> {
    let id = p.id;
    let what = || format!("output {EMBEDDINGS_OUTPUT} of run {id}");
    let mut files = Vec::new();
    let mut named: Vec<(String, TensorView<'_>)> = tensors.tensors();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    if named.is_empty() {
        return Err(StoreError::corrupt(what(), "holds no tensors"));
    }
    let metadata = |token: Option<&str>| {
        let mut m = p.metadata();
        if let Some(token) = token {
            m.insert("mifo.token".to_string(), token.to_string());
        }
        Some(m)
    };
    if sdxl.is_none() {
        let learned =
            safetensors::serialize(named.iter().map(|(k, v)| (k.as_str(), v)), metadata(None))
                .map_err(|e| StoreError::corrupt(what(), e))?;
        files.push(("learned_embeds.safetensors".to_string(), learned));
    }
    for (token, view) in &named {
        let shape = match view.shape() {
            [dim] => vec![1, *dim],
            [vectors, dim] => vec![*vectors, *dim],
            other => {
                return Err(StoreError::corrupt(
                    what(),
                    format!("token {token} has shape {other:?}; expected [dim] or [vectors, dim]"),
                ))
            }
        };
        let bytes = match sdxl {
            // SDXL: `clip_l` (text_encoder) and `clip_g` (text_encoder_2) in one file.
            Some((h1, h2)) => {
                if shape[1] != h1 + h2 {
                    return Err(StoreError::corrupt(
                        what(),
                        format!("token {token} is {} wide, expected {h1} + {h2}", shape[1]),
                    ));
                }
                let (l, g) = split_sdxl_rows(view, shape[0], (h1, h2))
                    .map_err(|e| StoreError::corrupt(what(), format!("token {token} {e}")))?;
                let lv = TensorView::new(view.dtype(), vec![shape[0], h1], &l)
                    .map_err(|e| StoreError::corrupt(what(), e))?;
                let gv = TensorView::new(view.dtype(), vec![shape[0], h2], &g)
                    .map_err(|e| StoreError::corrupt(what(), e))?;
                safetensors::serialize([("clip_g", &gv), ("clip_l", &lv)], metadata(Some(token)))
                    .map_err(|e| StoreError::corrupt(what(), e))?
            }
            None => {
                let reshaped = TensorView::new(view.dtype(), shape, view.data())
                    .map_err(|e| StoreError::corrupt(what(), e))?;
                safetensors::serialize([("emb_params", &reshaped)], metadata(Some(token)))
                    .map_err(|e| StoreError::corrupt(what(), e))?
            }
        };
        files.push((
            format!("a1111/{}.safetensors", token_file_name(token)),
            bytes,
        ));
    }
    Ok(files)
}

/// Which model a LoRA module adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum LoraPart {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl LoraPart {
    /// Key prefix in the diffusers / PEFT layout (and in mifo's own file).
    fn peft_prefix(self) -> &'static str {
        match self {
            LoraPart::Unet => "unet",
            LoraPart::TextEncoder => "text_encoder",
            LoraPart::TextEncoder2 => "text_encoder_2",
        }
    }

    /// Module-name prefix in the kohya layout: SD 1.x/2.x have one text encoder (`lora_te`),
    /// SDXL two (`lora_te1`, `lora_te2`).
    fn kohya_prefix(self, sdxl: bool) -> &'static str {
        match self {
            LoraPart::Unet => "lora_unet",
            LoraPart::TextEncoder if sdxl => "lora_te1",
            LoraPart::TextEncoder => "lora_te",
            LoraPart::TextEncoder2 => "lora_te2",
        }
    }
}

/// One adapted linear layer: `W x + B A x`.
struct LoraModule<'a> {
    part: LoraPart,
    /// The module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k` or
    /// `text_model.encoder.layers.0.self_attn.q_proj` (always with `text_model.`).
    module: String,
    /// Down projection [rank, in].
    a: TensorView<'a>,
    /// Up projection [out, rank].
    b: TensorView<'a>,
}

/// A validated `lora` output.
struct Lora<'a> {
    /// Sorted by part, then module.
    modules: Vec<LoraModule<'a>>,
    /// The rank shared by every module (alpha equals it: scale 1).
    rank: usize,
    /// The UNet's ResNets per down level, when the `mifo` metadata names them
    /// (`unet_layers_per_block`, written for SDXL runs).
    unet_layers: Option<Vec<usize>>,
}

impl Lora<'_> {
    /// The UNet's cross-attention width (the `in` dimension of an `attn2.to_k`/`to_v` adapter),
    /// else the text encoder's hidden width (the `in` dimension of a self-attention adapter):
    /// the two are equal in SD 1.x (768) and 2.x (1024).
    fn cross_attention_dim(&self) -> Option<usize> {
        let width = |part: LoraPart, endings: &[&str]| {
            self.modules
                .iter()
                .find(|m| m.part == part && endings.iter().any(|e| m.module.ends_with(e)))
                .map(|m| m.a.shape()[1])
        };
        width(LoraPart::Unet, &[".attn2.to_k", ".attn2.to_v"]).or_else(|| {
            width(
                LoraPart::TextEncoder,
                &[
                    ".self_attn.q_proj",
                    ".self_attn.k_proj",
                    ".self_attn.v_proj",
                    ".self_attn.out_proj",
                ],
            )
        })
    }

    /// Whether the LoRA adapts SDXL's second text encoder (then it is an SDXL LoRA).
    fn is_sdxl(&self) -> bool {
        self.modules
            .iter()
            .any(|m| m.part == LoraPart::TextEncoder2)
    }

    /// kohya's `ss_base_model_version`: `sdxl_base_v1-0` (two text encoders), `sd_v1` (768),
    /// `sd_v2` (1024) or `unknown`.
    fn base_model_version(&self) -> &'static str {
        if self.is_sdxl() {
            return "sdxl_base_v1-0";
        }
        match self.cross_attention_dim() {
            Some(768) => "sd_v1",
            Some(1024) => "sd_v2",
            _ => "unknown",
        }
    }
}

/// Reads and checks a `lora` output: every tensor a `unet.`/`text_encoder.` `lora_A`/`lora_B`
/// factor of float dtype, each module with both, A [r, in] and B [out, r], one rank for all
/// modules that agrees with the rank in the `mifo` metadata (when it names one).
fn parse_lora<'a>(bytes: &[u8], tensors: &SafeTensors<'a>) -> Result<Lora<'a>, String> {
    let declared = declared_lora_rank(bytes)?;
    type Factors<'a> = (Option<TensorView<'a>>, Option<TensorView<'a>>);
    let mut pairs: BTreeMap<(LoraPart, String), Factors<'a>> = BTreeMap::new();
    let mut names = tensors.tensors();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, view) in names {
        let (part, rest) = if let Some(rest) = key.strip_prefix("unet.") {
            (LoraPart::Unet, rest)
        } else if let Some(rest) = key.strip_prefix("text_encoder_2.") {
            (LoraPart::TextEncoder2, rest)
        } else if let Some(rest) = key.strip_prefix("text_encoder.") {
            (LoraPart::TextEncoder, rest)
        } else {
            return Err(format!(
                "tensor `{key}` is neither `unet.…`, `text_encoder.…` nor `text_encoder_2.…`"
            ));
        };
        let (module, is_a) = if let Some(module) = rest.strip_suffix(".lora_A.weight") {
            (module, true)
        } else if let Some(module) = rest.strip_suffix(".lora_B.weight") {
            (module, false)
        } else {
            return Err(format!(
                "tensor `{key}` is not a LoRA factor (`<module>.lora_A.weight` or \
                 `<module>.lora_B.weight`)"
            ));
        };
        if module.is_empty() || module.split('.').any(str::is_empty) {
            return Err(format!("tensor `{key}` has an empty module name"));
        }
        if !matches!(
            view.dtype(),
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64
        ) {
            return Err(format!(
                "tensor `{key}` has dtype {:?}; expected F16, BF16, F32 or F64",
                view.dtype()
            ));
        }
        let module = match part {
            LoraPart::TextEncoder | LoraPart::TextEncoder2
                if !module.starts_with("text_model.") =>
            {
                format!("text_model.{module}")
            }
            _ => module.to_string(),
        };
        let slot = pairs.entry((part, module)).or_default();
        let slot = if is_a { &mut slot.0 } else { &mut slot.1 };
        if slot.is_some() {
            return Err(format!(
                "tensor `{key}` appears twice (with and without the `text_model.` prefix)"
            ));
        }
        *slot = Some(view);
    }
    if pairs.is_empty() {
        return Err("holds no LoRA tensors".to_string());
    }
    let mut modules = Vec::with_capacity(pairs.len());
    let mut rank: Option<usize> = None;
    for ((part, module), factors) in pairs {
        let name = format!("{}.{module}", part.peft_prefix());
        let (a, b) = match factors {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => return Err(format!("module `{name}` has lora_A but no lora_B")),
            (None, _) => return Err(format!("module `{name}` has lora_B but no lora_A")),
        };
        let r = match (a.shape(), b.shape()) {
            ([r, i], [o, r2]) if r == r2 && *r > 0 && *i > 0 && *o > 0 => *r,
            (sa, sb) => {
                return Err(format!(
                    "module `{name}` has lora_A {sa:?} and lora_B {sb:?}; expected [rank, in] \
                     and [out, rank] with the same rank"
                ))
            }
        };
        match rank {
            Some(first) if first != r => {
                return Err(format!(
                    "module `{name}` has rank {r} but others have rank {first}"
                ))
            }
            _ => rank = Some(r),
        }
        modules.push(LoraModule { part, module, a, b });
    }
    let rank = rank.unwrap_or_default();
    if let Some(declared) = declared.rank {
        if declared != rank {
            return Err(format!(
                "metadata says rank {declared} but the tensors have rank {rank}"
            ));
        }
    }
    Ok(Lora {
        modules,
        rank,
        unet_layers: declared.unet_layers,
    })
}

/// What a `lora` file's `mifo` metadata declares.
#[derive(Default)]
struct Declared {
    rank: Option<usize>,
    unet_layers: Option<Vec<usize>>,
}

/// The rank named in a `lora` file's `mifo` metadata (a JSON object such as
/// `{"format":"mifo-lora-1","rank":"4"}`), if any, and the UNet's ResNets per down level
/// (`"unet_layers_per_block":"2,2,2"`, SDXL runs); an error if the metadata is there but is not
/// such an object, or names another format.
fn declared_lora_rank(bytes: &[u8]) -> Result<Declared, String> {
    use serde_json::Value as J;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let Some(text) = meta.metadata().as_ref().and_then(|m| m.get("mifo")) else {
        return Ok(Declared::default());
    };
    let value: J = serde_json::from_str(text)
        .map_err(|e| format!("metadata `mifo` is not JSON ({e}): {text}"))?;
    let J::Object(fields) = value else {
        return Err(format!("metadata `mifo` is not a JSON object: {text}"));
    };
    match fields.get("format") {
        None => {}
        Some(J::String(format)) if format == "mifo-lora-1" => {}
        Some(other) => {
            return Err(format!(
                "metadata `mifo` names format {other}; expected \"mifo-lora-1\""
            ))
        }
    }
    let unet_layers = match fields.get("unet_layers_per_block") {
        None => None,
        Some(J::String(s)) => Some(
            s.split(',')
                .map(|n| n.trim().parse::<usize>().ok().filter(|&n| n > 0))
                .collect::<Option<Vec<_>>>()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    format!(
                        "metadata `mifo` has unet_layers_per_block {s:?}; expected positive integers separated by commas"
                    )
                })?,
        ),
        Some(other) => {
            return Err(format!(
                "metadata `mifo` has unet_layers_per_block {other}; expected a string such as \"2,2,2\""
            ))
        }
    };
    let rank = match fields.get("rank") {
        None => {
            return Ok(Declared {
                rank: None,
                unet_layers,
            })
        }
        Some(J::String(s)) => s.parse::<usize>().ok(),
        Some(J::Number(n)) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
        Some(_) => None,
    };
    match rank {
        Some(rank) if rank > 0 => Ok(Declared {
            rank: Some(rank),
            unet_layers,
        }),
        _ => Err(format!(
            "metadata `mifo` has rank {}; expected a positive integer",
            fields["rank"]
        )),
    }
}

/// The UNet's ResNets per down level for kohya's SDXL names: as the metadata declares them, else
/// read from the module names, assuming every level has the same count: an up level has one
/// attention more than its ResNets below it, so the largest `up_blocks.L.attentions.J` is the
/// count (mifo adapts every attention layer).
fn sdxl_unet_layers(lora: &Lora<'_>) -> Result<Vec<usize>, String> {
    if let Some(layers) = &lora.unet_layers {
        return Ok(layers.clone());
    }
    let mut up: Option<usize> = None;
    let mut levels = 0;
    for m in lora.modules.iter().filter(|m| m.part == LoraPart::Unet) {
        let mut parts = m.module.split('.');
        let (Some(kind), Some(level), Some(_), Some(j)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if let (Ok(level), Ok(j)) = (level.parse::<usize>(), j.parse::<usize>()) {
            levels = levels.max(level + 1);
            if kind == "up_blocks" {
                up = Some(up.map_or(j, |u| u.max(j)));
            }
        }
    }
    match up {
        Some(n) if n > 0 => Ok(vec![n; levels]),
        _ => Err(
            "an SDXL LoRA whose UNet layout cannot be told (no `unet_layers_per_block` in its \
             metadata and no up-block attention adapters): kohya names need it"
                .to_string(),
        ),
    }
}

/// kohya's SDXL UNet module path (the original Stability layout that SDXL single-file
/// checkpoints use, under `model.diffusion_model.`) of a diffusers attention module, with
/// `layers[l]` ResNets in down level `l`: `down_blocks.L.attentions.J.…` →
/// `input_blocks.K.1.…` with K = 1 + Σ_{l<L} (layers[l] + 1) + J (conv_in is block 0, a
/// downsampler ends each level); `mid_block.attentions.0.…` → `middle_block.1.…`;
/// `up_blocks.L.attentions.J.…` → `output_blocks.K.1.…` with K = Σ_{l<L} (layers[n-1-l] + 1)
/// + J (up level l mirrors down level n-1-l with one ResNet more, each an output block). What follows the attention (`transformer_blocks.0.
/// attn1.to_q`, `proj_in`) is named alike in both layouts.
fn sdxl_original_module(module: &str, layers: &[usize]) -> Result<String, String> {
    let bad = || format!("UNet module `{module}` has no place in SDXL's original layout");
    if let Some(rest) = module.strip_prefix("mid_block.attentions.0.") {
        return Ok(format!("middle_block.1.{rest}"));
    }
    let (down, rest) = match (
        module.strip_prefix("down_blocks."),
        module.strip_prefix("up_blocks."),
    ) {
        (Some(r), _) => (true, r),
        (_, Some(r)) => (false, r),
        _ => return Err(bad()),
    };
    let (level, rest) = rest.split_once('.').ok_or_else(bad)?;
    let rest = rest.strip_prefix("attentions.").ok_or_else(bad)?;
    let (j, rest) = rest.split_once('.').ok_or_else(bad)?;
    let (level, j): (usize, usize) = (
        level.parse().map_err(|_| bad())?,
        j.parse().map_err(|_| bad())?,
    );
    let n = layers.len();
    if level >= n {
        return Err(format!(
            "UNet module `{module}`: level {level}, but the UNet has {n} levels"
        ));
    }
    if down {
        if j >= layers[level] {
            return Err(bad());
        }
        let k = 1 + layers[..level].iter().map(|l| l + 1).sum::<usize>() + j;
        Ok(format!("input_blocks.{k}.1.{rest}"))
    } else {
        if j > layers[n - 1 - level] {
            return Err(bad());
        }
        let k = (0..level).map(|l| layers[n - 1 - l] + 1).sum::<usize>() + j;
        Ok(format!("output_blocks.{k}.1.{rest}"))
    }
}

/// `pytorch_lora_weights.safetensors`: the diffusers / PEFT layout (see the module docs).
fn diffusers_lora(lora: &Lora<'_>, p: &Provenance<'_>) -> Result<Vec<u8>, String> {
    let mut views: Vec<(String, &TensorView<'_>)> = Vec::with_capacity(lora.modules.len() * 2);
    for m in &lora.modules {
        let base = format!("{}.{}", m.part.peft_prefix(), m.module);
        views.push((format!("{base}.lora_A.weight"), &m.a));
        views.push((format!("{base}.lora_B.weight"), &m.b));
    }
    let mut metadata = p.metadata();
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), *v)), Some(metadata))
        .map_err(|e| e.to_string())
}

/// `lora_kohya.safetensors`: the kohya-ss `networks.lora` layout (see the module docs).
fn kohya_lora(lora: &Lora<'_>, p: &Provenance<'_>) -> Result<Vec<u8>, String> {
    let alpha_bytes = (lora.rank as f32).to_le_bytes();
    let alpha = TensorView::new(Dtype::F32, vec![], &alpha_bytes).map_err(|e| e.to_string())?;
    let mut views: Vec<(String, &TensorView<'_>)> = Vec::with_capacity(lora.modules.len() * 3);
    let mut seen: HashMap<String, String> = HashMap::new();
    let sdxl = lora.is_sdxl();
    // kohya's SDXL UNet is the original layout (`input_blocks.4.1.…`), its SD 1.x/2.x UNet
    // diffusers' (`down_blocks.1.attentions.0.…`).
    let sdxl_layers = if sdxl {
        Some(sdxl_unet_layers(lora)?)
    } else {
        None
    };
    for m in &lora.modules {
        let module = match (&sdxl_layers, m.part) {
            (Some(layers), LoraPart::Unet) => Cow::Owned(sdxl_original_module(&m.module, layers)?),
            _ => Cow::Borrowed(m.module.as_str()),
        };
        let base = format!("{}_{}", m.part.kohya_prefix(sdxl), module.replace('.', "_"));
        let peft = format!("{}.{}", m.part.peft_prefix(), m.module);
        if let Some(other) = seen.insert(base.clone(), peft.clone()) {
            return Err(format!(
                "modules `{other}` and `{peft}` both become kohya module `{base}`"
            ));
        }
        views.push((format!("{base}.lora_down.weight"), &m.a));
        views.push((format!("{base}.lora_up.weight"), &m.b));
        views.push((format!("{base}.alpha"), &alpha));
    }
    let version = lora.base_model_version();
    let mut metadata = p.metadata();
    metadata.extend(
        [
            ("ss_network_module", "networks.lora".to_string()),
            ("ss_network_dim", lora.rank.to_string()),
            ("ss_network_alpha", lora.rank.to_string()),
            ("ss_training_comment", format!("mifo run {}", p.id)),
            ("ss_base_model_version", version.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    match version {
        "sd_v1" => metadata.insert("ss_v2".to_string(), "False".to_string()),
        "sd_v2" => metadata.insert("ss_v2".to_string(), "True".to_string()),
        _ => None,
    };
    safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), *v)), Some(metadata))
        .map_err(|e| e.to_string())
}

/// A token such as `<v0>` as a file stem: `v0`.
pub fn token_file_name(token: &str) -> String {
    let trimmed = token.trim_start_matches('<').trim_end_matches('>');
    safe_file_name(if trimmed.is_empty() { token } else { trimmed })
}

/// Replaces characters that are unsafe in file names with `_`.
fn safe_file_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match cleaned.trim_matches('.') {
        "" => "_".to_string(),
        _ => cleaned,
    }
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn to_pretty_json(value: &impl Serialize) -> StoreResult<Vec<u8>> {
    let mut bytes =
        serde_json::to_vec_pretty(value).map_err(|e| StoreError::InvalidInput(e.to_string()))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Converts JSON to TOML; `null` values are left out and their keys collected in `skipped`.
fn json_to_toml(
    value: &serde_json::Value,
    path: &str,
    skipped: &mut Vec<String>,
) -> StoreResult<Option<toml::Value>> {
    use serde_json::Value as J;
    Ok(Some(match value {
        J::Null => {
            skipped.push(if path.is_empty() {
                "(config)".to_string()
            } else {
                path.to_string()
            });
            return Ok(None);
        }
        J::Bool(b) => toml::Value::Boolean(*b),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => toml::Value::Integer(i),
            (None, Some(f)) if n.is_f64() => toml::Value::Float(f),
            _ => {
                return Err(StoreError::InvalidInput(format!(
                    "config key {path}: {n} does not fit a TOML integer"
                )))
            }
        },
        J::String(s) => toml::Value::String(s.clone()),
        J::Array(items) => {
            let mut array = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                if let Some(v) = json_to_toml(item, &format!("{path}[{i}]"), skipped)? {
                    array.push(v);
                }
            }
            toml::Value::Array(array)
        }
        J::Object(map) => {
            let mut table = toml::Table::new();
            for (key, item) in map {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if let Some(v) = json_to_toml(item, &child, skipped)? {
                    table.insert(key.clone(), v);
                }
            }
            toml::Value::Table(table)
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_sanitised() {
        assert_eq!(token_file_name("<v0>"), "v0");
        assert_eq!(safe_file_name("a/b c"), "a_b_c");
        assert_eq!(safe_file_name(".."), "_");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }

    fn f32_view(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn provenance(id: &RunId) -> Provenance<'_> {
        Provenance {
            id,
            spec_hash: "h".into(),
            seed: 1,
            prompt: None,
        }
    }

    /// An SDXL run's embeddings (rows of both encoders side by side, widths in the metadata)
    /// become one file per token with `clip_l` and `clip_g`, as A1111 and diffusers read SDXL
    /// embeddings; no single-encoder `learned_embeds` file is written for them.
    #[test]
    fn sdxl_embeddings_export_as_clip_l_and_clip_g() {
        let row: Vec<f32> = (0..5).map(|i| i as f32).collect();
        let data = f32_view(&row);
        let view = TensorView::new(Dtype::F32, vec![5], &data).unwrap();
        let meta = HashMap::from([(
            "mifo".to_string(),
            r#"{"format":"mifo-embeddings-1","encoder_widths":"2,3"}"#.to_string(),
        )]);
        let bytes = safetensors::serialize([("<v0>", &view)], Some(meta)).unwrap();
        assert_eq!(sdxl_encoder_widths(&bytes), Some((2, 3)));
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let id = RunId::from_parts(1_700_000_000_000, 7);
        let files = export_embeddings(&tensors, Some((2, 3)), &provenance(&id)).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["a1111/v0.safetensors"]);
        let out = SafeTensors::deserialize(&files[0].1).unwrap();
        let l = out.tensor("clip_l").unwrap();
        let g = out.tensor("clip_g").unwrap();
        assert_eq!((l.shape(), g.shape()), (&[1, 2][..], &[1, 3][..]));
        assert_eq!(l.data(), &f32_view(&[0.0, 1.0])[..]);
        assert_eq!(g.data(), &f32_view(&[2.0, 3.0, 4.0])[..]);
        // A row of another width is refused, naming the token.
        let e = export_embeddings(&tensors, Some((2, 4)), &provenance(&id))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("<v0>"), "{e}");
    }

    /// An SDXL LoRA (adapters on `text_encoder_2` too) gets kohya's `lora_te1_` / `lora_te2_` /
    /// `lora_unet_` names and base model `sdxl_base_v1-0`; its diffusers file keeps
    /// `text_encoder_2.` keys.
    #[test]
    fn sdxl_lora_gets_kohya_te1_te2_names() {
        let a = f32_view(&[1.0, 2.0]);
        let b = f32_view(&[3.0, 4.0]);
        let va = TensorView::new(Dtype::F32, vec![1, 2], &a).unwrap();
        let vb = TensorView::new(Dtype::F32, vec![2, 1], &b).unwrap();
        let keys = [
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
        ];
        let mut views = Vec::new();
        for k in keys {
            views.push((format!("{k}.lora_A.weight"), &va));
            views.push((format!("{k}.lora_B.weight"), &vb));
        }
        let meta = HashMap::from([(
            "mifo".to_string(),
            r#"{"format":"mifo-lora-1","rank":"1","unet_layers_per_block":"2,2,2"}"#.to_string(),
        )]);
        let bytes = safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), *v)), Some(meta))
            .unwrap();
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let lora = parse_lora(&bytes, &tensors).unwrap();
        assert_eq!(lora.base_model_version(), "sdxl_base_v1-0");
        assert_eq!(lora.unet_layers, Some(vec![2, 2, 2]));
        let id = RunId::from_parts(1_700_000_000_000, 7);
        let kohya = kohya_lora(&lora, &provenance(&id)).unwrap();
        let out = SafeTensors::deserialize(&kohya).unwrap();
        let mut names: Vec<String> = out.names().into_iter().map(String::from).collect();
        names.sort();
        for want in [
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        let peft = diffusers_lora(&lora, &provenance(&id)).unwrap();
        let out = SafeTensors::deserialize(&peft).unwrap();
        assert!(out
            .names()
            .iter()
            .any(|n| n.starts_with("text_encoder_2.text_model.")));
        assert!(out
            .names()
            .iter()
            .any(|n| n.starts_with("unet.down_blocks.1.attentions.0.")));
    }

    /// kohya's SDXL UNet names are the original layout's block numbers: SDXL base 1.0's
    /// attention blocks (2 ResNets per level, attention in levels 1 and 2) land where its
    /// single-file checkpoints hold them.
    #[test]
    fn sdxl_unet_modules_take_the_original_block_numbers() {
        let l = [2, 2, 2];
        let m = |name: &str| sdxl_original_module(name, &l);
        let t = "transformer_blocks.0.attn1.to_out.0";
        for (from, to) in [
            ("down_blocks.1.attentions.0", "input_blocks.4.1"),
            ("down_blocks.1.attentions.1", "input_blocks.5.1"),
            ("down_blocks.2.attentions.0", "input_blocks.7.1"),
            ("down_blocks.2.attentions.1", "input_blocks.8.1"),
            ("mid_block.attentions.0", "middle_block.1"),
            ("up_blocks.0.attentions.0", "output_blocks.0.1"),
            ("up_blocks.0.attentions.2", "output_blocks.2.1"),
            ("up_blocks.1.attentions.0", "output_blocks.3.1"),
            ("up_blocks.1.attentions.2", "output_blocks.5.1"),
        ] {
            assert_eq!(m(&format!("{from}.{t}")), Ok(format!("{to}.{t}")), "{from}");
        }
        // Uneven levels: 1 ResNet in level 0, 3 in level 1.
        assert_eq!(
            sdxl_original_module("down_blocks.1.attentions.2.proj_in", &[1, 3]),
            Ok("input_blocks.5.1.proj_in".into())
        );
        assert_eq!(
            sdxl_original_module("up_blocks.1.attentions.1.proj_in", &[1, 3]),
            Ok("output_blocks.5.1.proj_in".into())
        );
        // Beyond the layout: a third down attention, a fourth up one, a fourth level, a ResNet.
        for bad in [
            "down_blocks.1.attentions.2.proj_in",
            "up_blocks.0.attentions.3.proj_in",
            "down_blocks.3.attentions.0.proj_in",
            "down_blocks.1.resnets.0.conv1",
        ] {
            assert!(m(bad).is_err(), "{bad}");
        }
    }
}
