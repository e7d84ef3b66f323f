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
    fn cache_root(&self) -> PathBuf {
        if let Some(r) = &self.cache_root {
            return r.clone();
        }
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(x).join("marmoset");
        }
        if let Some(h) = std::env::var_os("HOME") {
            return PathBuf::from(h).join(".cache").join("marmoset");
        }
        std::env::temp_dir().join("marmoset-cache")
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
        let (keys, key_name) = unlock(&*backend, password)?;
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
        let dir = opts.cache_root().join(config.repository_id.to_hex());
        let (index, temp) = match IndexCache::open(&dir) {
            Ok(i) => (i, None),
            Err(IndexError::Locked { .. }) => {
                // Another marmoset process (a concurrent backup) holds the
                // cache: work from a private one rebuilt from the repository.
                let tmp = opts.cache_root().join(format!(
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
    /// Returns how many packs were recovered.
    pub fn recover_unindexed_packs(&self) -> Result<usize> {
        let known: std::collections::HashSet<[u8; 32]> = self.index.packs()?.into_iter().collect();
        let planned = crate::maintain::planned_packs(&*self.backend)?;
        let mut found = Vec::new();
        for (name, size) in self.backend.list(FileKind::Pack)? {
            let Some(id) = Id::from_hex(&name) else {
                continue;
            };
            if known.contains(&id.0) || planned.contains(&name) {
                continue;
            }
            match self.read_pack_trailer(&name, size) {
                Ok(entries) => found.push((id, entries)),
                Err(e) => warn!(pack = %name, error = %e, "unreadable unindexed pack ignored"),
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

    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let mut out = Vec::new();
        for (name, _) in self.backend.list(FileKind::Key)? {
            let raw = self.backend.read(FileKind::Key, &name)?;
            let kf: KeyFile = serde_json::from_slice(&raw)
                .map_err(|e| Error::corrupt(format!("key {name}"), e.to_string()))?;
            out.push(KeyInfo {
                current: name == self.key_name,
                id: name,
                created: kf.created,
                hostname: kf.hostname,
                username: kf.username,
            });
        }
        out.sort_by_key(|k| k.created);
        Ok(out)
    }

    pub fn add_key(&self, password: &[u8]) -> Result<String> {
        write_key(&*self.backend, &self.keys, password)
    }

    pub fn remove_key(&self, prefix: &str) -> Result<()> {
        let keys = self.list_keys()?;
        let matching: Vec<&KeyInfo> = keys.iter().filter(|k| k.id.starts_with(prefix)).collect();
        let [key] = matching.as_slice() else {
            return Err(Error::KeyNotFound(prefix.into()));
        };
        if keys.len() == 1 {
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

fn unlock(backend: &dyn Backend, password: &[u8]) -> Result<(Keys, String)> {
    let mut last_corrupt = None;
    for (name, _) in backend.list(FileKind::Key)? {
        let raw = backend.read(FileKind::Key, &name)?;
        let kf: KeyFile = match serde_json::from_slice(&raw) {
            Ok(k) => k,
            Err(e) => {
                warn!(key = %name, error = %e, "unparsable key file skipped");
                last_corrupt = Some(Error::corrupt(format!("key {name}"), e.to_string()));
                continue;
            }
        };
        match kf.unwrap_keys(password) {
            Ok(Some(keys)) => return Ok((keys, name)),
            Ok(None) => {}
            Err(e) => {
                warn!(key = %name, error = %e, "invalid key file skipped");
                last_corrupt = Some(e);
            }
        }
    }
    Err(last_corrupt.map_or(Error::WrongPassword, |e| {
        // A damaged key file is worth naming, but the password may also just
        // be wrong; say both.
        Error::Corrupt {
            what: "wrong password, or".into(),
            reason: e.to_string(),
        }
    }))
}
