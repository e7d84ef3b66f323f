//! `verify`: the seed's weekly verify job as one command. For each source:
//! is the latest snapshot young enough, and does it restore? The restore
//! test writes the snapshot to a temporary directory, then reads every
//! restored file back and checks it chunk by chunk against the content ids
//! in the snapshot, so what landed on disk is proven, not assumed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::Utc;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::id::Id;
use crate::format::snapshot::Snapshot;
use crate::format::tree::{Node, NodeKind};
use crate::ops::restore::{restore, RestoreOptions, RestoreProgress};
use crate::repo::walk::Walker;
use crate::repo::Repository;

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub max_age: chrono::Duration,
    pub restore_test: bool,
    /// Sources to verify; empty = every source in the repository.
    pub sources: Vec<String>,
    /// Where temporary restores go (default: the system temp dir).
    pub temp_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceVerdict {
    pub source: String,
    pub snapshot: Option<String>,
    pub time: Option<chrono::DateTime<Utc>>,
    pub age_hours: Option<f64>,
    pub fresh: bool,
    pub restored_files: u64,
    pub restored_bytes: u64,
    pub verified_chunks: u64,
    pub errors: Vec<String>,
    pub pass: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub pass: bool,
    pub sources: Vec<SourceVerdict>,
}

pub fn verify(repo: &Repository, opts: &VerifyOptions) -> Result<VerifyReport> {
    let (snaps, _) = repo.snapshots()?;
    let mut latest: BTreeMap<String, (Id, Snapshot)> = BTreeMap::new();
    for (id, s) in snaps {
        latest.insert(s.source.clone(), (id, s)); // oldest first: last wins
    }
    let sources: Vec<String> = if opts.sources.is_empty() {
        latest.keys().cloned().collect()
    } else {
        opts.sources.clone()
    };
    let mut report = VerifyReport {
        pass: !sources.is_empty(),
        sources: Vec::new(),
    };
    for source in sources {
        let mut v = SourceVerdict {
            source: source.clone(),
            ..Default::default()
        };
        match latest.get(&source) {
            None => v.errors.push("no snapshot of this source".into()),
            Some((id, snap)) => {
                v.snapshot = Some(id.to_hex());
                v.time = Some(snap.time);
                let age = Utc::now() - snap.time;
                v.age_hours = Some(age.num_seconds() as f64 / 3600.0);
                v.fresh = age <= opts.max_age;
                if !v.fresh {
                    v.errors.push(format!(
                        "latest snapshot is {:.1}h old, more than the allowed {}h",
                        age.num_seconds() as f64 / 3600.0,
                        opts.max_age.num_hours()
                    ));
                }
                if snap.incomplete {
                    v.errors.push(format!(
                        "latest snapshot is incomplete ({} unreadable source files)",
                        snap.summary.errors.len()
                    ));
                }
                if opts.restore_test {
                    if let Err(e) = restore_test(repo, snap, opts, &mut v) {
                        v.errors.push(format!("restore test: {e}"));
                    }
                }
            }
        }
        v.pass = v.errors.is_empty();
        report.pass &= v.pass;
        report.sources.push(v);
    }
    Ok(report)
}

fn restore_test(
    repo: &Repository,
    snap: &Snapshot,
    opts: &VerifyOptions,
    v: &mut SourceVerdict,
) -> Result<()> {
    let base = opts.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("marmoset-verify-{}", Id::random().short()));
    let result = (|| {
        let sum = restore(
            repo,
            snap,
            "",
            &dir,
            &RestoreOptions::default(),
            &RestoreProgress::default(),
        )?;
        v.restored_files = sum.files;
        v.restored_bytes = sum.bytes;
        for e in &sum.errors {
            v.errors.push(format!("{}: {}", e.path, e.error));
        }
        let root = repo.root_node(snap);
        verify_dir(repo, &root, &dir, v)
    })();
    // Always clean up, pass or fail.
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn verify_dir(repo: &Repository, dir: &Node, path: &Path, v: &mut SourceVerdict) -> Result<()> {
    let roots = dir
        .subtree
        .iter()
        .map(|t| (*t, path.to_path_buf()))
        .collect();
    Walker::new(repo).run(roots, |listing| {
        let mut subdirs = Vec::new();
        for node in listing.tree?.nodes {
            if !node.has_safe_name() {
                continue;
            }
            let p = listing.at.join(crate::util::os_str(&node.name));
            match node.kind {
                NodeKind::Dir => subdirs.extend(node.subtree.iter().map(|t| (*t, p.clone()))),
                NodeKind::File => {
                    if let Err(e) = verify_file(repo, &node, &p, v) {
                        v.errors.push(format!("{}: {e}", p.display()));
                    }
                }
                _ => {}
            }
        }
        Ok(subdirs)
    })
}

fn verify_file(repo: &Repository, node: &Node, path: &Path, v: &mut SourceVerdict) -> Result<()> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::new();
    for id in repo.file_chunks(node)? {
        let len = repo.blob_location(&id)?.raw_length as usize;
        buf.resize(len, 0);
        f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
        if repo.keys().content_id(&buf) != id {
            return Err(Error::corrupt(
                path.display().to_string(),
                format!("restored bytes differ from chunk {id}"),
            ));
        }
        v.verified_chunks += 1;
    }
    let mut extra = [0u8; 1];
    if f.read(&mut extra).map_err(|e| Error::io(path, e))? != 0 {
        return Err(Error::corrupt(
            path.display().to_string(),
            "restored file is longer than the snapshot's",
        ));
    }
    Ok(())
}
