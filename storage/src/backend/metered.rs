//! Request metering around any backend: calls by kind, payload bytes each
//! way and failed calls, for the `--json` and human summaries and for
//! storages that bill by request.
//!
//! The counts are of calls as the engine makes them, whatever the storage:
//! one `list` is one LIST here even where S3 pages through several, and one
//! `write` is one PUT even where it became a multipart upload. Retries are
//! counted by [`super::retry::RetryBackend`] below this layer and added in
//! through [`ReadBackend::stats`], so stack at most one metered layer.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::{Bytes, DeleteBackend, FileKind, ListBackend, ObjectInfo, ReadBackend, WriteBackend};
use crate::error::{Error, Result};

/// Request counts and bytes of one backend stack.
///
/// The `b2_class_*` fields are a billing view of the same counts
/// (Backblaze B2 bills class A — uploads, deletes: free —, class B —
/// downloads, HEAD — and class C — listings — differently); they are kept
/// up to date by [`RequestStats::add`].
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct RequestStats {
    /// Whole-object reads.
    pub get: u64,
    /// Ranged reads.
    pub get_range: u64,
    /// Size queries.
    pub head: u64,
    /// Writes (each a PUT, or one multipart upload).
    pub put: u64,
    /// Listings.
    pub list: u64,
    /// Removals.
    pub delete: u64,
    /// Calls that failed after all retries (`NotFound` excluded: the
    /// engine asks for objects that may not exist and handles the answer).
    pub errors: u64,
    /// Attempts repeated after a transient error.
    pub retries: u64,
    /// Payload bytes written.
    pub bytes_up: u64,
    /// Payload bytes read.
    pub bytes_down: u64,
    pub b2_class_a: u64,
    pub b2_class_b: u64,
    pub b2_class_c: u64,
}

impl RequestStats {
    /// Adds `other`'s counts to these and updates the billing classes.
    pub fn add(&mut self, other: &RequestStats) {
        self.get += other.get;
        self.get_range += other.get_range;
        self.head += other.head;
        self.put += other.put;
        self.list += other.list;
        self.delete += other.delete;
        self.errors += other.errors;
        self.retries += other.retries;
        self.bytes_up += other.bytes_up;
        self.bytes_down += other.bytes_down;
        self.b2_class_a = self.put + self.delete;
        self.b2_class_b = self.get + self.get_range + self.head;
        self.b2_class_c = self.list;
    }

    /// Every request, of any kind.
    pub fn requests(&self) -> u64 {
        self.get + self.get_range + self.head + self.put + self.list + self.delete
    }
}

#[derive(Default)]
struct Counters {
    get: AtomicU64,
    get_range: AtomicU64,
    head: AtomicU64,
    put: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
    errors: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// Any backend, with request and byte counters.
pub struct MeteredBackend<B> {
    inner: B,
    counters: Counters,
}

impl<B> MeteredBackend<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            counters: Counters::default(),
        }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// This layer's own counts (without the layers below: see
    /// [`ReadBackend::stats`] for the whole stack's).
    pub fn counted(&self) -> RequestStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = RequestStats::default();
        s.add(&RequestStats {
            get: l(&c.get),
            get_range: l(&c.get_range),
            head: l(&c.head),
            put: l(&c.put),
            list: l(&c.list),
            delete: l(&c.delete),
            errors: l(&c.errors),
            bytes_up: l(&c.bytes_up),
            bytes_down: l(&c.bytes_down),
            ..RequestStats::default()
        });
        s
    }

    /// Counts one call of `counter` and, if it failed for good, an error.
    fn count<T>(&self, counter: &AtomicU64, r: Result<T>) -> Result<T> {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &r {
            if !matches!(e, Error::NotFound { .. }) {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<B: ReadBackend> ReadBackend for MeteredBackend<B> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        let r = self.count(&self.counters.get, self.inner.read(kind, name))?;
        self.counters
            .bytes_down
            .fetch_add(r.len() as u64, Ordering::Relaxed);
        Ok(r)
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let r = self.count(
            &self.counters.get_range,
            self.inner.read_range(kind, name, offset, length),
        )?;
        self.counters
            .bytes_down
            .fetch_add(r.len() as u64, Ordering::Relaxed);
        Ok(r)
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        self.count(&self.counters.head, self.inner.size(kind, name))
    }

    /// This layer's counts plus whatever the layers below report (the
    /// retries of a retry layer).
    fn stats(&self) -> Option<RequestStats> {
        let mut s = self.counted();
        if let Some(below) = self.inner.stats() {
            s.add(&below);
        }
        Some(s)
    }

    fn write_parallelism(&self) -> usize {
        self.inner.write_parallelism()
    }

    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
}

impl<B: ListBackend> ListBackend for MeteredBackend<B> {
    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        self.count(&self.counters.list, self.inner.list(kind))
    }

    fn list_info(&self, kind: FileKind) -> Result<Vec<ObjectInfo>> {
        self.count(&self.counters.list, self.inner.list_info(kind))
    }
}

