//! The saver: blobs into packs, packs to the backend by the uploader
//! threads, index files once their packs are durable. It also remembers
//! which packs the backup relies on, for the checks before the snapshot.

use super::*;

/// Sealed packs waiting for an uploader: none. A full pack is handed over
/// when an uploader is free, so at most one pack fills while each uploader
/// writes one; a queued pack was 16 MiB more at the peak of every large
/// backup and gained nothing (the packer is rarely ahead of the uploads).
pub(crate) const PACK_QUEUE: usize = 0;
pub(crate) const FILE_CACHE_SEP: u8 = 0;
/// Index files are written at least every this many packs (512 MiB), so
/// an interrupted backup loses little index work (its packs are found and
/// indexed by the next run anyway). Not fewer: every reader of the
/// repository fetches every index file, and at one per 8 packs they were
/// an eighth more requests on top of a restore's one read per pack.
pub(crate) const PACKS_PER_INDEX: usize = 32;
/// ... or every this many blobs, whichever comes first: 32 packs of tiny
/// files hold millions of blobs, and all of their index entries waited in
/// memory (and then went into the index cache in one batch) — the peak
/// of a backup of a million small files.
pub(crate) const ENTRIES_PER_INDEX: usize = 65_536;

/// Tree packs are smaller than data packs: a backup of millions of small
/// files writes hundreds of MiB of trees, and a 16 MiB tree pack growing
/// in memory beside the data packs was most of what such a backup's peak
/// memory gained over a small one. Whole-pack metadata reads stay few.
pub(crate) fn tree_pack_size(pack_size: usize) -> usize {
    pack_size.min(4 << 20)
}

/// Room for a full tree pack and a last directory part, so filling it
/// never reallocates.
pub(crate) fn tree_pack_capacity(pack_size: usize) -> usize {
    tree_pack_size(pack_size) + (1 << 20)
}

/// Shared state of the blob-saving half of the pipeline.
pub(crate) struct Saver<'r> {
    pub(crate) repo: &'r Repository,
    /// The backup's session lease: no index file is written once it may
    /// have looked stale (its packs may be gone by then).
    pub(crate) session: &'r Lease,
    pub(crate) level: i32,
    pub(crate) pack_size: usize,
    /// Room for a full pack plus its largest possible last blob and the
    /// trailer, so sealing never reallocates (which would double memory).
    pub(crate) pack_capacity: usize,
    pub(crate) inflight: Mutex<HashSet<Id>>,
    /// Indexed packs that the storage does not hold (replayed index files,
    /// packs deleted since): their blobs are stored again, never reused.
    pub(crate) missing_packs: HashSet<[u8; 32]>,
    /// Every pack holding a blob this backup references; all must still
    /// exist when the snapshot is written.
    pub(crate) used_packs: Mutex<HashSet<[u8; 32]>>,
    pub(crate) packer: Mutex<PackBuilder>,
    /// Trees and chunk lists: packs of their own.
    pub(crate) tree_packer: Mutex<PackBuilder>,
    /// Taken (and so closed) once all blobs are queued.
    pub(crate) upload_tx: Mutex<Option<Sender<PackBuilder>>>,
    pub(crate) pending_index: Mutex<Vec<(Id, Vec<PackEntry>)>>,
    /// Index files this backup wrote, with the packs each lists: withdrawn
    /// if the lease is lost (their packs may be gone).
    pub(crate) written_index: Mutex<Vec<(String, Vec<Id>)>>,
    pub(crate) stats: Stats,
    pub(crate) progress: &'r Progress,
    pub(crate) abort: AtomicBool,
    pub(crate) first_error: Mutex<Option<Error>>,
    /// The zero chunk of holes and its id, made on first use.
    pub(crate) zero: OnceLock<(ZeroChunk, Id)>,
    /// The caller's stop flag ([`BackupOptions::cancel`]).
    pub(crate) cancel: Option<Arc<AtomicBool>>,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) bytes_added: AtomicU64,
    pub(crate) data_blobs: AtomicU64,
    pub(crate) tree_blobs: AtomicU64,
    pub(crate) packs: AtomicU64,
}

