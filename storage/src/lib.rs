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
//! Four layers, one folder each; a layer imports only from the layers below
//! it (check with `grep -rn 'crate::ops' src/{format,backend,repo}` and the
//! like, which must find nothing):
//!
//! 1. [`format`]: what is on disk. Object kinds and paths, config, keys,
//!    blobs, packs, index files, sealed files, trees, snapshots, leases and
//!    plans: pure encode/decode over bytes.
//! 2. [`backend`]: bytes by (kind, name). One trait per capability, the
//!    fs and S3 backends, and wrappers that add caching, retries,
//!    throttling and request metering to any backend.
//! 3. [`repo`]: an open repository. Content (blobs, the index cache and
//!    its sync, recovery and repair), manifests (snapshots, keys),
//!    coordination (leases, plans, rescue: the GC protocol) and the tree
//!    walker every whole-snapshot operation uses.
//! 4. `ops`: what users run. backup, restore, check, repair, forget,
//!    verify, browse (diff/find), stats, maintain.
//!
//! `error` and `util` are shared by all layers.

pub mod backend;
mod error;
pub mod format;
mod ops;
pub mod repo;
mod util;

// Stable public paths: the shells use these names, not the folders.
pub use format::{blob, pack};

pub use backend::FileKind;
pub use error::{Error, Result};
pub use format::backup_set::{PartKind, SetObjects, SetPart, SetVolume};
pub use format::blob::BlobType;
pub use format::crypto::{KeyFile, Keys};
pub use format::id::Id;
pub use format::pack::PackEntry;
pub use format::snapshot::{BackupSummary, Snapshot, SourceError};
pub use format::tree::{Node, NodeKind, Tree, Xattr};
pub use format::{ChunkerParams, Config, FORMAT_VERSION};
pub use ops::backup::{backup, BackupOptions, Progress};
pub use ops::browse::{diff, find, Change, DiffEntry, FindMatch};
pub use ops::check::{
    check, repair_snapshots, CheckProblem, CheckReport, ReadData, RepairSnapshotsReport,
};
pub use ops::copy::{copy, CopiedSnapshot, CopyOptions, CopyReport};
pub use ops::forget::{
    apply_policy, forget, parse_duration, Decision, ForgetReport, GroupBy, RetentionPolicy,
    SnapshotFilter,
};
pub use ops::maintain::{maintain, peak_rss_kib, MaintainOptions, MaintainReport};
pub use ops::restore::{restore, Overwrite, RestoreOptions, RestoreProgress, RestoreSummary};
pub use ops::sets::{newest_complete_sets, prune_sets, sets, BackupSet, REPORT_DEADLINE};
pub use ops::stats::{stats, StatsReport};
pub use ops::verify::{verify, SourceVerdict, VerifyOptions, VerifyReport};
pub use repo::coordination::lease::{LeaseInfo, LeaseKind};
pub use repo::coordination::plans::Plan;
pub use repo::{KeyInfo, OpenOptions, RepairIndexReport, Repository};
