//! The chunk cache and the sequential-read prefetcher.
//!
//! Decrypted, verified chunks are kept in an LRU bounded by bytes, so each
//! chunk is decrypted and decompressed once however many reads touch it. A
//! small pool of prefetch threads loads the next chunks of a file being read
//! sequentially, so the next read finds them ready. Concurrent requests for
//! the same chunk wait for one load instead of loading it twice.

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
    prefetch_tx: Sender<Id>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ChunkCache {
    pub fn new(repo: Arc<Repository>, budget_bytes: usize, prefetch_threads: usize) -> Arc<Self> {
        let (tx, rx) = bounded::<Id>(256);
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
                for id in rx {
                    let Some(c) = weak.upgrade() else { break };
                    // Errors are reported when a reader asks for the chunk.
                    let _ = c.get(&id);
                }
            });
        }
        cache
    }

    /// Queues chunks for background loading; drops requests when busy.
    pub fn prefetch(&self, ids: &[Id]) {
        for id in ids {
            let skip = {
                let g = lock(&self.inner);
                g.lru.contains(id) || g.loading.contains(id)
            };
            if !skip && self.prefetch_tx.try_send(*id).is_err() {
                break;
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
        g.loading.remove(id);
        let out = match result {
            Ok(data) => {
                let c = Arc::new(data);
                g.bytes += c.len();
                g.failed.remove(id);
                g.lru.put(*id, c.clone());
                while g.bytes > self.budget {
                    match g.lru.pop_lru() {
                        Some((_, old)) => g.bytes -= old.len(),
                        None => break,
                    }
                }
                Ok(c)
            }
            Err(e) => {
                let msg = e.to_string();
                if g.failed.insert(*id, msg.clone()).is_none() {
                    error!(blob = %id, error = %msg, "chunk unreadable");
                }
                Err(msg)
            }
        };
        drop(g);
        self.loaded.notify_all();
        debug!(blob = %id.short(), "chunk loaded");
        out
    }
}
