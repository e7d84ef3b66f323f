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

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use globset::{Glob, GlobSet, GlobSetBuilder};
use marmoset_index::FileCacheEntry;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use tracing::{debug, warn};

use crate::backend::FileKind;
use crate::blob::{self, BlobType, EncodedBlob};
use crate::chunker::Chunker;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::lease::{Lease, LeaseKind};
use crate::pack::{PackBuilder, PackEntry};
use crate::repo::Repository;
use crate::snapshot::{BackupSummary, Snapshot, SourceError};
use crate::tree::{self, Node, NodeKind, Tree, Xattr};

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

const PACK_QUEUE: usize = 1;
const FILE_CACHE_SEP: u8 = 0;
/// Index files are written at least every this many packs, so an
/// interrupted backup loses little index work (packs are found anyway).
const PACKS_PER_INDEX: usize = 8;

/// Shared state of the blob-saving half of the pipeline.
struct Saver<'r> {
    repo: &'r Repository,
    /// The backup's session lease: no index file is written once it may
    /// have looked stale (its packs may be gone by then).
    session: &'r Lease,
    level: i32,
    pack_size: usize,
    /// Room for a full pack plus its largest possible last blob and the
    /// trailer, so sealing never reallocates (which would double memory).
    pack_capacity: usize,
    inflight: Mutex<HashSet<Id>>,
    /// Indexed packs that the storage does not hold (replayed index files,
    /// packs deleted since): their blobs are stored again, never reused.
    missing_packs: HashSet<[u8; 32]>,
    /// Every pack holding a blob this backup references; all must still
    /// exist when the snapshot is written.
    used_packs: Mutex<HashSet<[u8; 32]>>,
    packer: Mutex<PackBuilder>,
    /// Taken (and so closed) once all blobs are queued.
    upload_tx: Mutex<Option<Sender<PackBuilder>>>,
    pending_index: Mutex<Vec<(Id, Vec<PackEntry>)>>,
    /// Index files this backup wrote, with the packs each lists: withdrawn
    /// if the lease is lost (their packs may be gone).
    written_index: Mutex<Vec<(String, Vec<Id>)>>,
    stats: Stats,
    progress: &'r Progress,
    abort: AtomicBool,
    first_error: Mutex<Option<Error>>,
}

#[derive(Default)]
struct Stats {
    bytes_added: AtomicU64,
    data_blobs: AtomicU64,
    tree_blobs: AtomicU64,
    packs: AtomicU64,
}

impl<'r> Saver<'r> {
    fn fail(&self, e: Error) {
        let mut slot = crate::util::lock(&self.first_error);
        if slot.is_none() {
            *slot = Some(e);
        }
        self.abort.store(true, Ordering::SeqCst);
    }

    fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }

    /// Claims `id` for storing: false when the repository or this backup
    /// already has it.
    fn claim(&self, id: &Id) -> Result<bool> {
        if self.known(id)? {
            return Ok(false);
        }
        let mut inflight = crate::util::lock(&self.inflight);
        Ok(inflight.insert(*id))
    }

    /// Whether a pack that exists holds `id`; records that pack as used.
    fn known(&self, id: &Id) -> Result<bool> {
        let Some(loc) = self.repo.index().get_blob(&id.0)? else {
            return Ok(false);
        };
        if self.missing_packs.contains(&loc.pack) {
            return Ok(false);
        }
        crate::util::lock(&self.used_packs).insert(loc.pack);
        Ok(true)
    }

    fn add_encoded(&self, blob: EncodedBlob) -> Result<()> {
        let len = blob.ciphertext.len() as u64;
        match blob.kind {
            BlobType::Data => self.stats.data_blobs.fetch_add(1, Ordering::Relaxed),
            _ => self.stats.tree_blobs.fetch_add(1, Ordering::Relaxed),
        };
        let full = {
            let mut p = crate::util::lock(&self.packer);
            p.add(blob)?;
            if p.len() >= self.pack_size {
                Some(std::mem::replace(
                    &mut *p,
                    PackBuilder::with_capacity(self.pack_capacity),
                ))
            } else {
                None
            }
        };
        self.stats.bytes_added.fetch_add(len, Ordering::Relaxed);
        self.progress.bytes_added.fetch_add(len, Ordering::Relaxed);
        if let Some(pack) = full {
            self.send_pack(pack)?;
        }
        Ok(())
    }

    fn send_pack(&self, pack: PackBuilder) -> Result<()> {
        let tx = crate::util::lock(&self.upload_tx).clone();
        tx.ok_or_else(|| Error::Aborted("pack writer closed".into()))?
            .send(pack)
            .map_err(|_| Error::Aborted("pack writer stopped".into()))
    }

    /// Stores a small blob (tree, chunk list) from the calling thread.
    fn save_blob(&self, kind: BlobType, data: &[u8]) -> Result<Id> {
        let id = self.repo.keys().content_id(data);
        if self.claim(&id)? {
            self.add_encoded(blob::encode(self.repo.keys(), kind, id, data, self.level)?)?;
        }
        Ok(id)
    }

    fn flush_packer(&self) -> Result<()> {
        let last = std::mem::take(&mut *crate::util::lock(&self.packer));
        if !last.is_empty() {
            self.send_pack(last)?;
        }
        Ok(())
    }

    /// Uploader loop: seal, write, then make the blobs visible.
    fn upload_loop(&self, rx: Receiver<PackBuilder>) {
        for builder in rx {
            if self.aborted() {
                continue;
            }
            if let Err(e) = self.upload_one(builder) {
                self.fail(e);
            }
        }
    }

    fn upload_one(&self, builder: PackBuilder) -> Result<()> {
        let sealed = builder.seal(self.repo.keys())?;
        let name = sealed.id.to_hex();
        self.repo
            .backend()
            .write(FileKind::Pack, &name, &sealed.bytes)?;
        debug!(pack = %name, blobs = sealed.entries.len(), "pack written");
        self.stats.packs.fetch_add(1, Ordering::Relaxed);
        crate::util::lock(&self.used_packs).insert(sealed.id.0);
        let item = vec![(sealed.id, sealed.entries)];
        // Blobs become visible in the local cache right away for dedup;
        // the repository index file follows in batches.
        self.repo.cache_entries(&item, false)?;
        {
            let mut inflight = crate::util::lock(&self.inflight);
            for e in &item[0].1 {
                inflight.remove(&e.id);
            }
        }
        let batch = {
            let mut pending = crate::util::lock(&self.pending_index);
            pending.extend(item);
            if pending.len() >= PACKS_PER_INDEX {
                std::mem::take(&mut *pending)
            } else {
                Vec::new()
            }
        };
        if !batch.is_empty() {
            self.session.check_alive()?;
            self.write_index(&batch)?;
        }
        Ok(())
    }

    fn write_index(&self, batch: &[(Id, Vec<PackEntry>)]) -> Result<()> {
        let name = self.repo.write_index(batch)?;
        let packs = batch.iter().map(|(p, _)| *p).collect();
        crate::util::lock(&self.written_index).push((name, packs));
        Ok(())
    }

    /// After the lease was lost: index files of this run that list a pack
    /// that is gone are removed, so the repository stays consistent (packs
    /// that remain are indexed again by the next backup's recovery).
    fn withdraw_index(&self) {
        let present: HashSet<String> = match self.repo.backend().list(FileKind::Pack) {
            Ok(l) => l.into_iter().map(|(n, _)| n).collect(),
            Err(_) => return,
        };
        for (name, packs) in crate::util::lock(&self.written_index).iter() {
            if packs.iter().any(|p| !present.contains(&p.to_hex())) {
                warn!(index = %name, "withdrawing an index file whose packs are gone");
                let _ = self.repo.backend().remove(FileKind::Index, name);
            }
        }
    }
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

