//! Reading the `config.json` of a diffusers / transformers component, with one-line errors that
//! name the file and the key, and a check that rejects values this implementation does not
//! support instead of silently ignoring them.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A parsed `config.json`.
pub struct ConfigJson {
    path: PathBuf,
    map: Map<String, Value>,
}

impl ConfigJson {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
        match value {
            Value::Object(map) => Ok(Self {
                path: path.to_path_buf(),
                map,
            }),
            _ => Err(Error::file(path, "expected a JSON object")),
        }
    }

    /// Builds a config from an in-memory object (tests, synthetic models).
    pub fn from_value(path: impl Into<PathBuf>, value: Value) -> Result<Self> {
        let path = path.into();
        match value {
            Value::Object(map) => Ok(Self { path, map }),
            _ => Err(Error::file(path, "expected a JSON object")),
        }
    }

    /// The file this config came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn bad(&self, key: &str, what: &str) -> Error {
        Error::file(&self.path, format!("key `{key}`: {what}"))
    }

    fn present(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A non-negative integer, or `default` when absent or null.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => self.as_usize(key, v),
        }
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self
            .present(key)
            .ok_or_else(|| self.bad(key, "missing (required)"))?;
        self.as_usize(key, v)
    }

    fn as_usize(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| self.bad(key, &format!("expected a non-negative integer, got {v}")))
    }

    /// A number, or `default` when absent or null.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.bad(key, &format!("expected a number, got {v}"))),
        }
    }

    /// A boolean, or `default` when absent or null.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.bad(key, &format!("expected true/false, got {v}"))),
        }
    }

    /// A string, or `default` when absent or null.
    pub fn str_or(&self, key: &str, default: &str) -> Result<String> {
        match self.present(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.bad(key, &format!("expected a string, got {v}"))),
        }
    }

    /// A list of strings (required).
    pub fn str_list(&self, key: &str) -> Result<Vec<String>> {
        let v = self
            .present(key)
            .ok_or_else(|| self.bad(key, "missing (required)"))?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.bad(key, &format!("expected a list of strings, got {v}")))?;
        arr.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.bad(key, &format!("expected strings, got {x}")))
            })
            .collect()
    }

    /// A list of integers (required).
    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        let v = self
            .present(key)
            .ok_or_else(|| self.bad(key, "missing (required)"))?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.bad(key, &format!("expected a list of integers, got {v}")))?;
        arr.iter().map(|x| self.as_usize(key, x)).collect()
    }

    /// An integer or a list of `n` integers (diffusers accepts both for per-block settings);
    /// `None` when absent or null.
    pub fn per_block(&self, key: &str, n: usize) -> Result<Option<Vec<usize>>> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::Array(arr)) => {
                if arr.len() != n {
                    return Err(self.bad(
                        key,
                        &format!("has {} entries, the model has {n} blocks", arr.len()),
                    ));
                }
                arr.iter()
                    .map(|x| self.as_usize(key, x))
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            }
            Some(v) => Ok(Some(vec![self.as_usize(key, v)?; n])),
        }
    }

    /// Fails unless `key` is absent, null, or equal to one of `allowed`.
    pub fn require_one_of(&self, key: &str, allowed: &[Value]) -> Result<()> {
        match self.present(key) {
            None => Ok(()),
            Some(v) if allowed.iter().any(|a| values_equal(a, v)) => Ok(()),
            Some(v) => Err(self.bad(key, &format!("value {v} is not supported by mifo"))),
        }
    }

    /// Fails unless `key` is absent or null.
    pub fn require_null(&self, key: &str) -> Result<()> {
        self.require_one_of(key, &[])
    }
}

fn values_equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}
