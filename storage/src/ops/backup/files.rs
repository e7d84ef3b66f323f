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
    let chunker = Chunker::new(f, buf, &saver.repo.config().chunker, keys.chunker_seed());
    let mut ids = Vec::new();
    let mut size = 0u64;
    for chunk in chunker {
        if saver.aborted() {
            return Err(FileError::Fatal(Error::Aborted("backup aborted".into())));
        }
        let data =
            chunk.map_err(|e| FileError::Source(format!("read failed at byte {size}: {e}")))?;
        let len = data.len() as u64;
        size += len;
        saver.progress.bytes_read.fetch_add(len, Ordering::Relaxed);
        let id = keys.content_id(&data);
        ids.push(id);
        if saver.claim(&id).map_err(FileError::Fatal)? {
            chunks.send(Chunk { id, data }).map_err(|_| {
                FileError::Fatal(Error::Aborted("compression workers stopped".into()))
            })?;
        }
    }
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
        let r = blob::encode(
            saver.repo.keys(),
            BlobType::Data,
            c.id,
            &c.data,
            saver.level,
        )
        .and_then(|b| saver.add_encoded(b));
        if let Err(e) = r {
            saver.fail(e);
        }
    }
}
