//! Content-addressed blob files: `<store>/blobs/<first 2 hex>/<64 hex blake3>`.
//!
//! A blob is written to `blobs/tmp/<random>.tmp`, fsynced, renamed into place, and its folder
//! fsynced, so a blob file either does not exist or holds exactly the bytes its name hashes to. A
//! crash can leave only stray temp files, which `gc` removes.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::error::{StoreError, StoreResult};
use super::ids::{BlobHash, Digest};

/// The blob folder of a store.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

/// One file found in the blob folder.
#[derive(Debug)]
pub enum BlobEntry {
    /// A well-named blob file.
    Blob {
        /// Its name, parsed.
        hash: BlobHash,
        /// Its path.
        path: PathBuf,
    },
    /// A temp file left by an interrupted write.
    Temp(PathBuf),
    /// Anything else (badly named, misplaced, a folder where a file belongs…).
    Unexpected(PathBuf),
}

const TEMP_DIR: &str = "tmp";

impl BlobStore {
    /// The blob folder under `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        BlobStore { root: root.into() }
    }

    /// The blob folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where blob `hash` lives (whether or not it exists).
    pub fn path(&self, hash: &BlobHash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// True when blob `hash` has a file.
    pub fn contains(&self, hash: &BlobHash) -> bool {
        self.path(hash).is_file()
    }

    /// Stores `bytes`, returning their hash. A blob that is already present is not rewritten.
    pub fn put(&self, bytes: &[u8]) -> StoreResult<BlobHash> {
        let hash = Digest::of(bytes);
        let target = self.path(&hash);
        if file_len(&target) == Some(bytes.len() as u64) {
            return Ok(hash);
        }
        let (temp_path, mut temp) = self.temp_file()?;
        let written = temp
            .write_all(bytes)
            .and_then(|()| temp.sync_all())
            .map_err(|e| StoreError::io(&temp_path, e));
        drop(temp);
        if let Err(e) = written {
            let _ = fs::remove_file(&temp_path);
            return Err(e);
        }
        self.publish(&temp_path, &target)?;
        Ok(hash)
    }

    /// Stores the contents of file `source` (streamed, not read into memory), returning their hash.
    pub fn put_file(&self, source: &Path) -> StoreResult<BlobHash> {
        let mut input = File::open(source).map_err(|e| StoreError::io(source, e))?;
        let (temp_path, mut temp) = self.temp_file()?;
        let mut hasher = blake3::Hasher::new();
        let mut buffer = vec![0u8; 1 << 16];
        let copied: io::Result<()> = (|| {
            loop {
                let n = input.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                temp.write_all(&buffer[..n])?;
            }
            temp.sync_all()
        })();
        drop(temp);
        if let Err(e) = copied {
            let _ = fs::remove_file(&temp_path);
            return Err(StoreError::io(source, e));
        }
        let hash = Digest::from(hasher.finalize());
        let target = self.path(&hash);
        if target.is_file() {
            let _ = fs::remove_file(&temp_path);
            return Ok(hash);
        }
        self.publish(&temp_path, &target)?;
        Ok(hash)
    }

    /// Reads blob `hash` and checks that its bytes still hash to its name.
    pub fn read(&self, hash: &BlobHash) -> StoreResult<Vec<u8>> {
        let path = self.path(hash);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob {
                    hash: hash.to_hex(),
                })
            }
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let actual = Digest::of(&bytes);
        if actual != *hash {
            return Err(StoreError::CorruptBlob {
                hash: hash.to_hex(),
                path,
                detail: format!("content hashes to {actual} ({} bytes)", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// Re-hashes blob `hash` from disk (streamed); returns its size when it is intact.
    pub fn verify(&self, hash: &BlobHash) -> StoreResult<u64> {
        let path = self.path(hash);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob {
                    hash: hash.to_hex(),
                })
            }
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let mut hasher = blake3::Hasher::new();
        let size = io::copy(&mut file, &mut hasher).map_err(|e| StoreError::io(&path, e))?;
        let actual = Digest::from(hasher.finalize());
        if actual != *hash {
            return Err(StoreError::CorruptBlob {
                hash: hash.to_hex(),
                path,
                detail: format!("content hashes to {actual} ({size} bytes)"),
            });
        }
        Ok(size)
    }

    /// Deletes blob `hash`; returns the bytes freed (0 when it was absent).
    pub fn remove(&self, hash: &BlobHash) -> StoreResult<u64> {
        let path = self.path(hash);
        let size = match fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
        Ok(size)
    }

    /// Every file under the blob folder, classified.
    pub fn entries(&self) -> StoreResult<Vec<BlobEntry>> {
        let mut entries = Vec::new();
        let top = match fs::read_dir(&self.root) {
            Ok(top) => top,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(entries),
            Err(e) => return Err(StoreError::io(&self.root, e)),
        };
        for dir in top {
            let dir = dir.map_err(|e| StoreError::io(&self.root, e))?;
            let dir_path = dir.path();
            let dir_name = dir.file_name().to_string_lossy().into_owned();
            let is_dir = dir.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if !is_dir {
                entries.push(BlobEntry::Unexpected(dir_path));
                continue;
            }
            let is_temp_dir = dir_name == TEMP_DIR;
            let is_shard = dir_name.len() == 2
                && dir_name
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
            if !is_temp_dir && !is_shard {
                entries.push(BlobEntry::Unexpected(dir_path));
                continue;
            }
            for file in fs::read_dir(&dir_path).map_err(|e| StoreError::io(&dir_path, e))? {
                let file = file.map_err(|e| StoreError::io(&dir_path, e))?;
                let path = file.path();
                let name = file.file_name().to_string_lossy().into_owned();
                let is_file = file.file_type().map(|t| t.is_file()).unwrap_or(false);
                if is_temp_dir {
                    entries.push(if is_file {
                        BlobEntry::Temp(path)
                    } else {
                        BlobEntry::Unexpected(path)
                    });
                    continue;
                }
                match name.parse::<Digest>() {
                    Ok(hash) if is_file && name.starts_with(&dir_name) && name == hash.to_hex() => {
                        entries.push(BlobEntry::Blob { hash, path })
                    }
                    _ => entries.push(BlobEntry::Unexpected(path)),
                }
            }
        }
        entries.sort_by(|a, b| entry_path(a).cmp(entry_path(b)));
        Ok(entries)
    }

    fn temp_file(&self) -> StoreResult<(PathBuf, File)> {
        let dir = self.root.join(TEMP_DIR);
        create_dir_synced(&dir)?;
        for _ in 0..16 {
            let path = dir.join(format!("{:016x}.tmp", rand::random::<u64>()));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => return Ok((path, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(StoreError::io(&path, e)),
            }
        }
        Err(StoreError::io(
            dir,
            io::Error::other("could not create a unique temp file"),
        ))
    }

    /// Renames a synced temp file to its final name and fsyncs the folder that now holds it.
    fn publish(&self, temp_path: &Path, target: &Path) -> StoreResult<()> {
        let shard = target.parent().unwrap_or(&self.root);
        if let Err(e) = create_dir_synced(shard) {
            let _ = fs::remove_file(temp_path);
            return Err(e);
        }
        if let Err(e) = fs::rename(temp_path, target) {
            let _ = fs::remove_file(temp_path);
            return Err(StoreError::io(target, e));
        }
        sync_dir(shard)
    }
}

fn entry_path(entry: &BlobEntry) -> &Path {
    match entry {
        BlobEntry::Blob { path, .. } | BlobEntry::Temp(path) | BlobEntry::Unexpected(path) => path,
    }
}

fn file_len(path: &Path) -> Option<u64> {
    fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// Creates `dir` (and missing parents) and fsyncs each parent whose entries changed.
pub(crate) fn create_dir_synced(dir: &Path) -> StoreResult<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir_synced(parent)?;
        }
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(StoreError::io(dir, e)),
    }
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => Ok(()),
    }
}

/// fsyncs a folder so that renames and creations inside it survive a power loss.
pub(crate) fn sync_dir(dir: &Path) -> StoreResult<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io(dir, e))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}
