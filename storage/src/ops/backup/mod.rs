//! The backup pipeline.
//!
//! ```text
//! walker ──events──▶ assembler (trees, file cache, in source order)
//!    │                   ▲ pending results
//!    └─file jobs─▶ file workers (read, chunk, hash, dedup) ──chunks──▶ cpu workers
//!                                                     (compress, encrypt) ──▶ packer ──▶ uploaders
//! ```
//! Every queue is bounded, so memory stays bounded whatever the size of a
//! file or volume: at most a few chunks per worker, one open pack, and the
//! packs being written. Index files are written only after the packs they
//! list are durable, and the snapshot is written last.

mod assemble;
mod chunker;
mod files;
pub(crate) mod saver;
mod source;

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use globset::{Glob, GlobSet, GlobSetBuilder};
use marmoset_index::FileCacheEntry;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use tracing::{debug, warn};

use assemble::*;
use files::*;
use saver::*;
use source::*;

use crate::backend::FileKind;
use crate::error::{Error, Result};
use crate::format::blob::{self, BlobType, EncodedBlob};
use crate::format::id::Id;
use crate::format::pack::{PackBuilder, PackEntry};
use crate::format::snapshot::{BackupSummary, Snapshot, SourceError};
use crate::format::tree::{self, Node, NodeKind, Tree, Xattr};
use crate::repo::coordination::lease::{Lease, LeaseKind};
use crate::repo::Repository;
use chunker::{Chunker, Piece, SparseFile, ZeroChunk};

/// Caller's choices for one backup.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Source name recorded in the snapshot (default `host:/abs/path`).
    pub source: Option<String>,
    pub tags: Vec<String>,
    /// Glob patterns; a pattern without `/` matches any file name, one with
    /// `/` matches the absolute path.
    pub excludes: Vec<String>,
    /// Worker threads for reading and for compression/encryption
    /// (default: the number of cores).
    pub threads: Option<usize>,
    /// Read every file even when the file cache says it is unchanged.
    pub force_read: bool,
    /// Parallel pack writers (default 2).
    pub uploaders: Option<usize>,
    /// Record this host name instead of the machine's.
    pub hostname: Option<String>,
    /// Set by the caller to stop the backup: no snapshot is written once
    /// it is set (the node agent sets it before it thaws an application,
    /// so nothing read after the thaw is saved as a consistent copy).
    pub cancel: Option<Arc<AtomicBool>>,
}

/// Live counters for a progress display; updated by the pipeline.
#[derive(Debug, Default)]
pub struct Progress {
    pub files_done: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_added: AtomicU64,
    pub errors: AtomicU64,
    pub current: Mutex<String>,
}

/// Result of reading one file.
struct FileContent {
    content: Vec<Id>,
    indirect: bool,
    size: u64,
}

type FileResult = std::result::Result<FileContent, String>;

enum Pending {
    Ready(FileContent),
    Waiting(Receiver<FileResult>),
}

enum Event {
    Enter(Box<Node>),
    Leaf(Box<Node>, Option<Box<(Pending, Vec<u8>, Metadata)>>),
    Exit,
    Error(SourceError),
}

struct FileJob {
    /// The directory the walk found the file in, and its name there.
    dir: Arc<OwnedFd>,
    name: OsString,
    /// For messages and progress only; never opened.
    path: PathBuf,
    /// What the walk saw: the file opened must be this one.
    meta: Metadata,
    reply: Sender<FileResult>,
}

/// A chunk for the cpu workers: claimed already (store it), or to hash,
/// claim and store if new, with its id sent back to the file worker.
struct Chunk {
    id: Id,
    data: Vec<u8>,
    reply: Option<Sender<std::result::Result<Id, ()>>>,
}

impl Chunk {
    fn claimed(id: Id, data: Vec<u8>) -> Self {
        Self {
            id,
            data,
            reply: None,
        }
    }

    fn to_hash(data: Vec<u8>, reply: Sender<std::result::Result<Id, ()>>) -> Self {
        Self {
            id: Id([0; 32]),
            data,
            reply: Some(reply),
        }
    }
}

