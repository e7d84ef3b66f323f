//! Fetching the plan: packs in parallel, each a few ranged reads; every
//! blob authenticated once and written to all of its destinations. A
//! file is finished (metadata applied) when its last blob lands, or
//! removed and reported if any of its blobs could not be read: restore
//! never leaves a silently wrong file.

use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::OFlag;
use tracing::warn;

use super::plan::{Need, PackReads};
use super::{apply_fd_meta, mtime, relink, remove_entry, Shared};
use crate::backend::FileKind;
use crate::format::tree::Node;
use crate::repo::reads::ReadRange;

/// A regular file being restored: created by the walk, written by the
/// fetchers, finished by whichever writes its last blob.
pub(super) struct FileEntry {
    /// Shown in messages.
    pub path: PathBuf,
    /// Below the target: the file is reopened by it, from the target's
    /// handle, and checked to be the inode the walk created.
    pub rel: PathBuf,
    pub node: Node,
    pub dev: u64,
    pub ino: u64,
    /// Created by this restore (sized with `set_len`, so all zeros): zero
    /// runs may stay holes. An existing file updated in place has old
    /// bytes there, which must be overwritten.
    pub fresh: bool,
    /// Blob destinations not yet written.
    pub remaining: AtomicUsize,
    pub failed: Mutex<Option<String>>,
    /// Set once every byte is written (metadata may still have failed).
    pub complete: AtomicBool,
    /// Later names of the same inode (hard links), below the target and as
    /// shown: linked to it once it is complete; if it fails, left as they
    /// are and reported.
    pub links: Mutex<Vec<(PathBuf, PathBuf)>>,
}

/// Counters of the fetch, reported in the summary.
#[derive(Debug, Default)]
pub(super) struct FetchStats {
    pub packs: AtomicU64,
    pub requests: AtomicU64,
    pub bytes_downloaded: AtomicU64,
    pub blobs: AtomicU64,
}

/// What a download thread hands to the decoders: a range and its bytes,
/// or why they could not be read.
struct Fetched {
    pack: String,
    range: ReadRange<Need>,
    data: std::result::Result<Vec<u8>, ReadFailure>,
}

/// Why a range was not read.
enum ReadFailure {
    /// The storage failed (the retry layer already gave up), or enough
    /// other packs failed that way in a row that this one was not tried:
    /// asking blob by blob would only fail slower.
    Storage(String),
    /// Anything else (a truncated or damaged pack): each blob is tried on
    /// its own, most may be intact.
    Range(crate::Error),
}

/// Packs in a row whose reads failed for good, after all retries, before
/// the rest of a restore is given up instead of retried pack by pack (each
/// would take the retry layer's full patience, a minute or more).
const GIVE_UP_AFTER: usize = 4;

