//! Manifests: snapshots (what was backed up, when, from where) and the key
//! files that unlock the repository.

use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::{Repository, SnapshotList};
use crate::backend::{Backend, FileKind};
use crate::error::{Error, Result};
use crate::format::backup_set::SetPart;
use crate::format::crypto::{KeyFile, Keys};
use crate::format::id::Id;
use crate::format::snapshot::Snapshot;
use crate::format::Config;

/// Readable set parts (file name, part) and the unreadable ones with why.
pub type SetPartList = (Vec<(String, SetPart)>, Vec<(String, Error)>);

/// Summary of one key file for `key list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub current: bool,
    pub created: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
    pub username: String,
    /// False for a damaged, oversized or out-of-range key file.
    pub valid: bool,
}

impl Repository {
    pub fn save_snapshot(&self, snap: &Snapshot) -> Result<Id> {
        let json =
            serde_json::to_vec(snap).map_err(|e| Error::corrupt("snapshot", e.to_string()))?;
        let name = self.save_file(FileKind::Snapshot, "snapshot", &json)?;
        Id::from_hex(&name).ok_or_else(|| Error::corrupt("snapshot", "bad name"))
    }

    pub fn load_snapshot(&self, id: &Id) -> Result<Snapshot> {
        let plain = self.load_file(FileKind::Snapshot, &id.to_hex())?;
        serde_json::from_slice(&plain)
            .map_err(|e| Error::corrupt(format!("snapshot {id}"), e.to_string()))
    }

    /// Every readable snapshot, oldest first. Unreadable ones are returned
    /// separately so callers can report them.
    pub fn snapshots(&self) -> Result<SnapshotList> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for (name, _) in self.backend.list(FileKind::Snapshot)? {
            let Some(id) = Id::from_hex(&name) else {
                continue;
            };
            match self.load_snapshot(&id) {
                Ok(s) => ok.push((id, s)),
                Err(e) => bad.push((name, e)),
            }
        }
        ok.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok((ok, bad))
    }

    /// Records one node's part of a backup set.
    pub fn save_set_part(&self, part: &SetPart) -> Result<String> {
        let json = serde_json::to_vec(part).map_err(|e| Error::corrupt("set", e.to_string()))?;
        self.save_file(FileKind::Set, "set", &json)
    }

    /// Every readable part of every backup set (with its file name), and
    /// the unreadable ones with why.
    pub fn set_parts(&self) -> Result<SetPartList> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for name in self.backend.list_names(FileKind::Set)? {
            let part = self.load_file(FileKind::Set, &name).and_then(|plain| {
                serde_json::from_slice::<SetPart>(&plain)
                    .map_err(|e| Error::corrupt(format!("set {name}"), e.to_string()))
            });
            match part {
                Ok(p) => ok.push((name, p)),
                Err(e) => bad.push((name, e)),
            }
        }
        Ok((ok, bad))
    }

    /// Resolves `latest`, a full id or a unique id prefix.
    pub fn resolve_snapshot(&self, spec: &str) -> Result<(Id, Snapshot)> {
        if spec == "latest" {
            let (snaps, _) = self.snapshots()?;
            return snaps
                .into_iter()
                .last()
                .ok_or_else(|| Error::SnapshotNotFound(spec.into()));
        }
        let names: Vec<String> = self
            .backend
            .list_names(FileKind::Snapshot)?
            .into_iter()
            .filter(|n| n.starts_with(spec))
            .collect();
        match names.as_slice() {
            [one] => {
                let id = Id::from_hex(one).ok_or_else(|| Error::SnapshotNotFound(spec.into()))?;
                Ok((id, self.load_snapshot(&id)?))
            }
            [] => Err(Error::SnapshotNotFound(spec.into())),
            _ => Err(Error::AmbiguousSnapshot(spec.into())),
        }
    }

    // ---- keys ----

    /// Every key file, usable or not: a damaged or planted one is listed
    /// (saying why it is invalid) so that `key remove` can delete it.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let mut out = Vec::new();
        for obj in self.backend.list_info(FileKind::Key)? {
            // `key list` prints 8-character prefixes; a shorter name was not
            // written by marmoset.
            if obj.name.get(..8).is_none() {
                warn!(key = ?obj.name, "key file with a malformed name ignored");
                continue;
            }
            let current = obj.name == self.key_name;
            out.push(match read_key_file(&*self.backend, &obj)? {
                Ok(kf) => KeyInfo {
                    id: obj.name,
                    current,
                    created: kf.created,
                    hostname: kf.hostname,
                    username: kf.username,
                    valid: true,
                },
                Err(e) => KeyInfo {
                    id: obj.name,
                    current,
                    created: obj.modified.unwrap_or_default(),
                    hostname: "-".into(),
                    username: format!("(invalid key file: {e})"),
                    valid: false,
                },
            });
        }
        out.sort_by_key(|k| k.created);
        Ok(out)
    }

    pub fn add_key(&self, password: &[u8]) -> Result<String> {
        // Opens try at most MAX_KEYS_TRIED key files: a key beyond that
        // could not be relied on from a fresh machine.
        let count = self.backend.list(FileKind::Key)?.len();
        if count >= MAX_KEYS_TRIED {
            return Err(Error::InvalidArgument(format!(
                "the repository has {count} key files, the most an open tries; remove unused ones first (`key list`, `key remove`)"
            )));
        }
        write_key(&*self.backend, &self.keys, password)
    }

    pub fn remove_key(&self, prefix: &str) -> Result<()> {
        let keys = self.list_keys()?;
        let matching: Vec<&KeyInfo> = keys.iter().filter(|k| k.id.starts_with(prefix)).collect();
        let [key] = matching.as_slice() else {
            return Err(Error::KeyNotFound(prefix.into()));
        };
        // Invalid key files open nothing: they do not count as a spare.
        if key.valid && keys.iter().filter(|k| k.valid).count() == 1 {
            return Err(Error::LastKey);
        }
        self.backend.remove(FileKind::Key, &key.id)
    }

    /// Replaces the current key with one for `new_password`. Only the small
    /// key file changes; data stays encrypted under the same master key.
    pub fn change_password(&mut self, new_password: &[u8]) -> Result<String> {
        let new_name = write_key(&*self.backend, &self.keys, new_password)?;
        self.backend.remove(FileKind::Key, &self.key_name)?;
        self.key_name = new_name.clone();
        Ok(new_name)
    }
}