/// Runs a backup of `paths` and returns the new snapshot.
pub fn backup(
    repo: &Repository,
    paths: &[PathBuf],
    opts: &BackupOptions,
    progress: &Progress,
) -> Result<(Id, Snapshot)> {
    let start = Instant::now();
    let time = chrono::Utc::now();
    if paths.is_empty() {
        return Err(Error::InvalidArgument(
            "nothing to back up: no paths given".into(),
        ));
    }
    let mut abs = Vec::new();
    for p in paths {
        let a = std::path::absolute(p).map_err(|e| Error::io(p, e))?;
        fs::symlink_metadata(&a).map_err(|e| Error::io(&a, e))?;
        abs.push(a);
    }
    let hostname = opts.hostname.clone().unwrap_or_else(crate::util::hostname);
    let source = opts.source.clone().unwrap_or_else(|| {
        let joined: Vec<String> = abs.iter().map(|p| p.display().to_string()).collect();
        format!("{hostname}:{}", joined.join(","))
    });
    let excludes = build_excludes(&opts.excludes)?;
    let active = repo.begin_backup();
    let WriteStart {
        session,
        index_at_start,
        missing_packs,
        snapshots,
    } = begin_write(repo, &active, &format!("backup {}", abs[0].display()))?;
    let parent = snapshots
        .0
        .into_iter()
        .rev()
        .find(|(_, s)| s.source == source)
        .map(|(id, _)| id);

    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let uploaders = opts
        .uploaders
        .unwrap_or_else(|| repo.backend().write_parallelism())
        .max(1);
    let (upload_tx, upload_rx) = bounded::<PackBuilder>(PACK_QUEUE);
    let saver = Saver::new(repo, &session, missing_packs, progress, opts.cancel.clone());
    *crate::util::lock(&saver.upload_tx) = Some(upload_tx);
    let ctx = WalkCtx {
        repo,
        excludes,
        source_key: source.clone(),
        force_read: opts.force_read,
    };

    let mut summary = BackupSummary::default();
    let mut root_parts = Vec::new();
    let walked = std::thread::scope(|s| -> Result<()> {
        let saver = &saver;
        let (job_tx, job_rx) = bounded::<FileJob>(threads * 4);
        let (chunk_tx, chunk_rx) = bounded::<Chunk>(threads * 2);
        let (event_tx, event_rx) = bounded::<Vec<Event>>(8192 / source::Events::BATCH);
        let mut uploader_handles = Vec::new();
        for _ in 0..uploaders {
            let rx = upload_rx.clone();
            uploader_handles.push(s.spawn(move || saver.upload_loop(rx)));
        }
        drop(upload_rx);
        let mut cpu_handles = Vec::new();
        for _ in 0..threads {
            let rx = chunk_rx.clone();
            cpu_handles.push(s.spawn(move || cpu_worker(saver, rx)));
        }
        drop(chunk_rx);
        let mut file_handles = Vec::new();
        for _ in 0..threads {
            let rx = job_rx.clone();
            let tx = chunk_tx.clone();
            file_handles.push(s.spawn(move || file_worker(saver, rx, tx)));
        }
        drop(job_rx);
        drop(chunk_tx);
        let assembler = s.spawn(|| assemble(saver, &ctx, event_rx));

        let (prefetch_tx, prefetch_rx) = bounded(8);
        for _ in 0..source::Events::PREFETCHERS {
            let rx = prefetch_rx.clone();
            s.spawn(move || source::prefetch_loop(rx));
        }
        drop(prefetch_rx);
        let events = source::Events::new(event_tx, Some(prefetch_tx));
        let walk_result =
            walk_roots(&ctx, saver, &abs, &events, &job_tx).and_then(|()| events.flush());
        drop(events);
        drop(job_tx);
        let assembled = assembler.join();
        // A worker that panicked may have dropped a chunk or a pack: the
        // backup fails rather than save a snapshot that needs it.
        let mut panicked = false;
        for h in file_handles {
            panicked |= h.join().is_err();
        }
        for h in cpu_handles {
            panicked |= h.join().is_err();
        }
        // All blobs are queued: seal the last pack, then let uploaders drain.
        let flushed = if saver.aborted() {
            Ok(())
        } else {
            saver.flush_packer()
        };
        // Close the channel so the uploaders' loops end.
        drop(crate::util::lock(&saver.upload_tx).take());
        for h in uploader_handles {
            panicked |= h.join().is_err();
        }
        if panicked {
            return Err(Error::Aborted(
                "a backup worker thread panicked; no snapshot was saved".into(),
            ));
        }
        walk_result?;
        flushed?;
        match assembled {
            Ok(Ok((parts, sum))) => {
                root_parts = parts;
                summary = sum;
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Aborted("tree assembler panicked".into())),
        }
    });
    // Workers stopped by a cancel fail in their own words ("workers
    // stopped"): the cause the caller needs is the cancel.
    if saver.cancelled() {
        return Err(Error::Aborted("backup cancelled".into()));
    }
    walked.map_err(|e| crate::util::lock(&saver.first_error).take().unwrap_or(e))?;
    if let Some(e) = crate::util::lock(&saver.first_error).take() {
        return Err(e);
    }
    summary.bytes_added = saver.stats.bytes_added.load(Ordering::Relaxed);
    summary.data_blobs_added = saver.stats.data_blobs.load(Ordering::Relaxed);
    summary.tree_blobs_added = saver.stats.tree_blobs.load(Ordering::Relaxed);
    summary.packs_written = saver.stats.packs.load(Ordering::Relaxed);
    summary.duration_secs = start.elapsed().as_secs_f64();
    let tree = *root_parts
        .first()
        .ok_or_else(|| Error::Aborted("no root tree".into()))?;
    let snap = Snapshot {
        version: 1,
        time,
        hostname,
        username: crate::util::username(),
        source,
        paths: abs.iter().map(|p| p.display().to_string()).collect(),
        tags: opts.tags.clone(),
        tree,
        tree_parts: if root_parts.len() > 1 {
            root_parts.clone()
        } else {
            Vec::new()
        },
        parent,
        program_version: format!("marmoset {}", env!("CARGO_PKG_VERSION")),
        incomplete: !summary.errors.is_empty(),
        original: None,
        summary,
    };
    let id = commit_snapshot(repo, &saver, &session, &root_parts, &index_at_start, &snap)?;
    drop(session);
    Ok((id, snap))
}

