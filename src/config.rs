//! Shared configuration plumbing: TOML config files and `--set section.key=value` overrides for
//! the learning and synthesis configs, with errors that name the key and what was expected.
//!
//! A config type is any serde struct whose fields are scalars, strings or lists. An override
//! must name an existing key (unknown keys list the valid ones), and its value must have the
//! key's type: integers, floats (an integer is accepted for a float), booleans, strings, or
//! TOML literals for lists (`[1, 2]`).

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// One parsed `--set` override: `section.key=value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    /// `learn` or `synth`.
    pub section: String,
    /// The field name.
    pub key: String,
    /// The raw value text.
    pub value: String,
}

/// Parses `section.key=value`.
pub fn parse_override(text: &str) -> Result<Override> {
    let (lhs, value) = text
        .split_once('=')
        .ok_or_else(|| Error::Input(format!("--set {text}: expected section.key=value")))?;
    let (section, key) = lhs.trim().split_once('.').ok_or_else(|| {
        Error::Input(format!(
            "--set {text}: the key must be qualified, e.g. learn.lr=0.005 or synth.steps=50"
        ))
    })?;
    Ok(Override {
        section: section.to_string(),
        key: key.to_string(),
        value: value.trim().to_string(),
    })
}

/// Parses a TOML scalar / array literal, falling back to a bare string.
fn parse_literal(text: &str) -> Value {
    let doc = format!("v = {text}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(t) => t
            .get("v")
            .and_then(|v| serde_json::to_value(v).ok())
            .unwrap_or(Value::String(text.to_string())),
        Err(_) => Value::String(text.to_string()),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}

/// Coerces `new` to the JSON type of `old`, or explains the mismatch (`flag what: …`).
fn coerce(old: &Value, new: Value, flag: &str, what: &str) -> Result<Value> {
    let ok = match (old, &new) {
        // An integer where a float is expected is fine; a float into an integer is not.
        (Value::Number(o), Value::Number(n)) => !((o.is_i64() || o.is_u64()) && n.is_f64()),
        (Value::Bool(_), Value::Bool(_)) => true,
        (Value::String(_), Value::String(_)) => true,
        (Value::Array(_), Value::Array(_)) => true,
        (Value::Null, _) => true,
        _ => false,
    };
    if ok {
        // Keep floats as floats so that `lr=1` stays a float field.
        if let (Value::Number(o), Value::Number(n)) = (old, &new) {
            if o.is_f64() && !n.is_f64() {
                return Ok(Value::from(n.as_f64().unwrap_or_default()));
            }
        }
        Ok(new)
    } else {
        Err(Error::Input(format!(
            "{flag} {what}: expected {}, got {}",
            type_name(old),
            type_name(&new)
        )))
    }
}

/// Applies the overrides for `section` to `config`; overrides of other sections are ignored
/// (unknown sections are rejected by [`check_sections`]).
pub fn apply_overrides<T: Serialize + DeserializeOwned>(
    config: &T,
    section: &str,
    overrides: &[Override],
) -> Result<T> {
    apply_overrides_as(config, section, overrides, "--set")
}

/// [`apply_overrides`] for overrides that came from another flag (e.g. `mifo sweep --grid`):
/// errors name `flag` instead of `--set`.
pub fn apply_overrides_as<T: Serialize + DeserializeOwned>(
    config: &T,
    section: &str,
    overrides: &[Override],
    flag: &str,
) -> Result<T> {
    let mut value = serde_json::to_value(config)
        .map_err(|e| Error::Config(format!("cannot serialise the {section} config: {e}")))?;
    let map = value
        .as_object_mut()
        .ok_or_else(|| Error::Config(format!("the {section} config is not a table")))?;
    for o in overrides.iter().filter(|o| o.section == section) {
        let what = format!("{}.{}={}", o.section, o.key, o.value);
        let old = map.get(&o.key).ok_or_else(|| {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let keys: Vec<String> = keys.iter().map(|k| format!("{section}.{k}")).collect();
            Error::Input(format!(
                "{flag} {what}: unknown key `{section}.{}`; valid keys: {}",
                o.key,
                keys.join(", ")
            ))
        })?;
        let new = coerce(old, parse_literal(&o.value), flag, &what)?;
        map.insert(o.key.clone(), new);
    }
    serde_json::from_value(value).map_err(|e| Error::Input(format!("{flag} ({section}): {e}")))
}

/// Rejects overrides whose section is not one of `known`.
pub fn check_sections(overrides: &[Override], known: &[&str]) -> Result<()> {
    for o in overrides {
        if !known.contains(&o.section.as_str()) {
            return Err(Error::Input(format!(
                "--set {}.{}: unknown section `{}` (expected {})",
                o.section,
                o.key,
                o.section,
                known.join(" or ")
            )));
        }
    }
    Ok(())
}

/// Reads a TOML config file: its `[section]` table (or the top level if there is none) is
/// applied on top of `base` with the same type checks as `--set`.
pub fn apply_toml_file<T: Serialize + DeserializeOwned>(
    base: &T,
    section: &str,
    path: &std::path::Path,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| Error::file(path, format!("invalid TOML: {}", e.message())))?;
    let body = match table.get(section) {
        Some(toml::Value::Table(t)) => t.clone(),
        Some(_) => return Err(Error::file(path, format!("`{section}` must be a table"))),
        None => table,
    };
    let overrides: Vec<Override> = body
        .iter()
        .map(|(k, v)| Override {
            section: section.to_string(),
            key: k.clone(),
            value: v.to_string(),
        })
        .collect();
    apply_overrides(base, section, &overrides).map_err(|e| Error::file(path, e.to_string()))
}

