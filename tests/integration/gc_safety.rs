//! Garbage collection that cannot delete live data: backups paused across
//! their lease's expiry, maintenance from another PID namespace with the
//! same host name, clocks that disagree, plans and leases planted by a
//! writer without the key, transient read errors, planted pack copies and
//! replayed index files. Every backup either fails or produces a snapshot
//! that restores bit-identically; `check --read-data` passes throughout.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use marmoset_storage::backend::fs::FsBackend;
use marmoset_storage::backend::{
    Bytes, DeleteBackend, FileKind, ListBackend, ObjectInfo, ReadBackend, WriteBackend,
};
use marmoset_storage::{MaintainOptions, OpenOptions, Repository};
use marmoset_testing::random::{random_bytes, rng};
use marmoset_testing::trees::{assert_same_tree, random_tree};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;

use crate::integration::cli::{Env, PASSWORD};

fn big_source(env: &Env, name: &str, files: usize, seed: u64) -> std::path::PathBuf {
    let src = env.path(name);
    fs::create_dir_all(&src).unwrap();
    let mut r = rng(seed);
    for i in 0..files {
        fs::write(src.join(format!("f{i:02}")), random_bytes(&mut r, 4 << 20)).unwrap();
    }
    src
}

/// Starts a backup and stops it (SIGSTOP) as soon as it has stored a pack.
fn start_and_stop_backup(env: &Env, src: &Path, envs: &[(&str, String)]) -> Child {
    let n0 = env.pack_names().len();
    let mut cmd = env.cmd();
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd
        .args(["--json", "backup", "--threads", "1", src.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while env.pack_names().len() == n0 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGSTOP).unwrap();
    child
}

fn resume(child: Child) -> std::process::Output {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT).unwrap();
    child.wait_with_output().unwrap()
}

