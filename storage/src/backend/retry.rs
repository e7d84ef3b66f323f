//! Retries around any backend, as Kopia's retrying storage: a call whose
//! error is [`Error::retryable`] (timeouts, resets, "slow down", 5xx) is
//! repeated after a capped exponential backoff with full jitter; any other
//! error, `NotFound` above all, is returned at once.
//!
//! Every operation may be repeated: reads and listings have no effect,
//! writes create or atomically replace a whole object (content-addressed,
//! or replaced whole by design), and removing a missing object is not an
//! error. A retried write sends the same shared [`Bytes`], never a copy.
//!
//! The storages below make a single attempt per call, so this is the only
//! place that decides how often and how long to try.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tracing::warn;

use super::{
    Bytes, DeleteBackend, FileKind, ListBackend, ObjectInfo, ReadBackend, RequestStats,
    WriteBackend,
};
use crate::error::{Error, Result};

/// How often and how patiently to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (0 is taken as 1).
    pub max_attempts: u32,
    /// The backoff cap before the first retry is twice this; it doubles
    /// with every further retry.
    pub base_delay: Duration,
    /// The backoff cap never exceeds this.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// Ten attempts, waits drawn from 0..=400 ms, 0..=800 ms, ... capped at
    /// 20 s: about a minute and a half of patience in the worst case, enough
    /// to ride out an S3 "slow down" or a load balancer restart.
    fn default() -> Self {
        Self {
            max_attempts: 10,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 = the first retry), for a
    /// `jitter` drawn uniformly from `0.0..=1.0` ("full jitter": anywhere
    /// between zero and the capped exponential bound, so many clients
    /// failing together do not come back together). Pure, so it can be
    /// tested without sleeping.
    pub fn delay(&self, retry: u32, jitter: f64) -> Duration {
        let cap = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.max_delay);
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            1.0
        };
        Duration::try_from_secs_f64(cap.as_secs_f64() * jitter).unwrap_or(cap)
    }

    fn attempts(&self) -> u32 {
        self.max_attempts.max(1)
    }
}

/// Any backend, with retries. See the module documentation.
pub struct RetryBackend<B> {
    inner: B,
    policy: RetryPolicy,
    retries: AtomicU64,
}

