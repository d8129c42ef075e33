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
//! LoRA weights (diffusers and kohya key styles) are not exported yet.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde::Serialize;

use super::error::{StoreError, StoreResult};
use super::ids::RunId;
use super::png::{add_png_text_chunks, is_png};
use super::Store;

/// The output name whose blob holds learned token embeddings.
pub const EMBEDDINGS_OUTPUT: &str = "embeddings";

/// What [`export_run`] wrote.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExportReport {
    /// Every file written, in order.
    pub files: Vec<PathBuf>,
    /// Config keys with a `null` value, left out of `config.toml`.
    pub skipped_null_keys: Vec<String>,
}

/// Exports run `id` into `dir` (created; must be empty if it exists).
pub fn export_run(store: &Store, id: &RunId, dir: &Path) -> StoreResult<ExportReport> {
    let record = store.get_run(id)?;
    let spec = store.spec(&record.spec_hash)?;
    // Read everything first, so a corrupt blob leaves no half-written export.
    let metrics = store.metrics(id)?;
    let logs = store.logs(id)?;
    let mut outputs = Vec::new();
    for (name, hash) in &record.outputs {
        outputs.push((name.clone(), store.read_blob(hash)?));
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

    // Outputs.
    let prompt = spec.prompt().map(str::to_string);
    for (name, bytes) in &outputs {
        let file = safe_file_name(name);
        if is_png(bytes) {
            let mut parameters = String::new();
            if let Some(prompt) = &prompt {
                parameters.push_str(prompt);
                parameters.push('\n');
            }
            let _ = write!(
                parameters,
                "Seed: {}, mifo run: {id}, spec hash: {}",
                spec.seed, record.spec_hash
            );
            let provenance = serde_json::json!({
                "run_id": id.to_string(),
                "spec_hash": record.spec_hash.to_hex(),
                "seed": spec.seed,
                "prompt": prompt,
            })
            .to_string();
            let tagged =
                add_png_text_chunks(bytes, &[("parameters", &parameters), ("mifo", &provenance)])
                    .map_err(|e| StoreError::corrupt(format!("output {name} of run {id}"), e))?;
            write(&with_extension(&file, "png"), &tagged)?;
        } else if let Ok(tensors) = SafeTensors::deserialize(bytes) {
            write(&with_extension(&file, "safetensors"), bytes)?;
            if name == EMBEDDINGS_OUTPUT {
                export_embeddings(&tensors, id, &record.spec_hash.to_hex(), &mut write)?;
            }
        } else {
            write(&with_extension(&file, "bin"), bytes)?;
        }
    }
    Ok(ExportReport {
        files,
        skipped_null_keys: skipped,
    })
}

fn with_extension(file: &str, ext: &str) -> String {
    if file.to_ascii_lowercase().ends_with(&format!(".{ext}")) {
        file.to_string()
    } else {
        format!("{file}.{ext}")
    }
}

fn export_embeddings(
    tensors: &SafeTensors<'_>,
    id: &RunId,
    spec_hash: &str,
    write: &mut dyn FnMut(&str, &[u8]) -> StoreResult<()>,
) -> StoreResult<()> {
    let what = || format!("output {EMBEDDINGS_OUTPUT} of run {id}");
    let mut named: Vec<(String, TensorView<'_>)> = tensors.tensors();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    if named.is_empty() {
        return Err(StoreError::corrupt(what(), "holds no tensors"));
    }
    let metadata = |token: Option<&str>| {
        let mut m = HashMap::from([
            ("mifo.run_id".to_string(), id.to_string()),
            ("mifo.spec_hash".to_string(), spec_hash.to_string()),
        ]);
        if let Some(token) = token {
            m.insert("mifo.token".to_string(), token.to_string());
        }
        Some(m)
    };
    let learned =
        safetensors::serialize(named.iter().map(|(k, v)| (k.as_str(), v)), metadata(None))
            .map_err(|e| StoreError::corrupt(what(), e))?;
    write("learned_embeds.safetensors", &learned)?;
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
        let reshaped = TensorView::new(view.dtype(), shape, view.data())
            .map_err(|e| StoreError::corrupt(what(), e))?;
        let bytes = safetensors::serialize([("emb_params", &reshaped)], metadata(Some(token)))
            .map_err(|e| StoreError::corrupt(what(), e))?;
        write(
            &format!("a1111/{}.safetensors", token_file_name(token)),
            &bytes,
        )?;
    }
    Ok(())
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
}
