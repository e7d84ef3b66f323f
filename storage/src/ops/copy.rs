//! `marmoset copy`: snapshots from one repository into another.
//!
//! The two repositories have their own master keys, so a blob's id differs
//! between them (ids are keyed hashes) and every blob is re-encrypted:
//! data blobs are read from the source, authenticated, hashed with the
//! target's id key and stored there unless the target already holds them;
//! trees and chunk lists are rewritten for the target's ids, bottom up.
//! When both repositories share chunker parameters and seed
//! (`init --copy-chunker-params`), the same files give the same chunks,
//! so data the target already holds is never stored twice.
//!
//! The target's local cache remembers which source blob became which target
//! blob (`copy map`): a daily copy reads from the source only the blobs of
//! new data, and walks the rest of the snapshot's trees. A remembered
//! blob is used only while the target's index holds it, so a stale or
//! lost map costs reads, never correctness.
//!
//! Writing goes through the backup's saver and commit protocol (session
//! lease, packs before index files before the snapshot, the checks against
//! a concurrent maintenance), so an interrupted copy leaves a valid target
//! and its packs are reused by the next run. The copied snapshot records
//! the source snapshot's id as `original`; a snapshot whose original the
//! target holds is skipped.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use crossbeam_channel::bounded;
use marmoset_index::BlobLocation;
use serde::Serialize;
use tracing::{info, warn};

use super::backup::saver::{begin_write, commit_snapshot, Saver, WriteStart, PACK_QUEUE};
use super::backup::Progress;
use crate::error::{Error, Result};
use crate::format::blob::{self, BlobType};
use crate::format::id::Id;
use crate::format::pack::PackBuilder;
use crate::format::snapshot::Snapshot;
use crate::format::tree::{self, NodeKind, Tree};
use crate::repo::reads::coalesce_within;
use crate::repo::reads::ReadRange;
use crate::repo::walk::Walker;
use crate::repo::Repository;

/// Source blobs looked up and read per round: bounds the memory of the
/// list of blobs to read, whatever the size of the snapshot.
const BATCH_BLOBS: usize = 16_384;
/// How long a copy whose snapshot has the smallest id among simultaneous
/// copies of one snapshot waits for the others to withdraw theirs.
const CONFLICT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest coalesced read from the source.
const MAX_READ: u64 = 16 << 20;

/// Caller's choices for one copy.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Count what would be copied; write nothing.
    pub dry_run: bool,
    /// Worker threads reading, decrypting and re-encrypting (default: the
    /// number of cores, at least 4 for a remote source).
    pub threads: Option<usize>,
}

/// A snapshot the copy looked at.
#[derive(Debug, Clone, Serialize)]
pub struct CopiedSnapshot {
    /// Its id in the source.
    pub source_id: String,
    /// Its id in the target (the new copy, or the one already there).
    pub target_id: Option<String>,
    pub time: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
    pub source: String,
    pub tags: Vec<String>,
    /// Why it was not copied (damaged in the source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a copy did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    pub dry_run: bool,
    pub copied: Vec<CopiedSnapshot>,
    /// Already in the target (a snapshot there records it as original).
    pub skipped: Vec<CopiedSnapshot>,
    /// Not copied: the source could not give all of their data.
    pub failed: Vec<CopiedSnapshot>,
    /// Data blobs read from the source (with `dry_run`: that would be read,
    /// at most: the target may hold some of them already).
    pub data_blobs_read: u64,
    /// Their plaintext bytes.
    pub bytes_read: u64,
    /// Data blobs found through the copy map: neither read nor stored.
    pub data_blobs_known: u64,
    pub data_blobs_added: u64,
    pub tree_blobs_added: u64,
    /// Encoded (compressed, encrypted) bytes stored in the target.
    pub bytes_added: u64,
    pub packs_written: u64,
}

