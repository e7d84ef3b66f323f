//! Rescue: blobs that a snapshot needs but that only planned packs hold are
//! re-indexed (their packs taken out of the deletion), so a backup that
//! overlapped a maintenance never writes a snapshot with dangling blobs.

use std::collections::{HashMap, HashSet};

use tracing::warn;

use super::plans::planned_packs;
use crate::backend::FileKind;
use crate::error::{Error, Result};
use crate::format::id::Id;
use crate::format::tree::{Node, NodeKind};
use crate::repo::walk::Walker;
use crate::repo::Repository;

/// Called by a backup before it writes its snapshot, when a maintenance
/// planned deletions while it ran: every blob the new trees reference must
/// be indexed; blobs found only in planned packs get those packs re-indexed.
pub(crate) fn rescue_referenced(repo: &Repository, root_parts: &[Id]) -> Result<usize> {
    repo.sync_index()?;
    let mut missing = HashSet::new();
    let roots = root_parts.iter().map(|t| (*t, ())).collect();
    Walker::new(repo).dedup(true).run(roots, |listing| {
        let tree = match listing.tree {
            // Cannot descend yet; rescue first, then walk again.
            Err(Error::BlobNotFound { id }) => {
                missing.insert(id);
                return Ok(Vec::new());
            }
            other => other?,
        };
        let mut subdirs = Vec::new();
        for node in tree.nodes {
            match node.kind {
                NodeKind::Dir => subdirs.extend(node.subtree.iter().map(|t| (*t, ()))),
                NodeKind::File => note_missing_chunks(repo, &node, &mut missing)?,
                _ => {}
            }
        }
        Ok(subdirs)
    })?;
    if missing.is_empty() {
        return Ok(0);
    }
    let rescued = rescue_from_plans(repo, &missing)?;
    if rescued > 0 {
        // Rescued trees may reference more missing blobs: walk again.
        return Ok(rescued + rescue_referenced(repo, root_parts)?);
    }
    Err(Error::corrupt(
        "backup",
        format!(
            "{} referenced blobs are in no index and no planned pack",
            missing.len()
        ),
    ))
}

/// Adds the chunks (and chunk lists) of a file that no index holds.
fn note_missing_chunks(repo: &Repository, node: &Node, missing: &mut HashSet<Id>) -> Result<()> {
    for c in &node.content {
        if !repo.index().contains_blob(&c.0)? {
            missing.insert(*c);
        }
    }
    if node.indirect && node.content.iter().all(|c| !missing.contains(c)) {
        for c in repo.file_chunks(node)? {
            if !repo.index().contains_blob(&c.0)? {
                missing.insert(c);
            }
        }
    }
    Ok(())
}

/// Re-indexes the planned pack holding `id`, if any. Returns whether found.
pub(crate) fn rescue_blob(repo: &Repository, id: &Id) -> Result<bool> {
    Ok(rescue_from_plans(repo, &HashSet::from([*id]))? > 0)
}

/// Re-indexes every planned pack that holds one of `ids`; returns how many.
fn rescue_from_plans(repo: &Repository, ids: &HashSet<Id>) -> Result<usize> {
    let sizes: HashMap<String, u64> = repo.backend().list(FileKind::Pack)?.into_iter().collect();
    let mut rescued = 0;
    for pack in planned_packs(repo)? {
        let Some(&size) = sizes.get(&pack) else {
            continue;
        };
        // A damaged pack cannot be rescued; a transient error must not
        // pass for "not needed".
        let entries = match repo.read_pack_trailer(&pack, size) {
            Ok(e) => e,
            Err(Error::NotFound { .. } | Error::Corrupt { .. } | Error::Decrypt { .. }) => continue,
            Err(e) => return Err(e),
        };
        if entries.iter().any(|e| ids.contains(&e.id)) {
            let pid = Id::from_hex(&pack)
                .ok_or_else(|| Error::corrupt(format!("pack {pack}"), "bad name"))?;
            repo.write_index(&[(pid, entries)])?;
            warn!(pack = %pack, "re-indexed a planned pack that a snapshot needs");
            rescued += 1;
        }
    }
    Ok(rescued)
}
