//! An open repository: backend + unlocked keys + config + local index cache.
//! Every operation (backup, restore, check, ...) goes through this type.
//!
//! The methods are grouped by what they handle: `content` (blobs, packs,
//! the index and its repair), `manifests` (snapshots and key files),
//! `coordination` (leases, plans, rescue: the GC protocol), `walk` (the
//! tree streamer) and `cache_dir` (the private local cache root).

mod cache_dir;
pub mod content;
pub mod coordination;
pub mod manifests;
pub mod reads;
pub mod walk;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use marmoset_index::{IndexCache, IndexError};
use tracing::{debug, info, warn};

use cache_dir::{default_root, ensure_private_cache_dir};
use manifests::{last_key_path, remember_key, unlock, write_key};

use crate::backend::{Backend, FileKind, CONFIG_NAME};
use crate::error::{Error, Result};
use crate::format::crypto::Keys;
use crate::format::id::Id;
use crate::format::snapshot::Snapshot;
use crate::format::Config;

/// Where the local index cache lives and how to open it.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Root of all per-repository caches; default `$XDG_CACHE_HOME/marmoset`
    /// or `~/.cache/marmoset`.
    pub cache_root: Option<PathBuf>,
}

impl OpenOptions {
    /// The cache root, created `0700` when missing and refused unless it
    /// belongs to this user (see [`ensure_private_cache_dir`]).
    fn cache_root(&self) -> Result<PathBuf> {
        let (root, shared_tmp) = match &self.cache_root {
            Some(r) => (r.clone(), false),
            None => default_root(),
        };
        ensure_private_cache_dir(&root, shared_tmp)?;
        Ok(root)
    }
}

/// A private cache directory used when the shared one is locked by another
/// process; removed on drop.
struct TempCache(PathBuf);

impl Drop for TempCache {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Readable snapshots (oldest first) and the unreadable ones with why.
pub type SnapshotList = (Vec<(Id, Snapshot)>, Vec<(String, Error)>);

pub use content::RepairIndexReport;
pub use manifests::KeyInfo;

pub struct Repository {
    backend: Arc<dyn Backend>,
    keys: Keys,
    config: Config,
    // Field order matters: the cache must close before its temp dir goes.
    index: IndexCache,
    _temp_cache: Option<TempCache>,
    key_name: String,
    /// Whether this handle already made sure every tree is local.
    trees_prefetched: std::sync::atomic::AtomicBool,
    /// Backups running on this handle now (the node agent runs several at
    /// once): only a backup that runs alone may treat the cache's unindexed
    /// packs as left by an interrupted run.
    active_backups: std::sync::atomic::AtomicUsize,
}

/// Counts one backup on a handle for as long as it lives.
pub(crate) struct ActiveBackup<'a> {
    count: &'a std::sync::atomic::AtomicUsize,
    /// No other backup was running on this handle when this one started.
    pub alone: bool,
}

impl Drop for ActiveBackup<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Repository {
    /// Creates a new repository with one key for `password`.
    pub fn init(
        backend: Arc<dyn Backend>,
        password: &[u8],
        config: Config,
        opts: &OpenOptions,
    ) -> Result<Self> {
        Self::init_with_chunker_seed(backend, password, config, None, opts)
    }

    /// [`Repository::init`], with another repository's chunker seed when
    /// given (and so, with its chunker parameters in `config`, its chunk
    /// boundaries: `marmoset copy` between the two then deduplicates).
    pub fn init_with_chunker_seed(
        backend: Arc<dyn Backend>,
        password: &[u8],
        mut config: Config,
        chunker_seed: Option<u64>,
        opts: &OpenOptions,
    ) -> Result<Self> {
        match backend.size(FileKind::Config, CONFIG_NAME) {
            Ok(_) => {
                return Err(Error::RepositoryExists {
                    location: backend.location(),
                })
            }
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        backend.create()?;
        let mut keys = Keys::generate();
        let key_name = write_key(&*backend, &keys, password)?;
        if let Some(seed) = chunker_seed {
            config.chunker_seed = Some(keys.seal_chunker_seed(seed));
            keys = keys.with_chunker_seed(seed);
        }
        config.sign(&keys)?;
        // The config is written last: a crash before it leaves no repository.
        backend.write(FileKind::Config, CONFIG_NAME, config.to_bytes()?.into())?;
        info!(location = %backend.location(), "initialized repository");
        Self::assemble(backend, keys, config, key_name, opts)
    }

    /// Opens an existing repository, unlocking it with `password`.
    pub fn open(backend: Arc<dyn Backend>, password: &[u8], opts: &OpenOptions) -> Result<Self> {
        let raw = match backend.read(FileKind::Config, CONFIG_NAME) {
            Ok(r) => r,
            Err(Error::NotFound { .. }) => {
                return Err(Error::RepositoryNotFound {
                    location: backend.location(),
                })
            }
            Err(e) => return Err(e),
        };
        let config = Config::parse(&raw)?;
        // The cache remembers which key opened this repository here last.
        let hint = last_key_path(&opts.cache_root()?, &config);
        let (mut keys, key_name) = unlock(&*backend, password, &hint)?;
        config.verify(&keys)?;
        if let Some(sealed) = &config.chunker_seed {
            let seed = keys.open_chunker_seed(sealed)?;
            keys = keys.with_chunker_seed(seed);
        }
        Self::assemble(backend, keys, config, key_name, opts)
    }

    fn assemble(
        backend: Arc<dyn Backend>,
        keys: Keys,
        config: Config,
        key_name: String,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let root = opts.cache_root()?;
        let dir = root.join(config.repository_id.to_hex());
        // Planted before the root was closed: a symlink or someone else's
        // folder in place of this repository's cache is refused.
        ensure_private_cache_dir(&dir, true)?;
        let (index, temp) = match IndexCache::open(&dir) {
            Ok(i) => (i, None),
            Err(IndexError::Locked { .. }) => {
                // Another marmoset process (a concurrent backup) holds the
                // cache: work from a private one rebuilt from the repository.
                let tmp = root.join(format!(
                    "tmp-{}-{}",
                    std::process::id(),
                    Id::random().short()
                ));
                debug!(cache = %tmp.display(), "shared index cache busy, using a private one");
                (IndexCache::open(&tmp)?, Some(TempCache(tmp)))
            }
            Err(IndexError::Db { .. }) => {
                // A damaged cache is only a cache: start over.
                warn!(cache = %dir.display(), "index cache unreadable, rebuilding it");
                let _ = std::fs::remove_dir_all(&dir);
                (IndexCache::open(&dir)?, None)
            }
            Err(e) => return Err(e.into()),
        };
        remember_key(&last_key_path(&root, &config), &key_name);
        let repo = Self {
            backend,
            keys,
            config,
            index,
            _temp_cache: temp,
            key_name,
            trees_prefetched: std::sync::atomic::AtomicBool::new(false),
            active_backups: std::sync::atomic::AtomicUsize::new(0),
        };
        repo.sync_index()?;
        Ok(repo)
    }

    /// Registers a backup starting on this handle.
    pub(crate) fn begin_backup(&self) -> ActiveBackup<'_> {
        let before = self
            .active_backups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ActiveBackup {
            count: &self.active_backups,
            alone: before == 0,
        }
    }

    /// How many backups run on this handle right now.
    pub(crate) fn backups_running(&self) -> usize {
        self.active_backups
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    pub fn keys(&self) -> &Keys {
        &self.keys
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn index(&self) -> &IndexCache {
        &self.index
    }
    pub fn cache_dir(&self) -> &Path {
        self.index.path()
    }
}
