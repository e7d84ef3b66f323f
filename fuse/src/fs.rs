//! The read-only filesystem: an inode table over virtual directories
//! (`snapshots/`, `by-source/`, `by-tag/`) and snapshot trees.
//!
//! Inode numbers are handed out once per (parent, name) and never reused
//! while mounted, so they are stable for the life of the mount. A
//! directory's children are listed once and kept (trees are immutable);
//! the virtual directories are rebuilt from the snapshot list when it is
//! older than a short TTL, so new snapshots appear without remounting.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use marmoset_storage::{Id, Node, NodeKind, Repository, Snapshot};
use tracing::{error, warn};

use crate::cache::ChunkCache;

/// How long the kernel may cache attributes and entries of snapshot trees
/// (immutable) and of the virtual directories (refreshed on this TTL).
const TREE_TTL: Duration = Duration::from_secs(3600);
const VIRTUAL_TTL: Duration = Duration::from_secs(1);
/// The snapshot list is re-read at most this often.
const REFRESH_TTL: Duration = Duration::from_secs(2);
/// Chunks fetched ahead of a sequential reader.
const PREFETCH_CHUNKS: usize = 8;

#[derive(Clone)]
enum Kind {
    /// A directory made of named children computed from the snapshot list.
    Virtual(VirtualDir),
    /// A symlink of our own (`latest`).
    VirtualLink(Vec<u8>),
    /// A node of a snapshot tree (snapshot roots are dir nodes too).
    Tree(Arc<Node>),
}

#[derive(Clone, PartialEq, Eq)]
enum VirtualDir {
    Root,
    Snapshots,
    BySource,
    Source(String),
    ByTag,
    Tag(String),
}

/// A directory's children: (name, inode), sorted by name.
type Children = Arc<Vec<(Vec<u8>, u64)>>;
/// The cached snapshot list and when it was read.
type SnapshotCache = (Instant, Arc<Vec<(Id, Snapshot)>>);

struct Inode {
    parent: u64,
    name: Vec<u8>,
    kind: Kind,
    mtime: SystemTime,
    /// Sorted children (name → inode), listed on first use.
    children: Option<Children>,
    listed_at: Option<Instant>,
}

struct Table {
    inodes: Vec<Inode>,
    by_name: HashMap<(u64, Vec<u8>), u64>,
}

struct OpenFile {
    chunks: Vec<Id>,
    /// offsets[i] = byte offset where chunk i starts; last = file size.
    offsets: Vec<u64>,
    next_expected: AtomicU64,
    path: String,
}

