//! The saver: blobs into packs, packs to the backend by the uploader
//! threads, index files once their packs are durable. It also remembers
//! which packs the backup relies on, for the checks before the snapshot.

use super::*;

pub(super) const PACK_QUEUE: usize = 1;
pub(super) const FILE_CACHE_SEP: u8 = 0;
/// Index files are written at least every this many packs (512 MiB), so
/// an interrupted backup loses little index work (its packs are found and
/// indexed by the next run anyway). Not fewer: every reader of the
/// repository fetches every index file, and at one per 8 packs they were
/// an eighth more requests on top of a restore's one read per pack.
pub(super) const PACKS_PER_INDEX: usize = 32;
/// ... or every this many blobs, whichever comes first: 32 packs of tiny
/// files hold millions of blobs, and all of their index entries waited in
/// memory (and then went into the index cache in one batch) — the peak
/// of a backup of a million small files.
pub(super) const ENTRIES_PER_INDEX: usize = 65_536;

/// Tree packs are smaller than data packs: a backup of millions of small
/// files writes hundreds of MiB of trees, and a 16 MiB tree pack growing
/// in memory beside the data packs was most of what such a backup's peak
/// memory gained over a small one. Whole-pack metadata reads stay few.
pub(super) fn tree_pack_size(pack_size: usize) -> usize {
    pack_size.min(4 << 20)
}

/// Room for a full tree pack and a last directory part, so filling it
/// never reallocates.
pub(super) fn tree_pack_capacity(pack_size: usize) -> usize {
    tree_pack_size(pack_size) + (1 << 20)
}

/// Shared state of the blob-saving half of the pipeline.
pub(super) struct Saver<'r> {
    pub(super) repo: &'r Repository,
    /// The backup's session lease: no index file is written once it may
    /// have looked stale (its packs may be gone by then).
    pub(super) session: &'r Lease,
    pub(super) level: i32,
    pub(super) pack_size: usize,
    /// Room for a full pack plus its largest possible last blob and the
    /// trailer, so sealing never reallocates (which would double memory).
    pub(super) pack_capacity: usize,
    pub(super) inflight: Mutex<HashSet<Id>>,
    /// Indexed packs that the storage does not hold (replayed index files,
    /// packs deleted since): their blobs are stored again, never reused.
    pub(super) missing_packs: HashSet<[u8; 32]>,
    /// Every pack holding a blob this backup references; all must still
    /// exist when the snapshot is written.
    pub(super) used_packs: Mutex<HashSet<[u8; 32]>>,
    pub(super) packer: Mutex<PackBuilder>,
    /// Trees and chunk lists: packs of their own.
    pub(super) tree_packer: Mutex<PackBuilder>,
    /// Taken (and so closed) once all blobs are queued.
    pub(super) upload_tx: Mutex<Option<Sender<PackBuilder>>>,
    pub(super) pending_index: Mutex<Vec<(Id, Vec<PackEntry>)>>,
    /// Index files this backup wrote, with the packs each lists: withdrawn
    /// if the lease is lost (their packs may be gone).
    pub(super) written_index: Mutex<Vec<(String, Vec<Id>)>>,
    pub(super) stats: Stats,
    pub(super) progress: &'r Progress,
    pub(super) abort: AtomicBool,
    pub(super) first_error: Mutex<Option<Error>>,
    /// The zero chunk of holes and its id, made on first use.
    pub(super) zero: OnceLock<(ZeroChunk, Id)>,
    /// The caller's stop flag ([`BackupOptions::cancel`]).
    pub(super) cancel: Option<Arc<AtomicBool>>,
}

#[derive(Default)]
pub(super) struct Stats {
    pub(super) bytes_added: AtomicU64,
    pub(super) data_blobs: AtomicU64,
    pub(super) tree_blobs: AtomicU64,
    pub(super) packs: AtomicU64,
}

impl<'r> Saver<'r> {
    pub(super) fn fail(&self, e: Error) {
        let mut slot = crate::util::lock(&self.first_error);
        if slot.is_none() {
            *slot = Some(e);
        }
        self.abort.store(true, Ordering::SeqCst);
    }

