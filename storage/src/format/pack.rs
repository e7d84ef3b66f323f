//! Packfiles: blobs appended back to back, then an encrypted trailer that
//! lists them, so the index can always be rebuilt from packs alone.
//!
//! ```text
//! blob_0 || blob_1 || ... || E(trailer) || trailer_len:u32le || "MRMPACK1"
//! ```
//! A pack's name is the BLAKE3 hash of all its bytes.

use crate::error::{Error, Result};
use crate::format::blob::{BlobType, EncodedBlob};
use crate::format::crypto::{file_aad, Keys};
use crate::format::id::Id;

pub const MAGIC: &[u8; 8] = b"MRMPACK1";
/// Bytes after the encrypted trailer: its length and the magic.
pub const FOOTER_LEN: u64 = 12;
/// Encoded size of one trailer / index entry.
pub const ENTRY_LEN: usize = 50;

/// One blob's record in a pack trailer or index file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub kind: BlobType,
    pub flags: u8,
    pub id: Id,
    pub offset: u64,
    pub length: u32,
    pub raw_length: u32,
}

impl PackEntry {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.kind as u8);
        out.push(self.flags);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.raw_length.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != ENTRY_LEN {
            return None;
        }
        Some(Self {
            kind: BlobType::from_u8(b[0])?,
            flags: b[1],
            id: Id(b[2..34].try_into().ok()?),
            offset: u64::from_le_bytes(b[34..42].try_into().ok()?),
            length: u32::from_le_bytes(b[42..46].try_into().ok()?),
            raw_length: u32::from_le_bytes(b[46..50].try_into().ok()?),
        })
    }
}

/// Packs with their entries, as listed by index files.
pub type PackList = Vec<(Id, Vec<PackEntry>)>;

/// Accumulates encoded blobs until the pack is sealed.
#[derive(Default)]
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A sealed pack, ready to be written under `id`.
pub struct SealedPack {
    pub id: Id,
    pub bytes: Vec<u8>,
    pub entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
            entries: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn add(&mut self, blob: EncodedBlob) -> Result<()> {
        let length = u32::try_from(blob.ciphertext.len())
            .map_err(|_| Error::InvalidArgument("blob larger than 4 GiB".into()))?;
        self.entries.push(PackEntry {
            kind: blob.kind,
            flags: blob.flags,
            id: blob.id,
            offset: self.buf.len() as u64,
            length,
            raw_length: blob.raw_length,
        });
        self.buf.extend_from_slice(&blob.ciphertext);
        Ok(())
    }

    pub fn seal(mut self, keys: &Keys) -> Result<SealedPack> {
        let mut plain = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        for e in &self.entries {
            e.encode_into(&mut plain);
        }
        let trailer = keys.encrypt(&plain, &file_aad("pack-trailer"));
        let tlen = u32::try_from(trailer.len())
            .map_err(|_| Error::InvalidArgument("pack trailer too large".into()))?;
        self.buf.extend_from_slice(&trailer);
        self.buf.extend_from_slice(&tlen.to_le_bytes());
        self.buf.extend_from_slice(MAGIC);
        Ok(SealedPack {
            id: Id::of_bytes(&self.buf),
            bytes: self.buf,
            entries: self.entries,
        })
    }
}

/// Parses the footer (last 12 bytes) and returns the trailer's length.
pub fn trailer_len(pack: &str, footer: &[u8], pack_size: u64) -> Result<u64> {
    let what = || format!("pack {pack}");
    if footer.len() != FOOTER_LEN as usize || &footer[4..] != MAGIC {
        return Err(Error::corrupt(
            what(),
            "missing pack magic (truncated or not a pack)",
        ));
    }
    let len = u64::from(u32::from_le_bytes([
        footer[0], footer[1], footer[2], footer[3],
    ]));
    if len + FOOTER_LEN > pack_size {
        return Err(Error::corrupt(what(), "trailer length exceeds pack size"));
    }
    Ok(len)
}

/// Decrypts a trailer and checks every entry lies inside the blob area.
pub fn decode_trailer(
    keys: &Keys,
    pack: &str,
    trailer: &[u8],
    blob_area: u64,
) -> Result<Vec<PackEntry>> {
    let what = || format!("pack {pack} trailer");
    let plain = keys.decrypt(trailer, &file_aad("pack-trailer"), what)?;
    if plain.len() % ENTRY_LEN != 0 {
        return Err(Error::corrupt(
            what(),
            "length is not a multiple of the entry size",
        ));
    }
    plain
        .chunks_exact(ENTRY_LEN)
        .map(|c| {
            let e = PackEntry::decode(c).ok_or_else(|| Error::corrupt(what(), "bad entry"))?;
            // Offsets come from the repository: a hostile one must not wrap.
            let end = e.offset.checked_add(u64::from(e.length)).ok_or_else(|| {
                Error::corrupt(
                    what(),
                    format!("entry offset {} + length {} overflows", e.offset, e.length),
                )
            })?;
            if end > blob_area {
                return Err(Error::corrupt(what(), "entry points outside the pack"));
            }
            Ok(e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::blob;

    #[test]
    fn sealed_pack_trailer_lists_every_blob() -> Result<()> {
        let k = Keys::generate();
        let mut b = PackBuilder::default();
        let mut ids = Vec::new();
        for i in 0..10u32 {
            let data = i.to_le_bytes().repeat(100 + i as usize);
            let id = k.content_id(&data);
            ids.push((id, data.clone()));
            b.add(blob::encode(&k, BlobType::Data, id, &data, 1)?)?;
        }
        let p = b.seal(&k)?;
        assert_eq!(p.id, Id::of_bytes(&p.bytes));
        let size = p.bytes.len() as u64;
        let footer = &p.bytes[p.bytes.len() - 12..];
        let tlen = trailer_len("p", footer, size)?;
        let start = (size - FOOTER_LEN - tlen) as usize;
        let entries = decode_trailer(
            &k,
            "p",
            &p.bytes[start..start + tlen as usize],
            start as u64,
        )?;
        assert_eq!(entries, p.entries);
        for (e, (id, data)) in entries.iter().zip(&ids) {
            let raw = &p.bytes[e.offset as usize..(e.offset + u64::from(e.length)) as usize];
            assert_eq!(
                &blob::decode(&k, e.kind, id, e.flags, e.raw_length, raw)?,
                data
            );
        }
        // Truncation is detected by the footer check.
        assert!(trailer_len("p", &p.bytes[p.bytes.len() - 13..p.bytes.len() - 1], size).is_err());
        Ok(())
    }

    #[test]
    fn an_entry_whose_end_overflows_is_rejected() -> Result<()> {
        let k = Keys::generate();
        let entry = PackEntry {
            kind: BlobType::Data,
            flags: 0,
            id: k.content_id(b"x"),
            offset: u64::MAX - 1,
            length: 10,
            raw_length: 10,
        };
        let mut plain = Vec::new();
        entry.encode_into(&mut plain);
        let trailer = k.encrypt(&plain, &file_aad("pack-trailer"));
        match decode_trailer(&k, "p1", &trailer, 1000) {
            Err(Error::Corrupt { object, reason, .. }) => {
                assert!(object.contains("pack p1"), "{object}");
                assert!(reason.contains("overflows"), "{reason}");
            }
            other => panic!("overflowing entry accepted: {other:?}"),
        }
        Ok(())
    }
}