impl<'r> Saver<'r> {
    /// A saver for `repo` under `session`, with no upload channel yet (the
    /// caller opens it when it starts the uploader threads).
    pub(crate) fn new(
        repo: &'r Repository,
        session: &'r Lease,
        missing_packs: HashSet<[u8; 32]>,
        progress: &'r Progress,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Self {
        let pack_size = repo.config().pack_size as usize;
        let pack_capacity = pack_size + repo.config().chunker.max_size as usize + (1 << 20);
        Saver {
            repo,
            session,
            level: repo.config().compression_level,
            pack_size,
            pack_capacity,
            inflight: Mutex::new(HashSet::new()),
            missing_packs,
            used_packs: Mutex::new(HashSet::new()),
            packer: Mutex::new(PackBuilder::with_capacity(pack_capacity)),
            tree_packer: Mutex::new(PackBuilder::with_capacity(tree_pack_capacity(pack_size))),
            upload_tx: Mutex::new(None),
            pending_index: Mutex::new(Vec::new()),
            written_index: Mutex::new(Vec::new()),
            stats: Stats::default(),
            progress,
            abort: AtomicBool::new(false),
            first_error: Mutex::new(None),
            zero: OnceLock::new(),
            cancel,
        }
    }

    pub(crate) fn fail(&self, e: Error) {
        let mut slot = crate::util::lock(&self.first_error);
        if slot.is_none() {
            *slot = Some(e);
        }
        self.abort.store(true, Ordering::SeqCst);
    }

