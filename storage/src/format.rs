//! Repository files other than packs: the config, encrypted files (index,
//! snapshots) and the index file encoding. `docs/FORMAT.md` documents every
//! byte here; change both together.

use serde::{Deserialize, Serialize};

use crate::crypto::{file_aad, Keys};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::pack::{PackEntry, ENTRY_LEN};

/// The repository format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Content-defined chunking parameters (FastCDC 2020, normalization 1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkerParams {
    pub algorithm: String,
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        Self {
            algorithm: String::new(),
            min_size: 256 << 10,
            avg_size: 1 << 20,
            max_size: 4 << 20,
        }
    }
}

/// `marmoset.repository`: plaintext JSON, readable before unlocking so a
/// newer format is reported as such rather than as a wrong password. Its
/// parameters are authenticated by `mac` once a key is unlocked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub format_version: u32,
    pub repository_id: Id,
    pub created: chrono::DateTime<chrono::Utc>,
    pub chunker: ChunkerParams,
    /// Target size of a sealed pack in bytes.
    pub pack_size: u32,
    /// zstd level for new blobs (0 disables compression).
    pub compression_level: i32,
    /// Keyed MAC of this JSON serialized with `mac` set to the empty string.
    #[serde(default)]
    pub mac: String,
}

/// Only the version, parsed first so that unknown future fields never hide a
/// version mismatch behind a parse error.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: u32,
}

impl Config {
    pub fn new() -> Self {
        let chunker = ChunkerParams {
            algorithm: "fastcdc-2020".into(),
            ..ChunkerParams::default()
        };
        Self {
            format_version: FORMAT_VERSION,
            repository_id: Id::random(),
            created: chrono::Utc::now(),
            chunker,
            pack_size: 16 << 20,
            compression_level: 3,
            mac: String::new(),
        }
    }

    fn mac_input(&self) -> Result<Vec<u8>> {
        let mut c = self.clone();
        c.mac = String::new();
        serde_json::to_vec(&c).map_err(|e| Error::corrupt("config", e.to_string()))
    }

    pub fn sign(&mut self, keys: &Keys) -> Result<()> {
        self.mac = keys.config_mac(&self.mac_input()?).to_hex();
        Ok(())
    }

    pub fn verify(&self, keys: &Keys) -> Result<()> {
        if keys.config_mac(&self.mac_input()?).to_hex() != self.mac {
            return Err(Error::corrupt(
                "config marmoset.repository",
                "MAC mismatch: the config was modified or belongs to another key",
            ));
        }
        self.validate()
    }

    fn validate(&self) -> Result<()> {
        let c = &self.chunker;
        let ok = c.algorithm == "fastcdc-2020"
            && c.min_size >= 64
            && c.min_size <= c.avg_size
            && c.avg_size <= c.max_size
            && c.max_size <= 16 << 20
            && (1 << 20..=1 << 30).contains(&self.pack_size)
            && (0..=22).contains(&self.compression_level);
        if ok {
            Ok(())
        } else {
            Err(Error::corrupt(
                "config marmoset.repository",
                "parameters out of range",
            ))
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let probe: VersionProbe = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt("config marmoset.repository", e.to_string()))?;
        if probe.format_version > FORMAT_VERSION || probe.format_version == 0 {
            return Err(Error::UnsupportedVersion {
                found: probe.format_version,
                supported: FORMAT_VERSION,
            });
        }
        serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt("config marmoset.repository", e.to_string()))
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|e| Error::corrupt("config", e.to_string()))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

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
    use crate::blob::BlobType;

    #[test]
    fn config_mac_detects_tampering_and_versions_are_checked() -> Result<()> {
        let k = Keys::generate();
        let mut c = Config::new();
        c.sign(&k)?;
        let bytes = c.to_bytes()?;
        Config::parse(&bytes)?.verify(&k)?;
        let tampered = String::from_utf8_lossy(&bytes)
            .replace("\"pack_size\": 16777216", "\"pack_size\": 16777218");
        assert!(Config::parse(tampered.as_bytes())?.verify(&k).is_err());
        let newer = String::from_utf8_lossy(&bytes)
            .replace("\"format_version\": 1", "\"format_version\": 9");
        assert!(matches!(
            Config::parse(newer.as_bytes()),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));
        Ok(())
    }

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

    #[test]
    fn sealed_files_round_trip_and_bind_their_kind() -> Result<()> {
        let k = Keys::generate();
        let s = seal_file(&k, "snapshot", b"{\"a\":1}");
        assert_eq!(open_file(&k, "snapshot", "n", &s)?, b"{\"a\":1}");
        assert!(open_file(&k, "index", "n", &s).is_err());
        Ok(())
    }
}
