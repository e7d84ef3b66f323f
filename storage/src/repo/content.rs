//! Content: blobs in packs, and the index that finds them. Sync of the
//! local index cache, reading and authenticating blobs, saving blobs and
//! trees, and recovering or repairing the index from the packs themselves.

use std::collections::HashMap;
use std::path::PathBuf;

use marmoset_index::BlobLocation;
use tracing::{debug, info, warn};

use super::reads::coalesce;
use super::Repository;
use crate::backend::FileKind;
use crate::error::{Error, Result};
use crate::format;
use crate::format::blob::{self, BlobType};
use crate::format::id::Id;
use crate::format::pack::{self, PackEntry, FOOTER_LEN};
use crate::format::snapshot::Snapshot;
use crate::format::tree::{self, Node, NodeKind, Tree};

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RepairIndexReport {
    pub packs: u64,
    pub blobs: u64,
    pub index_files_written: u64,
    pub index_files_removed: u64,
    /// Packs whose trailer is damaged (truncated, or corrupt): left out of
    /// the new index, so later maintenance may delete them.
    pub unreadable_packs: Vec<String>,
    /// Blobs of those packs that an old index file located and that
    /// authenticate at that location: copied into new packs, nothing lost.
    pub blobs_salvaged: u64,
    /// Blobs of those packs that an old index located but that are damaged
    /// (`pack/blob: why`); they are lost unless another pack holds them.
    pub blobs_lost: Vec<String>,
}

impl Repository {
    /// Brings the local cache up to date with the repository's index files.
    /// If a file the cache loaded is gone (merged or removed by maintenance),
    /// the blob part of the cache is rebuilt from scratch.
    pub fn sync_index(&self) -> Result<()> {
        self.sync_index_names().map(drop)
    }

    /// [`Repository::sync_index`], returning the names of the index files
    /// the storage listed (what the caller now starts from).
    pub fn sync_index_names(&self) -> Result<std::collections::HashSet<String>> {
        // What was loaded is read before the listing: an index file that
        // a concurrent backup on this handle writes meanwhile is marked
        // loaded after it is stored, so it can be missing from the listing
        // only if it is also missing from `loaded` (never taken for a file
        // removed remotely).
        let loaded: std::collections::HashSet<String> =
            self.index.loaded_index_files()?.into_iter().collect();
        let remote: std::collections::HashSet<String> = self
            .backend
            .list_names(FileKind::Index)?
            .into_iter()
            .collect();
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
        Ok(remote)
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
            // Whole packs at a time: the entries of many packs of tiny
            // files are millions, and need not be copied all at once.
            if batch.len() >= 1 << 16 {
                self.index.insert_blobs(&batch, committed)?;
                batch.clear();
            }
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
        let m = self.index.memory();
        debug!(
            index = %name,
            memtables = m.memtables,
            block_cache = m.block_cache,
            pinned = m.block_cache_pinned,
            table_readers = m.table_readers,
            "index file written; index cache memory"
        );
        Ok(name)
    }

    /// Encrypts and stores a repository file; its name is the hash of the
    /// stored bytes.
    pub fn save_file(&self, kind: FileKind, label: &str, plaintext: &[u8]) -> Result<String> {
        let bytes = format::seal_file(&self.keys, label, plaintext);
        let name = Id::of_bytes(&bytes).to_hex();
        self.backend.write(kind, &name, bytes.into())?;
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
        let path = self.metadata_blob_path(id);
        if let Ok(raw) = std::fs::read(&path) {
            if let Ok(plain) = self.decode_with(id, loc, &raw, blob::decode) {
                return Ok(plain);
            }
            let _ = std::fs::remove_file(&path);
        }
        let raw = self.read_blob_bytes(id, &Id(loc.pack).to_hex(), loc)?;
        let plain = self.decode_with(id, loc, &raw, blob::decode)?;
        self.keep_metadata_blob(id, &raw);
        Ok(plain)
    }

    /// Where a metadata blob of a remote repository is kept locally.
    fn metadata_blob_path(&self, id: &Id) -> PathBuf {
        self.index.path().with_extension("blobs").join(id.to_hex())
    }

