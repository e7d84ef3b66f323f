//! `marmoset.repository`: the plaintext, MAC-signed repository config and
//! the format version. `docs/FORMAT.md` documents every byte; change both
//! together.

use serde::{Deserialize, Serialize};

use super::crypto::Keys;
use super::id::Id;
use crate::error::{Error, Result};

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
    /// A chunker seed shared with another repository
    /// (`init --copy-chunker-params`), sealed by [`Keys::seal_chunker_seed`];
    /// absent, the seed is derived from the master key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunker_seed: Option<String>,
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
            chunker_seed: None,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
