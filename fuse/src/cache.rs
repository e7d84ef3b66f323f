//! The chunk cache and the sequential-read prefetcher.
//!
//! Decrypted, verified chunks are kept in an LRU bounded by bytes, so each
//! chunk is decrypted and decompressed once however many reads touch it. A
//! small pool of prefetch threads loads the next chunks of a file being read
//! sequentially, so the next read finds them ready: a run of chunks is one
//! job, read with one ranged request per run of neighbours in a pack
//! (`Repository::load_blobs`), not one request per chunk. Concurrent
//! requests for the same chunk wait for one load instead of loading it
//! twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};

use crossbeam_channel::{bounded, Sender};
use lru::LruCache;
use marmoset_storage::{Id, Repository};
use tracing::{debug, error};

type Chunk = Arc<Vec<u8>>;

struct Inner {
    lru: LruCache<Id, Chunk>,
    bytes: usize,
    loading: HashSet<Id>,
    /// Chunks whose last load failed (corruption): reported, not cached.
    failed: HashMap<Id, String>,
}

pub struct ChunkCache {
    repo: Arc<Repository>,
    inner: Mutex<Inner>,
    loaded: Condvar,
    budget: usize,
    prefetch_tx: Sender<Vec<Id>>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ChunkCache {
    pub fn new(repo: Arc<Repository>, budget_bytes: usize, prefetch_threads: usize) -> Arc<Self> {
        let (tx, rx) = bounded::<Vec<Id>>(16);
        let cache = Arc::new(Self {
            repo,
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
                loading: HashSet::new(),
                failed: HashMap::new(),
            }),
            loaded: Condvar::new(),
            budget: budget_bytes.max(8 << 20),
            prefetch_tx: tx,
        });
        for _ in 0..prefetch_threads {
            let rx = rx.clone();
            let weak = Arc::downgrade(&cache);
            std::thread::spawn(move || {
                for batch in rx {
                    let Some(c) = weak.upgrade() else { break };
                    c.load_batch(&batch);
                }
            });
        }
        cache
    }

    /// Queues the chunks not cached or loading yet as one background job;
    /// drops it when the prefetchers are busy.
    pub fn prefetch(&self, ids: &[Id]) {
        let batch: Vec<Id> = {
            let mut g = lock(&self.inner);
            let batch: Vec<Id> = ids
                .iter()
                .filter(|id| !g.lru.contains(*id) && !g.loading.contains(*id))
                .copied()
                .collect();
            g.loading.extend(batch.iter().copied());
            batch
        };
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.prefetch_tx.try_send(batch) {
            let mut g = lock(&self.inner);
            for id in e.into_inner() {
                g.loading.remove(&id);
            }
            drop(g);
            self.loaded.notify_all();
        }
    }

    /// A prefetch job: the chunks (marked loading by `prefetch`) in
    /// coalesced reads. Errors are kept and reported when a reader asks.
    fn load_batch(&self, batch: &[Id]) {
        let results = self.repo.load_blobs(batch);
        let mut g = lock(&self.inner);
        for (id, r) in results {
            // A failure is kept in `failed` and reported to the reader.
            let _ = self.settle(&mut g, id, r.map_err(|e| e.to_string()));
        }
        for id in batch {
            g.loading.remove(id);
        }
        drop(g);
        self.loaded.notify_all();
    }

    /// Records a load's outcome: a chunk into the LRU (evicting to the
    /// budget), or a failure, logged once.
    fn settle(&self, g: &mut Inner, id: Id, r: Result<Vec<u8>, String>) -> Result<Chunk, String> {
        g.loading.remove(&id);
        match r {
            Ok(data) => {
                let c = Arc::new(data);
                g.bytes += c.len();
                g.failed.remove(&id);
                g.lru.put(id, c.clone());
                while g.bytes > self.budget {
                    match g.lru.pop_lru() {
                        Some((_, old)) => g.bytes -= old.len(),
                        None => break,
                    }
                }
                Ok(c)
            }
            Err(msg) => {
                if g.failed.insert(id, msg.clone()).is_none() {
                    error!(blob = %id, error = %msg, "chunk unreadable");
                }
                Err(msg)
            }
        }
    }

    /// Returns a chunk, loading (and verifying) it if needed.
    pub fn get(&self, id: &Id) -> Result<Chunk, String> {
        let mut g = lock(&self.inner);
        loop {
            if let Some(c) = g.lru.get(id) {
                return Ok(c.clone());
            }
            if !g.loading.contains(id) {
                break;
            }
            g = self
                .loaded
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        g.loading.insert(*id);
        drop(g);
        let result = self.repo.load_blob_authenticated(id);
        let mut g = lock(&self.inner);
        let out = self.settle(&mut g, *id, result.map_err(|e| e.to_string()));
        drop(g);
        self.loaded.notify_all();
        debug!(blob = %id.short(), "chunk loaded");
        out
    }
}