pub(super) fn write_key(backend: &dyn Backend, keys: &Keys, password: &[u8]) -> Result<String> {
    let kf = KeyFile::wrap(keys, password)?;
    let bytes = serde_json::to_vec_pretty(&kf).map_err(|e| Error::corrupt("key", e.to_string()))?;
    let name = Id::random().to_hex();
    backend.write(FileKind::Key, &name, bytes.into())?;
    Ok(name)
}

/// At most this many key files are tried per open: each costs an Argon2
/// derivation (up to 256 MiB over 4 passes), and anyone with write access
/// to the repository can add key files.
const MAX_KEYS_TRIED: usize = 16;
/// Genuine key files are well under 1 KiB; larger ones are not even read.
const MAX_KEY_FILE_LEN: u64 = 64 * 1024;

/// Finds the key file that `password` opens, trying the one that last
/// worked on this machine (remembered at `hint`) first. Key files that are
/// too large, unparsable or ask for excessive Argon2 costs are skipped with
/// a warning naming them.
pub(super) fn unlock(
    backend: &dyn Backend,
    password: &[u8],
    hint: &Path,
) -> Result<(Keys, String)> {
    let candidates = key_candidates(backend, read_last_key(hint).as_deref())?;
    let count = candidates.len();
    let mut refused = false;
    let mut last_invalid = None;
    for obj in candidates.into_iter().take(MAX_KEYS_TRIED) {
        match read_key_file(backend, &obj)?.and_then(|kf| kf.unwrap_keys(password)) {
            Ok(Some(keys)) => return Ok((keys, obj.name)),
            Ok(None) => refused = true,
            Err(e) => {
                warn!(key = ?obj.name, error = %e, "invalid key file skipped");
                last_invalid = Some(e);
            }
        }
    }
    if count > MAX_KEYS_TRIED {
        return Err(Error::TooManyKeys {
            count,
            tried: MAX_KEYS_TRIED,
            hint: hint.to_owned(),
        });
    }
    match last_invalid {
        // No key file was usable: a damaged one is worth naming, but the
        // password may also just be wrong; say both.
        Some(e) if !refused => Err(Error::NoUsableKey {
            reason: e.to_string(),
        }),
        // A valid key refused the password: invalid files next to it (planted
        // or damaged) do not change that answer.
        _ => Err(Error::WrongPassword),
    }
}

