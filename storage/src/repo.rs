//! An open repository: backend + unlocked keys + config + local index cache.
//! Every higher layer (backup, restore, check) goes through this type.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use marmoset_index::{BlobLocation, IndexCache, IndexError};
use tracing::{debug, info, warn};

use crate::backend::{Backend, FileKind, CONFIG_NAME};
use crate::blob::{self, BlobType};
use crate::crypto::{KeyFile, Keys};
use crate::error::{Error, Result};
use crate::format::{self, Config};
use crate::id::Id;
use crate::pack::{self, PackEntry, FOOTER_LEN};
use crate::snapshot::Snapshot;
use crate::tree::{self, Node, NodeKind, Tree};

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

pub struct Repository {
    backend: Arc<dyn Backend>,
    keys: Keys,
    config: Config,
    // Field order matters: the cache must close before its temp dir goes.
    index: IndexCache,
    _temp_cache: Option<TempCache>,
    key_name: String,
}

/// Adds the pack to a blob's decryption or corruption error.
fn in_pack(e: Error, pack: &str) -> Error {
    match e {
        Error::Decrypt { what } => Error::Decrypt {
            what: format!("{what} in pack {pack}"),
        },
        Error::Corrupt { what, reason } => Error::Corrupt {
            what: format!("{what} in pack {pack}"),
            reason,
        },
        other => other,
    }
}

/// Summary of one key file for `key list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub current: bool,
    pub created: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
    pub username: String,
    /// False for a damaged, oversized or out-of-range key file.
    pub valid: bool,
}

impl Repository {
    /// Creates a new repository with one key for `password`.
    pub fn init(
        backend: Arc<dyn Backend>,
        password: &[u8],
        mut config: Config,
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
        let keys = Keys::generate();
        let key_name = write_key(&*backend, &keys, password)?;
        config.sign(&keys)?;
        // The config is written last: a crash before it leaves no repository.
        backend.write(FileKind::Config, CONFIG_NAME, &config.to_bytes()?)?;
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
        let (keys, key_name) = unlock(&*backend, password, &hint)?;
        config.verify(&keys)?;
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
        };
        repo.sync_index()?;
        Ok(repo)
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

    /// Brings the local cache up to date with the repository's index files.
    /// If a file the cache loaded is gone (merged or removed by maintenance),
    /// the blob part of the cache is rebuilt from scratch.
    pub fn sync_index(&self) -> Result<()> {
        let remote: std::collections::HashSet<String> = self
            .backend
            .list(FileKind::Index)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let loaded: std::collections::HashSet<String> =
            self.index.loaded_index_files()?.into_iter().collect();
        let to_load: Vec<&String> = if loaded.iter().any(|n| !remote.contains(n)) {
            debug!("index files were removed remotely; rebuilding the blob cache");
            self.index.clear_blobs()?;
            remote.iter().collect()
        } else {
            remote.iter().filter(|n| !loaded.contains(*n)).collect()
        };
        for name in to_load {
            match self.load_index_file(name) {
                Ok(packs) => {
                    self.cache_entries(&packs, true)?;
                    self.index.mark_index_file_loaded(name)?;
                }
                // Unreadable index files are reported by `check`; their packs
                // are found again by `repair index`.
                Err(e) => warn!(index = %name, error = %e, "skipping unreadable index file"),
            }
        }
        Ok(())
    }

    pub fn load_index_file(&self, name: &str) -> Result<Vec<(Id, Vec<PackEntry>)>> {
        let plain = self.load_file(FileKind::Index, name)?;
        format::decode_index(name, &plain)
    }

    pub(crate) fn cache_entries(
        &self,
        packs: &[(Id, Vec<PackEntry>)],
        committed: bool,
    ) -> Result<()> {
        let mut batch = Vec::new();
        for (pack, entries) in packs {
            for e in entries {
                batch.push((
                    e.id.0,
                    BlobLocation {
                        pack: pack.0,
                        offset: e.offset,
                        length: e.length,
                        raw_length: e.raw_length,
                        kind: e.kind as u8,
                        flags: e.flags,
                    },
                ));
            }
        }
        self.index.insert_blobs(&batch, committed)?;
        Ok(())
    }