/// Resolves a config the way every front end does: `base` (a preset), then the `[section]`
/// table of `file` when given, then the `--set section.key=value` strings.
pub fn resolve<T: Serialize + DeserializeOwned>(
    base: &T,
    section: &str,
    file: Option<&std::path::Path>,
    sets: &[String],
) -> Result<T> {
    let cfg = match file {
        Some(path) => apply_toml_file(base, section, path)?,
        None => serde_json::from_value(
            serde_json::to_value(base).map_err(|e| Error::Config(e.to_string()))?,
        )
        .map_err(|e| Error::Config(e.to_string()))?,
    };
    let overrides = sets
        .iter()
        .map(|s| parse_override(s))
        .collect::<Result<Vec<_>>>()?;
    check_sections(&overrides, &[section])?;
    apply_overrides(&cfg, section, &overrides)
}

/// Keys whose values differ between two configs of the same type (for "changed from preset").
pub fn changed_keys<T: Serialize>(a: &T, b: &T) -> Vec<String> {
    let (Ok(Value::Object(x)), Ok(Value::Object(y))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Vec::new();
    };
    let mut keys: Vec<String> = x
        .iter()
        .filter(|(k, v)| y.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    keys.sort();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Demo {
        steps: u32,
        lr: f64,
        flag: bool,
        mode: String,
    }

    fn demo() -> Demo {
        Demo {
            steps: 10,
            lr: 0.5,
            flag: false,
            mode: "full".into(),
        }
    }

    fn sets(list: &[&str]) -> Vec<Override> {
        list.iter().map(|s| parse_override(s).unwrap()).collect()
    }

    #[test]
    fn overrides_apply_with_type_checks() {
        let d = apply_overrides(
            &demo(),
            "learn",
            &sets(&[
                "learn.steps=3",
                "learn.lr=1",
                "learn.flag=true",
                "learn.mode=lora",
                "synth.x=1",
            ]),
        )
        .unwrap();
        assert_eq!(
            d,
            Demo {
                steps: 3,
                lr: 1.0,
                flag: true,
                mode: "lora".into()
            }
        );
        let e = apply_overrides(&demo(), "learn", &sets(&["learn.nope=1"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `learn.nope`") && e.contains("learn.steps"),
            "{e}"
        );
        let e = apply_overrides(&demo(), "learn", &sets(&["learn.steps=1.5"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected an integer"), "{e}");
        let e = apply_overrides(&demo(), "learn", &sets(&["learn.flag=3"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a boolean"), "{e}");
        assert!(parse_override("steps=3").is_err());
        assert!(parse_override("learn.steps").is_err());
        assert!(check_sections(&sets(&["lern.steps=3"]), &["learn", "synth"]).is_err());
        assert_eq!(
            changed_keys(&demo(), &Demo { lr: 0.1, ..demo() }),
            vec!["lr".to_string()]
        );
    }
}