/// One maintenance `--full --safety-margin 0s`, optionally in a new PID
/// namespace (same host name) and with a shifted clock; returns its report.
fn maintain(env: &Env, unshare: bool, offset: i64) -> serde_json::Value {
    let bin = env!("CARGO_BIN_EXE_marmoset");
    let mut cmd = if unshare {
        let mut c = std::process::Command::new("unshare");
        c.args(["-pf", "--mount-proc", bin]);
        c
    } else {
        std::process::Command::new(bin)
    };
    let out = cmd
        .env("MARMOSET_REPOSITORY", &env.repo)
        .env("MARMOSET_PASSWORD_FILE", &env.pwfile)
        .env("MARMOSET_CACHE_DIR", env.path("maint-cache"))
        .env("MARMOSET_CLOCK_OFFSET_SECS", offset.to_string())
        .args([
            "-q",
            "--json",
            "maintain",
            "--full",
            "--safety-margin",
            "0s",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "maintain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What a paused backup ended as.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Failed with a clear error; nothing half-written is left behind.
    Failed,
    /// Completed, and its snapshot restores bit-identically.
    Restored,
}

/// After a paused backup: it failed cleanly or its snapshot restores
/// exactly; the repository passes `check --read-data` either way.
fn judge(env: &Env, src: &Path, out: &std::process::Output, trial: &str) -> Outcome {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{trial}: {stderr}");
    let outcome = if out.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let snap = v["snapshot"].as_str().unwrap().to_string();
        let dst = env.path(&format!("restore-{snap}"));
        env.ok(&["restore", &snap, "--target", dst.to_str().unwrap()]);
        assert_same_tree(src, &dst);
        fs::remove_dir_all(&dst).unwrap();
        Outcome::Restored
    } else {
        assert!(
            stderr.contains("lease") || stderr.contains("are gone from the repository"),
            "{trial}: a failed backup names why: {stderr}"
        );
        Outcome::Failed
    };
    env.ok(&["check", "--read-data"]);
    outcome
}

#[test]
fn backup_stopped_across_its_lease_expiry_fails_instead_of_writing_a_snapshot() {
    let mut deleted_while_stopped = 0;
    for seed in 0..3u64 {
        let env = Env::new();
        env.ok(&["init", "--pack-size-mib", "1"]);
        let src = big_source(&env, "src", 16, seed);
        let child = start_and_stop_backup(&env, &src, &[("MARMOSET_LEASE_TTL_SECS", "4".into())]);
        std::thread::sleep(Duration::from_secs(7));
        maintain(&env, false, 0);
        let second = maintain(&env, false, 0);
        deleted_while_stopped += second["packs_deleted"].as_u64().unwrap();
        let out = resume(child);
        if second["packs_deleted"].as_u64().unwrap() > 0 {
            assert_eq!(judge(&env, &src, &out, "stopped"), Outcome::Failed);
            assert!(env.json(&["snapshots"]).as_array().unwrap().is_empty());
        } else {
            judge(&env, &src, &out, "stopped");
        }
        // The next backup completes and restores.
        let v = env.backup(&src, &[]);
        let dst = env.path("again");
        env.ok(&[
            "restore",
            v["snapshot"].as_str().unwrap(),
            "--target",
            dst.to_str().unwrap(),
        ]);
        assert_same_tree(&src, &dst);
    }
    assert!(
        deleted_while_stopped > 0,
        "the scenario happened: maintenance deleted the stopped backup's packs"
    );
}

#[test]
fn maintenance_in_another_pid_namespace_does_not_judge_a_live_lease_stale() {
    let env = Env::new();
    env.ok(&["init", "--pack-size-mib", "1"]);
    let src = big_source(&env, "src", 12, 7);
    let child = start_and_stop_backup(&env, &src, &[]);
    let packs_before = env.pack_names();
    // Same host name, PID 1 in a fresh namespace: the backup's pid does
    // not exist there, which must not make its lease stale.
    let first = maintain(&env, true, 0);
    let second = maintain(&env, true, 0);
    assert_eq!(first["leases_removed"], 0, "{first}");
    assert_eq!(second["packs_deleted"], 0, "{second}");
    for p in &packs_before {
        assert!(
            env.pack_path(p).exists(),
            "pack {p} of the live backup kept"
        );
    }
    let out = resume(child);
    assert_eq!(judge(&env, &src, &out, "unshare"), Outcome::Restored);
}

#[test]
fn clocks_ten_minutes_apart_change_nothing() {
    for (backup_offset, maint_offset) in [(600i64, 0i64), (0, 600), (-600, 0)] {
        let env = Env::new();
        env.ok(&["init", "--pack-size-mib", "1"]);
        let src = big_source(&env, "src", 8, 3);
        let child = start_and_stop_backup(
            &env,
            &src,
            &[("MARMOSET_CLOCK_OFFSET_SECS", backup_offset.to_string())],
        );
        maintain(&env, false, maint_offset);
        let second = maintain(&env, false, maint_offset);
        assert_eq!(second["packs_deleted"], 0, "{second}");
        let out = resume(child);
        let trial = format!("offsets {backup_offset}/{maint_offset}");
        assert_eq!(
            judge(&env, &src, &out, &trial),
            Outcome::Restored,
            "{trial}"
        );
    }
}

/// Runs marmoset with its clock shifted by `offset` seconds; it must fail
/// and say why.
fn refused_for_its_clock(env: &Env, offset: &str, args: &[&str]) {
    let out = env
        .cmd()
        .env("MARMOSET_CLOCK_OFFSET_SECS", offset)
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} with clock offset {offset}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("clock") && err.contains("NTP"), "{err}");
}

#[test]
fn a_clock_far_off_the_storage_stops_the_backup_with_a_clear_error() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    random_tree(&src, 1, 5);
    refused_for_its_clock(&env, "7200", &["backup", src.to_str().unwrap()]);
}

/// Someone removes the session lease of a paused backup (a writer without
/// the key, or a maintenance that cannot see the holder): the backup must
/// notice, fail, and leave no index file pointing at deleted packs.
#[test]
fn a_backup_whose_lease_was_removed_fails_and_leaves_a_consistent_repository() {
    let env = Env::new();
    env.ok(&["init", "--pack-size-mib", "1"]);
    let src = big_source(&env, "src", 12, 31);
    let child = start_and_stop_backup(&env, &src, &[]);
    for e in fs::read_dir(env.repo.join("locks")).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    maintain(&env, false, 0);
    let second = maintain(&env, false, 0);
    assert!(second["packs_deleted"].as_u64().unwrap() > 0, "{second}");
    let out = resume(child);
    assert_eq!(judge(&env, &src, &out, "lease removed"), Outcome::Failed);
    assert!(env.json(&["snapshots"]).as_array().unwrap().is_empty());
}