    pub(super) fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed) || self.cancelled()
    }

    pub(super) fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    }

    /// The chunk every hole is cut into, and its id.
    pub(super) fn zero_chunk(&self) -> (ZeroChunk, Id) {
        *self.zero.get_or_init(|| {
            let keys = self.repo.keys();
            let z = ZeroChunk::new(&self.repo.config().chunker, keys.chunker_seed());
            (z, keys.content_id(&vec![0; z.len]))
        })
    }

    /// Claims `id` for storing: false when the repository or this backup
    /// already has it.
    pub(super) fn claim(&self, id: &Id) -> Result<bool> {
        if self.known(id)? {
            return Ok(false);
        }
        let mut inflight = crate::util::lock(&self.inflight);
        Ok(inflight.insert(*id))
    }

    /// Whether a pack that exists holds `id`; records that pack as used.
    pub(super) fn known(&self, id: &Id) -> Result<bool> {
        let Some(loc) = self.repo.index().get_blob(&id.0)? else {
            return Ok(false);
        };
        if self.missing_packs.contains(&loc.pack) {
            return Ok(false);
        }
        let mut used = crate::util::lock(&self.used_packs);
        // Another backup on this handle may have written the pack and not
        // indexed it yet; if that backup failed, the pack would stay
        // unindexed under our snapshot. Such blobs are stored again.
        if self.repo.backups_running() > 1
            && !used.contains(&loc.pack)
            && self.repo.index().is_uncommitted(&loc.pack)?
        {
            return Ok(false);
        }
        used.insert(loc.pack);
        Ok(true)
    }

    pub(super) fn add_encoded(&self, blob: EncodedBlob) -> Result<()> {
        let len = blob.ciphertext.len() as u64;
        match blob.kind {
            BlobType::Data => self.stats.data_blobs.fetch_add(1, Ordering::Relaxed),
            _ => self.stats.tree_blobs.fetch_add(1, Ordering::Relaxed),
        };
        // Trees and chunk lists go to packs of their own (as restic does):
        // a remote restore or walk then fetches all metadata in a few whole
        // reads, and data packs hold nothing else.
        let is_data = blob.kind == BlobType::Data;
        let full = {
            let mut p = crate::util::lock(if is_data {
                &self.packer
            } else {
                &self.tree_packer
            });
            p.add(blob)?;
            let limit = if is_data {
                self.pack_size
            } else {
                tree_pack_size(self.pack_size)
            };
            if p.len() >= limit {
                let fresh = PackBuilder::with_capacity(if is_data {
                    self.pack_capacity
                } else {
                    tree_pack_capacity(self.pack_size)
                });
                Some(std::mem::replace(&mut *p, fresh))
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

    pub(super) fn send_pack(&self, pack: PackBuilder) -> Result<()> {
        let tx = crate::util::lock(&self.upload_tx).clone();
        tx.ok_or_else(|| Error::Aborted("pack writer closed".into()))?
            .send(pack)
            .map_err(|_| Error::Aborted("pack writer stopped".into()))
    }

    /// Stores a small blob (tree, chunk list) from the calling thread.
    pub(super) fn save_blob(&self, kind: BlobType, data: &[u8]) -> Result<Id> {
        let id = self.repo.keys().content_id(data);
        if self.claim(&id)? {
            self.add_encoded(blob::encode(self.repo.keys(), kind, id, data, self.level)?)?;
        }
        Ok(id)
    }

    pub(super) fn flush_packer(&self) -> Result<()> {
        for packer in [&self.packer, &self.tree_packer] {
            let last = std::mem::take(&mut *crate::util::lock(packer));
            if !last.is_empty() {
                self.send_pack(last)?;
            }
        }
        Ok(())
    }

    /// Uploader loop: seal, write, then make the blobs visible.
    pub(super) fn upload_loop(&self, rx: Receiver<PackBuilder>) {
        for builder in rx {
            if self.aborted() {
                continue;
            }
            if let Err(e) = self.upload_one(builder) {
                self.fail(e);
            }
        }
    }

    pub(super) fn upload_one(&self, builder: PackBuilder) -> Result<()> {
        let sealed = builder.seal(self.repo.keys())?;
        let name = sealed.id.to_hex();
        self.repo
            .backend()
            .write(FileKind::Pack, &name, sealed.bytes.into())?;
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
            let entries: usize = pending.iter().map(|(_, e)| e.len()).sum();
            if pending.len() >= PACKS_PER_INDEX || entries >= ENTRIES_PER_INDEX {
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

    pub(super) fn write_index(&self, batch: &[(Id, Vec<PackEntry>)]) -> Result<()> {
        let name = self.repo.write_index(batch)?;
        let packs = batch.iter().map(|(p, _)| *p).collect();
        crate::util::lock(&self.written_index).push((name, packs));
        Ok(())
    }

    /// After the lease was lost: index files of this run that list a pack
    /// that is gone are removed, so the repository stays consistent (packs
    /// that remain are indexed again by the next backup's recovery).
    pub(super) fn withdraw_index(&self) {
        let present: HashSet<String> = match self.repo.backend().list_names(FileKind::Pack) {
            Ok(l) => l.into_iter().collect(),
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
