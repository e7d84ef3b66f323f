//! Restore: a snapshot (or a path in it) into a target directory.
//!
//! The walk (the tree walker, breadth first) creates directories, links,
//! special files and every regular file at its size, and records in a
//! plan (`plan`) every (file, offset) each blob must go to. The plan is
//! then fetched pack by pack (`fetch`): neighbouring blobs of a pack come
//! in one ranged read, packs in parallel, and each blob is downloaded,
//! authenticated (MAC and content id) and decompressed once, then written
//! to all of its destinations. All-zero chunks are left as holes. A file
//! whose blob fails verification or cannot be read is removed and
//! reported by name: restore never leaves a silently wrong file. Names
//! that could escape the target (`..`, `/`, duplicates) are refused.
//!
//! Over an existing directory (`existing`), `--overwrite if-changed` keeps
//! files whose size and mtime match and fetches only the chunks that
//! differ in the others (so an interrupted restore resumes), and
//! `--delete` removes what the snapshot does not have.
//!
//! Nothing below the target is reached through a path the kernel resolves
//! by itself: the target is opened once, and every directory below it is
//! made (`mkdirat`) and opened (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, or `openat(O_NOFOLLOW)` one component at a time on
//! kernels without it) from its parent's handle. Files, links and special
//! files are created and changed relative to that handle, so a symlink
//! already in the target, or swapped in during the restore, is refused and
//! never followed out of it. Directories are created `0700` and receive their
//! recorded mode only in the final pass, so an interrupted restore of a
//! private tree is never left readable by others.

mod existing;
mod fetch;
mod plan;

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use globset::{Glob, GlobSet, GlobSetBuilder};
use marmoset_index::BlobLocation;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;
use serde::Serialize;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::format::id::Id;
use crate::format::snapshot::{Snapshot, SourceError};
use crate::format::tree::{Node, NodeKind};
use crate::repo::walk::{Listing, Walker};
use crate::repo::Repository;
use crate::util::os_str;
pub use existing::Overwrite;
use fetch::{fetch_all, FetchStats, FileEntry};
use plan::{Dest, Plan};

/// Files, and blobs, planned before their data is fetched: about 1 KiB of
/// memory each, and within a batch every blob is read once, in pack order
/// (a restore in name order meets the packs of a backup in the same order,
/// so batches rarely share a pack).
const FILES_PER_BATCH: usize = 20_000;
const BLOBS_PER_BATCH: usize = 200_000;

/// What to restore, and how much of the snapshot's metadata to apply.
///
/// The default applies everything the snapshot recorded that the running
/// user is allowed to set. As root that is ownership, device files, fifos,
/// setuid/setgid/sticky bits and every extended attribute (`security.*`,
/// i.e. file capabilities and security labels, and `trusted.*` included):
/// what a full-system restore needs. As another user, ownership is left
/// alone and only `user.*` attributes are attempted.
///
/// A snapshot made by someone else (another tenant's volume, a repository
/// others can write to) can carry a setuid-root binary, a device node
/// giving access to a disk or to memory, or a file capability. Restored as
/// root, it should be restored with `no_owner`, `no_special` and `no_xattrs`
/// together: everything then belongs to root, no device file or fifo is
/// created, no set-id or sticky bit is set and no attribute is written.
/// Whatever the options, nothing is ever written outside the target.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Restore only paths matching one of these globs (or below them).
    pub includes: Vec<String>,
    pub excludes: Vec<String>,
    /// Packs fetched in parallel (default: the backend's connections for a
    /// remote repository, 2 × cores for a local one).
    pub threads: Option<usize>,
    /// Do not restore ownership, even as root: everything belongs to the
    /// user running the restore.
    pub no_owner: bool,
    /// Create no device files or fifos (they are listed in
    /// [`RestoreSummary::skipped`]), drop setuid, setgid and sticky bits
    /// from every mode, and restore no file capabilities
    /// (`security.capability`).
    pub no_special: bool,
    /// Restore no extended attributes at all.
    pub no_xattrs: bool,
    /// What to do with files already in the target.
    pub overwrite: Overwrite,
    /// Remove entries of restored directories that the snapshot does not
    /// have, so the target ends up exactly as backed up.
    pub delete: bool,
}

#[derive(Debug, Default)]
pub struct RestoreProgress {
    pub files_done: AtomicU64,
    pub bytes_written: AtomicU64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreSummary {
    /// Regular files of the snapshot restored: written, found already
    /// correct (`files_unchanged`) or failed (`files_failed`).
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub special: u64,
    pub bytes: u64,
    /// Files found already correct in the target (`--overwrite
    /// if-changed`): nothing downloaded for them.
    pub files_unchanged: u64,
    /// Existing files left as they were, unchecked (`--overwrite never`);
    /// not counted in `files`.
    pub files_kept: u64,
    /// Files (each name of a hard-linked one) not restored: damaged data
    /// or I/O errors, each also in `errors`.
    pub files_failed: u64,
    /// Entries removed by `--delete`.
    pub deleted: u64,
    /// Packs read, ranged reads made, bytes they returned and blobs
    /// fetched: each blob once, however many files share it.
    pub packs: u64,
    pub requests: u64,
    pub bytes_downloaded: u64,
    pub blobs_fetched: u64,
    pub duration_secs: f64,
    /// Files that could not be restored (damaged data, refused names, I/O).
    pub errors: Vec<SourceError>,
    /// Entries deliberately not created (fifos and device files with
    /// `no_special`). Not errors.
    pub skipped: Vec<SourceError>,
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

/// Which extended attributes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XattrPolicy {
    Skip,
    UserOnly,
    All,
}

/// The recorded metadata this restore applies, from the options and the
/// effective uid.
#[derive(Debug, Clone, Copy)]
struct MetaPolicy {
    chown: bool,
    xattrs: XattrPolicy,
    /// `no_special`: no fifos or device files.
    no_special: bool,
    /// Mode bits kept: set-id and sticky bits go with `no_special`.
    mode_mask: u32,
}

impl MetaPolicy {
    fn new(opts: &RestoreOptions, is_root: bool) -> Self {
        let xattrs = if opts.no_xattrs {
            XattrPolicy::Skip
        } else if is_root {
            XattrPolicy::All
        } else {
            // Other namespaces need privileges a user does not have.
            XattrPolicy::UserOnly
        };
        MetaPolicy {
            chown: is_root && !opts.no_owner,
            xattrs,
            no_special: opts.no_special,
            mode_mask: if opts.no_special { 0o777 } else { 0o7777 },
        }
    }

