//! Snapshot manifests: the last object a backup writes.

use serde::{Deserialize, Serialize};

use crate::format::id::Id;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceError {
    pub path: String,
    pub error: String,
}

/// What a backup did. Also the `--json` summary of `marmoset backup`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupSummary {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unmodified: u64,
    pub files_total: u64,
    pub dirs_total: u64,
    /// Logical bytes of all files in the snapshot.
    pub bytes_total: u64,
    /// Bytes actually read from the source (unchanged files are skipped).
    pub bytes_read: u64,
    /// Bytes of new blobs written to packs (after compression, encrypted).
    pub bytes_added: u64,
    pub data_blobs_added: u64,
    pub tree_blobs_added: u64,
    pub packs_written: u64,
    pub duration_secs: f64,
    /// Files or folders that could not be read; the snapshot lacks them.
    #[serde(default)]
    pub errors: Vec<SourceError>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub time: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
    pub username: String,
    /// Host path(s) such as `host:/data`, or a caller-given name such as
    /// `namespace/pvc`.
    pub source: String,
    pub paths: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The root tree: the first (usually only) part of the root directory.
    pub tree: Id,
    /// All parts of the root directory when it has more than one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tree_parts: Vec<Id>,
    #[serde(default)]
    pub parent: Option<Id>,
    pub program_version: String,
    /// True when some source files could not be read.
    #[serde(default)]
    pub incomplete: bool,
    pub summary: BackupSummary,
    /// Set by `marmoset copy`: the id of the snapshot this one copies, in
    /// the repository it was first written to (a copy of a copy keeps the
    /// first one's). A snapshot whose original is already here is not
    /// copied again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<Id>,
}

impl Snapshot {
    /// Ids of the root directory's tree parts.
    pub fn root_parts(&self) -> Vec<Id> {
        if self.tree_parts.is_empty() {
            vec![self.tree]
        } else {
            self.tree_parts.clone()
        }
    }
}
