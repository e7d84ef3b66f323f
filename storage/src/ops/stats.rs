//! `stats`: how much the repository holds, and how well it deduplicates
//! and compresses.
//!
//! Nothing is downloaded beyond the snapshot files: pack sizes come from
//! the backend's listing, blob counts and sizes from the local index cache
//! (brought up to date when the repository was opened), and the logical
//! size from each snapshot's own summary. Unreadable snapshots are left
//! out; `snapshots` and `check` report them.

use serde::Serialize;

use crate::backend::FileKind;
use crate::error::Result;
use crate::format::blob::BlobType;
use crate::format::id::Id;
use crate::repo::Repository;

/// What `marmoset stats` prints for the whole repository.
#[derive(Debug, Clone, Serialize)]
pub struct StatsReport {
    pub repository_id: Id,
    /// Readable snapshots.
    pub snapshots: usize,
    pub packs: usize,
    /// Total size of all pack files as stored.
    pub pack_bytes: u64,
    pub data_blobs: u64,
    /// Every other blob: trees and the chunk lists of huge files.
    pub tree_blobs: u64,
    /// Unique content before compression and encryption.
    pub raw_bytes: u64,
    /// The same blobs as stored in packs (compressed and encrypted).
    pub stored_blob_bytes: u64,
    /// Sum of the sizes of all snapshots, as if nothing were shared.
    pub logical_bytes_all_snapshots: u64,
    /// `logical_bytes_all_snapshots / raw_bytes` (0 when empty).
    pub dedup_ratio: f64,
    /// `raw_bytes / stored_blob_bytes` (0 when empty).
    pub compression_ratio: f64,
}

/// Counts snapshots, packs and blobs and computes the ratios.
pub fn stats(repo: &Repository) -> Result<StatsReport> {
    let (snaps, _unreadable) = repo.snapshots()?;
    let packs = repo.backend().list(FileKind::Pack)?;
    let blobs = BlobTotals::of(repo)?;
    let logical: u64 = snaps.iter().map(|(_, s)| s.summary.bytes_total).sum();
    Ok(StatsReport {
        repository_id: repo.config().repository_id,
        snapshots: snaps.len(),
        packs: packs.len(),
        pack_bytes: packs.iter().map(|(_, size)| size).sum(),
        data_blobs: blobs.data,
        tree_blobs: blobs.other,
        raw_bytes: blobs.raw,
        stored_blob_bytes: blobs.stored,
        logical_bytes_all_snapshots: logical,
        dedup_ratio: ratio(logical, blobs.raw),
        compression_ratio: ratio(blobs.raw, blobs.stored),
    })
}

/// Blob counts and sizes over the whole index cache.
#[derive(Default)]
struct BlobTotals {
    data: u64,
    other: u64,
    raw: u64,
    stored: u64,
}

impl BlobTotals {
    fn of(repo: &Repository) -> Result<Self> {
        let mut t = BlobTotals::default();
        repo.index().for_each_blob(|_, loc| {
            if loc.kind == BlobType::Data as u8 {
                t.data += 1;
            } else {
                t.other += 1;
            }
            t.raw += u64::from(loc.raw_length);
            t.stored += u64::from(loc.length);
        })?;
        Ok(t)
    }
}

/// `a / b`, or 0 for an empty repository.
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_of_an_empty_repository_are_zero() {
        for (a, b, want) in [(0, 0, 0.0), (10, 0, 0.0), (30, 10, 3.0)] {
            assert!((ratio(a, b) - want).abs() < 1e-12, "{a}/{b}");
        }
    }
}