    fn mode(&self, node: &Node) -> u32 {
        node.mode & self.mode_mask
    }

    fn wants_xattr(&self, name: &[u8]) -> bool {
        // A file capability grants privileges as a set-id bit does.
        if self.no_special && name == b"security.capability" {
            return false;
        }
        match self.xattrs {
            XattrPolicy::Skip => false,
            XattrPolicy::UserOnly => name.starts_with(b"user."),
            XattrPolicy::All => true,
        }
    }
}

/// The restore target, opened once. Everything below it is reached from
/// this handle, never through a path resolved from `/`.
struct Beneath {
    root: OwnedFd,
    /// `openat2` works here (Linux ≥ 5.6 and not refused by seccomp).
    openat2: bool,
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Opens directory `path` below `dir`; fails rather than cross a symlink
/// or leave `dir`.
fn open_beneath<P: ?Sized + nix::NixPath>(dir: &OwnedFd, path: &P) -> nix::Result<OwnedFd> {
    use nix::fcntl::{OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(dir_flags())
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    nix::fcntl::openat2(dir, path, how)
}

impl Beneath {
    /// Creates the target if needed and opens it. The target itself is
    /// operator-given, so it is the one path resolved the ordinary way.
    fn open(target: &Path) -> Result<Beneath> {
        create_real_dir(target)?;
        let root = nix::fcntl::open(
            target,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(target, e.into()))?;
        // Probe once: old kernels lack openat2 and some seccomp profiles
        // refuse it. The per-component fallback is as safe, only slower.
        let openat2 = open_beneath(&root, ".").is_ok();
        Ok(Beneath { root, openat2 })
    }

    /// Opens directory `rel` (relative to the target). With `create`,
    /// missing directories are made `0700` one component at a time and
    /// pushed to `created`, outermost first.
    fn open_dir(
        &self,
        rel: &Path,
        create: bool,
        created: &mut Vec<PathBuf>,
    ) -> io::Result<OwnedFd> {
        if rel.as_os_str().is_empty() {
            return self.root.try_clone();
        }
        if self.openat2 {
            // Usually the directory, or at least its parent, exists: one or
            // two calls instead of two per component.
            if let Ok(fd) = open_beneath(&self.root, rel) {
                return Ok(fd);
            }
            if let (true, Some(parent), Some(name)) = (create, rel.parent(), rel.file_name()) {
                if !parent.as_os_str().is_empty() {
                    if let Ok(pfd) = open_beneath(&self.root, parent) {
                        return self.child(&pfd, name, rel, create, created);
                    }
                }
            }
        }
        // One component at a time; this also names the one in the way.
        let mut cur: Option<OwnedFd> = None;
        let mut sofar = PathBuf::new();
        for comp in rel.components() {
            let Component::Normal(name) = comp else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not a plain relative path", rel.display()),
                ));
            };
            sofar.push(name);
            let next = self.child(
                cur.as_ref().unwrap_or(&self.root),
                name,
                &sofar,
                create,
                created,
            )?;
            cur = Some(next);
        }
        cur.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty path"))
    }

    /// Makes (with `create`) and opens directory `name` in `dir`; `rel` is
    /// its path below the target, for `created` and for messages.
    fn child(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        rel: &Path,
        create: bool,
        created: &mut Vec<PathBuf>,
    ) -> io::Result<OwnedFd> {
        if create {
            match nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o700)) {
                Ok(()) => created.push(rel.to_path_buf()),
                // Fine if it is a real directory: the open below checks.
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(with_rel(rel, e)),
            }
        }
        let r = if self.openat2 {
            open_beneath(dir, name)
        } else {
            nix::fcntl::openat(dir, name, dir_flags(), Mode::empty())
        };
        r.map_err(|e| in_the_way(dir, name, rel, e))
    }
}

fn is_kind(st: &libc::stat, kind: libc::mode_t) -> bool {
    (st.st_mode & libc::S_IFMT) == kind
}

fn with_rel(rel: &Path, e: Errno) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{}: {e}", rel.display()))
}

/// A clear message when a directory open failed because something other
/// than a directory has the name.
fn in_the_way(dir: &OwnedFd, name: &OsStr, rel: &Path, e: Errno) -> io::Error {
    let what = match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if is_kind(&st, libc::S_IFLNK) => "a symlink is in the way: refusing to follow it",
        Ok(st) if !is_kind(&st, libc::S_IFDIR) => "a file that is not a directory is in the way",
        _ => return with_rel(rel, e),
    };
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{}: {what}", rel.display()),
    )
}

