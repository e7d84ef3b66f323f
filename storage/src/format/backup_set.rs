//! Backup sets: every scheduled run of the node agent (`daily-20260208020000`)
//! is a set, and each node's agent records its part of it in `sets/<id>`:
//! an encrypted JSON file named by the hash of its bytes, like a snapshot.
//! A node that runs again within the same set (a retry, a catch-up)
//! writes a newer part; the newest part of each node counts. The set as a
//! whole is assembled on reading (`ops::sets`). `docs/FORMAT.md` has the
//! fields.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One node's part of a backup set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetPart {
    pub version: u32,
    /// `<schedule>-<fire time>`, the `set=` tag of its snapshots.
    pub set: String,
    pub schedule: String,
    pub node: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    /// The nodes whose agents should report to the set, as this node saw
    /// them (the agent DaemonSet's pods) when it finished.
    #[serde(default)]
    pub nodes_expected: Vec<String>,
    pub volumes: Vec<SetVolume>,
    /// What went wrong on this node beyond single volumes (volumes left
    /// out, hook failures).
    #[serde(default)]
    pub errors: Vec<String>,
}

/// One volume of a set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetVolume {
    pub namespace: String,
    pub pvc: String,
    #[serde(default)]
    pub pv: String,
    #[serde(default)]
    pub node: String,
    /// `Completed`, `PartiallyFailed` or `Failed`.
    pub phase: String,
    /// The snapshot's id, when one was written.
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub bytes_read: u64,
    #[serde(default)]
    pub bytes_added: u64,
    #[serde(default)]
    pub duration_secs: f64,
    #[serde(default)]
    pub error: Option<String>,
}
