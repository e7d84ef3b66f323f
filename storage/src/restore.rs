//! Restore: a snapshot (or a path in it) into a target directory.
//!
//! The walk creates directories, links and special files and turns every
//! regular file into chunk tasks (file, offset, blob). A bounded pool of
//! workers reads each blob, authenticates it (MAC and content id) and writes
//! it at its offset, so one huge file and many small ones both use every
//! worker. All-zero chunks are left as holes. A file whose blob fails
//! verification is removed and reported by name: restore never leaves a
//! silently wrong file. Names that could escape the target (`..`, `/`,
//! duplicates) are refused, and no path is followed through a symlink.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver};
use globset::{Glob, GlobSet, GlobSetBuilder};
use marmoset_index::BlobLocation;
use serde::Serialize;
use tracing::warn;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::Repository;
use crate::snapshot::{Snapshot, SourceError};
use crate::tree::{Node, NodeKind};

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Restore only paths matching one of these globs (or below them).
    pub includes: Vec<String>,
    pub excludes: Vec<String>,
    /// Parallel blob readers (default: 2 × cores, at least 4).
    pub threads: Option<usize>,
}

#[derive(Debug, Default)]
pub struct RestoreProgress {
    pub files_done: AtomicU64,
    pub bytes_written: AtomicU64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub special: u64,
    pub bytes: u64,
    pub duration_secs: f64,
    /// Files that could not be restored (damaged data, refused names, I/O).
    pub errors: Vec<SourceError>,
}

struct Filter {
    includes: GlobSet,
    excludes: GlobSet,
    has_includes: bool,
}

fn globset(patterns: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(
            Glob::new(p.trim_start_matches('/'))
                .map_err(|e| Error::InvalidArgument(format!("pattern {p:?}: {e}")))?,
        );
    }
    b.build().map_err(|e| Error::InvalidArgument(e.to_string()))
}

impl Filter {
    fn excluded(&self, rel: &str) -> bool {
        self.excludes.is_match(rel)
            || rel
                .rsplit('/')
                .next()
                .is_some_and(|n| self.excludes.is_match(n))
    }
}

/// One regular file being restored; finalized when its last chunk lands.
struct FileState {
    file: File,
    path: PathBuf,
    node: Node,
    remaining: AtomicUsize,
    failed: Mutex<Option<String>>,
}

struct Task {
    file: std::sync::Arc<FileState>,
    offset: u64,
    id: Id,
    loc: BlobLocation,
}

struct Shared<'r> {
    repo: &'r Repository,
    errors: Mutex<Vec<SourceError>>,
    progress: &'r RestoreProgress,
    bytes: AtomicU64,
    is_root: bool,
    fatal: AtomicBool,
}

impl Shared<'_> {
    fn error(&self, path: &Path, msg: impl Into<String>) {
        let msg = msg.into();
        warn!(path = %path.display(), error = %msg, "not restored");
        crate::util::lock(&self.errors).push(SourceError {
            path: path.display().to_string(),
            error: msg,
        });
    }
}

/// Restores `subpath` of `snap` into `target`.
pub fn restore(
    repo: &Repository,
    snap: &Snapshot,
    subpath: &str,
    target: &Path,
    opts: &RestoreOptions,
    progress: &RestoreProgress,
) -> Result<RestoreSummary> {
    let start = Instant::now();
    let filter = Filter {
        includes: globset(&opts.includes)?,
        excludes: globset(&opts.excludes)?,
        has_includes: !opts.includes.is_empty(),
    };
    let node = repo.find_node(snap, subpath)?;
    create_real_dir(target)?;
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()) * 2)
        .max(4);
    let shared = Shared {
        repo,
        errors: Mutex::new(Vec::new()),
        progress,
        bytes: AtomicU64::new(0),
        is_root: nix::unistd::geteuid().is_root(),
        fatal: AtomicBool::new(false),
    };
    let mut summary = RestoreSummary::default();
    let mut dirs: Vec<(PathBuf, Node)> = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = bounded::<Task>(threads * 16);
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                let shared = &shared;
                s.spawn(move || worker(shared, rx))
            })
            .collect();
        drop(rx);
        let mut walker = Walker {
            shared: &shared,
            filter: &filter,
            tx,
            summary: &mut summary,
            dirs: &mut dirs,
            hardlinks: HashMap::new(),
        };
        let r = if node.kind == NodeKind::Dir {
            walker.dir_contents(&node, target, "", false)
        } else {
            let name = node.name_lossy();
            walker.entry(node, target, &name, false)
        };
        drop(walker);
        for w in workers {
            let _ = w.join();
        }
        r
    })?;
    // Directory metadata last, deepest first, so restoring files inside a
    // read-only directory or touching its mtime cannot undo it.
    for (path, node) in dirs.iter().rev() {
        if let Err(e) = apply_meta(&path.clone(), node, shared.is_root) {
            shared.error(path, format!("metadata: {e}"));
        }
    }
    summary.bytes = shared.bytes.load(Ordering::Relaxed);
    summary.errors = shared
        .errors
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    summary.duration_secs = start.elapsed().as_secs_f64();
    Ok(summary)
}

