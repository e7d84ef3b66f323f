//! Sealed coordination objects (leases and plans): one way to write, scan,
//! authenticate and reject them.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::warn;

use super::clock::MAX_CLOCK_SKEW;
use crate::backend::{Backend, FileKind};
use crate::error::{Error, Result};
use crate::format::crypto::Keys;

// ---- coordination objects: leases and plans ----
//
// Both are JSON sealed with the repository key under the label
// "<kind> <name>", so they cannot be forged, altered or moved to another
// name, and both are read the same way: authenticated, checked, or ignored
// and reported.

/// Writes `value` as a sealed coordination object (`lock` or `plan`).
pub(crate) fn write_sealed<T: Serialize>(
    backend: &dyn Backend,
    keys: &Keys,
    kind: FileKind,
    name: &str,
    value: &T,
) -> Result<()> {
    let json =
        serde_json::to_vec(value).map_err(|e| Error::corrupt(kind.to_string(), e.to_string()))?;
    let sealed = crate::format::seal_file(keys, &format!("{kind} {name}"), &json);
    backend.write(kind, name, sealed.into())
}

/// Opens one sealed coordination object; the error says why it is not
/// to be trusted.
pub(super) fn open_sealed<T: DeserializeOwned>(
    keys: &Keys,
    kind: FileKind,
    name: &str,
    raw: &[u8],
) -> std::result::Result<T, String> {
    let plain = crate::format::open_file(keys, &format!("{kind} {name}"), name, raw)
        .map_err(|_| "not authenticated by the repository key (forged or damaged)".to_string())?;
    serde_json::from_slice(&plain).map_err(|e| format!("unreadable: {e}"))
}

/// Objects ignored, with why: (name, reason).
pub(crate) type Rejected = Vec<(String, String)>;

/// A coordination object that authenticated and passed its checks.
pub(crate) struct Found<T> {
    pub name: String,
    pub value: T,
    /// The storage's last-modified time of the object, if it gives one.
    pub modified: Option<DateTime<Utc>>,
}

/// Reads every object of `kind` whose name starts with `prefix`: those
/// that authenticate and pass `check`, and the others with why (logged).
pub(crate) fn scan_sealed<T: DeserializeOwned>(
    backend: &dyn Backend,
    keys: &Keys,
    kind: FileKind,
    prefix: &str,
    check: impl Fn(T, Option<DateTime<Utc>>) -> std::result::Result<T, String>,
) -> Result<(Vec<Found<T>>, Rejected)> {
    let (mut found, mut rejected) = (Vec::new(), Vec::new());
    for obj in backend.list_info(kind)? {
        if !obj.name.starts_with(prefix) {
            continue;
        }
        let raw = match backend.read(kind, &obj.name) {
            Ok(r) => r,
            // Removed between list and read: its owner finished.
            Err(Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        match open_sealed(keys, kind, &obj.name, &raw).and_then(|v| check(v, obj.modified)) {
            Ok(value) => found.push(Found {
                name: obj.name,
                value,
                modified: obj.modified,
            }),
            Err(why) => {
                warn!(object = %format!("{kind} {}", obj.name), reason = %why, "ignored");
                rejected.push((obj.name, why));
            }
        }
    }
    Ok((found, rejected))
}

/// Why an object written at `written` (its writer's clock) but stamped
/// `modified` by the storage is taken for an old one copied back.
pub(crate) fn replayed(
    written: DateTime<Utc>,
    modified: Option<DateTime<Utc>>,
) -> std::result::Result<(), String> {
    match modified {
        Some(m) if (m - written).abs() > MAX_CLOCK_SKEW => Err(format!(
            "written at {written} but stored at {m}: an old object copied back"
        )),
        _ => Ok(()),
    }
}