struct Shared<'r> {
    repo: &'r Repository,
    errors: Mutex<Vec<SourceError>>,
    progress: &'r RestoreProgress,
    bytes: AtomicU64,
    files_failed: AtomicU64,
    meta: MetaPolicy,
    fatal: AtomicBool,
    tree: Beneath,
    target: PathBuf,
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

    /// The full path of `rel`, for messages only.
    fn shown(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.target.clone()
        } else {
            self.target.join(rel)
        }
    }
}

/// A restored directory whose metadata is applied in the final pass.
struct DirMeta {
    rel: PathBuf,
    node: Node,
    /// Made only to reach a selected entry: it gets its recorded mode (so it
    /// is neither left `0700` nor more open than it was), not its owner.
    mode_only: bool,
}

/// Restores `subpath` of `snap` into `target`.
///
/// Two phases: the walk (breadth first, through the tree walker) creates
/// directories, links, special files and every regular file at its size,
/// and records in the plan which blob goes where; then the plan is fetched
/// pack by pack in parallel (see `fetch`). Directory metadata comes last.
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
    repo.prefetch_all_trees();
    let node = repo.find_node(snap, subpath)?;
    let tree = Beneath::open(target)?;
    // Remote: as many reads in flight as the backend has connections.
    let threads = opts
        .threads
        .unwrap_or_else(|| {
            if repo.backend().is_remote() {
                repo.backend().write_parallelism()
            } else {
                std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
            }
        })
        .max(1);
    let shared = Shared {
        repo,
        errors: Mutex::new(Vec::new()),
        progress,
        bytes: AtomicU64::new(0),
        files_failed: AtomicU64::new(0),
        meta: MetaPolicy::new(opts, nix::unistd::geteuid().is_root()),
        fatal: AtomicBool::new(false),
        tree,
        target: target.to_path_buf(),
    };
    let stats = FetchStats::default();
    let max_range = if repo.backend().is_remote() {
        crate::repo::reads::MAX_RANGE
    } else {
        crate::repo::reads::LOCAL_RANGE
    };
    let mut r = Restorer {
        shared: &shared,
        threads,
        max_range,
        stats: &stats,
        filter: &filter,
        opts,
        summary: RestoreSummary::default(),
        dirs: Vec::new(),
        hardlinks: HashMap::new(),
        cur: None,
        implicit: Vec::new(),
        unselected: HashMap::new(),
        plan: Plan::default(),
        files: Vec::new(),
        listing: None,
        keep: None,
    };
    let top = At {
        rel_dir: PathBuf::new(),
        rel: String::new(),
        selected: false,
    };
    if node.kind == NodeKind::Dir {
        let roots = r.children(&node, top);
        Walker::new(repo).run(roots, |listing| r.listing(listing))?;
        r.flush_delete();
    } else {
        let name = node.name_lossy();
        r.entry(node, Path::new(""), &name, false);
    }
    r.fetch_batch();
    let Restorer {
        mut summary,
        mut dirs,
        implicit,
        unselected,
        ..
    } = r;
    // Directories made only to reach selected entries get their recorded
    // mode (not their owner) too.
    for rel in implicit {
        if let Some(node) = unselected.get(&rel) {
            dirs.push(DirMeta {
                rel,
                node: node.clone(),
                mode_only: true,
            });
        }
    }
    // Directory metadata last, deepest first, so restoring entries inside
    // a read-only or unsearchable directory, or touching its mtime, cannot
    // undo it.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.rel.components().count()));
    for d in &dirs {
        if let Err(e) = apply_dir_meta(&shared.tree, d, shared.meta) {
            shared.error(&shared.shown(&d.rel), format!("metadata: {e}"));
        }
    }
    summary.bytes = shared.bytes.load(Ordering::Relaxed);
    summary.files_failed = shared.files_failed.load(Ordering::Relaxed);
    summary.packs = stats.packs.load(Ordering::Relaxed);
    summary.requests = stats.requests.load(Ordering::Relaxed);
    summary.bytes_downloaded = stats.bytes_downloaded.load(Ordering::Relaxed);
    summary.blobs_fetched = stats.blobs.load(Ordering::Relaxed);
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
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ),
        )),
        Err(_) => fs::create_dir_all(path).map_err(|e| Error::io(path, e)),
    }
}

/// Where a directory listing goes: its path below the target, the same
/// path as the include/exclude globs see it, and whether it is selected.
struct At {
    rel_dir: PathBuf,
    rel: String,
    selected: bool,
}

/// The first name of a hard-linked inode, for its later names.
#[derive(Clone)]
enum LinkSource {
    /// Complete (restored or verified): later names are linked to it.
    Ready(PathBuf),
    /// Its data is still to come (entry `usize` of the batch): later names
    /// are linked once it is complete, and left as they are if it fails.
    Pending(PathBuf, usize),
    /// It could not be restored (why): nor can the later names.
    Failed(String),
}

