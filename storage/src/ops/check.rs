//! `check`: structural and (optionally) full data verification, and
//! `repair snapshots`: rewrite snapshots without their unreadable parts.
//!
//! Check works from the repository alone (index files, packs, snapshots),
//! never from the local cache, so a stale cache cannot hide damage.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use rand::seq::SliceRandom;
use serde::Serialize;
use tracing::warn;

use crate::backend::{FileKind, CONFIG_NAME};
use crate::error::{Error, Result};
use crate::format::blob::{self, BlobType};
use crate::format::crypto::{KeyFile, OVERHEAD};
use crate::format::id::Id;
use crate::format::pack::{self, PackEntry, ENTRY_LEN, FOOTER_LEN};
use crate::format::snapshot::Snapshot;
use crate::format::tree::{self, Node, NodeKind, Tree};
use crate::ops::blob_sets::BlobTable;
use crate::repo::walk::{Listing, Walker};
use crate::repo::Repository;

/// Which packs `--read-data` reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    None,
    All,
    /// A random fraction (0..=1] of the packs.
    Fraction(f64),
    /// Part `n` of `m` (1-based): packs whose first id byte mod m == n-1,
    /// so m weekly runs cover everything.
    Part(u32, u32),
}

impl ReadData {
    /// Parses `10%` or `n/m`.
    pub fn parse_subset(s: &str) -> Result<Self> {
        let bad = || Error::InvalidArgument(format!("invalid subset {s:?} (use e.g. 10% or 2/5)"));
        if let Some(p) = s.strip_suffix('%') {
            let f: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(f > 0.0 && f <= 100.0) {
                return Err(bad());
            }
            return Ok(ReadData::Fraction(f / 100.0));
        }
        let (n, m) = s.split_once('/').ok_or_else(bad)?;
        let (n, m): (u32, u32) = (
            n.trim().parse().map_err(|_| bad())?,
            m.trim().parse().map_err(|_| bad())?,
        );
        if m == 0 || n == 0 || n > m {
            return Err(bad());
        }
        Ok(ReadData::Part(n, m))
    }
}

/// One thing `check` found wrong (an error) or worth knowing (a warning).
/// The text says which object and what; `--json` gives the fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CheckProblem {
    #[error("config marmoset.repository is missing")]
    MissingConfig,
    #[error("key {key}: {reason}")]
    BadKey { key: String, reason: String },
    #[error("index {index}: {reason}")]
    BadIndex { index: String, reason: String },
    #[error("snapshot {snapshot}: {reason}")]
    BadSnapshot { snapshot: String, reason: String },
    /// A directory, file or entry within a snapshot's trees.
    #[error("snapshot {snapshot}: {path}: {reason}")]
    BadTree {
        snapshot: String,
        path: String,
        reason: String,
    },
    #[error("pack {pack}: {reason}")]
    BadPack { pack: String, reason: String },
    /// A lease or plan that does not authenticate or is a replay.
    #[error("{object} ignored: {reason} (someone with write access but no key?)")]
    Ignored { object: String, reason: String },
    #[error("pack {pack} is in no index (left by an interrupted backup, or being written); the next backup indexes it")]
    UnindexedPack { pack: String },
}