#[test]
fn a_maintenance_with_a_clock_far_off_refuses_to_run() {
    let env = Env::new();
    env.init();
    refused_for_its_clock(&env, "2400", &["maintain", "--full"]);
}

/// Index files vanish under a running backup (whoever removed them, and
/// whatever the plans say): the backup must not write a snapshot whose
/// deduplicated blobs no index lists.
#[test]
fn a_backup_notices_index_files_vanishing_under_it() {
    let env = Env::new();
    env.ok(&["init", "--pack-size-mib", "1"]);
    let src = big_source(&env, "src", 2, 21);
    env.backup(&src, &[]);
    let mut r = rng(22);
    for i in 0..8 {
        fs::write(src.join(format!("new{i}")), random_bytes(&mut r, 4 << 20)).unwrap();
    }
    let child = start_and_stop_backup(&env, &src, &[]);
    let hidden = env.path("hidden-index");
    fs::create_dir_all(&hidden).unwrap();
    for e in fs::read_dir(env.repo.join("index")).unwrap() {
        let e = e.unwrap();
        fs::rename(e.path(), hidden.join(e.file_name())).unwrap();
    }
    let out = resume(child);
    // The index files come back; whatever the backup did must hold up.
    for e in fs::read_dir(&hidden).unwrap() {
        let e = e.unwrap();
        fs::rename(e.path(), env.repo.join("index").join(e.file_name())).unwrap();
    }
    if out.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let dst = env.path("dst");
        env.ok(&[
            "restore",
            v["snapshot"].as_str().unwrap(),
            "--target",
            dst.to_str().unwrap(),
        ]);
        assert_same_tree(&src, &dst);
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no index"), "{err}");
    }
    env.ok(&["check", "--read-data"]);
}

/// A plan as an attacker with write access but no key writes it: the old
/// plaintext format, deletion "hidden" long ago.
fn plant_plan(env: &Env, packs: &[String]) {
    let plan = serde_json::json!({
        "created": "2020-01-01T00:00:00Z",
        "hidden_at": "2020-01-01T00:00:00Z",
        "sessions": [],
        "packs": packs,
    });
    fs::create_dir_all(env.repo.join("plans")).unwrap();
    fs::write(
        env.repo.join("plans").join("a".repeat(64)),
        serde_json::to_vec(&plan).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_plan_forged_without_the_key_deletes_nothing() {
    let env = Env::new();
    env.ok(&["init", "--pack-size-mib", "1"]);
    let src = big_source(&env, "src", 8, 11);
    let child = start_and_stop_backup(&env, &src, &[]);
    plant_plan(&env, &env.pack_names());
    let first = maintain(&env, false, 0);
    let second = maintain(&env, false, 0);
    assert_eq!(first["packs_deleted"], 0, "{first}");
    assert_eq!(second["packs_deleted"], 0, "{second}");
    let ignored = second["ignored"].as_array().unwrap();
    assert!(
        ignored
            .iter()
            .any(|i| i.as_str().unwrap().contains("not authenticated")),
        "forged plan reported: {second}"
    );
    let out = resume(child);
    assert_eq!(judge(&env, &src, &out, "forged plan"), Outcome::Restored);
    // `check` names the intruder's file.
    let out = env.cmd().args(["check"]).output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains(&"a".repeat(64)), "{all}");
}

#[test]
fn a_lease_planted_with_a_far_expiry_blocks_nothing() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    random_tree(&src, 2, 20);
    env.backup(&src, &[]);
    let lease = serde_json::json!({
        "kind": "maintenance",
        "hostname": "intruder",
        "pid": 1,
        "created": "2020-01-01T00:00:00Z",
        "expires": "2999-01-01T00:00:00Z",
    });
    fs::write(
        env.repo
            .join("locks")
            .join(format!("maintenance-{}", "b".repeat(64))),
        serde_json::to_vec(&lease).unwrap(),
    )
    .unwrap();
    // Formerly "another maintenance is running" for ever.
    let r = env.json(&["maintain", "--full"]);
    assert!(
        r["ignored"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i.as_str().unwrap().starts_with("maintenance-bbbb")),
        "{r}"
    );
}

