//! Blob types and the per-blob encoding (compression flag, sizes).

use crate::error::{Error, Result};
use crate::format::crypto::{blob_aad, Keys};
use crate::format::id::Id;

/// What a blob holds. The numeric value is stored in pack trailers and
/// index files and bound into the blob's associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobType {
    /// A chunk of file content.
    Data = 0,
    /// A tree (part of a directory listing).
    Tree = 1,
    /// A list of chunk ids of a huge file (indirect content).
    ChunkList = 2,
}

impl BlobType {
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(BlobType::Data),
            1 => Some(BlobType::Tree),
            2 => Some(BlobType::ChunkList),
            _ => None,
        }
    }
}

/// A blob decoder: `decode` or `decode_authenticated`.
pub type Decoder = fn(&Keys, BlobType, &Id, u8, u32, &[u8]) -> Result<Vec<u8>>;

/// Flag bit: the plaintext was zstd-compressed before encryption.
pub const FLAG_ZSTD: u8 = 1;

/// A blob ready to be appended to a pack.
pub struct EncodedBlob {
    pub kind: BlobType,
    pub id: Id,
    pub flags: u8,
    pub raw_length: u32,
    pub ciphertext: Vec<u8>,
}

/// Compresses (when it shrinks) and encrypts one plaintext blob.
pub fn encode(
    keys: &Keys,
    kind: BlobType,
    id: Id,
    plaintext: &[u8],
    level: i32,
) -> Result<EncodedBlob> {
    let compressed = if level > 0 && looks_compressible(plaintext) {
        compress(plaintext, level).filter(|c| c.len() < plaintext.len())
    } else {
        None
    };
    seal(keys, kind, id, plaintext, compressed.as_deref())
}

/// Encrypts a blob's stored body: `compressed` when given (flagged zstd),
/// else the plaintext itself.
fn seal(
    keys: &Keys,
    kind: BlobType,
    id: Id,
    plaintext: &[u8],
    compressed: Option<&[u8]>,
) -> Result<EncodedBlob> {
    let raw_length = u32::try_from(plaintext.len())
        .map_err(|_| Error::InvalidArgument("blob larger than 4 GiB".into()))?;
    let (flags, body) = match compressed {
        Some(c) => (FLAG_ZSTD, c),
        None => (0, plaintext),
    };
    Ok(EncodedBlob {
        kind,
        id,
        flags,
        raw_length,
        ciphertext: keys.encrypt(body, &blob_aad(kind as u8, &id)),
    })
}

thread_local! {
    /// One zstd context per thread: creating a context per chunk showed up
    /// in profiles.
    static COMPRESSORS: std::cell::RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// Likewise one decompression context per thread (restore and the
    /// mount decode thousands of blobs a second).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses a blob body that must expand to exactly `raw_length`.
fn decompress(body: &[u8], raw_length: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let dec = match d.as_mut() {
            Some(dec) => dec,
            None => d.insert(zstd::bulk::Decompressor::new()?),
        };
        dec.decompress(body, raw_length)
    })
}

fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSORS.with(|c| {
        let mut c = c.borrow_mut();
        let i = match c.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                c.push((level, zstd::bulk::Compressor::new(level).ok()?));
                c.len() - 1
            }
        };
        c[i].1.compress(data).ok()
    })
}

/// Cheap test before compressing a large chunk: compress a 32 KiB sample
/// from its middle at the fastest level; media, archives and encrypted data
/// do not shrink and skip the full (expensive) attempt.
fn looks_compressible(data: &[u8]) -> bool {
    const SAMPLE: usize = 32 << 10;
    if data.len() < 4 * SAMPLE {
        return true;
    }
    let start = data.len() / 2 - SAMPLE / 2;
    let sample = &data[start..start + SAMPLE];
    compress(sample, 1).is_some_and(|c| c.len() < SAMPLE * 97 / 100)
}

/// Decrypts, decompresses and verifies one blob against its content id.
/// Any mismatch is an error naming the blob: wrong bytes never escape.
pub fn decode(
    keys: &Keys,
    kind: BlobType,
    id: &Id,
    flags: u8,
    raw_length: u32,
    data: &[u8],
) -> Result<Vec<u8>> {
    let plain = decode_authenticated(keys, kind, id, flags, raw_length, data)?;
    verify_id(keys, id, &plain)?;
    Ok(plain)
}

/// Decrypts and decompresses without re-hashing the plaintext. The AEAD tag
/// already binds the ciphertext to this id and type, so damaged or moved
/// data is still rejected; only a writer holding the key could have stored
/// wrong content under an id. Used on the FUSE read path, where the hash
/// would cost a third of the CPU per chunk.
pub fn decode_authenticated(
    keys: &Keys,
    kind: BlobType,
    id: &Id,
    flags: u8,
    raw_length: u32,
    data: &[u8],
) -> Result<Vec<u8>> {
    open(keys, kind, id, flags, raw_length, data).map(|o| o.plain)
}

