//! `marmoset-index`: the local RocksDB index cache of a marmoset repository.
//!
//! What it owns: a key/value cache, one directory per repository, that maps
//! content ids to blob locations, remembers which repository index files were
//! already loaded, and keeps the *file cache* (path → size/mtime/ctime/inode
//! and the file's chunk ids) that lets an incremental backup skip reading
//! unchanged files.
//!
//! What it must not know: the bytes of packs, encryption, or the repository's
//! object layout. Everything here is a *cache*: deleting the directory is
//! always safe, the storage engine rebuilds it from the repository's index
//! files (or from pack trailers). Values are small fixed-layout records so a
//! lookup costs one RocksDB point read and no allocation beyond the value.
//!
//! One handle at a time per directory: `open` holds an `flock` on
//! `marmoset.lock` inside it, so a second opener (another process, or this
//! one) gets [`IndexError::Locked`] and the storage engine works from a
//! private temporary cache (so does RocksDB's own lock held by a process
//! that predates the `flock`). Any other failure to open means the cache is
//! damaged: `open` destroys it and recreates it empty at the same path.
//!
//! Damage RocksDB only notices when it reads a block (a checksum mismatch in
//! an `.sst` data block) surfaces later, on a query: that query fails with
//! [`IndexError::Damaged`] and leaves a marker file, `marmoset.damaged`, in
//! the directory; the next `open` that holds the lock finds the marker and
//! rebuilds the cache exactly as for damage found while opening.
//!
//! Design trade-off: RocksDB keeps memory bounded for repositories with
//! millions of blobs (an in-memory hash map would need ~100 bytes per blob),
//! at the price of a C++ dependency and a directory per repository.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamilyDescriptor, Options, WriteBatch, DB,
};

/// Errors of the index cache. The cache can always be rebuilt, so callers
/// usually react by logging and starting from an empty cache.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index cache at {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("index cache at {path} is locked by another marmoset process")]
    Locked { path: PathBuf },
    #[error("index cache at {path}: malformed {what} record")]
    Malformed { path: PathBuf, what: &'static str },
    #[error("index cache at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// RocksDB reported corruption while reading or writing an open cache
    /// (a block checksum mismatch, for instance). The cache has been marked
    /// damaged; the next [`IndexCache::open`] rebuilds it empty.
    #[error(
        "local index cache at {path} is damaged ({detail}); it is rebuilt from the \
         repository on the next run (or remove it)"
    )]
    Damaged { path: PathBuf, detail: String },
}

pub type Result<T> = std::result::Result<T, IndexError>;

/// A 32-byte content, pack or file id as raw bytes.
pub type RawId = [u8; 32];

/// Where one blob lives: which pack, at which byte range, how it is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: RawId,
    pub offset: u64,
    pub length: u32,
    pub raw_length: u32,
    pub kind: u8,
    pub flags: u8,
}

impl BlobLocation {
    const LEN: usize = 32 + 8 + 4 + 4 + 1 + 1;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..32].copy_from_slice(&self.pack);
        out[32..40].copy_from_slice(&self.offset.to_le_bytes());
        out[40..44].copy_from_slice(&self.length.to_le_bytes());
        out[44..48].copy_from_slice(&self.raw_length.to_le_bytes());
        out[48] = self.kind;
        out[49] = self.flags;
        out
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN {
            return None;
        }
        Some(Self {
            pack: b[..32].try_into().ok()?,
            offset: u64::from_le_bytes(b[32..40].try_into().ok()?),
            length: u32::from_le_bytes(b[40..44].try_into().ok()?),
            raw_length: u32::from_le_bytes(b[44..48].try_into().ok()?),
            kind: b[48],
            flags: b[49],
        })
    }
}

/// Bytes RocksDB holds in memory ([`IndexCache::memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexMemory {
    pub memtables: u64,
    pub block_cache: u64,
    pub block_cache_pinned: u64,
    pub table_readers: u64,
}

/// What the file cache remembers about one source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCacheEntry {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
    /// `true` when `content` lists chunk-list blobs rather than chunks.
    pub indirect: bool,
    pub content: Vec<RawId>,
}

impl FileCacheEntry {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(33 + 32 * self.content.len());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mtime_ns.to_le_bytes());
        out.extend_from_slice(&self.ctime_ns.to_le_bytes());
        out.extend_from_slice(&self.inode.to_le_bytes());
        out.push(u8::from(self.indirect));
        for id in &self.content {
            out.extend_from_slice(id);
        }
        out
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < 33 || !(b.len() - 33).is_multiple_of(32) {
            return None;
        }
        let u = |r: std::ops::Range<usize>| -> Option<[u8; 8]> { b[r].try_into().ok() };
        let content = b[33..]
            .chunks_exact(32)
            .map(|c| c.try_into().ok())
            .collect::<Option<Vec<RawId>>>()?;
        Some(Self {
            size: u64::from_le_bytes(u(0..8)?),
            mtime_ns: i64::from_le_bytes(u(8..16)?),
            ctime_ns: i64::from_le_bytes(u(16..24)?),
            inode: u64::from_le_bytes(u(24..32)?),
            indirect: b[32] != 0,
            content,
        })
    }
}