struct Chunk {
    id: Id,
    data: Vec<u8>,
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
    // The session lease comes before the index is read: maintenance waits
    // for every session that may have seen blobs it is about to delete.
    let session = Lease::acquire(
        repo.backend().clone(),
        repo.keys(),
        LeaseKind::Session,
        &format!("backup {}", abs[0].display()),
    )?;
    crate::lease::refuse_clock_skew(session.storage_now()?)?;
    repo.sync_index()?;
    // One listing serves both: recovery adds no pack.
    let packs = repo.backend().list(FileKind::Pack)?;
    let recovered = repo.recover_unindexed_packs(&packs)?;
    if recovered > 0 {
        debug!(recovered, "reusing packs of an interrupted backup");
    }
    let missing_packs = missing_packs(repo, &packs)?;
    let index_at_start = index_names(repo)?;
    let parent = repo
        .snapshots()?
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
    let pack_size = repo.config().pack_size as usize;
    let pack_capacity = pack_size + repo.config().chunker.max_size as usize + (1 << 20);
    let saver = Saver {
        repo,
        session: &session,
        level: repo.config().compression_level,
        pack_size,
        pack_capacity,
        inflight: Mutex::new(HashSet::new()),
        missing_packs,
        used_packs: Mutex::new(HashSet::new()),
        packer: Mutex::new(PackBuilder::with_capacity(pack_capacity)),
        upload_tx: Mutex::new(Some(upload_tx)),
        pending_index: Mutex::new(Vec::new()),
        written_index: Mutex::new(Vec::new()),
        stats: Stats::default(),
        progress,
        abort: AtomicBool::new(false),
        first_error: Mutex::new(None),
    };
    let ctx = WalkCtx {
        repo,
        excludes,
        source_key: source.clone(),
        force_read: opts.force_read,
    };

    let mut summary = BackupSummary::default();
    let mut root_parts = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        let saver = &saver;
        let (job_tx, job_rx) = bounded::<FileJob>(threads * 4);
        let (chunk_tx, chunk_rx) = bounded::<Chunk>(threads * 2);
        let (event_tx, event_rx) = bounded::<Event>(8192);
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

        let walk_result = walk_roots(&ctx, saver, &abs, &event_tx, &job_tx);
        drop(event_tx);
        drop(job_tx);
        let assembled = assembler.join();
        for h in file_handles {
            let _ = h.join();
        }
        for h in cpu_handles {
            let _ = h.join();
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
            let _ = h.join();
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
    })
    .map_err(|e| crate::util::lock(&saver.first_error).take().unwrap_or(e))?;
    if let Some(e) = crate::util::lock(&saver.first_error).take() {
        return Err(e);
    }
    // Index files for the remaining packs, then the snapshot: in this order,
    // so the snapshot never references a blob that no index lists. Nothing
    // more is indexed once the lease may have looked stale to maintenance.
    let lost = |e: Error| {
        if matches!(e, Error::LeaseLost { .. } | Error::PacksVanished { .. }) {
            saver.withdraw_index();
        }
        e
    };
    session.check_present().map_err(lost)?;
    let rest = std::mem::take(&mut *crate::util::lock(&saver.pending_index));
    if !rest.is_empty() {
        saver.write_index(&rest)?;
    }
    repo.index().flush()?;

    summary.bytes_added = saver.stats.bytes_added.load(Ordering::Relaxed);
    summary.data_blobs_added = saver.stats.data_blobs.load(Ordering::Relaxed);
    summary.tree_blobs_added = saver.stats.tree_blobs.load(Ordering::Relaxed);
    summary.packs_written = saver.stats.packs.load(Ordering::Relaxed);
    summary.duration_secs = start.elapsed().as_secs_f64();
    let tree = *root_parts
        .first()
        .ok_or_else(|| Error::Aborted("no root tree".into()))?;
    // A maintenance hid packs while we ran: make sure every blob we
    // referenced (possibly by dedup against now-hidden packs) is indexed.
    rescue_if_overlapping(repo, &root_parts, &session.name, &index_at_start)?;
    let used = std::mem::take(&mut *crate::util::lock(&saver.used_packs));
    confirm_packs_exist(repo, &used).map_err(lost)?;
    session.check_present().map_err(lost)?;
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
        summary,
    };
    let id = repo.save_snapshot(&snap)?;
    // Stopped between the checks above and the write for longer than the
    // lease lives: a maintenance may have deleted what the snapshot needs
    // without seeing it. Withdraw it rather than leave it unrestorable.
    if let Err(e) = session.check_present() {
        let _ = repo.backend().remove(FileKind::Snapshot, &id.to_hex());
        return Err(lost(e));
    }
    // A plan made between the check above and the snapshot write could
    // not see the snapshot: check once more (maintenance also rescues
    // referenced blobs it finds only in planned packs).
    rescue_if_overlapping(repo, &root_parts, &session.name, &index_at_start)?;
    drop(session);
    Ok((id, snap))
}

