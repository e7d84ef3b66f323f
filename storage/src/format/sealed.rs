//! Encrypted repository files other than packs (index files, snapshots,
//! leases, plans): `E(flag || body)` with the body optionally zstd-compressed
//! and the file kind bound as associated data.

use super::crypto::{file_aad, Keys};
use crate::error::{Error, Result};

const PAYLOAD_RAW: u8 = 0;
const PAYLOAD_ZSTD: u8 = 1;

/// Encrypts a repository file (index, snapshot): `E(flag || body)`.
pub fn seal_file(keys: &Keys, kind: &str, plaintext: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(plaintext.len() / 2 + 1);
    match zstd::bulk::compress(plaintext, 3) {
        Ok(c) if c.len() < plaintext.len() => {
            payload.push(PAYLOAD_ZSTD);
            payload.extend_from_slice(&c);
        }
        _ => {
            payload.push(PAYLOAD_RAW);
            payload.extend_from_slice(plaintext);
        }
    }
    keys.encrypt(&payload, &file_aad(kind))
}

/// Largest plaintext accepted for a repository file (guards decompression).
const MAX_FILE_PLAINTEXT: usize = 1 << 30;

pub fn open_file(keys: &Keys, kind: &str, name: &str, data: &[u8]) -> Result<Vec<u8>> {
    let what = || format!("{kind} {name}");
    let payload = keys.decrypt(data, &file_aad(kind), what)?;
    match payload.split_first() {
        Some((&PAYLOAD_RAW, body)) => Ok(body.to_vec()),
        Some((&PAYLOAD_ZSTD, body)) => {
            let mut out = Vec::new();
            let mut dec = zstd::stream::read::Decoder::new(body)
                .map_err(|e| Error::corrupt(what(), e.to_string()))?;
            use std::io::Read;
            (&mut dec)
                .take(MAX_FILE_PLAINTEXT as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| Error::corrupt(what(), format!("zstd: {e}")))?;
            if out.len() > MAX_FILE_PLAINTEXT {
                return Err(Error::corrupt(
                    what(),
                    "decompressed size exceeds the limit",
                ));
            }
            Ok(out)
        }
        _ => Err(Error::corrupt(what(), "unknown payload encoding")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_files_round_trip_and_bind_their_kind() -> Result<()> {
        let k = Keys::generate();
        let s = seal_file(&k, "snapshot", b"{\"a\":1}");
        assert_eq!(open_file(&k, "snapshot", "n", &s)?, b"{\"a\":1}");
        assert!(open_file(&k, "index", "n", &s).is_err());
        Ok(())
    }
}
