//! `marmoset-storage`: the repository format and engine.
//!
//! What it owns: chunking (FastCDC), content ids (keyed BLAKE3), compression
//! (zstd), encryption (XChaCha20-Poly1305), packfiles, index files, trees,
//! snapshots, the storage backends and the backup/restore pipelines. The byte
//! layout of everything it writes is specified in `docs/FORMAT.md`.
//!
//! What it must not know: command-line parsing, terminals, Kubernetes or
//! FUSE. Those are thin shells (`tools/`, `agent/`, `fuse/`) over this API.
//!
//! Layers, each talking only to the one below (as in Kopia): backends move
//! bytes by (kind, name) → [`Repository`] adds keys, blobs, packs and the
//! index cache → trees and snapshots → the backup and restore pipelines.

pub mod backend;
mod backup;
pub mod blob;
mod browse;
mod check;
mod chunker;
mod crypto;
mod error;
mod forget;
pub mod format;
mod id;
mod lease;
mod maintain;
pub mod pack;
mod repo;
mod restore;
mod snapshot;
mod tree;
mod util;
mod verify;

pub use backup::{backup, BackupOptions, Progress};
pub use blob::BlobType;
pub use browse::{diff, find, Change, DiffEntry, FindMatch};
pub use check::{check, repair_snapshots, CheckReport, ReadData, RepairSnapshotsReport};
pub use crypto::{KeyFile, Keys};
pub use error::{Error, Result};
pub use forget::{
    apply_policy, forget, parse_duration, Decision, ForgetReport, GroupBy, RetentionPolicy,
    SnapshotFilter,
};
pub use format::{ChunkerParams, Config, FORMAT_VERSION};
pub use id::Id;
pub use lease::{LeaseInfo, LeaseKind};
pub use maintain::{maintain, peak_rss_kib, MaintainOptions, MaintainReport, Plan};
pub use pack::PackEntry;
pub use repo::{KeyInfo, OpenOptions, RepairIndexReport, Repository};
pub use restore::{restore, RestoreOptions, RestoreProgress, RestoreSummary};
pub use snapshot::{BackupSummary, Snapshot, SourceError};
pub use tree::{Node, NodeKind, Tree, Xattr};
pub use verify::{verify, SourceVerdict, VerifyOptions, VerifyReport};
