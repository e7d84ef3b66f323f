//! The restore plan: which blobs the selected files need, where each goes,
//! and how to read them with as few requests as possible.
//!
//! The walk records every (file, offset) a blob must be written to. Blobs
//! are then grouped by pack and sorted by offset, and neighbours in a pack
//! are merged into one ranged read when the gap between them is small
//! (reading a little unneeded data is cheaper than another request over a
//! WAN, and B2 bills per request; see `repo::reads`).
//! Each blob appears once in the plan, however many files share it: it is
//! downloaded, authenticated and decompressed once and written to all of
//! its destinations.

use std::collections::HashMap;

use marmoset_index::BlobLocation;

use crate::format::id::Id;
use crate::repo::reads::{coalesce_within, ReadRange};

/// Where a blob's plaintext goes: file number (in the restore's file
/// table) and byte offset in that file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Dest {
    pub file: usize,
    pub offset: u64,
}

/// One blob the restore needs.
#[derive(Debug, Clone)]
pub(super) struct Need {
    pub id: Id,
    pub loc: BlobLocation,
    pub dests: Vec<Dest>,
}

/// The reads of one pack.
#[derive(Debug)]
pub(super) struct PackReads {
    pub pack: Id,
    pub ranges: Vec<ReadRange<Need>>,
}

#[derive(Debug, Default)]
pub(super) struct Plan {
    blobs: HashMap<Id, Need>,
}

impl Plan {
    /// Distinct blobs planned.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// `id` (at `loc`) must be written to `dest`.
    pub fn add(&mut self, id: Id, loc: BlobLocation, dest: Dest) {
        self.blobs
            .entry(id)
            .or_insert_with(|| Need {
                id,
                loc,
                dests: Vec::new(),
            })
            .dests
            .push(dest);
    }

    /// The reads, pack by pack, none longer than `max_range` unless a
    /// single blob is; packs in name order so a restore's requests are
    /// reproducible.
    pub fn into_reads(self, max_range: u64) -> Vec<PackReads> {
        let mut by_pack: HashMap<[u8; 32], Vec<Need>> = HashMap::new();
        for need in self.blobs.into_values() {
            by_pack.entry(need.loc.pack).or_default().push(need);
        }
        let mut out: Vec<PackReads> = by_pack
            .into_iter()
            .map(|(pack, blobs)| PackReads {
                pack: Id(pack),
                ranges: coalesce_within(
                    blobs
                        .into_iter()
                        .map(|b| (b.loc.offset, u64::from(b.loc.length), b))
                        .collect(),
                    max_range,
                ),
            })
            .collect();
        out.sort_by_key(|p| p.pack);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(pack: u8, offset: u64, length: u32) -> BlobLocation {
        BlobLocation {
            pack: [pack; 32],
            offset,
            length,
            raw_length: length,
            kind: 0,
            flags: 0,
        }
    }

    fn dest(file: usize, offset: u64) -> Dest {
        Dest { file, offset }
    }

    #[test]
    fn a_shared_blob_is_planned_once_with_every_destination() {
        let mut p = Plan::default();
        p.add(Id([1; 32]), loc(9, 0, 100), dest(0, 0));
        p.add(Id([1; 32]), loc(9, 0, 100), dest(1, 4096));
        p.add(Id([1; 32]), loc(9, 0, 100), dest(1, 0));
        let reads = p.into_reads(crate::repo::reads::MAX_RANGE);
        assert_eq!(reads.len(), 1);
        assert_eq!(reads[0].ranges.len(), 1);
        let blobs = &reads[0].ranges[0].items;
        assert_eq!(blobs.len(), 1);
        assert_eq!(
            blobs[0].2.dests,
            vec![dest(0, 0), dest(1, 4096), dest(1, 0)]
        );
    }
}
