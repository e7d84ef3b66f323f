//! Maintenance: index compaction (quick) and garbage collection (full),
//! safe while backups run.
//!
//! Garbage collection is two-phase, with no exclusive lock:
//!
//! 1. *Hide.* Mark every blob reachable from every snapshot. Packs with no
//!    live blob, and packs with few live blobs once their live blobs are
//!    copied into new packs, are written into a *plan* (`plans/<id>`) and
//!    left out of a fresh set of index files; the old index files are then
//!    removed. From now on no new backup sees their blobs (and backups never
//!    re-index planned packs), so nothing new can come to depend on them.
//! 2. *Delete*, in a later run, once the plan is older than the safety
//!    margin and every backup session that was live when the packs were
//!    hidden (the plan names them) has ended or gone stale: a planned pack
//!    is deleted unless an index file lists it again or it holds a blob
//!    that a snapshot needs and no index lists (then it is re-indexed:
//!    "rescued"). A backup that overlapped phase 1 rescues the blobs it
//!    referenced itself before writing its snapshot.
//!
//! Plans are encrypted and authenticated like leases: a plan written
//! without the key is ignored and reported, never executed. Ages are
//! measured by the storage's clock (object times), so the hosts' clocks
//! do not take part; a pack whose trailer cannot be read because of a
//! transient backend error is postponed to a later run, never deleted.
//!
//! Only one maintenance runs at a time: each takes a maintenance lease and
//! the oldest live lease wins; the others stop with an error.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::backend::FileKind;
use crate::error::{Error, Result};
use crate::format::id::Id;
use crate::format::pack::PackEntry;
use crate::format::tree::{self, NodeKind};
use crate::ops::blob_sets::{PrefixCollector, PrefixSet};
use crate::repo::coordination::clock;
use crate::repo::coordination::lease::{self, Lease, LeaseKind};
use crate::repo::coordination::plans::{plan_age, planned_packs, scan_plans, write_plan, Plan};
use crate::repo::coordination::rescue::rescue_blob;
use crate::repo::walk::Walker;
use crate::repo::Repository;

/// Entries per merged index file.
const INDEX_FILE_ENTRIES: usize = 200_000;

#[derive(Debug, Clone)]
pub struct MaintainOptions {
    pub full: bool,
    /// Planned deletions wait at least this long (default 1 h).
    pub safety_margin: Duration,
    /// Rewrite packs whose unused fraction is above this (default 0.3).
    pub max_unused: f64,
    /// Report what would be done without changing the repository.
    pub dry_run: bool,
}