/// Copies `snaps` (source ids and manifests) from `src` into `dst`, oldest
/// first. A snapshot the source cannot give whole (a damaged or missing
/// blob) is reported in `failed` and not copied; the others go on. Storage
/// errors stop the copy (what was committed stays).
pub fn copy(
    src: &Repository,
    dst: &Repository,
    mut snaps: Vec<(Id, Snapshot)>,
    opts: &CopyOptions,
    progress: &Progress,
) -> Result<CopyReport> {
    if src.config().repository_id == dst.config().repository_id {
        return Err(Error::InvalidArgument(
            "source and target are the same repository (or one is a copy of the other's files: \
             they share its id and key)"
                .into(),
        ));
    }
    snaps.sort_by_key(|(_, s)| s.time);
    let mut report = CopyReport {
        dry_run: opts.dry_run,
        ..CopyReport::default()
    };
    let threads = opts
        .threads
        .unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            if src.backend().is_remote() {
                cores.max(4)
            } else {
                cores
            }
        })
        .max(1);
    let active = dst.begin_backup();
    // A dry run writes nothing to the target: no session lease, and the
    // packs an interrupted run left are not indexed.
    let start = if opts.dry_run {
        None
    } else {
        Some(begin_write(
            dst,
            &active,
            &format!("copy from {}", src.backend().location()),
        )?)
    };
    let listed = match &start {
        Some(_) => None,
        None => Some(dst.snapshots()?),
    };
    let existing = match (&start, &listed) {
        (Some(s), _) => &s.snapshots.0,
        (None, Some(l)) => &l.0,
        (None, None) => return Err(Error::Aborted("no target listing".into())),
    };
    // Target snapshots by the source snapshot they copy, to skip those
    // and to point a copy's parent at its parent's copy.
    let mut copies: HashMap<Id, Id> = HashMap::new();
    for (id, s) in existing {
        copies.insert(s.original.unwrap_or(*id), *id);
    }
    let engine = Engine {
        src,
        dst,
        threads,
        progress,
    };
    // Dry run: source blobs already counted.
    let mut seen = HashSet::new();
    for (id, snap) in snaps {
        let original = snap.original.unwrap_or(id);
        let mut entry = CopiedSnapshot {
            source_id: id.to_hex(),
            target_id: None,
            time: snap.time,
            hostname: snap.hostname.clone(),
            source: snap.source.clone(),
            tags: snap.tags.clone(),
            error: None,
        };
        if let Some(there) = copies.get(&original) {
            entry.target_id = Some(there.to_hex());
            report.skipped.push(entry);
            continue;
        }
        let result = match &start {
            None => engine.scan(&snap, &mut seen, &mut report).map(|()| None),
            Some(start) => engine
                .copy_one(start, &snap, original, &copies, &mut report)
                .map(Some),
        };
        match result {
            Ok(None) => report.copied.push(entry),
            Ok(Some(Outcome::New(new))) => {
                copies.insert(original, new);
                entry.target_id = Some(new.to_hex());
                info!(source = %id, target = %new, "snapshot copied");
                report.copied.push(entry);
            }
            Ok(Some(Outcome::There(there))) => {
                copies.insert(original, there);
                entry.target_id = Some(there.to_hex());
                report.skipped.push(entry);
            }
            Err(e) if is_damage(&e) => {
                warn!(snapshot = %id, error = %e, "snapshot not copied");
                entry.error = Some(e.to_string());
                report.failed.push(entry);
            }
            Err(e) => return Err(e),
        }
    }
    drop(start);
    drop(active);
    Ok(report)
}

/// How copying one snapshot ended.
enum Outcome {
    /// Copied: the new snapshot's id.
    New(Id),
    /// Another copy (running at the same time) wrote it first: its id.
    There(Id),
}

/// Errors that say the source cannot give a snapshot whole, rather than
/// that a storage or the copy itself failed.
fn is_damage(e: &Error) -> bool {
    matches!(
        e,
        Error::Corrupt { .. } | Error::Decrypt { .. } | Error::BlobNotFound { .. }
    )
}

struct Engine<'a> {
    src: &'a Repository,
    dst: &'a Repository,
    threads: usize,
    progress: &'a Progress,
}

