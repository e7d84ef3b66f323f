//! Leases: who is writing to the repository right now.
//!
//! A lease is a small object under `locks/`, encrypted and authenticated
//! with the repository key and bound to its own name, so nobody without the
//! key can plant, alter or move one. Backups hold a *session* lease for
//! their whole run so maintenance knows an in-flight backup may still
//! reference blobs it saw in the index. Maintenance holds a *maintenance*
//! lease; when two maintenance runs start together, the oldest lease wins
//! and the other backs off.
//!
//! Time is taken from the storage wherever it offers it: a lease is stale
//! when the storage's last-modified time of the object is older than the
//! lease's TTL, measured against the storage's time of the reader's own
//! lease. Two hosts' clocks are therefore never compared. The holder keeps
//! a monotonic (boot-time) record of its last successful refresh: if it
//! could not refresh for a whole TTL (process stopped, storage unreachable),
//! another host may have judged the lease stale, and the holder's work is
//! declared lost ([`Lease::check_alive`]) instead of trusted.
//!
//! A lease of a process on this very kernel and PID namespace that no longer
//! runs (same pid *and* start time checked) is stale at once, so a crash
//! never blocks maintenance for a whole TTL; a PID alone never decides.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{debug, warn};

use super::clock::CLOCK_SKEW;
use super::process::boottime;
use super::sealed::{replayed, scan_sealed, write_sealed};
use crate::backend::{Backend, FileKind};
use crate::error::{Error, Result};
use crate::format::crypto::Keys;
use crate::format::id::Id;
pub use crate::format::lease::{LeaseInfo, LeaseKind, ProcessId};

/// How long a lease lives without refresh; refreshed every third of it.
/// `MARMOSET_LEASE_TTL_SECS` shortens it for reliability campaigns.
pub fn lease_ttl() -> Duration {
    std::env::var("MARMOSET_LEASE_TTL_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(DEFAULT_TTL, |s| Duration::from_secs(s.clamp(3, 3600)))
}

const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest TTL a genuine writer uses; longer ones are implausible.
const MAX_TTL_SECS: u64 = 3600;
/// Allowance for request latency between a write and the storage's stamp
/// (a third of the TTL for the short TTLs of campaigns).
fn slack(ttl_secs: u64) -> chrono::Duration {
    chrono::Duration::seconds((ttl_secs as i64 / 3).clamp(1, 60))
}
/// The holder stops trusting its lease this long before the TTL runs out
/// (30 s, or a quarter of the short TTLs of campaigns).
fn holder_margin(ttl: Duration) -> Duration {
    (ttl / 4).min(Duration::from_secs(30))
}
fn prefix(kind: LeaseKind) -> &'static str {
    match kind {
        LeaseKind::Session => "session-",
        LeaseKind::Maintenance => "maintenance-",
    }
}

fn write(backend: &dyn Backend, keys: &Keys, name: &str, info: &LeaseInfo) -> Result<()> {
    write_sealed(backend, keys, FileKind::Lock, name, info)
}

/// What the holder knows about its own lease's continuity.
#[derive(Debug)]
struct Health {
    /// Boot time just before the last write that succeeded.
    last_ok: Duration,
    lost: Option<String>,
}

