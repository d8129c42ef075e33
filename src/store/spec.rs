//! `RunSpec`: everything that determines a run's result, and its canonical, versioned encoding.
//!
//! # The canonical encoding (version 1)
//!
//! A spec's hash is `blake3(canonical_bytes)`, and the `specs` tree stores exactly these bytes under
//! the hash. Changing anything below changes every spec hash, so the rule is versioned and pinned by a
//! test (`spec_hash_is_pinned`); a new rule must get a new version prefix.
//!
//! ```text
//! canonical_bytes = "mifo-runspec/1\n" ++ CJSON(spec)
//! spec            = { "code_version": string, "config": any JSON, "inputs": { name: hex hash },
//!                     "kind": "learn" | "synth", "model_fingerprint": hex hash,
//!                     "parent": run id | null, "seed": integer }
//! ```
//!
//! CJSON ("canonical JSON") is JSON with:
//! - no whitespace outside strings;
//! - object members sorted by the UTF-8 bytes of their keys, at every depth;
//! - strings escaped as `serde_json` does: `"` and `\` backslash-escaped, `\b \f \n \r \t` for those
//!   controls, `\u00XX` (lowercase hex) for the other controls below U+0020, all else literal UTF-8;
//! - integers in plain decimal;
//! - floats normalised: a finite float with no fractional part and magnitude below 2^53 is written as
//!   an integer (so `1.0` and `1` hash alike, and `-0.0` becomes `0`); any other float is written in
//!   Rust's shortest round-trip form as `serde_json` prints it (`0.1`, `1e-7`, `1.5e+300`). JSON has no
//!   NaN or infinity, so configs cannot hold them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::error::{StoreError, StoreResult};
use super::ids::{BlobHash, Digest, RunId, SpecHash};

/// Prefix of the canonical encoding; the number is the encoding's version.
pub const SPEC_ENCODING_PREFIX: &[u8] = b"mifo-runspec/1\n";

/// Largest canonical spec the store accepts (configs are small; this bounds hostile records).
pub const MAX_SPEC_BYTES: usize = 4 << 20;

/// What a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// Learning instance tokens from one image and its masks (paper Algorithm 1).
    Learn,
    /// Synthesising images from learned tokens and boxes (paper Algorithm 2).
    Synth,
}

impl RunKind {
    /// `learn` or `synth`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Learn => "learn",
            RunKind::Synth => "synth",
        }
    }
}

impl std::fmt::Display for RunKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RunKind {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "learn" => Ok(RunKind::Learn),
            "synth" => Ok(RunKind::Synth),
            other => Err(StoreError::InvalidInput(format!(
                "unknown run kind '{other}' (expected learn or synth)"
            ))),
        }
    }
}

/// Everything that determines a run's result. Two runs with equal specs should produce the same
/// outputs; the store records whether they did (see [`super::RunRecord::rerun_identical`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Learning or synthesis.
    pub kind: RunKind,
    /// The fully resolved configuration (every default filled in), as JSON.
    pub config: serde_json::Value,
    /// The seed of every random draw in the run.
    pub seed: u64,
    /// Input blobs by role (`image`, `mask0`, …, `embeddings`), each stored in the blob folder.
    pub inputs: BTreeMap<String, BlobHash>,
    /// The run this one builds on (a synthesis run's learning run), if any.
    pub parent: Option<RunId>,
    /// [`super::model_fingerprint`] of the model folder.
    pub model_fingerprint: Digest,
    /// The code that ran: crate version, plus the git commit when built from a checkout.
    pub code_version: String,
}

impl RunSpec {
    /// The canonical encoding described in the module docs.
    pub fn canonical_bytes(&self) -> StoreResult<Vec<u8>> {
        let value = serde_json::to_value(self)
            .map_err(|e| StoreError::InvalidInput(format!("spec cannot be encoded: {e}")))?;
        let mut out = String::with_capacity(256);
        write_canonical_json(&value, &mut out);
        let mut bytes = Vec::with_capacity(SPEC_ENCODING_PREFIX.len() + out.len());
        bytes.extend_from_slice(SPEC_ENCODING_PREFIX);
        bytes.extend_from_slice(out.as_bytes());
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(StoreError::InvalidInput(format!(
                "spec is {} bytes; the store accepts at most {MAX_SPEC_BYTES}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// blake3 of [`Self::canonical_bytes`].
    pub fn spec_hash(&self) -> StoreResult<SpecHash> {
        Ok(Digest::of(&self.canonical_bytes()?))
    }

    /// Decodes a canonical encoding; `what` names the record in errors.
    pub fn from_canonical(bytes: &[u8], what: &str) -> StoreResult<RunSpec> {
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(StoreError::corrupt(
                what,
                format!("{} bytes is over the limit", bytes.len()),
            ));
        }
        let body = bytes.strip_prefix(SPEC_ENCODING_PREFIX).ok_or_else(|| {
            StoreError::corrupt(
                what,
                "does not start with the spec encoding prefix mifo-runspec/1",
            )
        })?;
        serde_json::from_slice(body).map_err(|e| StoreError::corrupt(what, e))
    }

    /// Top-level string value `prompt` of the config, or the first `prompt` string found depth-first.
    pub fn prompt(&self) -> Option<&str> {
        fn find(value: &serde_json::Value) -> Option<&str> {
            match value {
                serde_json::Value::Object(map) => {
                    if let Some(serde_json::Value::String(p)) = map.get("prompt") {
                        return Some(p);
                    }
                    map.values().find_map(find)
                }
                serde_json::Value::Array(items) => items.iter().find_map(find),
                _ => None,
            }
        }
        find(&self.config)
    }
}

/// The code version recorded in specs: `mifo <crate version>`, plus `+<commit>` when the build set
/// `MIFO_GIT_COMMIT` (a build script may export it from `git rev-parse HEAD`).
pub fn code_version() -> String {
    match option_env!("MIFO_GIT_COMMIT") {
        Some(commit) if !commit.is_empty() => {
            format!("mifo {}+{commit}", env!("CARGO_PKG_VERSION"))
        }
        _ => format!("mifo {}", env!("CARGO_PKG_VERSION")),
    }
}

/// Appends the CJSON form of `value` (see the module docs) to `out`.
pub fn write_canonical_json(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_canonical_number(n, out),
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(key, out);
                out.push(':');
                write_canonical_json(item, out);
            }
            out.push('}');
        }
    }
}

fn write_canonical_number(n: &serde_json::Number, out: &mut String) {
    if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(f) = n.as_f64() {
        const EXACT_INT_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53
        if f.is_finite() && f.fract() == 0.0 && f.abs() < EXACT_INT_LIMIT {
            let _ = write!(out, "{}", f as i64);
        } else {
            // serde_json prints finite floats in shortest round-trip form.
            let _ = write!(out, "{n}");
        }
    } else {
        let _ = write!(out, "{n}");
    }
}

fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn canonical(value: serde_json::Value) -> String {
        let mut out = String::new();
        write_canonical_json(&value, &mut out);
        out
    }

    #[test]
    fn canonical_json_sorts_keys_and_normalises_numbers() {
        assert_eq!(
            canonical(json!({"b": 1.0, "a": {"z": -0.0, "y": [0.1, 1e-7, 3]}, "é": "x\n\"\u{1}"})),
            r#"{"a":{"y":[0.1,1e-7,3],"z":0},"b":1,"é":"x\n\"\u0001"}"#
        );
        assert_eq!(canonical(json!(1.5e300)), "1.5e+300");
        assert_eq!(canonical(json!(-3)), "-3");
    }
}