impl<B> RetryBackend<B> {
    pub fn new(inner: B, policy: RetryPolicy) -> Self {
        Self {
            inner,
            policy,
            retries: AtomicU64::new(0),
        }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Retries made so far (attempts beyond each call's first).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Runs `call` until it succeeds, fails for good, or the attempts are
    /// used up. `op`, `kind` and `name` name the object in the log.
    fn run<T>(
        &self,
        op: &'static str,
        kind: FileKind,
        name: &str,
        mut call: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let attempts = self.policy.attempts();
        let mut attempt = 1;
        loop {
            match call() {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable() && attempt < attempts => {
                    let wait = self.policy.delay(attempt, rand::thread_rng().gen::<f64>());
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        op,
                        kind = %kind,
                        name,
                        attempt,
                        max_attempts = attempts,
                        error = %e,
                        "transient backend error; retrying in {} ms",
                        wait.as_millis()
                    );
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                Err(e) if e.retryable() => return Err(gave_up(e, attempt)),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Says in the message that the error outlived every attempt.
fn gave_up(e: Error, attempts: u32) -> Error {
    match e {
        Error::Backend {
            op,
            kind,
            name,
            source,
        } => Error::Backend {
            op,
            kind,
            name,
            source: std::io::Error::new(
                source.kind(),
                format!("{source} (gave up after {attempts} attempts)"),
            ),
        },
        other => other,
    }
}

impl<B: ReadBackend> ReadBackend for RetryBackend<B> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        self.run("read", kind, name, || self.inner.read(kind, name))
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        self.run("read", kind, name, || {
            self.inner.read_range(kind, name, offset, length)
        })
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        self.run("stat", kind, name, || self.inner.size(kind, name))
    }

    /// The stack's counts below, plus this layer's retries.
    fn stats(&self) -> Option<RequestStats> {
        let mut s = self.inner.stats().unwrap_or_default();
        s.add(&RequestStats {
            retries: self.retries(),
            ..RequestStats::default()
        });
        Some(s)
    }

    fn write_parallelism(&self) -> usize {
        self.inner.write_parallelism()
    }

    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
}

impl<B: ListBackend> ListBackend for RetryBackend<B> {
    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        self.run("list", kind, "", || self.inner.list(kind))
    }

    fn list_info(&self, kind: FileKind) -> Result<Vec<ObjectInfo>> {
        self.run("list", kind, "", || self.inner.list_info(kind))
    }
}

impl<B: WriteBackend> WriteBackend for RetryBackend<B> {
    fn create(&self) -> Result<()> {
        self.run("create", FileKind::Config, "", || self.inner.create())
    }

    fn write(&self, kind: FileKind, name: &str, data: Bytes) -> Result<()> {
        self.run("write", kind, name, || {
            self.inner.write(kind, name, data.clone())
        })
    }
}

impl<B: DeleteBackend> DeleteBackend for RetryBackend<B> {
    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        self.run("remove", kind, name, || self.inner.remove(kind, name))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicU32;
    use std::sync::Mutex;

    use super::*;

    /// An in-memory backend whose calls fail with a transient error while
    /// `failures` lasts, counting every call it receives.
    #[derive(Default)]
    pub(crate) struct Flaky {
        objects: Mutex<HashMap<(FileKind, String), Vec<u8>>>,
        pub(crate) failures: AtomicU32,
        pub(crate) calls: AtomicU32,
    }

    impl Flaky {
        fn failing(n: u32) -> Self {
            let f = Flaky::default();
            f.failures.store(n, Ordering::Relaxed);
            f
        }

        /// Counts the call and fails it while failures are left.
        fn attempt(&self, op: &'static str, kind: FileKind, name: &str) -> Result<()> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let left = self.failures.load(Ordering::Relaxed);
            if left > 0 {
                self.failures.store(left - 1, Ordering::Relaxed);
                return Err(Error::Backend {
                    op,
                    kind,
                    name: name.to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "injected"),
                });
            }
            Ok(())
        }

        fn get(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
            let objects = self
                .objects
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            objects
                .get(&(kind, name.to_string()))
                .cloned()
                .ok_or_else(|| Error::NotFound {
                    kind,
                    name: name.to_string(),
                })
        }
    }

    impl ReadBackend for Flaky {
        fn location(&self) -> String {
            "flaky".into()
        }
        fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
            self.attempt("read", kind, name)?;
            self.get(kind, name)
        }
        fn read_range(
            &self,
            kind: FileKind,
            name: &str,
            offset: u64,
            length: u64,
        ) -> Result<Vec<u8>> {
            self.attempt("read", kind, name)?;
            let data = self.get(kind, name)?;
            let (start, end) = (offset as usize, (offset + length) as usize);
            data.get(start..end)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| Error::corrupt(format!("{kind} {name}"), "short"))
        }
        fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
            self.attempt("stat", kind, name)?;
            Ok(self.get(kind, name)?.len() as u64)
        }
    }

    impl ListBackend for Flaky {
        fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
            self.attempt("list", kind, "")?;
            let objects = self
                .objects
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Ok(objects
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .map(|((_, n), d)| (n.clone(), d.len() as u64))
                .collect())
        }
    }

    impl WriteBackend for Flaky {
        fn create(&self) -> Result<()> {
            self.attempt("create", FileKind::Config, "")
        }
        fn write(&self, kind: FileKind, name: &str, data: Bytes) -> Result<()> {
            self.attempt("write", kind, name)?;
            self.objects
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert((kind, name.to_string()), data.to_vec());
            Ok(())
        }
    }

    impl DeleteBackend for Flaky {
        fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
            self.attempt("remove", kind, name)?;
            self.objects
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&(kind, name.to_string()));
            Ok(())
        }
    }

    fn no_wait(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        }
    }

    #[test]
    fn a_transient_error_is_retried_until_it_succeeds() -> Result<()> {
        let b = RetryBackend::new(Flaky::default(), no_wait(5));
        b.write(FileKind::Pack, "p1", Bytes::from_static(b"pack"))?;
        b.inner().failures.store(3, Ordering::Relaxed);
        b.inner().calls.store(0, Ordering::Relaxed);
        assert_eq!(b.read(FileKind::Pack, "p1")?, b"pack");
        assert_eq!(b.inner().calls.load(Ordering::Relaxed), 4);
        assert_eq!(b.retries(), 3);
        assert_eq!(b.stats().map(|s| s.retries), Some(3));
        // Writes and ranged reads are repeated too.
        b.inner().failures.store(2, Ordering::Relaxed);
        b.write(FileKind::Pack, "p2", Bytes::from_static(b"0123456789"))?;
        b.inner().failures.store(2, Ordering::Relaxed);
        assert_eq!(b.read_range(FileKind::Pack, "p2", 2, 3)?, b"234");
        assert_eq!(b.retries(), 7);
        Ok(())
    }

    #[test]
    fn not_found_is_never_retried() {
        let b = RetryBackend::new(Flaky::default(), no_wait(5));
        assert!(matches!(
            b.read(FileKind::Snapshot, "missing"),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            b.size(FileKind::Snapshot, "missing"),
            Err(Error::NotFound { .. })
        ));
        assert_eq!(b.inner().calls.load(Ordering::Relaxed), 2);
        assert_eq!(b.retries(), 0);
    }

    #[test]
    fn corruption_is_never_retried() {
        let b = RetryBackend::new(Flaky::default(), no_wait(5));
        assert!(b
            .write(FileKind::Pack, "p", Bytes::from_static(b"abc"))
            .is_ok());
        assert!(matches!(
            b.read_range(FileKind::Pack, "p", 2, 5),
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(b.inner().calls.load(Ordering::Relaxed), 2);
        assert_eq!(b.retries(), 0);
    }

    #[test]
    fn gives_up_after_max_attempts_and_says_so() {
        let b = RetryBackend::new(Flaky::failing(100), no_wait(4));
        let err = b
            .list(FileKind::Index)
            .err()
            .map(|e| (e.retryable(), e.to_string()));
        assert_eq!(b.inner().calls.load(Ordering::Relaxed), 4);
        assert_eq!(b.retries(), 3);
        let (retryable, msg) = err.unwrap_or_default();
        assert!(retryable, "the error keeps its kind");
        assert!(msg.contains("gave up after 4 attempts"), "{msg}");
    }

    #[test]
    fn zero_attempts_means_one() {
        let b = RetryBackend::new(Flaky::failing(1), no_wait(0));
        assert!(b.remove(FileKind::Lock, "l").is_err());
        assert_eq!(b.inner().calls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let p = RetryPolicy::default();
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(p.delay(1, 1.0)), 400);
        assert_eq!(ms(p.delay(2, 1.0)), 800);
        assert_eq!(ms(p.delay(6, 1.0)), 12_800);
        assert_eq!(ms(p.delay(7, 1.0)), 20_000);
        assert_eq!(ms(p.delay(1_000, 1.0)), 20_000);
        assert_eq!(ms(p.delay(3, 0.0)), 0);
        assert_eq!(ms(p.delay(3, 0.5)), 800);
        // Out-of-range jitter never panics or exceeds the cap.
        assert_eq!(ms(p.delay(3, 7.0)), 1_600);
        assert_eq!(ms(p.delay(3, f64::NAN)), 1_600);
        assert_eq!(ms(p.delay(3, -1.0)), 0);
        let huge = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::MAX,
            max_delay: Duration::MAX,
        };
        assert!(huge.delay(40, 1.0) > Duration::from_secs(1 << 40));
    }
}
