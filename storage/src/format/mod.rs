//! What is on disk, and nothing about how it gets there: object kinds and
//! paths, the config, keys and key files, blobs, packs, index files, sealed
//! files, trees and snapshots. Pure encode/decode/seal/open over bytes; no
//! backend, no repository handle, no I/O. `docs/FORMAT.md` documents every
//! byte here; change both together.

pub mod backup_set;
pub mod blob;
pub mod config;
pub mod crypto;
pub mod id;
pub mod index;
pub mod lease;
pub mod pack;
pub mod paths;
pub mod plan;
pub mod sealed;
pub mod snapshot;
pub mod tree;

pub use config::{ChunkerParams, Config, FORMAT_VERSION};
pub use index::{decode_index, encode_index};
pub use sealed::{open_file, seal_file};