    /// Writes an index file for `packs` (only after the packs are durable).
    pub fn write_index(&self, packs: &[(Id, Vec<PackEntry>)]) -> Result<String> {
        let name = self.save_file(FileKind::Index, "index", &format::encode_index(packs))?;
        self.cache_entries(packs, true)?;
        self.index.mark_index_file_loaded(&name)?;
        Ok(name)
    }

    /// Encrypts and stores a repository file; its name is the hash of the
    /// stored bytes.
    pub fn save_file(&self, kind: FileKind, label: &str, plaintext: &[u8]) -> Result<String> {
        let bytes = format::seal_file(&self.keys, label, plaintext);
        let name = Id::of_bytes(&bytes).to_hex();
        self.backend.write(kind, &name, &bytes)?;
        Ok(name)
    }

    pub fn load_file(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        let bytes = self.backend.read(kind, name)?;
        if Id::of_bytes(&bytes).to_hex() != name {
            return Err(Error::corrupt(
                format!("{kind} {name}"),
                "content does not match its name",
            ));
        }
        format::open_file(&self.keys, &kind.to_string(), name, &bytes)
    }

    pub fn blob_location(&self, id: &Id) -> Result<BlobLocation> {
        self.index
            .get_blob(&id.0)?
            .ok_or(Error::BlobNotFound { id: *id })
    }

    /// Reads, decrypts and verifies one blob.
    pub fn load_blob(&self, id: &Id) -> Result<Vec<u8>> {
        let loc = self.blob_location(id)?;
        if self.backend.is_remote() && loc.kind != BlobType::Data as u8 {
            return self.load_metadata_blob(id, &loc);
        }
        self.load_blob_at(id, &loc)
    }

