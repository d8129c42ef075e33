//! The store's memory of model folders: each model's fingerprint (file hashes cached in the
//! `meta` tree) and the folder last used with it (`model-dir/<fingerprint hex>` in `meta`), so
//! that later commands find a run's model from its spec. A single-file checkpoint is remembered
//! the same way (the file as its "folder"), with its `--model-config` folder, if any, under
//! `model-config/<fingerprint hex>`.

use std::path::{Path, PathBuf};

use super::error::{DbContext, StoreError, StoreResult};
use super::fingerprint;
use super::ids::Digest;
use super::Store;

impl Store {
    /// [`model_fingerprint`] of `dir`, with per-file hashes cached in this store by path, size and
    /// modification time.
    pub fn model_fingerprint(&self, dir: &Path) -> StoreResult<Digest> {
        self.model_fingerprint_with(dir, None)
    }

    /// [`model_fingerprint_with`] of a folder or single file and its config folder, with
    /// per-file hashes cached in this store.
    pub fn model_fingerprint_with(
        &self,
        path: &Path,
        config: Option<&Path>,
    ) -> StoreResult<Digest> {
        fingerprint::fingerprint_model(path, config, Some(&self.inner.meta))
    }

    /// Notes `dir` (made absolute; a folder, or a single checkpoint file with its config folder
    /// `config`) as the place of the model whose fingerprint is `fingerprint`, so that later
    /// commands can find it from a run's spec ([`Self::model_dir_for`],
    /// [`Self::model_config_for`]). The latest place noted for a fingerprint wins.
    pub fn remember_model_dir(
        &self,
        fingerprint: &Digest,
        dir: &Path,
        config: Option<&Path>,
    ) -> StoreResult<()> {
        let dir = std::fs::canonicalize(dir).map_err(|e| StoreError::io(dir, e))?;
        self.inner
            .meta
            .insert(model_dir_key(fingerprint), dir.to_string_lossy().as_bytes())
            .db(|| "noting a model folder".into())?;
        let key = model_config_key(fingerprint);
        match config {
            Some(c) => {
                let c = std::fs::canonicalize(c).map_err(|e| StoreError::io(c, e))?;
                self.inner
                    .meta
                    .insert(key, c.to_string_lossy().as_bytes())
                    .db(|| "noting a model config folder".into())?;
            }
            None => {
                self.inner
                    .meta
                    .remove(key)
                    .db(|| "noting a model config folder".into())?;
            }
        }
        Ok(())
    }

    /// The `--model-config` folder noted with the model `fingerprint` (single files only).
    pub fn model_config_for(&self, fingerprint: &Digest) -> StoreResult<Option<PathBuf>> {
        Ok(self
            .inner
            .meta
            .get(model_config_key(fingerprint))
            .db(|| "reading a model config folder".into())?
            .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned())))
    }

    /// The folder (or single file) last noted for the model `fingerprint`, if it still holds
    /// weights with that fingerprint.
    pub fn model_dir_for(&self, fingerprint: &Digest) -> StoreResult<Option<PathBuf>> {
        let Some(bytes) = self
            .inner
            .meta
            .get(model_dir_key(fingerprint))
            .db(|| "reading a model folder".into())?
        else {
            return Ok(None);
        };
        let dir = PathBuf::from(String::from_utf8_lossy(&bytes).into_owned());
        let config = self.model_config_for(fingerprint)?;
        let same = dir.exists()
            && self
                .model_fingerprint_with(&dir, config.as_deref())
                .is_ok_and(|now| now == *fingerprint);
        Ok(same.then_some(dir))
    }
}

/// blake3 fingerprint of a model folder's weight and config files (relative path + content); see
/// the `fingerprint` module docs for the exact rule. [`Store::model_fingerprint`] caches file hashes.
pub fn model_fingerprint(dir: &Path) -> StoreResult<Digest> {
    fingerprint::fingerprint_dir(dir, None)
}

/// blake3 fingerprint of a model folder, or of a single-file checkpoint with its
/// `--model-config` folder (see the `fingerprint` module docs).
pub fn model_fingerprint_with(path: &Path, config: Option<&Path>) -> StoreResult<Digest> {
    fingerprint::fingerprint_model(path, config, None)
}

/// Meta key of the config folder noted for a single-file model's fingerprint.
fn model_config_key(fingerprint: &Digest) -> Vec<u8> {
    format!("model-config/{}", fingerprint.to_hex()).into_bytes()
}

/// Meta key of the folder noted for a model fingerprint.
fn model_dir_key(fingerprint: &Digest) -> Vec<u8> {
    format!("model-dir/{}", fingerprint.to_hex()).into_bytes()
}