/// Fails ranged reads of chosen packs with a timeout, like a flaky network.
struct FlakyReads {
    inner: FsBackend,
    failing: Vec<String>,
}

impl ReadBackend for FlakyReads {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn read(&self, kind: FileKind, name: &str) -> marmoset_storage::Result<Vec<u8>> {
        self.inner.read(kind, name)
    }
    fn read_range(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        length: u64,
    ) -> marmoset_storage::Result<Vec<u8>> {
        if kind == FileKind::Pack && self.failing.iter().any(|f| f == name) {
            return Err(marmoset_storage::Error::Backend {
                op: "read",
                kind,
                name: name.into(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "injected timeout"),
            });
        }
        self.inner.read_range(kind, name, offset, length)
    }
    fn size(&self, kind: FileKind, name: &str) -> marmoset_storage::Result<u64> {
        self.inner.size(kind, name)
    }
}
impl ListBackend for FlakyReads {
    fn list(&self, kind: FileKind) -> marmoset_storage::Result<Vec<(String, u64)>> {
        self.inner.list(kind)
    }
    fn list_info(&self, kind: FileKind) -> marmoset_storage::Result<Vec<ObjectInfo>> {
        self.inner.list_info(kind)
    }
}
impl WriteBackend for FlakyReads {
    fn create(&self) -> marmoset_storage::Result<()> {
        self.inner.create()
    }
    fn write(&self, kind: FileKind, name: &str, data: Bytes) -> marmoset_storage::Result<()> {
        self.inner.write(kind, name, data)
    }
}
impl DeleteBackend for FlakyReads {
    fn remove(&self, kind: FileKind, name: &str) -> marmoset_storage::Result<()> {
        self.inner.remove(kind, name)
    }
}

#[test]
fn a_planned_pack_unreadable_for_a_moment_is_postponed_not_deleted() {
    let env = Env::new();
    env.init();
    let a = env.path("a");
    random_tree(&a, 3, 10);
    let snap_a = env.backup(&a, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let packs_a = env.pack_names();
    let b = env.path("b");
    random_tree(&b, 4, 10);
    env.backup(&b, &[]);
    fs::remove_file(env.repo.join("snapshots").join(&snap_a)).unwrap();
    let planned = env.json(&["maintain", "--full"]);
    assert!(planned["packs_planned"].as_u64().unwrap() >= packs_a.len() as u64);

    let backend = FlakyReads {
        inner: FsBackend::new(&env.repo),
        failing: packs_a.clone(),
    };
    let repo = Repository::open(
        Arc::new(backend),
        PASSWORD.as_bytes(),
        &OpenOptions {
            cache_root: Some(env.path("lib-cache")),
        },
    )
    .unwrap();
    let opts = MaintainOptions {
        full: true,
        safety_margin: Duration::ZERO,
        ..Default::default()
    };
    let r = marmoset_storage::maintain(&repo, &opts).unwrap();
    assert_eq!(r.packs_deleted, 0);
    assert_eq!(r.plans_postponed, 1);
    for p in &packs_a {
        assert!(env.pack_path(p).exists(), "pack {p} postponed, not deleted");
    }
    drop(repo);
    // Once reads work again, the plan is carried out.
    let done = env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    assert!(
        done["packs_deleted"].as_u64().unwrap() >= packs_a.len() as u64,
        "{done}"
    );
    env.ok(&["check", "--read-data"]);
}

#[test]
fn a_pack_copy_with_bytes_prepended_is_never_indexed() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    random_tree(&src, 5, 30);
    let snap = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    for p in env.pack_names() {
        let mut junk = b"JUNK".to_vec();
        junk.extend(fs::read(env.pack_path(&p)).unwrap());
        let name = blake3::hash(&junk).to_hex().to_string();
        fs::write(env.pack_path(&name), &junk).unwrap();
    }
    // The next backup's pack recovery meets the copies.
    let other = env.path("other");
    random_tree(&other, 6, 5);
    env.backup(&other, &[]);
    let dst = env.path("dst");
    env.ok(&["restore", &snap, "--target", dst.to_str().unwrap()]);
    assert_same_tree(&src, &dst);
    // A fresh cache (another machine) agrees: no index lists a copy.
    let out = env
        .cmd()
        .env("MARMOSET_CACHE_DIR", env.path("fresh-cache"))
        .args([
            "restore",
            &snap,
            "--target",
            env.path("dst2").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&src, &env.path("dst2"));
}

#[test]
fn a_replayed_index_file_is_not_trusted_for_deduplication() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    random_tree(&src, 8, 20);
    let snap = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let saved = env.path("saved-index");
    fs::create_dir_all(&saved).unwrap();
    for e in fs::read_dir(env.repo.join("index")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), saved.join(e.file_name())).unwrap();
    }
    fs::remove_file(env.repo.join("snapshots").join(&snap)).unwrap();
    env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    let gone = env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    assert!(gone["packs_deleted"].as_u64().unwrap() > 0, "{gone}");
    // The old index files come back (a writer without the key replays them).
    for e in fs::read_dir(&saved).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), env.repo.join("index").join(e.file_name())).unwrap();
    }
    let again = env.backup(&src, &[]);
    assert!(
        again["summary"]["bytes_added"].as_u64().unwrap() > 0,
        "data stored again"
    );
    let dst = env.path("dst");
    env.ok(&[
        "restore",
        again["snapshot"].as_str().unwrap(),
        "--target",
        dst.to_str().unwrap(),
    ]);
    assert_same_tree(&src, &dst);
}