fn pack_problem(pack: &str, reason: impl ToString) -> CheckProblem {
    // Errors about the pack already name it: said once is enough.
    let reason = reason.to_string();
    let reason = reason
        .strip_prefix(&format!("pack {pack}: "))
        .map(str::to_string)
        .unwrap_or(reason)
        .replace(&format!(" in pack {pack}"), "");
    CheckProblem::BadPack {
        pack: pack.to_string(),
        reason,
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub errors: Vec<CheckProblem>,
    pub warnings: Vec<CheckProblem>,
    pub keys: u64,
    pub index_files: u64,
    pub packs: u64,
    pub snapshots: u64,
    pub trees: u64,
    pub data_blobs_referenced: u64,
    pub packs_read: u64,
    pub blobs_read: u64,
    /// Of `blobs_read`, those that authenticated.
    pub blobs_ok: u64,
    pub bytes_read: u64,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

pub fn check(repo: &Repository, read_data: ReadData) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let backend = repo.backend();
    // Config was verified (MAC) when the repository was opened.
    if backend.size(FileKind::Config, CONFIG_NAME).is_err() {
        r.errors.push(CheckProblem::MissingConfig);
    }
    for (name, _) in backend.list(FileKind::Key)? {
        r.keys += 1;
        match backend
            .read(FileKind::Key, &name)
            .map(|raw| serde_json::from_slice::<KeyFile>(&raw))
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => r.errors.push(CheckProblem::BadKey {
                key: name.clone(),
                reason: format!("malformed: {e}"),
            }),
            Err(e) => r.errors.push(CheckProblem::BadKey {
                key: name.clone(),
                reason: e.to_string(),
            }),
        }
    }

    let pack_sizes: HashMap<String, u64> = backend.list(FileKind::Pack)?.into_iter().collect();
    r.packs = pack_sizes.len() as u64;
    // Index: every entry must point inside an existing pack. Only ids and
    // lengths are kept (see `BlobTable`); `--read-data` reads the index
    // files again, a few at a time, for the rest.
    let mut table = BlobTable::default();
    let mut indexed_packs: HashSet<Id> = HashSet::new();
    let index_names = backend.list_names(FileKind::Index)?;
    for name in &index_names {
        r.index_files += 1;
        let packs = match repo.load_index_file(name) {
            Ok(p) => p,
            Err(e) => {
                r.errors.push(CheckProblem::BadIndex {
                    index: name.clone(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        for (pack, entries) in packs {
            check_index_entries(name, &pack, &entries, &pack_sizes, &mut r);
            for e in &entries {
                table.push(e.id, e.raw_length);
            }
            indexed_packs.insert(pack);
        }
    }
    table.finish();
    // Leases and plans written without the key are ignored by every
    // command; check names them so an operator can look for the intruder.
    let plans = crate::repo::coordination::plans::scan_plans(repo)?;
    let mut planned = std::collections::HashSet::new();
    for p in plans.plans {
        planned.extend(p.plan.packs);
    }
    // Named with their kind, as everywhere else: "plan <id>", "lock <id>".
    let mut rejected: Vec<(String, String)> = plans
        .rejected
        .into_iter()
        .map(|(n, why)| (format!("{} {n}", FileKind::Plan), why))
        .collect();
    for kind in [
        crate::repo::coordination::lease::LeaseKind::Session,
        crate::repo::coordination::lease::LeaseKind::Maintenance,
    ] {
        let scan = crate::repo::coordination::lease::scan(&**backend, repo.keys(), kind)?;
        rejected.extend(
            scan.rejected
                .into_iter()
                .map(|(n, why)| (format!("{} {n}", FileKind::Lock), why)),
        );
    }
    for (object, reason) in rejected {
        r.warnings.push(CheckProblem::Ignored { object, reason });
    }
    for name in pack_sizes.keys() {
        let indexed = Id::from_hex(name).is_some_and(|id| indexed_packs.contains(&id));
        if !indexed && !planned.contains(name) {
            r.warnings
                .push(CheckProblem::UnindexedPack { pack: name.clone() });
        }
    }

    // Snapshots: every tree readable, every blob indexed.
    let (snaps, bad) = repo.snapshots()?;
    for (name, e) in bad {
        r.errors.push(CheckProblem::BadSnapshot {
            snapshot: name.clone(),
            reason: e.to_string(),
        });
    }
    r.snapshots = snaps.len() as u64;
    let mut graph = TreeGraph::default();
    for (id, snap) in &snaps {
        check_snapshot(repo, id, snap, &mut table, &mut graph, &mut r);
    }
    report_shared_damage(repo, &snaps, &mut table, &graph, &mut r);
    drop(graph);
    r.data_blobs_referenced = table.marked();
    drop(table);

    if read_data != ReadData::None {
        read_packs(repo, &index_names, &pack_sizes, read_data, &mut r);
    }
    Ok(r)
}

/// Every entry of one indexed pack must lie inside that existing pack.
fn check_index_entries(
    index: &str,
    pack: &Id,
    entries: &[PackEntry],
    pack_sizes: &HashMap<String, u64>,
    r: &mut CheckReport,
) {
    let pname = pack.to_hex();
    let Some(&size) = pack_sizes.get(&pname) else {
        r.errors.push(CheckProblem::BadIndex {
            index: index.to_string(),
            reason: format!("pack {pname} is missing ({} blobs)", entries.len()),
        });
        return;
    };
    // Checked: index entries are repository-supplied numbers.
    let beyond = |e: &&PackEntry| {
        e.offset
            .checked_add(u64::from(e.length))
            .and_then(|end| end.checked_add(FOOTER_LEN))
            .is_none_or(|end| end > size)
    };
    if let Some(e) = entries.iter().find(beyond) {
        r.errors.push(CheckProblem::BadIndex {
            index: index.to_string(),
            reason: format!("blob {} points beyond the end of pack {pname}", e.id),
        });
        return;
    }
    // The trailer after the last blob holds at least one entry per listed
    // blob: a pack shorter than that lost its end (a truncated upload or
    // copy), though every blob may still be whole. Found from the listing
    // alone, without reading the pack.
    if let Some(least) = least_pack_size(entries).filter(|least| size < *least) {
        let problem = pack_problem(
            &pname,
            format!(
                "{size} bytes, shorter than its indexed blobs and their trailer \
                 ({least} bytes at least): truncated. `marmoset repair index` \
                 saves the blobs that are whole into a new pack"
            ),
        );
        if !r
            .errors
            .iter()
            .any(|e| e.to_string() == problem.to_string())
        {
            r.errors.push(problem);
        }
    }
}

/// The smallest size of a pack holding `entries`: its last blob's end, then
/// an encrypted trailer of at least one entry per distinct blob offset, then
/// the footer. `None` on numbers that overflow (reported elsewhere).
fn least_pack_size(entries: &[PackEntry]) -> Option<u64> {
    let mut offsets: Vec<u64> = entries.iter().map(|e| e.offset).collect();
    offsets.sort_unstable();
    offsets.dedup();
    let blobs_end = entries
        .iter()
        .map(|e| e.offset.checked_add(u64::from(e.length)))
        .try_fold(0u64, |m, end| end.map(|end| m.max(end)))?;
    let trailer = (offsets.len() as u64).checked_mul(ENTRY_LEN as u64)? + OVERHEAD as u64;
    blobs_end.checked_add(trailer)?.checked_add(FOOTER_LEN)
}

/// `--read-data`: the selected packs, each compared with the first index
/// file that lists it. Index files are loaded again in batches rather than
/// kept from the first pass, so memory does not grow with the repository.
fn read_packs(
    repo: &Repository,
    index_names: &[String],
    pack_sizes: &HashMap<String, u64>,
    read_data: ReadData,
    r: &mut CheckReport,
) {
    let mut selected: Vec<&str> = pack_sizes
        .keys()
        .map(String::as_str)
        .filter(|name| match read_data {
            ReadData::Part(n, m) => {
                Id::from_hex(name).is_some_and(|id| u32::from(id.0[0]) % m == n - 1)
            }
            _ => true,
        })
        .collect();
    if let ReadData::Fraction(f) = read_data {
        selected.shuffle(&mut rand::thread_rng());
        let n = ((selected.len() as f64 * f).ceil() as usize).min(selected.len());
        selected.truncate(n);
    }
    let mut pending: HashSet<&str> = selected.into_iter().collect();
    let mut batch: HashMap<Id, Vec<PackEntry>> = HashMap::new();
    let mut batch_entries = 0;
    for name in index_names {
        // An unreadable index file was reported by the first pass; its
        // packs are still read below, without an index to compare with.
        let Ok(packs) = repo.load_index_file(name) else {
            continue;
        };
        for (pack, entries) in packs {
            if pending.remove(pack.to_hex().as_str()) {
                batch_entries += entries.len();
                batch.insert(pack, entries);
            }
        }
        if batch_entries >= READ_BATCH_ENTRIES || batch.len() >= READ_BATCH_PACKS {
            read_batch(repo, batch.keys().map(Id::to_hex).collect(), &batch, r);
            batch.clear();
            batch_entries = 0;
        }
    }
    read_batch(repo, batch.keys().map(Id::to_hex).collect(), &batch, r);
    let unindexed = pending.into_iter().map(str::to_string).collect();
    read_batch(repo, unindexed, &HashMap::new(), r);
}

/// Index entries (and packs) held at once by `--read-data`.
const READ_BATCH_ENTRIES: usize = 500_000;
const READ_BATCH_PACKS: usize = 256;

/// Reads `names` (in name order, so reports do not depend on timing) and
/// adds what was found to `r`.
fn read_batch(
    repo: &Repository,
    mut names: Vec<String>,
    indexed: &HashMap<Id, Vec<PackEntry>>,
    r: &mut CheckReport,
) {
    names.sort();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for part in read_packs_parallel(repo, &names, indexed) {
        r.packs_read += part.packs_read;
        r.blobs_read += part.blobs_read;
        r.blobs_ok += part.blobs_ok;
        r.bytes_read += part.bytes_read;
        r.errors.extend(part.errors);
    }
}

/// Packs read at once by `--read-data`: each is a whole-object read, so
/// on S3 they overlap their round trips; memory is one pack per reader.
const PACK_READERS: usize = 4;

/// Reads `names` with [`PACK_READERS`] threads; one partial report per
/// pack, in the order given, so the report does not depend on timing.
fn read_packs_parallel(
    repo: &Repository,
    names: &[&str],
    indexed: &HashMap<Id, Vec<PackEntry>>,
) -> Vec<CheckReport> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<CheckReport>> =
        names.iter().map(|_| Default::default()).collect();
    std::thread::scope(|s| {
        for _ in 0..PACK_READERS.min(names.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(name) = names.get(i) else { break };
                let mut part = CheckReport::default();
                read_pack(repo, name, indexed, &mut part);
                *crate::util::lock(&results[i]) = part;
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect()
}

fn check_snapshot(
    repo: &Repository,
    id: &Id,
    snap: &Snapshot,
    table: &mut BlobTable,
    graph: &mut TreeGraph,
    r: &mut CheckReport,
) {
    // The full id, as in `bad_snapshot`: problems are matched by tools.
    let short = id.to_hex();
    let roots = snap
        .root_parts()
        .into_iter()
        .filter(|t| graph.number(*t).1)
        .map(|t| (t, "/".to_string()))
        .collect();
    let w = Walk {
        repo,
        short: &short,
    };
    // The walk itself cannot fail: every problem is reported and the walk
    // goes on with the rest.
    let walked = Walker::new(repo).run(roots, |listing| {
        r.trees += 1;
        let errors_before = r.errors.len();
        let (parent, _) = graph.number(listing.id);
        let next = check_listing(&w, listing, table, r);
        if r.errors.len() > errors_before {
            graph.damaged.push(parent);
        }
        let mut fresh = Vec::with_capacity(next.len());
        for (t, path) in next {
            let (child, new) = graph.number(t);
            graph.edges.push((parent, child));
            if new {
                fresh.push((t, path));
            }
        }
        Ok(fresh)
    });
    if let Err(e) = walked {
        r.errors.push(CheckProblem::BadSnapshot {
            snapshot: short.clone(),
            reason: e.to_string(),
        });
    }
}

/// Checks one loaded (or unloadable) directory; returns its subdirectories.
fn check_listing(
    w: &Walk<'_>,
    listing: Listing<String>,
    table: &mut BlobTable,
    r: &mut CheckReport,
) -> Vec<(Id, String)> {
    let mut next = Vec::new();
    match listing.tree {
        Ok(t) => check_tree(w, &listing.at, t, table, &mut next, r),
        Err(e) => {
            let reason = match e {
                Error::BlobNotFound { .. } => {
                    format!("tree {} is missing (in no index)", listing.id)
                }
                e => e.to_string(),
            };
            r.errors.push(CheckProblem::BadTree {
                snapshot: w.short.to_string(),
                path: listing.at,
                reason,
            });
        }
    }
    next
}

/// The trees the snapshot walks went through, numbered, and the directory
/// edges between them. Each tree is checked once however many snapshots
/// (or directories) share it, so its problems are first reported only
/// where the walk met it; these edges say afterwards who else reaches it.
#[derive(Default)]
struct TreeGraph {
    numbers: HashMap<Id, u32>,
    /// (parent, child) for every subdirectory entry of every checked tree.
    edges: Vec<(u32, u32)>,
    /// Trees with a problem of their own (unreadable, or a bad entry).
    damaged: Vec<u32>,
}

impl TreeGraph {
    /// The number of `id`, and whether this is the first time it is seen.
    fn number(&mut self, id: Id) -> (u32, bool) {
        // Past 4 billion trees numbers repeat: that only widens the set
        // of trees walked again when damage is reported.
        let next = self.numbers.len() as u32;
        match self.numbers.entry(id) {
            Entry::Occupied(e) => (*e.get(), false),
            Entry::Vacant(e) => (*e.insert(next), true),
        }
    }

    /// Trees that are damaged or hold a damaged tree somewhere below.
    fn tainted(&self) -> HashSet<Id> {
        if self.damaged.is_empty() {
            return HashSet::new();
        }
        let mut up: Vec<(u32, u32)> = self.edges.iter().map(|&(p, c)| (c, p)).collect();
        up.sort_unstable();
        let mut tainted: HashSet<u32> = self.damaged.iter().copied().collect();
        let mut todo: Vec<u32> = tainted.iter().copied().collect();
        while let Some(child) = todo.pop() {
            let from = up.partition_point(|&(c, _)| c < child);
            for &(_, parent) in up[from..].iter().take_while(|&&(c, _)| c == child) {
                if tainted.insert(parent) {
                    todo.push(parent);
                }
            }
        }
        self.numbers
            .iter()
            .filter(|(_, n)| tainted.contains(n))
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Reports the damage each snapshot reaches through a tree that another
/// snapshot (or another directory) reached first, at its own paths: an
/// operator deciding what to forget or repair needs every snapshot that
/// is affected, not the first one. Only damaged trees and their ancestors
/// are walked again.
fn report_shared_damage(
    repo: &Repository,
    snaps: &[(Id, Snapshot)],
    table: &mut BlobTable,
    graph: &TreeGraph,
    r: &mut CheckReport,
) {
    let tainted = graph.tainted();
    if tainted.is_empty() {
        return;
    }
    let mut reported: HashSet<String> = r.errors.iter().map(ToString::to_string).collect();
    for (id, snap) in snaps {
        let short = id.to_hex();
        let w = Walk {
            repo,
            short: &short,
        };
        let roots = snap
            .root_parts()
            .into_iter()
            .filter(|t| tainted.contains(t))
            .map(|t| (t, "/".to_string()))
            .collect();
        let mut found = CheckReport::default();
        let walked = Walker::new(repo).run(roots, |listing| {
            let mut next = check_listing(&w, listing, table, &mut found);
            next.retain(|(t, _)| tainted.contains(t));
            Ok(next)
        });
        if let Err(e) = walked {
            found.errors.push(CheckProblem::BadSnapshot {
                snapshot: short.clone(),
                reason: e.to_string(),
            });
        }
        for p in found.errors {
            if reported.insert(p.to_string()) {
                r.errors.push(p);
            }
        }
    }
}

/// What every directory of one snapshot is checked against.
struct Walk<'a> {
    repo: &'a Repository,
    short: &'a str,
}

/// Checks one directory's entries; subdirectories go to `next`.
fn check_tree(
    w: &Walk<'_>,
    path: &str,
    t: Tree,
    table: &mut BlobTable,
    next: &mut Vec<(Id, String)>,
    r: &mut CheckReport,
) {
    let (repo, short) = (w.repo, w.short);
    for node in t.nodes {
        let child = child_path(path, &node);
        if !node.has_safe_name() {
            r.errors.push(CheckProblem::BadTree {
                snapshot: short.to_string(),
                path: path.to_string(),
                reason: format!("unsafe entry name {:?}", node.name_lossy()),
            });
        }
        match node.kind {
            NodeKind::Dir => next.extend(node.subtree.iter().map(|s| (*s, child.clone()))),
            NodeKind::File => {
                let mut chunks = node.content.clone();
                if node.indirect {
                    chunks = Vec::new();
                    for list in &node.content {
                        match repo
                            .load_blob(list)
                            .and_then(|b| tree::decode_chunk_list(list, &b))
                        {
                            Ok(c) => chunks.extend(c),
                            Err(e) => r.errors.push(CheckProblem::BadTree {
                                snapshot: short.to_string(),
                                path: child.clone(),
                                reason: format!("chunk list: {e}"),
                            }),
                        }
                    }
                }
                let mut size = 0u64;
                for c in chunks {
                    match table.mark(&c) {
                        Some(raw_length) => size += u64::from(raw_length),
                        None => {
                            r.errors.push(CheckProblem::BadTree {
                                snapshot: short.to_string(),
                                path: child.clone(),
                                reason: format!("blob {c} is missing"),
                            });
                            size = node.size;
                            break;
                        }
                    }
                }
                if size != node.size {
                    r.errors.push(CheckProblem::BadTree {
                        snapshot: short.to_string(),
                        path: child.clone(),
                        reason: format!("chunks add up to {size} bytes, not {}", node.size),
                    });
                }
            }
            _ => {}
        }
    }
}

fn child_path(parent: &str, node: &Node) -> String {
    let p = parent.trim_end_matches('/');
    format!("{p}/{}", node.name_lossy())
        .trim_start_matches("//")
        .to_string()
}

/// Reads a whole pack: hash, trailer, every blob authenticated and matched
/// to its content id, and the trailer compared with the index.
fn read_pack(
    repo: &Repository,
    name: &str,
    indexed: &HashMap<Id, Vec<PackEntry>>,
    r: &mut CheckReport,
) {
    r.packs_read += 1;
    let bytes = match repo.backend().read(FileKind::Pack, name) {
        Ok(b) => b,
        Err(e) => {
            r.errors.push(pack_problem(name, e));
            return;
        }
    };
    r.bytes_read += bytes.len() as u64;
    if Id::of_bytes(&bytes).to_hex() != name {
        r.errors.push(pack_problem(
            name,
            "content does not match its name (corrupted)",
        ));
    }
    let size = bytes.len() as u64;
    let entries = (|| -> Result<Vec<PackEntry>> {
        if size < FOOTER_LEN {
            return Err(Error::corrupt(format!("pack {name}"), "too short"));
        }
        let tlen = pack::trailer_len(name, &bytes[(size - FOOTER_LEN) as usize..], size)?;
        let start = size - FOOTER_LEN - tlen;
        pack::decode_trailer(
            repo.keys(),
            name,
            &bytes[start as usize..(size - FOOTER_LEN) as usize],
            start,
        )
    })();
    let entries = match entries {
        Ok(e) => e,
        Err(e) => {
            r.errors.push(pack_problem(name, e));
            // Fall back to the index's view to still check each blob.
            match Id::from_hex(name).and_then(|id| indexed.get(&id)) {
                Some(e) => e.clone(),
                None => return,
            }
        }
    };
    for e in &entries {
        r.blobs_read += 1;
        // Checked: a hostile trailer or index may hold any offset.
        let raw = usize::try_from(e.offset).ok().and_then(|start| {
            let end = start.checked_add(usize::try_from(e.length).ok()?)?;
            bytes.get(start..end)
        });
        let Some(raw) = raw else {
            r.errors.push(pack_problem(
                name,
                format!("blob {} lies outside the pack", e.id),
            ));
            continue;
        };
        match blob::decode(repo.keys(), e.kind, &e.id, e.flags, e.raw_length, raw) {
            Ok(_) => r.blobs_ok += 1,
            Err(err) => r.errors.push(pack_problem(name, err)),
        }
    }
    if let Some(listed) = Id::from_hex(name).and_then(|id| indexed.get(&id)) {
        // Whole entries, not ids: an index pointing at the right blob with
        // a wrong offset, length or type fails restores just the same.
        let key = |e: &PackEntry| {
            (
                e.id,
                e.kind as u8,
                e.flags,
                e.offset,
                e.length,
                e.raw_length,
            )
        };
        let in_pack: HashMap<Id, _> = entries.iter().map(|e| (e.id, key(e))).collect();
        if let Some(e) = listed.iter().find(|e| in_pack.get(&e.id) != Some(&key(e))) {
            let what = if in_pack.contains_key(&e.id) {
                "at another place or with other lengths than"
            } else {
                "that"
            };
            r.errors.push(pack_problem(
                name,
                format!("index lists blob {} {what} the pack holds", e.id),
            ));
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairSnapshotsReport {
    pub dry_run: bool,
    pub snapshots_checked: u64,
    /// (old id, new id) of rewritten snapshots; new id empty in dry runs.
    pub repaired: Vec<(String, String)>,
    pub removed_entries: Vec<String>,
}

/// Rewrites every snapshot that references unreadable trees or missing
/// blobs: damaged directories parts and files are dropped, everything else
/// is kept; the new snapshot is tagged `repaired` and marked incomplete,
/// the old manifest is removed.
///
/// With `read_data`, every chunk of every file is also read and
/// authenticated (once, however many files share it), so files whose data
/// is damaged in place are dropped too, not only those whose blobs are
/// missing from the index.
pub fn repair_snapshots(
    repo: &Repository,
    dry_run: bool,
    read_data: bool,
) -> Result<RepairSnapshotsReport> {
    let mut report = RepairSnapshotsReport {
        dry_run,
        ..Default::default()
    };
    let (snaps, bad) = repo.snapshots()?;
    let mut intact = Intact {
        repo,
        read_data,
        good: HashSet::new(),
        bad: HashMap::new(),
    };
    for (name, e) in bad {
        warn!(snapshot = %name, error = %e, "unreadable snapshot manifest cannot be repaired");
        report
            .removed_entries
            .push(format!("snapshot {name}: unreadable manifest ({e})"));
    }
    for (id, snap) in snaps {
        report.snapshots_checked += 1;
        let mut new_trees = Vec::new();
        let mut removed = Vec::new();
        let (parts, changed) = repair_dir(
            &mut intact,
            &snap.root_parts(),
            "",
            &mut new_trees,
            &mut removed,
        )?;
        if !changed {
            continue;
        }
        report.removed_entries.extend(
            removed
                .into_iter()
                .map(|p| format!("snapshot {}: {p}", id.short())),
        );
        if dry_run {
            report.repaired.push((id.to_hex(), String::new()));
            continue;
        }
        repo.save_blobs(&new_trees)?;
        let mut new = snap.clone();
        new.tree = parts.first().copied().unwrap_or_default();
        new.tree_parts = if parts.len() > 1 { parts } else { Vec::new() };
        new.incomplete = true;
        if !new.tags.iter().any(|t| t == "repaired") {
            new.tags.push("repaired".into());
        }
        let new_id = repo.save_snapshot(&new)?;
        repo.backend().remove(FileKind::Snapshot, &id.to_hex())?;
        report.repaired.push((id.to_hex(), new_id.to_hex()));
    }
    Ok(report)
}

fn repair_dir(
    intact: &mut Intact<'_>,
    parts: &[Id],
    path: &str,
    new_trees: &mut Vec<(BlobType, Vec<u8>)>,
    removed: &mut Vec<String>,
) -> Result<(Vec<Id>, bool)> {
    let repo = intact.repo;
    let mut changed = false;
    let mut out = Vec::new();
    for part in parts {
        let t = match repo.load_tree(part) {
            Ok(t) => t,
            Err(e) => {
                removed.push(format!("{path}/: part of the listing unreadable ({e})"));
                changed = true;
                continue;
            }
        };
        let mut nodes = Vec::with_capacity(t.nodes.len());
        let mut part_changed = false;
        for mut node in t.nodes {
            let p = format!("{path}/{}", node.name_lossy());
            match node.kind {
                NodeKind::Dir => {
                    let (sub, c) = repair_dir(intact, &node.subtree, &p, new_trees, removed)?;
                    if c {
                        part_changed = true;
                        node.subtree = sub;
                    }
                    nodes.push(node);
                }
                NodeKind::File => match intact.file(&node)? {
                    None => nodes.push(node),
                    Some(why) => {
                        removed.push(format!("{p}: {why}"));
                        part_changed = true;
                    }
                },
                _ => nodes.push(node),
            }
        }
        if part_changed {
            changed = true;
            let plain = Tree { nodes }.encode()?;
            out.push(repo.keys().content_id(&plain));
            new_trees.push((BlobType::Tree, plain));
        } else {
            out.push(*part);
        }
    }
    if out.is_empty() {
        // Keep the directory itself, empty.
        let plain = Tree::default().encode()?;
        out.push(repo.keys().content_id(&plain));
        new_trees.push((BlobType::Tree, plain));
    }
    Ok((out, changed))
}

/// Which files `repair snapshots` keeps: those whose chunks are all
/// indexed (and, with `read_data`, authenticate). Verdicts per blob are
/// remembered, so a chunk shared by many files is read once.
struct Intact<'r> {
    repo: &'r Repository,
    read_data: bool,
    good: HashSet<Id>,
    bad: HashMap<Id, String>,
}

impl Intact<'_> {
    /// `None` if the file is whole, else why not. A storage error is not a
    /// verdict on the file: it stops the repair instead of dropping files.
    fn file(&mut self, node: &Node) -> Result<Option<String>> {
        let chunks = match self.repo.file_chunks(node) {
            Ok(c) => c,
            Err(e) if is_damage(&e) => return Ok(Some(e.to_string())),
            Err(e) => return Err(e),
        };
        for c in chunks {
            if let Some(why) = self.blob(&c)? {
                return Ok(Some(why));
            }
        }
        Ok(None)
    }

    fn blob(&mut self, id: &Id) -> Result<Option<String>> {
        if let Some(why) = self.bad.get(id) {
            return Ok(Some(why.clone()));
        }
        if !self.read_data {
            return match self.repo.blob_location(id) {
                Ok(_) => Ok(None),
                Err(e) if is_damage(&e) => Ok(Some(e.to_string())),
                Err(e) => Err(e),
            };
        }
        if self.good.contains(id) {
            return Ok(None);
        }
        match self.repo.load_blob(id) {
            Ok(_) => {
                self.good.insert(*id);
                Ok(None)
            }
            Err(e) if is_damage(&e) => {
                let why = e.to_string();
                self.bad.insert(*id, why.clone());
                Ok(Some(why))
            }
            Err(e) => Err(e),
        }
    }
}

/// Errors that say the data is gone or damaged, as opposed to the storage
/// failing to answer right now.
fn is_damage(e: &Error) -> bool {
    matches!(
        e,
        Error::BlobNotFound { .. }
            | Error::Corrupt { .. }
            | Error::Decrypt { .. }
            | Error::NotFound { .. }
    )
}