const CF_BLOBS: &str = "blobs";
const CF_FILES: &str = "files";
const CF_LOADED: &str = "loaded_index_files";
const CF_PACKS: &str = "packs";
const CF_UNCOMMITTED: &str = "uncommitted_packs";
/// `marmoset copy`: which blob of another repository became which blob of
/// this one (key: that repository's id, then its blob id; value: our id).
const CF_COPIES: &str = "copy_map";
const ALL_CFS: [&str; 6] = [
    CF_BLOBS,
    CF_FILES,
    CF_LOADED,
    CF_PACKS,
    CF_UNCOMMITTED,
    CF_COPIES,
];

/// Creates `path` (and missing parents) with mode `0700`, and tightens an
/// existing one made by older versions: the cache holds plaintext source
/// paths, sizes and times, which other local users must not read.
fn create_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |source| IndexError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io)?;
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// The file inside the cache directory that marmoset `flock`s for as long
/// as a handle is open. RocksDB ignores files it does not know, and keeping
/// it inside the directory means removing the directory removes it too.
const LOCK_FILE: &str = "marmoset.lock";

/// The file a handle leaves in the cache directory when RocksDB reports
/// corruption on a read or write (see [`IndexCache::open`]). It holds the
/// error message, which becomes [`IndexCache::rebuilt`]'s reason.
const DAMAGED_MARKER: &str = "marmoset.damaged";

/// Marks the cache at `dir` damaged, best effort: if the marker cannot be
/// written, the query that found the damage still fails with
/// [`IndexError::Damaged`] and the next one finds it again.
fn mark_damaged(dir: &Path, detail: &str) {
    let _ = std::fs::write(dir.join(DAMAGED_MARKER), detail);
}

/// Why an earlier handle marked the cache at `dir` damaged, or `None` when
/// it is not marked.
fn damage_marker(dir: &Path) -> Option<String> {
    match std::fs::read(dir.join(DAMAGED_MARKER)) {
        Ok(detail) if detail.is_empty() => Some("marked damaged by an earlier run".to_string()),
        Ok(detail) => Some(format!(
            "marked damaged by an earlier run: {}",
            String::from_utf8_lossy(&detail).trim()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        // Present but unreadable: still a marker.
        Err(e) => Some(format!("marked damaged by an earlier run ({e})")),
    }
}

/// Removes the marker once the cache has been destroyed. A marker that
/// cannot be removed is an error: it would rebuild the cache on every run.
fn clear_damage_marker(dir: &Path) -> Result<()> {
    let marker = dir.join(DAMAGED_MARKER);
    match std::fs::remove_file(&marker) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(IndexError::Io {
            path: marker,
            source,
        }),
    }
}

/// What a failed RocksDB open means for the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenFailure {
    /// RocksDB's own `LOCK` file is held: a process that does not take our
    /// `flock` (a marmoset from before it did) has the database open. Its
    /// files must not be touched.
    Busy,
    /// Anything else: the cache is damaged (corruption, checksum mismatch,
    /// bad `CURRENT` or manifest, missing files) and is rebuilt empty.
    Damaged,
}

/// Classifies a RocksDB open error by its kind and by the one file a lock
/// conflict names, never by words that damage reports can contain too
/// ("block checksum mismatch" contains "lock"; so can any path).
///
/// RocksDB reports a held lock as an `IOError` naming `<db>/LOCK`
/// ("While lock file: <db>/LOCK: ..." or "lock hold by current process
/// ...: <db>/LOCK: ..."). Failing to open that file at all is classified
/// the same way: the harmless side, as "busy" only costs a private cache.
fn classify_open_error(kind: rocksdb::ErrorKind, message: &str, db: &Path) -> OpenFailure {
    let rocksdb_lock = format!("{}/LOCK:", db.display());
    if kind == rocksdb::ErrorKind::IOError && message.contains(rocksdb_lock.as_str()) {
        OpenFailure::Busy
    } else {
        OpenFailure::Damaged
    }
}

/// Holds the cache directory's `flock` (exclusive, non-blocking).
/// `Ok(None)` when the file system does not support `flock`: RocksDB's own
/// lock still keeps a second process out, and [`classify_open_error`]
/// still tells that apart from damage.
fn take_lock(dir: &Path) -> Result<Option<Flock<File>>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| IndexError::Io {
            path: path.clone(),
            source,
        })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, errno)) if errno == Errno::EWOULDBLOCK => Err(IndexError::Locked {
            path: dir.to_owned(),
        }),
        Err(_) => Ok(None),
    }
}