    /// Trees and chunk lists of a remote repository are kept on local disk,
    /// still encrypted, so browsing, `ls` and maintenance do not fetch them
    /// again. A cached copy is authenticated on every use; a bad one is
    /// dropped and fetched again.
    fn load_metadata_blob(&self, id: &Id, loc: &BlobLocation) -> Result<Vec<u8>> {
        let kind = BlobType::from_u8(loc.kind)
            .ok_or_else(|| Error::corrupt(format!("blob {id}"), "unknown blob type in index"))?;
        let path = self.index.path().with_extension("blobs").join(id.to_hex());
        if let Ok(raw) = std::fs::read(&path) {
            if let Ok(plain) = blob::decode(&self.keys, kind, id, loc.flags, loc.raw_length, &raw) {
                return Ok(plain);
            }
            let _ = std::fs::remove_file(&path);
        }
        let pack = Id(loc.pack).to_hex();
        let raw = self.read_blob_bytes(id, &pack, loc)?;
        let plain = blob::decode(&self.keys, kind, id, loc.flags, loc.raw_length, &raw)
            .map_err(|e| in_pack(e, &pack))?;
        if let Some(dir) = path.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, &raw).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        }
        Ok(plain)
    }

    pub fn load_blob_at(&self, id: &Id, loc: &BlobLocation) -> Result<Vec<u8>> {
        self.load_blob_with(id, loc, blob::decode)
    }

    /// Like [`Repository::load_blob`] but trusts the AEAD tag instead of
    /// re-hashing the plaintext (see `blob::decode_authenticated`).
    pub fn load_blob_authenticated(&self, id: &Id) -> Result<Vec<u8>> {
        let loc = self.blob_location(id)?;
        self.load_blob_with(id, &loc, blob::decode_authenticated)
    }

    fn load_blob_with(
        &self,
        id: &Id,
        loc: &BlobLocation,
        decode: blob::Decoder,
    ) -> Result<Vec<u8>> {
        let pack = Id(loc.pack).to_hex();
        let kind = BlobType::from_u8(loc.kind)
            .ok_or_else(|| Error::corrupt(format!("blob {id}"), "unknown blob type in index"))?;
        let data = self.read_blob_bytes(id, &pack, loc)?;
        decode(&self.keys, kind, id, loc.flags, loc.raw_length, &data)
            .map_err(|e| in_pack(e, &pack))
    }

    fn read_blob_bytes(&self, id: &Id, pack: &str, loc: &BlobLocation) -> Result<Vec<u8>> {
        self.backend
            .read_range(FileKind::Pack, pack, loc.offset, u64::from(loc.length))
            .map_err(|e| match e {
                Error::NotFound { .. } => {
                    Error::corrupt(format!("blob {id}"), format!("pack {pack} is missing"))
                }
                other => other,
            })
    }

    /// Reads and authenticates a pack's trailer.
    pub fn read_pack_trailer(&self, pack: &str, size: u64) -> Result<Vec<PackEntry>> {
        if size < FOOTER_LEN {
            return Err(Error::corrupt(
                format!("pack {pack}"),
                "too short to be a pack",
            ));
        }
        let footer =
            self.backend
                .read_range(FileKind::Pack, pack, size - FOOTER_LEN, FOOTER_LEN)?;
        let tlen = pack::trailer_len(pack, &footer, size)?;
        let start = size - FOOTER_LEN - tlen;
        let trailer = self.backend.read_range(FileKind::Pack, pack, start, tlen)?;
        pack::decode_trailer(&self.keys, pack, &trailer, start)
    }

    /// Indexes packs that no index file mentions (left by an interrupted
    /// backup), so their blobs are reused rather than uploaded again. Packs
    /// planned for deletion by maintenance are never re-indexed, and if this
    /// machine's cache knows blobs of packs that stay unindexed, the blob
    /// cache is rebuilt so no backup dedups against them.
    /// `packs` is a fresh listing of the repository's packs.
    /// Returns how many packs were recovered.
    pub fn recover_unindexed_packs(&self, packs: &[(String, u64)]) -> Result<usize> {
        let known: std::collections::HashSet<[u8; 32]> = self.index.packs()?.into_iter().collect();
        let planned = crate::maintain::planned_packs(self)?;
        let mut found = Vec::new();
        for (name, size) in packs {
            let Some(id) = Id::from_hex(name) else {
                continue;
            };
            if known.contains(&id.0) || planned.contains(name) {
                continue;
            }
            match self.verified_pack_entries(&id, *size) {
                Ok(entries) if entries.is_empty() => {}
                Ok(entries) => found.push((id, entries)),
                Err(e) => warn!(pack = %name, error = %e, "unindexed pack not trusted; ignored"),
            }
        }
        if !found.is_empty() {
            info!(
                packs = found.len(),
                "indexing packs left by an interrupted backup"
            );
            self.write_index(&found)?;
        }
        if !self.index.uncommitted_packs()?.is_empty() {
            debug!("cache knows blobs of unindexed packs; rebuilding it");
            self.index.clear_blobs()?;
            self.sync_index()?;
        }
        Ok(found.len())
    }

    /// The entries of an unindexed pack that may be indexed: its trailer
    /// authenticates, but so would the trailer of a genuine pack's copy
    /// with bytes prepended (offsets are not bound to it), so every blob is
    /// authenticated where the trailer says it lies. Blobs the index
    /// already places in another pack are left out: a known-good location
    /// is never replaced by a recovered one.
    fn verified_pack_entries(&self, id: &Id, size: u64) -> Result<Vec<PackEntry>> {
        let name = id.to_hex();
        let entries = self.read_pack_trailer(&name, size)?;
        let bytes = self.backend.read(FileKind::Pack, &name)?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            if let Some(loc) = self.index.get_blob(&e.id.0)? {
                if loc.pack != id.0 {
                    continue;
                }
            }
            let start = usize::try_from(e.offset).ok();
            let end = start.and_then(|s| s.checked_add(e.length as usize));
            let raw = match (start, end) {
                (Some(s), Some(t)) if t <= bytes.len() => &bytes[s..t],
                _ => {
                    return Err(Error::corrupt(
                        format!("pack {name}"),
                        "entry outside the pack",
                    ))
                }
            };
            blob::decode_authenticated(&self.keys, e.kind, &e.id, e.flags, e.raw_length, raw)
                .map_err(|err| in_pack(err, &name))?;
            out.push(e);
        }
        Ok(out)
    }

    /// Rebuilds all index files from pack trailers (`repair index`).
    /// New index files are written before old ones are removed.
    pub fn repair_index(&self) -> Result<RepairIndexReport> {
        let old: Vec<String> = self
            .backend
            .list(FileKind::Index)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut packs = Vec::new();
        let mut report = RepairIndexReport::default();
        for (name, size) in self.backend.list(FileKind::Pack)? {
            let Some(id) = Id::from_hex(&name) else {
                continue;
            };
            match self.read_pack_trailer(&name, size) {
                Ok(entries) => {
                    report.blobs += entries.len() as u64;
                    packs.push((id, entries));
                }
                Err(e) => {
                    warn!(pack = %name, error = %e, "pack trailer unreadable");
                    report.unreadable_packs.push(name);
                }
            }
        }
        report.packs = packs.len() as u64;
        self.index.clear_blobs()?;
        for part in packs.chunks(5000) {
            self.write_index(part)?;
            report.index_files_written += 1;
        }
        for name in old {
            self.backend.remove(FileKind::Index, &name)?;
            report.index_files_removed += 1;
        }
        Ok(report)
    }

    /// Stores blobs outside a backup (repair tools): one pack, then its
    /// index file. Blobs already stored are skipped.
    pub fn save_blobs(&self, blobs: &[(BlobType, Vec<u8>)]) -> Result<Vec<Id>> {
        let mut builder = pack::PackBuilder::default();
        let mut ids = Vec::new();
        for (kind, data) in blobs {
            let id = self.keys.content_id(data);
            ids.push(id);
            if !self.index.contains_blob(&id.0)? {
                builder.add(blob::encode(
                    &self.keys,
                    *kind,
                    id,
                    data,
                    self.config.compression_level,
                )?)?;
            }
        }
        if !builder.is_empty() {
            let sealed = builder.seal(&self.keys)?;
            self.backend
                .write(FileKind::Pack, &sealed.id.to_hex(), &sealed.bytes)?;
            self.write_index(&[(sealed.id, sealed.entries)])?;
        }
        Ok(ids)
    }

    pub fn save_tree_blob(&self, tree: &Tree) -> Result<Id> {
        let ids = self.save_blobs(&[(BlobType::Tree, tree.encode()?)])?;
        ids.first()
            .copied()
            .ok_or_else(|| Error::corrupt("tree", "not stored"))
    }

    pub fn load_tree(&self, id: &Id) -> Result<Tree> {
        Tree::decode(id, &self.load_blob(id)?)
    }

    /// All entries of a directory node, part after part.
    pub fn dir_entries(&self, node: &Node) -> Result<Vec<Node>> {
        let mut out = Vec::new();
        for part in &node.subtree {
            out.extend(self.load_tree(part)?.nodes);
        }
        Ok(out)
    }

    /// A file's chunk ids, resolving chunk-list blobs of huge files.
    pub fn file_chunks(&self, node: &Node) -> Result<Vec<Id>> {
        if !node.indirect {
            return Ok(node.content.clone());
        }
        let mut out = Vec::new();
        for list in &node.content {
            out.extend(tree::decode_chunk_list(list, &self.load_blob(list)?)?);
        }
        Ok(out)
    }

    /// The root of a snapshot as a directory node.
    pub fn root_node(&self, snap: &Snapshot) -> Node {
        let mut n = Node::new(Vec::new(), NodeKind::Dir);
        n.mode = 0o755;
        n.subtree = snap.root_parts();
        n
    }

    /// Finds the node at a `/`-separated path below a snapshot's root.
    pub fn find_node(&self, snap: &Snapshot, path: &str) -> Result<Node> {
        let mut node = self.root_node(snap);
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if node.kind != NodeKind::Dir {
                return Err(Error::PathNotFound { path: path.into() });
            }
            let mut next = None;
            for part in &node.subtree {
                let t = self.load_tree(part)?;
                if let Some(n) = t.nodes.into_iter().find(|n| n.name == comp.as_bytes()) {
                    next = Some(n);
                    break;
                }
            }
            node = next.ok_or_else(|| Error::PathNotFound { path: path.into() })?;
        }
        Ok(node)
    }

    pub fn save_snapshot(&self, snap: &Snapshot) -> Result<Id> {
        let json =
            serde_json::to_vec(snap).map_err(|e| Error::corrupt("snapshot", e.to_string()))?;
        let name = self.save_file(FileKind::Snapshot, "snapshot", &json)?;
        Id::from_hex(&name).ok_or_else(|| Error::corrupt("snapshot", "bad name"))
    }

    pub fn load_snapshot(&self, id: &Id) -> Result<Snapshot> {
        let plain = self.load_file(FileKind::Snapshot, &id.to_hex())?;
        serde_json::from_slice(&plain)
            .map_err(|e| Error::corrupt(format!("snapshot {id}"), e.to_string()))
    }

    /// Every readable snapshot, oldest first. Unreadable ones are returned
    /// separately so callers can report them.
    pub fn snapshots(&self) -> Result<SnapshotList> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for (name, _) in self.backend.list(FileKind::Snapshot)? {
            let Some(id) = Id::from_hex(&name) else {
                continue;
            };
            match self.load_snapshot(&id) {
                Ok(s) => ok.push((id, s)),
                Err(e) => bad.push((name, e)),
            }
        }
        ok.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok((ok, bad))
    }

    /// Resolves `latest`, a full id or a unique id prefix.
    pub fn resolve_snapshot(&self, spec: &str) -> Result<(Id, Snapshot)> {
        if spec == "latest" {
            let (snaps, _) = self.snapshots()?;
            return snaps
                .into_iter()
                .last()
                .ok_or_else(|| Error::SnapshotNotFound(spec.into()));
        }
        let names: Vec<String> = self
            .backend
            .list(FileKind::Snapshot)?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with(spec))
            .collect();
        match names.as_slice() {
            [one] => {
                let id = Id::from_hex(one).ok_or_else(|| Error::SnapshotNotFound(spec.into()))?;
                Ok((id, self.load_snapshot(&id)?))
            }
            [] => Err(Error::SnapshotNotFound(spec.into())),
            _ => Err(Error::AmbiguousSnapshot(spec.into())),
        }
    }

    // ---- keys ----

    /// Every key file, usable or not: a damaged or planted one is listed
    /// (saying why it is invalid) so that `key remove` can delete it.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let mut out = Vec::new();
        for obj in self.backend.list_info(FileKind::Key)? {
            // `key list` prints 8-character prefixes; a shorter name was not
            // written by marmoset.
            if obj.name.get(..8).is_none() {
                warn!(key = ?obj.name, "key file with a malformed name ignored");
                continue;
            }
            let current = obj.name == self.key_name;
            out.push(match read_key_file(&*self.backend, &obj)? {
                Ok(kf) => KeyInfo {
                    id: obj.name,
                    current,
                    created: kf.created,
                    hostname: kf.hostname,
                    username: kf.username,
                    valid: true,
                },
                Err(e) => KeyInfo {
                    id: obj.name,
                    current,
                    created: obj.modified.unwrap_or_default(),
                    hostname: "-".into(),
                    username: format!("(invalid key file: {e})"),
                    valid: false,
                },
            });
        }
        out.sort_by_key(|k| k.created);
        Ok(out)
    }

    pub fn add_key(&self, password: &[u8]) -> Result<String> {
        // Opens try at most MAX_KEYS_TRIED key files: a key beyond that
        // could not be relied on from a fresh machine.
        let count = self.backend.list(FileKind::Key)?.len();
        if count >= MAX_KEYS_TRIED {
            return Err(Error::InvalidArgument(format!(
                "the repository has {count} key files, the most an open tries; remove unused ones first (`key list`, `key remove`)"
            )));
        }
        write_key(&*self.backend, &self.keys, password)
    }

    pub fn remove_key(&self, prefix: &str) -> Result<()> {
        let keys = self.list_keys()?;
        let matching: Vec<&KeyInfo> = keys.iter().filter(|k| k.id.starts_with(prefix)).collect();
        let [key] = matching.as_slice() else {
            return Err(Error::KeyNotFound(prefix.into()));
        };
        // Invalid key files open nothing: they do not count as a spare.
        if key.valid && keys.iter().filter(|k| k.valid).count() == 1 {
            return Err(Error::LastKey);
        }
        self.backend.remove(FileKind::Key, &key.id)
    }

    /// Replaces the current key with one for `new_password`. Only the small
    /// key file changes; data stays encrypted under the same master key.
    pub fn change_password(&mut self, new_password: &[u8]) -> Result<String> {
        let new_name = write_key(&*self.backend, &self.keys, new_password)?;
        self.backend.remove(FileKind::Key, &self.key_name)?;
        self.key_name = new_name.clone();
        Ok(new_name)
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RepairIndexReport {
    pub packs: u64,
    pub blobs: u64,
    pub index_files_written: u64,
    pub index_files_removed: u64,
    pub unreadable_packs: Vec<String>,
}

fn write_key(backend: &dyn Backend, keys: &Keys, password: &[u8]) -> Result<String> {
    let kf = KeyFile::wrap(keys, password)?;
    let bytes = serde_json::to_vec_pretty(&kf).map_err(|e| Error::corrupt("key", e.to_string()))?;
    let name = Id::random().to_hex();
    backend.write(FileKind::Key, &name, &bytes)?;
    Ok(name)
}

/// At most this many key files are tried per open: each costs an Argon2
/// derivation (up to 256 MiB over 4 passes), and anyone with write access
/// to the repository can add key files.
const MAX_KEYS_TRIED: usize = 16;
/// Genuine key files are well under 1 KiB; larger ones are not even read.
const MAX_KEY_FILE_LEN: u64 = 64 * 1024;

/// Finds the key file that `password` opens, trying the one that last
/// worked on this machine (remembered at `hint`) first. Key files that are
/// too large, unparsable or ask for excessive Argon2 costs are skipped with
/// a warning naming them.
fn unlock(backend: &dyn Backend, password: &[u8], hint: &Path) -> Result<(Keys, String)> {
    let candidates = key_candidates(backend, read_last_key(hint).as_deref())?;
    let count = candidates.len();
    let mut refused = false;
    let mut last_invalid = None;
    for obj in candidates.into_iter().take(MAX_KEYS_TRIED) {
        match read_key_file(backend, &obj)?.and_then(|kf| kf.unwrap_keys(password)) {
            Ok(Some(keys)) => return Ok((keys, obj.name)),
            Ok(None) => refused = true,
            Err(e) => {
                warn!(key = ?obj.name, error = %e, "invalid key file skipped");
                last_invalid = Some(e);
            }
        }
    }
    if count > MAX_KEYS_TRIED {
        return Err(Error::TooManyKeys {
            count,
            tried: MAX_KEYS_TRIED,
            hint: hint.to_owned(),
        });
    }
    match last_invalid {
        // No key file was usable: a damaged one is worth naming, but the
        // password may also just be wrong; say both.
        Some(e) if !refused => Err(Error::Corrupt {
            what: "wrong password, or".into(),
            reason: e.to_string(),
        }),
        // A valid key refused the password: invalid files next to it (planted
        // or damaged) do not change that answer.
        _ => Err(Error::WrongPassword),
    }
}

// ---- helpers: key files and the private cache root ----

/// Key files in the order they are tried: the one that last opened the
/// repository here first, then oldest first by the storage's time (keys
/// planted later come last), by name where times are unknown.
fn key_candidates(
    backend: &dyn Backend,
    last: Option<&str>,
) -> Result<Vec<crate::backend::ObjectInfo>> {
    let mut keys = backend.list_info(FileKind::Key)?;
    keys.sort_by(|a, b| {
        a.modified
            .cmp(&b.modified)
            .then_with(|| a.name.cmp(&b.name))
    });
    // A stable sort: the others keep their order.
    keys.sort_by_key(|k| Some(k.name.as_str()) != last);
    Ok(keys)
}

/// Reads and parses one key file and checks its KDF costs. The outer error
/// is the backend's (worth reporting as is); the inner one says why the
/// file is not a usable key.
fn read_key_file(
    backend: &dyn Backend,
    obj: &crate::backend::ObjectInfo,
) -> Result<std::result::Result<KeyFile, Error>> {
    let invalid = |reason: String| Error::corrupt(format!("key {:?}", obj.name), reason);
    let too_large = |len: u64| invalid(format!("{len} bytes, more than any key file holds"));
    if obj.size > MAX_KEY_FILE_LEN {
        return Ok(Err(too_large(obj.size)));
    }
    let raw = match backend.read(FileKind::Key, &obj.name) {
        Ok(raw) => raw,
        // Removed since the listing (a concurrent `key remove`).
        Err(Error::NotFound { .. }) => return Ok(Err(invalid("removed while read".into()))),
        Err(e) => return Err(e),
    };
    // Listings may not know sizes (0): check what was read too.
    if raw.len() as u64 > MAX_KEY_FILE_LEN {
        return Ok(Err(too_large(raw.len() as u64)));
    }
    let kf: KeyFile = match serde_json::from_slice(&raw) {
        Ok(kf) => kf,
        Err(e) => return Ok(Err(invalid(e.to_string()))),
    };
    Ok(match kf.kdf.validate() {
        Ok(()) => Ok(kf),
        Err(e) => Err(invalid(e.to_string())),
    })
}

/// Where the name of the key that last opened a repository is remembered.
fn last_key_path(cache_root: &Path, config: &Config) -> PathBuf {
    cache_root.join(format!("{}.lastkey", config.repository_id.to_hex()))
}

/// The remembered key name; anything but a plain hex name is ignored (the
/// hint only orders the attempts, it never skips one).
fn read_last_key(path: &Path) -> Option<String> {
    let raw = std::fs::read_to_string(path).ok()?;
    let name = raw.trim();
    let plausible =
        !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_hexdigit());
    plausible.then(|| name.to_string())
}

