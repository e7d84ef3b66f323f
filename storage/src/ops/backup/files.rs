//! File workers (open the listed file safely, read, chunk, hash, dedup)
//! and CPU workers (compress, encrypt): the bounded middle of the
//! pipeline.

use super::*;

pub(super) fn file_worker(saver: &Saver, jobs: Receiver<FileJob>, chunks: Sender<Chunk>) {
    // Reused for every file this worker reads.
    let mut buf = Vec::new();
    for job in jobs {
        if saver.aborted() {
            let _ = job.reply.send(Err("backup aborted".into()));
            continue;
        }
        let result = read_file(saver, &job, &chunks, &mut buf);
        let reply = match result {
            Ok(c) => Ok(c),
            Err(FileError::Source(msg)) => Err(msg),
            Err(FileError::Fatal(e)) => {
                saver.fail(e);
                Err("backup aborted".into())
            }
        };
        saver.progress.files_done.fetch_add(1, Ordering::Relaxed);
        let _ = job.reply.send(reply);
    }
}

pub(super) enum FileError {
    /// The source file could not be read: recorded, the backup goes on.
    Source(String),
    /// The repository side failed: the backup stops.
    Fatal(Error),
}

/// Opens the file the walk saw, relative to its directory: never through
/// a symlink (`O_NOFOLLOW`), never blocking on a fifo swapped in
/// (`O_NONBLOCK`), and only if device, inode and type still match.
pub(super) fn open_source(job: &FileJob) -> std::io::Result<File> {
    let fd = nix::fcntl::openat(
        &*job.dir,
        job.name.as_os_str(),
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(same_object(fd, &job.meta)?))
}

pub(super) fn read_file(
    saver: &Saver,
    job: &FileJob,
    chunks: &Sender<Chunk>,
    buf: &mut Vec<u8>,
) -> std::result::Result<FileContent, FileError> {
    if let Ok(mut cur) = saver.progress.current.try_lock() {
        cur.clear();
        cur.push_str(&job.path.to_string_lossy());
    }
    let f = open_source(job).map_err(|e| FileError::Source(e.to_string()))?;
    let keys = saver.repo.keys();
    let params = &saver.repo.config().chunker;
    // Fewer blocks than bytes: the file has holes worth looking for.
    let sparse = job.meta.blocks().saturating_mul(512) < job.meta.len();
    let mut chunker = Chunker::new(SparseFile::new(f, sparse), buf, params, keys.chunker_seed());
    let zero = sparse.then(|| saver.zero_chunk());
    if let Some((z, _)) = zero {
        chunker = chunker.skipping_holes(z, job.meta.len());
    }
    let mut ids = IdQueue::default();
    let mut size = 0u64;
    for piece in chunker {
        if saver.aborted() {
            return Err(FileError::Fatal(Error::Aborted("backup aborted".into())));
        }
        let piece =
            piece.map_err(|e| FileError::Source(format!("read failed at byte {size}: {e}")))?;
        let len = piece.len() as u64;
        size += len;
        saver.progress.bytes_read.fetch_add(len, Ordering::Relaxed);
        let data = match (piece, zero) {
            (Piece::Data(data), _) => data,
            (Piece::Zeros(_), Some((_, id))) => {
                // Only the first zero chunk of a backup is ever stored.
                if saver.claim(&id).map_err(FileError::Fatal)? {
                    send(chunks, Chunk::claimed(id, vec![0; len as usize]))?;
                }
                ids.push(Slot::Ready(id))?;
                continue;
            }
            (Piece::Zeros(_), None) => {
                return Err(FileError::Fatal(Error::Aborted(
                    "zero chunk without hole skipping".into(),
                )))
            }
        };
        if data.len() >= HASH_ELSEWHERE {
            // Big chunks are hashed by the cpu workers, so that reading
            // and cutting one large file overlaps with hashing it.
            let (tx, rx) = bounded(1);
            send(chunks, Chunk::to_hash(data, tx))?;
            ids.push(Slot::Pending(rx))?;
            continue;
        }
        let id = keys.content_id(&data);
        if saver.claim(&id).map_err(FileError::Fatal)? {
            send(chunks, Chunk::claimed(id, data))?;
        }
        ids.push(Slot::Ready(id))?;
    }
    let ids = ids.finish()?;
    if ids.len() <= tree::MAX_DIRECT_CHUNKS {
        return Ok(FileContent {
            content: ids,
            indirect: false,
            size,
        });
    }
    let mut lists = Vec::new();
    for part in ids.chunks(tree::CHUNK_LIST_LEN) {
        let id = saver
            .save_blob(BlobType::ChunkList, &tree::encode_chunk_list(part))
            .map_err(FileError::Fatal)?;
        lists.push(id);
    }
    Ok(FileContent {
        content: lists,
        indirect: true,
        size,
    })
}

