//! Leases: who is writing to the repository right now.
//!
//! A lease is a small plaintext JSON object under `locks/` with an owner and
//! an expiry. Backups hold a *session* lease for their whole run (refreshed
//! in the background) so maintenance knows an in-flight backup may still
//! reference blobs it saw in the index. Maintenance holds a *maintenance*
//! lease; when two maintenance runs start together, the oldest lease wins
//! and the other backs off. Leases of crashed processes simply expire.
//!
//! No lease excludes backups: maintenance never needs an exclusive lock,
//! only the list of sessions that were live when it hid blobs from the index.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::backend::{Backend, FileKind};
use crate::error::{Error, Result};
use crate::id::Id;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    Session,
    Maintenance,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub kind: LeaseKind,
    pub hostname: String,
    pub pid: u32,
    pub created: DateTime<Utc>,
    pub expires: DateTime<Utc>,
    #[serde(default)]
    pub description: String,
}

impl LeaseInfo {
    /// Expired, or held by a process of this host that no longer runs
    /// (killed), so a crash never blocks maintenance for a whole TTL.
    pub fn stale(&self, now: DateTime<Utc>) -> bool {
        if self.expires < now {
            return true;
        }
        self.hostname == crate::util::hostname()
            && self.pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// How long a lease lives without refresh; refreshed every third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(15 * 60);

fn prefix(kind: LeaseKind) -> &'static str {
    match kind {
        LeaseKind::Session => "session-",
        LeaseKind::Maintenance => "maintenance-",
    }
}

/// A lease held by this process; refreshed by a background thread and
/// removed on drop.
pub struct Lease {
    backend: Arc<dyn Backend>,
    pub name: String,
    pub info: LeaseInfo,
    stop: Arc<AtomicBool>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

fn write(backend: &dyn Backend, name: &str, info: &LeaseInfo) -> Result<()> {
    let bytes =
        serde_json::to_vec_pretty(info).map_err(|e| Error::corrupt("lease", e.to_string()))?;
    backend.write(FileKind::Lock, name, &bytes)
}

impl Lease {
    pub fn acquire(backend: Arc<dyn Backend>, kind: LeaseKind, description: &str) -> Result<Self> {
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(LEASE_TTL).unwrap_or(chrono::Duration::minutes(15));
        let info = LeaseInfo {
            kind,
            hostname: crate::util::hostname(),
            pid: std::process::id(),
            created: now,
            expires: now + ttl,
            description: description.to_string(),
        };
        let name = format!("{}{}", prefix(kind), Id::random().to_hex());
        write(&*backend, &name, &info)?;
        let stop = Arc::new(AtomicBool::new(false));
        let refresher = {
            let (backend, name, stop) = (backend.clone(), name.clone(), stop.clone());
            let mut info = info.clone();
            std::thread::spawn(move || {
                let step = Duration::from_millis(200);
                let mut waited = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(step);
                    waited += step;
                    if waited >= LEASE_TTL / 3 {
                        waited = Duration::ZERO;
                        info.expires = Utc::now() + ttl;
                        if let Err(e) = write(&*backend, &name, &info) {
                            warn!(lease = %name, error = %e, "could not refresh lease");
                        }
                    }
                }
            })
        };
        debug!(lease = %name, "lease acquired");
        Ok(Self {
            backend,
            name,
            info,
            stop,
            refresher: Some(refresher),
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.refresher.take() {
            let _ = h.join();
        }
        if let Err(e) = self.backend.remove(FileKind::Lock, &self.name) {
            warn!(lease = %self.name, error = %e, "could not remove lease");
        }
    }
}

/// Every readable lease of a kind, with its object name. Unparsable leases
/// are skipped with a warning (writes are atomic, so they are foreign junk).
pub fn list(backend: &dyn Backend, kind: LeaseKind) -> Result<Vec<(String, LeaseInfo)>> {
    let mut out = Vec::new();
    for (name, _) in backend.list(FileKind::Lock)? {
        if !name.starts_with(prefix(kind)) {
            continue;
        }
        match backend.read(FileKind::Lock, &name) {
            Ok(raw) => match serde_json::from_slice::<LeaseInfo>(&raw) {
                Ok(info) => out.push((name, info)),
                Err(e) => warn!(lease = %name, error = %e, "unparsable lease ignored"),
            },
            // Removed between list and read: its owner finished.
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Removes expired leases (left by crashed processes). Returns how many.
pub fn remove_expired(backend: &dyn Backend) -> Result<usize> {
    let now = Utc::now();
    let mut n = 0;
    for kind in [LeaseKind::Session, LeaseKind::Maintenance] {
        for (name, info) in list(backend, kind)? {
            if info.stale(now) {
                backend.remove(FileKind::Lock, &name)?;
                n += 1;
            }
        }
    }
    Ok(n)
}
