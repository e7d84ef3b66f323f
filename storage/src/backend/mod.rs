//! Storage backends: bytes by (kind, name), nothing more.
//!
//! One trait per capability, as in rustic_core: [`ReadBackend`] (whole object
//! and byte ranges), [`ListBackend`], [`WriteBackend`] (atomic create/replace)
//! and [`DeleteBackend`]. [`Backend`] is the union every repository needs.
//! The repository layout (which kind lives in which folder) is defined once,
//! in [`object_path`]. Every backend, and the wrapped stack, must pass the conformance suite
//! (`marmoset_testing::conformance`, run by `tests/integration/backends.rs`).
//!
//! Storages are plain: [`fs::FsBackend`] and [`s3::S3Backend`] make one
//! attempt per call and count nothing. Everything else is a wrapper around
//! any backend, one file each, stacked by [`open()`]:
//!
//! ```text
//! base (fs | s3) → retry (remote only) → throttle (if limited) → metered → cache (remote only)
//! ```
//!
//! * [`retry::RetryBackend`]: repeats calls whose error is
//!   [`Error::retryable`](crate::Error::retryable), with capped exponential
//!   backoff and full jitter.
//! * [`throttle::ThrottleBackend`]: upload and download limits in bytes per
//!   second, one token bucket per direction shared by every thread.
//! * [`metered::MeteredBackend`]: request and byte counts by kind, reported
//!   through [`ReadBackend::stats`] as [`RequestStats`].
//! * [`cache::CachedBackend`]: local copies of immutable metadata objects.
//!
//! Writes take [`Bytes`], so a retried or cached write shares the one
//! buffer instead of copying a pack.

pub mod cache;
mod direct_io;
pub mod fs;
pub mod metered;
mod open;
pub mod retry;
pub mod s3;
pub mod throttle;

use std::sync::Arc;

use crate::error::Result;
pub use crate::format::paths::{object_path, FileKind, CONFIG_NAME};
/// The buffer type of writes (re-exported so callers need no `bytes`
/// dependency of their own).
pub use bytes::Bytes;
pub use metered::RequestStats;
pub use open::{open, BackendOptions, Location};

/// Reads whole objects or byte ranges.
pub trait ReadBackend: Send + Sync {
    /// Human-readable location, e.g. the repository directory.
    fn location(&self) -> String;
    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>>;
    /// Reads exactly `length` bytes at `offset`; a short object is an error.
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>>;
    /// Size of one object, `NotFound` when it does not exist.
    fn size(&self, kind: FileKind, name: &str) -> Result<u64>;
    /// Request and byte counters, where a [`metered::MeteredBackend`] (or
    /// a [`retry::RetryBackend`], for its retries) is in the stack; plain
    /// storages answer `None` and wrappers pass the question down.
    fn stats(&self) -> Option<RequestStats> {
        None
    }
    /// How many objects callers should write in parallel.
    fn write_parallelism(&self) -> usize {
        2
    }
    /// Whether reads cross a network (metadata blobs are then cached).
    fn is_remote(&self) -> bool {
        false
    }
}

/// One listed object: its name, size and the storage's own last-modified
/// time (`None` where the storage does not say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// Lists the names (not paths) and sizes of all objects of a kind.
pub trait ListBackend: Send + Sync {
    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>>;

    /// The names [`ListBackend::list`] gives, without their sizes.
    fn list_names(&self, kind: FileKind) -> Result<Vec<String>> {
        Ok(self.list(kind)?.into_iter().map(|(n, _)| n).collect())
    }

    /// Like [`ListBackend::list`], with the storage's modification times.
    /// Coordination (leases, plans) times objects by the storage's clock
    /// where it offers one, so two hosts' clocks are never compared.
    fn list_info(&self, kind: FileKind) -> Result<Vec<ObjectInfo>> {
        Ok(self
            .list(kind)?
            .into_iter()
            .map(|(name, size)| ObjectInfo {
                name,
                size,
                modified: None,
            })
            .collect())
    }
}

/// Creates objects atomically: readers see the whole object or nothing.
pub trait WriteBackend: Send + Sync {
    /// Prepares an empty repository location (folders, bucket prefix).
    fn create(&self) -> Result<()>;
    /// Creates or atomically replaces one object. Every write is idempotent
    /// (objects are content-addressed or replaced whole), so wrappers may
    /// repeat it; `data` is shared, not copied, by each attempt.
    fn write(&self, kind: FileKind, name: &str, data: Bytes) -> Result<()>;
}

/// Removes objects. Removing a missing object is not an error.
pub trait DeleteBackend: Send + Sync {
    fn remove(&self, kind: FileKind, name: &str) -> Result<()>;
}

/// Everything a repository needs from its storage.
pub trait Backend: ReadBackend + ListBackend + WriteBackend + DeleteBackend {}
impl<T: ReadBackend + ListBackend + WriteBackend + DeleteBackend> Backend for T {}

// A shared backend is a backend, so wrappers can stack over an
// `Arc<dyn Backend>` as well as over a concrete type.

impl<T: ReadBackend + ?Sized> ReadBackend for Arc<T> {
    fn location(&self) -> String {
        (**self).location()
    }
    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        (**self).read(kind, name)
    }
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        (**self).read_range(kind, name, offset, length)
    }
    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        (**self).size(kind, name)
    }
    fn stats(&self) -> Option<RequestStats> {
        (**self).stats()
    }
    fn write_parallelism(&self) -> usize {
        (**self).write_parallelism()
    }
    fn is_remote(&self) -> bool {
        (**self).is_remote()
    }
}

impl<T: ListBackend + ?Sized> ListBackend for Arc<T> {
    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        (**self).list(kind)
    }
    fn list_info(&self, kind: FileKind) -> Result<Vec<ObjectInfo>> {
        (**self).list_info(kind)
    }
}

impl<T: WriteBackend + ?Sized> WriteBackend for Arc<T> {
    fn create(&self) -> Result<()> {
        (**self).create()
    }
    fn write(&self, kind: FileKind, name: &str, data: Bytes) -> Result<()> {
        (**self).write(kind, name, data)
    }
}

impl<T: DeleteBackend + ?Sized> DeleteBackend for Arc<T> {
    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        (**self).remove(kind, name)
    }
}