/// Memtables of all column families together: the file cache takes a put
/// per file, and with RocksDB's default 64 MiB per family (two of them
/// each) a backup of millions of small files grew by hundreds of MiB.
/// A backup of 100 000 files already fills about 8 MiB of memtables: a
/// cap of 16 MiB let 2 000 000 files peak 3 MiB higher.
const WRITE_BUFFERS_TOTAL: usize = 8 << 20;

/// One family's memtable: the file cache and the blob entries are the
/// two that fill, so two of them (one flushing) fit the total.
const WRITE_BUFFER: usize = 2 << 20;

/// Block cache shared by every column family, index and filter blocks
/// included. Left to its defaults RocksDB gives each family a 32 MiB cache
/// and keeps every table's index and filter blocks outside any cache, so
/// memory grew with the number of blobs and files indexed. Nothing is
/// pinned in it, so it never outgrows this size: a backup of 100 000 files
/// uses under 1 MiB of it and one of 2 000 000 all of it.
const BLOCK_CACHE: usize = 4 << 20;

/// Table files kept open (each holds a reader and a descriptor): a file
/// cache of tens of millions of files has thousands of tables.
const MAX_OPEN_FILES: i32 = 512;

/// Blob entries written to the cache in one batch.
const BLOBS_PER_BATCH: usize = 16_384;

fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_db_write_buffer_size(WRITE_BUFFERS_TOTAL);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(2);
    opts.set_max_open_files(MAX_OPEN_FILES);
    opts
}

/// Bounded memory in every column family: a small memtable, and tables
/// read through the one shared cache. The bloom filter spares most misses
/// (new chunks, new files) a read of a data block.
fn cf_options(cache: &Cache) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_bloom_filter(10.0, false);
    // Index and filter in 4 KiB partitions under a small pinned top level.
    // Whole, a table's index and filter grow with its keys (about 2 MiB
    // for a 64 MiB table of a million files): past a few such tables they
    // no longer fit the cache, and every lookup evicted and read again
    // megabytes. A backup of 1 M unchanged files took 80 times as long as
    // one of 100 k.
    table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_partition_filters(true);
    table.set_metadata_block_size(4096);
    // Pinned blocks stay in the cache whatever its size: one top level per
    // table file, and a file cache written in path order makes many small
    // tables (each flush is moved down as is), so pinned memory grew with
    // the number of files backed up (5 MiB at 2 000 000 files).
    table.set_pin_top_level_index_and_filter(false);
    let mut opts = Options::default();
    opts.set_write_buffer_size(WRITE_BUFFER);
    opts.set_max_write_buffer_number(2);
    // Small levels: blob ids are random, so every flush overlaps all of
    // level 1, and a level 1 of RocksDB's default 256 MiB was rewritten
    // whole every few memtables (a 2 000 000-file backup wrote its blob
    // entries about 15 times). Levels growing tenfold from 32 MiB, in
    // 8 MiB files, rewrite each entry about once per level instead.
    opts.set_level_zero_file_num_compaction_trigger(8);
    opts.set_max_bytes_for_level_base(32 << 20);
    opts.set_target_file_size_base(8 << 20);
    opts.set_block_based_table_factory(&table);
    opts
}

fn open_db(opts: &Options, path: &Path) -> std::result::Result<DB, rocksdb::Error> {
    let cache = Cache::new_lru_cache(BLOCK_CACHE)?;
    let cfs = ALL_CFS
        .into_iter()
        .map(|n| ColumnFamilyDescriptor::new(n, cf_options(&cache)));
    DB::open_cf_descriptors(opts, path, cfs)
}

/// `Locked` when the error is RocksDB's lock held by someone else, `Db`
/// (damaged) otherwise.
fn open_error(path: &Path, source: rocksdb::Error) -> IndexError {
    let failure = classify_open_error(source.kind(), source.as_ref(), path);
    match failure {
        OpenFailure::Busy => IndexError::Locked {
            path: path.to_owned(),
        },
        OpenFailure::Damaged => IndexError::Db {
            path: path.to_owned(),
            source,
        },
    }
}

/// The RocksDB-backed cache for one repository.
pub struct IndexCache {
    // Field order matters: the database closes before the lock is released.
    db: DB,
    path: PathBuf,
    rebuilt: Option<String>,
    _lock: Option<Flock<File>>,
}

