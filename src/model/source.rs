//! Where a model comes from. `--model` (and `MIFO_MODEL`) names one of three things, and
//! [`resolve`] is the one function that tells which:
//!
//! 1. a local diffusers folder (`model_index.json`, `unet/`, …);
//! 2. a single-file checkpoint (`*.safetensors` in the original Stable Diffusion layout, as
//!    A1111 and ComfyUI keep them; see [`super::single_file`]), optionally with `--model-config
//!    DIR`, a diffusers folder whose configs and tokenizer are used with its weights;
//! 3. a Hugging Face repo id (`org/name`), looked up *offline* in the local Hugging Face cache:
//!    the cache root is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`
//!    (the order `huggingface_hub` uses), where `models--org--name/refs/<revision>` holds a
//!    commit hash and `models--org--name/snapshots/<hash>/` is the diffusers folder (its files
//!    are usually symlinks into `blobs/`). `--revision` names a branch or tag (default `main`)
//!    or a commit hash, which may also name a snapshot folder directly.
//!
//! An existing local path always wins over a repo id of the same spelling. mifo never
//! downloads: a repo id that is not in the cache is refused with every path that was tried.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The revision looked up when `--revision` is not given.
pub const DEFAULT_REVISION: &str = "main";

/// Which kind of source a model came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// A local diffusers folder.
    Folder,
    /// A snapshot folder of the local Hugging Face cache, named by a repo id.
    HubCache,
    /// A single-file checkpoint in the original Stable Diffusion layout.
    SingleFile,
}

impl SourceKind {
    /// The name printed by `mifo model info` / `verify` and recorded with runs.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Folder => "folder",
            SourceKind::HubCache => "hub-cache",
            SourceKind::SingleFile => "single-file",
        }
    }
}

/// A model source, resolved: what the user gave and where the weights are read from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSource {
    /// What the user gave, as given (a path, or a repo id with `@revision` when one was named).
    pub given: String,
    /// Which kind of source it is.
    pub kind: SourceKind,
    /// The diffusers folder (a cache snapshot for a repo id), or the single checkpoint file.
    pub path: PathBuf,
    /// For a single file: the diffusers folder whose configs and tokenizer go with it.
    #[serde(default)]
    pub config: Option<PathBuf>,
}

impl ModelSource {
    /// A local diffusers folder, named by its path (no checks).
    pub fn folder(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            given: path.display().to_string(),
            kind: SourceKind::Folder,
            path,
            config: None,
        }
    }

    /// A place the store remembered for a model: a folder, or a single file with the config
    /// folder it was used with.
    pub fn local(path: PathBuf, config: Option<PathBuf>) -> Self {
        if path.is_file() {
            Self {
                given: path.display().to_string(),
                kind: SourceKind::SingleFile,
                path,
                config,
            }
        } else {
            Self::folder(path)
        }
    }

    /// Whether the weights are one checkpoint file (not a diffusers folder).
    pub fn is_single_file(&self) -> bool {
        self.kind == SourceKind::SingleFile
    }

    /// The same source with its paths made absolute (symlinks resolved) where they exist, for
    /// jobs handed to the engine, whose working directory may differ.
    pub fn canonical(mut self) -> Self {
        if let Ok(p) = std::fs::canonicalize(&self.path) {
            self.path = p;
        }
        if let Some(c) = &self.config {
            if let Ok(p) = std::fs::canonicalize(c) {
                self.config = Some(p);
            }
        }
        self
    }

    /// One line saying what this source is: `folder /m`, `hub-cache org/name@main →
    /// /…/snapshots/<hash>`, `single-file /m.safetensors (configs from /cfg)`.
    pub fn describe(&self) -> String {
        match self.kind {
            SourceKind::Folder => format!("folder {}", self.path.display()),
            SourceKind::HubCache => {
                format!("hub-cache {} → {}", self.given, self.path.display())
            }
            SourceKind::SingleFile => match &self.config {
                Some(c) => format!(
                    "single-file {} (configs and tokenizer from {})",
                    self.path.display(),
                    c.display()
                ),
                None => format!("single-file {}", self.path.display()),
            },
        }
    }
}

/// Turns what the user gave into a [`ModelSource`]: an existing local path (a folder, or a
/// `.safetensors` file), else a Hugging Face repo id found in the local cache. `revision`
/// (`--revision`) applies to a repo id only; `config` (`--model-config`: a diffusers folder or
/// a repo id in the cache) to a single file only. Every refusal is one line naming the flag or
/// the path and what is wrong.
pub fn resolve(given: &str, revision: Option<&str>, config: Option<&str>) -> Result<ModelSource> {
    if given.trim().is_empty() {
        return Err(Error::Input(
            "--model: empty (a diffusers folder, a .safetensors checkpoint or a Hugging Face repo id)".into(),
        ));
    }
    let path = Path::new(given);
    if path.exists() {
        if let Some(rev) = revision {
            return Err(Error::Input(format!(
                "--revision {rev}: applies to a Hugging Face repo id, and {given} is a local path"
            )));
        }
        if path.is_dir() {
            if let Some(c) = config {
                return Err(Error::Input(format!(
                    "--model-config {c}: applies to a single-file checkpoint, and {given} is a diffusers folder (its own configs are used)"
                )));
            }
            return Ok(ModelSource {
                given: given.to_string(),
                kind: SourceKind::Folder,
                path: path.to_path_buf(),
                config: None,
            });
        }
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if ext != "safetensors" {
            let why = if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
                "a pickled PyTorch checkpoint, which mifo does not read (it can run code); convert it to .safetensors"
            } else {
                "not a model: expected a diffusers folder or a .safetensors checkpoint"
            };
            return Err(Error::file(path, why));
        }
        let config = match config {
            None => None,
            Some(c) => Some(resolve_config(c)?),
        };
        return Ok(ModelSource {
            given: given.to_string(),
            kind: SourceKind::SingleFile,
            path: path.to_path_buf(),
            config,
        });
    }
    if !is_repo_id(given) {
        return Err(Error::file(
            path,
            "no such file or folder (and not a Hugging Face repo id of the form org/name)",
        ));
    }
    if let Some(c) = config {
        return Err(Error::Input(format!(
            "--model-config {c}: applies to a single-file checkpoint, and {given} is a Hugging Face repo id (its snapshot has its own configs)"
        )));
    }
    let rev = revision.unwrap_or(DEFAULT_REVISION);
    let snapshot = find_in_cache(given, rev)?;
    Ok(ModelSource {
        given: if revision.is_some() {
            format!("{given}@{rev}")
        } else {
            given.to_string()
        },
        kind: SourceKind::HubCache,
        path: snapshot,
        config: None,
    })
}