fn create_real_dir(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ),
        )),
        Err(_) => fs::create_dir_all(path).map_err(|e| Error::io(path, e)),
    }
}

struct Walker<'a, 'r> {
    shared: &'a Shared<'r>,
    filter: &'a Filter,
    tx: crossbeam_channel::Sender<Task>,
    summary: &'a mut RestoreSummary,
    dirs: &'a mut Vec<(PathBuf, Node)>,
    hardlinks: HashMap<u64, PathBuf>,
}

impl Walker<'_, '_> {
    fn dir_contents(&mut self, dir: &Node, path: &Path, rel: &str, selected: bool) -> Result<()> {
        let mut prev: Option<Vec<u8>> = None;
        for part in &dir.subtree {
            let tree = match self.shared.repo.load_tree(part) {
                Ok(t) => t,
                Err(e) => {
                    self.shared
                        .error(path, format!("directory listing unreadable: {e}"));
                    continue;
                }
            };
            for node in tree.nodes {
                if prev.as_ref() == Some(&node.name) {
                    self.shared.error(
                        &path.join(node.name_lossy()),
                        "duplicate name in tree refused",
                    );
                    continue;
                }
                prev = Some(node.name.clone());
                let child_rel = if rel.is_empty() {
                    node.name_lossy()
                } else {
                    format!("{rel}/{}", node.name_lossy())
                };
                self.entry(node, path, &child_rel, selected)?;
            }
        }
        Ok(())
    }

    fn entry(&mut self, node: Node, parent: &Path, rel: &str, selected: bool) -> Result<()> {
        if self.shared.fatal.load(Ordering::Relaxed) {
            return Err(Error::Aborted("restore aborted".into()));
        }
        if !node.has_safe_name() {
            self.shared.error(
                &parent.join(node.name_lossy()),
                "unsafe file name refused (path traversal)",
            );
            return Ok(());
        }
        if self.filter.excluded(rel) {
            return Ok(());
        }
        let selected = selected || !self.filter.has_includes || self.filter.includes.is_match(rel);
        let path = parent.join(crate::util::os_str(&node.name));
        if node.kind == NodeKind::Dir {
            if selected {
                if let Err(e) = create_real_dir(&path) {
                    self.shared.error(&path, e.to_string());
                    return Ok(());
                }
                self.summary.dirs += 1;
            }
            self.dir_contents(&node, &path, rel, selected)?;
            if selected {
                self.dirs.push((path, node));
            }
            return Ok(());
        }
        if !selected {
            return Ok(());
        }
        if let Err(e) = create_real_dir(parent) {
            self.shared.error(&path, e.to_string());
            return Ok(());
        }
        let r = match node.kind {
            NodeKind::File => self.file(node, &path),
            _ => self.special(&node, &path),
        };
        if let Err(e) = r {
            self.shared.error(&path, e.to_string());
        }
        Ok(())
    }

    fn special(&mut self, node: &Node, path: &Path) -> std::io::Result<()> {
        remove_existing(path)?;
        match node.kind {
            NodeKind::Symlink => {
                let target = node.link_target.clone().unwrap_or_default();
                std::os::unix::fs::symlink(crate::util::os_str(&target), path)?;
                self.summary.links += 1;
            }
            NodeKind::Fifo => {
                nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(node.mode))
                    .map_err(std::io::Error::from)?;
                self.summary.special += 1;
            }
            NodeKind::Chardev | NodeKind::Blockdev => {
                let kind = if node.kind == NodeKind::Chardev {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                nix::sys::stat::mknod(
                    path,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(node.mode),
                    node.rdev,
                )
                .map_err(std::io::Error::from)?;
                self.summary.special += 1;
            }
            // Sockets belong to a running process; there is nothing to restore.
            NodeKind::Socket => return Ok(()),
            NodeKind::File | NodeKind::Dir => return Ok(()),
        }
        apply_meta(path, node, self.shared.is_root)
    }