/// Packs the index cache knows that the storage (listed in `packs`) does
/// not hold.
fn missing_packs(repo: &Repository, packs: &[(String, u64)]) -> Result<HashSet<[u8; 32]>> {
    let present: HashSet<[u8; 32]> = packs
        .iter()
        .filter_map(|(n, _)| Id::from_hex(n).map(|i| i.0))
        .collect();
    let missing: HashSet<[u8; 32]> = repo
        .index()
        .packs()?
        .into_iter()
        .filter(|p| !present.contains(p))
        .collect();
    if !missing.is_empty() {
        warn!(
            packs = missing.len(),
            "index lists packs the repository does not hold; their data is stored again"
        );
    }
    Ok(missing)
}

/// Every pack the snapshot relies on must exist right now (fresh listing).
fn confirm_packs_exist(repo: &Repository, used: &HashSet<[u8; 32]>) -> Result<()> {
    let present: HashSet<String> = repo
        .backend()
        .list(FileKind::Pack)?
        .into_iter()
        .map(|(n, _)| n)
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
        .list(FileKind::Index)?
        .into_iter()
        .map(|(n, _)| n)
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
    if index_changed || crate::maintain::plans_overlap(repo, session)? {
        let rescued = crate::maintain::rescue_referenced(repo, root_parts)?;
        if rescued > 0 {
            warn!(
                rescued,
                "re-indexed packs that maintenance had planned to delete"
            );
        }
    }
    Ok(())
}

struct WalkCtx<'r> {
    repo: &'r Repository,
    excludes: GlobSet,
    source_key: String,
    force_read: bool,
}

fn build_excludes(patterns: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let g = Glob::new(p)
            .map_err(|e| Error::InvalidArgument(format!("exclude pattern {p:?}: {e}")))?;
        b.add(g);
    }
    b.build().map_err(|e| Error::InvalidArgument(e.to_string()))
}

impl WalkCtx<'_> {
    fn excluded(&self, path: &Path) -> bool {
        if self.excludes.is_empty() {
            return false;
        }
        self.excludes.is_match(path) || path.file_name().is_some_and(|n| self.excludes.is_match(n))
    }

    fn cache_key(&self, path: &Path) -> Vec<u8> {
        let mut k = self.source_key.as_bytes().to_vec();
        k.push(FILE_CACHE_SEP);
        k.extend_from_slice(path.as_os_str().as_bytes());
        k
    }
}

fn walk_roots(
    ctx: &WalkCtx,
    saver: &Saver,
    paths: &[PathBuf],
    events: &Sender<Event>,
    jobs: &Sender<FileJob>,
) -> Result<()> {
    // One directory: its contents form the root. Otherwise the root holds
    // one entry per path, named by its last component. The operator's own
    // parent directories may go through symlinks; nothing below them does.
    if let [only] = paths {
        let meta = fs::symlink_metadata(only).map_err(|e| Error::io(only, e))?;
        if meta.is_dir() {
            let dir = SourceDir::open_root_dir(only, &meta)?;
            return walk_dir_contents(ctx, saver, &dir, events, jobs);
        }
    }
    let mut names = HashSet::new();
    for p in paths {
        let name = p.file_name().unwrap_or(p.as_os_str()).as_bytes().to_vec();
        if !names.insert(name.clone()) {
            return Err(Error::InvalidArgument(format!(
                "two paths share the name {:?}; back them up separately",
                String::from_utf8_lossy(&name)
            )));
        }
    }
    let mut sorted: Vec<&PathBuf> = paths.iter().collect();
    sorted.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    for p in sorted {
        let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
            return Err(Error::InvalidArgument(format!(
                "{} cannot be backed up together with other paths; back it up on its own",
                p.display()
            )));
        };
        let dir = SourceDir::open_root(parent)?;
        walk_entry(ctx, saver, &dir, name, events, jobs)?;
    }
    Ok(())
}

/// An open directory of the source tree. Entries are looked up relative to
/// its descriptor with `O_NOFOLLOW`, so a directory or file swapped for a
/// symlink after it was listed is never followed (the node agent runs as
/// root over tenants' volumes: following one would copy host files into a
/// tenant's snapshot).
struct SourceDir {
    fd: Arc<OwnedFd>,
    path: PathBuf,
}