pub struct MarmosetFs {
    repo: Arc<Repository>,
    cache: Arc<ChunkCache>,
    table: Mutex<Table>,
    snapshots: Mutex<SnapshotCache>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
    mount_time: SystemTime,
    uid: u32,
    gid: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Directory name of a source: `/` and `%` percent-encoded.
pub fn escape_source(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

fn snap_time_name(s: &Snapshot) -> String {
    s.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl MarmosetFs {
    pub fn new(repo: Arc<Repository>, cache_bytes: usize) -> Self {
        let cache = ChunkCache::new(repo.clone(), cache_bytes, 3);
        let now = SystemTime::now();
        let root = Inode {
            parent: 1,
            name: Vec::new(),
            kind: Kind::Virtual(VirtualDir::Root),
            mtime: now,
            children: None,
            listed_at: None,
        };
        Self {
            repo,
            cache,
            table: Mutex::new(Table {
                inodes: vec![root],
                by_name: HashMap::new(),
            }),
            snapshots: Mutex::new((Instant::now() - REFRESH_TTL * 2, Arc::new(Vec::new()))),
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            mount_time: now,
            uid: nix_uid(),
            gid: nix_gid(),
        }
    }

    fn snapshot_list(&self) -> Arc<Vec<(Id, Snapshot)>> {
        let mut g = lock(&self.snapshots);
        if g.0.elapsed() >= REFRESH_TTL {
            match self.repo.snapshots() {
                Ok((list, bad)) => {
                    // New snapshots' index files predate them: sync after
                    // listing so their trees and chunks resolve.
                    if let Err(e) = self.repo.sync_index() {
                        error!(error = %e, "cannot refresh the index");
                    }
                    for (name, e) in bad {
                        warn!(snapshot = %name, error = %e, "unreadable snapshot hidden");
                    }
                    *g = (Instant::now(), Arc::new(list));
                }
                Err(e) => error!(error = %e, "cannot list snapshots"),
            }
        }
        g.1.clone()
    }

    /// Returns the inode for (parent, name), creating it once.
    fn intern(
        &self,
        t: &mut Table,
        parent: u64,
        name: &[u8],
        kind: Kind,
        mtime: SystemTime,
    ) -> u64 {
        if let Some(&ino) = t.by_name.get(&(parent, name.to_vec())) {
            // Virtual entries may point elsewhere after a refresh (latest).
            if let Some(i) = t.inodes.get_mut(ino as usize - 1) {
                if matches!(i.kind, Kind::VirtualLink(_)) {
                    i.kind = kind;
                    i.mtime = mtime;
                }
            }
            return ino;
        }
        t.inodes.push(Inode {
            parent,
            name: name.to_vec(),
            kind,
            mtime,
            children: None,
            listed_at: None,
        });
        let ino = t.inodes.len() as u64;
        t.by_name.insert((parent, name.to_vec()), ino);
        ino
    }

    /// Children of a directory inode, listing them if needed.
    fn children(&self, ino: u64) -> Result<Children, Errno> {
        let (kind, cached) = {
            let t = lock(&self.table);
            let i = t.inodes.get(ino as usize - 1).ok_or(Errno::ENOENT)?;
            let fresh = match i.kind {
                Kind::Virtual(_) => i.listed_at.is_some_and(|at| at.elapsed() < REFRESH_TTL),
                _ => true,
            };
            (
                i.kind.clone(),
                if fresh { i.children.clone() } else { None },
            )
        };
        if let Some(c) = cached {
            return Ok(c);
        }
        let entries: Vec<(Vec<u8>, Kind, SystemTime)> = match &kind {
            Kind::Virtual(v) => self.virtual_entries(v),
            Kind::Tree(node) if node.kind == NodeKind::Dir => {
                let nodes = self.repo.dir_entries(node).map_err(|e| {
                    error!(error = %e, "directory listing unreadable");
                    Errno::EIO
                })?;
                nodes
                    .into_iter()
                    .filter(|n| n.has_safe_name())
                    .map(|n| {
                        let mtime = time_of(n.mtime_ns);
                        (n.name.clone(), Kind::Tree(Arc::new(n)), mtime)
                    })
                    .collect()
            }
            _ => return Err(Errno::ENOTDIR),
        };
        let mut t = lock(&self.table);
        let mut list = Vec::with_capacity(entries.len());
        for (name, k, mtime) in entries {
            let child = self.intern(&mut t, ino, &name, k, mtime);
            list.push((name, child));
        }
        list.sort_by(|a, b| a.0.cmp(&b.0));
        let list = Arc::new(list);
        if let Some(i) = t.inodes.get_mut(ino as usize - 1) {
            i.children = Some(list.clone());
            i.listed_at = Some(Instant::now());
        }
        Ok(list)
    }

    fn virtual_entries(&self, v: &VirtualDir) -> Vec<(Vec<u8>, Kind, SystemTime)> {
        let snaps = self.snapshot_list();
        let root_kind = |s: &Snapshot| Kind::Tree(Arc::new(self.repo.root_node(s)));
        let st = |s: &Snapshot| SystemTime::from(s.time);
        let vdir = |d: VirtualDir| (Kind::Virtual(d), self.mount_time);
        let mut out = Vec::new();
        match v {
            VirtualDir::Root => {
                for (name, d) in [
                    ("snapshots", VirtualDir::Snapshots),
                    ("by-source", VirtualDir::BySource),
                    ("by-tag", VirtualDir::ByTag),
                ] {
                    let (k, t) = vdir(d);
                    out.push((name.as_bytes().to_vec(), k, t));
                }
            }
            VirtualDir::Snapshots => {
                let mut count: HashMap<String, usize> = HashMap::new();
                for (id, _) in snaps.iter() {
                    *count.entry(id.short()).or_default() += 1;
                }
                for (id, s) in snaps.iter() {
                    let name = if count[&id.short()] > 1 {
                        id.to_hex()
                    } else {
                        id.short()
                    };
                    out.push((name.into_bytes(), root_kind(s), st(s)));
                }
            }
            VirtualDir::BySource => {
                let mut sources: BTreeMap<String, SystemTime> = BTreeMap::new();
                for (_, s) in snaps.iter() {
                    sources.insert(s.source.clone(), st(s));
                }
                for (src, t) in sources {
                    out.push((
                        escape_source(&src).into_bytes(),
                        Kind::Virtual(VirtualDir::Source(src)),
                        t,
                    ));
                }
            }
            VirtualDir::Source(src) => {
                let mine: Vec<&(Id, Snapshot)> =
                    snaps.iter().filter(|(_, s)| &s.source == src).collect();
                let mut names: HashMap<String, usize> = HashMap::new();
                for (_, s) in &mine {
                    *names.entry(snap_time_name(s)).or_default() += 1;
                }
                let mut latest = None;
                for (id, s) in &mine {
                    let base = snap_time_name(s);
                    let name = if names[&base] > 1 {
                        format!("{base}-{}", id.short())
                    } else {
                        base
                    };
                    latest = Some((name.clone(), st(s)));
                    out.push((name.into_bytes(), root_kind(s), st(s)));
                }
                if let Some((name, t)) = latest {
                    out.push((b"latest".to_vec(), Kind::VirtualLink(name.into_bytes()), t));
                }
            }
            VirtualDir::ByTag => {
                let mut tags: BTreeMap<String, SystemTime> = BTreeMap::new();
                for (_, s) in snaps.iter() {
                    for t in &s.tags {
                        tags.insert(t.clone(), st(s));
                    }
                }
                for (tag, t) in tags {
                    if !tag.is_empty() && !tag.contains('/') && tag != "." && tag != ".." {
                        out.push((
                            tag.clone().into_bytes(),
                            Kind::Virtual(VirtualDir::Tag(tag)),
                            t,
                        ));
                    }
                }
            }
            VirtualDir::Tag(tag) => {
                for (id, s) in snaps.iter().filter(|(_, s)| s.tags.contains(tag)) {
                    out.push((id.short().into_bytes(), root_kind(s), st(s)));
                }
            }
        }
        out
    }

    fn attr(&self, ino: u64) -> Result<(FileAttr, Duration), Errno> {
        let t = lock(&self.table);
        let i = t.inodes.get(ino as usize - 1).ok_or(Errno::ENOENT)?;
        let base = FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: i.mtime,
            mtime: i.mtime,
            ctime: i.mtime,
            crtime: i.mtime,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        Ok(match &i.kind {
            Kind::Virtual(_) => (base, VIRTUAL_TTL),
            Kind::VirtualLink(target) => (
                FileAttr {
                    kind: FileType::Symlink,
                    perm: 0o777,
                    nlink: 1,
                    size: target.len() as u64,
                    ..base
                },
                VIRTUAL_TTL,
            ),
            Kind::Tree(n) => {
                let kind = file_type(n.kind);
                let size = match n.kind {
                    NodeKind::File => n.size,
                    NodeKind::Symlink => n.link_target.as_ref().map_or(0, |t| t.len() as u64),
                    _ => 0,
                };
                (
                    FileAttr {
                        kind,
                        size,
                        blocks: size.div_ceil(512),
                        perm: (n.mode & 0o7777) as u16,
                        nlink: if n.kind == NodeKind::Dir {
                            2
                        } else {
                            n.links.max(1) as u32
                        },
                        uid: n.uid,
                        gid: n.gid,
                        rdev: n.rdev as u32,
                        ..base
                    },
                    TREE_TTL,
                )
            }
        })
    }

    fn tree_node(&self, ino: u64) -> Result<Arc<Node>, Errno> {
        let t = lock(&self.table);
        match t.inodes.get(ino as usize - 1).map(|i| &i.kind) {
            Some(Kind::Tree(n)) => Ok(n.clone()),
            Some(_) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn path_of(&self, ino: u64) -> String {
        let t = lock(&self.table);
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != 1 {
            let Some(i) = t.inodes.get(cur as usize - 1) else {
                break;
            };
            parts.push(String::from_utf8_lossy(&i.name).into_owned());
            cur = i.parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    fn read_range(&self, f: &OpenFile, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let file_size = *f.offsets.last().unwrap_or(&0);
        if offset >= file_size {
            return Ok(Vec::new());
        }
        let end = offset.saturating_add(u64::from(size)).min(file_size);
        // Binary search: the chunk containing `offset`.
        let mut i = f
            .offsets
            .partition_point(|&o| o <= offset)
            .saturating_sub(1);
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end && i < f.chunks.len() {
            let chunk = self.cache.get(&f.chunks[i]).map_err(|e| {
                error!(file = %f.path, blob = %f.chunks[i], error = %e, "read failed: damaged data");
                Errno::EIO
            })?;
            let start = (pos - f.offsets[i]) as usize;
            let stop = ((end - f.offsets[i]) as usize).min(chunk.len());
            if start >= stop {
                error!(file = %f.path, blob = %f.chunks[i], "chunk shorter than the index says");
                return Err(Errno::EIO);
            }
            out.extend_from_slice(&chunk[start..stop]);
            pos += (stop - start) as u64;
            i += 1;
        }
        // Sequential reader: fetch the next chunks in the background.
        if f.next_expected.swap(end, Ordering::Relaxed) == offset || offset == 0 {
            let upto = (i + PREFETCH_CHUNKS).min(f.chunks.len());
            if i < upto {
                self.cache.prefetch(&f.chunks[i..upto]);
            }
        }
        Ok(out)
    }
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Dir => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::Chardev => FileType::CharDevice,
        NodeKind::Blockdev => FileType::BlockDevice,
    }
}

fn nix_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn nix_gid() -> u32 {
    nix::unistd::getgid().as_raw()
}

impl Filesystem for MarmosetFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Larger kernel readahead and more background requests let the
        // kernel keep several reads in flight, which our prefetch serves.
        if let Err(max) = config.set_max_readahead(4 << 20) {
            let _ = config.set_max_readahead(max);
        }
        if let Err(max) = config.set_max_background(64) {
            let _ = config.set_max_background(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let children = match self.children(parent.0) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        let name = name.as_bytes();
        match children.binary_search_by(|(n, _)| n.as_slice().cmp(name)) {
            Ok(i) => match self.attr(children[i].1) {
                Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
                Err(e) => reply.error(e),
            },
            Err(_) => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let t = lock(&self.table);
        match t.inodes.get(ino.0 as usize - 1).map(|i| &i.kind) {
            Some(Kind::VirtualLink(target)) => reply.data(target),
            Some(Kind::Tree(n)) if n.kind == NodeKind::Symlink => {
                reply.data(n.link_target.as_deref().unwrap_or(&[]))
            }
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        match self.attr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & (libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC) != 0 {
            return reply.error(Errno::EROFS);
        }
        let node = match self.tree_node(ino.0) {
            Ok(n) if n.kind == NodeKind::File => n,
            Ok(_) => return reply.error(Errno::EINVAL),
            Err(e) => return reply.error(e),
        };
        let path = self.path_of(ino.0);
        let chunks = match self.repo.file_chunks(&node) {
            Ok(c) => c,
            Err(e) => {
                error!(file = %path, error = %e, "cannot open: chunk list unreadable");
                return reply.error(Errno::EIO);
            }
        };
        let mut offsets = Vec::with_capacity(chunks.len() + 1);
        let mut pos = 0u64;
        for c in &chunks {
            offsets.push(pos);
            match self.repo.blob_location(c) {
                Ok(loc) => pos += u64::from(loc.raw_length),
                Err(e) => {
                    error!(file = %path, blob = %c, error = %e, "cannot open: data missing");
                    return reply.error(Errno::EIO);
                }
            }
        }
        offsets.push(pos);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(
            fh,
            Arc::new(OpenFile {
                chunks,
                offsets,
                next_expected: AtomicU64::new(0),
                path,
            }),
        );
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = lock(&self.files).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        match self.read_range(&f, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.files).remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.attr(ino.0) {
            Ok((a, _)) if a.kind == FileType::Directory => {
                reply.opened(FileHandle(0), FopenFlags::empty())
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let children = match self.children(ino.0) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        let parent = lock(&self.table)
            .inodes
            .get(ino.0 as usize - 1)
            .map_or(1, |i| i.parent);
        let kinds: Vec<FileType> = {
            let t = lock(&self.table);
            children
                .iter()
                .skip((offset as usize).saturating_sub(2))
                .map(
                    |(_, c)| match t.inodes.get(*c as usize - 1).map(|i| &i.kind) {
                        Some(Kind::VirtualLink(_)) => FileType::Symlink,
                        Some(Kind::Tree(n)) => file_type(n.kind),
                        _ => FileType::Directory,
                    },
                )
                .collect()
        };
        let mut off = offset;
        if off == 0 {
            if reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            off = 1;
        }
        if off == 1 {
            if reply.add(INodeNo(parent), 2, FileType::Directory, "..") {
                return reply.ok();
            }
            off = 2;
        }
        let start = off as usize - 2;
        for (k, ((name, child), kind)) in children.iter().skip(start).zip(kinds).enumerate() {
            let next = (start + k + 3) as u64;
            if reply.add(INodeNo(*child), next, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value = match self.tree_node(ino.0) {
            Ok(n) => n
                .xattrs
                .iter()
                .find(|x| x.name == name.as_bytes())
                .map(|x| x.value.clone()),
            Err(_) => None,
        };
        match value {
            None => reply.error(Errno::NO_XATTR),
            Some(v) if size == 0 => reply.size(v.len() as u32),
            Some(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Some(v) => reply.data(&v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let mut list = Vec::new();
        if let Ok(n) = self.tree_node(ino.0) {
            for x in &n.xattrs {
                list.extend_from_slice(&x.name);
                list.push(0);
            }
        }
        if size == 0 {
            reply.size(list.len() as u32);
        } else if list.len() > size as usize {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(&list);
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            0,
            0,
            0,
            lock(&self.table).inodes.len() as u64,
            0,
            4096,
            255,
            4096,
        );
    }
}