impl IndexCache {
    /// Opens (or creates) the cache directory `path`, private to its owner.
    ///
    /// Fails with [`IndexError::Locked`] only when another handle (in this
    /// or another process, or an older marmoset holding RocksDB's lock) has
    /// the cache open; callers then work from a private cache. A damaged
    /// cache is destroyed and recreated empty here, at the same path
    /// ([`IndexCache::rebuilt`] says why), and the caller refills it from
    /// the repository as it would a new one. So is a cache that an earlier
    /// handle marked damaged ([`IndexError::Damaged`]).
    pub fn open(path: &Path) -> Result<Self> {
        create_private_dir(path)?;
        // From here on no other marmoset handle has the cache open (or the
        // file system has no `flock`, and RocksDB's lock, which `destroy`
        // takes too, still keeps a live database's files safe).
        let lock = take_lock(path)?;
        let opts = db_options();
        let damage = match damage_marker(path) {
            Some(why) => why,
            None => match open_db(&opts, path).map_err(|e| open_error(path, e)) {
                Ok(db) => {
                    return Ok(Self {
                        db,
                        path: path.to_owned(),
                        rebuilt: None,
                        _lock: lock,
                    })
                }
                Err(IndexError::Db { source, .. }) => source.into_string(),
                Err(e) => return Err(e),
            },
        };
        // Damaged. `destroy` takes RocksDB's lock first, so it never
        // deletes files under a live database (a busy one is `Locked`, and
        // its marker stays for the next open).
        DB::destroy(&opts, path).map_err(|e| open_error(path, e))?;
        clear_damage_marker(path)?;
        let db = open_db(&opts, path).map_err(|e| open_error(path, e))?;
        Ok(Self {
            db,
            path: path.to_owned(),
            rebuilt: Some(damage),
            _lock: lock,
        })
    }

    /// Why [`IndexCache::open`] found the cache damaged and recreated it
    /// empty, or `None` when it opened the existing cache as it was.
    pub fn rebuilt(&self) -> Option<&str> {
        self.rebuilt.as_deref()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Maps every RocksDB error of an open cache (reads, writes,
    /// iterators, flushes). Corruption found here is not fixed by retrying:
    /// the cache is marked damaged so the next `open` rebuilds it.
    fn err(&self, source: rocksdb::Error) -> IndexError {
        if source.kind() == rocksdb::ErrorKind::Corruption {
            let detail = source.into_string();
            mark_damaged(&self.path, &detail);
            IndexError::Damaged {
                path: self.path.clone(),
                detail,
            }
        } else {
            IndexError::Db {
                path: self.path.clone(),
                source,
            }
        }
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| IndexError::Malformed {
                path: self.path.clone(),
                what: "column family",
            })
    }

    /// Looks up a blob's location.
    pub fn get_blob(&self, id: &RawId) -> Result<Option<BlobLocation>> {
        let cf = self.cf(CF_BLOBS)?;
        match self.db.get_pinned_cf(cf, id).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(v) => BlobLocation::decode(&v)
                .map(Some)
                .ok_or_else(|| IndexError::Malformed {
                    path: self.path.clone(),
                    what: "blob location",
                }),
        }
    }

    pub fn contains_blob(&self, id: &RawId) -> Result<bool> {
        Ok(self.get_blob(id)?.is_some())
    }