/// The walk of a restore: creates what has no data and plans the rest.
struct Restorer<'a, 'r> {
    shared: &'a Shared<'r>,
    /// Parallel reads, and the longest coalesced read.
    threads: usize,
    max_range: u64,
    stats: &'a FetchStats,
    filter: &'a Filter,
    opts: &'a RestoreOptions,
    summary: RestoreSummary,
    dirs: Vec<DirMeta>,
    /// Inode → where its later names come from: its first restored name.
    hardlinks: HashMap<u64, LinkSource>,
    /// The directory written into last: a listing's entries share it. Only
    /// this one handle is kept open, however large the tree.
    cur: Option<(PathBuf, Arc<OwnedFd>)>,
    /// Directories made only as parents of selected entries.
    implicit: Vec<PathBuf>,
    /// Walked directories that are not themselves selected (with
    /// includes), for the modes of those made as parents.
    unselected: HashMap<PathBuf, Node>,
    /// The files of the current batch and the blobs they need.
    plan: Plan,
    files: Vec<Arc<FileEntry>>,
    /// The directory of the last listing and the last name in it: a
    /// directory's listing parts come one after the other, in name order.
    listing: Option<(PathBuf, Vec<u8>)>,
    /// With `--delete`: the directory being listed and the names the
    /// snapshot has in it; extras are removed once its listing is done.
    keep: Option<(PathBuf, HashSet<OsString>)>,
}

impl Restorer<'_, '_> {
    /// The listings below directory `node` at `at`. An empty directory has
    /// none, so its extras are deleted right away.
    fn children(&mut self, node: &Node, at: At) -> Vec<(Id, At)> {
        if node.subtree.is_empty() && self.deletes(&at) {
            self.delete_in(&at.rel_dir, &HashSet::new());
        }
        node.subtree
            .iter()
            .map(|t| {
                (
                    *t,
                    At {
                        rel_dir: at.rel_dir.clone(),
                        rel: at.rel.clone(),
                        selected: at.selected,
                    },
                )
            })
            .collect()
    }

    fn deletes(&self, at: &At) -> bool {
        self.opts.delete && (at.selected || !self.filter.has_includes)
    }

    /// One directory listing (part) from the walker.
    fn listing(&mut self, l: Listing<At>) -> Result<Vec<(Id, At)>> {
        if self.shared.fatal.load(Ordering::Relaxed) {
            return Err(Error::Aborted("restore aborted".into()));
        }
        let at = l.at;
        let same_dir = matches!(&self.listing, Some((d, _)) if *d == at.rel_dir);
        if !same_dir {
            self.flush_delete();
            self.listing = Some((at.rel_dir.clone(), Vec::new()));
            if self.deletes(&at) {
                self.keep = Some((at.rel_dir.clone(), HashSet::new()));
            }
        }
        let tree = match l.tree {
            Ok(t) => t,
            Err(e) => {
                let path = self.shared.shown(&at.rel_dir);
                self.shared
                    .error(&path, format!("directory listing unreadable: {e}"));
                // Without the whole listing, nothing here may be deleted.
                self.keep = None;
                return Ok(Vec::new());
            }
        };
        let mut next = Vec::new();
        for node in tree.nodes {
            if let Some((_, prev)) = &mut self.listing {
                if !prev.is_empty() && *prev == node.name {
                    let path = self.shared.shown(&at.rel_dir).join(node.name_lossy());
                    self.shared.error(&path, "duplicate name in tree refused");
                    continue;
                }
                prev.clone_from(&node.name);
            }
            if let Some((_, keep)) = &mut self.keep {
                keep.insert(os_str(&node.name).to_os_string());
            }
            let child_rel = if at.rel.is_empty() {
                node.name_lossy()
            } else {
                format!("{}/{}", at.rel, node.name_lossy())
            };
            if let Some(children) = self.entry(node, &at.rel_dir, &child_rel, at.selected) {
                next.extend(children);
            }
        }
        Ok(next)
    }

    /// Removes the extras of the directory whose listing just ended.
    fn flush_delete(&mut self) {
        if let Some((dir, keep)) = self.keep.take() {
            self.delete_in(&dir, &keep);
        }
    }

    fn delete_in(&mut self, rel_dir: &Path, keep: &HashSet<OsString>) {
        // Names the excludes match are not this restore's to delete (as
        // with rsync's --delete).
        let filter = self.filter;
        let base = rel_dir.to_string_lossy().into_owned();
        let protected = |name: &OsStr| {
            let n = name.to_string_lossy();
            let rel = if base.is_empty() {
                n.into_owned()
            } else {
                format!("{base}/{n}")
            };
            filter.excluded(&rel)
        };
        let r = self
            .dir(rel_dir, false)
            .and_then(|d| existing::delete_extras(&d, keep, &protected));
        match r {
            Ok(n) => self.summary.deleted += n,
            Err(e) => self
                .shared
                .error(&self.shared.shown(rel_dir), format!("--delete: {e}")),
        }
    }

    /// One entry; a directory returns its listings to walk.
    fn entry(
        &mut self,
        node: Node,
        parent: &Path,
        rel: &str,
        selected: bool,
    ) -> Option<Vec<(Id, At)>> {
        if !node.has_safe_name() {
            let path = self.shared.shown(parent).join(node.name_lossy());
            self.shared
                .error(&path, "unsafe file name refused (path traversal)");
            return None;
        }
        if self.filter.excluded(rel) {
            return None;
        }
        let selected = selected || !self.filter.has_includes || self.filter.includes.is_match(rel);
        let rel_path = parent.join(os_str(&node.name));
        let path = self.shared.shown(&rel_path);
        if node.kind == NodeKind::Dir {
            return self.dir_entry(node, rel_path, &path, rel, selected);
        }
        if !selected {
            return None;
        }
        let dir = match self.dir(parent, false) {
            Ok(d) => d,
            Err(e) => {
                self.shared.error(&path, e.to_string());
                return None;
            }
        };
        let r = match node.kind {
            NodeKind::File => self.file(node, &dir, &rel_path, &path),
            _ => self.special(&node, &dir, &path),
        };
        if let Err(e) = r {
            self.shared.error(&path, e.to_string());
        }
        None
    }