/// The one place a blob's stored bytes are decrypted and decompressed:
/// authenticated by the AEAD tag, length checked, compressed body kept.
fn open(
    keys: &Keys,
    kind: BlobType,
    id: &Id,
    flags: u8,
    raw_length: u32,
    data: &[u8],
) -> Result<Opened> {
    let what = || format!("blob {id}");
    let body = keys.decrypt(data, &blob_aad(kind as u8, id), what)?;
    let (plain, compressed) = if flags & FLAG_ZSTD != 0 {
        let plain = decompress(&body, raw_length as usize)
            .map_err(|e| Error::corrupt(what(), format!("zstd: {e}")))?;
        (plain, Some(body))
    } else {
        (body, None)
    };
    if plain.len() != raw_length as usize {
        return Err(Error::corrupt(what(), "length differs from the index"));
    }
    Ok(Opened { plain, compressed })
}

/// Fails unless `plain` hashes to `id` under `keys`.
fn verify_id(keys: &Keys, id: &Id, plain: &[u8]) -> Result<()> {
    if keys.content_id(plain) != *id {
        return Err(Error::corrupt(
            format!("blob {id}"),
            "content does not match its id",
        ));
    }
    Ok(())
}

/// A blob opened for re-encryption under other keys (`marmoset copy`):
/// decrypted, decompressed and checked against its id like [`decode`], with
/// its compressed body kept so the copy need not compress it again.
pub struct Opened {
    pub plain: Vec<u8>,
    /// The zstd body, when the blob was stored compressed.
    pub compressed: Option<Vec<u8>>,
}

/// [`decode`], keeping the compressed body (see [`Opened`]).
pub fn open_for_copy(
    keys: &Keys,
    kind: BlobType,
    id: &Id,
    flags: u8,
    raw_length: u32,
    data: &[u8],
) -> Result<Opened> {
    let opened = open(keys, kind, id, flags, raw_length, data)?;
    verify_id(keys, id, &opened.plain)?;
    Ok(opened)
}

/// Encrypts an [`Opened`] blob under `keys` as `id`, keeping the source's
/// compression: its zstd body as it is, or its plaintext uncompressed (it
/// did not shrink there).
pub fn encode_opened(keys: &Keys, kind: BlobType, id: Id, blob: &Opened) -> Result<EncodedBlob> {
    seal(keys, kind, id, &blob.plain, blob.compressed.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_is_compressed_and_incompressible_is_not() -> Result<()> {
        let k = Keys::generate();
        let text = b"abcabcabc".repeat(1000);
        let id = k.content_id(&text);
        let e = encode(&k, BlobType::Data, id, &text, 3)?;
        assert_eq!(e.flags, FLAG_ZSTD);
        assert!(e.ciphertext.len() < text.len() / 10);
        assert_eq!(
            decode(
                &k,
                BlobType::Data,
                &id,
                e.flags,
                e.raw_length,
                &e.ciphertext
            )?,
            text
        );

        let mut noise = vec![0u8; 10_000];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut noise);
        let id = k.content_id(&noise);
        let e = encode(&k, BlobType::Data, id, &noise, 3)?;
        assert_eq!(e.flags, 0);
        assert_eq!(
            decode(&k, BlobType::Data, &id, 0, e.raw_length, &e.ciphertext)?,
            noise
        );
        Ok(())
    }

    #[test]
    fn a_blob_reencrypted_for_other_keys_keeps_its_compression() -> Result<()> {
        let (a, b) = (Keys::generate(), Keys::generate());
        let text = b"abcabcabc".repeat(1000);
        let id = a.content_id(&text);
        let e = encode(&a, BlobType::Data, id, &text, 3)?;
        let opened = open_for_copy(
            &a,
            BlobType::Data,
            &id,
            e.flags,
            e.raw_length,
            &e.ciphertext,
        )?;
        assert_eq!(opened.plain, text);
        let id_b = b.content_id(&opened.plain);
        let again = encode_opened(&b, BlobType::Data, id_b, &opened)?;
        assert_eq!(again.flags, FLAG_ZSTD);
        assert_eq!(
            decode(
                &b,
                BlobType::Data,
                &id_b,
                again.flags,
                again.raw_length,
                &again.ciphertext
            )?,
            text
        );
        // Damage is found before anything is re-encrypted.
        let mut bad = e.ciphertext.clone();
        bad[30] ^= 1;
        assert!(open_for_copy(&a, BlobType::Data, &id, e.flags, e.raw_length, &bad).is_err());
        Ok(())
    }

    #[test]
    fn decode_rejects_wrong_type_and_length() -> Result<()> {
        let k = Keys::generate();
        let id = k.content_id(b"data");
        let e = encode(&k, BlobType::Data, id, b"data", 0)?;
        assert!(decode(&k, BlobType::Tree, &id, 0, 4, &e.ciphertext).is_err());
        assert!(decode(&k, BlobType::Data, &id, 0, 5, &e.ciphertext).is_err());
        Ok(())
    }
}
