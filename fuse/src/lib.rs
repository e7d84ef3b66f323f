//! `marmoset-fuse`: a read-only FUSE filesystem over every snapshot of a
//! marmoset repository (`snapshots/<id>/`, `by-source/<source>/<time>/` with a
//! `latest` link, `by-tag/<tag>/<id>/`).
//!
//! What it owns: the inode table, the decrypted-chunk cache with sequential
//! prefetch, and mounting (preflight checks, signals). What it must not
//! know: the repository format — everything goes through
//! `marmoset_storage::Repository` (trees, chunk lists, verified blobs).
//!
//! Design trade-off: file reads map offset → chunk with a binary search over
//! chunk start offsets computed at `open`, and every chunk is authenticated
//! before its bytes are returned, so a damaged blob yields EIO for the
//! reads that touch it, never wrong bytes. Like the rest of the workspace
//! this crate has no `unsafe` code: the owner ids come from `nix`'s safe
//! `getuid`/`getgid`.

mod cache;
mod fs;
mod mount;

pub use fs::{escape_source, MarmosetFs};
pub use mount::{preflight, run_foreground, spawn, MountError, MountOptions};