    /// Inserts blob locations in one atomic batch. With `committed`, their
    /// packs are recorded as listed by a repository index file, so
    /// `packs()` answers "which packs does the repository index know";
    /// blobs of packs written but not yet indexed are usable for dedup
    /// without being counted as committed.
    pub fn insert_blobs(&self, blobs: &[(RawId, BlobLocation)], committed: bool) -> Result<()> {
        let cf_b = self.cf(CF_BLOBS)?;
        let cf_p = self.cf(CF_PACKS)?;
        let cf_u = self.cf(CF_UNCOMMITTED)?;
        // In bounded batches: one batch lands in one memtable whatever its
        // size, so a million entries at once held hundreds of MiB.
        for part in blobs.chunks(BLOBS_PER_BATCH) {
            let mut batch = WriteBatch::default();
            let mut packs: Vec<RawId> = Vec::new();
            for (id, loc) in part {
                batch.put_cf(cf_b, id, loc.encode());
                // Once per pack, not per blob (blobs come grouped by pack;
                // a pack seen twice is only written twice).
                if packs.last() != Some(&loc.pack) {
                    packs.push(loc.pack);
                }
            }
            for pack in &packs {
                if committed {
                    batch.put_cf(cf_p, pack, []);
                    batch.delete_cf(cf_u, pack);
                } else {
                    batch.put_cf(cf_u, pack, []);
                }
            }
            self.db.write(batch).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Every pack listed by a loaded repository index file.
    pub fn packs(&self) -> Result<Vec<RawId>> {
        self.id_keys(CF_PACKS)
    }

    /// Packs whose blobs are cached but that no loaded index file lists yet
    /// (written by a backup on this machine that has not indexed them).
    pub fn uncommitted_packs(&self) -> Result<Vec<RawId>> {
        self.id_keys(CF_UNCOMMITTED)
    }

    /// Whether `pack`'s blobs are cached without an index file listing it.
    pub fn is_uncommitted(&self, pack: &RawId) -> Result<bool> {
        let cf = self.cf(CF_UNCOMMITTED)?;
        self.db
            .get_pinned_cf(cf, pack)
            .map(|v| v.is_some())
            .map_err(|e| self.err(e))
    }

    /// All 32-byte keys of a column family.
    fn id_keys(&self, name: &str) -> Result<Vec<RawId>> {
        let cf = self.cf(name)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            if let Ok(id) = <RawId>::try_from(&k[..]) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Iterates every cached blob location (for check and maintenance).
    pub fn for_each_blob(&self, mut f: impl FnMut(RawId, BlobLocation)) -> Result<()> {
        let cf = self.cf(CF_BLOBS)?;
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let (Ok(id), Some(loc)) = (<RawId>::try_from(&k[..]), BlobLocation::decode(&v)) else {
                return Err(IndexError::Malformed {
                    path: self.path.clone(),
                    what: "blob location",
                });
            };
            f(id, loc);
        }
        Ok(())
    }

    /// Names of repository index files whose entries are in the cache.
    pub fn loaded_index_files(&self) -> Result<Vec<String>> {
        let cf = self.cf(CF_LOADED)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            out.push(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(out)
    }

    pub fn mark_index_file_loaded(&self, name: &str) -> Result<()> {
        let cf = self.cf(CF_LOADED)?;
        self.db.put_cf(cf, name, []).map_err(|e| self.err(e))
    }

    /// Drops every blob, pack and loaded-file record, keeping the file cache
    /// (whose entries are validated against the blob index before use).
    pub fn clear_blobs(&self) -> Result<()> {
        // Range deletion: constant memory however many blobs are cached.
        // Every key is shorter than 4 KiB, so [empty, 0xff * 4096) is all.
        let end = vec![0xffu8; 4096];
        for name in [CF_BLOBS, CF_PACKS, CF_LOADED, CF_UNCOMMITTED] {
            let cf = self.cf(name)?;
            self.db
                .delete_range_cf(cf, &[][..], &end[..])
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    pub fn get_file(&self, key: &[u8]) -> Result<Option<FileCacheEntry>> {
        let cf = self.cf(CF_FILES)?;
        match self.db.get_pinned_cf(cf, key).map_err(|e| self.err(e))? {
            None => Ok(None),
            // A malformed entry only costs a re-read of the file.
            Some(v) => Ok(FileCacheEntry::decode(&v)),
        }
    }

    pub fn put_file(&self, key: &[u8], entry: &FileCacheEntry) -> Result<()> {
        let cf = self.cf(CF_FILES)?;
        self.db
            .put_cf(cf, key, entry.encode())
            .map_err(|e| self.err(e))
    }

    /// The blob of this repository that another repository's blob was
    /// copied to (`key`: that repository's id, then the blob's id there).
    /// A hint: the caller checks the index still holds the answer.
    pub fn get_copy(&self, key: &[u8; 64]) -> Result<Option<RawId>> {
        let cf = self.cf(CF_COPIES)?;
        Ok(self
            .db
            .get_pinned_cf(cf, key)
            .map_err(|e| self.err(e))?
            .and_then(|v| <RawId>::try_from(&v[..]).ok()))
    }

    /// Records copied blobs (see [`IndexCache::get_copy`]) in one batch.
    pub fn put_copies(&self, pairs: &[([u8; 64], RawId)]) -> Result<()> {
        let cf = self.cf(CF_COPIES)?;
        let mut batch = WriteBatch::default();
        for (k, v) in pairs {
            batch.put_cf(cf, k, v);
        }
        self.db.write(batch).map_err(|e| self.err(e))
    }

    /// What RocksDB holds in memory now, for debug logs: memtables of all
    /// families, the shared block cache (and what is pinned in it), and
    /// table readers kept outside the cache.
    pub fn memory(&self) -> IndexMemory {
        // A property's value in each family.
        let per_family = |name: &str| -> Vec<u64> {
            ALL_CFS
                .into_iter()
                .filter_map(|cf| self.cf(cf).ok())
                .filter_map(|cf| self.db.property_int_value_cf(cf, name).ok().flatten())
                .collect()
        };
        let sum = |name: &str| per_family(name).into_iter().sum();
        let max = |name: &str| per_family(name).into_iter().max().unwrap_or(0);
        IndexMemory {
            memtables: sum("rocksdb.size-all-mem-tables"),
            table_readers: sum("rocksdb.estimate-table-readers-mem"),
            // One cache is shared by the families (the default family
            // has a cache of its own, unused).
            block_cache: max("rocksdb.block-cache-usage"),
            block_cache_pinned: max("rocksdb.block-cache-pinned-usage"),
        }
    }

    /// Flushes memtables so a crash after this call keeps the cache warm.
    pub fn flush(&self) -> Result<()> {
        for name in ALL_CFS {
            let cf = self.cf(name)?;
            self.db.flush_cf(cf).map_err(|e| self.err(e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(n: u8) -> BlobLocation {
        BlobLocation {
            pack: [n; 32],
            offset: u64::from(n) * 1000,
            length: 77,
            raw_length: 99,
            kind: 1,
            flags: 1,
        }
    }

    #[test]
    fn cache_directory_is_made_private() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mrm-idx-mode-{}", std::process::id()));
        let io = |source| IndexError::Io {
            path: dir.clone(),
            source,
        };
        let _ = std::fs::remove_dir_all(&dir);
        // As an older version left it: readable by everyone.
        std::fs::create_dir_all(&dir).map_err(io)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        drop(IndexCache::open(&dir)?);
        let mode = std::fs::metadata(&dir).map_err(io)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let fresh = dir.join("sub").join("repo");
        drop(IndexCache::open(&fresh)?);
        let mode = std::fs::metadata(&fresh).map_err(io)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// RocksDB's memory stays within the cache's bounds however many blobs
    /// and files it holds: memtables within their total, the block cache
    /// within its size with nothing pinned (pinned blocks would outgrow it).
    #[test]
    fn memory_stays_within_its_bounds_as_the_cache_grows() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mrm-idx-mem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = IndexCache::open(&dir)?;
        // Random-looking ids, as content ids are (splitmix64).
        let id = |i: u64, salt: u8| -> RawId {
            let mut x = i.wrapping_mul(2).wrapping_add(u64::from(salt));
            let mut out = [0u8; 32];
            for part in out.chunks_mut(8) {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                part.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
            }
            out
        };
        let mut worst = IndexMemory::default();
        for round in 0..30u64 {
            let blobs: Vec<_> = (0..10_000)
                .map(|i| (id(round * 10_000 + i, 0), loc((i % 200) as u8)))
                .collect();
            c.insert_blobs(&blobs, true)?;
            for i in 0..10_000 {
                let n = round * 10_000 + i;
                let entry = FileCacheEntry {
                    size: n,
                    mtime_ns: 1,
                    ctime_ns: 2,
                    inode: n,
                    indirect: false,
                    content: vec![id(n, 0)],
                };
                c.put_file(
                    format!("src\0d{:04}/f{:04}", n / 1000, n % 1000).as_bytes(),
                    &entry,
                )?;
            }
            // Lookups fill the block cache: hits and misses, random keys.
            for i in (0..round * 10_000).step_by(97) {
                assert!(c.get_blob(&id(i, 0))?.is_some());
                assert!(c.get_blob(&id(i, 1))?.is_none());
            }
            let m = c.memory();
            worst.memtables = worst.memtables.max(m.memtables);
            worst.block_cache = worst.block_cache.max(m.block_cache);
            worst.block_cache_pinned = worst.block_cache_pinned.max(m.block_cache_pinned);
        }
        // Memtables are allocated in arena blocks: a little over the total.
        assert!(
            worst.memtables <= (WRITE_BUFFERS_TOTAL + (2 << 20)) as u64,
            "{worst:?}"
        );
        assert!(
            worst.block_cache <= BLOCK_CACHE as u64 * 21 / 20,
            "{worst:?}"
        );
        assert!(
            worst.block_cache > BLOCK_CACHE as u64 / 2,
            "the cache was used: {worst:?}"
        );
        assert!(worst.block_cache_pinned < 256 << 10, "{worst:?}");
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn the_copy_map_survives_reopen_and_clearing_the_blobs() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mrm-idx-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut key = [7u8; 64];
        {
            let c = IndexCache::open(&dir)?;
            c.put_copies(&[(key, [9; 32])])?;
            c.clear_blobs()?;
        }
        let c = IndexCache::open(&dir)?;
        assert_eq!(c.get_copy(&key)?, Some([9; 32]));
        key[0] = 8;
        assert_eq!(c.get_copy(&key)?, None, "another source repository");
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn blobs_round_trip_and_survive_reopen() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mrm-idx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let c = IndexCache::open(&dir)?;
            c.insert_blobs(&[([1; 32], loc(1)), ([2; 32], loc(2))], true)?;
            c.insert_blobs(&[([4; 32], loc(4))], false)?;
            c.mark_index_file_loaded("abc")?;
            assert_eq!(c.get_blob(&[1; 32])?, Some(loc(1)));
            assert_eq!(c.get_blob(&[3; 32])?, None);
        }
        let c = IndexCache::open(&dir)?;
        assert_eq!(c.get_blob(&[2; 32])?, Some(loc(2)));
        let mut packs = c.packs()?;
        packs.sort();
        assert_eq!(
            packs,
            vec![[1; 32], [2; 32]],
            "uncommitted pack 4 not listed"
        );
        assert_eq!(c.get_blob(&[4; 32])?, Some(loc(4)));
        assert_eq!(c.uncommitted_packs()?, vec![[4; 32]]);
        c.insert_blobs(&[([4; 32], loc(4))], true)?;
        assert!(
            c.uncommitted_packs()?.is_empty(),
            "committing clears the mark"
        );
        assert_eq!(c.loaded_index_files()?, vec!["abc".to_string()]);
        c.clear_blobs()?;
        assert_eq!(c.get_blob(&[2; 32])?, None);
        assert!(c.loaded_index_files()?.is_empty());
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn file_cache_round_trip() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mrm-idx-f-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = IndexCache::open(&dir)?;
        let e = FileCacheEntry {
            size: 5,
            mtime_ns: -3,
            ctime_ns: 9,
            inode: 42,
            indirect: true,
            content: vec![[7; 32], [8; 32]],
        };
        c.put_file(b"src\0/a/b", &e)?;
        assert_eq!(c.get_file(b"src\0/a/b")?, Some(e));
        assert_eq!(c.get_file(b"src\0/a/c")?, None);
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn second_open_reports_locked_until_the_first_closes() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mrm-idx-l-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = IndexCache::open(&dir)?;
        c.insert_blobs(&[([1; 32], loc(1))], true)?;
        assert!(matches!(
            IndexCache::open(&dir),
            Err(IndexError::Locked { .. })
        ));
        // Busy is not damage: the holder's entries are untouched.
        assert_eq!(c.get_blob(&[1; 32])?, Some(loc(1)));
        drop(c);
        let c = IndexCache::open(&dir)?;
        assert_eq!(c.rebuilt(), None);
        assert_eq!(c.get_blob(&[1; 32])?, Some(loc(1)));
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// Regression: a damaged cache ("Corruption: block checksum mismatch"
    /// contains "lock") was taken for a busy one, so every run used a
    /// private temporary cache and the shared one was never repaired.
    #[test]
    fn damaged_cache_is_rebuilt_not_taken_for_busy() -> Result<()> {
        // "block" in the path as well: the old check matched it anywhere.
        let dir = std::env::temp_dir().join(format!("mrm-idx-blockdev-{}", std::process::id()));
        let io = |source| IndexError::Io {
            path: dir.clone(),
            source,
        };
        // A CURRENT that is not a manifest name (Corruption), and one that
        // names a manifest which is not there (an I/O error, not a lock).
        for damage in [&b"block checksum mismatch"[..], &b"MANIFEST-999999\n"[..]] {
            let _ = std::fs::remove_dir_all(&dir);
            {
                let c = IndexCache::open(&dir)?;
                assert_eq!(c.rebuilt(), None);
                c.insert_blobs(&[([1; 32], loc(1))], true)?;
                c.mark_index_file_loaded("abc")?;
                c.flush()?;
            }
            std::fs::write(dir.join("CURRENT"), damage).map_err(io)?;
            let opened = IndexCache::open(&dir);
            assert!(
                !matches!(opened, Err(IndexError::Locked { .. })),
                "a damaged cache was reported as busy"
            );
            let c = opened?;
            assert_eq!(c.path(), dir.as_path(), "rebuilt at the shared path");
            assert!(c.rebuilt().is_some());
            assert_eq!(c.get_blob(&[1; 32])?, None, "rebuilt empty");
            assert!(c.loaded_index_files()?.is_empty());
            assert!(c.packs()?.is_empty());
            c.insert_blobs(&[([2; 32], loc(2))], true)?;
            drop(c);
            // Repaired for good: the next open finds it healthy.
            let c = IndexCache::open(&dir)?;
            assert_eq!(c.rebuilt(), None);
            assert_eq!(c.get_blob(&[2; 32])?, Some(loc(2)));
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// A process that holds only RocksDB's own lock (a marmoset from before
    /// the `flock`) makes the cache busy; its files are never destroyed.
    #[test]
    fn database_held_without_our_lock_is_busy_not_wiped() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mrm-idx-legacy-{}", std::process::id()));
        let db_err = |source| IndexError::Db {
            path: dir.clone(),
            source,
        };
        let _ = std::fs::remove_dir_all(&dir);
        {
            let c = IndexCache::open(&dir)?;
            c.insert_blobs(&[([1; 32], loc(1))], true)?;
        }
        let legacy = open_db(&db_options(), &dir).map_err(db_err)?;
        assert!(matches!(
            IndexCache::open(&dir),
            Err(IndexError::Locked { .. })
        ));
        drop(legacy);
        let c = IndexCache::open(&dir)?;
        assert_eq!(c.rebuilt(), None);
        assert_eq!(c.get_blob(&[1; 32])?, Some(loc(1)));
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// Regression: damage RocksDB only finds when it reads a data block
    /// (not while opening) failed every query with `Db`, on every run.
    #[test]
    fn a_damaged_data_block_is_reported_and_rebuilt_on_next_open() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mrm-idx-sst-{}", std::process::id()));
        let io = |source| IndexError::Io {
            path: dir.clone(),
            source,
        };
        let _ = std::fs::remove_dir_all(&dir);
        // Enough blobs for a table file of many data blocks.
        let blobs: Vec<(RawId, BlobLocation)> = (0u32..4000)
            .map(|i| {
                let mut id = [0x5a; 32];
                id[..4].copy_from_slice(&i.to_be_bytes());
                let mut l = loc((i % 251) as u8);
                l.offset = u64::from(i);
                (id, l)
            })
            .collect();
        {
            let c = IndexCache::open(&dir)?;
            c.insert_blobs(&blobs, true)?;
            c.mark_index_file_loaded("abc")?;
            c.flush()?;
        }
        // Flip bytes in the first data block of the largest table file (the
        // blobs one), far from the footer and index RocksDB reads at open.
        let mut tables = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let p = entry.map_err(io)?.path();
            if p.extension().is_some_and(|e| e == "sst") {
                tables.push((std::fs::metadata(&p).map_err(io)?.len(), p));
            }
        }
        tables.sort();
        let Some((len, sst)) = tables.pop() else {
            panic!("flush wrote no table file in {}", dir.display());
        };
        assert!(len > 16 << 10, "{} is only {len} bytes", sst.display());
        let mut bytes = std::fs::read(&sst).map_err(io)?;
        for b in &mut bytes[100..104] {
            *b ^= 0xff;
        }
        std::fs::write(&sst, &bytes).map_err(io)?;

        let c = IndexCache::open(&dir)?;
        assert_eq!(c.rebuilt(), None, "the damage is not visible at open");
        let mut failure = None;
        for (id, _) in &blobs {
            if let Err(e) = c.get_blob(id) {
                failure = Some(e);
                break;
            }
        }
        let failure = match failure {
            Some(e) => e,
            // Only if cached blocks answered every lookup: a scan reads all.
            None => match c.for_each_blob(|_, _| {}) {
                Err(e) => e,
                Ok(()) => panic!("no query noticed the damage in {}", sst.display()),
            },
        };
        let IndexError::Damaged { path, detail } = &failure else {
            panic!("expected Damaged, got {failure:?}");
        };
        assert_eq!(path, &dir);
        assert!(detail.contains("Corruption"), "{detail}");
        let message = failure.to_string();
        assert!(
            message.contains("is rebuilt from the repository on the next run"),
            "{message}"
        );
        assert!(dir.join(DAMAGED_MARKER).exists(), "marker written");
        // Damaged until reopened.
        assert!(matches!(
            c.for_each_blob(|_, _| {}),
            Err(IndexError::Damaged { .. })
        ));
        drop(c);

        let c = IndexCache::open(&dir)?;
        let why = c.rebuilt().map(str::to_owned);
        assert!(
            why.as_deref().is_some_and(|w| w.contains("Corruption")),
            "{why:?}"
        );
        assert!(!dir.join(DAMAGED_MARKER).exists(), "marker removed");
        assert_eq!(c.path(), dir.as_path(), "rebuilt at the shared path");
        assert_eq!(c.get_blob(&blobs[0].0)?, None, "rebuilt empty");
        let mut left = 0;
        c.for_each_blob(|_, _| left += 1)?;
        assert_eq!(left, 0);
        assert!(c.packs()?.is_empty());
        assert!(c.loaded_index_files()?.is_empty());
        c.insert_blobs(&blobs[..10], true)?;
        assert_eq!(c.get_blob(&blobs[3].0)?, Some(blobs[3].1));
        drop(c);
        // Repaired for good: the next open finds it healthy.
        let c = IndexCache::open(&dir)?;
        assert_eq!(c.rebuilt(), None);
        assert_eq!(c.get_blob(&blobs[3].0)?, Some(blobs[3].1));
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn block_checksum_mismatch_is_not_classified_as_lock() {
        use rocksdb::ErrorKind;
        let db = Path::new("/home/u/.cache/marmoset/blocklock");
        let damaged = [
            (
                ErrorKind::Corruption,
                "Corruption: block checksum mismatch: stored = 1, computed = 2, type = 1 \
                 in /home/u/.cache/marmoset/blocklock/000012.sst offset 0 size 4096",
            ),
            (
                ErrorKind::Corruption,
                "Corruption: CURRENT file does not end with newline",
            ),
            (
                ErrorKind::IOError,
                "IO error: No such file or directory: While open a file for random read: \
                 /home/u/.cache/marmoset/blocklock/000012.sst: No such file or directory",
            ),
            // Another database's LOCK is not this one's.
            (
                ErrorKind::IOError,
                "IO error: While lock file: /elsewhere/LOCK: Resource temporarily unavailable",
            ),
        ];
        for (kind, message) in damaged {
            assert_eq!(
                classify_open_error(kind, message, db),
                OpenFailure::Damaged,
                "{message}"
            );
        }
        let busy = [
            "IO error: While lock file: /home/u/.cache/marmoset/blocklock/LOCK: \
             Resource temporarily unavailable",
            "IO error: lock hold by current process, acquire time 1 acquiring thread 2: \
             /home/u/.cache/marmoset/blocklock/LOCK: No locks available",
        ];
        for message in busy {
            assert_eq!(
                classify_open_error(ErrorKind::IOError, message, db),
                OpenFailure::Busy,
                "{message}"
            );
        }
    }
}