impl Engine<'_> {
    /// The copy map's key for a source blob: the source repository's id
    /// first, so maps of several sources never mix.
    fn map_key(&self, id: &Id) -> [u8; 64] {
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(&self.src.config().repository_id.0);
        k[32..].copy_from_slice(&id.0);
        k
    }

    /// The target id of source data blob `id`, when the copy map knows it.
    fn mapped(&self, id: &Id) -> Result<Option<Id>> {
        Ok(self.dst.index().get_copy(&self.map_key(id))?.map(Id))
    }

    /// Calls `f` with every data blob id of `snap`'s files, each tree read
    /// once (chunk lists resolved).
    fn for_each_chunk(&self, snap: &Snapshot, mut f: impl FnMut(Id) -> Result<()>) -> Result<()> {
        let src = self.src;
        let roots = snap.root_parts().into_iter().map(|id| (id, ())).collect();
        Walker::new(src).dedup(true).run(roots, |listing| {
            let tree = listing.tree?;
            let mut next = Vec::new();
            for node in &tree.nodes {
                match node.kind {
                    NodeKind::Dir => next.extend(node.subtree.iter().map(|p| (*p, ()))),
                    NodeKind::File => {
                        for c in src.file_chunks(node)? {
                            f(c)?;
                        }
                    }
                    _ => {}
                }
            }
            Ok(next)
        })
    }

    /// Dry run: counts the data blobs of `snap` that a copy would read.
    /// `seen`: the source blobs already counted (for earlier snapshots).
    fn scan(&self, snap: &Snapshot, seen: &mut HashSet<Id>, report: &mut CopyReport) -> Result<()> {
        let mut wanted = Vec::new();
        self.for_each_chunk(snap, |c| {
            if seen.insert(c) {
                let known = match self.mapped(&c)? {
                    Some(t) => self.dst.index().contains_blob(&t.0)?,
                    None => false,
                };
                if known {
                    report.data_blobs_known += 1;
                } else {
                    wanted.push(c);
                }
            }
            Ok(())
        })?;
        for id in wanted {
            let loc = self.src.blob_location(&id)?;
            report.data_blobs_read += 1;
            report.bytes_read += u64::from(loc.raw_length);
        }
        Ok(())
    }

    /// Copies one snapshot: its new data, then its trees, then the
    /// manifest, through one saver whose packs are all durable and indexed
    /// before the snapshot is written.
    fn copy_one(
        &self,
        start: &WriteStart,
        snap: &Snapshot,
        original: Id,
        copies: &HashMap<Id, Id>,
        report: &mut CopyReport,
    ) -> Result<Outcome> {
        let dst = self.dst;
        let saver = Saver::new(
            dst,
            &start.session,
            start.missing_packs.clone(),
            self.progress,
            None,
        );
        let (upload_tx, upload_rx) = bounded::<PackBuilder>(PACK_QUEUE);
        *crate::util::lock(&saver.upload_tx) = Some(upload_tx);
        let uploaders = dst.backend().write_parallelism().max(1);
        let mut root_parts = Vec::new();
        std::thread::scope(|s| -> Result<()> {
            let saver = &saver;
            let mut handles = Vec::new();
            for _ in 0..uploaders {
                let rx = upload_rx.clone();
                handles.push(s.spawn(move || saver.upload_loop(rx)));
            }
            drop(upload_rx);
            let work = (|| -> Result<Vec<Id>> {
                self.transfer_snapshot(saver, snap, report)?;
                // Deep directory trees recurse once per level.
                let rewrite = std::thread::Builder::new()
                    .stack_size(256 << 20)
                    .spawn_scoped(s, || {
                        let mut trees = HashMap::new();
                        snap.root_parts()
                            .iter()
                            .map(|p| self.rewrite_tree(saver, *p, &mut trees))
                            .collect::<Result<Vec<Id>>>()
                    })
                    .map_err(|e| Error::Aborted(format!("starting the tree writer: {e}")))?;
                rewrite
                    .join()
                    .map_err(|_| Error::Aborted("tree writer panicked".into()))?
            })();
            let flushed = match (&work, saver.aborted()) {
                (Ok(_), false) => saver.flush_packer(),
                _ => Ok(()),
            };
            drop(crate::util::lock(&saver.upload_tx).take());
            let mut panicked = false;
            for h in handles {
                panicked |= h.join().is_err();
            }
            if panicked {
                return Err(Error::Aborted("a pack writer panicked".into()));
            }
            root_parts = work?;
            flushed
        })
        .map_err(|e| crate::util::lock(&saver.first_error).take().unwrap_or(e))?;
        if let Some(e) = crate::util::lock(&saver.first_error).take() {
            return Err(e);
        }
        report.data_blobs_added += saver.stats.data_blobs.load(Ordering::Relaxed);
        report.tree_blobs_added += saver.stats.tree_blobs.load(Ordering::Relaxed);
        report.bytes_added += saver.stats.bytes_added.load(Ordering::Relaxed);
        report.packs_written += saver.stats.packs.load(Ordering::Relaxed);
        let tree = *root_parts
            .first()
            .ok_or_else(|| Error::Aborted("no root tree".into()))?;
        let copy = Snapshot {
            tree,
            tree_parts: if root_parts.len() > 1 {
                root_parts.clone()
            } else {
                Vec::new()
            },
            parent: snap.parent.and_then(|p| copies.get(&p).copied()),
            original: Some(original),
            ..snap.clone()
        };
        // Another copy of the same snapshot that ran beside this one: its
        // snapshot stands, ours is not written (what we stored is indexed
        // and left to maintenance).
        let (now, _) = dst.snapshots()?;
        if let Some((there, _)) = now
            .iter()
            .find(|(id, s)| s.original.unwrap_or(*id) == original)
        {
            start.session.check_present()?;
            saver.flush_index()?;
            return Ok(Outcome::There(*there));
        }
        let id = commit_snapshot(
            dst,
            &saver,
            &start.session,
            &root_parts,
            &start.index_at_start,
            &copy,
        )?;
        // Copies that passed the check above at about the same moment
        // each wrote a snapshot. One that sees another with a smaller id
        // withdraws its own. One with the smallest id waits a moment:
        // those that saw it have withdrawn theirs by then, and one still
        // there finished its check before this snapshot existed and keeps
        // its own, so this one goes. (What a withdrawn copy stored is left
        // to maintenance.)
        let others = || -> Result<Vec<Id>> {
            let (now, _) = dst.snapshots()?;
            Ok(now
                .iter()
                .filter(|(i, s)| s.original.unwrap_or(*i) == original && *i != id)
                .map(|(i, _)| *i)
                .collect())
        };
        let mut seen = others()?;
        if seen.iter().all(|o| *o > id) && !seen.is_empty() {
            std::thread::sleep(CONFLICT_WAIT);
            seen = others()?;
        }
        match seen.iter().min() {
            None => Ok(Outcome::New(id)),
            Some(first) => {
                dst.backend()
                    .remove(crate::backend::FileKind::Snapshot, &id.to_hex())?;
                Ok(Outcome::There(*first))
            }
        }
    }

    /// Walks the snapshot's trees and copies every data blob the target
    /// does not hold yet, in batches.
    fn transfer_snapshot(
        &self,
        saver: &Saver,
        snap: &Snapshot,
        report: &mut CopyReport,
    ) -> Result<()> {
        let mut batch: Vec<Id> = Vec::new();
        let mut in_batch: HashSet<Id> = HashSet::new();
        self.for_each_chunk(snap, |c| {
            if in_batch.contains(&c) {
                return Ok(());
            }
            if self.held(saver, &c)? {
                report.data_blobs_known += 1;
                return Ok(());
            }
            in_batch.insert(c);
            batch.push(c);
            if batch.len() >= BATCH_BLOBS {
                self.transfer(saver, &batch, report)?;
                batch.clear();
                in_batch.clear();
            }
            Ok(())
        })?;
        self.transfer(saver, &batch, report)
    }

    /// Whether the target holds (or this copy is storing) the blob that
    /// source blob `id` became.
    fn held(&self, saver: &Saver, id: &Id) -> Result<bool> {
        let Some(t) = self.mapped(id)? else {
            return Ok(false);
        };
        if saver.known(&t)? {
            return Ok(true);
        }
        Ok(crate::util::lock(&saver.inflight).contains(&t))
    }

    /// Reads `ids` from the source (coalesced reads in pack order, on
    /// `threads` workers), and stores each in the target under its new id
    /// unless the target has it; the copy map learns every pair.
    fn transfer(&self, saver: &Saver, ids: &[Id], report: &mut CopyReport) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let src = self.src;
        type Item = (u64, u64, (Id, BlobLocation));
        let mut by_pack: HashMap<[u8; 32], Vec<Item>> = HashMap::new();
        for id in ids {
            let loc = src.blob_location(id)?;
            by_pack.entry(loc.pack).or_default().push((
                loc.offset,
                u64::from(loc.length),
                (*id, loc),
            ));
        }
        let mut work = Vec::new();
        for (pack, items) in by_pack {
            for range in coalesce_within(items, MAX_READ) {
                work.push((Id(pack).to_hex(), range));
            }
        }
        let (tx, rx) = bounded::<(String, ReadRange<(Id, BlobLocation)>)>(self.threads * 2);
        let read = std::sync::atomic::AtomicU64::new(0);
        let bytes = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| -> Result<()> {
            let mut handles = Vec::new();
            for _ in 0..self.threads {
                let rx = rx.clone();
                let (read, bytes) = (&read, &bytes);
                handles.push(s.spawn(move || -> Result<()> {
                    for (pack, range) in rx {
                        if saver.aborted() {
                            continue;
                        }
                        let (n, b) = self.copy_range(saver, &pack, range)?;
                        read.fetch_add(n, Ordering::Relaxed);
                        bytes.fetch_add(b, Ordering::Relaxed);
                    }
                    Ok(())
                }));
            }
            drop(rx);
            for item in work {
                if saver.aborted() || tx.send(item).is_err() {
                    break;
                }
            }
            drop(tx);
            let mut first = Ok(());
            for h in handles {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Aborted("a copy worker panicked".into())));
                if first.is_ok() {
                    first = r;
                }
            }
            first
        })?;
        report.data_blobs_read += read.into_inner();
        report.bytes_read += bytes.into_inner();
        Ok(())
    }

    /// One coalesced read: each blob authenticated against its source id,
    /// given its target id, and stored unless the target has it.
    fn copy_range(
        &self,
        saver: &Saver,
        pack: &str,
        range: ReadRange<(Id, BlobLocation)>,
    ) -> Result<(u64, u64)> {
        let (src, dst) = (self.src, self.dst);
        let buf = src
            .backend()
            .read_range(
                crate::backend::FileKind::Pack,
                pack,
                range.offset,
                range.length,
            )
            .map_err(|e| match e {
                Error::NotFound { .. } => Error::corrupt(
                    format!("pack {pack}"),
                    "missing from the source (if a maintenance of the source ran \
                         meanwhile, run the copy again)",
                ),
                other => other,
            })?;
        let mut bytes = 0;
        for (offset, length, (id, loc)) in &range.items {
            let raw = range.slice(&buf, *offset, *length).ok_or_else(|| {
                Error::corrupt(format!("pack {pack}"), "shorter than its index says")
            })?;
            let opened = blob::open_for_copy(
                src.keys(),
                BlobType::Data,
                id,
                loc.flags,
                loc.raw_length,
                raw,
            )
            .map_err(|e| e.in_pack(pack))?;
            let target = dst.keys().content_id(&opened.plain);
            // Recorded blob by blob, before the blob is stored: a range can
            // hold many packs' worth of blobs, and a copy killed in the
            // middle of one must still know what it stored (a remembered
            // id is used only once the target's index holds it).
            dst.index().put_copies(&[(self.map_key(id), target.0)])?;
            if saver.claim(&target)? {
                saver.add_encoded(self.encode(saver, target, &opened)?)?;
            }
            let n = opened.plain.len() as u64;
            bytes += n;
            self.progress.bytes_read.fetch_add(n, Ordering::Relaxed);
        }
        Ok((range.items.len() as u64, bytes))
    }

    /// A source data blob for the target. The source's compression is kept
    /// (its zstd body as it is, an incompressible chunk uncompressed) rather
    /// than tried again: the same answer at a fraction of the CPU. Only when
    /// one side does not compress at all is the target's level applied.
    fn encode(&self, saver: &Saver, id: Id, opened: &blob::Opened) -> Result<blob::EncodedBlob> {
        let keys = self.dst.keys();
        if saver.level == 0 || self.src.config().compression_level == 0 {
            return blob::encode(keys, BlobType::Data, id, &opened.plain, saver.level);
        }
        blob::encode_opened(keys, BlobType::Data, id, opened)
    }

    /// The target id of source tree part `id`, written (with the chunk
    /// lists below it) for the target's ids. Trees shared within the
    /// snapshot are rewritten once.
    fn rewrite_tree(&self, saver: &Saver, id: Id, done: &mut HashMap<Id, Id>) -> Result<Id> {
        if let Some(t) = done.get(&id) {
            return Ok(*t);
        }
        if saver.aborted() {
            return Err(Error::Aborted("copy stopped".into()));
        }
        let mut tree = self.src.load_tree(&id)?;
        for node in &mut tree.nodes {
            match node.kind {
                NodeKind::Dir => {
                    node.subtree = node
                        .subtree
                        .iter()
                        .map(|p| self.rewrite_tree(saver, *p, done))
                        .collect::<Result<_>>()?;
                }
                NodeKind::File if node.indirect => {
                    let mut lists = Vec::with_capacity(node.content.len());
                    for list in &node.content {
                        let ids = tree::decode_chunk_list(list, &self.src.load_blob(list)?)?;
                        let mapped = self.map_all(&ids)?;
                        lists.push(
                            saver.save_blob(
                                BlobType::ChunkList,
                                &tree::encode_chunk_list(&mapped),
                            )?,
                        );
                    }
                    node.content = lists;
                }
                NodeKind::File => node.content = self.map_all(&node.content)?,
                _ => {}
            }
        }
        let new = saver.save_blob(BlobType::Tree, &Tree::encode(&tree)?)?;
        done.insert(id, new);
        Ok(new)
    }

    /// Target ids of source data blobs the transfer has seen.
    fn map_all(&self, ids: &[Id]) -> Result<Vec<Id>> {
        ids.iter()
            .map(|c| {
                self.mapped(c)?.ok_or_else(|| {
                    Error::corrupt(format!("blob {c}"), "was not copied to the target")
                })
            })
            .collect()
    }
}