    fn dir_entry(
        &mut self,
        node: Node,
        rel_path: PathBuf,
        path: &Path,
        rel: &str,
        selected: bool,
    ) -> Option<Vec<(Id, At)>> {
        if selected {
            if let Err(e) = self.dir(&rel_path, true) {
                self.shared.error(path, e.to_string());
                return None;
            }
            self.summary.dirs += 1;
        }
        let at = At {
            rel_dir: rel_path.clone(),
            rel: rel.to_string(),
            selected,
        };
        let children = self.children(&node, at);
        if selected {
            self.dirs.push(DirMeta {
                rel: rel_path,
                node,
                mode_only: false,
            });
        } else {
            self.unselected.insert(rel_path, node);
        }
        Some(children)
    }

    /// Handle of directory `rel` below the target, made (with its parents)
    /// if missing. `leaf_selected`: `rel` itself is a restored directory,
    /// not only a parent of one.
    fn dir(&mut self, rel: &Path, leaf_selected: bool) -> io::Result<Arc<OwnedFd>> {
        if let Some((p, fd)) = &self.cur {
            if p == rel {
                return Ok(fd.clone());
            }
        }
        let mut created = Vec::new();
        let r = self.shared.tree.open_dir(rel, true, &mut created);
        // Recorded even if a deeper component failed: what was made must
        // still get its mode in the final pass.
        for c in created {
            if !(leaf_selected && c.as_path() == rel) {
                self.implicit.push(c);
            }
        }
        let fd = Arc::new(r?);
        self.cur = Some((rel.to_path_buf(), fd.clone()));
        Ok(fd)
    }

    /// Symlinks, fifos and device files (sockets are not restored: they
    /// belong to a running process).
    fn special(&mut self, node: &Node, dir: &OwnedFd, path: &Path) -> io::Result<()> {
        let special = matches!(
            node.kind,
            NodeKind::Fifo | NodeKind::Chardev | NodeKind::Blockdev
        );
        if !special && node.kind != NodeKind::Symlink {
            return Ok(());
        }
        if special && self.shared.meta.no_special {
            self.summary.skipped.push(SourceError {
                path: path.display().to_string(),
                error: "fifo or device file not created (no-special)".into(),
            });
            return Ok(());
        }
        let name = os_str(&node.name);
        let exists = nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok();
        if exists && self.opts.overwrite == Overwrite::Never {
            return Ok(());
        }
        remove_existing(dir, name)?;
        // Created private; the recorded mode is set once the entry is known
        // to be what was created.
        let private = Mode::from_bits_truncate(0o600);
        match node.kind {
            NodeKind::Symlink => {
                let target = node.link_target.as_deref().unwrap_or_default();
                nix::unistd::symlinkat(os_str(target), dir, name)?;
                self.summary.links += 1;
            }
            NodeKind::Fifo => nix::unistd::mkfifoat(dir, name, private)?,
            NodeKind::Chardev => {
                nix::sys::stat::mknodat(dir, name, SFlag::S_IFCHR, private, node.rdev)?
            }
            _ => nix::sys::stat::mknodat(dir, name, SFlag::S_IFBLK, private, node.rdev)?,
        }
        if special {
            self.summary.special += 1;
        }
        apply_entry_meta(dir, name, node, self.shared.meta)
    }

    /// A regular file: created at its size (or, with `--overwrite`, the
    /// one there kept or updated in place) and its missing chunks planned.
    fn file(&mut self, node: Node, dir: &OwnedFd, rel: &Path, path: &Path) -> io::Result<()> {
        let name = os_str(&node.name);
        let exists = nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok();
        if exists && self.opts.overwrite == Overwrite::Never {
            self.summary.files_kept += 1;
            return Ok(());
        }
        self.summary.files += 1;
        let inode = (node.links > 1 && node.inode != 0).then_some(node.inode);
        let r = match inode.and_then(|i| self.hardlinks.get(&i).cloned()) {
            Some(source) => self.later_name(source, dir, name, rel, path),
            None => match self.first_name(node, dir, exists, rel, path) {
                Ok(source) => {
                    if let Some(i) = inode {
                        self.hardlinks.insert(i, source);
                    }
                    Ok(())
                }
                Err(e) => {
                    if let Some(i) = inode {
                        self.hardlinks.insert(i, LinkSource::Failed(e.to_string()));
                    }
                    Err(e)
                }
            },
        };
        if r.is_err() {
            self.shared.files_failed.fetch_add(1, Ordering::Relaxed);
        }
        if self.files.len() >= FILES_PER_BATCH || self.plan.len() >= BLOBS_PER_BATCH {
            self.fetch_batch();
        }
        r
    }

    /// A later name of a hard-linked inode: linked to the first name once
    /// that is complete. Whatever is at this name stays until then, so a
    /// correct file there is not lost if the first name fails.
    fn later_name(
        &mut self,
        source: LinkSource,
        dir: &OwnedFd,
        name: &OsStr,
        rel: &Path,
        path: &Path,
    ) -> io::Result<()> {
        match source {
            LinkSource::Ready(first) => {
                remove_existing(dir, name)?;
                self.link(&first, dir, name)
            }
            LinkSource::Pending(_, idx) => {
                if let Some(e) = self.files.get(idx) {
                    crate::util::lock(&e.links).push((rel.to_path_buf(), path.to_path_buf()));
                }
                Ok(())
            }
            LinkSource::Failed(why) => Err(io::Error::other(format!(
                "hard link to a file that could not be restored: {why}"
            ))),
        }
    }

