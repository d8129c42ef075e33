//! The library's layers only use layers below them: every `crate::<module>` path in a file of
//! one top-level module must name a module of a lower layer (doc links count: they are
//! dependencies too). A new top-level module must be given its layer here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules from the bottom up; a module may use only modules of lower layers.
const LAYERS: &[&[&str]] = &[
    &["store"],
    &["error"],
    &["config", "imageio", "sink", "cpu_threads"],
    &["model"],
    &["learn", "synth"],
    &["eval"],
    &["world", "verify", "bench"],
    &["jobs", "runs"],
    &["engine"],
    &["tui"],
    &["cli"],
];

/// Items the crate root re-exports, and the module they come from.
const ROOT_ITEMS: &[(&str, &str)] = &[("Error", "error"), ("Result", "error")];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`None` for the crate root and the binary).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The modules named by `crate::<name>` paths in `text`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // `$crate::` in macros and `mifo::crate::` do not occur; a preceding identifier
        // character means another word ending in `crate`.
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !name.is_empty() && !preceded {
            let module = ROOT_ITEMS
                .iter()
                .find(|(item, _)| *item == name)
                .map_or(name.clone(), |(_, m)| m.to_string());
            found.insert(module);
        }
        rest = after;
    }
    found
}

/// Every `(from module, to module, file)` edge that does not point strictly downwards.
fn upward_edges(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for file in files {
        let Some(from) = module_of(src, &file) else {
            continue;
        };
        let Some(from_layer) = layer_of(&from) else {
            bad.push(format!(
                "{from} ({}) has no layer in LAYERS",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for to in crate_paths(&text) {
            if to == from {
                continue;
            }
            match layer_of(&to) {
                Some(to_layer) if to_layer < from_layer => {}
                Some(_) => bad.push(format!("{from} -> {to} in {}", file.display())),
                None => bad.push(format!(
                    "{} names crate::{to}, which has no layer in LAYERS",
                    file.display()
                )),
            }
        }
    }
    bad
}

#[test]
fn every_module_uses_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = upward_edges(&src);
    assert!(
        bad.is_empty(),
        "upward or unknown edges:\n{}",
        bad.join("\n")
    );
}

#[test]
fn crate_paths_finds_modules_and_root_items() {
    let text = "use crate::model::unet::UNet;\n/// see [`crate::learn::run`]\nfn f() -> crate::Result<()> { notcrate::x; Ok(()) }";
    let found: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(found, ["error", "learn", "model"]);
}