pub(super) fn cpu_worker(saver: &Saver, chunks: Receiver<Chunk>) {
    for c in chunks {
        if saver.aborted() {
            continue;
        }
        let keys = saver.repo.keys();
        let (id, store) = match c.reply {
            None => (c.id, true),
            Some(reply) => {
                let id = keys.content_id(&c.data);
                let claimed = saver.claim(&id);
                // The file worker waits for the id whatever happens here.
                let _ = reply.send(claimed.as_ref().map(|_| id).map_err(|_| ()));
                match claimed {
                    Ok(claimed) => (id, claimed),
                    Err(e) => {
                        saver.fail(e);
                        continue;
                    }
                }
            }
        };
        if !store {
            continue;
        }
        let r = blob::encode(keys, BlobType::Data, id, &c.data, saver.level)
            .and_then(|b| saver.add_encoded(b));
        if let Err(e) = r {
            saver.fail(e);
        }
    }
}

/// Chunks at least this long are hashed by the cpu workers; smaller ones
/// (the only chunk of a small file, most often) where they are read, which
/// spares a hand-off per file.
const HASH_ELSEWHERE: usize = 128 << 10;

/// Chunks of one file whose ids are awaited at once: enough to keep every
/// cpu worker busy, few enough to bound what one file holds.
const IDS_IN_FLIGHT: usize = 16;

fn send(chunks: &Sender<Chunk>, c: Chunk) -> std::result::Result<(), FileError> {
    chunks
        .send(c)
        .map_err(|_| FileError::Fatal(Error::Aborted("compression workers stopped".into())))
}

enum Slot {
    Ready(Id),
    Pending(Receiver<std::result::Result<Id, ()>>),
}

/// A file's chunk ids in file order, some still being hashed elsewhere.
#[derive(Default)]
struct IdQueue {
    done: Vec<Id>,
    waiting: std::collections::VecDeque<Slot>,
    pending: usize,
}

impl IdQueue {
    fn push(&mut self, slot: Slot) -> std::result::Result<(), FileError> {
        if matches!(slot, Slot::Pending(_)) {
            self.pending += 1;
        }
        self.waiting.push_back(slot);
        while self.pending > IDS_IN_FLIGHT {
            self.resolve_front()?;
        }
        while matches!(self.waiting.front(), Some(Slot::Ready(_))) {
            self.resolve_front()?;
        }
        Ok(())
    }

    fn resolve_front(&mut self) -> std::result::Result<(), FileError> {
        let id = match self.waiting.pop_front() {
            None => return Ok(()),
            Some(Slot::Ready(id)) => id,
            Some(Slot::Pending(rx)) => {
                self.pending -= 1;
                // A worker that failed has recorded why; the backup stops.
                rx.recv().ok().and_then(|r| r.ok()).ok_or_else(|| {
                    FileError::Fatal(Error::Aborted("compression workers stopped".into()))
                })?
            }
        };
        self.done.push(id);
        Ok(())
    }

    fn finish(mut self) -> std::result::Result<Vec<Id>, FileError> {
        while !self.waiting.is_empty() {
            self.resolve_front()?;
        }
        Ok(self.done)
    }
}
