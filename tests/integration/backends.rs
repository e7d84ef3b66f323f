//! Every storage backend passes the conformance suite of `marmoset-testing`
//! against a fresh location. (S3 runs it in `s3.rs`, against moto.)
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use marmoset_storage::backend::fs::FsBackend;
use marmoset_storage::backend::metered::MeteredBackend;
use marmoset_storage::backend::retry::{RetryBackend, RetryPolicy};
use marmoset_storage::backend::throttle::ThrottleBackend;
use marmoset_storage::backend::{open, BackendOptions, ReadBackend, WriteBackend};
use marmoset_testing::conformance;

#[test]
fn fs_backend_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let b = FsBackend::new(dir.path().join("repo"));
    b.create().unwrap();
    conformance::run_all(&b).unwrap();
}

/// The whole wrapper stack behaves like a storage: conformance over
/// `Metered(Throttle(Retry(fs)))`, with limits high enough that the token
/// buckets never make the test sleep, and the meter counts what happened.
#[test]
fn the_wrapped_stack_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FsBackend::new(dir.path().join("repo"));
    let policy = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::ZERO,
        max_delay: Duration::ZERO,
    };
    let stack = MeteredBackend::new(ThrottleBackend::new(
        RetryBackend::new(fs, policy),
        Some(1 << 30),
        Some(1 << 30),
    ));
    stack.create().unwrap();
    conformance::run_all(&stack).unwrap();
    let stats = stack.stats().unwrap_or_default();
    assert!(
        stats.put > 0 && stats.get > 0 && stats.get_range > 0,
        "{stats:?}"
    );
    assert!(
        stats.list > 0 && stats.delete > 0 && stats.head > 0,
        "{stats:?}"
    );
    assert!(
        stats.bytes_up >= 20 << 20 && stats.bytes_down >= 20 << 20,
        "{stats:?}"
    );
    assert_eq!(stats.retries, 0, "{stats:?}");
}

/// `open` builds the same stack from a plain path, and the `Arc<dyn
/// Backend>` it returns passes conformance too.
#[test]
fn an_opened_fs_location_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let options = BackendOptions {
        limit_upload: Some(1 << 30),
        ..BackendOptions::default()
    };
    let b = open(&path.display().to_string(), &options).unwrap();
    b.create().unwrap();
    conformance::run_all(&*b).unwrap();
    assert!(b.stats().is_some_and(|s| s.put > 0));
    assert!(!b.is_remote());
}
