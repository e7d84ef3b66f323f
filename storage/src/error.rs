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

use crate::format::id::Id;
use crate::format::paths::FileKind;

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
    #[error("wrong password, or the repository's key files are damaged: {reason}")]
    NoUsableKey { reason: String },
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
    #[error("{object}{}: authentication failed (corrupted or tampered data)", in_pack(.pack))]
    Decrypt {
        /// What failed to authenticate: "blob <id>", "index <name>", ...
        object: String,
        /// The pack it was read from, when it lives in one.
        pack: Option<String>,
    },
    #[error("{object}{}: {reason}", in_pack(.pack))]
    Corrupt {
        object: String,
        pack: Option<String>,
        reason: String,
    },
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
    #[error("cache directory {path}: {reason}; refusing to use it (choose a private one with --cache-dir or MARMOSET_CACHE_DIR)")]
    UnsafeCacheDir { path: PathBuf, reason: String },
    #[error("the repository holds {count} key files and only {tried} are tried per open (a guard against planted key files): the password is wrong or its key was not among those tried; remove unneeded keys with `marmoset key remove` where the repository opens, or write the id of your key to {hint} so it is tried first")]
    TooManyKeys {
        count: usize,
        tried: usize,
        hint: PathBuf,
    },
    #[error("lease {lease} was lost ({reason}); maintenance may have removed data this run relied on, so its result is discarded: run it again")]
    LeaseLost { lease: String, reason: String },
    #[error("{count} packs this backup references are gone from the repository (first: {first}); they were removed while it ran, so no snapshot was written: run the backup again")]
    PacksVanished { count: usize, first: String },
    #[error("this host's clock is {skew_secs}s off the storage's clock (more than {max_secs}s): fix time synchronisation (NTP) first")]
    ClockSkew { skew_secs: i64, max_secs: i64 },
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

    pub(crate) fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.into(),
            pack: None,
            reason: reason.into(),
        }
    }

    /// Names the pack a blob's decryption or corruption error happened in.
    pub(crate) fn in_pack(self, name: &str) -> Self {
        match self {
            Error::Decrypt { object, .. } => Error::Decrypt {
                object,
                pack: Some(name.to_string()),
            },
            Error::Corrupt { object, reason, .. } => Error::Corrupt {
                object,
                pack: Some(name.to_string()),
                reason,
            },
            other => other,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

fn in_pack(pack: &Option<String>) -> String {
    pack.as_ref()
        .map(|p| format!(" in pack {p}"))
        .unwrap_or_default()
}
