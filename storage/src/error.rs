//! Error policy of `marmoset-storage`.
//!
//! * Every error names what it was about: the repository object (kind and
//!   name), the blob id, or the source/target path. A user reading the message
//!   must know which pack or file is affected without a debugger.
//! * Corruption (failed MAC, wrong content id, malformed bytes) is never
//!   retried and never papered over: it becomes `Corrupt`/`Decrypt` and the
//!   caller decides whether to skip the affected file or stop.
//! * Backend errors carry `retryable()` so wrappers (retry, S3) know whether a
//!   second attempt can help.
//! * Library code returns errors; it never panics on bad input.

use std::path::PathBuf;

use crate::backend::FileKind;
use crate::id::Id;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no repository at {location} (run `marmoset init` first)")]
    RepositoryNotFound { location: String },
    #[error("a repository already exists at {location}")]
    RepositoryExists { location: String },
    #[error("repository format version {found} is newer than this marmoset supports ({supported}); upgrade marmoset")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("wrong password: no key in the repository opens with it")]
    WrongPassword,
    #[error("{kind} {name}: not found in the repository")]
    NotFound { kind: FileKind, name: String },
    #[error("backend {op} {kind} {name}: {source}")]
    Backend {
        op: &'static str,
        kind: FileKind,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: authentication failed (corrupted or tampered data)")]
    Decrypt { what: String },
    #[error("{what}: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("blob {id} is not in the index (missing data; run `marmoset check`)")]
    BlobNotFound { id: Id },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("index cache: {0}")]
    Index(#[from] marmoset_index::IndexError),
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("snapshot prefix {0:?} is ambiguous")]
    AmbiguousSnapshot(String),
    #[error("path {path:?} not found in snapshot")]
    PathNotFound { path: String },
    #[error("key {0:?} not found")]
    KeyNotFound(String),
    #[error("refusing to remove the last key of the repository")]
    LastKey,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("another maintenance is running: {owner}")]
    MaintenanceRunning { owner: String },
    #[error("operation aborted: {0}")]
    Aborted(String),
}

impl Error {
    /// Whether repeating the same operation could succeed (transient I/O).
    pub fn retryable(&self) -> bool {
        match self {
            Error::Backend { source, .. } | Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
