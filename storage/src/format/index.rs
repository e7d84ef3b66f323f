//! The index file encoding: which blobs live in which pack, in the pack
//! trailer's entry encoding.

use super::id::Id;
use super::pack::{PackEntry, ENTRY_LEN};
use crate::error::{Error, Result};

const INDEX_MAGIC: &[u8; 8] = b"MRMIDX01";

/// Plaintext of an index file: magic, then per pack its id, entry count and
/// entries in the pack trailer encoding.
pub fn encode_index(packs: &[(Id, Vec<PackEntry>)]) -> Vec<u8> {
    let n: usize = packs.iter().map(|(_, e)| e.len()).sum();
    let mut out = Vec::with_capacity(8 + packs.len() * 36 + n * ENTRY_LEN);
    out.extend_from_slice(INDEX_MAGIC);
    for (pack, entries) in packs {
        out.extend_from_slice(&pack.0);
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in entries {
            e.encode_into(&mut out);
        }
    }
    out
}

pub fn decode_index(name: &str, b: &[u8]) -> Result<Vec<(Id, Vec<PackEntry>)>> {
    let bad = |r: &str| Error::corrupt(format!("index {name}"), r.to_string());
    let rest = b
        .strip_prefix(INDEX_MAGIC)
        .ok_or_else(|| bad("missing magic"))?;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < rest.len() {
        if rest.len() - pos < 36 {
            return Err(bad("truncated pack header"));
        }
        let pack = Id(rest[pos..pos + 32].try_into().map_err(|_| bad("pack id"))?);
        let count = u32::from_le_bytes(
            rest[pos + 32..pos + 36]
                .try_into()
                .map_err(|_| bad("count"))?,
        ) as usize;
        pos += 36;
        let end = count
            .checked_mul(ENTRY_LEN)
            .and_then(|l| l.checked_add(pos))
            .filter(|&e| e <= rest.len())
            .ok_or_else(|| bad("entry count exceeds file"))?;
        let entries = rest[pos..end]
            .chunks_exact(ENTRY_LEN)
            .map(|c| PackEntry::decode(c).ok_or_else(|| bad("bad entry")))
            .collect::<Result<Vec<_>>>()?;
        out.push((pack, entries));
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::blob::BlobType;
    #[test]
    fn index_encoding_round_trips_and_rejects_truncation() -> Result<()> {
        let e = PackEntry {
            kind: BlobType::Tree,
            flags: 1,
            id: Id([3; 32]),
            offset: 7,
            length: 9,
            raw_length: 11,
        };
        let packs = vec![(Id([1; 32]), vec![e, e]), (Id([2; 32]), vec![e])];
        let enc = encode_index(&packs);
        assert_eq!(decode_index("x", &enc)?, packs);
        assert!(decode_index("x", &enc[..enc.len() - 1]).is_err());
        Ok(())
    }
}
