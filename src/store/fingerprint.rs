//! Model fingerprints: one blake3 digest for the weight and config files of a model folder.
//!
//! ```text
//! fingerprint = blake3("mifo-model-fingerprint/1\n" ++ for each file, sorted by relative path:
//!                      relative path ("/"-separated) ++ "\n" ++ blake3(content) as hex ++ "\n")
//! ```
//! Files counted: every regular file (symlinks followed) whose extension is one of
//! [`MODEL_FILE_EXTENSIONS`], at any depth, skipping names that start with `.`; in a diffusers
//! pipeline folder (one with `model_index.json`) the only top-level file counted is
//! `model_index.json` itself: the pipeline is its component folders, and the fixtures keep their
//! parity references beside them (a new reference file leaves the model the same model). A
//! flat model folder (a CLIP or DINO model for evaluation) counts its top-level files. Hashing multi-GB
//! weights takes seconds, so each file's content hash is cached in the store's `meta` tree keyed by
//! its absolute path and validated by size and modification time.
//!
//! A Hugging Face cache snapshot is a folder whose files are symlinks into `blobs/`: the links
//! are followed and the names are the snapshot's, so a snapshot has the fingerprint of the same
//! files in a plain folder. A single-file checkpoint is the identity of its bytes, plus the
//! configs and tokenizer files (not weights) of the `--model-config` folder when one is given,
//! since they decide how the weights are used:
//!
//! ```text
//! fingerprint = blake3("mifo-model-fingerprint/single-file/1\n" ++ blake3(checkpoint) as hex ++ "\n"
//!                      ++ for each config file of --model-config (as above, minus weight files):
//!                         "config/" ++ relative path ++ "\n" ++ blake3(content) as hex ++ "\n")
//! ```
//! A single file converted from a folder therefore does not share the folder's fingerprint:
//! the bytes differ (layout, names, fused tensors), and proving the tensors equal would mean
//! reading and mapping every weight on each launch instead of hashing files once.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::error::{DbContext, StoreError, StoreResult};
use super::ids::Digest;
use super::record::bincode_config;

/// Extensions of the files that make up a model: weights, configs and tokenizer files.
pub const MODEL_FILE_EXTENSIONS: &[&str] = &[
    "safetensors",
    "bin",
    "ckpt",
    "pt",
    "pth",
    "json",
    "txt",
    "model",
];

/// The one top-level file of a diffusers pipeline folder that is part of the model (and the
/// file that makes a folder one).
const TOP_LEVEL_FILE: &str = "model_index.json";
const FINGERPRINT_PREFIX: &[u8] = b"mifo-model-fingerprint/1\n";
const SINGLE_FILE_PREFIX: &[u8] = b"mifo-model-fingerprint/single-file/1\n";
/// Weight files, left out of a `--model-config` folder's share of a single file's fingerprint.
const WEIGHT_EXTENSIONS: &[&str] = &["safetensors", "bin", "ckpt", "pt", "pth"];
/// Key prefix of file-hash cache entries in the `meta` tree.
pub(crate) const CACHE_KEY_PREFIX: &[u8] = b"fingerprint-cache/";

/// A cached file hash, valid while the file's size and modification time are unchanged.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CachedFileHash {
    size: u64,
    mtime_ns: u128,
    hash: Digest,
}

