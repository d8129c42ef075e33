//! Run tags: one empty value per (run, tag) in the `tags` tree (key: run id ++ tag).

use std::collections::HashMap;

use super::error::{DbContext, StoreError, StoreResult};
use super::ids::{RunId, RUN_ID_LEN};
use super::Store;

/// Longest tag.
pub const MAX_TAG_LEN: usize = 64;

impl Store {
    /// Tags run `id` with `tag` (1 to 64 characters, no whitespace or control characters).
    pub fn add_tag(&self, id: &RunId, tag: &str) -> StoreResult<()> {
        validate_tag(tag)?;
        self.get_run(id)?;
        self.inner
            .tags
            .insert(tag_key(id, tag), &[])
            .db(|| format!("tagging run {id}"))?;
        self.sync()
    }

    /// Removes `tag` from run `id`; returns whether it was there.
    pub fn remove_tag(&self, id: &RunId, tag: &str) -> StoreResult<bool> {
        let removed = self
            .inner
            .tags
            .remove(tag_key(id, tag))
            .db(|| format!("untagging run {id}"))?
            .is_some();
        self.sync()?;
        Ok(removed)
    }

    /// The tags of run `id`, sorted.
    pub fn tags(&self, id: &RunId) -> StoreResult<Vec<String>> {
        let mut tags = Vec::new();
        for key in self.inner.tags.scan_prefix(id.as_bytes()).keys() {
            let key = key.db(|| format!("reading tags of run {id}"))?;
            tags.push(String::from_utf8_lossy(&key[RUN_ID_LEN..]).into_owned());
        }
        Ok(tags)
    }

    /// The tags of every tagged run.
    pub fn all_tags(&self) -> StoreResult<HashMap<RunId, Vec<String>>> {
        let mut all: HashMap<RunId, Vec<String>> = HashMap::new();
        for key in self.inner.tags.iter().keys() {
            let key = key.db(|| "reading tags".into())?;
            if key.len() <= RUN_ID_LEN {
                continue;
            }
            if let Ok(id) = RunId::from_key(&key[..RUN_ID_LEN]) {
                all.entry(id)
                    .or_default()
                    .push(String::from_utf8_lossy(&key[RUN_ID_LEN..]).into_owned());
            }
        }
        Ok(all)
    }
}

fn tag_key(id: &RunId, tag: &str) -> Vec<u8> {
    let mut key = id.as_bytes().to_vec();
    key.extend_from_slice(tag.as_bytes());
    key
}

/// Checks a tag: 1 to [`MAX_TAG_LEN`] bytes without whitespace or control characters.
pub fn validate_tag(tag: &str) -> StoreResult<()> {
    if tag.is_empty()
        || tag.len() > MAX_TAG_LEN
        || tag.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(StoreError::InvalidInput(format!(
            "tag {tag:?} must be 1 to {MAX_TAG_LEN} bytes without whitespace"
        )));
    }
    Ok(())
}