impl SourceDir {
    fn open_root(path: &Path) -> Result<Self> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(path, e.into()))?;
        Ok(Self {
            fd: Arc::new(fd),
            path: path.to_owned(),
        })
    }

    /// Opens the directory backed up, if it is still the one `meta`
    /// describes: not swapped for a symlink since it was looked at.
    fn open_root_dir(path: &Path, meta: &Metadata) -> Result<Self> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(path, e.into()))?;
        let fd = same_object(fd, meta).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            fd: Arc::new(fd),
            path: path.to_owned(),
        })
    }

    /// Opens the child directory `name` if it is still the directory
    /// described by `meta` (same device and inode).
    fn open_child(&self, name: &OsStr, meta: &Metadata) -> std::io::Result<Self> {
        let fd = nix::fcntl::openat(
            &*self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let fd = same_object(fd, meta)?;
        Ok(Self {
            fd: Arc::new(fd),
            path: self.path.join(name),
        })
    }

    /// Entry names, sorted bytewise (trees are sorted by name).
    fn names(&self) -> std::io::Result<Vec<OsString>> {
        let dup = self.fd.try_clone()?;
        let mut dir = nix::dir::Dir::from_fd(dup)?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_owned());
            }
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(names)
    }

    /// The entry itself (never what a symlink points to), as an `O_PATH`
    /// handle and its metadata.
    fn stat(&self, name: &OsStr) -> std::io::Result<(File, Metadata)> {
        let fd = nix::fcntl::openat(
            &*self.fd,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let f = File::from(fd);
        let meta = f.metadata()?;
        Ok((f, meta))
    }
}

/// Keeps `fd` only if it is the object the walk saw (device, inode and
/// type); anything else was swapped in after the walk looked.
fn same_object(fd: OwnedFd, meta: &Metadata) -> std::io::Result<OwnedFd> {
    let f = File::from(fd);
    let now = f.metadata()?;
    if now.dev() != meta.dev() || now.ino() != meta.ino() || now.file_type() != meta.file_type() {
        return Err(std::io::Error::other(
            "replaced by another file during the backup; skipped",
        ));
    }
    Ok(OwnedFd::from(f))
}

fn walk_dir_contents(
    ctx: &WalkCtx,
    saver: &Saver,
    dir: &SourceDir,
    events: &Sender<Event>,
    jobs: &Sender<FileJob>,
) -> Result<()> {
    let names = match dir.names() {
        Ok(n) => n,
        Err(e) => {
            return send(
                events,
                Event::Error(source_error(&dir.path, &e.to_string())),
            )
        }
    };
    for name in names {
        if saver.aborted() {
            return Err(Error::Aborted("backup aborted".into()));
        }
        walk_entry(ctx, saver, dir, &name, events, jobs)?;
    }
    Ok(())
}

fn send(events: &Sender<Event>, e: Event) -> Result<()> {
    events
        .send(e)
        .map_err(|_| Error::Aborted("tree assembler stopped".into()))
}

fn source_error(path: &Path, error: &str) -> SourceError {
    SourceError {
        path: path.display().to_string(),
        error: error.to_string(),
    }
}

fn walk_entry(
    ctx: &WalkCtx,
    saver: &Saver,
    dir: &SourceDir,
    name: &OsStr,
    events: &Sender<Event>,
    jobs: &Sender<FileJob>,
) -> Result<()> {
    let path = dir.path.join(name);
    if ctx.excluded(&path) {
        return Ok(());
    }
    let (handle, meta) = match dir.stat(name) {
        Ok(m) => m,
        Err(e) => return send(events, Event::Error(source_error(&path, &e.to_string()))),
    };
    let mut node = node_from_meta(name.as_bytes().to_vec(), &meta);
    let ft = meta.file_type();
    if !ft.is_symlink() {
        node.xattrs = read_xattrs(&handle);
    }
    drop(handle);
    if ft.is_dir() {
        let child = match dir.open_child(name, &meta) {
            Ok(c) => c,
            Err(e) => return send(events, Event::Error(source_error(&path, &e.to_string()))),
        };
        send(events, Event::Enter(Box::new(node)))?;
        walk_dir_contents(ctx, saver, &child, events, jobs)?;
        return send(events, Event::Exit);
    }
    if ft.is_symlink() {
        match nix::fcntl::readlinkat(&*dir.fd, name) {
            Ok(t) => node.link_target = Some(t.as_bytes().to_vec()),
            Err(e) => return send(events, Event::Error(source_error(&path, &e.to_string()))),
        }
        return send(events, Event::Leaf(Box::new(node), None));
    }
    if !ft.is_file() {
        return send(events, Event::Leaf(Box::new(node), None));
    }
    let key = ctx.cache_key(&path);
    if !ctx.force_read {
        if let Some(content) = unchanged_content(ctx, saver, &key, &meta)? {
            return send(
                events,
                Event::Leaf(
                    Box::new(node),
                    Some(Box::new((Pending::Ready(content), key, meta))),
                ),
            );
        }
    }
    let (reply, rx) = bounded(1);
    jobs.send(FileJob {
        dir: dir.fd.clone(),
        name: name.to_owned(),
        path,
        meta: meta.clone(),
        reply,
    })
    .map_err(|_| Error::Aborted("file readers stopped".into()))?;
    send(
        events,
        Event::Leaf(
            Box::new(node),
            Some(Box::new((Pending::Waiting(rx), key, meta))),
        ),
    )
}