#[test]
fn a_file_swapped_for_a_symlink_during_backup_never_leaks_its_target() {
    let env = Env::new();
    env.init();
    let marker = "HOST-SECRET-7f3a9c";
    let secret = env.path("secret");
    fs::write(&secret, marker.repeat(100)).unwrap();
    let src = env.path("src");
    let stage = env.path("stage");
    fs::create_dir_all(&src).unwrap();
    fs::create_dir_all(&stage).unwrap();
    let mut r = rng(9);
    for i in 0..30 {
        fs::write(src.join(format!("a{i:02}")), random_bytes(&mut r, 64 << 10)).unwrap();
        fs::write(src.join(format!("victim{i:02}")), b"tenant data").unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (src, stage, secret, stop) = (src.clone(), stage.clone(), secret.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut r = rng(10);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let v = src.join(format!("victim{:02}", r.gen_range(0..30)));
                let staged = stage.join("x");
                let _ = fs::remove_file(&staged);
                if r.gen_bool(0.5) {
                    let _ = std::os::unix::fs::symlink(&secret, &staged);
                } else {
                    let _ = fs::write(&staged, b"tenant data");
                }
                let _ = fs::rename(&staged, &v);
            }
        })
    };
    let mut snaps = Vec::new();
    for _ in 0..12 {
        let out = env
            .cmd()
            .args(["--json", "backup", "--force", src.to_str().unwrap()])
            .output()
            .unwrap();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            if let Some(s) = v["snapshot"].as_str() {
                snaps.push(s.to_string());
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(!snaps.is_empty());
    for s in &snaps {
        let dst = env.path(&format!("r-{s}"));
        env.ok(&["restore", s, "--target", dst.to_str().unwrap()]);
        for e in fs::read_dir(&dst).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_file() {
                let data = fs::read(&p).unwrap();
                assert!(
                    !String::from_utf8_lossy(&data).contains(marker),
                    "{} holds the host secret",
                    p.display()
                );
            }
        }
    }
}