/// Packs the index cache knows that the storage (listed in `packs`) does
/// not hold.
fn missing_packs(indexed: Vec<[u8; 32]>, packs: &[(String, u64)]) -> HashSet<[u8; 32]> {
    let present: HashSet<[u8; 32]> = packs
        .iter()
        .filter_map(|(n, _)| Id::from_hex(n).map(|i| i.0))
        .collect();
    let missing: HashSet<[u8; 32]> = indexed
        .into_iter()
        .filter(|p| !present.contains(p))
        .collect();
    if !missing.is_empty() {
        warn!(
            packs = missing.len(),
            "index lists packs the repository does not hold; their data is stored again"
        );
    }
    missing
}

/// Every pack the snapshot relies on must exist right now (fresh listing).
fn confirm_packs_exist(repo: &Repository, used: &HashSet<[u8; 32]>) -> Result<()> {
    let present: HashSet<String> = repo
        .backend()
        .list_names(FileKind::Pack)?
        .into_iter()
        .collect();
    let gone: Vec<String> = used
        .iter()
        .map(|p| Id(*p).to_hex())
        .filter(|p| !present.contains(p))
        .collect();
    match gone.first() {
        None => Ok(()),
        Some(first) => Err(Error::PacksVanished {
            count: gone.len(),
            first: first.clone(),
        }),
    }
}

fn index_names(repo: &Repository) -> Result<HashSet<String>> {
    Ok(repo
        .backend()
        .list_names(FileKind::Index)?
        .into_iter()
        .collect())
}