    /// The first (or only) name of a file: kept, updated or created, and
    /// its missing chunks planned. Returns where later names of the same
    /// inode come from.
    fn first_name(
        &mut self,
        node: Node,
        dir: &OwnedFd,
        exists: bool,
        rel: &Path,
        path: &Path,
    ) -> io::Result<LinkSource> {
        let name = os_str(&node.name);
        let chunks = self.chunk_plan(&node)?;
        let size: u64 = chunks.iter().map(|(_, l)| u64::from(l.raw_length)).sum();
        let existing = match self.opts.overwrite {
            Overwrite::IfChanged if exists => existing::open_existing(dir, name, &node),
            _ => None,
        };
        let fresh = !existing.as_ref().is_some_and(|e| e.in_place);
        let (file, wanted) = match existing {
            Some(e)
                if e.in_place
                    && e.same_stat
                    && size == node.size
                    && e.trusted(&node, self.shared.meta.chown) =>
            {
                self.summary.files_unchanged += 1;
                self.finish_now(node, rel, path, e.file, e.dev, e.ino);
                return Ok(LinkSource::Ready(rel.to_path_buf()));
            }
            Some(e) if e.in_place => {
                let same =
                    existing::matching_chunks(&e.file, self.shared.repo.keys(), &chunks, None)?;
                e.file.set_len(size)?;
                let wanted: Vec<bool> = same.iter().map(|s| !s).collect();
                (e.file, wanted)
            }
            // Hard-linked (or not writable): a new file, with what the old
            // one already holds copied over. Its data stays reachable
            // through the handle (and the other names) meanwhile, and no
            // correct byte is downloaded again or lost to a damaged blob.
            Some(e) => {
                let file = create_fresh(dir, name, size)?;
                let same = existing::matching_chunks(
                    &e.file,
                    self.shared.repo.keys(),
                    &chunks,
                    Some(&file),
                )?;
                (file, same.iter().map(|s| !s).collect())
            }
            None => (create_fresh(dir, name, size)?, vec![true; chunks.len()]),
        };
        let st = nix::sys::stat::fstat(&file)?;
        let needed = wanted.iter().filter(|w| **w).count();
        if needed == 0 {
            if exists && self.opts.overwrite == Overwrite::IfChanged && !chunks.is_empty() {
                self.summary.files_unchanged += 1;
            }
            self.finish_now(node, rel, path, file, st.st_dev, st.st_ino);
            return Ok(LinkSource::Ready(rel.to_path_buf()));
        }
        // The fetchers reopen it; holding every file open would exhaust
        // the descriptors on a large tree.
        drop(file);
        let idx = self.files.len();
        let mut offset = 0;
        for ((id, loc), want) in chunks.into_iter().zip(wanted) {
            if want {
                self.plan.add(id, loc, Dest { file: idx, offset });
            }
            offset += u64::from(loc.raw_length);
        }
        self.files.push(Arc::new(FileEntry {
            path: path.to_owned(),
            rel: rel.to_owned(),
            node,
            dev: st.st_dev,
            ino: st.st_ino,
            fresh,
            remaining: AtomicUsize::new(needed),
            failed: Mutex::new(None),
            complete: AtomicBool::new(false),
            links: Mutex::new(Vec::new()),
        }));
        Ok(LinkSource::Pending(rel.to_path_buf(), idx))
    }

    /// Phase 2 for the files planned so far: their data, each blob fetched
    /// once in pack order. Done in batches so that memory does not grow
    /// with the number of files (a plan of every file of a snapshot took
    /// about 1 KiB per file: 1.1 GiB for a million small files).
    fn fetch_batch(&mut self) {
        let plan = std::mem::take(&mut self.plan);
        let files = std::mem::take(&mut self.files);
        if files.is_empty() {
            return;
        }
        fetch_all(
            self.shared,
            &files,
            plan.into_reads(self.max_range),
            self.threads,
            self.stats,
        );
        // Those files are complete (or removed as damaged): a later name
        // of one of them is linked right away, or fails, from now on.
        for source in self.hardlinks.values_mut() {
            if let LinkSource::Pending(first, idx) = source {
                *source = match files.get(*idx) {
                    Some(e) if e.complete.load(Ordering::Acquire) => {
                        LinkSource::Ready(std::mem::take(first))
                    }
                    _ => LinkSource::Failed(format!("{} was not restored", first.display())),
                };
            }
        }
    }

    /// A file with nothing to fetch: its metadata now.
    fn finish_now(&mut self, node: Node, rel: &Path, path: &Path, file: File, dev: u64, ino: u64) {
        let entry = FileEntry {
            path: path.to_owned(),
            rel: rel.to_owned(),
            node,
            dev,
            ino,
            fresh: false,
            remaining: AtomicUsize::new(0),
            failed: Mutex::new(None),
            complete: AtomicBool::new(false),
            links: Mutex::new(Vec::new()),
        };
        fetch::finish(self.shared, &entry, Some(file));
    }

    /// A file's chunk ids with their locations.
    fn chunk_plan(&self, node: &Node) -> io::Result<Vec<(Id, BlobLocation)>> {
        let repo = self.shared.repo;
        let chunks = repo
            .file_chunks(node)
            .map_err(|e| io::Error::other(e.to_string()))?;
        chunks
            .into_iter()
            .map(|id| {
                let loc = repo
                    .blob_location(&id)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                Ok((id, loc))
            })
            .collect()
    }