/// The campaign: seeded trials mixing long and short pauses, maintenance
/// from another PID namespace, clocks 10 minutes apart and planted plans
/// and leases. `MARMOSET_CAMPAIGN_TRIALS` runs more of them.
#[test]
fn pause_campaign_no_unrestorable_snapshot() {
    let trials: u64 = std::env::var("MARMOSET_CAMPAIGN_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (mut failed, mut restored) = (0, 0);
    for seed in 0..trials {
        let mut r = rng(1000 + seed);
        let env = Env::new();
        env.ok(&["init", "--pack-size-mib", "1"]);
        let src = big_source(&env, "src", 8, seed);
        let long_pause = r.gen_bool(0.5);
        let unshare = r.gen_bool(0.5);
        let offsets = [-600i64, 0, 600];
        let backup_offset = offsets[r.gen_range(0..3)];
        let maint_offset = offsets[r.gen_range(0..3)];
        let forged = r.gen_bool(0.5);
        // Long pauses outlive a short lease; short ones keep the default.
        let ttl = if long_pause { "4" } else { "900" };
        let child = start_and_stop_backup(
            &env,
            &src,
            &[
                ("MARMOSET_LEASE_TTL_SECS", ttl.into()),
                ("MARMOSET_CLOCK_OFFSET_SECS", backup_offset.to_string()),
            ],
        );
        if forged {
            plant_plan(&env, &env.pack_names());
        }
        std::thread::sleep(Duration::from_millis(if long_pause { 7000 } else { 500 }));
        maintain(&env, unshare, maint_offset);
        maintain(&env, unshare, maint_offset);
        let out = resume(child);
        let trial = format!(
            "seed {seed}: long {long_pause} unshare {unshare} offsets {backup_offset}/{maint_offset} forged {forged}"
        );
        match judge(&env, &src, &out, &trial) {
            Outcome::Failed => failed += 1,
            Outcome::Restored => restored += 1,
        }
        if !long_pause {
            assert!(out.status.success(), "{trial}: a short pause is harmless");
        }
    }
    eprintln!(
        "pause campaign: {trials} trials, {restored} snapshots restored bit-identically, {failed} backups failed cleanly, 0 unrestorable"
    );
}

/// A backup overlaps a `maintain --full` that plans its packs (unindexed
/// then) for deletion; the backup finishes and indexes them again. The
/// next `maintain --full`, inside the plan's safety margin, must keep them
/// in the index it rewrites: the snapshot stays whole, not only once the
/// plan's phase 2 would rescue them.
#[test]
fn packs_indexed_again_after_being_planned_stay_indexed() {
    let env = Env::new();
    env.init();
    let keep = env.path("keep");
    fs::create_dir_all(&keep).unwrap();
    fs::write(keep.join("k"), random_bytes(&mut rng(1), 200_000)).unwrap();
    env.backup(&keep, &["--tag", "keep"]);
    let src = big_source(&env, "big", 6, 2);
    let child = start_and_stop_backup(&env, &src, &[]);
    let first = env.json(&["maintain", "--full"]);
    assert!(
        first["packs_planned"].as_u64().unwrap() >= 1,
        "the stopped backup's packs are planned as orphans: {first}"
    );
    let out = resume(child);
    assert_eq!(
        judge(&env, &src, &out, "overlapping backup"),
        Outcome::Restored
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let snap = v["snapshot"].as_str().unwrap().to_string();

    // Garbage (a forgotten snapshot's data), so that the second run
    // writes a new index.
    let junk = env.path("junk");
    fs::create_dir_all(&junk).unwrap();
    fs::write(junk.join("j"), random_bytes(&mut rng(3), 300_000)).unwrap();
    env.backup(&junk, &[]);
    fs::write(junk.join("j"), random_bytes(&mut rng(4), 300_000)).unwrap();
    env.backup(&junk, &[]);
    env.ok(&["forget", "--keep-last", "1"]);
    let second = env.json(&["maintain", "--full"]);
    assert!(
        second["plans_deferred"].as_u64().unwrap() >= 1,
        "the first plan is still inside its margin: {second}"
    );
    assert!(second["packs_planned"].as_u64().unwrap() >= 1, "{second}");
    env.ok(&["check", "--read-data"]);
    let dst = env.path("restored");
    env.ok(&["restore", &snap, "--target", dst.to_str().unwrap()]);
    assert_same_tree(&src, &dst);
}