/// A lease held by this process; refreshed by a background thread and
/// removed on drop.
pub struct Lease {
    backend: Arc<dyn Backend>,
    keys: Keys,
    pub name: String,
    pub info: LeaseInfo,
    ttl: Duration,
    health: Arc<Mutex<Health>>,
    stop: Arc<AtomicBool>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    pub fn acquire(
        backend: Arc<dyn Backend>,
        keys: &Keys,
        kind: LeaseKind,
        description: &str,
    ) -> Result<Self> {
        let ttl = lease_ttl();
        let now = crate::util::now();
        let info = LeaseInfo {
            kind,
            hostname: crate::util::hostname(),
            process: ProcessId::current(),
            created: now,
            refreshed: now,
            expires: now + chrono_dur(ttl),
            ttl_secs: ttl.as_secs(),
            description: description.to_string(),
        };
        let name = format!("{}{}", prefix(kind), Id::random().to_hex());
        let before = boottime();
        write(&*backend, keys, &name, &info)?;
        let health = Arc::new(Mutex::new(Health {
            last_ok: before,
            lost: None,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let refresher = {
            let (backend, keys, name) = (backend.clone(), keys.clone(), name.clone());
            let (stop, health, info) = (stop.clone(), health.clone(), info.clone());
            std::thread::spawn(move || {
                refresh_loop(&*backend, &keys, &name, info, ttl, &health, &stop)
            })
        };
        debug!(lease = %name, "lease acquired");
        Ok(Self {
            backend,
            keys: keys.clone(),
            name,
            info,
            ttl,
            health,
            stop,
            refresher: Some(refresher),
        })
    }

    /// Fails when, at any moment since it was taken, the lease may have
    /// looked stale to another host (not refreshed for nearly a TTL). Work
    /// that relied on the lease must then be discarded, not trusted.
    pub fn check_alive(&self) -> Result<()> {
        let mut h = crate::util::lock(&self.health);
        judge(&mut h, self.ttl);
        match &h.lost {
            Some(why) => Err(Error::LeaseLost {
                lease: self.name.clone(),
                reason: why.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Like [`Lease::check_alive`], and the lease object must still be
    /// there: another process that judged it stale (rightly or not) and
    /// removed it may have deleted what this run wrote.
    pub fn check_present(&self) -> Result<()> {
        self.check_alive()?;
        still_there(&*self.backend, &self.name, &self.health)?;
        self.check_alive()
    }

    /// Refreshes the lease now and returns the storage's time of that
    /// write, if the storage stamps objects: "now" by the storage's clock.
    pub fn storage_now(&self) -> Result<Option<DateTime<Utc>>> {
        still_there(&*self.backend, &self.name, &self.health)?;
        let mut info = self.info.clone();
        info.refreshed = crate::util::now();
        info.expires = info.refreshed + chrono_dur(self.ttl);
        let before = boottime();
        write(&*self.backend, &self.keys, &self.name, &info)?;
        record_ok(&self.health, before, self.ttl);
        Ok(self
            .backend
            .list_info(FileKind::Lock)?
            .into_iter()
            .find(|o| o.name == self.name)
            .and_then(|o| o.modified))
    }
}

/// Marks the lease lost once the gap since the last good write reaches
/// the TTL minus a margin (a lost lease never becomes good again).
fn judge(h: &mut Health, ttl: Duration) {
    let gap = boottime().saturating_sub(h.last_ok);
    lose_after(h, gap, ttl);
}

fn lose_after(h: &mut Health, gap: Duration, ttl: Duration) {
    if h.lost.is_none() && gap + holder_margin(ttl) >= ttl {
        h.lost = Some(format!(
            "not refreshed for {}s (TTL {}s): the process was stopped or the storage unreachable",
            gap.as_secs(),
            ttl.as_secs()
        ));
    }
}

fn record_ok(health: &Mutex<Health>, before: Duration, ttl: Duration) {
    let mut h = crate::util::lock(health);
    // Judge the gap before accepting the new write: a write after a long
    // pause does not undo the pause.
    let gap = before.saturating_sub(h.last_ok);
    lose_after(&mut h, gap, ttl);
    if before > h.last_ok {
        h.last_ok = before;
    }
}

/// Marks the lease lost when its object is gone: it is then never written
/// again (that would hide the removal from this process).
fn still_there(backend: &dyn Backend, name: &str, health: &Mutex<Health>) -> Result<()> {
    match backend.size(FileKind::Lock, name) {
        Ok(_) => Ok(()),
        Err(Error::NotFound { .. }) => {
            let mut h = crate::util::lock(health);
            if h.lost.is_none() {
                h.lost = Some("its object was removed by another process".into());
            }
            Err(Error::LeaseLost {
                lease: name.to_string(),
                reason: "its object was removed by another process".into(),
            })
        }
        Err(e) => Err(e),
    }
}

fn refresh_loop(
    backend: &dyn Backend,
    keys: &Keys,
    name: &str,
    mut info: LeaseInfo,
    ttl: Duration,
    health: &Mutex<Health>,
    stop: &AtomicBool,
) {
    let step = Duration::from_millis(100);
    let mut last_try = boottime();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(step);
        if boottime().saturating_sub(last_try) < ttl / 3 {
            continue;
        }
        last_try = boottime();
        if let Err(e @ Error::LeaseLost { .. }) = still_there(backend, name, health) {
            warn!(lease = %name, error = %e, "lease gone; not refreshed");
            continue;
        }
        info.refreshed = crate::util::now();
        info.expires = info.refreshed + chrono_dur(ttl);
        match write(backend, keys, name, &info) {
            Ok(()) => record_ok(health, last_try, ttl),
            Err(e) => warn!(lease = %name, error = %e, "could not refresh lease"),
        }
        judge(&mut crate::util::lock(health), ttl);
    }
}

fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::minutes(15))
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

/// A lease found in the repository, authenticated and plausible.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub info: LeaseInfo,
    /// The storage's last-modified time of the object, if it gives one.
    pub modified: Option<DateTime<Utc>>,
}

impl Listed {
    /// When the lease was taken, by the storage's clock: the holder's own
    /// `created` shifted by how far its clock was from the storage's at its
    /// last write. Every reader computes the same value from the same
    /// objects, so all agree on which lease is oldest.
    pub fn created_by_storage(&self) -> DateTime<Utc> {
        match self.modified {
            Some(m) => self.info.created + (m - self.info.refreshed),
            None => self.info.created,
        }
    }

    /// Stale: provably dead holder, or not refreshed for its TTL by the
    /// storage's clock (`storage_now`) — by the holders' clocks, with
    /// [`CLOCK_SKEW`], only where the storage gives no times.
    pub fn stale(&self, storage_now: Option<DateTime<Utc>>) -> bool {
        if self.info.process.provably_gone() && self.info.hostname == crate::util::hostname() {
            return true;
        }
        let ttl = chrono::Duration::seconds(self.info.ttl_secs.min(MAX_TTL_SECS) as i64);
        match (self.modified, storage_now) {
            (Some(m), Some(now)) => m + ttl + slack(self.info.ttl_secs) < now,
            _ => self.info.expires + CLOCK_SKEW < crate::util::now(),
        }
    }
}

/// Leases of one kind: the genuine ones, and those ignored with why.
#[derive(Debug, Default)]
pub struct Scan {
    pub leases: Vec<Listed>,
    pub rejected: Vec<(String, String)>,
}

/// Reads every lease of a kind. Objects that do not authenticate (planted
/// without the key) or are implausible (an expiry far beyond a genuine
/// TTL, or a time far from the storage's stamp: an old lease copied back)
/// are ignored and reported, so they can neither block nor fake anything.
pub fn scan(backend: &dyn Backend, keys: &Keys, kind: LeaseKind) -> Result<Scan> {
    let (found, rejected) = scan_sealed(backend, keys, FileKind::Lock, prefix(kind), plausible)?;
    let leases = found
        .into_iter()
        .map(|f| Listed {
            name: f.name,
            info: f.value,
            modified: f.modified,
        })
        .collect();
    Ok(Scan { leases, rejected })
}

fn plausible(
    info: LeaseInfo,
    modified: Option<DateTime<Utc>>,
) -> std::result::Result<LeaseInfo, String> {
    if info.ttl_secs > MAX_TTL_SECS
        || info.expires
            > info.refreshed + chrono::Duration::seconds(MAX_TTL_SECS as i64) + slack(MAX_TTL_SECS)
    {
        return Err(format!("implausible expiry {}", info.expires));
    }
    replayed(info.refreshed, modified)?;
    Ok(info)
}

/// Removes stale leases (left by crashed processes). Returns how many.
pub fn remove_stale(
    backend: &dyn Backend,
    keys: &Keys,
    storage_now: Option<DateTime<Utc>>,
) -> Result<usize> {
    let mut n = 0;
    for kind in [LeaseKind::Session, LeaseKind::Maintenance] {
        for l in scan(backend, keys, kind)?.leases {
            if l.stale(storage_now) {
                backend.remove(FileKind::Lock, &l.name)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::super::process::start_ticks;
    use super::super::sealed::open_sealed;
    use super::*;

    #[test]
    fn a_pid_alone_never_makes_a_lease_stale() {
        let me = ProcessId::current();
        assert!(!me.provably_gone(), "this process is alive");
        // Another PID namespace (another container, same host name).
        let other_ns = ProcessId {
            pid_ns: "pid:[1]".into(),
            pid: 999_999,
            ..me.clone()
        };
        assert!(!other_ns.provably_gone());
        // Another boot.
        let other_boot = ProcessId {
            boot_id: "x".into(),
            pid: 999_999,
            ..me.clone()
        };
        assert!(!other_boot.provably_gone());
        // Our own pid with another start time: a dead earlier incarnation.
        let earlier = ProcessId {
            start_ticks: me.start_ticks.wrapping_sub(1).max(1),
            ..me.clone()
        };
        assert_eq!(
            earlier.provably_gone(),
            me.start_ticks != earlier.start_ticks
        );
    }

    #[test]
    fn liveness_comes_from_the_kernel_not_from_proc() {
        let me = ProcessId::current();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let live = ProcessId {
            pid,
            start_ticks: start_ticks(&pid.to_string()).unwrap_or(1),
            ..me.clone()
        };
        assert!(!live.provably_gone(), "a running process is alive");
        let reused = ProcessId {
            start_ticks: live.start_ticks + 1,
            ..live.clone()
        };
        assert!(reused.provably_gone(), "same pid, other start: reused");
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(live.provably_gone(), "reaped: the kernel says ESRCH");
    }

    #[test]
    fn holder_notices_a_gap_of_a_whole_ttl() {
        let ttl = Duration::from_secs(60);
        let mut h = Health {
            last_ok: boottime(),
            lost: None,
        };
        judge(&mut h, ttl);
        assert!(h.lost.is_none());
        h.last_ok = boottime().saturating_sub(Duration::from_secs(59));
        judge(&mut h, ttl);
        assert!(h.lost.is_some(), "a gap near the TTL loses the lease");
        // A later good write does not restore it.
        let m = Mutex::new(h);
        record_ok(&m, boottime(), ttl);
        assert!(crate::util::lock(&m).lost.is_some());
    }

    #[test]
    fn forged_and_implausible_leases_are_rejected() {
        let keys = Keys::generate();
        let now = Utc::now();
        let info = LeaseInfo {
            kind: LeaseKind::Session,
            hostname: "h".into(),
            process: ProcessId::default(),
            created: now,
            refreshed: now,
            expires: now + chrono::Duration::minutes(15),
            ttl_secs: 900,
            description: String::new(),
        };
        let json = serde_json::to_vec(&info).unwrap_or_default();
        let sealed = crate::format::seal_file(&keys, "lock session-a", &json);
        let open = |k: &Keys, name: &str, raw: &[u8]| {
            open_sealed::<LeaseInfo>(k, FileKind::Lock, name, raw)
        };
        assert!(open(&keys, "session-a", &sealed).is_ok());
        // Moved under another name, or plaintext without the key.
        assert!(open(&keys, "session-b", &sealed).is_err());
        assert!(open(&keys, "session-a", &json).is_err());
        assert!(open(&Keys::generate(), "session-a", &sealed).is_err());
        // Far expiry.
        let far = LeaseInfo {
            expires: now + chrono::Duration::days(365),
            ..info.clone()
        };
        assert!(plausible(far, Some(now)).is_err());
        // Old genuine lease stored again now: a replay.
        assert!(plausible(info.clone(), Some(now + chrono::Duration::hours(2))).is_err());
        assert!(plausible(info, Some(now + chrono::Duration::minutes(10))).is_ok());
    }
}