    /// Hard link `name` in `dir` to `first` (a path below the target),
    /// whose directory is reached again from the target handle.
    fn link(&self, first: &Path, dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
        let first_dir = match (&self.cur, first.parent()) {
            (Some((p, fd)), Some(parent)) if p == parent => Some(fd.clone()),
            _ => None,
        };
        link_beneath(&self.shared.tree, first, first_dir.as_deref(), dir, name)
    }
}

/// Hard links `name` in `dir` to `first` (below the target), reaching its
/// directory from the target handle unless given. Flags 0: a first name
/// swapped for a symlink is linked as the symlink itself, never followed.
fn link_beneath(
    tree: &Beneath,
    first: &Path,
    first_dir: Option<&OwnedFd>,
    dir: &OwnedFd,
    name: &OsStr,
) -> io::Result<()> {
    let (Some(parent), Some(first_name)) = (first.parent(), first.file_name()) else {
        return Err(io::Error::other("hard link source has no name"));
    };
    let opened;
    let first_dir = match first_dir {
        Some(d) => d,
        None => {
            opened = tree.open_dir(parent, false, &mut Vec::new())?;
            &opened
        }
    };
    nix::unistd::linkat(first_dir, first_name, dir, name, AtFlags::empty())?;
    Ok(())
}

/// Replaces `rel` (below the target) with a hard link to the open `file`,
/// made through its `/proc/self/fd` link so it is that very inode.
fn relink(tree: &Beneath, file: &File, rel: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Err(io::Error::other("hard link has no name"));
    };
    let dir = tree.open_dir(parent, false, &mut Vec::new())?;
    remove_existing(&dir, name)?;
    let source = format!("/proc/self/fd/{}", file.as_raw_fd());
    // An absolute source: its directory handle is not used.
    nix::unistd::linkat(
        &dir,
        source.as_str(),
        &dir,
        name,
        AtFlags::AT_SYMLINK_FOLLOW,
    )?;
    Ok(())
}

/// Replaces whatever non-directory is at `name` in `dir` with a new empty
/// file of `size` bytes, private until its metadata is applied.
fn create_fresh(dir: &OwnedFd, name: &OsStr, size: u64) -> io::Result<File> {
    remove_existing(dir, name)?;
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    let file = File::from(fd);
    file.set_len(size)?;
    Ok(file)
}

/// Makes room for a new entry `name` in `dir`: anything but a directory is
/// unlinked (a symlink is removed, not followed).
fn remove_existing(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if is_kind(&st, libc::S_IFDIR) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a directory is in the way",
        )),
        Ok(_) => Ok(nix::unistd::unlinkat(
            dir,
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )?),
        Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes `rel` (a file below the target) by name in its directory.
fn remove_entry(tree: &Beneath, rel: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Ok(());
    };
    let dir = tree.open_dir(parent, false, &mut Vec::new())?;
    nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)?;
    Ok(())
}

fn mtime(node: &Node) -> SystemTime {
    if node.mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(node.mtime_ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(node.mtime_ns.unsigned_abs())
    }
}

fn timespec(ns: i64) -> TimeSpec {
    const NS: i64 = 1_000_000_000;
    TimeSpec::new(ns.div_euclid(NS) as libc::time_t, ns.rem_euclid(NS) as _)
}

/// Metadata through an open handle (regular files, and directories in the
/// final pass): owner first, since chown clears set-id bits.
fn apply_fd_meta(
    file: &File,
    node: &Node,
    meta: MetaPolicy,
    times: fs::FileTimes,
) -> io::Result<()> {
    use xattr::FileExt as _;
    if meta.chown {
        std::os::unix::fs::fchown(file, Some(node.uid), Some(node.gid))?;
    }
    for x in node.xattrs.iter().filter(|x| meta.wants_xattr(&x.name)) {
        // Best effort: the target filesystem may not support the namespace.
        if let Err(e) = file.set_xattr(os_str(&x.name), &x.value) {
            debug!(name = %String::from_utf8_lossy(&x.name), error = %e, "xattr not restored");
        }
    }
    file.set_permissions(fs::Permissions::from_mode(meta.mode(node)))?;
    file.set_times(times)
}

/// Final metadata of a directory, re-opened below the target by its path
/// (no handle is kept per directory during the walk).
fn apply_dir_meta(tree: &Beneath, d: &DirMeta, meta: MetaPolicy) -> io::Result<()> {
    let dir = File::from(tree.open_dir(&d.rel, false, &mut Vec::new())?);
    if d.mode_only {
        return dir.set_permissions(fs::Permissions::from_mode(meta.mode(&d.node)));
    }
    let t = mtime(&d.node);
    let times = fs::FileTimes::new().set_accessed(t).set_modified(t);
    apply_fd_meta(&dir, &d.node, meta, times)
}