/// The model files of `dir`: (relative path with `/` separators, absolute path), sorted.
fn model_files(dir: &Path) -> StoreResult<Vec<(String, PathBuf)>> {
    fn walk(
        dir: &Path,
        rel: &str,
        pipeline: bool,
        out: &mut Vec<(String, PathBuf)>,
    ) -> StoreResult<()> {
        for entry in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let rel_path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            // Follow symlinks (Hugging Face caches link files into snapshot folders).
            let meta = fs::metadata(&path).map_err(|e| StoreError::io(&path, e))?;
            if meta.is_dir() {
                walk(&path, &rel_path, pipeline, out)?;
            } else if meta.is_file() && (!rel.is_empty() || !pipeline || name == TOP_LEVEL_FILE) {
                let ext = Path::new(&name)
                    .extension()
                    .map(|e| e.to_string_lossy().to_ascii_lowercase())
                    .unwrap_or_default();
                if MODEL_FILE_EXTENSIONS.contains(&ext.as_str()) {
                    out.push((rel_path, path));
                }
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    let pipeline = dir.join(TOP_LEVEL_FILE).is_file();
    walk(dir, "", pipeline, &mut files)?;
    files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(files)
}

fn hash_file(path: &Path) -> StoreResult<Digest> {
    let mut file = fs::File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut hasher = blake3::Hasher::new();
    io::copy(&mut file, &mut hasher).map_err(|e| StoreError::io(path, e))?;
    Ok(Digest::from(hasher.finalize()))
}

/// Fingerprints `dir`, reusing and refreshing per-file hashes in `cache` (the `meta` tree) when given.
pub(crate) fn fingerprint_dir(dir: &Path, cache: Option<&sled::Tree>) -> StoreResult<Digest> {
    let meta = fs::metadata(dir).map_err(|e| StoreError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(StoreError::io(dir, io::Error::other("not a folder")));
    }
    let files = model_files(dir)?;
    if files.is_empty() {
        return Err(StoreError::InvalidInput(format!(
            "{}: no model files ({}) to fingerprint",
            dir.display(),
            MODEL_FILE_EXTENSIONS.join(", ")
        )));
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(FINGERPRINT_PREFIX);
    for (rel, path) in &files {
        let hash = match cache {
            Some(tree) => cached_hash(tree, path)?,
            None => hash_file(path)?,
        };
        hasher.update(rel.as_bytes());
        hasher.update(b"\n");
        hasher.update(hash.to_hex().as_bytes());
        hasher.update(b"\n");
    }
    Ok(Digest::from(hasher.finalize()))
}

/// Fingerprints a model source: a folder ([`fingerprint_dir`]; `config` must be `None`), or a
/// single checkpoint file with the configs of its `--model-config` folder `config`.
pub(crate) fn fingerprint_model(
    path: &Path,
    config: Option<&Path>,
    cache: Option<&sled::Tree>,
) -> StoreResult<Digest> {
    let meta = fs::metadata(path).map_err(|e| StoreError::io(path, e))?;
    if meta.is_dir() {
        return fingerprint_dir(path, cache);
    }
    let hash = |p: &Path| match cache {
        Some(tree) => cached_hash(tree, p),
        None => hash_file(p),
    };
    let mut hasher = blake3::Hasher::new();
    hasher.update(SINGLE_FILE_PREFIX);
    hasher.update(hash(path)?.to_hex().as_bytes());
    hasher.update(b"\n");
    if let Some(dir) = config {
        for (rel, file) in model_files(dir)? {
            let ext = Path::new(&rel)
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if WEIGHT_EXTENSIONS.contains(&ext.as_str()) {
                continue;
            }
            hasher.update(b"config/");
            hasher.update(rel.as_bytes());
            hasher.update(b"\n");
            hasher.update(hash(&file)?.to_hex().as_bytes());
            hasher.update(b"\n");
        }
    }
    Ok(Digest::from(hasher.finalize()))
}

fn cached_hash(tree: &sled::Tree, path: &Path) -> StoreResult<Digest> {
    let absolute = fs::canonicalize(path).map_err(|e| StoreError::io(path, e))?;
    let meta = fs::metadata(&absolute).map_err(|e| StoreError::io(&absolute, e))?;
    let size = meta.len();
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut key = CACHE_KEY_PREFIX.to_vec();
    key.extend_from_slice(absolute.to_string_lossy().as_bytes());
    if let Some(bytes) = tree
        .get(&key)
        .db(|| format!("reading fingerprint cache for {}", absolute.display()))?
    {
        // A corrupt cache entry is only a cache miss.
        if let Ok((entry, _)) =
            bincode::serde::decode_from_slice::<CachedFileHash, _>(&bytes, bincode_config())
        {
            if entry.size == size && entry.mtime_ns == mtime_ns && mtime_ns != 0 {
                return Ok(entry.hash);
            }
        }
    }
    let hash = hash_file(&absolute)?;
    let entry = CachedFileHash {
        size,
        mtime_ns,
        hash,
    };
    if let Ok(bytes) = bincode::serde::encode_to_vec(&entry, bincode_config()) {
        tree.insert(key, bytes)
            .db(|| format!("writing fingerprint cache for {}", absolute.display()))?;
    }
    Ok(hash)
}
