//! The lease object: who holds a lease, of which kind, until when. How
//! leases are taken, refreshed and judged lives in `repo::coordination`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    Session,
    Maintenance,
}

/// Which process holds a lease, precisely enough that a PID reused by
/// another process, another container's PID 1 or a process after a reboot
/// is never mistaken for the holder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// `/proc/sys/kernel/random/boot_id`: differs after every boot.
    pub boot_id: String,
    /// `/proc/self/ns/pid`, e.g. `pid:[4026531836]`.
    pub pid_ns: String,
    pub pid: u32,
    /// Start time of the process in clock ticks since boot (`/proc/PID/stat`).
    pub start_ticks: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub kind: LeaseKind,
    pub hostname: String,
    pub process: ProcessId,
    /// The holder's clock when the lease was taken and last refreshed.
    pub created: DateTime<Utc>,
    pub refreshed: DateTime<Utc>,
    /// `refreshed + ttl`, by the holder's clock (used only where the
    /// storage gives no object times).
    pub expires: DateTime<Utc>,
    pub ttl_secs: u64,
    #[serde(default)]
    pub description: String,
}
