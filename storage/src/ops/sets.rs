//! Backup sets as users see them (`marmoset sets`, like `velero backup
//! get`): the parts the nodes' agents recorded for one run, assembled. The
//! newest part of each node counts; a node that the parts expected but
//! that never reported makes the set `PartiallyFailed` once the set is
//! older than [`REPORT_DEADLINE`] (before that it is `InProgress`).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::backend::FileKind;
use crate::error::Result;
use crate::format::backup_set::{PartKind, SetObjects, SetPart, SetVolume};
use crate::format::id::Id;
use crate::format::snapshot::Snapshot;
use crate::repo::Repository;

/// How long after a set's last report a node that has not reported is
/// taken for failed rather than still running.
pub const REPORT_DEADLINE: chrono::Duration = chrono::Duration::hours(6);

/// One backup set, assembled from its nodes' parts.
#[derive(Debug, Clone, Serialize)]
pub struct BackupSet {
    pub name: String,
    pub schedule: String,
    /// `Completed`, `PartiallyFailed`, `Failed` or `InProgress`.
    pub phase: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    /// Nodes that reported.
    pub nodes: Vec<String>,
    /// Nodes expected that did not report.
    pub missing_nodes: Vec<String>,
    pub volumes: Vec<SetVolume>,
    /// Why the set is not `Completed` (per node and per volume).
    pub errors: Vec<String>,
    pub bytes_read: u64,
    pub bytes_added: u64,
    /// The Kubernetes objects saved with the set.
    pub objects: Option<SetObjects>,
    /// When the elected agent closed the set (every node reported, or the
    /// deadline passed).
    pub closed: Option<DateTime<Utc>>,
}

/// The records of one set: each node's newest part, the newest objects
/// record and the first closing.
#[derive(Default)]
struct Records {
    nodes: BTreeMap<String, SetPart>,
    objects: Option<SetPart>,
    close: Option<SetPart>,
}

impl Records {
    fn add(&mut self, p: SetPart) {
        let newer = |have: &Option<SetPart>| have.as_ref().is_none_or(|h| h.finished < p.finished);
        match p.kind {
            PartKind::Node => match self.nodes.get(&p.node) {
                Some(have) if have.finished >= p.finished => {}
                _ => {
                    self.nodes.insert(p.node.clone(), p);
                }
            },
            PartKind::Objects => {
                if newer(&self.objects) {
                    self.objects = Some(p);
                }
            }
            PartKind::Close => {
                if self.close.as_ref().is_none_or(|h| h.finished > p.finished) {
                    self.close = Some(p);
                }
            }
        }
    }
}

/// Every backup set of the repository, oldest first, as of `now`; set
/// parts that cannot be read are returned by name with why.
pub fn sets(repo: &Repository, now: DateTime<Utc>) -> Result<(Vec<BackupSet>, Vec<String>)> {
    let (parts, bad) = repo.set_parts()?;
    let bad = bad
        .into_iter()
        .map(|(n, e)| format!("set {n}: {e}"))
        .collect();
    Ok((assemble(parts.into_iter().map(|(_, p)| p), now), bad))
}

/// Groups parts by set, keeping each node's newest part.
pub fn assemble(parts: impl IntoIterator<Item = SetPart>, now: DateTime<Utc>) -> Vec<BackupSet> {
    let mut by_set: BTreeMap<String, Records> = BTreeMap::new();
    for p in parts {
        by_set.entry(p.set.clone()).or_default().add(p);
    }
    let mut out: Vec<BackupSet> = by_set
        .into_iter()
        .map(|(name, records)| one_set(name, records, now))
        .collect();
    out.sort_by(|a, b| a.started.cmp(&b.started).then(a.name.cmp(&b.name)));
    out
}