impl Default for MaintainOptions {
    fn default() -> Self {
        Self {
            full: false,
            safety_margin: Duration::from_secs(3600),
            max_unused: 0.3,
            dry_run: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MaintainReport {
    pub full: bool,
    pub dry_run: bool,
    pub snapshots: u64,
    pub blobs_marked: u64,
    pub trees_walked: u64,
    pub packs_total: u64,
    pub index_files_before: u64,
    pub index_files_after: u64,
    /// Packs whose deletion was planned in this run (phase 1).
    pub packs_planned: u64,
    /// Packs rewritten (live blobs copied) in this run.
    pub packs_rewritten: u64,
    pub packs_written: u64,
    /// Packs deleted by executing earlier plans (phase 2).
    pub packs_deleted: u64,
    pub packs_rescued: u64,
    /// Plans not yet executable (too young or sessions still live).
    pub plans_deferred: u64,
    pub bytes_planned: u64,
    pub bytes_reclaimed: u64,
    pub leases_removed: u64,
    /// Leases and plans ignored because they did not authenticate or were
    /// implausible (`name: why`).
    pub ignored: Vec<String>,
    /// Plans kept for a later run because a planned pack could not be read
    /// (transient backend error).
    pub plans_postponed: u64,
    /// Live blobs that did not authenticate while their sparse pack was
    /// rewritten (`pack …, blob …: why`): that pack was kept, indexed for
    /// those blobs only. `marmoset check --read-data` and `repair
    /// snapshots` deal with them.
    pub damaged_blobs: Vec<String>,
    /// This host's clock minus the storage's, when the storage stamps
    /// objects (decisions use the storage's clock either way).
    pub clock_skew_secs: Option<i64>,
    pub duration_secs: f64,
    pub peak_rss_kib: u64,
}

/// Peak resident memory of this process (VmHWM), in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Takes the maintenance lease, or fails when another maintenance is live.
/// Also returns the storage's current time (the stamp of our own lease).
fn take_maintenance_lease(
    repo: &Repository,
    report: &mut MaintainReport,
) -> Result<(Lease, Option<DateTime<Utc>>)> {
    let lease = Lease::acquire(
        repo.backend().clone(),
        repo.keys(),
        LeaseKind::Maintenance,
        "maintain",
    )?;
    let storage_now = lease.storage_now()?;
    report.clock_skew_secs = clock::skew(storage_now).map(|d| d.num_seconds());
    // Plans carry this host's times; far off the storage's, every reader
    // would take them for replays and ignore them.
    clock::refuse_clock_skew(storage_now)?;
    let rejected = still_first(repo, &lease, storage_now)?;
    report.ignored.extend(describe(&rejected));
    Ok((lease, storage_now))
}

/// Fails unless `lease` is the oldest live maintenance lease (by the
/// storage's clock). Checked at the start and again before anything is
/// deleted, so a run that lost the race backs off before it does harm.
fn still_first(
    repo: &Repository,
    lease: &Lease,
    storage_now: Option<DateTime<Utc>>,
) -> Result<Vec<(String, String)>> {
    let scan = lease::scan(&**repo.backend(), repo.keys(), LeaseKind::Maintenance)?;
    let winner = scan
        .leases
        .into_iter()
        .filter(|l| !l.stale(storage_now))
        .min_by(|a, b| {
            a.created_by_storage()
                .cmp(&b.created_by_storage())
                .then(a.name.cmp(&b.name))
        });
    match winner {
        Some(l) if l.name != lease.name => Err(Error::MaintenanceRunning {
            owner: format!(
                "{} (pid {}, since {})",
                l.info.hostname, l.info.process.pid, l.info.created
            ),
        }),
        _ => Ok(scan.rejected),
    }
}

fn describe(rejected: &[(String, String)]) -> Vec<String> {
    rejected
        .iter()
        .map(|(n, why)| format!("{n}: {why}"))
        .collect()
}

pub fn maintain(repo: &Repository, opts: &MaintainOptions) -> Result<MaintainReport> {
    let start = Instant::now();
    let mut report = MaintainReport {
        full: opts.full,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let (lease, storage_now) = take_maintenance_lease(repo, &mut report)?;
    if !opts.dry_run {
        report.leases_removed =
            lease::remove_stale(&**repo.backend(), repo.keys(), storage_now)? as u64;
    }
    repo.sync_index()?;
    if opts.full {
        full(repo, opts, &lease, &mut report)?;
    } else {
        quick(repo, opts, &mut report)?;
    }
    // Work done while our lease looked stale to others may have raced a
    // second maintenance: say so rather than report success.
    lease.check_alive()?;
    report.duration_secs = start.elapsed().as_secs_f64();
    report.peak_rss_kib = peak_rss_kib();
    Ok(report)
}

/// Calls `f` with every pack the index files `names` list, once (a pack
/// listed twice after a recovery counts once), one index file in memory
/// at a time: ten million entries are never held together.
///
/// Callers list the index files once and make every later pass over
/// exactly those: an index file a backup writes meanwhile is neither
/// merged nor removed.
fn for_each_indexed_pack(
    repo: &Repository,
    names: &[String],
    mut f: impl FnMut(Id, Vec<PackEntry>) -> Result<()>,
) -> Result<()> {
    let mut seen = HashSet::new();
    for name in names {
        // An unreadable index file stops maintenance: its packs would look
        // like orphans. `repair index` rebuilds it from pack trailers.
        for (pack, entries) in repo.load_index_file(name)? {
            if seen.insert(pack) {
                f(pack, entries)?;
            }
        }
    }
    Ok(())
}

/// Writes packs' entries as index files of bounded size as they come.
struct IndexWriter<'r> {
    repo: &'r Repository,
    batch: Vec<(Id, Vec<PackEntry>)>,
    entries: usize,
    written: Vec<String>,
}

impl<'r> IndexWriter<'r> {
    fn new(repo: &'r Repository) -> Self {
        Self {
            repo,
            batch: Vec::new(),
            entries: 0,
            written: Vec::new(),
        }
    }

    fn add(&mut self, pack: Id, entries: Vec<PackEntry>) -> Result<()> {
        self.entries += entries.len();
        self.batch.push((pack, entries));
        if self.entries >= INDEX_FILE_ENTRIES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.batch.is_empty() {
            self.written.push(self.repo.write_index(&self.batch)?);
            self.batch.clear();
            self.entries = 0;
        }
        Ok(())
    }

    /// Names of the index files written.
    fn finish(mut self) -> Result<Vec<String>> {
        self.flush()?;
        Ok(self.written)
    }
}

/// Quick: merge index files into few large ones; drop superseded ones.
fn quick(repo: &Repository, opts: &MaintainOptions, report: &mut MaintainReport) -> Result<()> {
    let names = repo.backend().list_names(FileKind::Index)?;
    report.index_files_before = names.len() as u64;
    let (mut packs, mut entries) = (0u64, 0usize);
    for_each_indexed_pack(repo, &names, |_, e| {
        packs += 1;
        entries += e.len();
        Ok(())
    })?;
    report.packs_total = packs;
    let target = entries.div_ceil(INDEX_FILE_ENTRIES).max(1);
    if names.len() <= target || opts.dry_run {
        report.index_files_after = if opts.dry_run {
            target as u64
        } else {
            names.len() as u64
        };
        return Ok(());
    }
    let mut writer = IndexWriter::new(repo);
    for_each_indexed_pack(repo, &names, |p, e| writer.add(p, e))?;
    let new = writer.finish()?;
    for name in &names {
        if !new.contains(name) {
            repo.backend().remove(FileKind::Index, name)?;
        }
    }
    report.index_files_after = new.len() as u64;
    info!(
        before = names.len(),
        after = new.len(),
        "index files merged"
    );
    Ok(())
}

/// The set of reachable blobs. Data blobs are kept as 64-bit prefixes in
/// a sorted vector (8 bytes per chunk; a collision only keeps garbage,
/// never deletes live data); trees and chunk lists are kept whole because
/// they also decide what to walk, and are few.
pub(crate) struct Marks {
    data: PrefixSet,
    trees: HashSet<Id>,
}

impl Marks {
    pub(crate) fn contains(&self, id: &Id) -> bool {
        self.trees.contains(id) || self.data.contains(id)
    }

    pub(crate) fn len(&self) -> usize {
        self.data.len() + self.trees.len()
    }
}

/// Marks everything reachable from every snapshot. Any unreadable snapshot
/// or tree aborts: deleting on incomplete knowledge could destroy data.
pub(crate) fn mark(repo: &Repository, report: &mut MaintainReport) -> Result<Marks> {
    let mut trees = HashSet::new();
    let mut data = PrefixCollector::default();
    let (snaps, bad) = repo.snapshots()?;
    if let Some((name, e)) = bad.into_iter().next() {
        return Err(Error::corrupt(
            format!("snapshot {name}"),
            format!("unreadable ({e}); run `marmoset check` and `marmoset repair snapshots` first"),
        ));
    }
    report.snapshots = snaps.len() as u64;
    // Index files are written before their snapshot: syncing after listing
    // snapshots guarantees every listed snapshot's blobs are visible.
    repo.sync_index()?;
    let roots = snaps
        .iter()
        .flat_map(|(_, snap)| snap.root_parts())
        .map(|t| (t, ()))
        .collect();
    Walker::new(repo).dedup(true).run(roots, |listing| {
        trees.insert(listing.id);
        report.trees_walked += 1;
        let tree = match listing.tree {
            // A backup that finished during an earlier phase 1 may
            // reference a tree only a planned pack holds: rescue it.
            Err(Error::BlobNotFound { id }) if rescue_blob(repo, &id)? => {
                repo.load_tree(&listing.id)?
            }
            other => other?,
        };
        let mut subdirs = Vec::new();
        for node in tree.nodes {
            match node.kind {
                NodeKind::Dir => subdirs.extend(node.subtree.iter().map(|t| (*t, ()))),
                NodeKind::File if node.indirect => {
                    mark_chunk_lists(repo, &node.content, &mut trees, &mut data)?
                }
                NodeKind::File => {
                    for c in &node.content {
                        data.insert(c);
                    }
                }
                _ => {}
            }
        }
        Ok(subdirs)
    })?;
    let marks = Marks {
        data: data.finish(),
        trees,
    };
    report.blobs_marked = marks.len() as u64;
    Ok(marks)
}

/// Marks the chunks an indirect file lists. Like trees, a chunk list only a
/// planned pack holds is rescued, not fatal.
fn mark_chunk_lists(
    repo: &Repository,
    lists: &[Id],
    trees: &mut HashSet<Id>,
    data: &mut PrefixCollector,
) -> Result<()> {
    for list in lists {
        if !trees.insert(*list) {
            continue;
        }
        let raw = match repo.load_blob(list) {
            Err(Error::BlobNotFound { id }) if rescue_blob(repo, &id)? => repo.load_blob(list)?,
            other => other?,
        };
        for c in tree::decode_chunk_list(list, &raw)? {
            data.insert(&c);
        }
    }
    Ok(())
}

fn full(
    repo: &Repository,
    opts: &MaintainOptions,
    lease: &Lease,
    report: &mut MaintainReport,
) -> Result<()> {
    let marks = mark(repo, report)?;
    debug!(blobs = marks.len(), "mark phase done");
    // The mark phase can take long: take "now" from the storage afresh.
    let storage_now = lease.storage_now()?;
    lease.check_alive()?;
    still_first(repo, lease, storage_now)?;
    execute_plans(repo, opts, &marks, storage_now, report)?;
    repo.sync_index()?;

    let index_names = repo.backend().list_names(FileKind::Index)?;
    report.index_files_before = index_names.len() as u64;
    let planned = planned_packs(repo)?;
    let existing: HashMap<String, u64> = repo.backend().list(FileKind::Pack)?.into_iter().collect();
    report.packs_total = existing.len() as u64;

    // Live fraction per indexed pack; only the verdicts are kept.
    let mut indexed: HashSet<Id> = HashSet::new();
    let mut garbage: Vec<String> = Vec::new();
    let mut rewrite: HashSet<Id> = HashSet::new();
    // Packs an earlier run planned that an index file lists again (a
    // backup or `repair index` re-indexed them since) and that hold live
    // blobs: they stay indexed, so phase 2 keeps them. Dropping them from
    // the new index would leave snapshots pointing at unindexed blobs
    // until that plan's phase 2 rescued them.
    let mut planned_live: HashSet<Id> = HashSet::new();
    for_each_indexed_pack(repo, &index_names, |pack, entries| {
        indexed.insert(pack);
        let name = pack.to_hex();
        if planned.contains(&name) {
            if entries.iter().any(|e| marks.contains(&e.id)) {
                planned_live.insert(pack);
            }
            return Ok(());
        }
        if !existing.contains_key(&name) {
            warn!(pack = %name, "indexed pack is missing from the repository; run `marmoset check`");
            return Ok(());
        }
        let total: u64 = entries.iter().map(|e| u64::from(e.length)).sum();
        let live: u64 = entries
            .iter()
            .filter(|e| marks.contains(&e.id))
            .map(|e| u64::from(e.length))
            .sum();
        if live == 0 {
            garbage.push(name);
        } else if total > 0 && (total - live) as f64 / total as f64 > opts.max_unused {
            rewrite.insert(pack);
        }
        Ok(())
    })?;
    // Orphans: packs no index lists and no plan holds (left by crashed
    // backups, or being written right now). Planning them is safe: phase 2
    // rescues any that a snapshot turns out to need.
    let orphans: Vec<String> = existing
        .keys()
        .filter(|n| match Id::from_hex(n) {
            Some(id) => !planned.contains(*n) && !indexed.contains(&id),
            // Not a name marmoset writes (an operator's file?): not ours
            // to delete, and the backend could not address it anyway.
            None => {
                warn!(name = %n, "file among the packs is not a pack; left alone");
                false
            }
        })
        .cloned()
        .collect();
    drop(indexed);

    let mut to_plan: Vec<String> = garbage;
    to_plan.extend(orphans);
    if opts.dry_run {
        report.packs_rewritten = rewrite.len() as u64;
        report.packs_planned = (to_plan.len() + rewrite.len()) as u64;
        report.bytes_planned = to_plan
            .iter()
            .cloned()
            .chain(rewrite.iter().map(Id::to_hex))
            .filter_map(|n| existing.get(&n))
            .sum();
        return Ok(());
    }
    if to_plan.is_empty() && rewrite.is_empty() {
        // Nothing to hide; still compact index files.
        report.index_files_after = index_names.len() as u64;
        return quick(repo, opts, report);
    }
    // The fresh index: every kept pack, and the new packs the live blobs
    // of sparse packs are copied into; the sparse packs are planned.
    let hidden: HashSet<&str> = to_plan.iter().map(String::as_str).collect();
    let mut writer = IndexWriter::new(repo);
    let mut rewritten = Vec::new();
    for_each_indexed_pack(repo, &index_names, |pack, entries| {
        let name = pack.to_hex();
        if planned_live.contains(&pack) {
            return writer.add(pack, entries);
        }
        if planned.contains(&name) || hidden.contains(name.as_str()) {
            return Ok(());
        }
        if !rewrite.contains(&pack) {
            return writer.add(pack, entries);
        }
        let live: Vec<PackEntry> = entries
            .into_iter()
            .filter(|e| marks.contains(&e.id))
            .collect();
        let mut damaged = Vec::new();
        let copied = repo.copy_blobs(&name, &live, |e, why| {
            warn!(pack = %name, blob = %e.id, error = %why, "live blob damaged; its pack is kept");
            report
                .damaged_blobs
                .push(format!("pack {name}, blob {}: {why}", e.id));
            damaged.push(*e);
        })?;
        for (new, new_entries) in copied {
            report.packs_written += 1;
            writer.add(new, new_entries)?;
        }
        if !damaged.is_empty() {
            // Not deleted: the damaged blobs stay where `check` finds and
            // names them (and `repair snapshots` drops the files that use
            // them); the whole ones now live in the new packs.
            return writer.add(pack, damaged);
        }
        report.packs_rewritten += 1;
        rewritten.push(name);
        Ok(())
    })?;
    let new_index = writer.finish()?;
    drop(hidden);
    to_plan.extend(rewritten);
    report.packs_planned = to_plan.len() as u64;
    report.bytes_planned = to_plan.iter().filter_map(|n| existing.get(n)).sum();

    // Phase 1: fresh index without the planned packs, then the plan, then
    // the old index files go, then the plan records when that happened and
    // which sessions were live then (a session that starts later reads the
    // new index only: it takes its lease before reading the index).
    let plan_name = Id::random().to_hex();
    let mut plan = Plan {
        created: crate::util::now(),
        hidden_at: None,
        sessions: Vec::new(),
        packs: to_plan,
    };
    write_plan(repo, &plan_name, &plan)?;
    for name in &index_names {
        if !new_index.contains(name) {
            repo.backend().remove(FileKind::Index, name)?;
        }
    }
    let sessions = lease::scan(&**repo.backend(), repo.keys(), LeaseKind::Session)?;
    plan.sessions = sessions.leases.into_iter().map(|l| l.name).collect();
    plan.hidden_at = Some(crate::util::now());
    write_plan(repo, &plan_name, &plan)?;
    report.index_files_after = new_index.len() as u64;
    info!(packs = plan.packs.len(), "packs hidden; deletion planned");
    Ok(())
}

/// Phase 2: deletes planned packs whose time has come.
fn execute_plans(
    repo: &Repository,
    opts: &MaintainOptions,
    marks: &Marks,
    storage_now: Option<DateTime<Utc>>,
    report: &mut MaintainReport,
) -> Result<()> {
    let margin =
        chrono::Duration::from_std(opts.safety_margin).unwrap_or(chrono::Duration::hours(1));
    let sessions = lease::scan(&**repo.backend(), repo.keys(), LeaseKind::Session)?;
    report.ignored.extend(describe(&sessions.rejected));
    let live: HashSet<String> = sessions
        .leases
        .into_iter()
        .filter(|l| !l.stale(storage_now))
        .map(|l| l.name)
        .collect();
    let scan = scan_plans(repo)?;
    report.ignored.extend(describe(&scan.rejected));
    if scan.plans.is_empty() {
        return Ok(());
    }
    // Packs some index file lists right now must stay.
    let mut indexed: HashSet<String> = HashSet::new();
    for_each_indexed_pack(
        repo,
        &repo.backend().list_names(FileKind::Index)?,
        |p, _| {
            indexed.insert(p.to_hex());
            Ok(())
        },
    )?;
    let existing: HashMap<String, u64> = repo.backend().list(FileKind::Pack)?.into_iter().collect();
    let ctx = Phase2 {
        repo,
        marks,
        indexed: &indexed,
        existing: &existing,
        dry_run: opts.dry_run,
    };
    for p in scan.plans {
        let age = plan_age(&p, storage_now);
        if p.plan.hidden_at.is_none() {
            // Its run died mid-way: drop the plan; its packs are
            // re-evaluated (as orphans or garbage) by this run.
            if !opts.dry_run && age > margin {
                repo.backend().remove(FileKind::Plan, &p.name)?;
            }
            continue;
        }
        let blocking = p.plan.sessions.iter().any(|s| live.contains(s));
        if age < margin || blocking {
            debug!(plan = %p.name, blocking, "plan deferred");
            report.plans_deferred += 1;
            continue;
        }
        let mut postponed = false;
        for pack in &p.plan.packs {
            postponed |= !ctx.delete_or_rescue(pack, report)?;
        }
        if postponed {
            report.plans_postponed += 1;
        } else if !opts.dry_run {
            repo.backend().remove(FileKind::Plan, &p.name)?;
        }
    }
    Ok(())
}

/// What phase 2 needs to judge one planned pack.
struct Phase2<'a> {
    repo: &'a Repository,
    marks: &'a Marks,
    indexed: &'a HashSet<String>,
    existing: &'a HashMap<String, u64>,
    dry_run: bool,
}

impl Phase2<'_> {
    /// Deletes a planned pack, or re-indexes it when a snapshot needs a
    /// blob only it holds. Returns false when the pack could not be judged
    /// (transient read error): it stays, and so does its plan.
    fn delete_or_rescue(&self, pack: &str, report: &mut MaintainReport) -> Result<bool> {
        let Some(&size) = self.existing.get(pack) else {
            return Ok(true);
        };
        if self.indexed.contains(pack) {
            return Ok(true);
        }
        let entries = match self.repo.read_pack_trailer(pack, size) {
            Ok(e) => e,
            Err(Error::NotFound { .. }) => return Ok(true),
            // A damaged trailer cannot tell which blobs the pack holds, and
            // no index lists it: nothing can be rescued from it.
            Err(e @ (Error::Corrupt { .. } | Error::Decrypt { .. })) => {
                warn!(pack = %pack, error = %e, "planned pack is damaged; deleting it");
                Vec::new()
            }
            Err(e) => {
                warn!(pack = %pack, error = %e, "planned pack unreadable for now; postponed");
                return Ok(false);
            }
        };
        let mut needed = false;
        for e in &entries {
            if self.marks.contains(&e.id) && !self.repo.index().contains_blob(&e.id.0)? {
                needed = true;
                break;
            }
        }
        if self.dry_run {
            return Ok(true);
        }
        if needed {
            let id = Id::from_hex(pack)
                .ok_or_else(|| Error::corrupt(format!("pack {pack}"), "bad name"))?;
            self.repo.write_index(&[(id, entries)])?;
            report.packs_rescued += 1;
            warn!(pack = %pack, "planned pack holds needed blobs; re-indexed");
            return Ok(true);
        }
        self.repo.backend().remove(FileKind::Pack, pack)?;
        report.packs_deleted += 1;
        report.bytes_reclaimed += size;
        Ok(true)
    }
}
