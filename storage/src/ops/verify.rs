//! `verify`: the seed's weekly verify job as one command. For each source:
//! is the latest snapshot young enough, and does it restore? The restore
//! test writes the snapshot to a temporary directory, then reads every
//! restored file back and checks it chunk by chunk against the content ids
//! in the snapshot, so what landed on disk is proven, not assumed. The
//! streamed test reads and checks every chunk the same way without a disk
//! (a 50 GiB volume needs no 50 GiB scratch space).
//!
//! Which sources: all, the named ones, or those of the newest run that a
//! tag prefix marks (the node agent tags every snapshot of a scheduled run
//! with `set=<schedule>-<time>`), so a volume deleted long ago, whose last
//! snapshot retention keeps, does not fail every week.

use std::collections::{BTreeMap, HashMap, HashSet};
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
    /// Read and check every chunk without writing files (implies a
    /// restore test).
    pub stream: bool,
    /// Only the snapshots carrying the greatest tag that starts with this
    /// prefix (the newest backup set, e.g. `set=daily-`).
    pub newest_tag: Option<String>,
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
    /// The tag of the backup set verified (with `newest_tag`).
    pub set: Option<String>,
    /// Failures that concern no one source.
    pub errors: Vec<String>,
    pub sources: Vec<SourceVerdict>,
}

pub fn verify(repo: &Repository, opts: &VerifyOptions) -> Result<VerifyReport> {
    let (mut snaps, _) = repo.snapshots()?;
    let mut set = None;
    if let Some(prefix) = &opts.newest_tag {
        let newest = snaps
            .iter()
            .flat_map(|(_, s)| s.tags.iter())
            .filter(|t| t.starts_with(prefix.as_str()))
            .max()
            .cloned();
        let Some(newest) = newest else {
            return Ok(VerifyReport {
                pass: false,
                set: None,
                errors: vec![format!("no snapshot has a tag starting with {prefix:?}")],
                sources: Vec::new(),
            });
        };
        snaps.retain(|(_, s)| s.tags.contains(&newest));
        set = Some(newest);
    }
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
        set,
        errors: Vec::new(),
        sources: Vec::new(),
    };
    if sources.is_empty() {
        report.errors.push("no snapshot to verify".into());
    }
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
                if opts.stream {
                    if let Err(e) = stream_test(repo, snap, &mut v) {
                        v.errors.push(format!("read test: {e}"));
                    }
                } else if opts.restore_test {
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

/// Largest amount of chunk data the streamed test asks for at once.
const STREAM_BATCH_BYTES: u64 = 32 << 20;

/// Reads every chunk of every file of `snap` (each distinct chunk once),
/// authenticates it and checks its content id, writing nothing.
fn stream_test(repo: &Repository, snap: &Snapshot, v: &mut SourceVerdict) -> Result<()> {
    let root = repo.root_node(snap);
    let mut seen: HashSet<Id> = HashSet::new();
    let mut batch: Vec<(Id, PathBuf)> = Vec::new();
    let mut batch_bytes = 0u64;
    for_each_file(repo, &root, Path::new(""), |node, p| {
        v.restored_files += 1;
        let chunks = match repo.file_chunks(node) {
            Ok(c) => c,
            Err(e) => {
                v.errors.push(format!("{}: {e}", p.display()));
                return;
            }
        };
        for id in chunks {
            if !seen.insert(id) {
                continue;
            }
            batch_bytes += repo
                .blob_location(&id)
                .map_or(0, |l| u64::from(l.raw_length));
            batch.push((id, p.to_path_buf()));
            if batch_bytes >= STREAM_BATCH_BYTES {
                check_chunks(repo, std::mem::take(&mut batch), v);
                batch_bytes = 0;
            }
        }
    })?;
    check_chunks(repo, batch, v);
    Ok(())
}

fn check_chunks(repo: &Repository, batch: Vec<(Id, PathBuf)>, v: &mut SourceVerdict) {
    let ids: Vec<Id> = batch.iter().map(|(id, _)| *id).collect();
    let paths: HashMap<Id, PathBuf> = batch.into_iter().collect();
    for (id, data) in repo.load_blobs(&ids) {
        let at = paths.get(&id).map(|p| p.display().to_string());
        let at = at.as_deref().unwrap_or("?");
        match data {
            Ok(plain) if repo.keys().content_id(&plain) == id => {
                v.verified_chunks += 1;
                v.restored_bytes += plain.len() as u64;
            }
            Ok(_) => v
                .errors
                .push(format!("{at}: chunk {id} does not match its content id")),
            Err(e) => v.errors.push(format!("{at}: chunk {id}: {e}")),
        }
    }
}

fn verify_dir(repo: &Repository, dir: &Node, path: &Path, v: &mut SourceVerdict) -> Result<()> {
    for_each_file(repo, dir, path, |node, p| {
        if let Err(e) = verify_file(repo, node, p, v) {
            v.errors.push(format!("{}: {e}", p.display()));
        }
    })
}

/// Calls `f` with every regular file below `dir` and its path under `base`
/// (names that are unsafe on disk are left out, as restore leaves them).
fn for_each_file(
    repo: &Repository,
    dir: &Node,
    base: &Path,
    mut f: impl FnMut(&Node, &Path),
) -> Result<()> {
    let roots = dir
        .subtree
        .iter()
        .map(|t| (*t, base.to_path_buf()))
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
                NodeKind::File => f(&node, &p),
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
