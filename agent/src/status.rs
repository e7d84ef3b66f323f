//! The status object of one volume and schedule: a ConfigMap named
//! `marmoset-status.<schedule>.<namespace>.<pvc>` in the agent's namespace,
//! readable with `kubectl get cm -l app.kubernetes.io/managed-by=marmoset-agent`.
//! The daily and the weekly run of a volume each have their own, and both
//! are removed once the PVC is gone.

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
    /// The volume could not be backed up this run for a reason that is not
    /// an opt-out (its pod is not running and its data is not readable
    /// without it, its PVC is not bound, ...).
    Skipped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::PartiallyFailed => "PartiallyFailed",
            Phase::Failed => "Failed",
            Phase::Skipped => "Skipped",
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
        object_name(&self.schedule, &self.namespace, &self.pvc)
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

/// Longest object name the API server accepts (a DNS subdomain).
const MAX_NAME: usize = 253;

pub fn object_name(schedule: &str, namespace: &str, pvc: &str) -> String {
    let name = format!("marmoset-status.{schedule}.{namespace}.{pvc}");
    if name.len() <= MAX_NAME {
        return name;
    }
    // PVC names may be 253 characters long themselves: keep a readable
    // prefix and make the rest unique with a hash of the full name.
    let digest = blake3::hash(name.as_bytes()).to_hex();
    let mut end = MAX_NAME - 17;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}-{}", name[..end].trim_end_matches('.'), &digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_per_schedule_and_always_valid() {
        assert_eq!(
            object_name("daily", "default", "redis-pvc"),
            "marmoset-status.daily.default.redis-pvc"
        );
        assert_ne!(
            object_name("daily", "default", "redis-pvc"),
            object_name("weekly", "default", "redis-pvc")
        );
        let long = "p".repeat(253);
        let a = object_name("daily", "default", &long);
        let b = object_name("daily", "default", &format!("{}q", &long[..252]));
        assert!(a.len() <= MAX_NAME && b.len() <= MAX_NAME, "{a}");
        assert_ne!(a, b);
    }
}