/// Makes sure every blob the new trees reference is indexed when a
/// maintenance may have hidden some while we ran: a plan names our session
/// (or is still in phase 1), or any index file we started from is gone —
/// the latter whatever the plans say, so that a plan this process cannot
/// trust never lets a snapshot reference unindexed blobs.
fn rescue_if_overlapping(
    repo: &Repository,
    root_parts: &[Id],
    session: &str,
    index_at_start: &HashSet<String>,
) -> Result<()> {
    let now = index_names(repo)?;
    let index_changed = index_at_start.iter().any(|n| !now.contains(n));
    if index_changed || crate::repo::coordination::plans::plans_overlap(repo, session)? {
        let rescued = crate::repo::coordination::rescue::rescue_referenced(repo, root_parts)?;
        if rescued > 0 {
            warn!(
                rescued,
                "re-indexed packs that maintenance had planned to delete"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_for(dir: &SourceDir, name: &str) -> (FileJob, Receiver<FileResult>) {
        let (_, meta) = dir.stat(OsStr::new(name)).expect("stat");
        let (reply, rx) = bounded(1);
        let job = FileJob {
            dir: dir.fd.clone(),
            name: name.into(),
            path: dir.path.join(name),
            meta,
            reply,
        };
        (job, rx)
    }

    #[test]
    fn a_file_swapped_for_a_symlink_or_fifo_after_the_walk_is_not_read() {
        let t = tempfile::tempdir().expect("tempdir");
        let secret = t.path().join("secret");
        fs::write(&secret, b"host secret").expect("write");
        let src = t.path().join("src");
        fs::create_dir(&src).expect("mkdir");
        fs::write(src.join("victim"), b"tenant data").expect("write");
        fs::write(src.join("pipe"), b"tenant data").expect("write");
        let dir = SourceDir::open_root(&src).expect("open");
        let (victim, _) = job_for(&dir, "victim");
        let (pipe, _) = job_for(&dir, "pipe");

        fs::remove_file(src.join("victim")).expect("rm");
        std::os::unix::fs::symlink(&secret, src.join("victim")).expect("symlink");
        let err = open_source(&victim).expect_err("a symlink must not be followed");
        assert!(
            err.to_string().contains("symbolic link") || err.raw_os_error() == Some(libc::ELOOP)
        );

        fs::remove_file(src.join("pipe")).expect("rm");
        nix::unistd::mkfifo(&src.join("pipe"), Mode::from_bits_truncate(0o600)).expect("mkfifo");
        // Would block forever without O_NONBLOCK; must be refused instead.
        let err = open_source(&pipe).expect_err("a fifo swapped in must be refused");
        assert!(err.to_string().contains("replaced"), "{err}");

        // Same name, new regular file (new inode, made before the old one
        // goes so the number cannot be reused): not the walk's file either.
        fs::write(src.join("victim.new"), b"other").expect("write");
        fs::rename(src.join("victim.new"), src.join("victim")).expect("rename");
        let err = open_source(&victim).expect_err("another inode must be refused");
        assert!(err.to_string().contains("replaced"), "{err}");
    }

    /// Events reach the assembler in order, in batches, and the walk's
    /// last partial batch is sent by `flush`.
    #[test]
    fn events_go_in_order_in_batches() {
        let (tx, rx) = bounded::<Vec<Event>>(16);
        let events = source::Events::new(tx, None);
        let n = source::Events::BATCH * 2 + 7;
        for i in 0..n {
            let e = Event::Error(source::source_error(Path::new(&i.to_string()), "x"));
            source::send(&events, e).expect("send");
        }
        assert_eq!(rx.len(), 2, "two full batches, the rest buffered");
        events.flush().expect("flush");
        drop(events);
        let got: Vec<String> = rx
            .iter()
            .flatten()
            .map(|e| match e {
                Event::Error(e) => e.path,
                _ => String::new(),
            })
            .collect();
        let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_backed_up_directory_swapped_for_a_symlink_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let src = t.path().join("src");
        fs::create_dir(&src).expect("mkdir");
        let meta = fs::symlink_metadata(&src).expect("stat");
        fs::rename(&src, t.path().join("src.old")).expect("rename");
        std::os::unix::fs::symlink("/etc", &src).expect("symlink");
        assert!(SourceDir::open_root_dir(&src, &meta).is_err());
        // Another directory in its place (other inode) is refused too.
        fs::remove_file(&src).expect("rm");
        fs::create_dir(&src).expect("mkdir");
        assert!(SourceDir::open_root_dir(&src, &meta).is_err());
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_keeps_reading_the_original() {
        let t = tempfile::tempdir().expect("tempdir");
        let outside = t.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        fs::write(outside.join("f"), b"host secret").expect("write");
        let src = t.path().join("src");
        fs::create_dir_all(src.join("d")).expect("mkdir");
        fs::write(src.join("d/f"), b"tenant data").expect("write");
        let root = SourceDir::open_root(&src).expect("open");
        let (_, meta) = root.stat(OsStr::new("d")).expect("stat");
        let d = root.open_child(OsStr::new("d"), &meta).expect("open d");
        let (job, _) = job_for(&d, "f");
        // The tenant moves the directory away and plants a symlink.
        fs::rename(src.join("d"), src.join("d.old")).expect("rename");
        std::os::unix::fs::symlink(&outside, src.join("d")).expect("symlink");
        let mut f = open_source(&job).expect("the original file is still read");
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut got).expect("read");
        assert_eq!(got, b"tenant data");
        // And a fresh lookup of `d` refuses the symlink.
        let (_, meta) = root.stat(OsStr::new("d")).expect("stat");
        assert!(meta.file_type().is_symlink());
        assert!(root.open_child(OsStr::new("d"), &meta).is_err());
    }
}