/// Remembers which key file opened the repository so the next open tries it
/// first. Best effort: written `0600` through a temporary file, so a
/// concurrent reader never sees half a name.
fn remember_key(path: &Path, name: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if read_last_key(path).as_deref() == Some(name) {
        return;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(name.as_bytes())?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        debug!(path = %path.display(), error = %e, "could not remember the key that opened the repository");
        let _ = std::fs::remove_file(&tmp);
    }
}

impl OpenOptions {
    /// The cache root used when none is configured: `$XDG_CACHE_HOME/marmoset`,
    /// `~/.cache/marmoset`, or with neither set `$TMPDIR/marmoset-cache-<uid>`.
    pub fn default_cache_root() -> PathBuf {
        default_root().0
    }
}

/// [`OpenOptions::default_cache_root`], and whether it is the fallback in
/// the temporary folder, which every user can write to.
fn default_root() -> (PathBuf, bool) {
    let set = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty());
    if let Some(x) = set("XDG_CACHE_HOME") {
        return (PathBuf::from(x).join("marmoset"), false);
    }
    if let Some(h) = set("HOME") {
        return (PathBuf::from(h).join(".cache").join("marmoset"), false);
    }
    // Per user: a fixed name in a shared folder can be created first by
    // anyone, who would then read (or swap) the cache.
    let uid = nix::unistd::geteuid().as_raw();
    (
        std::env::temp_dir().join(format!("marmoset-cache-{uid}")),
        true,
    )
}