// ---- helpers: key files and the private cache root ----

/// Key files in the order they are tried: the one that last opened the
/// repository here first, then oldest first by the storage's time (keys
/// planted later come last), by name where times are unknown.
fn key_candidates(
    backend: &dyn Backend,
    last: Option<&str>,
) -> Result<Vec<crate::backend::ObjectInfo>> {
    let mut keys = backend.list_info(FileKind::Key)?;
    keys.sort_by(|a, b| {
        a.modified
            .cmp(&b.modified)
            .then_with(|| a.name.cmp(&b.name))
    });
    // A stable sort: the others keep their order.
    keys.sort_by_key(|k| Some(k.name.as_str()) != last);
    Ok(keys)
}

/// Reads and parses one key file and checks its KDF costs. The outer error
/// is the backend's (worth reporting as is); the inner one says why the
/// file is not a usable key.
fn read_key_file(
    backend: &dyn Backend,
    obj: &crate::backend::ObjectInfo,
) -> Result<std::result::Result<KeyFile, Error>> {
    let invalid = |reason: String| Error::corrupt(format!("key {:?}", obj.name), reason);
    let too_large = |len: u64| invalid(format!("{len} bytes, more than any key file holds"));
    if obj.size > MAX_KEY_FILE_LEN {
        return Ok(Err(too_large(obj.size)));
    }
    let raw = match backend.read(FileKind::Key, &obj.name) {
        Ok(raw) => raw,
        // Removed since the listing (a concurrent `key remove`).
        Err(Error::NotFound { .. }) => return Ok(Err(invalid("removed while read".into()))),
        Err(e) => return Err(e),
    };
    // Listings may not know sizes (0): check what was read too.
    if raw.len() as u64 > MAX_KEY_FILE_LEN {
        return Ok(Err(too_large(raw.len() as u64)));
    }
    let kf: KeyFile = match serde_json::from_slice(&raw) {
        Ok(kf) => kf,
        Err(e) => return Ok(Err(invalid(e.to_string()))),
    };
    Ok(match kf.kdf.validate() {
        Ok(()) => Ok(kf),
        Err(e) => Err(invalid(e.to_string())),
    })
}

/// Where the name of the key that last opened a repository is remembered.
pub(super) fn last_key_path(cache_root: &Path, config: &Config) -> PathBuf {
    cache_root.join(format!("{}.lastkey", config.repository_id.to_hex()))
}

/// The remembered key name; anything but a plain hex name is ignored (the
/// hint only orders the attempts, it never skips one).
fn read_last_key(path: &Path) -> Option<String> {
    let raw = std::fs::read_to_string(path).ok()?;
    let name = raw.trim();
    let plausible =
        !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_hexdigit());
    plausible.then(|| name.to_string())
}

/// Remembers which key file opened the repository so the next open tries it
/// first. Best effort: written `0600` through a temporary file, so a
/// concurrent reader never sees half a name.
pub(super) fn remember_key(path: &Path, name: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if read_last_key(path).as_deref() == Some(name) {
        return;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(name.as_bytes())?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        debug!(path = %path.display(), error = %e, "could not remember the key that opened the repository");
        let _ = std::fs::remove_file(&tmp);
    }
}
