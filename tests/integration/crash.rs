//! Crash safety: kill -9 a backup at seeded points; the repository still
//! opens, earlier snapshots restore bit-identically, and the next backup
//! completes and reuses the packs already stored.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::time::{Duration, Instant};

use marmoset_testing::random::rng;
use marmoset_testing::trees::{assert_same_tree, random_files, random_tree};
use rand::Rng;

use crate::integration::cli::Env;

fn pack_bytes(env: &Env) -> u64 {
    env.pack_names()
        .iter()
        .map(|p| fs::metadata(env.pack_path(p)).unwrap().len())
        .sum()
}

#[test]
fn killed_backups_leave_a_valid_repository_and_resume() {
    for seed in [1u64, 2, 3] {
        let env = Env::new();
        env.init();
        let early = env.path("early");
        random_tree(&early, seed, 40);
        let early_snap = env.backup(&early, &[])["snapshot"]
            .as_str()
            .unwrap()
            .to_string();
        let before = pack_bytes(&env);

        let big = env.path("big");
        let mut r = rng(seed + 1000);
        random_files(&big, &mut r, 12, 20 << 20);
        let mut child = env
            .cmd()
            .args(["backup", "--threads", "1", big.to_str().unwrap()])
            .spawn()
            .unwrap();
        // Wait for the first new pack, then kill at a seeded extra delay.
        let start = Instant::now();
        let n0 = env.pack_names().len();
        while env.pack_names().len() == n0 && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(r.gen_range(0..400)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let at_kill = pack_bytes(&env) - before;
        assert!(
            at_kill > 0,
            "seed {seed}: packs were stored before the kill"
        );
        if status.success() {
            continue; // finished before the kill landed: nothing to test
        }

        // Earlier snapshot restores bit-identically.
        let dst = env.path("dst");
        env.ok(&["restore", &early_snap, "--target", dst.to_str().unwrap()]);
        assert_same_tree(&early, &dst);
        assert_eq!(
            env.json(&["snapshots"]).as_array().unwrap().len(),
            1,
            "no snapshot from the killed run"
        );

        // The next backup completes and does not upload stored packs again.
        let resumed = env.backup(&big, &[]);
        let added = resumed["summary"]["bytes_added"].as_u64().unwrap();
        let total = 240u64 << 20;
        assert!(
            added + at_kill >= total,
            "seed {seed}: everything stored once"
        );
        assert!(
            added <= total - at_kill + (16 << 20),
            "seed {seed}: resumed backup re-uploaded stored data: added {added}, stored at kill {at_kill}"
        );
        let restored = env.path("restored");
        env.ok(&["restore", "latest", "--target", restored.to_str().unwrap()]);
        assert_same_tree(&big, &restored);
    }
}

/// Ctrl-C stops a backup cleanly: no snapshot, its session lease removed
/// (nothing for the next maintenance to wait out), and the next backup
/// completes on a repository that checks clean.
#[test]
fn an_interrupted_backup_stops_cleanly_and_removes_its_lease() {
    let env = Env::new();
    env.init();
    let big = env.path("big");
    random_files(&big, &mut rng(77), 12, 20 << 20);
    let child = env
        .cmd()
        .args(["backup", "--threads", "1", big.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while env.pack_names().is_empty() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cancelled"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "stopped promptly"
    );
    let leases: Vec<_> = fs::read_dir(env.repo.join("locks"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(leases.is_empty(), "leases left: {leases:?}");
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 0);
    env.backup(&big, &[]);
    env.ok(&["check", "--read-data"]);
}
