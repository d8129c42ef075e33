//! Key-by-key comparison of two runs: config, seed, inputs, model, code, metrics, outputs.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::StoreResult;
use super::ids::{BlobHash, RunId};
use super::record::SeriesSummary;
use super::Store;

/// One config key in a diff. `a`/`b` are `None` where the run's config lacks the key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigDelta {
    /// Dotted path of the key (`learn.lr`, `boxes[1].x0`).
    pub key: String,
    /// Value in run A.
    pub a: Option<Value>,
    /// Value in run B.
    pub b: Option<Value>,
    /// Whether the values are equal (only listed with `all`).
    pub same: bool,
}

/// A scalar field of the two specs (seed, model fingerprint, code version, kind, parent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValueDelta {
    /// Field name.
    pub field: String,
    /// Value in run A (as text).
    pub a: String,
    /// Value in run B (as text).
    pub b: String,
    /// Whether they are equal.
    pub same: bool,
}

/// A metric series in a diff: its summary in each run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricDelta {
    /// Series name.
    pub name: String,
    /// Summary in run A.
    pub a: Option<SeriesSummary>,
    /// Summary in run B.
    pub b: Option<SeriesSummary>,
}

/// A named blob (input or output) in a diff.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputDelta {
    /// Input or output name.
    pub name: String,
    /// Blob in run A.
    pub a: Option<BlobHash>,
    /// Blob in run B.
    pub b: Option<BlobHash>,
    /// Whether both runs have it and the bytes are identical.
    pub identical: bool,
}

/// Everything that differs between two runs (or everything, with `all`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunDiff {
    /// Run A.
    pub a: RunId,
    /// Run B.
    pub b: RunId,
    /// Kind, seed, parent, model fingerprint, code version, status.
    pub fields: Vec<ValueDelta>,
    /// Config keys (those that differ, or all with `all`).
    pub config: Vec<ConfigDelta>,
    /// Input blobs by name (those that differ, or all with `all`).
    pub inputs: Vec<OutputDelta>,
    /// Metric summaries of every series in either run.
    pub metrics: Vec<MetricDelta>,
    /// Every output of either run, with whether it is bit-identical.
    pub outputs: Vec<OutputDelta>,
}

/// Compares runs `a` and `b`. With `all`, equal config keys, fields and inputs are listed too.
pub fn diff_runs(store: &Store, a: &RunId, b: &RunId, all: bool) -> StoreResult<RunDiff> {
    let (ra, rb) = (store.get_run(a)?, store.get_run(b)?);
    let (sa, sb) = (store.spec(&ra.spec_hash)?, store.spec(&rb.spec_hash)?);
    let opt_id = |id: &Option<RunId>| {
        id.as_ref()
            .map_or_else(|| "-".to_string(), ToString::to_string)
    };
    let fields = [
        ("kind", sa.kind.to_string(), sb.kind.to_string()),
        ("status", ra.status.to_string(), rb.status.to_string()),
        ("seed", sa.seed.to_string(), sb.seed.to_string()),
        ("parent", opt_id(&sa.parent), opt_id(&sb.parent)),
        (
            "model_fingerprint",
            sa.model_fingerprint.to_hex(),
            sb.model_fingerprint.to_hex(),
        ),
        (
            "code_version",
            sa.code_version.clone(),
            sb.code_version.clone(),
        ),
        ("spec_hash", ra.spec_hash.to_hex(), rb.spec_hash.to_hex()),
    ]
    .into_iter()
    .map(|(field, a, b)| ValueDelta {
        field: field.to_string(),
        same: a == b,
        a,
        b,
    })
    .filter(|d| all || !d.same)
    .collect();

    let (mut flat_a, mut flat_b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &sa.config, &mut flat_a);
    flatten("", &sb.config, &mut flat_b);
    let keys: BTreeSet<&String> = flat_a.keys().chain(flat_b.keys()).collect();
    let config = keys
        .into_iter()
        .map(|key| {
            let (va, vb) = (flat_a.get(key).cloned(), flat_b.get(key).cloned());
            ConfigDelta {
                key: key.clone(),
                same: va == vb,
                a: va,
                b: vb,
            }
        })
        .filter(|d| all || !d.same)
        .collect();

    let inputs = named_blobs(&sa.inputs, &sb.inputs)
        .into_iter()
        .filter(|d| all || !d.identical)
        .collect();
    let outputs = named_blobs(&ra.outputs, &rb.outputs);

    let (ma, mb) = (store.metric_summaries(&ra)?, store.metric_summaries(&rb)?);
    let names: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    let metrics = names
        .into_iter()
        .map(|name| MetricDelta {
            name: name.clone(),
            a: ma.get(name).copied(),
            b: mb.get(name).copied(),
        })
        .collect();

    Ok(RunDiff {
        a: a.clone(),
        b: b.clone(),
        fields,
        config,
        inputs,
        metrics,
        outputs,
    })
}

fn named_blobs(a: &BTreeMap<String, BlobHash>, b: &BTreeMap<String, BlobHash>) -> Vec<OutputDelta> {
    let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    names
        .into_iter()
        .map(|name| {
            let (ha, hb) = (a.get(name).copied(), b.get(name).copied());
            OutputDelta {
                name: name.clone(),
                identical: ha.is_some() && ha == hb,
                a: ha,
                b: hb,
            }
        })
        .collect()
}

/// Flattens objects into dotted keys; arrays holding objects or arrays get `[i]` keys, other arrays
/// stay one value.
pub(crate) fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, item) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, item, out);
            }
        }
        Value::Array(items) if items.iter().any(|i| i.is_object() || i.is_array()) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), item, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flatten_names_nested_keys() {
        let mut out = BTreeMap::new();
        flatten(
            "",
            &json!({"a": {"b": 1, "c": [1, 2]}, "boxes": [{"x": 0.5}]}),
            &mut out,
        );
        let keys: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a.b", "a.c", "boxes[0].x"]);
    }
}