/// Makes sure a cache root is this user's own before anything is read from
/// or written to it: it holds plaintext source paths and which key opens
/// the repository, and whoever owns it could read or swap what is inside.
/// Created `0700` when missing. In the shared temporary folder it must also
/// be a real directory (not a symlink planted there) and is kept `0700`.
fn ensure_private_cache_dir(dir: &Path, shared_tmp: bool) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let io = |e| Error::io(dir, e);
    let refuse = |reason: String| Error::UnsafeCacheDir {
        path: dir.to_owned(),
        reason,
    };
    // Only the last component is ours to create in the shared folder.
    match std::fs::DirBuilder::new()
        .recursive(!shared_tmp)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let lookup = if shared_tmp {
        std::fs::symlink_metadata(dir)
    } else {
        std::fs::metadata(dir)
    };
    let meta = lookup.map_err(io)?;
    if meta.file_type().is_symlink() {
        return Err(refuse(
            "is a symbolic link in a folder other users can write to".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(refuse("is not a directory".into()));
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(refuse(format!(
            "owned by uid {}, not by this user (uid {uid})",
            meta.uid()
        )));
    }
    // Ours but open to others (a 1777 folder given as the cache root, an
    // old 0775 one): close it, so nobody else can plant entries in it.
    if (shared_tmp && meta.mode() & 0o077 != 0) || meta.mode() & 0o022 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}