    fn file(&mut self, node: Node, path: &Path) -> std::io::Result<()> {
        if node.links > 1 && node.inode != 0 {
            if let Some(first) = self.hardlinks.get(&node.inode) {
                remove_existing(path)?;
                fs::hard_link(first, path)?;
                self.summary.files += 1;
                return Ok(());
            }
            self.hardlinks.insert(node.inode, path.to_owned());
        }
        let chunks = self
            .shared
            .repo
            .file_chunks(&node)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut locs = Vec::with_capacity(chunks.len());
        let mut size = 0u64;
        for id in &chunks {
            let loc = self
                .shared
                .repo
                .blob_location(id)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            size += u64::from(loc.raw_length);
            locs.push(loc);
        }
        remove_existing(path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(path)?;
        file.set_len(size)?;
        self.summary.files += 1;
        let state = std::sync::Arc::new(FileState {
            file,
            path: path.to_owned(),
            node,
            remaining: AtomicUsize::new(chunks.len()),
            failed: Mutex::new(None),
        });
        if chunks.is_empty() {
            finish_file(self.shared, &state);
            return Ok(());
        }
        let mut offset = 0;
        for (id, loc) in chunks.into_iter().zip(locs) {
            let raw = u64::from(loc.raw_length);
            self.tx
                .send(Task {
                    file: state.clone(),
                    offset,
                    id,
                    loc,
                })
                .map_err(|_| std::io::Error::other("restore workers stopped"))?;
            offset += raw;
        }
        Ok(())
    }
}

fn remove_existing(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a directory is in the way",
        )),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    }
}

fn worker(shared: &Shared, rx: Receiver<Task>) {
    for task in rx {
        let already_failed = crate::util::lock(&task.file.failed).is_some();
        if !already_failed {
            if let Err(e) = write_chunk(shared, &task) {
                let mut f = crate::util::lock(&task.file.failed);
                if f.is_none() {
                    *f = Some(e);
                }
            }
        }
        if task.file.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            finish_file(shared, &task.file);
        }
    }
}

fn write_chunk(shared: &Shared, task: &Task) -> std::result::Result<(), String> {
    let data = shared
        .repo
        .load_blob_at(&task.id, &task.loc)
        .map_err(|e| e.to_string())?;
    // Holes stay holes: set_len already made the file zero, so zero runs
    // (in 64 KiB blocks) are skipped and sparse files stay sparse.
    const BLOCK: usize = 64 << 10;
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + BLOCK).min(data.len());
        // Extend over consecutive non-zero blocks to keep writes large.
        let mut stop = pos;
        while stop < data.len() {
            let e = (stop + BLOCK).min(data.len());
            if data[stop..e].iter().all(|&b| b == 0) {
                break;
            }
            stop = e;
        }
        if stop > pos {
            task.file
                .file
                .write_all_at(&data[pos..stop], task.offset + pos as u64)
                .map_err(|e| format!("write: {e}"))?;
            pos = stop;
        } else {
            pos = end;
        }
    }
    shared.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
    shared
        .progress
        .bytes_written
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    Ok(())
}

fn finish_file(shared: &Shared, state: &FileState) {
    shared.progress.files_done.fetch_add(1, Ordering::Relaxed);
    let failed = crate::util::lock(&state.failed).take();
    if let Some(msg) = failed {
        // Never leave a silently wrong file behind.
        let _ = fs::remove_file(&state.path);
        shared.error(&state.path, format!("damaged data, file removed: {msg}"));
        return;
    }
    if let Err(e) = apply_file_meta(&state.file, &state.node, shared.is_root) {
        shared.error(&state.path, format!("metadata: {e}"));
    }
}

fn mtime(node: &Node) -> SystemTime {
    if node.mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(node.mtime_ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(node.mtime_ns.unsigned_abs())
    }
}

fn apply_file_meta(file: &File, node: &Node, is_root: bool) -> std::io::Result<()> {
    if is_root {
        std::os::unix::fs::fchown(file, Some(node.uid), Some(node.gid))?;
    }
    for x in &node.xattrs {
        let _ = xattr_set_fd(file, x);
    }
    file.set_permissions(fs::Permissions::from_mode(node.mode))?;
    file.set_times(fs::FileTimes::new().set_modified(mtime(node)))?;
    Ok(())
}

fn xattr_set_fd(file: &File, x: &crate::tree::Xattr) -> std::io::Result<()> {
    use xattr::FileExt as _;
    file.set_xattr(crate::util::os_str(&x.name), &x.value)
}

fn apply_meta(path: &Path, node: &Node, is_root: bool) -> std::io::Result<()> {
    if is_root {
        std::os::unix::fs::lchown(path, Some(node.uid), Some(node.gid))?;
    }
    // utimensat(AT_SYMLINK_NOFOLLOW): never opens the path, which would
    // block on a fifo or follow a link.
    let t = filetime::FileTime::from_system_time(mtime(node));
    if node.kind == NodeKind::Symlink {
        return filetime::set_symlink_file_times(path, t, t);
    }
    for x in &node.xattrs {
        if let Err(e) = xattr::set(path, crate::util::os_str(&x.name), &x.value) {
            warn!(path = %path.display(), error = %e, "xattr not restored");
        }
    }
    fs::set_permissions(path, fs::Permissions::from_mode(node.mode))?;
    filetime::set_symlink_file_times(path, t, t)
}