    /// Keeps the raw (still encrypted) bytes of a metadata blob; it is
    /// authenticated again whenever it is read back. Best effort.
    fn keep_metadata_blob(&self, id: &Id, raw: &[u8]) {
        let path = self.metadata_blob_path(id);
        if let Some(dir) = path.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, raw).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        }
    }

    /// Fetches every tree blob of a remote repository that is not local
    /// yet, a few coalesced reads per pack, as restic keeps its tree packs
    /// cached: a walk then costs no request per directory level.
    pub fn prefetch_all_trees(&self) {
        use std::sync::atomic::Ordering;
        if !self.backend.is_remote() || self.trees_prefetched.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut ids = Vec::new();
        let r = self.index.for_each_blob(|id, loc| {
            if loc.kind == BlobType::Tree as u8 {
                ids.push(Id(id));
            }
        });
        if let Err(e) = r {
            debug!(error = %e, "tree prefetch skipped");
            return;
        }
        self.prefetch_metadata(&ids);
    }

    /// Fetches the metadata blobs (trees, chunk lists) among `ids` that a
    /// remote repository has not got locally yet, with coalesced ranged
    /// reads per pack instead of one request per blob. The tree walker
    /// calls it for each batch of directories. Failures are left to the
    /// individual loads that follow, which report them by blob.
    pub fn prefetch_metadata(&self, ids: &[Id]) {
        if !self.backend.is_remote() {
            return;
        }
        let mut by_pack: HashMap<[u8; 32], Vec<(u64, u64, Id)>> = HashMap::new();
        for id in ids {
            if self.metadata_blob_path(id).exists() {
                continue;
            }
            if let Ok(Some(loc)) = self.index.get_blob(&id.0) {
                by_pack
                    .entry(loc.pack)
                    .or_default()
                    .push((loc.offset, u64::from(loc.length), *id));
            }
        }
        for (pack, items) in by_pack {
            let pack = Id(pack).to_hex();
            for range in coalesce(items) {
                match self
                    .backend
                    .read_range(FileKind::Pack, &pack, range.offset, range.length)
                {
                    Ok(buf) => {
                        for (offset, length, id) in &range.items {
                            if let Some(raw) = range.slice(&buf, *offset, *length) {
                                self.keep_metadata_blob(id, raw);
                            }
                        }
                    }
                    Err(e) => debug!(pack = %pack, error = %e, "metadata prefetch failed"),
                }
            }
        }
    }

    /// Loads several blobs with coalesced ranged reads (one request per run
    /// of neighbours in a pack instead of one per blob), each authenticated
    /// like [`Repository::load_blob_authenticated`]. The FUSE prefetcher
    /// reads a file's next chunks this way. Every id gets a result; a
    /// range that cannot be read falls back to loading its blobs one by
    /// one, so each error names its blob.
    pub fn load_blobs(&self, ids: &[Id]) -> Vec<(Id, Result<Vec<u8>>)> {
        let mut out = Vec::with_capacity(ids.len());
        type Wanted = Vec<(u64, u64, (Id, BlobLocation))>;
        let mut by_pack: HashMap<[u8; 32], Wanted> = HashMap::new();
        for id in ids {
            match self.blob_location(id) {
                Ok(loc) => by_pack.entry(loc.pack).or_default().push((
                    loc.offset,
                    u64::from(loc.length),
                    (*id, loc),
                )),
                Err(e) => out.push((*id, Err(e))),
            }
        }
        for (pack, items) in by_pack {
            let name = Id(pack).to_hex();
            for range in coalesce(items) {
                let buf =
                    self.backend
                        .read_range(FileKind::Pack, &name, range.offset, range.length);
                for (offset, length, (id, loc)) in &range.items {
                    let blob = match &buf {
                        Ok(buf) => match range.slice(buf, *offset, *length) {
                            Some(raw) => self.open_blob_authenticated(id, loc, raw),
                            None => self.load_blob_authenticated(id),
                        },
                        Err(_) => self.load_blob_authenticated(id),
                    };
                    out.push((*id, blob));
                }
            }
        }
        out
    }

    fn open_blob_authenticated(&self, id: &Id, loc: &BlobLocation, raw: &[u8]) -> Result<Vec<u8>> {
        self.decode_with(id, loc, raw, blob::decode_authenticated)
    }

    /// Authenticates and decodes a blob's stored bytes, read by the caller
    /// (the restore planner reads many blobs in one range).
    pub fn open_blob(&self, id: &Id, loc: &BlobLocation, raw: &[u8]) -> Result<Vec<u8>> {
        self.decode_with(id, loc, raw, blob::decode)
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
        let data = self.read_blob_bytes(id, &Id(loc.pack).to_hex(), loc)?;
        self.decode_with(id, loc, &data, decode)
    }

    /// The one place a blob's stored bytes become plaintext: its type from
    /// the index, `decode` (hash-checked or tag-trusting), and the pack
    /// named in any error.
    fn decode_with(
        &self,
        id: &Id,
        loc: &BlobLocation,
        raw: &[u8],
        decode: blob::Decoder,
    ) -> Result<Vec<u8>> {
        let kind = BlobType::from_u8(loc.kind)
            .ok_or_else(|| Error::corrupt(format!("blob {id}"), "unknown blob type in index"))?;
        decode(&self.keys, kind, id, loc.flags, loc.raw_length, raw)
            .map_err(|e| e.in_pack(&Id(loc.pack).to_hex()))
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
        let planned = crate::repo::coordination::plans::planned_packs(self)?;
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
                .map_err(|err| err.in_pack(&name))?;
            out.push(e);
        }
        Ok(out)
    }

    /// Rebuilds all index files from pack trailers (`repair index`).
    /// New index files are written before old ones are removed.
    pub fn repair_index(&self) -> Result<RepairIndexReport> {
        let old = self.backend.list_names(FileKind::Index)?;
        let mut packs = Vec::new();
        let mut report = RepairIndexReport::default();
        let mut damaged: HashMap<Id, String> = HashMap::new();
        for (name, size) in self.backend.list(FileKind::Pack)? {
            let Some(id) = Id::from_hex(&name) else {
                continue;
            };
            match self.read_pack_trailer(&name, size) {
                Ok(entries) => {
                    report.blobs += entries.len() as u64;
                    packs.push((id, entries));
                }
                Err(e @ (Error::Corrupt { .. } | Error::Decrypt { .. })) => {
                    warn!(pack = %name, error = %e, "pack trailer damaged");
                    damaged.insert(id, name);
                }
                // A storage error says nothing about the pack: rebuilding
                // without it would unindex good data. Nothing changed yet.
                Err(e) => return Err(e),
            }
        }
        // The cache forgets every location (and every loaded file, so an
        // interrupted repair is followed by a full sync); what is written
        // from here on is cached as it is written.
        self.index.clear_blobs()?;
        // What the old index knew of damaged packs is kept, blob by blob,
        // where the blob authenticates: into new packs, indexed at once.
        if !damaged.is_empty() {
            for (pack, entries) in self.old_entries_of(&old, &damaged)? {
                let name = pack.to_hex();
                let copied = self.copy_blobs(&name, &entries, |e, why| {
                    report.blobs_lost.push(format!("{name}/{}: {why}", e.id));
                })?;
                for (_, new_entries) in copied {
                    report.blobs_salvaged += new_entries.len() as u64;
                    report.blobs += new_entries.len() as u64;
                    report.index_files_written += 1;
                }
            }
            report.unreadable_packs = damaged.into_values().collect();
            report.unreadable_packs.sort();
        }
        report.packs = packs.len() as u64;
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

    /// The entries the index files `names` list for the packs of `wanted`,
    /// once per blob; damaged index files are skipped (that may be why the
    /// index is being repaired), a storage error stops the repair.
    fn old_entries_of(
        &self,
        names: &[String],
        wanted: &HashMap<Id, String>,
    ) -> Result<HashMap<Id, Vec<PackEntry>>> {
        let mut found: HashMap<Id, Vec<PackEntry>> = HashMap::new();
        for name in names {
            let listed = match self.load_index_file(name) {
                Ok(l) => l,
                Err(e @ (Error::Corrupt { .. } | Error::Decrypt { .. })) => {
                    warn!(index = %name, error = %e, "index file damaged; skipped");
                    continue;
                }
                // The storage failing to answer is not damage: the repair
                // stops before removing the file that may be the only
                // record of a damaged pack's blobs.
                Err(e) => return Err(e),
            };
            for (pack, entries) in listed.into_iter().filter(|(p, _)| wanted.contains_key(p)) {
                let known = found.entry(pack).or_default();
                for e in entries {
                    if !known.iter().any(|k| k.id == e.id) {
                        known.push(e);
                    }
                }
            }
        }
        Ok(found)
    }

    /// Copies the blobs `entries` locates in `pack` into new packs, each
    /// authenticated on the way so damage is never propagated, and indexes
    /// each new pack as soon as it is stored. A blob that does not
    /// authenticate is handed to `damaged` and skipped; a storage error
    /// stops the copy.
    pub(crate) fn copy_blobs(
        &self,
        pack: &str,
        entries: &[PackEntry],
        mut damaged: impl FnMut(&PackEntry, &Error),
    ) -> Result<Vec<(Id, Vec<PackEntry>)>> {
        let mut out = Vec::new();
        let mut builder = pack::PackBuilder::default();
        let pack_size = self.config.pack_size as usize;
        for e in entries {
            let raw = self
                .backend
                .read_range(FileKind::Pack, pack, e.offset, u64::from(e.length))
                .and_then(|raw| {
                    blob::decode(&self.keys, e.kind, &e.id, e.flags, e.raw_length, &raw)?;
                    Ok(raw)
                });
            let raw = match raw {
                Ok(raw) => raw,
                Err(err @ (Error::Corrupt { .. } | Error::Decrypt { .. })) => {
                    damaged(e, &err);
                    continue;
                }
                Err(err) => return Err(err),
            };
            builder.add(blob::EncodedBlob {
                kind: e.kind,
                id: e.id,
                flags: e.flags,
                raw_length: e.raw_length,
                ciphertext: raw,
            })?;
            if builder.len() >= pack_size {
                out.push(self.store_pack(std::mem::take(&mut builder))?);
            }
        }
        if !builder.is_empty() {
            out.push(self.store_pack(builder)?);
        }
        Ok(out)
    }

    fn store_pack(&self, builder: pack::PackBuilder) -> Result<(Id, Vec<PackEntry>)> {
        let sealed = builder.seal(&self.keys)?;
        self.backend
            .write(FileKind::Pack, &sealed.id.to_hex(), sealed.bytes.into())?;
        // Indexed right away: the blobs must never be unindexed in between.
        self.write_index(&[(sealed.id, sealed.entries.clone())])?;
        Ok((sealed.id, sealed.entries))
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
                .write(FileKind::Pack, &sealed.id.to_hex(), sealed.bytes.into())?;
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
}