fn one_set(name: String, records: Records, now: DateTime<Utc>) -> BackupSet {
    let Records {
        nodes,
        objects,
        close,
    } = records;
    let closed = close.as_ref().map(|c| c.finished);
    let expected: BTreeSet<String> = nodes
        .values()
        .flat_map(|p| p.nodes_expected.iter().cloned())
        .collect();
    let missing: Vec<String> = expected
        .into_iter()
        .filter(|n| !nodes.contains_key(n))
        .collect();
    let parts: Vec<&SetPart> = nodes.values().collect();
    let all = parts.iter().copied().chain(objects.iter());
    let started = all.clone().map(|p| p.started).min().unwrap_or(now);
    let finished = all.map(|p| p.finished).max().unwrap_or(now);
    let mut volumes = Vec::new();
    let mut errors = Vec::new();
    for p in &parts {
        for e in &p.errors {
            errors.push(format!("node {}: {e}", p.node));
        }
        for v in &p.volumes {
            let mut v = v.clone();
            if v.node.is_empty() {
                v.node = p.node.clone();
            }
            if v.phase != "Completed" {
                errors.push(format!(
                    "{}/{} on {}: {} {}",
                    v.namespace,
                    v.pvc,
                    v.node,
                    v.phase,
                    v.error.as_deref().unwrap_or("")
                ));
            }
            volumes.push(v);
        }
    }
    volumes.sort_by(|a, b| (&a.namespace, &a.pvc).cmp(&(&b.namespace, &b.pvc)));
    let objects = objects.and_then(|o| o.objects);
    if let Some(o) = &objects {
        errors.extend(o.errors.iter().map(|e| format!("objects: {e}")));
    }
    let waiting = closed.is_none() && !missing.is_empty() && now - finished < REPORT_DEADLINE;
    for n in &missing {
        if !waiting {
            errors.push(format!("node {n} did not report"));
        }
    }
    let good = volumes.iter().filter(|v| v.phase == "Completed").count();
    let phase = if waiting {
        "InProgress"
    } else if errors.is_empty() {
        "Completed"
    } else if good == 0 && !volumes.is_empty() {
        "Failed"
    } else {
        "PartiallyFailed"
    };
    BackupSet {
        schedule: parts
            .first()
            .map(|p| p.schedule.clone())
            .or_else(|| close.map(|c| c.schedule))
            .unwrap_or_default(),
        phase: phase.to_string(),
        started,
        finished,
        nodes: nodes.keys().cloned().collect(),
        missing_nodes: missing,
        bytes_read: volumes.iter().map(|v| v.bytes_read).sum(),
        bytes_added: volumes.iter().map(|v| v.bytes_added).sum(),
        volumes,
        errors,
        name,
        objects,
        closed,
    }
}

/// The `set=` tags of the sets that hold the newest complete snapshot of
/// some volume among `snaps` carrying `schedule_tag`: retention keeps
/// these sets whole (their volume snapshots and their objects), however
/// old, so every volume keeps a last good copy that can be restored
/// with its Kubernetes objects.
pub fn newest_complete_sets(snaps: &[(Id, Snapshot)], schedule_tag: &str) -> Vec<String> {
    let mut newest: BTreeMap<&str, &Snapshot> = BTreeMap::new();
    for (_, s) in snaps {
        let complete = !s.incomplete && s.summary.errors.is_empty();
        if !complete || !s.tags.iter().any(|t| t == schedule_tag) {
            continue;
        }
        if s.tags.iter().all(|t| !t.starts_with("set=")) {
            continue;
        }
        match newest.get(s.source.as_str()) {
            Some(have) if have.time >= s.time => {}
            _ => {
                newest.insert(&s.source, s);
            }
        }
    }
    let tags: BTreeSet<String> = newest
        .values()
        .flat_map(|s| s.tags.iter().filter(|t| t.starts_with("set=")).cloned())
        .collect();
    tags.into_iter().collect()
}