/// Metadata of a symlink, fifo or device file, by its name in `dir`:
/// nothing here follows a symlink or opens the entry for I/O (which would
/// block on a fifo or start a device).
fn apply_entry_meta(dir: &OwnedFd, name: &OsStr, node: &Node, meta: MetaPolicy) -> io::Result<()> {
    use nix::unistd::{Gid, Uid};
    if meta.chown {
        nix::unistd::fchownat(
            dir,
            name,
            Some(Uid::from_raw(node.uid)),
            Some(Gid::from_raw(node.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
    }
    if node.kind != NodeKind::Symlink {
        set_mode_by_handle(dir, name, node, meta)?;
    }
    let t = timespec(node.mtime_ns);
    nix::sys::stat::utimensat(
        dir,
        name,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

/// Xattrs and mode of a fifo or device file through an `O_PATH` handle
/// whose type is checked first, so an entry swapped meanwhile (for a
/// symlink to a host file, say) is left alone. `fchmod` refuses `O_PATH`
/// handles; `/proc/self/fd/N` reaches exactly the inode the handle holds.
fn set_mode_by_handle(
    dir: &OwnedFd,
    name: &OsStr,
    node: &Node,
    meta: MetaPolicy,
) -> io::Result<()> {
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let st = nix::sys::stat::fstat(&fd)?;
    if !is_kind(&st, file_type(node.kind)) {
        return Err(io::Error::other(
            "replaced by another kind of file during the restore: left alone",
        ));
    }
    let handle = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    for x in node.xattrs.iter().filter(|x| meta.wants_xattr(&x.name)) {
        if let Err(e) = xattr::set_deref(&handle, os_str(&x.name), &x.value) {
            debug!(name = %String::from_utf8_lossy(&x.name), error = %e, "xattr not restored");
        }
    }
    fs::set_permissions(&handle, fs::Permissions::from_mode(meta.mode(node)))
        .map_err(|e| io::Error::new(e.kind(), format!("mode via {}: {e}", handle.display())))
}

fn file_type(kind: NodeKind) -> libc::mode_t {
    match kind {
        NodeKind::File => libc::S_IFREG,
        NodeKind::Dir => libc::S_IFDIR,
        NodeKind::Symlink => libc::S_IFLNK,
        NodeKind::Fifo => libc::S_IFIFO,
        NodeKind::Socket => libc::S_IFSOCK,
        NodeKind::Chardev => libc::S_IFCHR,
        NodeKind::Blockdev => libc::S_IFBLK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A scratch directory with `target` and `outside` in it.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let d = std::env::temp_dir().join(format!(
                "marmoset-restore-{tag}-{}-{}",
                std::process::id(),
                Id::random().short()
            ));
            fs::create_dir_all(d.join("target")).unwrap();
            fs::create_dir_all(d.join("outside")).unwrap();
            Scratch(d)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn both_ways(target: &Path) -> Vec<Beneath> {
        let with = Beneath::open(target).unwrap();
        let without = Beneath::open(target).unwrap();
        vec![
            with,
            Beneath {
                openat2: false,
                ..without
            },
        ]
    }

    #[test]
    fn directories_are_created_private_one_component_at_a_time() {
        let s = Scratch::new("private");
        for (i, tree) in both_ways(&s.0.join("target")).into_iter().enumerate() {
            let rel = PathBuf::from(format!("a{i}/b/c"));
            let mut created = Vec::new();
            tree.open_dir(&rel, true, &mut created).unwrap();
            assert_eq!(
                created,
                vec![
                    PathBuf::from(format!("a{i}")),
                    PathBuf::from(format!("a{i}/b")),
                    rel.clone()
                ]
            );
            for c in &created {
                let m = fs::symlink_metadata(s.0.join("target").join(c)).unwrap();
                assert!(m.is_dir());
                assert_eq!(m.mode() & 0o7777, 0o700, "{}", c.display());
            }
            // Existing directories are opened, not made again.
            let mut again = Vec::new();
            tree.open_dir(&rel, true, &mut again).unwrap();
            assert!(again.is_empty());
        }
    }

    #[test]
    fn a_symlink_in_the_way_is_refused_not_followed() {
        let s = Scratch::new("symlink");
        let outside = s.0.join("outside");
        std::os::unix::fs::symlink(&outside, s.0.join("target/docs")).unwrap();
        fs::write(s.0.join("target/file"), b"x").unwrap();
        for tree in both_ways(&s.0.join("target")) {
            let mut created = Vec::new();
            let e = tree
                .open_dir(Path::new("docs/sub"), true, &mut created)
                .unwrap_err();
            assert!(e.to_string().contains("symlink is in the way"), "{e}");
            let e = tree
                .open_dir(Path::new("file/sub"), true, &mut created)
                .unwrap_err();
            assert!(e.to_string().contains("not a directory"), "{e}");
            assert!(created.is_empty());
            assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        }
    }

    #[test]
    fn existing_symlink_is_replaced_not_followed() {
        let s = Scratch::new("replace");
        let victim = s.0.join("outside/victim");
        fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, s.0.join("target/f")).unwrap();
        let tree = Beneath::open(&s.0.join("target")).unwrap();
        remove_existing(&tree.root, OsStr::new("f")).unwrap();
        assert!(fs::symlink_metadata(s.0.join("target/f")).is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn policy_follows_the_options() {
        let mut o = RestoreOptions::default();
        let root = MetaPolicy::new(&o, true);
        assert!(root.chown && root.wants_xattr(b"security.capability"));
        let user = MetaPolicy::new(&o, false);
        assert!(!user.chown && user.wants_xattr(b"user.a") && !user.wants_xattr(b"trusted.a"));
        o.no_owner = true;
        o.no_special = true;
        o.no_xattrs = true;
        let safe = MetaPolicy::new(&o, true);
        assert!(!safe.chown && safe.no_special && !safe.wants_xattr(b"user.a"));
        let mut n = Node::new(b"x".to_vec(), NodeKind::File);
        n.mode = 0o4755;
        assert_eq!(safe.mode(&n), 0o755);
        assert_eq!(root.mode(&n), 0o4755);
        // A file capability is a privilege like a set-id bit.
        let o = RestoreOptions {
            no_special: true,
            ..Default::default()
        };
        let special = MetaPolicy::new(&o, true);
        assert!(!special.wants_xattr(b"security.capability"));
        assert!(special.wants_xattr(b"security.selinux") && special.wants_xattr(b"user.a"));
    }
}
