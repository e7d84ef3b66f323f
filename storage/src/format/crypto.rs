//! Cryptography: the master key and the keys derived from it, authenticated
//! encryption of blobs and repository files, content ids, and the
//! password-wrapped key files.
//!
//! * Master key: 32 random bytes, never stored in clear.
//! * Derived keys (BLAKE3 `derive_key` with fixed contexts): the encryption
//!   key (XChaCha20-Poly1305), the content-id key (keyed BLAKE3, so ids of
//!   known plaintext cannot be guessed without the key) and the chunker seed
//!   (so chunk boundaries do not fingerprint known files).
//! * Every ciphertext is `nonce(24) || ciphertext || tag(16)` with a random
//!   nonce and associated data binding it to its place: blobs to their type
//!   and content id, files to their kind.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::id::Id;

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Bytes added by encryption to every plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

const CTX_ENC: &str = "marmoset 2026-11 v1 encryption key";
const CTX_ID: &str = "marmoset 2026-11 v1 content id key";
const CTX_CHUNKER: &str = "marmoset 2026-11 v1 chunker seed";
const CTX_CONFIG_MAC: &str = "marmoset 2026-11 v1 config mac key";
/// Associated data of a shared chunker seed sealed in the config.
const AAD_CHUNKER_SEED: &[u8] = b"marmoset chunker seed";

/// The unwrapped master key and everything derived from it.
#[derive(Clone)]
pub struct Keys {
    master: [u8; 32],
    cipher: XChaCha20Poly1305,
    id_key: [u8; 32],
    /// A chunker seed taken from another repository
    /// (`init --copy-chunker-params`), kept sealed in the config.
    chunker_seed: Option<u64>,
}

impl Keys {
    pub fn generate() -> Self {
        let mut master = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut master);
        Self::from_master(master)
    }

    pub fn from_master(master: [u8; 32]) -> Self {
        let enc = blake3::derive_key(CTX_ENC, &master);
        let id_key = blake3::derive_key(CTX_ID, &master);
        Self {
            master,
            cipher: XChaCha20Poly1305::new((&enc).into()),
            id_key,
            chunker_seed: None,
        }
    }

    /// These keys with the chunker seed of another repository, so that the
    /// same files are cut into the same chunks in both.
    pub fn with_chunker_seed(mut self, seed: u64) -> Self {
        self.chunker_seed = Some(seed);
        self
    }

    /// The config's form of a shared chunker seed: encrypted under these
    /// keys (the seed must stay as secret as the data), hex.
    pub fn seal_chunker_seed(&self, seed: u64) -> String {
        hex::encode(self.encrypt(&seed.to_le_bytes(), AAD_CHUNKER_SEED))
    }

    /// The seed [`Keys::seal_chunker_seed`] sealed.
    pub fn open_chunker_seed(&self, sealed: &str) -> Result<u64> {
        let what = || "config chunker_seed".to_string();
        let raw = hex::decode(sealed).map_err(|e| Error::corrupt(what(), e.to_string()))?;
        let plain = self.decrypt(&raw, AAD_CHUNKER_SEED, what)?;
        let bytes: [u8; 8] = plain
            .try_into()
            .map_err(|_| Error::corrupt(what(), "not 8 bytes"))?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Content id of a plaintext chunk or tree: keyed BLAKE3.
    pub fn content_id(&self, data: &[u8]) -> Id {
        Id(*blake3::keyed_hash(&self.id_key, data).as_bytes())
    }

    pub fn chunker_seed(&self) -> u64 {
        if let Some(seed) = self.chunker_seed {
            return seed;
        }
        let k = blake3::derive_key(CTX_CHUNKER, &self.master);
        u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]])
    }

    /// MAC of the repository config's parameters (detects tampering).
    pub fn config_mac(&self, data: &[u8]) -> Id {
        let k = blake3::derive_key(CTX_CONFIG_MAC, &self.master);
        Id(*blake3::keyed_hash(&k, data).as_bytes())
    }

    /// Encrypts `plaintext` with a fresh random nonce.
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        // In-place encryption of the tail cannot fail for buffers below the
        // cipher's 256 GiB limit; blobs are at most a few MiB.
        let tag = self.cipher.encrypt_in_place_detached(
            XNonce::from_slice(&nonce),
            aad,
            &mut out[NONCE_LEN..],
        );
        match tag {
            Ok(tag) => out.extend_from_slice(&tag),
            Err(_) => out.clear(),
        }
        out
    }

    /// Decrypts and authenticates; `what` names the object in the error.
    pub fn decrypt(
        &self,
        data: &[u8],
        aad: &[u8],
        what: impl FnOnce() -> String,
    ) -> Result<Vec<u8>> {
        if data.len() < OVERHEAD {
            return Err(Error::corrupt(
                what(),
                "ciphertext shorter than nonce and tag",
            ));
        }
        let (nonce, rest) = data.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = ct.to_vec();
        self.cipher
            .decrypt_in_place_detached(XNonce::from_slice(nonce), aad, &mut buf, tag.into())
            .map_err(|_| Error::Decrypt {
                object: what(),
                pack: None,
            })?;
        Ok(buf)
    }
}

