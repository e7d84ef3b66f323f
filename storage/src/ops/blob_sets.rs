//! Compact sets of blob ids for the passes over a whole repository
//! (`check`, `maintain --full`).
//!
//! Hash maps keyed by id cost well over 100 bytes per blob with their
//! control bytes and spare capacity, which puts ten million chunks past a
//! gigabyte. Sorted vectors cost what they hold (36 and 8 bytes per blob)
//! and are looked up by binary search; they are built once, then read.

use crate::format::id::Id;

/// Every indexed blob with its plaintext length, plus one bit per blob
/// for "a snapshot references it".
#[derive(Default)]
pub(crate) struct BlobTable {
    entries: Vec<(Id, u32)>,
    seen: Vec<u64>,
}

impl BlobTable {
    /// Adds a blob while building; a blob listed twice keeps one entry.
    pub(crate) fn push(&mut self, id: Id, raw_length: u32) {
        self.entries.push((id, raw_length));
    }

    /// Sorts and de-duplicates: call once, after the last `push`.
    pub(crate) fn finish(&mut self) {
        self.entries.sort_unstable_by_key(|e| e.0);
        self.entries.dedup_by(|a, b| a.0 == b.0);
        self.entries.shrink_to_fit();
        self.seen = vec![0; self.entries.len().div_ceil(64)];
    }

    /// The blob's plaintext length, marking it referenced; `None` when no
    /// index lists it.
    pub(crate) fn mark(&mut self, id: &Id) -> Option<u32> {
        let i = self.entries.binary_search_by(|e| e.0.cmp(id)).ok()?;
        self.seen[i / 64] |= 1 << (i % 64);
        Some(self.entries[i].1)
    }

    /// How many distinct blobs were marked.
    pub(crate) fn marked(&self) -> u64 {
        self.seen.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// First 64 bits of an id. As a liveness mark, a collision only keeps
/// garbage one more round; it never deletes live data.
pub(crate) fn prefix(id: &Id) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[..8]);
    u64::from_le_bytes(b)
}

/// Id prefixes collected in any order with repeats (a chunk shared by
/// many files is met many times), kept within twice the distinct count by
/// sorting and de-duplicating whenever the vector doubles.
#[derive(Default)]
pub(crate) struct PrefixCollector {
    items: Vec<u64>,
    distinct: usize,
}

/// Compaction is not worth it for small sets.
const MIN_COMPACT: usize = 1 << 20;

impl PrefixCollector {
    pub(crate) fn insert(&mut self, id: &Id) {
        self.items.push(prefix(id));
        if self.items.len() >= 2 * self.distinct.max(MIN_COMPACT) {
            self.compact();
        }
    }

    fn compact(&mut self) {
        self.items.sort_unstable();
        self.items.dedup();
        self.distinct = self.items.len();
    }

    pub(crate) fn finish(mut self) -> PrefixSet {
        self.compact();
        self.items.shrink_to_fit();
        PrefixSet(self.items)
    }
}

/// A sorted, de-duplicated set of id prefixes.
#[derive(Default)]
pub(crate) struct PrefixSet(Vec<u64>);

impl PrefixSet {
    pub(crate) fn contains(&self, id: &Id) -> bool {
        self.0.binary_search(&prefix(id)).is_ok()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> Id {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        b[31] = 7;
        Id(b)
    }

    #[test]
    fn table_finds_listed_blobs_and_counts_marks_once() {
        let mut t = BlobTable::default();
        for n in [5, 1, 9, 5, 3] {
            t.push(id(n), n * 10);
        }
        t.finish();
        assert_eq!(t.mark(&id(9)), Some(90));
        assert_eq!(t.mark(&id(9)), Some(90));
        assert_eq!(t.mark(&id(5)), Some(50));
        assert_eq!(t.mark(&id(4)), None);
        assert_eq!(t.marked(), 2);
    }

    #[test]
    fn collector_survives_compaction_with_repeats() {
        let mut c = PrefixCollector::default();
        // Many repeats force several compactions on the way.
        for round in 0..3u32 {
            for n in 0..(MIN_COMPACT as u32) {
                c.insert(&id(n * 2 + round % 2));
            }
        }
        let s = c.finish();
        assert_eq!(s.len(), 2 * MIN_COMPACT);
        assert!(
            s.contains(&id(0)) && s.contains(&id(1)) && s.contains(&id(2 * MIN_COMPACT as u32 - 1))
        );
        assert!(!s.contains(&id(2 * MIN_COMPACT as u32)));
    }
}
