//! A local cache of immutable metadata objects (index files, snapshots) in
//! front of a remote backend, so listing snapshots or opening a repository
//! does not download them again. Both kinds are named by the hash of their
//! bytes, so a cached copy is verified on every read and can never be stale;
//! a damaged copy is simply fetched again. Folders are created `0700` and
//! files `0600`: the copies are encrypted, but their names and sizes are
//! nobody else's business.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    Backend, Bytes, DeleteBackend, FileKind, ListBackend, ObjectInfo, ReadBackend, RequestStats,
    WriteBackend,
};
use crate::error::Result;
use crate::format::id::Id;

pub struct CachedBackend {
    inner: Arc<dyn Backend>,
    dir: PathBuf,
}

impl CachedBackend {
    pub fn new(inner: Arc<dyn Backend>, dir: PathBuf) -> Self {
        Self { inner, dir }
    }

    fn cached(kind: FileKind) -> bool {
        matches!(kind, FileKind::Index | FileKind::Snapshot)
    }

    fn path(&self, kind: FileKind, name: &str) -> PathBuf {
        self.dir.join(kind.folder().unwrap_or("")).join(name)
    }

    fn store(&self, kind: FileKind, name: &str, data: &[u8]) {
        let p = self.path(kind, name);
        if let Some(parent) = p.parent() {
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent);
        }
        // Best effort: the cache is an optimisation.
        let tmp = p.with_extension("tmp");
        if write_private(&tmp, data).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

impl ReadBackend for CachedBackend {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        if Self::cached(kind) {
            if let Ok(data) = std::fs::read(self.path(kind, name)) {
                if Id::of_bytes(&data).to_hex() == name {
                    return Ok(data);
                }
            }
            let data = self.inner.read(kind, name)?;
            if Id::of_bytes(&data).to_hex() == name {
                self.store(kind, name, &data);
            }
            return Ok(data);
        }
        self.inner.read(kind, name)
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        self.inner.read_range(kind, name, offset, length)
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        self.inner.size(kind, name)
    }

    fn stats(&self) -> Option<RequestStats> {
        self.inner.stats()
    }

    fn write_parallelism(&self) -> usize {
        self.inner.write_parallelism()
    }

    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
}

impl ListBackend for CachedBackend {
    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        self.inner.list(kind)
    }

    fn list_info(&self, kind: FileKind) -> Result<Vec<ObjectInfo>> {
        self.inner.list_info(kind)
    }
}

impl WriteBackend for CachedBackend {
    fn create(&self) -> Result<()> {
        self.inner.create()
    }

    fn write(&self, kind: FileKind, name: &str, data: Bytes) -> Result<()> {
        if Self::cached(kind) {
            // A clone of `Bytes` shares the buffer.
            self.inner.write(kind, name, data.clone())?;
            self.store(kind, name, &data);
        } else {
            self.inner.write(kind, name, data)?;
        }
        Ok(())
    }
}

impl DeleteBackend for CachedBackend {
    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        self.inner.remove(kind, name)?;
        if Self::cached(kind) {
            let _ = std::fs::remove_file(self.path(kind, name));
        }
        Ok(())
    }
}