/// The cached content of an unchanged file, if every blob (data chunks of
/// huge files included) is still stored in a pack that exists.
fn unchanged_content(
    ctx: &WalkCtx,
    saver: &Saver,
    key: &[u8],
    meta: &Metadata,
) -> Result<Option<FileContent>> {
    let Some(c) = ctx.repo.index().get_file(key)? else {
        return Ok(None);
    };
    let same = c.size == meta.len()
        && c.mtime_ns == mtime_ns(meta)
        && c.ctime_ns == ctime_ns(meta)
        && c.inode == meta.ino();
    if !same {
        return Ok(None);
    }
    for id in &c.content {
        if !saver.known(&Id(*id))? {
            return Ok(None);
        }
    }
    if c.indirect {
        for list in &c.content {
            let chunks = match ctx.repo.load_blob(&Id(*list)) {
                Ok(raw) => tree::decode_chunk_list(&Id(*list), &raw)?,
                // Unreadable list: read the file again instead.
                Err(_) => return Ok(None),
            };
            for id in &chunks {
                if !saver.known(id)? {
                    return Ok(None);
                }
            }
        }
    }
    Ok(Some(FileContent {
        content: c.content.into_iter().map(Id).collect(),
        indirect: c.indirect,
        size: c.size,
    }))
}

fn mtime_ns(m: &Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

fn ctime_ns(m: &Metadata) -> i64 {
    m.ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.ctime_nsec())
}

pub(crate) fn node_from_meta(name: Vec<u8>, meta: &Metadata) -> Node {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        NodeKind::Dir
    } else if ft.is_symlink() {
        NodeKind::Symlink
    } else if ft.is_fifo() {
        NodeKind::Fifo
    } else if ft.is_socket() {
        NodeKind::Socket
    } else if ft.is_char_device() {
        NodeKind::Chardev
    } else if ft.is_block_device() {
        NodeKind::Blockdev
    } else {
        NodeKind::File
    };
    let mut n = Node::new(name, kind);
    n.mode = meta.mode() & 0o7777;
    n.uid = meta.uid();
    n.gid = meta.gid();
    n.mtime_ns = mtime_ns(meta);
    if kind == NodeKind::File {
        n.size = meta.len();
        if meta.nlink() > 1 {
            n.inode = meta.ino();
            n.links = meta.nlink();
        }
    }
    if matches!(kind, NodeKind::Chardev | NodeKind::Blockdev) {
        n.rdev = meta.rdev();
    }
    n
}