    pub(crate) fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed) || self.cancelled()
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    }

    /// The chunk every hole is cut into, and its id.
    pub(crate) fn zero_chunk(&self) -> (ZeroChunk, Id) {
        *self.zero.get_or_init(|| {
            let keys = self.repo.keys();
            let z = ZeroChunk::new(&self.repo.config().chunker, keys.chunker_seed());
            (z, keys.content_id(&vec![0; z.len]))
        })
    }

    /// Claims `id` for storing: false when the repository or this backup
    /// already has it.
    pub(crate) fn claim(&self, id: &Id) -> Result<bool> {
        if self.known(id)? {
            return Ok(false);
        }
        let mut inflight = crate::util::lock(&self.inflight);
        Ok(inflight.insert(*id))
    }

    /// Whether a pack that exists holds `id`; records that pack as used.
    pub(crate) fn known(&self, id: &Id) -> Result<bool> {
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

    pub(crate) fn add_encoded(&self, blob: EncodedBlob) -> Result<()> {
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

    pub(crate) fn send_pack(&self, pack: PackBuilder) -> Result<()> {
        let tx = crate::util::lock(&self.upload_tx).clone();
        tx.ok_or_else(|| Error::Aborted("pack writer closed".into()))?
            .send(pack)
            .map_err(|_| Error::Aborted("pack writer stopped".into()))
    }

    /// Stores a small blob (tree, chunk list) from the calling thread.
    pub(crate) fn save_blob(&self, kind: BlobType, data: &[u8]) -> Result<Id> {
        let id = self.repo.keys().content_id(data);
        if self.claim(&id)? {
            self.add_encoded(blob::encode(self.repo.keys(), kind, id, data, self.level)?)?;
        }
        Ok(id)
    }

    pub(crate) fn flush_packer(&self) -> Result<()> {
        for packer in [&self.packer, &self.tree_packer] {
            let last = std::mem::take(&mut *crate::util::lock(packer));
            if !last.is_empty() {
                self.send_pack(last)?;
            }
        }
        Ok(())
    }

    /// Uploader loop: seal, write, then make the blobs visible.
    pub(crate) fn upload_loop(&self, rx: Receiver<PackBuilder>) {
        for builder in rx {
            if self.aborted() {
                continue;
            }
            if let Err(e) = self.upload_one(builder) {
                self.fail(e);
            }
        }
    }

    pub(crate) fn upload_one(&self, builder: PackBuilder) -> Result<()> {
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

    /// Indexes the packs still waiting for an index file.
    pub(crate) fn flush_index(&self) -> Result<()> {
        let rest = std::mem::take(&mut *crate::util::lock(&self.pending_index));
        if !rest.is_empty() {
            self.write_index(&rest)?;
        }
        self.repo.index().flush()?;
        Ok(())
    }

    pub(crate) fn write_index(&self, batch: &[(Id, Vec<PackEntry>)]) -> Result<()> {
        let name = self.repo.write_index(batch)?;
        let packs = batch.iter().map(|(p, _)| *p).collect();
        crate::util::lock(&self.written_index).push((name, packs));
        Ok(())
    }

    /// After the lease was lost: index files of this run that list a pack
    /// that is gone are removed, so the repository stays consistent (packs
    /// that remain are indexed again by the next backup's recovery).
    pub(crate) fn withdraw_index(&self) {
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

/// What a writer (backup, copy) starts from: its session lease, taken
/// before the index is read, and the state of the repository then.
pub(crate) struct WriteStart {
    pub(crate) session: Lease,
    /// Index files when the writer started: if one goes, a maintenance
    /// may have hidden blobs the writer deduplicated against.
    pub(crate) index_at_start: HashSet<String>,
    /// Packs the index knows that the storage does not hold.
    pub(crate) missing_packs: HashSet<[u8; 32]>,
    pub(crate) snapshots: crate::repo::SnapshotList,
}

/// Takes the session lease, then syncs the index and lists packs and
/// snapshots; a writer running alone on this handle first indexes the
/// packs an interrupted run left.
pub(crate) fn begin_write(
    repo: &Repository,
    active: &crate::repo::ActiveBackup<'_>,
    label: &str,
) -> Result<WriteStart> {
    // The session lease comes before the index is read: maintenance waits
    // for every session that may have seen blobs it is about to delete.
    let session = Lease::acquire(
        repo.backend().clone(),
        repo.keys(),
        LeaseKind::Session,
        label,
    )?;
    crate::repo::coordination::clock::refuse_clock_skew(session.storage_now()?)?;
    // The snapshots (for the parent) are read beside the index and pack
    // listings: over a WAN each read is a round trip. Packs are listed
    // after the index: a pack is written before any index file naming it,
    // so every indexed pack missing from the listing is really gone.
    // The packs the index knows are taken before the listing too: a pack
    // that a concurrent backup on this handle indexes meanwhile is then
    // not taken for a lost one.
    let (index_at_start, indexed, packs, snapshots) = std::thread::scope(|s| {
        let snapshots = s.spawn(|| repo.snapshots());
        let index = repo.sync_index_names();
        let indexed = index.as_ref().ok().map(|_| repo.index().packs());
        let packs = index
            .as_ref()
            .ok()
            .map(|_| repo.backend().list(FileKind::Pack));
        let snapshots = snapshots
            .join()
            .map_err(|_| Error::Aborted("listing snapshots panicked".into()))?;
        Ok::<_, Error>((
            index?,
            indexed.transpose()?.unwrap_or_default(),
            packs.transpose()?.unwrap_or_default(),
            snapshots?,
        ))
    })?;
    // One listing serves both: recovery adds no pack. Unindexed packs are
    // another backup's work in progress while one runs on this handle:
    // recovery waits for a backup that starts alone.
    if active.alone {
        let recovered = repo.recover_unindexed_packs(&packs)?;
        if recovered > 0 {
            debug!(recovered, "reusing packs of an interrupted backup");
        }
    }
    Ok(WriteStart {
        session,
        index_at_start,
        missing_packs: missing_packs(indexed, &packs),
        snapshots,
    })
}

/// Commits `snap`, whose trees `root_parts` and their blobs `saver` has
/// stored (every pack durable, its uploaders joined): index files for the
/// remaining packs, then the snapshot, in this order, so the snapshot never
/// references a blob that no index lists. Nothing more is indexed once the
/// lease may have looked stale to maintenance; a snapshot written after
/// that is withdrawn.
pub(crate) fn commit_snapshot(
    repo: &Repository,
    saver: &Saver<'_>,
    session: &Lease,
    root_parts: &[Id],
    index_at_start: &HashSet<String>,
    snap: &Snapshot,
) -> Result<Id> {
    let lost = |e: Error| {
        if matches!(e, Error::LeaseLost { .. } | Error::PacksVanished { .. }) {
            saver.withdraw_index();
        }
        e
    };
    session.check_present().map_err(lost)?;
    saver.flush_index()?;
    // A maintenance hid packs while we ran: make sure every blob we
    // referenced (possibly by dedup against now-hidden packs) is indexed.
    rescue_if_overlapping(repo, root_parts, &session.name, index_at_start)?;
    let used = std::mem::take(&mut *crate::util::lock(&saver.used_packs));
    confirm_packs_exist(repo, &used).map_err(lost)?;
    session.check_present().map_err(lost)?;
    if saver.cancelled() {
        return Err(Error::Aborted("backup cancelled".into()));
    }
    let id = repo.save_snapshot(snap)?;
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
    rescue_if_overlapping(repo, root_parts, &session.name, index_at_start)?;
    Ok(id)
}
