//! The status object of one volume: a ConfigMap named
//! `marmoset-status.<namespace>.<pvc>` in the agent's namespace, readable
//! with `kubectl get cm -l app.kubernetes.io/managed-by=marmoset-agent`.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Running,
    Succeeded,
    /// A snapshot was written but some files could not be read.
    PartiallyFailed,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::PartiallyFailed => "PartiallyFailed",
            Phase::Failed => "Failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    pub namespace: String,
    pub pvc: String,
    pub node: String,
    pub pod: String,
    pub schedule: String,
    pub phase: Phase,
    pub last_attempt: DateTime<Utc>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_snapshot: Option<String>,
    pub duration_seconds: f64,
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub bytes_added: u64,
    pub files: u64,
    /// Unreadable files of the last snapshot, or the failure message.
    pub errors: Vec<String>,
}

impl VolumeStatus {
    pub fn object_name(&self) -> String {
        object_name(&self.namespace, &self.pvc)
    }

    /// ConfigMap data: one key per field for `kubectl get -o
    /// jsonpath`, plus the whole status as JSON.
    pub fn to_data(&self) -> BTreeMap<String, String> {
        let t = |d: &DateTime<Utc>| d.to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut m = BTreeMap::new();
        m.insert("phase".into(), self.phase.as_str().into());
        m.insert("schedule".into(), self.schedule.clone());
        m.insert("node".into(), self.node.clone());
        m.insert("pod".into(), self.pod.clone());
        m.insert("lastAttempt".into(), t(&self.last_attempt));
        if let Some(s) = &self.last_success {
            m.insert("lastSuccess".into(), t(s));
        }
        if let Some(s) = &self.last_snapshot {
            m.insert("lastSnapshot".into(), s.clone());
        }
        m.insert(
            "durationSeconds".into(),
            format!("{:.1}", self.duration_seconds),
        );
        m.insert("bytesRead".into(), self.bytes_read.to_string());
        m.insert("bytesAdded".into(), self.bytes_added.to_string());
        m.insert("errors".into(), self.errors.len().to_string());
        m.insert(
            "status.json".into(),
            serde_json::to_string(self).unwrap_or_default(),
        );
        m
    }

    pub fn from_data(data: &BTreeMap<String, String>) -> Option<Self> {
        serde_json::from_str(data.get("status.json")?).ok()
    }
}

pub fn object_name(namespace: &str, pvc: &str) -> String {
    format!("marmoset-status.{namespace}.{pvc}")
}
