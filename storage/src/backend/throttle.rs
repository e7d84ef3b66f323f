//! Bandwidth limits around any backend (`--limit-upload`,
//! `--limit-download`), one token bucket per direction shared by every
//! thread that uses the backend, so the limit holds for the whole process
//! however many uploaders run.
//!
//! A call reserves its bytes before it runs when their count is known (a
//! write, a ranged read) and after it ran otherwise (a whole-object read):
//! either way the bucket goes into debt and the next caller waits it off, so
//! the average rate is the limit. Calls are not split, so one large object
//! goes out at full speed after its wait: the limit is an average over a
//! few seconds, not a cap on the instantaneous rate. Listing, sizes and
//! removals move no payload and are not limited.
//!
//! Waits block the calling thread (`std::thread::sleep`), like every
//! backend call: call backends from blocking threads, never from an async
//! task.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{
    Bytes, DeleteBackend, FileKind, ListBackend, ObjectInfo, ReadBackend, RequestStats,
    WriteBackend,
};
use crate::error::Result;

/// A token bucket of bytes: `rate` tokens a second, at most one second's
/// worth saved up (the burst). Taking more than is there leaves a debt that
/// later takers wait off first, in the order they came.
pub struct TokenBucket {
    rate: f64,
    state: Mutex<BucketState>,
}

struct BucketState {
    /// When `tokens` was last brought up to date.
    at: Instant,
    /// Bytes that may go without waiting; negative is a debt.
    tokens: f64,
}

impl TokenBucket {
    /// A full bucket for `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self::starting_at(bytes_per_sec, Instant::now())
    }

    fn starting_at(bytes_per_sec: u64, at: Instant) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        Self {
            rate,
            state: Mutex::new(BucketState { at, tokens: rate }),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.rate as u64
    }

    /// Takes `bytes` tokens now and returns how long the caller must wait
    /// before (or, for a transfer already made, after) moving them.
    pub fn take(&self, bytes: u64) -> Duration {
        self.take_at(bytes, Instant::now())
    }

    /// [`TokenBucket::take`] at a given time: the whole arithmetic, with
    /// no clock and no sleeping, so it can be tested exactly. Times before
    /// the last update count as no time passed.
    pub fn take_at(&self, bytes: u64, now: Instant) -> Duration {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(s.at).as_secs_f64();
        if now > s.at {
            s.at = now;
        }
        let tokens = (s.tokens + elapsed * self.rate).min(self.rate) - bytes as f64;
        s.tokens = tokens;
        if tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64(-tokens / self.rate).unwrap_or(Duration::MAX)
        }
    }
}

/// Any backend, with upload and download limits in bytes per second.
pub struct ThrottleBackend<B> {
    inner: B,
    upload: Option<TokenBucket>,
    download: Option<TokenBucket>,
}

impl<B> ThrottleBackend<B> {
    /// Limits in bytes per second; `None` or 0 is unlimited.
    pub fn new(inner: B, upload: Option<u64>, download: Option<u64>) -> Self {
        let bucket = |limit: Option<u64>| limit.filter(|&r| r > 0).map(TokenBucket::new);
        Self {
            inner,
            upload: bucket(upload),
            download: bucket(download),
        }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The limits in force, in bytes per second (upload, download).
    pub fn limits(&self) -> (Option<u64>, Option<u64>) {
        (
            self.upload.as_ref().map(TokenBucket::bytes_per_sec),
            self.download.as_ref().map(TokenBucket::bytes_per_sec),
        )
    }
}

/// Takes `bytes` from the bucket, if there is one, and waits as long as it
/// says.
fn pace(bucket: &Option<TokenBucket>, bytes: u64) {
    if let Some(b) = bucket {
        let wait = b.take(bytes);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

impl<B: ReadBackend> ReadBackend for ThrottleBackend<B> {
    fn location(&self) -> String {
        self.inner.location()
    }

    /// The size is known only afterwards: the wait follows the transfer.
    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        let data = self.inner.read(kind, name)?;
        pace(&self.download, data.len() as u64);
        Ok(data)
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        pace(&self.download, length);
        self.inner.read_range(kind, name, offset, length)
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        self.inner.size(kind, name)
    }

    fn stats(&self) -> Option<RequestStats> {
        self.inner.stats()
    }

    fn write_parallelism(&self) -> usize {
        self.inner.write_parallelism()
    }

    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
}

impl<B: ListBackend> ListBackend for ThrottleBackend<B> {
    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        self.inner.list(kind)
    }

    fn list_info(&self, kind: FileKind) -> Result<Vec<ObjectInfo>> {
        self.inner.list_info(kind)
    }
}

impl<B: WriteBackend> WriteBackend for ThrottleBackend<B> {
    fn create(&self) -> Result<()> {
        self.inner.create()
    }

    fn write(&self, kind: FileKind, name: &str, data: Bytes) -> Result<()> {
        pace(&self.upload, data.len() as u64);
        self.inner.write(kind, name, data)
    }
}

impl<B: DeleteBackend> DeleteBackend for ThrottleBackend<B> {
    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        self.inner.remove(kind, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    #[test]
    fn a_full_bucket_lets_one_seconds_worth_through_then_spaces_out() {
        let t0 = Instant::now();
        let b = TokenBucket::starting_at(1000, t0);
        assert_eq!(b.take_at(600, t0), Duration::ZERO);
        assert_eq!(b.take_at(400, t0), Duration::ZERO);
        // Empty: 500 more bytes take half a second.
        assert_eq!(ms(b.take_at(500, t0)), 500);
        // The next caller queues behind that debt.
        assert_eq!(ms(b.take_at(500, t0)), 1000);
        // Time pays the debt off at the rate.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(b.take_at(0, t1), Duration::ZERO);
        assert_eq!(ms(b.take_at(250, t1)), 250);
    }

    #[test]
    fn idle_time_saves_up_at_most_one_second() {
        let t0 = Instant::now();
        let b = TokenBucket::starting_at(1000, t0);
        assert_eq!(ms(b.take_at(3000, t0)), 2000);
        // An hour later the debt is long paid, but only 1000 are saved.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.take_at(1000, later), Duration::ZERO);
        assert_eq!(ms(b.take_at(100, later)), 100);
    }

    #[test]
    fn the_rate_holds_over_many_callers() {
        // 64 uploads of 1 MiB at 4 MiB/s: the last one may start no
        // earlier than 15 s in (the first second's worth is the burst).
        let t0 = Instant::now();
        let b = TokenBucket::starting_at(4 << 20, t0);
        let waits: Vec<Duration> = (0..64).map(|_| b.take_at(1 << 20, t0)).collect();
        assert_eq!(waits.iter().filter(|w| w.is_zero()).count(), 4);
        assert_eq!(ms(waits[63]), 15_000);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn a_clock_going_backwards_gives_no_tokens() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let b = TokenBucket::starting_at(1000, t0);
        assert_eq!(b.take_at(1000, t0), Duration::ZERO);
        let earlier = t0 - Duration::from_secs(5);
        assert_eq!(ms(b.take_at(1000, earlier)), 1000);
    }

    #[test]
    fn limits_of_zero_are_unlimited() {
        let t = ThrottleBackend::new((), Some(0), None);
        assert_eq!(t.limits(), (None, None));
        let t = ThrottleBackend::new((), Some(1 << 20), Some(2 << 20));
        assert_eq!(t.limits(), (Some(1 << 20), Some(2 << 20)));
    }
}