/// `--model-config`: a local diffusers folder, or a repo id in the cache (revision `main`).
fn resolve_config(given: &str) -> Result<PathBuf> {
    let path = Path::new(given);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(Error::file(
            path,
            "--model-config: expected a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/ configs)",
        ));
    }
    if is_repo_id(given) {
        return find_in_cache(given, DEFAULT_REVISION);
    }
    Err(Error::file(
        path,
        "--model-config: no such folder (and not a Hugging Face repo id of the form org/name)",
    ))
}

/// Whether `text` has the shape of a Hugging Face repo id: `org/name`, each part of letters,
/// digits, `-`, `_` and `.`, not starting with `.` or `-`.
pub fn is_repo_id(text: &str) -> bool {
    let mut parts = text.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    part_ok(org) && part_ok(name)
}

/// The Hugging Face cache root: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (`None` when not even `$HOME` is set).
pub fn hub_cache_root() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = var("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// The snapshot folder of `repo` at `revision` in the local cache, or a one-line error naming
/// every path tried.
pub fn find_in_cache(repo: &str, revision: &str) -> Result<PathBuf> {
    let Some(root) = hub_cache_root() else {
        return Err(Error::Input(format!(
            "{repo}: not a local path, and no Hugging Face cache to look in (HF_HUB_CACHE, HF_HOME and HOME are all unset); mifo never downloads"
        )));
    };
    let bad_revision =
        revision.is_empty() || revision.split('/').any(|p| p.is_empty() || p == "..");
    if bad_revision {
        return Err(Error::Input(format!(
            "--revision {revision:?}: not a branch, tag or commit hash"
        )));
    }
    let repo_dir = root.join(format!("models--{}", repo.replace('/', "--")));
    let refs = repo_dir.join("refs").join(revision);
    let mut tried = vec![refs.clone()];
    if let Ok(text) = std::fs::read_to_string(&refs) {
        let hash = text.trim();
        let snapshot = repo_dir.join("snapshots").join(hash);
        if !hash.is_empty() && !hash.contains('/') && snapshot.is_dir() {
            return Ok(snapshot);
        }
        tried.push(snapshot);
    }
    // A commit hash names its snapshot folder directly.
    if revision.len() >= 7 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        let snapshot = repo_dir.join("snapshots").join(revision);
        if snapshot.is_dir() {
            return Ok(snapshot);
        }
        if !tried.contains(&snapshot) {
            tried.push(snapshot);
        }
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(Error::Input(format!(
        "{repo}@{revision}: no such local path, and not in the local Hugging Face cache (tried {}); mifo never downloads: fetch it first (e.g. `huggingface-cli download {repo}`) or pass a local folder",
        tried.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_have_one_slash_and_plain_parts() {
        for ok in [
            "stabilityai/stable-diffusion-2-1-base",
            "a/b",
            "runwayml/stable-diffusion-v1-5",
            "org_x/name.v2",
        ] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "a",
            "/abs/path",
            "a/b/c",
            "./x",
            "a/",
            "../a",
            "a/..",
            "a b/c",
            "~/m",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }

    #[test]
    fn local_paths_need_no_cache_and_refuse_the_other_kind_of_flag() {
        let dir = std::env::temp_dir().join(format!("mifo-source-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let given = dir.to_string_lossy().into_owned();
        let folder = resolve(&given, None, None).unwrap();
        assert_eq!(folder.kind, SourceKind::Folder);
        assert_eq!(folder.given, given);
        let err = resolve(&given, Some("main"), None).unwrap_err().to_string();
        assert!(
            err.starts_with("--revision main: applies to a Hugging Face repo id"),
            "{err}"
        );
        let err = resolve(&given, None, Some(&given)).unwrap_err().to_string();
        assert!(err.starts_with("--model-config"), "{err}");
        let ckpt = dir.join("m.ckpt");
        std::fs::write(&ckpt, b"x").unwrap();
        let err = resolve(&ckpt.to_string_lossy(), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pickled PyTorch checkpoint"), "{err}");
        let file = dir.join("m.safetensors");
        std::fs::write(&file, b"x").unwrap();
        let single = resolve(&file.to_string_lossy(), None, Some(&given)).unwrap();
        assert_eq!(single.kind, SourceKind::SingleFile);
        assert_eq!(single.config.as_deref(), Some(dir.as_path()));
        let err = resolve("no/such-thing-here", None, Some(&given))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--model-config"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