/// Extended attributes of the entry behind an `O_PATH` handle, read
/// through its `/proc/self/fd` link so no path is resolved again.
fn read_xattrs(handle: &File) -> Vec<Xattr> {
    let link = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let Ok(names) = xattr::list_deref(&link) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in names {
        if let Ok(Some(value)) = xattr::get_deref(&link, &name) {
            out.push(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn file_worker(saver: &Saver, jobs: Receiver<FileJob>, chunks: Sender<Chunk>) {
    // Reused for every file this worker reads.
    let mut buf = Vec::new();
    for job in jobs {
        if saver.aborted() {
            let _ = job.reply.send(Err("backup aborted".into()));
            continue;
        }
        let result = read_file(saver, &job, &chunks, &mut buf);
        let reply = match result {
            Ok(c) => Ok(c),
            Err(FileError::Source(msg)) => Err(msg),
            Err(FileError::Fatal(e)) => {
                saver.fail(e);
                Err("backup aborted".into())
            }
        };
        saver.progress.files_done.fetch_add(1, Ordering::Relaxed);
        let _ = job.reply.send(reply);
    }
}

enum FileError {
    /// The source file could not be read: recorded, the backup goes on.
    Source(String),
    /// The repository side failed: the backup stops.
    Fatal(Error),
}

/// Opens the file the walk saw, relative to its directory: never through
/// a symlink (`O_NOFOLLOW`), never blocking on a fifo swapped in
/// (`O_NONBLOCK`), and only if device, inode and type still match.
fn open_source(job: &FileJob) -> std::io::Result<File> {
    let fd = nix::fcntl::openat(
        &*job.dir,
        job.name.as_os_str(),
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(same_object(fd, &job.meta)?))
}

fn read_file(
    saver: &Saver,
    job: &FileJob,
    chunks: &Sender<Chunk>,
    buf: &mut Vec<u8>,
) -> std::result::Result<FileContent, FileError> {
    if let Ok(mut cur) = saver.progress.current.try_lock() {
        cur.clear();
        cur.push_str(&job.path.to_string_lossy());
    }
    let f = open_source(job).map_err(|e| FileError::Source(e.to_string()))?;
    let keys = saver.repo.keys();
    let chunker = Chunker::new(f, buf, &saver.repo.config().chunker, keys.chunker_seed());
    let mut ids = Vec::new();
    let mut size = 0u64;
    for chunk in chunker {
        if saver.aborted() {
            return Err(FileError::Fatal(Error::Aborted("backup aborted".into())));
        }
        let data =
            chunk.map_err(|e| FileError::Source(format!("read failed at byte {size}: {e}")))?;
        let len = data.len() as u64;
        size += len;
        saver.progress.bytes_read.fetch_add(len, Ordering::Relaxed);
        let id = keys.content_id(&data);
        ids.push(id);
        if saver.claim(&id).map_err(FileError::Fatal)? {
            chunks.send(Chunk { id, data }).map_err(|_| {
                FileError::Fatal(Error::Aborted("compression workers stopped".into()))
            })?;
        }
    }
    if ids.len() <= tree::MAX_DIRECT_CHUNKS {
        return Ok(FileContent {
            content: ids,
            indirect: false,
            size,
        });
    }
    let mut lists = Vec::new();
    for part in ids.chunks(tree::CHUNK_LIST_LEN) {
        let id = saver
            .save_blob(BlobType::ChunkList, &tree::encode_chunk_list(part))
            .map_err(FileError::Fatal)?;
        lists.push(id);
    }
    Ok(FileContent {
        content: lists,
        indirect: true,
        size,
    })
}

fn cpu_worker(saver: &Saver, chunks: Receiver<Chunk>) {
    for c in chunks {
        if saver.aborted() {
            continue;
        }
        let r = blob::encode(
            saver.repo.keys(),
            BlobType::Data,
            c.id,
            &c.data,
            saver.level,
        )
        .and_then(|b| saver.add_encoded(b));
        if let Err(e) = r {
            saver.fail(e);
        }
    }
}

/// A directory being assembled: finished parts plus the current one.
struct DirBuilder {
    node: Node,
    parts: Vec<Id>,
    entries: Vec<Node>,
}

impl DirBuilder {
    fn push(&mut self, saver: &Saver, node: Node) -> Result<()> {
        self.entries.push(node);
        if self.entries.len() >= tree::MAX_PART_ENTRIES {
            self.flush_part(saver)?;
        }
        Ok(())
    }

    fn flush_part(&mut self, saver: &Saver) -> Result<()> {
        let t = Tree {
            nodes: std::mem::take(&mut self.entries),
        };
        self.parts
            .push(saver.save_blob(BlobType::Tree, &t.encode()?)?);
        Ok(())
    }

    fn finish(mut self, saver: &Saver) -> Result<(Node, Vec<Id>)> {
        if !self.entries.is_empty() || self.parts.is_empty() {
            self.flush_part(saver)?;
        }
        self.node.subtree = self.parts.clone();
        Ok((self.node, self.parts))
    }
}

fn assemble(
    saver: &Saver,
    ctx: &WalkCtx,
    events: Receiver<Event>,
) -> Result<(Vec<Id>, BackupSummary)> {
    let r = assemble_inner(saver, ctx, &events);
    if let Err(e) = &r {
        saver.fail(Error::Aborted(e.to_string()));
    }
    r
}

fn assemble_inner(
    saver: &Saver,
    ctx: &WalkCtx,
    events: &Receiver<Event>,
) -> Result<(Vec<Id>, BackupSummary)> {
    let mut sum = BackupSummary::default();
    let mut stack = vec![DirBuilder {
        node: Node::new(Vec::new(), NodeKind::Dir),
        parts: Vec::new(),
        entries: Vec::new(),
    }];
    for ev in events {
        if saver.aborted() {
            return Err(Error::Aborted("backup aborted".into()));
        }
        match ev {
            Event::Enter(node) => {
                sum.dirs_total += 1;
                stack.push(DirBuilder {
                    node: *node,
                    parts: Vec::new(),
                    entries: Vec::new(),
                });
            }
            Event::Exit => {
                let dir = stack
                    .pop()
                    .ok_or_else(|| Error::Aborted("unbalanced walk".into()))?;
                let (node, _) = dir.finish(saver)?;
                stack
                    .last_mut()
                    .ok_or_else(|| Error::Aborted("unbalanced walk".into()))?
                    .push(saver, node)?;
            }
            Event::Error(e) => {
                warn!(path = %e.path, error = %e.error, "cannot read, skipped");
                saver.progress.errors.fetch_add(1, Ordering::Relaxed);
                sum.errors.push(e);
            }
            Event::Leaf(mut node, file) => {
                if let Some(file) = file {
                    let (pending, key, meta) = *file;
                    let path =
                        String::from_utf8_lossy(&key[ctx.source_key.len() + 1..]).into_owned();
                    let (content, fresh) = match pending {
                        Pending::Ready(c) => (Ok(c), false),
                        Pending::Waiting(rx) => (
                            rx.recv().unwrap_or_else(|_| Err("backup aborted".into())),
                            true,
                        ),
                    };
                    match content {
                        Ok(c) => {
                            if fresh {
                                if ctx.repo.index().get_file(&key)?.is_some() {
                                    sum.files_changed += 1;
                                } else {
                                    sum.files_new += 1;
                                }
                                sum.bytes_read += c.size;
                                if c.size == meta.len() {
                                    ctx.repo.index().put_file(&key, &cache_entry(&c, &meta))?;
                                }
                            } else {
                                sum.files_unmodified += 1;
                                saver.progress.files_done.fetch_add(1, Ordering::Relaxed);
                            }
                            node.size = c.size;
                            node.content = c.content;
                            node.indirect = c.indirect;
                            sum.files_total += 1;
                            sum.bytes_total += node.size;
                        }
                        Err(msg) => {
                            if saver.aborted() {
                                return Err(Error::Aborted("backup aborted".into()));
                            }
                            warn!(path = %path, error = %msg, "cannot read, skipped");
                            saver.progress.errors.fetch_add(1, Ordering::Relaxed);
                            sum.errors.push(SourceError { path, error: msg });
                            continue;
                        }
                    }
                }
                stack
                    .last_mut()
                    .ok_or_else(|| Error::Aborted("unbalanced walk".into()))?
                    .push(saver, *node)?;
            }
        }
    }
    if saver.aborted() {
        return Err(Error::Aborted("backup aborted".into()));
    }
    let root = stack
        .pop()
        .ok_or_else(|| Error::Aborted("unbalanced walk".into()))?;
    if !stack.is_empty() {
        return Err(Error::Aborted("walk ended inside a directory".into()));
    }
    let (_, parts) = root.finish(saver)?;
    Ok((parts, sum))
}

fn cache_entry(c: &FileContent, meta: &Metadata) -> FileCacheEntry {
    FileCacheEntry {
        size: c.size,
        mtime_ns: mtime_ns(meta),
        ctime_ns: ctime_ns(meta),
        inode: meta.ino(),
        indirect: c.indirect,
        content: c.content.iter().map(|i| i.0).collect(),
    }
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
