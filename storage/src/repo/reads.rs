//! Coalesced reads: the blobs wanted from one pack, merged into as few
//! ranged reads as is sensible. Each request over a WAN costs a round trip
//! and B2 bills it, so neighbours separated by a small gap are read
//! together; a range never grows beyond [`MAX_RANGE`], which bounds the
//! buffer a reader holds.

/// Largest gap of unneeded bytes read to save a request.
pub const MAX_GAP: u64 = 1 << 20;
/// Largest single ranged read.
pub const MAX_RANGE: u64 = 32 << 20;
/// Largest read from a local repository: one `pread` costs no round trip.
pub const LOCAL_RANGE: u64 = 4 << 20;

/// One ranged read of a pack and the items (blobs) it yields.
#[derive(Debug)]
pub struct ReadRange<T> {
    pub offset: u64,
    pub length: u64,
    pub items: Vec<(u64, u64, T)>,
}

impl<T> ReadRange<T> {
    /// The bytes of an item at (`offset`, `length`) within `buf`, the
    /// range's data; `None` if the data is short (a truncated read).
    pub fn slice<'b>(&self, buf: &'b [u8], offset: u64, length: u64) -> Option<&'b [u8]> {
        let start = usize::try_from(offset.checked_sub(self.offset)?).ok()?;
        let end = start.checked_add(usize::try_from(length).ok()?)?;
        buf.get(start..end)
    }
}

/// Sorts items (`offset`, `length`, payload) of one pack by offset and
/// merges neighbours into ranges. Overlapping items (only a hostile index
/// has them) start a new range, so every item lies wholly in its range.
pub fn coalesce<T>(items: Vec<(u64, u64, T)>) -> Vec<ReadRange<T>> {
    coalesce_within(items, MAX_RANGE)
}

/// Like [`coalesce`], with ranges of at most `max_range` bytes (a single
/// larger item still gets a range of its own). A local repository gains
/// nothing from long reads and reads [`LOCAL_RANGE`] at a time, which keeps
/// a restore's buffers small.
pub fn coalesce_within<T>(mut items: Vec<(u64, u64, T)>, max_range: u64) -> Vec<ReadRange<T>> {
    items.sort_by_key(|i| i.0);
    let mut out: Vec<ReadRange<T>> = Vec::new();
    for (start, len, t) in items {
        if let Some(r) = out.last_mut() {
            let end = r.offset + r.length;
            let grown = start.saturating_add(len).saturating_sub(r.offset);
            if start >= end && start - end <= MAX_GAP && grown <= max_range {
                r.length = grown;
                r.items.push((start, len, t));
                continue;
            }
        }
        out.push(ReadRange {
            offset: start,
            length: len,
            items: vec![(start, len, t)],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_merge_and_far_or_huge_ones_do_not() {
        let r = coalesce(vec![
            (5000, 1000, 'c'),
            (0, 1000, 'a'),
            (1000, 1000, 'b'),
            (6000 + MAX_GAP + 1, 10, 'd'),
        ]);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].offset, r[0].length, r[0].items.len()), (0, 6000, 3));
        assert_eq!((r[1].offset, r[1].length), (6000 + MAX_GAP + 1, 10));
        let big = MAX_RANGE / 2 + 1;
        assert_eq!(coalesce(vec![(0, big, ()), (big, big, ())]).len(), 2);
    }

    #[test]
    fn every_item_lies_within_its_range() {
        // Overlaps, as only a hostile index has them.
        let r = coalesce(vec![(0, 1000, 1), (500, 100, 2), (900, 300, 3)]);
        for range in &r {
            for &(o, l, _) in &range.items {
                assert!(o >= range.offset && o + l <= range.offset + range.length);
            }
        }
        let buf = vec![7u8; 100];
        let one = &coalesce(vec![(50, 100, ())])[0];
        assert!(one.slice(&buf, 50, 100).is_some());
        assert!(one.slice(&buf, 50, 101).is_none(), "short data is caught");
        assert!(one.slice(&buf, 49, 1).is_none());
    }
}