/// Associated data for a blob: its type byte followed by its content id.
pub fn blob_aad(kind: u8, id: &Id) -> [u8; 33] {
    let mut aad = [0u8; 33];
    aad[0] = kind;
    aad[1..].copy_from_slice(&id.0);
    aad
}

/// Associated data for a whole repository file of a kind.
pub fn file_aad(kind: &str) -> Vec<u8> {
    format!("marmoset:{kind}").into_bytes()
}

/// Argon2id parameters of one key file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub algorithm: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub salt: String,
}

impl KdfParams {
    pub fn new_default() -> Self {
        let mut salt = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        Self {
            algorithm: "argon2id".into(),
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
            salt: hex::encode(salt),
        }
    }

    /// Checks the algorithm and that the costs are within the caps below.
    /// Anyone with write access to the repository can plant a key file, and
    /// every open tries them all (with a wrong password too), so a key file
    /// asking for more is rejected without running Argon2.
    pub fn validate(&self) -> Result<()> {
        if self.algorithm != "argon2id" {
            return Err(bad_kdf("unknown algorithm"));
        }
        let out_of_range = |what: &str, value: u64, max: u64| {
            bad_kdf(&format!("{what} {value} is outside 1..={max}"))
        };
        if !(1..=MAX_MEMORY_KIB).contains(&self.memory_kib) {
            return Err(out_of_range(
                "memory (KiB)",
                self.memory_kib.into(),
                MAX_MEMORY_KIB.into(),
            ));
        }
        if !(1..=MAX_ITERATIONS).contains(&self.iterations) {
            return Err(out_of_range(
                "iterations",
                self.iterations.into(),
                MAX_ITERATIONS.into(),
            ));
        }
        if !(1..=MAX_PARALLELISM).contains(&self.parallelism) {
            return Err(out_of_range(
                "parallelism",
                self.parallelism.into(),
                MAX_PARALLELISM.into(),
            ));
        }
        let work = u64::from(self.memory_kib) * u64::from(self.iterations);
        if work > MAX_WORK_KIB {
            return Err(out_of_range(
                "memory (KiB) x iterations",
                work,
                MAX_WORK_KIB,
            ));
        }
        Ok(())
    }

    fn derive(&self, password: &[u8]) -> Result<[u8; 32]> {
        self.validate()?;
        let salt = hex::decode(&self.salt).map_err(|_| bad_kdf("salt is not hex"))?;
        let params =
            argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
                .map_err(|e| bad_kdf(&e.to_string()))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let memory = argon2_memory(argon.params().block_count())?;
        let mut out = [0u8; 32];
        argon
            .hash_password_into_with_memory(password, &salt, &mut out, memory)
            .map_err(|e| bad_kdf(&e.to_string()))?;
        Ok(out)
    }
}

/// Caps on a key file's Argon2id costs: one attempt stays around a second
/// and 256 MiB (the agent runs under a memory limit), far above what
/// [`KdfParams::new_default`] writes (64 MiB, 3 iterations).
pub const MAX_MEMORY_KIB: u32 = 256 * 1024;
pub const MAX_ITERATIONS: u32 = 16;
pub const MAX_PARALLELISM: u32 = 16;
/// Cap on memory x iterations (KiB): twice the default (64 MiB over 3
/// passes), so a planted key file costs at most two genuine unlocks.
pub const MAX_WORK_KIB: u64 = 64 * 1024 * 3 * 2;

fn bad_kdf(reason: &str) -> Error {
    Error::corrupt("key file", format!("invalid KDF parameters: {reason}"))
}

/// Argon2's working memory, allocated fallibly: a failed allocation becomes
/// an error naming the size instead of aborting the whole process.
fn argon2_memory(blocks: usize) -> Result<Vec<argon2::Block>> {
    let mut memory = Vec::new();
    memory.try_reserve_exact(blocks).map_err(|_| {
        Error::io(
            "key derivation",
            std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("cannot allocate {} MiB of Argon2 memory", blocks / 1024),
            ),
        )
    })?;
    // Within the reserved capacity: no further allocation.
    memory.resize(blocks, argon2::Block::new());
    Ok(memory)
}

/// A key file: the master key wrapped by a password-derived key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub version: u32,
    pub created: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
    pub username: String,
    pub kdf: KdfParams,
    /// hex of `nonce || encrypted master key || tag`.
    pub wrapped_key: String,
}

const KEY_AAD: &[u8] = b"marmoset:key";

impl KeyFile {
    pub fn wrap(keys: &Keys, password: &[u8]) -> Result<Self> {
        let kdf = KdfParams::new_default();
        let kek = Keys::from_raw_cipher(kdf.derive(password)?);
        let wrapped = kek.encrypt_raw(&keys.master, KEY_AAD);
        Ok(Self {
            version: 1,
            created: chrono::Utc::now(),
            hostname: crate::util::hostname(),
            username: crate::util::username(),
            kdf,
            wrapped_key: hex::encode(wrapped),
        })
    }

