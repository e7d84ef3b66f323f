//! Maintenance: forget + maintain --full reclaim space, never delete what a
//! kept snapshot needs (even while backups run), survive kill -9, and check
//! / repair handle damaged repositories.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marmoset_testing::random::{random_bytes, rng};
use marmoset_testing::trees::{assert_same_tree, random_files, random_tree};
use rand::Rng;

use crate::integration::cli::Env;

fn repo_bytes(env: &Env) -> u64 {
    env.pack_names()
        .iter()
        .map(|p| fs::metadata(env.pack_path(p)).unwrap().len())
        .sum()
}

fn check_ok(env: &Env) {
    let out = env
        .cmd()
        .args(["--json", "check", "--read-data"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success(),
        "check failed: {v}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
}

/// A source directory: shared data (dedups across snapshots) plus its own.
fn make_source(env: &Env, i: u64) -> PathBuf {
    let dir = env.path(&format!("src-{i}"));
    random_tree(&dir, 1000 + i, 30);
    let mut r = rng(7);
    fs::write(dir.join("shared.bin"), random_bytes(&mut r, 2 << 20)).unwrap();
    dir
}

#[test]
fn forget_and_full_maintenance_reclaim_space_and_keep_the_rest() {
    let env = Env::new();
    env.init();
    let a = make_source(&env, 1);
    let b = make_source(&env, 2);
    let mut r = rng(3);
    fs::write(a.join("only-a.bin"), random_bytes(&mut r, 8 << 20)).unwrap();
    env.backup(&a, &["--source", "ns/pvc"]);
    env.backup(&b, &["--source", "ns/pvc"]);
    let before = repo_bytes(&env);

    let dry = env.json(&["forget", "--keep-last", "1", "--dry-run"]);
    assert_eq!(dry["removed"], 1);
    assert_eq!(
        env.json(&["snapshots"]).as_array().unwrap().len(),
        2,
        "dry run changes nothing"
    );
    env.json(&["forget", "--keep-last", "1"]);

    let first = env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    assert!(first["packs_planned"].as_u64().unwrap() >= 1, "{first}");
    assert_eq!(first["packs_deleted"], 0, "phase 1 deletes nothing");
    let second = env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    assert!(second["packs_deleted"].as_u64().unwrap() >= 1, "{second}");
    let after = repo_bytes(&env);
    assert!(
        after + (8 << 20) <= before + (1 << 20),
        "reclaimed the forgotten 8 MiB: {before} -> {after}"
    );

    check_ok(&env);
    let dst = env.path("dst");
    env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
    assert_same_tree(&b, &dst);

    // A plan younger than the safety margin is deferred.
    fs::write(b.join("more.bin"), random_bytes(&mut r, 1 << 20)).unwrap();
    env.backup(&b, &["--source", "ns/pvc"]);
    fs::remove_file(b.join("more.bin")).unwrap();
    env.backup(&b, &["--source", "ns/pvc"]);
    env.json(&["forget", "--keep-last", "1"]);
    env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    let deferred = env.json(&["maintain", "--full", "--safety-margin", "1h"]);
    assert_eq!(deferred["plans_deferred"], 1, "{deferred}");
    assert_eq!(deferred["packs_deleted"], 0);
}

#[test]
fn sparse_packs_are_rewritten() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    let mut r = rng(5);
    // Many files in one pack; then most of them disappear.
    random_files(&src, &mut r, 40, 300_000);
    env.backup(&src, &[]);
    for i in 0..35 {
        fs::remove_file(src.join(format!("f{i}"))).unwrap();
    }
    env.backup(&src, &[]);
    env.json(&["forget", "--keep-last", "1"]);
    let m = env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    assert!(m["packs_rewritten"].as_u64().unwrap() >= 1, "{m}");
    env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    assert!(
        repo_bytes(&env) < 4 << 20,
        "only the 5 live files remain: {}",
        repo_bytes(&env)
    );
    check_ok(&env);
    let dst = env.path("dst");
    env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
    assert_same_tree(&src, &dst);
}

/// The core promise: backups, forgets and maintenance run concurrently;
/// nothing a kept snapshot needs is ever deleted.
#[test]
fn maintenance_racing_backups_never_loses_kept_data() {
    let env = Arc::new(Env::new());
    env.init();
    let done = Arc::new(AtomicBool::new(false));
    let sources: Arc<Mutex<HashMap<String, PathBuf>>> = Arc::default();
    let writer = {
        let (env, done, sources) = (env.clone(), done.clone(), sources.clone());
        std::thread::spawn(move || {
            for i in 0..10u64 {
                let dir = make_source(&env, i);
                let out = env.backup(&dir, &["--source", "ns/pvc"]);
                sources
                    .lock()
                    .unwrap()
                    .insert(out["snapshot"].as_str().unwrap().to_string(), dir);
                if i % 3 == 2 {
                    env.json(&["forget", "--keep-last", "2"]);
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut maintainers = Vec::new();
    for seed in 0..2u64 {
        let (env, done) = (env.clone(), done.clone());
        maintainers.push(std::thread::spawn(move || {
            let mut r = rng(seed);
            let mut runs = 0;
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(r.gen_range(0..150)));
                let out = env
                    .cmd()
                    .args(["maintain", "--full", "--safety-margin", "0s"])
                    .output()
                    .unwrap();
                if out.status.success() {
                    runs += 1;
                } else {
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(
                        err.contains("another maintenance is running"),
                        "maintain failed: {err}"
                    );
                }
            }
            runs
        }));
    }
    writer.join().unwrap();
    let runs: u32 = maintainers.into_iter().map(|m| m.join().unwrap()).sum();
    assert!(runs >= 1, "maintenance ran during the backups");
    env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    check_ok(&env);
    let snaps = env.json(&["snapshots"]);
    let snaps = snaps.as_array().unwrap();
    assert!(snaps.len() >= 2);
    let sources = sources.lock().unwrap();
    for s in snaps {
        let id = s["id"].as_str().unwrap();
        let dst = env.path(&format!("restore-{}", &id[..8]));
        env.ok(&["restore", id, "--target", dst.to_str().unwrap()]);
        assert_same_tree(&sources[id], &dst);
    }
}

#[test]
fn killed_maintenance_leaves_a_valid_repository() {
    for seed in [11u64, 12, 13] {
        let env = Env::new();
        env.init();
        let mut dirs = Vec::new();
        for i in 0..4 {
            let d = make_source(&env, seed * 10 + i);
            let mut r = rng(seed * 100 + i);
            for k in 0..20 {
                fs::write(d.join(format!("extra{k}")), random_bytes(&mut r, 400_000)).unwrap();
            }
            env.backup(&d, &["--source", "ns/pvc"]);
            dirs.push(d);
        }
        env.json(&["forget", "--keep-last", "2"]);
        let mut r = rng(seed);
        for _round in 0..3 {
            let mut child = env
                .cmd()
                .args(["maintain", "--full", "--safety-margin", "0s"])
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(r.gen_range(0..300)));
            let _ = child.kill();
            let _ = child.wait();
        }
        // The killed runs' leases are stale: the next run proceeds.
        env.json(&["maintain", "--full", "--safety-margin", "0s"]);
        env.json(&["maintain", "--full", "--safety-margin", "0s"]);
        check_ok(&env);
        for (i, d) in dirs.iter().enumerate().skip(2) {
            let snaps = env.json(&["snapshots"]);
            let id = snaps[i - 2]["id"].as_str().unwrap().to_string();
            let dst = env.path(&format!("dst-{i}"));
            env.ok(&["restore", &id, "--target", dst.to_str().unwrap()]);
            assert_same_tree(d, &dst);
        }
    }
}

#[test]
fn a_live_maintenance_lease_of_another_host_blocks_a_second_run() {
    let env = Env::new();
    env.init();
    let keys = env.open().keys().clone();
    let now = chrono::Utc::now();
    // A genuine lease (written with the key) of another node, as its
    // maintenance would write it.
    let plant = |refreshed: chrono::DateTime<chrono::Utc>| {
        let lease = serde_json::json!({
            "kind": "maintenance", "hostname": "other-node",
            "process": {"boot_id": "b", "pid_ns": "pid:[1]", "pid": 1, "start_ticks": 5},
            "created": refreshed - chrono::Duration::minutes(1), "refreshed": refreshed,
            "expires": refreshed + chrono::Duration::minutes(15), "ttl_secs": 900,
        });
        let name = format!("maintenance-{}", "0".repeat(64));
        let sealed = marmoset_storage::format::seal_file(
            &keys,
            &format!("lock {name}"),
            lease.to_string().as_bytes(),
        );
        let path = env.repo.join("locks").join(&name);
        fs::write(&path, sealed).unwrap();
        // The storage's stamp is what counts: make it the lease's time.
        let f = fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(refreshed.into()).unwrap();
    };
    plant(now);
    let out = env.cmd().args(["maintain"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another maintenance is running: other-node")
    );
    // Not refreshed for two hours (by the storage's clock): it no longer
    // blocks, and maintenance removes it.
    plant(now - chrono::Duration::hours(2));
    let r = env.json(&["maintain"]);
    assert_eq!(r["leases_removed"], 1);
}

#[test]
fn check_and_repair_handle_damaged_repositories() {
    let env = Env::new();
    env.init();
    let a = make_source(&env, 1);
    env.backup(&a, &[]);
    let b = make_source(&env, 2);
    fs::write(b.join("big.bin"), random_bytes(&mut rng(8), 20 << 20)).unwrap();
    env.backup(&b, &[]);
    check_ok(&env);

    // Missing index files: check reports missing blobs; repair index fixes it.
    let index_dir = env.repo.join("index");
    let saved = env.path("saved-index");
    fs::create_dir_all(&saved).unwrap();
    for f in fs::read_dir(&index_dir).unwrap() {
        let f = f.unwrap();
        fs::rename(f.path(), saved.join(f.file_name())).unwrap();
    }
    let out = env.cmd().args(["--json", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Typed problems: each names its kind and its object.
    let errors = v["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e["kind"] == "bad_tree" && e["reason"].to_string().contains("missing")),
        "{v}"
    );
    let warnings = v["warnings"].as_array().unwrap();
    assert!(
        !warnings.is_empty() && warnings.iter().all(|w| w["kind"] == "unindexed_pack"),
        "{v}"
    );
    env.json(&["repair", "index"]);
    check_ok(&env);

    // Duplicate blobs: an old index file listing the same packs again.
    for f in fs::read_dir(&saved).unwrap() {
        let f = f.unwrap();
        fs::copy(f.path(), index_dir.join(f.file_name())).unwrap();
    }
    check_ok(&env);
    env.json(&["maintain"]);
    check_ok(&env);

    // Orphan pack: check warns; full maintenance removes it in two phases.
    let orphan = "ab".repeat(32);
    fs::write(env.pack_path(&orphan), b"not a real pack").unwrap();
    let out = env.json(&["check"]);
    assert!(out["warnings"].to_string().contains(&orphan));
    env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    assert!(!env.pack_path(&orphan).exists());

    // Missing pack: check names it; repair snapshots drops the affected files.
    let tree = env.json(&["cat", "tree", "latest:/"]);
    let big = tree
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "big.bin")
        .unwrap();
    let first_chunk = big["content"][0].as_str().unwrap().to_string();
    let victim = env
        .pack_names()
        .into_iter()
        .find(|p| {
            env.json(&["cat", "pack", p])
                .to_string()
                .contains(&first_chunk)
        })
        .unwrap();
    fs::remove_file(env.pack_path(&victim)).unwrap();
    let out = env.cmd().args(["--json", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&victim));
    env.json(&["repair", "index"]);
    let rep = env.json(&["repair", "snapshots"]);
    assert!(
        rep["removed_entries"].to_string().contains("big.bin"),
        "{rep}"
    );
    check_ok(&env);
    // Everything still in the repaired snapshot restores exactly.
    let dst = env.path("dst");
    env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
    assert!(!dst.join("big.bin").exists());
    let restored = files_under(&dst);
    assert!(!restored.is_empty());
    for rel in restored {
        assert_eq!(
            fs::read(dst.join(&rel)).unwrap(),
            fs::read(b.join(&rel)).unwrap(),
            "{}",
            rel.display()
        );
    }
    let snaps = env.json(&["snapshots"]);
    assert!(snaps.to_string().contains("repaired"));
}

fn files_under(root: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let p = rel.join(e.file_name());
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// The weekly verify without scratch space, over the newest backup set
/// only: a volume deleted long ago (its last snapshot kept by retention,
/// and old) does not fail it, and damage is still found.
#[test]
fn verify_streams_the_newest_set_without_writing_files() {
    let env = Env::new();
    env.init();
    let gone = make_source(&env, 1);
    env.backup(
        &gone,
        &[
            "--source",
            "default/deleted-pvc",
            "--tag",
            "set=daily-20261125020000",
        ],
    );
    std::thread::sleep(Duration::from_millis(1100));
    let a = make_source(&env, 2);
    let b = make_source(&env, 3);
    for (dir, source) in [(&a, "default/pvc-a"), (&b, "monitoring/pvc-b")] {
        env.backup(
            dir,
            &["--source", source, "--tag", "set=daily-20261201020000"],
        );
    }
    // The deleted volume's snapshot is older than 1s; the set's are not.
    let v = env.json(&[
        "verify",
        "--max-age",
        "1h",
        "--stream",
        "--newest-tag",
        "set=daily-",
    ]);
    assert_eq!(v["pass"], true, "{v}");
    assert_eq!(v["set"], "set=daily-20261201020000");
    let sources: Vec<&str> = v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["default/pvc-a", "monitoring/pvc-b"]);
    let chunks = v["sources"][0]["verified_chunks"].as_u64().unwrap();
    assert!(chunks > 0, "{v}");
    // Each distinct chunk is read once: at most the source's bytes.
    let read = v["sources"][0]["restored_bytes"].as_u64().unwrap();
    assert!(read > 0 && read <= walk_bytes(&a), "{v}");

    // A prefix no snapshot carries is a failure, not an empty pass.
    let out = env
        .cmd()
        .args([
            "--json",
            "verify",
            "--stream",
            "--newest-tag",
            "set=weekly-",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["errors"].to_string().contains("set=weekly-"), "{v}");

    // Damage in a pack: the streamed read names the file and fails.
    let pack = env
        .pack_names()
        .into_iter()
        .max_by_key(|p| fs::metadata(env.pack_path(p)).unwrap().len())
        .unwrap();
    let path = env.pack_path(&pack);
    let mut bytes = fs::read(&path).unwrap();
    bytes[100] ^= 1;
    fs::write(&path, bytes).unwrap();
    let out = env
        .cmd()
        .args(["--json", "verify", "--stream"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = v["sources"].to_string();
    assert!(
        errors.contains("chunk") && errors.contains("authentication failed"),
        "{v}"
    );
}

fn walk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            total += walk_bytes(&e.path());
        } else {
            total += m.len();
        }
    }
    total
}

#[test]
fn verify_checks_age_and_restores_every_byte() {
    let env = Env::new();
    env.init();
    let a = make_source(&env, 1);
    env.backup(&a, &["--source", "default/pvc-a"]);
    let ok = env.json(&["verify", "--max-age", "48h", "--restore-test"]);
    assert_eq!(ok["pass"], true, "{ok}");
    assert!(ok["sources"][0]["verified_chunks"].as_u64().unwrap() > 0);

    std::thread::sleep(Duration::from_millis(1100));
    let out = env
        .cmd()
        .args(["--json", "verify", "--max-age", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sources"][0]["fresh"], false);

    let out = env
        .cmd()
        .args(["verify", "--source", "default/other"])
        .output()
        .unwrap();
    assert!(!out.status.success());

    // Damage: the restore test fails and names the file.
    let pack = env
        .pack_names()
        .into_iter()
        .max_by_key(|p| fs::metadata(env.pack_path(p)).unwrap().len())
        .unwrap();
    let path = env.pack_path(&pack);
    let mut bytes = fs::read(&path).unwrap();
    bytes[100] ^= 1;
    fs::write(&path, bytes).unwrap();
    let out = env
        .cmd()
        .args(["--json", "verify", "--restore-test"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pass"], false);
    assert!(
        v["sources"][0]["errors"]
            .to_string()
            .contains("authentication failed"),
        "{v}"
    );
}

/// The first chunk of `name` at the top of the latest snapshot.
fn first_chunk(env: &Env, name: &str) -> String {
    let tree = env.json(&["cat", "tree", "latest:/"]);
    let node = tree
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap()
        .clone();
    node["content"][0].as_str().unwrap().to_string()
}

/// A pack whose end was cut off (inside its trailer) while every blob is
/// whole: plain `check` finds it from the listing alone, `repair index`
/// copies its blobs into a new pack instead of dropping them, and
/// maintenance then removes the damaged pack without losing a byte.
#[test]
fn a_pack_truncated_in_its_trailer_is_found_and_its_blobs_saved() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    let mut r = rng(8);
    random_files(&src, &mut r, 5, 300_000);
    env.backup(&src, &[]);
    let (pack, _) = env.locate(&first_chunk(&env, "f0"));
    // How many chunks 300 kB of random data makes depends on the
    // repository's random chunker seed: the pack says how many it holds.
    let held = env.json(&["cat", "pack", &pack])[0]["blobs"]
        .as_array()
        .unwrap()
        .len();
    assert!(held >= 5, "every file's data in one pack: {held} blobs");
    let path = env.pack_path(&pack);
    let len = fs::metadata(&path).unwrap().len();
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 30)
        .unwrap();

    let out = env.cmd().args(["--json", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "plain check finds it");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&pack) && report.contains("truncated"),
        "{report}"
    );

    let out = env
        .cmd()
        .args(["--json", "repair", "index"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "damage is reported");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["unreadable_packs"][0], pack.as_str(), "{v}");
    assert_eq!(v["blobs_salvaged"], held, "{v}");
    assert_eq!(v["blobs_lost"].as_array().unwrap().len(), 0, "{v}");

    // The damaged pack is no longer needed: maintenance removes it.
    env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    assert!(!path.exists(), "damaged pack deleted");
    check_ok(&env);
    let dst = env.path("dst");
    env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
    assert_same_tree(&src, &dst);
}

/// A live blob that no longer authenticates, in a pack maintenance wants
/// to rewrite: the rest is copied out, the damaged blob stays where it was
/// (named with its pack), and the next run is not blocked. `repair
/// snapshots --read-data` then drops exactly the file that uses it.
#[test]
fn a_damaged_live_blob_does_not_block_maintenance() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let mut r = rng(9);
    for i in 0..40 {
        fs::write(src.join(format!("f{i:02}")), random_bytes(&mut r, 300_000)).unwrap();
    }
    env.backup(&src, &[]);
    for i in 0..35 {
        fs::remove_file(src.join(format!("f{i:02}"))).unwrap();
    }
    env.backup(&src, &[]);
    env.json(&["forget", "--keep-last", "1"]);
    let chunk = first_chunk(&env, "f39");
    let (pack, offset) = env.locate(&chunk);
    let path = env.pack_path(&pack);
    let mut bytes = fs::read(&path).unwrap();
    bytes[offset as usize + 100] ^= 0x55;
    fs::write(&path, &bytes).unwrap();

    let out = env
        .cmd()
        .args(["--json", "maintain", "--full", "--safety-margin", "0s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "the damage is not hidden");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let damaged = v["damaged_blobs"].to_string();
    assert!(damaged.contains(&pack) && damaged.contains(&chunk), "{v}");
    assert!(v["packs_written"].as_u64().unwrap() >= 1, "{v}");
    let again = env.json(&["maintain", "--full", "--safety-margin", "0s"]);
    assert_eq!(again["damaged_blobs"].as_array().unwrap().len(), 0);
    assert!(path.exists(), "the damaged blob's pack is kept");

    // Only an index listing: plain repair keeps the file, --read-data not.
    let plain = env.json(&["repair", "snapshots", "--dry-run"]);
    assert_eq!(plain["removed_entries"].as_array().unwrap().len(), 0);
    let rep = env.json(&["repair", "snapshots", "--read-data"]);
    let removed = rep["removed_entries"].to_string();
    assert!(removed.contains("f39") && !removed.contains("f38"), "{rep}");
    let dst = env.path("dst");
    let out = env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("is incomplete"),
        "a repaired snapshot says so: {said}"
    );
    assert!(!dst.join("f39").exists());
    for i in 35..39 {
        let name = format!("f{i:02}");
        assert!(fs::read(dst.join(&name)).unwrap() == fs::read(src.join(&name)).unwrap());
    }
}

/// A damaged directory that several snapshots (and two directories of one
/// snapshot) share is checked once, but reported at every path of every
/// snapshot that reaches it: the operator must know all that is affected.
#[test]
fn check_names_every_snapshot_that_reaches_a_shared_damaged_tree() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("shared")).unwrap();
    let mut r = rng(10);
    fs::write(src.join("shared/data"), random_bytes(&mut r, 5000)).unwrap();
    fs::write(src.join("a"), b"first").unwrap();
    // Same names, contents and times: one tree for both directories.
    let when = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let settle = |dir: &Path| {
        fs::File::open(dir.join("data"))
            .unwrap()
            .set_modified(when)
            .unwrap();
        fs::File::open(dir).unwrap().set_modified(when).unwrap();
    };
    settle(&src.join("shared"));
    let first = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    fs::write(src.join("a"), b"second").unwrap();
    fs::create_dir_all(src.join("copy")).unwrap();
    fs::copy(src.join("shared/data"), src.join("copy/data")).unwrap();
    settle(&src.join("copy"));
    let second = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // An untouched snapshot must not be named.
    let other = env.path("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("b"), b"unrelated").unwrap();
    let third = env.backup(&other, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();

    let root = env.json(&["cat", "tree", &format!("{second}:/")]);
    let subtree = |name: &str| {
        root.as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap()["subtree"][0]
            .as_str()
            .unwrap()
            .to_string()
    };
    let tree = subtree("shared");
    assert_eq!(
        tree,
        subtree("copy"),
        "identical directories share one tree"
    );
    let (pack, offset) = env.locate(&tree);
    let path = env.pack_path(&pack);
    let mut bytes = fs::read(&path).unwrap();
    bytes[offset as usize + 20] ^= 0x55;
    fs::write(&path, &bytes).unwrap();

    let out = env.cmd().args(["--json", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut named: Vec<(String, String)> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "bad_tree")
        .map(|e| {
            (
                e["snapshot"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    named.sort();
    let mut want = vec![
        (first.clone(), "/shared".to_string()),
        (second.clone(), "/copy".to_string()),
        (second.clone(), "/shared".to_string()),
    ];
    want.sort();
    assert_eq!(named, want, "{v}");
    assert!(!v["errors"].to_string().contains(&third), "{v}");
}
