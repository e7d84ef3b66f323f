//! The tree walker: the one way to go through a snapshot's directories.
//!
//! Garbage collection's mark, the backup's rescue, `check`, `find`,
//! `verify` and the restore planner all walk trees the same way: breadth
//! first, a bounded batch of directory listings loaded (read, decrypted,
//! decoded) in parallel, then handed to the caller in order. The caller
//! says which subtrees to descend into, so it decides about errors (skip,
//! rescue, report) and carries its own per-directory context (a path, a
//! target directory). Memory is bounded by the batch, not by the
//! snapshot: only the queue of pending (tree id, context) pairs grows with
//! the number of directories.

use std::collections::{HashSet, VecDeque};

use super::Repository;
use crate::error::{Error, Result};
use crate::format::id::Id;
use crate::format::tree::Tree;

/// Directory listings loaded and held at once.
const DEFAULT_BATCH: usize = 256;

/// One loaded directory listing (or why it could not be loaded), with the
/// context the caller attached when it asked for it.
pub struct Listing<P> {
    pub id: Id,
    pub at: P,
    pub tree: Result<Tree>,
}

/// Walks trees breadth first; see the module documentation.
pub struct Walker<'r> {
    repo: &'r Repository,
    dedup: bool,
    workers: usize,
    batch: usize,
}

impl<'r> Walker<'r> {
    pub fn new(repo: &'r Repository) -> Self {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 8);
        Self {
            repo,
            dedup: false,
            workers,
            batch: DEFAULT_BATCH,
        }
    }

    /// Visit each tree id once, however many directories share it (as
    /// GC's mark and `check` want; a restore wants every path).
    pub fn dedup(mut self, yes: bool) -> Self {
        self.dedup = yes;
        self
    }

    /// Listings loaded and held at once (at least 1).
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Walks from `roots`. `visit` gets every listing in breadth-first
    /// order and returns the subtrees to descend into, with their context;
    /// its first error stops the walk.
    pub fn run<P, F>(&self, roots: Vec<(Id, P)>, mut visit: F) -> Result<()>
    where
        P: Send,
        F: FnMut(Listing<P>) -> Result<Vec<(Id, P)>>,
    {
        let mut seen = HashSet::new();
        let mut queue: VecDeque<(Id, P)> = roots.into();
        self.repo.prefetch_all_trees();
        while !queue.is_empty() {
            let mut batch = Vec::with_capacity(self.batch.min(queue.len()));
            while batch.len() < self.batch {
                let Some((id, at)) = queue.pop_front() else {
                    break;
                };
                if !self.dedup || seen.insert(id) {
                    batch.push((id, at));
                }
            }
            for listing in self.load(batch)? {
                queue.extend(visit(listing)?);
            }
        }
        Ok(())
    }

    /// Loads a batch with up to `workers` threads, keeping its order.
    fn load<P: Send>(&self, batch: Vec<(Id, P)>) -> Result<Vec<Listing<P>>> {
        let repo = self.repo;
        // Remote: the batch's trees arrive in a few coalesced reads.
        let ids: Vec<Id> = batch.iter().map(|(id, _)| *id).collect();
        repo.prefetch_metadata(&ids);
        let load_one = |(id, at): (Id, P)| Listing {
            tree: repo.load_tree(&id),
            id,
            at,
        };
        if batch.len() < 4 || self.workers == 1 {
            return Ok(batch.into_iter().map(load_one).collect());
        }
        let per = batch.len().div_ceil(self.workers);
        let mut parts: Vec<Vec<(Id, P)>> = Vec::new();
        let mut it = batch.into_iter().peekable();
        while it.peek().is_some() {
            parts.push(it.by_ref().take(per).collect());
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| {
                    let ids: Vec<Id> = part.iter().map(|(id, _)| *id).collect();
                    (
                        ids,
                        s.spawn(move || part.into_iter().map(load_one).collect::<Vec<_>>()),
                    )
                })
                .collect();
            let mut out = Vec::new();
            for (ids, h) in handles {
                match h.join() {
                    Ok(listings) => out.extend(listings),
                    // A loader thread cannot panic short of a bug; its
                    // listings (and their contexts) are gone with it, so
                    // the walk stops rather than go on without them.
                    Err(_) => {
                        return Err(Error::corrupt(
                            format!("tree {}", ids.first().map(Id::to_hex).unwrap_or_default()),
                            "tree loader panicked",
                        ))
                    }
                }
            }
            Ok(out)
        })
    }
}
