//! The S3 backend against a real S3-compatible server (moto) on loopback:
//! the backend conformance suite, backup/restore round trips, and fault
//! injection (500/503, resets, delays, truncated bodies) through a proxy.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;

use marmoset_storage::backend::metered::MeteredBackend;
use marmoset_storage::backend::retry::{RetryBackend, RetryPolicy};
use marmoset_storage::backend::s3::{S3Backend, S3Options};
use marmoset_storage::backend::{ReadBackend, WriteBackend};
use marmoset_testing::conformance;
use marmoset_testing::fault_proxy::FaultProxy;
use marmoset_testing::random::{random_bytes, rng};
use marmoset_testing::s3_server::S3Server;
use marmoset_testing::trees::{assert_same_tree, random_tree};

use crate::integration::cli::Env;

/// The S3 backend under the retry and metering wrappers, as `open` stacks
/// them (without the metadata cache, so every request reaches the server).
fn backend(server: &S3Server, prefix: &str, port: u16) -> MeteredBackend<RetryBackend<S3Backend>> {
    let mut o = S3Options::from_url(&format!(
        "s3:http://127.0.0.1:{port}/{}/{prefix}",
        server.bucket
    ))
    .unwrap();
    o.static_credentials = Some(("test".into(), "test".into()));
    o.multipart_threshold = 5 << 20;
    o.part_size = 5 << 20;
    let policy = RetryPolicy {
        max_attempts: 10,
        ..RetryPolicy::default()
    };
    MeteredBackend::new(RetryBackend::new(S3Backend::new(o).unwrap(), policy))
}

#[test]
fn s3_backend_passes_the_conformance_suite() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let b = backend(&server, "conformance", server.port);
    b.create().unwrap();
    conformance::run_all(&b).unwrap();
    let stats = b.stats().unwrap();
    assert!(
        b.inner().inner().multipart_uploads() >= 1,
        "the 20 MiB object went through multipart: {stats:?}"
    );
    assert!(stats.b2_class_a > 0 && stats.b2_class_b > 0 && stats.b2_class_c > 0);
    // Missing bucket: a clear, immediate error naming it.
    let mut o = S3Options::from_url(&format!(
        "s3:http://127.0.0.1:{}/no-such-bucket/x",
        server.port
    ))
    .unwrap();
    o.static_credentials = Some(("test".into(), "test".into()));
    let err = S3Backend::new(o).unwrap().create().unwrap_err().to_string();
    assert!(
        err.contains("no-such-bucket") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn backup_restore_round_trip_on_s3() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let env = Env::new();
    let url = server.url("velero");
    env.s3_ok(&url, &["init"]);
    let src = env.path("src");
    random_tree(&src, 21, 120);
    fs::write(src.join("big.bin"), random_bytes(&mut rng(3), 40 << 20)).unwrap();
    let out = env.s3_ok(
        &url,
        &[
            "--json",
            "--s3-multipart-mib",
            "8",
            "backup",
            src.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["backend"]["put"].as_u64().unwrap() > 0, "{v}");
    assert!(v["backend"]["bytes_up"].as_u64().unwrap() > 40 << 20);
    let dst = env.path("dst");
    env.s3_ok(
        &url,
        &["restore", "latest", "--target", dst.to_str().unwrap()],
    );
    assert_same_tree(&src, &dst);
    // Listing snapshots again reads index and snapshot files from the local
    // metadata cache, not from the bucket.
    let out = env.s3_ok(&url, &["--json", "snapshots"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Trees of a remote repository are cached locally (still encrypted).
    env.s3_ok(&url, &["ls", "-R", "latest"]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&env.s3_ok(&url, &["--json", "cat", "config"]).stdout).unwrap();
    let blobs = env
        .cache
        .join(format!("{}.blobs", cfg["repository_id"].as_str().unwrap()));
    assert!(
        fs::read_dir(&blobs).unwrap().count() >= 2,
        "tree blobs cached in {}",
        blobs.display()
    );
    env.s3_ok(&url, &["ls", "-R", "latest"]);
    env.s3_ok(&url, &["check", "--read-data"]);
    env.s3_ok(&url, &["forget", "--keep-last", "1"]);
    env.s3_ok(&url, &["maintain", "--full", "--safety-margin", "0s"]);
}

#[test]
fn faults_are_retried_and_data_stays_bit_identical() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let env = Env::new();
    let direct = server.url("faulty");
    env.s3_ok(&direct, &["init"]);
    for seed in [1u64, 2] {
        let proxy = FaultProxy::start(server.port, 0.15, seed, 0);
        let via = format!(
            "s3:http://127.0.0.1:{}/{}/faulty",
            proxy.port, server.bucket
        );
        let src = env.path(&format!("src{seed}"));
        random_tree(&src, 50 + seed, 60);
        fs::write(src.join("big.bin"), random_bytes(&mut rng(seed), 24 << 20)).unwrap();
        let out = env.s3_ok(
            &via,
            &[
                "--json",
                "--s3-multipart-mib",
                "8",
                "backup",
                src.to_str().unwrap(),
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            v["backend"]["retries"].as_u64().unwrap() > 0,
            "faults were injected and retried: {v}"
        );
        let dst = env.path(&format!("dst{seed}"));
        env.s3_ok(
            &via,
            &["restore", "latest", "--target", dst.to_str().unwrap()],
        );
        assert_same_tree(&src, &dst);
    }
    env.s3_ok(&direct, &["check", "--read-data"]);
}

#[test]
fn total_failure_fails_cleanly_and_keeps_the_repository_valid() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let env = Env::new();
    let direct = server.url("doomed");
    env.s3_ok(&direct, &["init"]);
    let src = env.path("src");
    random_tree(&src, 7, 30);
    env.s3_ok(&direct, &["backup", src.to_str().unwrap()]);
    let proxy = FaultProxy::start(server.port, 1.0, 9, 0);
    let via = format!(
        "s3:http://127.0.0.1:{}/{}/doomed",
        proxy.port, server.bucket
    );
    fs::write(src.join("new.bin"), random_bytes(&mut rng(4), 2 << 20)).unwrap();
    let out = env
        .s3_cmd(&via)
        .args(["backup", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("s3://marmoset/doomed/"),
        "names bucket and key: {err}"
    );
    // The repository is intact and still holds exactly the first snapshot.
    env.s3_ok(&direct, &["check", "--read-data"]);
    let snaps = env.s3_ok(&direct, &["--json", "snapshots"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&snaps.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let dst = env.path("dst");
    env.s3_ok(
        &direct,
        &["restore", "latest", "--target", dst.to_str().unwrap()],
    );
    fs::remove_file(src.join("new.bin")).unwrap();
    assert_same_tree(&src, &dst);
}