/// Runs the plan: `downloads` threads read ranges (one request each) while
/// `decoders` threads authenticate, decompress and write what arrived, so a
/// connection never idles while the CPU works and the CPU never waits for
/// a whole pack before starting. At most `decoders` read ranges wait in
/// between: memory is bounded by (downloads + 2 × decoders) ranges of at
/// most `reads::MAX_RANGE`, whatever the size of the restore.
pub(super) fn fetch_all(
    shared: &Shared,
    files: &[Arc<FileEntry>],
    reads: Vec<PackReads>,
    downloads: usize,
    stats: &FetchStats,
) {
    stats.packs.fetch_add(reads.len() as u64, Ordering::Relaxed);
    let downloads = downloads.max(1);
    let decoders = std::thread::available_parallelism().map_or(2, |n| n.get());
    let queue = Mutex::new(schedule(reads).into_iter());
    let (tx, rx) = std::sync::mpsc::sync_channel::<Fetched>(decoders);
    let rx = Mutex::new(rx);
    // Packs that failed for good in a row, across all download threads.
    let failing = AtomicUsize::new(0);
    let give_up = GIVE_UP_AFTER.max(downloads);
    std::thread::scope(|s| {
        for _ in 0..downloads {
            let tx = tx.clone();
            let (queue, failing) = (&queue, &failing);
            s.spawn(move || loop {
                let next = crate::util::lock(queue).next();
                let Some((pack, range)) = next else { break };
                let data = if failing.load(Ordering::Relaxed) >= give_up {
                    Err(ReadFailure::Storage(format!(
                        "not read: the storage is failing ({give_up} packs in a row could not be read)"
                    )))
                } else {
                    read(shared, stats, &pack, &range, failing)
                };
                if tx.send(Fetched { pack, range, data }).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for _ in 0..decoders {
            let rx = &rx;
            s.spawn(move || {
                let mut w = Writer {
                    shared,
                    files,
                    open: None,
                };
                loop {
                    // The lock is held only while waiting for the next
                    // range, never while decoding it.
                    let next = crate::util::lock(rx).recv();
                    let Ok(f) = next else { break };
                    w.range(&f.pack, f.range, f.data, stats);
                }
            });
        }
    });
}

/// Reads one range, keeping count of packs that failed in a row.
fn read(
    shared: &Shared,
    stats: &FetchStats,
    pack: &str,
    range: &ReadRange<Need>,
    failing: &AtomicUsize,
) -> std::result::Result<Vec<u8>, ReadFailure> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let data = shared
        .repo
        .backend()
        .read_range(FileKind::Pack, pack, range.offset, range.length);
    match data {
        Ok(buf) => {
            failing.store(0, Ordering::Relaxed);
            stats
                .bytes_downloaded
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(buf)
        }
        Err(e) if e.retryable() => {
            failing.fetch_add(1, Ordering::Relaxed);
            Err(ReadFailure::Storage(format!("pack {pack}: {e}")))
        }
        Err(e) => Err(ReadFailure::Range(e)),
    }
}

/// The order ranges are read in: largest first, so that long reads do not
/// end up alone at the end while other connections idle. Ranges are never
/// split to use more connections: one request per pack is the budget (a
/// request is a round trip over a WAN, and B2 bills it).
fn schedule(reads: Vec<PackReads>) -> Vec<(String, ReadRange<Need>)> {
    let mut ranges: Vec<(String, ReadRange<Need>)> = reads
        .into_iter()
        .flat_map(|p| {
            let name = p.pack.to_hex();
            p.ranges.into_iter().map(move |r| (name.clone(), r))
        })
        .collect();
    ranges.sort_by(|a, b| b.1.length.cmp(&a.1.length).then(a.0.cmp(&b.0)));
    ranges
}

/// One fetch worker: keeps the file it wrote last open, since consecutive
/// blobs of a pack mostly belong to the same file.
struct Writer<'a, 'r> {
    shared: &'a Shared<'r>,
    files: &'a [Arc<FileEntry>],
    open: Option<(usize, File)>,
}

impl Writer<'_, '_> {
    fn range(
        &mut self,
        pack: &str,
        range: ReadRange<Need>,
        buf: std::result::Result<Vec<u8>, ReadFailure>,
        stats: &FetchStats,
    ) {
        let repo = self.shared.repo;
        let buf = match buf {
            Ok(b) => b,
            Err(ReadFailure::Storage(why)) => {
                for (_, _, need) in range.items {
                    self.fail_all(&need, &why);
                }
                return;
            }
            Err(ReadFailure::Range(e)) => {
                // A truncated or damaged pack may still hold most of the
                // range intact: each blob is tried on its own.
                warn!(pack, error = %e, "ranged read failed; reading its blobs one by one");
                for (_, _, need) in range.items {
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    match repo.load_blob_at(&need.id, &need.loc) {
                        Ok(data) => {
                            stats.blobs.fetch_add(1, Ordering::Relaxed);
                            self.write_all(&need, &data);
                        }
                        Err(e) => self.fail_all(&need, &format!("pack {pack}: {e}")),
                    }
                }
                return;
            }
        };
        for (offset, length, need) in &range.items {
            let plain = range
                .slice(&buf, *offset, *length)
                .ok_or_else(|| format!("pack {pack}: short read at offset {offset}"))
                .and_then(|raw| {
                    repo.open_blob(&need.id, &need.loc, raw)
                        .map_err(|e| e.to_string())
                });
            match plain {
                Ok(data) => {
                    stats.blobs.fetch_add(1, Ordering::Relaxed);
                    self.write_all(need, &data);
                }
                Err(why) => self.fail_all(need, &why),
            }
        }
    }

    fn write_all(&mut self, need: &Need, data: &[u8]) {
        for d in &need.dests {
            let Some(entry) = self.files.get(d.file).cloned() else {
                continue;
            };
            if crate::util::lock(&entry.failed).is_none() {
                let r = self
                    .file(d.file, &entry)
                    .and_then(|f| write_data(f, data, d.offset, entry.fresh));
                match r {
                    Ok(()) => {
                        self.shared
                            .progress
                            .bytes_written
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        self.shared
                            .bytes
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => fail(&entry, format!("write: {e}")),
                }
            }
            self.done_one(d.file, &entry);
        }
    }

    fn fail_all(&mut self, need: &Need, why: &str) {
        for d in &need.dests {
            if let Some(entry) = self.files.get(d.file).cloned() {
                fail(&entry, format!("blob {}: {why}", need.id));
                self.done_one(d.file, &entry);
            }
        }
    }

    /// Counts one destination of `entry` written (or failed); the last one
    /// finishes the file.
    fn done_one(&mut self, idx: usize, entry: &Arc<FileEntry>) {
        if entry.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let handle = match self.open.take() {
            Some((i, f)) if i == idx => Some(f),
            other => {
                self.open = other;
                None
            }
        };
        finish(self.shared, entry, handle);
    }

    /// The file's handle, reopened below the target if another is cached.
    fn file(&mut self, idx: usize, entry: &FileEntry) -> io::Result<&File> {
        if !matches!(&self.open, Some((i, _)) if *i == idx) {
            self.open = None;
            self.open = Some((idx, reopen(self.shared, entry)?));
        }
        match &self.open {
            Some((_, f)) => Ok(f),
            None => Err(io::Error::other("file handle vanished")),
        }
    }
}

fn fail(entry: &FileEntry, why: String) {
    let mut f = crate::util::lock(&entry.failed);
    if f.is_none() {
        *f = Some(why);
    }
}

/// Opens the file the walk created, by name in its directory below the
/// target, refusing anything else that took its place meanwhile.
pub(super) fn reopen(shared: &Shared, entry: &FileEntry) -> io::Result<File> {
    let (Some(parent), Some(name)) = (entry.rel.parent(), entry.rel.file_name()) else {
        return Err(io::Error::other("restored file has no name"));
    };
    let dir: OwnedFd = shared.tree.open_dir(parent, false, &mut Vec::new())?;
    super::existing::open_regular(&dir, name, OFlag::O_WRONLY, |st| {
        st.st_dev == entry.dev && st.st_ino == entry.ino
    })?
    .ok_or_else(|| io::Error::other("replaced by another file during the restore: left alone"))
}

/// Writes `data` at `offset`, keeping all-zero 64 KiB blocks as holes so
/// sparse files stay sparse; consecutive non-zero blocks go out as one
/// write. In a file this restore created (sized with `set_len`, so it reads
/// as zeros) a zero block is simply skipped; an existing file updated in
/// place may hold old bytes there, so the block is punched out (or, where
/// the filesystem cannot punch holes, written as zeros).
pub(super) fn write_data(file: &File, data: &[u8], offset: u64, fresh: bool) -> io::Result<()> {
    const BLOCK: usize = 64 << 10;
    let mut pos = 0;
    while pos < data.len() {
        let mut stop = pos;
        while stop < data.len() {
            let e = (stop + BLOCK).min(data.len());
            if data[stop..e].iter().all(|&b| b == 0) {
                break;
            }
            stop = e;
        }
        if stop > pos {
            file.write_all_at(&data[pos..stop], offset + pos as u64)?;
            pos = stop;
        } else {
            let end = (pos + BLOCK).min(data.len());
            if !fresh {
                zero_range(file, &data[pos..end], offset + pos as u64)?;
            }
            pos = end;
        }
    }
    Ok(())
}

/// Makes `zeros.len()` bytes at `offset` read as zeros: a hole if the
/// filesystem can punch one, else the zeros written.
fn zero_range(file: &File, zeros: &[u8], offset: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(zeros.len())) else {
        return file.write_all_at(zeros, offset);
    };
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, punch, off, len) {
        Ok(()) => Ok(()),
        Err(_) => file.write_all_at(zeros, offset),
    }
}

/// Applies a finished file's metadata and links its later names, or
/// removes a damaged one and reports it (and its later names) by name.
pub(super) fn finish(shared: &Shared, entry: &FileEntry, handle: Option<File>) {
    shared.progress.files_done.fetch_add(1, Ordering::Relaxed);
    let failed = crate::util::lock(&entry.failed).take();
    let links = std::mem::take(&mut *crate::util::lock(&entry.links));
    if let Some(msg) = failed {
        drop(handle);
        if let Err(e) = remove_entry(&shared.tree, &entry.rel) {
            warn!(path = %entry.path.display(), error = %e, "unrestored file not removed");
        }
        shared.error(&entry.path, format!("not restored, file removed: {msg}"));
        shared.files_failed.fetch_add(1, Ordering::Relaxed);
        for (_, path) in links {
            shared.error(
                &path,
                format!(
                    "not restored (hard link to {}): {msg}",
                    entry.path.display()
                ),
            );
            shared.files_failed.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    let file = match handle.map_or_else(|| reopen(shared, entry), Ok) {
        Ok(f) => f,
        Err(e) => {
            shared.error(&entry.path, format!("metadata: {e}"));
            for (_, path) in links {
                shared.error(&path, format!("hard link not made: {e}"));
                shared.files_failed.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    };
    entry.complete.store(true, Ordering::Release);
    let times = fs::FileTimes::new().set_modified(mtime(&entry.node));
    if let Err(e) = apply_fd_meta(&file, &entry.node, shared.meta, times) {
        shared.error(&entry.path, format!("metadata: {e}"));
    }
    // Linked through the open handle: exactly the inode written, whatever
    // its name has become meanwhile.
    for (rel, path) in links {
        if let Err(e) = relink(&shared.tree, &file, &rel) {
            shared.error(&path, format!("hard link: {e}"));
            shared.files_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use marmoset_index::BlobLocation;

    use super::super::plan::{Dest, Plan};
    use super::*;
    use crate::format::id::Id;

    /// A plan of `packs` packs (ids from `first`), each of `blobs`
    /// adjacent 1 MiB blobs.
    fn plan(first: u8, packs: u8, blobs: u8) -> Vec<PackReads> {
        let mut p = Plan::default();
        for pack in first..first + packs {
            for b in 0..blobs {
                let loc = BlobLocation {
                    pack: [pack; 32],
                    offset: u64::from(b) << 20,
                    length: 1 << 20,
                    raw_length: 1 << 20,
                    kind: 0,
                    flags: 0,
                };
                let dest = Dest {
                    file: 0,
                    offset: (u64::from(pack) * u64::from(blobs) + u64::from(b)) << 20,
                };
                p.add(Id([pack.wrapping_mul(31).wrapping_add(b); 32]), loc, dest);
            }
        }
        p.into_reads(crate::repo::reads::MAX_RANGE)
    }

    #[test]
    fn one_read_per_pack_largest_first() {
        let mut reads = plan(0, 3, 4);
        reads.extend(plan(9, 1, 16));
        let ranges = schedule(reads);
        assert_eq!(ranges.len(), 4, "one read per pack, never split");
        assert_eq!(ranges[0].1.length, 16 << 20, "the largest read goes first");
        assert_eq!(ranges[0].0, Id([9; 32]).to_hex());
        let items: usize = ranges.iter().map(|(_, r)| r.items.len()).sum();
        assert_eq!(items, 28, "every blob is read exactly once");
    }
}