impl<B: WriteBackend> WriteBackend for MeteredBackend<B> {
    /// Preparing the location is set-up, not a metered request.
    fn create(&self) -> Result<()> {
        self.inner.create()
    }

    fn write(&self, kind: FileKind, name: &str, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.count(&self.counters.put, self.inner.write(kind, name, data))?;
        self.counters.bytes_up.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

impl<B: DeleteBackend> DeleteBackend for MeteredBackend<B> {
    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        self.count(&self.counters.delete, self.inner.remove(kind, name))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::super::retry::tests::Flaky;
    use super::super::retry::{RetryBackend, RetryPolicy};
    use super::*;

    #[test]
    fn counts_every_request_by_kind() -> Result<()> {
        let b = MeteredBackend::new(Flaky::default());
        b.create()?;
        b.write(FileKind::Pack, "p", Bytes::from_static(b"0123456789"))?;
        b.write(FileKind::Snapshot, "s", Bytes::from_static(b"abc"))?;
        assert_eq!(b.read(FileKind::Pack, "p")?.len(), 10);
        assert_eq!(b.read_range(FileKind::Pack, "p", 2, 4)?, b"2345");
        assert_eq!(b.read_range(FileKind::Pack, "p", 0, 1)?, b"0");
        assert_eq!(b.size(FileKind::Snapshot, "s")?, 3);
        assert_eq!(b.list(FileKind::Pack)?.len(), 1);
        assert_eq!(b.list_info(FileKind::Snapshot)?.len(), 1);
        b.remove(FileKind::Snapshot, "s")?;
        // A missing object is an answer, not an error; a failure is one.
        assert!(b.read(FileKind::Snapshot, "s").is_err());
        b.inner().failures.store(1, Ordering::Relaxed);
        assert!(b.size(FileKind::Pack, "p").is_err());
        let mut want = RequestStats::default();
        want.add(&RequestStats {
            get: 2,
            get_range: 2,
            head: 2,
            put: 2,
            list: 2,
            delete: 1,
            errors: 1,
            retries: 0,
            bytes_up: 13,
            bytes_down: 15,
            ..RequestStats::default()
        });
        assert_eq!(b.stats(), Some(want.clone()));
        assert_eq!(b.counted(), want);
        assert_eq!(
            (want.b2_class_a, want.b2_class_b, want.b2_class_c),
            (3, 6, 2)
        );
        assert_eq!(want.requests(), 11);
        Ok(())
    }

    #[test]
    fn retries_below_are_reported_with_the_counts() -> Result<()> {
        let policy = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        };
        let b = MeteredBackend::new(RetryBackend::new(Flaky::default(), policy));
        b.inner().inner().failures.store(2, Ordering::Relaxed);
        b.write(FileKind::Index, "i", Bytes::from_static(b"index"))?;
        let s = b.stats().unwrap_or_default();
        assert_eq!((s.put, s.retries, s.errors, s.bytes_up), (1, 2, 0, 5));
        Ok(())
    }

    #[test]
    fn serializes_with_the_field_names_of_the_json_summary() -> Result<()> {
        let v = serde_json::to_value(RequestStats::default())
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        for field in [
            "put",
            "get",
            "head",
            "list",
            "delete",
            "retries",
            "bytes_up",
            "bytes_down",
        ] {
            assert!(v.get(field).is_some(), "{field} in {v}");
        }
        Ok(())
    }
}
