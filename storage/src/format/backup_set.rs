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
    /// What this record is: a node's volumes (the default), the set's
    /// Kubernetes objects, or the finisher's closing of the set.
    #[serde(default)]
    pub kind: PartKind,
    /// For [`PartKind::Objects`]: the snapshot of the objects' manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<SetObjects>,
}

/// The role of one record of a set. Records of one node and kind replace
/// older ones; records of different kinds are kept side by side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PartKind {
    /// A node agent's volumes of the run.
    #[default]
    Node,
    /// The Kubernetes objects of the included namespaces, saved once per
    /// set by the elected agent (the `marmoset-sets` Lease holder).
    Objects,
    /// Written by the elected agent once every expected node has reported
    /// or the report deadline passed: nodes missing then are failed. A
    /// node reporting later still joins the set.
    Close,
}

/// The snapshot of a set's Kubernetes objects (`k8s restore` reads it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetObjects {
    /// Snapshot id, when the manifests were saved.
    #[serde(default)]
    pub snapshot: Option<String>,
    pub namespaces: Vec<String>,
    /// Objects saved.
    pub count: u64,
    /// Resource types that could not be listed, or why nothing was saved.
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
