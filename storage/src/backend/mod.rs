//! Storage backends: bytes by (kind, name), nothing more.
//!
//! One trait per capability, as in rustic_core: [`ReadBackend`] (whole object
//! and byte ranges), [`ListBackend`], [`WriteBackend`] (atomic create/replace)
//! and [`DeleteBackend`]. [`Backend`] is the union every repository needs.
//! The repository layout (which kind lives in which folder) is defined once,
//! in [`object_path`]. Every backend must pass [`conformance::run_all`].

pub mod cache;
pub mod conformance;
pub mod fs;
pub mod s3;

use std::fmt;

use crate::error::Result;

/// The kinds of objects stored in a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Config,
    Key,
    Pack,
    Index,
    Snapshot,
    Lock,
    /// Deferred deletions of maintenance (two-phase garbage collection).
    Plan,
}

impl FileKind {
    pub const ALL: [FileKind; 7] = [
        FileKind::Config,
        FileKind::Key,
        FileKind::Pack,
        FileKind::Index,
        FileKind::Snapshot,
        FileKind::Lock,
        FileKind::Plan,
    ];

    /// Folder of this kind under the repository root (`None` for the config).
    pub fn folder(self) -> Option<&'static str> {
        match self {
            FileKind::Config => None,
            FileKind::Key => Some("keys"),
            FileKind::Pack => Some("packs"),
            FileKind::Index => Some("index"),
            FileKind::Snapshot => Some("snapshots"),
            FileKind::Lock => Some("locks"),
            FileKind::Plan => Some("plans"),
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Config => "config",
            FileKind::Key => "key",
            FileKind::Pack => "pack",
            FileKind::Index => "index",
            FileKind::Snapshot => "snapshot",
            FileKind::Lock => "lock",
            FileKind::Plan => "plan",
        })
    }
}

/// Name of the single configuration object at the repository root.
pub const CONFIG_NAME: &str = "marmoset.repository";

/// The one place that maps (kind, name) to a relative object path.
/// Packs are fanned out over 256 folders by the first two hex digits so no
/// directory (or S3 listing page) grows without bound.
pub fn object_path(kind: FileKind, name: &str) -> String {
    match kind {
        FileKind::Config => CONFIG_NAME.to_string(),
        FileKind::Pack => {
            let prefix = name.get(..2).unwrap_or("00");
            format!("packs/{prefix}/{name}")
        }
        other => format!("{}/{name}", other.folder().unwrap_or("")),
    }
}

/// Reads whole objects or byte ranges.
pub trait ReadBackend: Send + Sync {
    /// Human-readable location, e.g. the repository directory.
    fn location(&self) -> String;
    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>>;
    /// Reads exactly `length` bytes at `offset`; a short object is an error.
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>>;
    /// Size of one object, `NotFound` when it does not exist.
    fn size(&self, kind: FileKind, name: &str) -> Result<u64>;
    /// Request and byte counters, for backends that bill by request.
    fn stats(&self) -> Option<s3::BackendStats> {
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
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()>;
}

/// Removes objects. Removing a missing object is not an error.
pub trait DeleteBackend: Send + Sync {
    fn remove(&self, kind: FileKind, name: &str) -> Result<()>;
}

/// Everything a repository needs from its storage.
pub trait Backend: ReadBackend + ListBackend + WriteBackend + DeleteBackend {}
impl<T: ReadBackend + ListBackend + WriteBackend + DeleteBackend> Backend for T {}