/// Removes the records of sets none of whose snapshots remain (retention
/// forgot them all), once older than [`REPORT_DEADLINE`]. Returns the
/// sets removed.
pub fn prune_sets(repo: &Repository, now: DateTime<Utc>) -> Result<Vec<String>> {
    let (snaps, _) = repo.snapshots()?;
    let live: BTreeSet<&str> = snaps
        .iter()
        .flat_map(|(_, s)| s.tags.iter())
        .filter_map(|t| t.strip_prefix("set="))
        .collect();
    let (parts, _) = repo.set_parts()?;
    let mut removed = BTreeSet::new();
    for (file, p) in &parts {
        if live.contains(p.set.as_str()) || now - p.finished < REPORT_DEADLINE {
            continue;
        }
        repo.backend().remove(FileKind::Set, file)?;
        removed.insert(p.set.clone());
    }
    Ok(removed.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(node: &str, at: i64, expected: &[&str], phases: &[&str]) -> SetPart {
        let t = DateTime::from_timestamp(at, 0).unwrap_or_default();
        SetPart {
            version: 1,
            set: "daily-20260208020000".into(),
            schedule: "daily".into(),
            node: node.into(),
            started: t,
            finished: t,
            nodes_expected: expected.iter().map(|s| s.to_string()).collect(),
            volumes: phases
                .iter()
                .enumerate()
                .map(|(i, ph)| SetVolume {
                    namespace: "default".into(),
                    pvc: format!("{node}-pvc{i}"),
                    pv: String::new(),
                    node: String::new(),
                    phase: ph.to_string(),
                    snapshot: None,
                    bytes_read: 10,
                    bytes_added: 1,
                    duration_secs: 1.0,
                    error: None,
                })
                .collect(),
            errors: Vec::new(),
            kind: PartKind::Node,
            objects: None,
        }
    }

    #[test]
    fn nodes_join_one_set_and_a_silent_node_fails_it_after_the_deadline() {
        let ab = ["a", "b"];
        let now = DateTime::from_timestamp(1000, 0).unwrap_or_default();
        let s = assemble([part("a", 900, &ab, &["Completed"])], now);
        assert_eq!(s[0].phase, "InProgress");
        let s = assemble(
            [
                part("a", 900, &ab, &["Completed"]),
                part("b", 950, &ab, &["Completed", "Completed"]),
            ],
            now,
        );
        assert_eq!((s.len(), s[0].phase.as_str()), (1, "Completed"));
        assert_eq!(s[0].volumes.len(), 3);
        assert_eq!(s[0].bytes_read, 30);
        let later = now + REPORT_DEADLINE;
        let s = assemble([part("a", 900, &ab, &["Completed"])], later);
        assert_eq!(s[0].phase, "PartiallyFailed");
        assert_eq!(s[0].missing_nodes, ["b"]);
        // A retry on a node replaces its earlier part.
        let s = assemble(
            [
                part("a", 900, &["a"], &["Failed"]),
                part("a", 990, &["a"], &["Completed"]),
            ],
            now,
        );
        assert_eq!(s[0].phase, "Completed");
        let s = assemble([part("a", 900, &["a"], &["Failed", "Failed"])], now);
        assert_eq!(s[0].phase, "Failed");
    }

    #[test]
    fn a_closed_set_fails_its_silent_nodes_at_once_and_still_takes_late_ones() {
        let ab = ["a", "b"];
        let now = DateTime::from_timestamp(1000, 0).unwrap_or_default();
        let mut close = part("a", 960, &ab, &[]);
        close.kind = PartKind::Close;
        let mut objects = part("a", 800, &ab, &[]);
        objects.kind = PartKind::Objects;
        objects.objects = Some(SetObjects {
            snapshot: Some("abc".into()),
            namespaces: vec!["default".into()],
            count: 7,
            errors: Vec::new(),
        });
        let a = part("a", 900, &ab, &["Completed"]);
        let s = assemble([a.clone(), objects.clone(), close.clone()], now);
        assert_eq!(s[0].phase, "PartiallyFailed");
        assert_eq!(s[0].missing_nodes, ["b"]);
        assert_eq!(s[0].started.timestamp(), 800);
        assert_eq!(s[0].closed.map(|t| t.timestamp()), Some(960));
        assert_eq!(s[0].objects.as_ref().map(|o| o.count), Some(7));
        // The objects record is not a node: "a" keeps its volumes.
        assert_eq!(s[0].volumes.len(), 1);
        let s = assemble(
            [a, objects, close, part("b", 990, &ab, &["Completed"])],
            now,
        );
        assert_eq!(s[0].phase, "Completed");
        assert_eq!(s[0].volumes.len(), 2);
    }

    fn snap(source: &str, at: i64, set: &str, incomplete: bool) -> (Id, Snapshot) {
        let s = Snapshot {
            version: 1,
            time: DateTime::from_timestamp(at, 0).unwrap_or_default(),
            hostname: "node-a".into(),
            username: "root".into(),
            source: source.into(),
            paths: Vec::new(),
            tags: vec!["schedule=daily".into(), format!("set={set}")],
            tree: Id([0; 32]),
            tree_parts: Vec::new(),
            parent: None,
            program_version: "t".into(),
            incomplete,
            summary: Default::default(),
            original: None,
        };
        (Id([at as u8; 32]), s)
    }

    #[test]
    fn the_set_of_each_volumes_newest_complete_snapshot_is_protected() {
        let snaps = vec![
            snap("default/a", 100, "daily-1", false),
            snap("default/a", 200, "daily-2", true),
            snap("default/b", 150, "daily-1", false),
            snap("default/b", 300, "daily-3", false),
            snap("kubernetes", 300, "daily-3", false),
        ];
        // a's newest is incomplete: its last complete copy is in daily-1.
        assert_eq!(
            newest_complete_sets(&snaps, "schedule=daily"),
            ["set=daily-1", "set=daily-3"]
        );
        assert!(newest_complete_sets(&snaps, "schedule=weekly").is_empty());
    }
}