    /// Unwraps the master key; `Ok(None)` when the password does not fit.
    pub fn unwrap_keys(&self, password: &[u8]) -> Result<Option<Keys>> {
        let kek = Keys::from_raw_cipher(self.kdf.derive(password)?);
        let wrapped = hex::decode(&self.wrapped_key)
            .map_err(|_| Error::corrupt("key file", "wrapped key is not hex"))?;
        match kek.decrypt_raw(&wrapped, KEY_AAD) {
            Some(master) => {
                let master: [u8; 32] = master
                    .try_into()
                    .map_err(|_| Error::corrupt("key file", "master key has the wrong length"))?;
                Ok(Some(Keys::from_master(master)))
            }
            None => Ok(None),
        }
    }
}

/// A bare cipher under a key-encryption key (only used for key wrapping).
struct RawCipher(XChaCha20Poly1305);

impl Keys {
    fn from_raw_cipher(kek: [u8; 32]) -> RawCipher {
        RawCipher(XChaCha20Poly1305::new((&kek).into()))
    }
}

impl RawCipher {
    fn encrypt_raw(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let mut out = nonce.to_vec();
        let mut buf = plaintext.to_vec();
        if let Ok(tag) = self
            .0
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), aad, &mut buf)
        {
            out.extend_from_slice(&buf);
            out.extend_from_slice(&tag);
        }
        out
    }

    fn decrypt_raw(&self, data: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if data.len() < OVERHEAD {
            return None;
        }
        let (nonce, rest) = data.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = ct.to_vec();
        self.0
            .decrypt_in_place_detached(XNonce::from_slice(nonce), aad, &mut buf, tag.into())
            .ok()?;
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypt_decrypt_round_trip_and_aad_binding() -> Result<()> {
        let k = Keys::generate();
        let id = k.content_id(b"hello");
        let ct = k.encrypt(b"hello", &blob_aad(0, &id));
        assert_eq!(ct.len(), 5 + OVERHEAD);
        assert_eq!(k.decrypt(&ct, &blob_aad(0, &id), String::new)?, b"hello");
        // Moved to another id or type: authentication must fail.
        let other = k.content_id(b"other");
        assert!(matches!(
            k.decrypt(&ct, &blob_aad(0, &other), String::new),
            Err(Error::Decrypt { .. })
        ));
        assert!(k.decrypt(&ct, &blob_aad(1, &id), String::new).is_err());
        let mut flipped = ct.clone();
        flipped[30] ^= 1;
        assert!(k.decrypt(&flipped, &blob_aad(0, &id), String::new).is_err());
        assert!(k
            .decrypt(&ct[..10], &blob_aad(0, &id), String::new)
            .is_err());
        Ok(())
    }

    #[test]
    fn content_ids_are_keyed() {
        let a = Keys::generate();
        let b = Keys::generate();
        assert_ne!(a.content_id(b"x"), b.content_id(b"x"));
        assert_ne!(a.content_id(b"x"), Id::of_bytes(b"x"));
        assert_eq!(a.content_id(b"x"), a.content_id(b"x"));
    }

    #[test]
    fn key_file_wraps_and_rejects_wrong_password() -> Result<()> {
        let k = Keys::generate();
        let kf = KeyFile::wrap(&k, b"secret")?;
        let got = kf.unwrap_keys(b"secret")?.ok_or(Error::WrongPassword)?;
        assert_eq!(got.content_id(b"z"), k.content_id(b"z"));
        assert!(kf.unwrap_keys(b"wrong")?.is_none());
        Ok(())
    }

    #[test]
    fn extreme_kdf_costs_are_rejected_before_argon2_runs() -> Result<()> {
        let k = Keys::generate();
        let mut kf = KeyFile::wrap(&k, b"secret")?;
        let start = std::time::Instant::now();
        let hostile = [
            (4 * 1024 * 1024, 3, 1), // 4 GiB
            (64 * 1024, 1000, 1),
            (64 * 1024, 3, 64),
            (MAX_MEMORY_KIB, MAX_ITERATIONS, 1), // each fine, product too big
            (0, 3, 1),
            (64 * 1024, 0, 1),
        ];
        for (m, t, p) in hostile {
            kf.kdf.memory_kib = m;
            kf.kdf.iterations = t;
            kf.kdf.parallelism = p;
            assert!(
                matches!(kf.unwrap_keys(b"secret"), Err(Error::Corrupt { .. })),
                "accepted memory {m} KiB, {t} iterations, parallelism {p}"
            );
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        let mut edge = KdfParams::new_default();
        edge.memory_kib = MAX_MEMORY_KIB;
        edge.iterations = 1;
        edge.parallelism = MAX_PARALLELISM;
        edge.validate()?;
        KdfParams::new_default().validate()
    }
}
