//! What kinds of objects a repository holds and where each lives: the
//! repository layout, defined once for every backend.

use std::fmt;

/// The kinds of objects stored in a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Config,
    Key,
    Pack,
    Index,
    Snapshot,
    Lock,
    /// Deferred deletions of maintenance (two-phase garbage collection).
    Plan,
    /// Backup sets: one node's part of a scheduled run.
    Set,
}

impl FileKind {
    pub const ALL: [FileKind; 8] = [
        FileKind::Config,
        FileKind::Key,
        FileKind::Pack,
        FileKind::Index,
        FileKind::Snapshot,
        FileKind::Lock,
        FileKind::Plan,
        FileKind::Set,
    ];

    /// Folder of this kind under the repository root (`None` for the config).
    pub fn folder(self) -> Option<&'static str> {
        match self {
            FileKind::Config => None,
            FileKind::Key => Some("keys"),
            FileKind::Pack => Some("packs"),
            FileKind::Index => Some("index"),
            FileKind::Snapshot => Some("snapshots"),
            FileKind::Lock => Some("locks"),
            FileKind::Plan => Some("plans"),
            FileKind::Set => Some("sets"),
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Config => "config",
            FileKind::Key => "key",
            FileKind::Pack => "pack",
            FileKind::Index => "index",
            FileKind::Snapshot => "snapshot",
            FileKind::Lock => "lock",
            FileKind::Plan => "plan",
            FileKind::Set => "set",
        })
    }
}

/// Name of the single configuration object at the repository root.
pub const CONFIG_NAME: &str = "marmoset.repository";

/// The one place that maps (kind, name) to a relative object path.
/// Packs are fanned out over 256 folders by the first two hex digits so no
/// directory (or S3 listing page) grows without bound.
pub fn object_path(kind: FileKind, name: &str) -> String {
    match kind {
        FileKind::Config => CONFIG_NAME.to_string(),
        FileKind::Pack => {
            let prefix = name.get(..2).unwrap_or("00");
            format!("packs/{prefix}/{name}")
        }
        other => format!("{}/{name}", other.folder().unwrap_or("")),
    }
}
