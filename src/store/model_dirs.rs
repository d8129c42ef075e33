//! The store's memory of model folders: each model's fingerprint (file hashes cached in the
//! `meta` tree) and the folder last used with it (`model-dir/<fingerprint hex>` in `meta`), so
//! that later commands find a run's model from its spec.

use std::path::{Path, PathBuf};

use super::error::{DbContext, StoreError, StoreResult};
use super::fingerprint;
use super::ids::Digest;
use super::Store;

impl Store {
    /// [`model_fingerprint`] of `dir`, with per-file hashes cached in this store by path, size and
    /// modification time.
    pub fn model_fingerprint(&self, dir: &Path) -> StoreResult<Digest> {
        fingerprint::fingerprint_dir(dir, Some(&self.inner.meta))
    }

    /// Notes `dir` (made absolute) as the folder of the model whose fingerprint is `fingerprint`,
    /// so that later commands can find it from a run's spec ([`Self::model_dir_for`]). The
    /// latest folder noted for a fingerprint wins.
    pub fn remember_model_dir(&self, fingerprint: &Digest, dir: &Path) -> StoreResult<()> {
        let dir = std::fs::canonicalize(dir).map_err(|e| StoreError::io(dir, e))?;
        self.inner
            .meta
            .insert(model_dir_key(fingerprint), dir.to_string_lossy().as_bytes())
            .db(|| "noting a model folder".into())?;
        Ok(())
    }

    /// The folder last noted for the model `fingerprint`, if it is still a folder whose files
    /// have that fingerprint.
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
        let same = dir.is_dir()
            && self
                .model_fingerprint(&dir)
                .is_ok_and(|now| now == *fingerprint);
        Ok(same.then_some(dir))
    }
}

/// blake3 fingerprint of a model folder's weight and config files (relative path + content); see
/// the `fingerprint` module docs for the exact rule. [`Store::model_fingerprint`] caches file hashes.
pub fn model_fingerprint(dir: &Path) -> StoreResult<Digest> {
    fingerprint::fingerprint_dir(dir, None)
}

/// Meta key of the folder noted for a model fingerprint.
fn model_dir_key(fingerprint: &Digest) -> Vec<u8> {
    format!("model-dir/{}", fingerprint.to_hex()).into_bytes()
}
