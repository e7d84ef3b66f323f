//! Browsing without restoring: `diff` between two snapshots and `find`
//! across snapshots. Both walk trees lazily and skip subtrees whose tree ids
//! are equal, so comparing two snapshots of a mostly unchanged volume only
//! reads the directories that changed.

use globset::{Glob, GlobMatcher};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::id::Id;
use crate::format::snapshot::Snapshot;
use crate::format::tree::{Node, NodeKind};
use crate::repo::walk::Walker;
use crate::repo::Repository;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    /// Content changed (files), or the entry changed type.
    Modified,
    /// Only metadata (mode, owner, mtime, link target) changed.
    Metadata,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiffEntry {
    pub change: Change,
    pub path: String,
    pub kind: NodeKind,
}

/// Differences from `a` to `b`, in path order.
pub fn diff(repo: &Repository, a: &Snapshot, b: &Snapshot) -> Result<Vec<DiffEntry>> {
    let mut out = Vec::new();
    diff_dirs(repo, &a.root_parts(), &b.root_parts(), "", &mut out)?;
    Ok(out)
}

fn entries(repo: &Repository, parts: &[Id]) -> Result<Vec<Node>> {
    let mut out = Vec::new();
    for p in parts {
        out.extend(repo.load_tree(p)?.nodes);
    }
    Ok(out)
}

fn diff_dirs(
    repo: &Repository,
    a: &[Id],
    b: &[Id],
    path: &str,
    out: &mut Vec<DiffEntry>,
) -> Result<()> {
    if a == b {
        return Ok(());
    }
    let (ea, eb) = (entries(repo, a)?, entries(repo, b)?);
    let (mut i, mut j) = (0, 0);
    while i < ea.len() || j < eb.len() {
        let ord = match (ea.get(i), eb.get(j)) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Less => {
                report_all(repo, &ea[i], path, Change::Removed, out)?;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                report_all(repo, &eb[j], path, Change::Added, out)?;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (x, y) = (&ea[i], &eb[j]);
                let p = format!("{path}/{}", y.name_lossy());
                if x.kind != y.kind {
                    out.push(DiffEntry {
                        change: Change::Modified,
                        path: p,
                        kind: y.kind,
                    });
                } else if x.kind == NodeKind::Dir {
                    if same_meta(x, y) {
                        diff_dirs(repo, &x.subtree, &y.subtree, &p, out)?;
                    } else {
                        out.push(DiffEntry {
                            change: Change::Metadata,
                            path: p.clone(),
                            kind: y.kind,
                        });
                        diff_dirs(repo, &x.subtree, &y.subtree, &p, out)?;
                    }
                } else if x.content != y.content || x.size != y.size {
                    out.push(DiffEntry {
                        change: Change::Modified,
                        path: p,
                        kind: y.kind,
                    });
                } else if !same_meta(x, y) || x.link_target != y.link_target {
                    out.push(DiffEntry {
                        change: Change::Metadata,
                        path: p,
                        kind: y.kind,
                    });
                }
                i += 1;
                j += 1;
            }
        }
    }
    Ok(())
}

fn same_meta(x: &Node, y: &Node) -> bool {
    x.mode == y.mode
        && x.uid == y.uid
        && x.gid == y.gid
        && x.mtime_ns == y.mtime_ns
        && x.xattrs == y.xattrs
}

/// Reports a node and, for directories, everything below it.
fn report_all(
    repo: &Repository,
    node: &Node,
    path: &str,
    change: Change,
    out: &mut Vec<DiffEntry>,
) -> Result<()> {
    let p = format!("{path}/{}", node.name_lossy());
    out.push(DiffEntry {
        change,
        path: p.clone(),
        kind: node.kind,
    });
    if node.kind == NodeKind::Dir {
        for child in entries(repo, &node.subtree)? {
            report_all(repo, &child, &p, change, out)?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct FindMatch {
    pub snapshot: Id,
    pub time: chrono::DateTime<chrono::Utc>,
    pub source: String,
    pub path: String,
    pub kind: NodeKind,
    pub size: u64,
    pub mtime_ns: i64,
}

/// Finds entries whose name (or, for patterns with `/`, whole path)
/// matches the glob, in every given snapshot.
pub fn find(
    repo: &Repository,
    pattern: &str,
    snapshots: &[(Id, Snapshot)],
) -> Result<Vec<FindMatch>> {
    let glob: GlobMatcher = Glob::new(pattern)
        .map_err(|e| Error::InvalidArgument(format!("pattern {pattern:?}: {e}")))?
        .compile_matcher();
    let by_path = pattern.contains('/');
    let mut out = Vec::new();
    for (id, snap) in snapshots {
        let first = out.len();
        let roots = snap
            .root_parts()
            .into_iter()
            .map(|t| (t, String::new()))
            .collect();
        Walker::new(repo).run(roots, |listing| {
            let path = listing.at;
            let mut subdirs = Vec::new();
            for node in listing.tree?.nodes {
                let p = format!("{path}/{}", node.name_lossy());
                let hit = if by_path {
                    glob.is_match(&p) || glob.is_match(p.trim_start_matches('/'))
                } else {
                    glob.is_match(node.name_lossy())
                };
                if hit {
                    out.push(FindMatch {
                        snapshot: *id,
                        time: snap.time,
                        source: snap.source.clone(),
                        path: p.clone(),
                        kind: node.kind,
                        size: node.size,
                        mtime_ns: node.mtime_ns,
                    });
                }
                if node.kind == NodeKind::Dir {
                    subdirs.extend(node.subtree.iter().map(|t| (*t, p.clone())));
                }
            }
            Ok(subdirs)
        })?;
        // The walk is breadth first; list each snapshot's matches by path.
        out[first..].sort_by(|a, b| a.path.cmp(&b.path));
    }
    Ok(out)
}
