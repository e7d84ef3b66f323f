//! The restore planner: requests per pack, each blob fetched once, faults,
//! and restoring over an existing directory (`--overwrite`, `--delete`,
//! resuming an interrupted restore).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use marmoset_storage::backend::{self, BackendOptions, FileKind};
use marmoset_testing::fault_proxy::FaultProxy;
use marmoset_testing::random::{random_bytes, rng};
use marmoset_testing::s3_server::S3Server;
use marmoset_testing::trees::{assert_same_tree, random_tree};
use serde_json::Value;

use crate::integration::cli::Env;

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

/// How many objects of `kind` the S3 repository at `url` holds.
/// `restore latest` of `url` into `target` with `--json` and `extra`
/// options; the caller checks the outcome.
fn s3_restore(env: &Env, url: &str, target: &Path, extra: &[&str]) -> std::process::Output {
    let target = target.to_str().unwrap();
    let mut args = vec!["--json", "restore", "latest"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--target", target]);
    env.s3_cmd(url).args(&args).output().unwrap()
}

/// [`s3_restore`] that must succeed.
fn s3_restore_ok(env: &Env, url: &str, target: &Path, extra: &[&str]) -> std::process::Output {
    let out = s3_restore(env, url, target, extra);
    assert!(
        out.status.success(),
        "restore from {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn objects(url: &str, kind: FileKind) -> u64 {
    let options = BackendOptions {
        static_credentials: Some(("test".into(), "test".into())),
        region: Some("us-east-1".into()),
        ..BackendOptions::default()
    };
    backend::open(url, &options)
        .unwrap()
        .list(kind)
        .unwrap()
        .len() as u64
}

#[test]
fn s3_restore_reads_each_pack_once_and_a_shared_chunk_once() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let env = Env::new();
    let url = server.url("planned");
    env.s3_ok(&url, &["init"]);
    let src = env.path("src");
    random_tree(&src, 31, 150);
    // Three copies of the same incompressible data: stored once, written
    // three times, downloaded once.
    let shared = random_bytes(&mut rng(5), 6 << 20);
    for name in ["a.bin", "b.bin", "c.bin"] {
        fs::write(src.join(name), &shared).unwrap();
    }
    env.s3_ok(&url, &["backup", src.to_str().unwrap()]);
    let stats = json(&env.s3_ok(&url, &["--json", "stats"]));
    let packs = stats["packs"].as_u64().unwrap();
    let pack_bytes = stats["pack_bytes"].as_u64().unwrap();
    // A cold cache, as on a new machine: index files, snapshots and trees
    // all come from the bucket.
    fs::remove_dir_all(&env.cache).unwrap();
    let dst = env.path("dst");
    let out = s3_restore_ok(&env, &url, &dst, &[]);
    assert_same_tree(&src, &dst);
    let v = json(&out);
    let s = &v["summary"];
    let b = &v["backend"];
    let gets = b["get"].as_u64().unwrap() + b["get_range"].as_u64().unwrap();
    let metadata = 1 + [FileKind::Key, FileKind::Index, FileKind::Snapshot]
        .into_iter()
        .map(|k| objects(&url, k))
        .sum::<u64>();
    assert!(
        gets <= packs + metadata,
        "{gets} GETs for {packs} packs and {metadata} metadata objects: {v}"
    );
    // Data: one ranged read per pack holding data (packs are smaller than
    // the largest range), each blob once.
    assert!(s["requests"].as_u64().unwrap() <= packs, "{v}");
    assert!(
        s["bytes_downloaded"].as_u64().unwrap() <= pack_bytes,
        "never more than the repository holds: {v}"
    );
    assert!(
        s["bytes"].as_u64().unwrap() >= 3 * shared.len() as u64,
        "the shared data was written three times: {v}"
    );
    // One connection feeding the pool of decoders: the same result, and
    // still one read per pack.
    let one = env.path("one");
    let out = s3_restore_ok(&env, &url, &one, &["--threads", "1"]);
    assert_same_tree(&src, &one);
    let v = json(&out);
    assert!(v["summary"]["requests"].as_u64().unwrap() <= packs, "{v}");
}

#[test]
fn restore_with_all_pack_reads_failing_fails_cleanly_naming_them() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let env = Env::new();
    let direct = server.url("unreadable");
    env.s3_ok(&direct, &["init"]);
    let src = env.path("src");
    random_tree(&src, 8, 40);
    fs::write(src.join("big.bin"), random_bytes(&mut rng(2), 3 << 20)).unwrap();
    env.s3_ok(&direct, &["backup", src.to_str().unwrap()]);
    // Trees come to the local cache; then every read of pack data fails.
    env.s3_ok(&direct, &["ls", "-R", "latest"]);
    let proxy = FaultProxy::start_ranged_only(server.port, 1.0, 3);
    let via = format!(
        "s3:http://127.0.0.1:{}/{}/unreadable",
        proxy.port, server.bucket
    );
    let dst = env.path("dst");
    let out = s3_restore(&env, &via, &dst, &[]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    let errors = v["summary"]["errors"].as_array().unwrap();
    assert!(!errors.is_empty());
    for e in errors {
        let msg = e["error"].as_str().unwrap();
        assert!(
            msg.contains("not restored, file removed") && msg.contains("pack "),
            "names the pack that could not be read: {e}"
        );
    }
    // No file with wrong content is left behind.
    let big = dst.join("big.bin");
    assert!(!big.exists() || fs::read(&big).unwrap() == fs::read(src.join("big.bin")).unwrap());
    // The same restore straight from the bucket is complete.
    let ok = env.path("ok");
    env.s3_ok(
        &direct,
        &["restore", "latest", "--target", ok.to_str().unwrap()],
    );
    assert_same_tree(&src, &ok);
}

#[test]
fn a_failing_storage_is_given_up_on_after_a_few_packs_not_pack_by_pack() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let env = Env::new();
    let direct = server.url("outage");
    env.s3_ok(&direct, &["init", "--pack-size-mib", "1"]);
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..16 {
        fs::write(
            src.join(format!("f{i}")),
            random_bytes(&mut rng(40 + i), 1 << 20),
        )
        .unwrap();
    }
    env.s3_ok(&direct, &["backup", src.to_str().unwrap()]);
    let packs = json(&env.s3_ok(&direct, &["--json", "stats"]))["packs"]
        .as_u64()
        .unwrap();
    assert!(packs >= 8, "{packs} packs");
    env.s3_ok(&direct, &["ls", "-R", "latest"]);
    let proxy = FaultProxy::start_ranged_only(server.port, 1.0, 5);
    let via = format!(
        "s3:http://127.0.0.1:{}/{}/outage",
        proxy.port, server.bucket
    );
    let dst = env.path("dst");
    let out = s3_restore(&env, &via, &dst, &["--s3-retries", "2", "--threads", "1"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    // Four packs failed after their retries; the others were not tried.
    assert_eq!(v["summary"]["requests"].as_u64(), Some(4), "{v}");
    assert_eq!(
        v["backend"]["retries"].as_u64(),
        Some(4),
        "one retry each: {v}"
    );
    let errors = v["summary"]["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| e["error"]
            .as_str()
            .unwrap()
            .contains("the storage is failing")),
        "{v}"
    );
    assert!(
        errors.len() >= 8 && fs::read_dir(&dst).unwrap().next().is_none(),
        "every file is reported and none is left half written: {v}"
    );
}

/// Sets a file's mtime to `secs` after the epoch.
fn touch(p: &Path, secs: u64) {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn overwrite_and_delete_on_a_target_with_extra_changed_and_identical_files() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("same.txt"), b"identical").unwrap();
    fs::write(src.join("changed.txt"), b"original content").unwrap();
    fs::write(
        src.join("sub/grown.bin"),
        random_bytes(&mut rng(1), 300_000),
    )
    .unwrap();
    env.backup(&src, &[]);
    let dst = env.path("dst");
    env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
    assert_same_tree(&src, &dst);
    // The operator's target drifts: extra files and folders, a changed
    // file, a truncated one, a symlink pointing out of the target.
    let outside = env.path("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("keep-me"), b"not the restore's").unwrap();
    let drift = |dst: &Path| {
        fs::write(dst.join("changed.txt"), b"edited by someone").unwrap();
        fs::write(dst.join("extra.txt"), b"not in the snapshot").unwrap();
        fs::create_dir_all(dst.join("extra-dir/deeper")).unwrap();
        fs::write(dst.join("extra-dir/deeper/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, dst.join("sub/escape")).unwrap();
        let f = fs::File::options()
            .write(true)
            .open(dst.join("sub/grown.bin"))
            .unwrap();
        f.set_len(1000).unwrap();
    };
    drift(&dst);

    // never: what is there stays; nothing is deleted without --delete.
    let v = env.json(&[
        "restore",
        "latest",
        "--target",
        dst.to_str().unwrap(),
        "--overwrite",
        "never",
    ]);
    assert_eq!(
        fs::read(dst.join("changed.txt")).unwrap(),
        b"edited by someone"
    );
    assert!(dst.join("extra.txt").exists());
    assert_eq!(v["summary"]["files_kept"], 3, "{v}");
    assert_eq!(v["summary"]["blobs_fetched"], 0, "{v}");

    // if-changed + delete: exactly the snapshot again; the identical file
    // is kept, only the differing files are fetched; the symlink is
    // removed, not followed.
    let v = env.json(&[
        "restore",
        "latest",
        "--target",
        dst.to_str().unwrap(),
        "--overwrite",
        "if-changed",
        "--delete",
    ]);
    assert_same_tree(&src, &dst);
    assert_eq!(v["summary"]["files_unchanged"], 1, "{v}");
    assert_eq!(
        v["summary"]["deleted"], 5,
        "extra.txt, extra-dir (3 entries), the symlink: {v}"
    );
    assert_eq!(
        fs::read(outside.join("keep-me")).unwrap(),
        b"not the restore's"
    );

    // Run again: nothing to do, nothing downloaded.
    let v = env.json(&[
        "restore",
        "latest",
        "--target",
        dst.to_str().unwrap(),
        "--overwrite",
        "if-changed",
        "--delete",
    ]);
    assert_eq!(v["summary"]["files_unchanged"], 3, "{v}");
    assert_eq!(v["summary"]["bytes_downloaded"], 0, "{v}");
    assert_eq!(v["summary"]["deleted"], 0, "{v}");

    // Same size and mtime but other content: if-changed keeps it (as
    // restic does); always replaces everything.
    fs::write(dst.join("same.txt"), b"IDENTICAL").unwrap();
    let mtime = fs::metadata(src.join("same.txt"))
        .unwrap()
        .modified()
        .unwrap();
    let secs = mtime.duration_since(std::time::UNIX_EPOCH).unwrap();
    fs::File::options()
        .write(true)
        .open(dst.join("same.txt"))
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + secs)
        .unwrap();
    let v = env.json(&[
        "restore",
        "latest",
        "--target",
        dst.to_str().unwrap(),
        "--overwrite",
        "always",
    ]);
    assert_eq!(v["summary"]["files_unchanged"], 0, "{v}");
    assert_same_tree(&src, &dst);

    // A changed mtime with the same content is only a metadata fix.
    touch(&dst.join("sub/grown.bin"), 1_000_000);
    let v = env.json(&[
        "restore",
        "latest",
        "--target",
        dst.to_str().unwrap(),
        "--overwrite",
        "if-changed",
    ]);
    assert_eq!(v["summary"]["bytes_downloaded"], 0, "{v}");
    assert_same_tree(&src, &dst);
    // A read-only restored file is still updated (replaced).
    fs::write(dst.join("changed.txt"), b"edited again, longer").unwrap();
    fs::set_permissions(dst.join("changed.txt"), fs::Permissions::from_mode(0o444)).unwrap();
    env.json(&[
        "restore",
        "latest",
        "--target",
        dst.to_str().unwrap(),
        "--overwrite",
        "if-changed",
    ]);
    assert_same_tree(&src, &dst);
}

#[test]
fn an_interrupted_restore_resumes_without_fetching_what_is_already_there() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..4 {
        fs::write(
            src.join(format!("part{i}.bin")),
            random_bytes(&mut rng(10 + i), 10 << 20),
        )
        .unwrap();
    }
    env.backup(&src, &[]);
    let dst = env.path("dst");
    // Slowly, one pack at a time, and killed once the first file is whole.
    let mut child = env
        .cmd()
        .args([
            "--limit-download",
            "8192",
            "restore",
            "latest",
            "--threads",
            "1",
            "--target",
            dst.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first: Vec<Vec<u8>> = (0..4)
        .map(|i| fs::read(src.join(format!("part{i}.bin"))).unwrap())
        .collect();
    let started = Instant::now();
    let whole = |dst: &Path| {
        (0..4).any(|i| fs::read(dst.join(format!("part{i}.bin"))).is_ok_and(|b| b == first[i]))
    };
    while !whole(&dst) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "restore made no progress"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "restore ended before it was interrupted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let v = env.json(&[
        "restore",
        "latest",
        "--target",
        dst.to_str().unwrap(),
        "--overwrite",
        "if-changed",
    ]);
    assert_same_tree(&src, &dst);
    let downloaded = v["summary"]["bytes_downloaded"].as_u64().unwrap();
    let total = 40u64 << 20;
    assert!(
        downloaded <= total - (10 << 20),
        "the whole file (at least) was not fetched again: {downloaded} of {total}: {v}"
    );
}

/// The FUSE prefetcher's read: a run of a file's chunks that sit side by
/// side in a pack comes in one ranged request, each chunk authenticated.
#[test]
fn a_run_of_neighbouring_chunks_is_one_ranged_read() {
    use std::sync::Arc;

    use marmoset_storage::backend::fs::FsBackend;
    use marmoset_storage::backend::metered::MeteredBackend;
    use marmoset_storage::backend::ReadBackend;
    use marmoset_storage::{OpenOptions, Repository};

    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let data = random_bytes(&mut rng(77), 9 << 20);
    fs::write(src.join("seq.bin"), &data).unwrap();
    env.backup(&src, &[]);
    let metered = Arc::new(MeteredBackend::new(FsBackend::new(&env.repo)));
    let repo = Repository::open(
        metered.clone(),
        crate::integration::cli::PASSWORD.as_bytes(),
        &OpenOptions {
            cache_root: Some(env.cache.clone()),
        },
    )
    .unwrap();
    let (snaps, _) = repo.snapshots().unwrap();
    let node = repo.find_node(&snaps[0].1, "seq.bin").unwrap();
    let chunks = repo.file_chunks(&node).unwrap();
    assert!(chunks.len() >= 3, "several chunks: {}", chunks.len());
    let before = metered.stats().unwrap();
    let loaded = repo.load_blobs(&chunks);
    let after = metered.stats().unwrap();
    assert_eq!(
        after.get_range - before.get_range,
        1,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.get - before.get, 0);
    let mut by_id: std::collections::HashMap<_, _> = loaded.into_iter().collect();
    let mut joined = Vec::new();
    for id in &chunks {
        joined.extend(by_id.remove(id).unwrap().unwrap());
    }
    assert!(joined == data, "every chunk authenticated and in order");
}

/// Restores `latest` into `dst` (with `extra` flags) where some files
/// cannot be restored: exit code 3, and the JSON on stdout.
fn restore_expecting_losses(env: &Env, dst: &Path, extra: &[&str]) -> std::process::Output {
    let out = env
        .cmd()
        .args([
            "--json",
            "restore",
            "latest",
            "--target",
            dst.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The data packs of a local repository (trees live in packs of their
/// own): those `cat pack` lists with data blobs.
fn data_packs(env: &Env) -> Vec<String> {
    env.pack_names()
        .into_iter()
        .filter(|p| {
            env.json(&["cat", "pack", p])
                .to_string()
                .contains("\"data\"")
        })
        .collect()
}

/// Regressions from the attack on the planner: zero runs over old bytes,
/// hard links of damaged data, forged size+mtime on a set-id file,
/// `never` for symlinks, and truncated packs.
#[test]
fn restoring_over_hostile_or_damaged_state_never_leaves_a_wrong_file() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    // Zero runs inside (written sparse into new files).
    let mut holey = random_bytes(&mut rng(1), 1 << 20);
    holey.extend(vec![0u8; 3 << 20]);
    holey.extend(random_bytes(&mut rng(2), 1 << 20));
    fs::write(src.join("holey.bin"), &holey).unwrap();
    fs::write(src.join("tool"), b"#!/bin/sh\necho genuine!\n").unwrap();
    fs::set_permissions(src.join("tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink("holey.bin", src.join("link")).unwrap();
    env.backup(&src, &[]);
    let dst = env.path("dst");
    env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);

    // 1. Same size, other bytes where the snapshot has zeros.
    fs::write(
        dst.join("holey.bin"),
        random_bytes(&mut rng(9), holey.len()),
    )
    .unwrap();
    // 2. Forged: other content, same size and mtime, on a setuid file.
    let forged = b"#!/bin/sh\necho attacker\n";
    assert_eq!(
        forged.len(),
        fs::metadata(src.join("tool")).unwrap().len() as usize
    );
    fs::write(dst.join("tool"), forged).unwrap();
    let mtime = fs::metadata(src.join("tool")).unwrap().modified().unwrap();
    fs::File::options()
        .write(true)
        .open(dst.join("tool"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    env.ok(&[
        "restore",
        "latest",
        "--target",
        dst.to_str().unwrap(),
        "--overwrite",
        "if-changed",
    ]);
    assert!(
        fs::read(dst.join("holey.bin")).unwrap() == holey,
        "old bytes left in a zero run"
    );
    assert_eq!(
        fs::read(dst.join("tool")).unwrap(),
        fs::read(src.join("tool")).unwrap()
    );
    assert_same_tree(&src, &dst);

    // 3. never: a regular file where the snapshot has a symlink stays.
    fs::remove_file(dst.join("link")).unwrap();
    fs::write(dst.join("link"), b"user data").unwrap();
    env.ok(&[
        "restore",
        "latest",
        "--target",
        dst.to_str().unwrap(),
        "--overwrite",
        "never",
    ]);
    assert_eq!(fs::read(dst.join("link")).unwrap(), b"user data");
}

#[test]
fn damaged_data_removes_every_name_of_a_hard_link_and_spares_intact_blobs() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("a"), random_bytes(&mut rng(3), 300_000)).unwrap();
    fs::hard_link(src.join("a"), src.join("d/a2")).unwrap();
    env.backup(&src, &[]);
    let packs = data_packs(&env);
    assert_eq!(packs.len(), 1);
    let p = env.pack_path(&packs[0]);
    let mut bytes = fs::read(&p).unwrap();
    bytes[200] ^= 0xff;
    fs::write(&p, &bytes).unwrap();
    let dst = env.path("dst");
    let out = restore_expecting_losses(&env, &dst, &[]);
    let v = json(&out);
    let errors = v["summary"]["errors"].to_string();
    assert!(
        errors.contains("/a\"") && errors.contains("a2"),
        "both names reported: {v}"
    );
    assert!(
        !dst.join("a").exists() && !dst.join("d/a2").exists(),
        "no zero-filled name left"
    );

    // A truncated pack: files wholly in the part that is left restore.
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..6u64 {
        fs::write(
            src.join(format!("f{i}")),
            random_bytes(&mut rng(20 + i), 200_000),
        )
        .unwrap();
    }
    env.backup(&src, &[]);
    let packs = data_packs(&env);
    assert_eq!(packs.len(), 1);
    let p = env.pack_path(&packs[0]);
    let len = fs::metadata(&p).unwrap().len();
    fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let dst = env.path("dst");
    let out = restore_expecting_losses(&env, &dst, &[]);
    let restored = (0..6)
        .filter(|i| {
            fs::read(dst.join(format!("f{i}")))
                .is_ok_and(|b| b == fs::read(src.join(format!("f{i}"))).unwrap())
        })
        .count();
    let lost = json(&out)["summary"]["errors"].as_array().unwrap().len();
    assert!(
        restored >= 2,
        "intact blobs of a truncated pack are restored: {restored}"
    );
    assert_eq!(restored + lost, 6, "every file either exact or reported");
}

/// `--overwrite if-changed` over hard-linked files: a correct one is
/// neither downloaded again nor lost when the repository's copy is
/// damaged; a link planted to a file outside the target is replaced, and
/// the outside file keeps its mode. Counts in the summary add up.
#[test]
fn if_changed_keeps_correct_hard_linked_files_without_downloading_them() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    let linked = random_bytes(&mut rng(4), 300_000);
    fs::write(src.join("a"), &linked).unwrap();
    fs::hard_link(src.join("a"), src.join("d/a2")).unwrap();
    let plain = random_bytes(&mut rng(5), 200_000);
    fs::write(src.join("plain"), &plain).unwrap();
    fs::set_permissions(src.join("plain"), fs::Permissions::from_mode(0o644)).unwrap();
    env.backup(&src, &[]);
    let dst = env.path("dst");
    env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
    assert_same_tree(&src, &dst);

    // A file outside the target with the snapshot's bytes, hard-linked
    // in place of `plain` (a tenant who can write the target).
    let outside = env.path("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), &plain).unwrap();
    fs::set_permissions(outside.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(dst.join("plain")).unwrap();
    fs::hard_link(outside.join("secret"), dst.join("plain")).unwrap();

    let packs = data_packs(&env);
    assert_eq!(packs.len(), 1);
    let p = env.pack_path(&packs[0]);
    let mut bytes = fs::read(&p).unwrap();
    bytes[200] ^= 0xff;
    fs::write(&p, &bytes).unwrap();

    let v = env.json(&[
        "restore",
        "latest",
        "--target",
        dst.to_str().unwrap(),
        "--overwrite",
        "if-changed",
    ]);
    assert_eq!(v["summary"]["blobs_fetched"], 0, "{v}");
    assert_eq!(v["summary"]["files"], 3, "{v}");
    assert_eq!(v["summary"]["files_failed"], 0, "{v}");
    assert!(fs::read(dst.join("a")).unwrap() == linked, "kept");
    assert!(fs::read(dst.join("d/a2")).unwrap() == linked, "kept");
    assert_same_tree(&src, &dst);
    let outside_meta = fs::metadata(outside.join("secret")).unwrap();
    assert_eq!(outside_meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(outside_meta.nlink(), 1, "the planted link was replaced");

    // A hard-linked file that differs, with the repository's copy
    // damaged: reported and removed, never left wrong; the count says so.
    fs::remove_file(dst.join("d/a2")).unwrap();
    fs::write(dst.join("a"), random_bytes(&mut rng(6), 300_000)).unwrap();
    fs::hard_link(dst.join("a"), dst.join("d/a2")).unwrap();
    let out = restore_expecting_losses(&env, &dst, &["--overwrite", "if-changed"]);
    let v = json(&out);
    assert_eq!(v["summary"]["files_failed"], 2, "{v}");
    // The first name is removed; the later one is reported and left as
    // found, never linked to the failed file.
    assert!(!dst.join("a").exists());
    assert!(fs::read(dst.join("d/a2")).unwrap() != linked);
    assert!(fs::read(dst.join("plain")).unwrap() == plain);

    // The first name missing, a later name still correct, the repository
    // copy damaged: the later name is not given up for the failed first.
    fs::remove_file(dst.join("a")).ok();
    fs::write(dst.join("d/a2"), &linked).unwrap();
    let out = restore_expecting_losses(&env, &dst, &["--overwrite", "if-changed"]);
    let v = json(&out);
    assert!(
        fs::read(dst.join("d/a2")).unwrap() == linked,
        "correct later name kept: {v}"
    );
    assert_eq!(v["summary"]["files_failed"], 2, "{v}");

    // never: kept files are counted as kept, not as "already correct".
    fs::write(dst.join("a"), b"someone else's").unwrap();
    let out = env
        .cmd()
        .args([
            "restore",
            "latest",
            "--target",
            dst.to_str().unwrap(),
            "--overwrite",
            "never",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("kept unchecked") && !text.contains("already correct"),
        "{text}"
    );
}

/// A hard-linked file whose first name cannot be restored at all (its
/// blob is missing from the index) while something else sits at that
/// name: later names are reported, never linked to what is there.
#[test]
fn later_names_of_an_unrestorable_file_are_not_linked_to_what_is_there() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("d1")).unwrap();
    fs::create_dir_all(src.join("d2")).unwrap();
    fs::write(src.join("d1/a"), random_bytes(&mut rng(11), 300_000)).unwrap();
    fs::hard_link(src.join("d1/a"), src.join("d2/a_link")).unwrap();
    env.backup(&src, &[]);
    // The blob leaves the index: its pack is moved away, the index rebuilt.
    let packs = data_packs(&env);
    let aside = env.path("aside");
    fs::create_dir_all(&aside).unwrap();
    for p in &packs {
        fs::rename(env.pack_path(p), aside.join(p)).unwrap();
    }
    env.ok(&["repair", "index"]);
    let dst = env.path("dst");
    fs::create_dir_all(dst.join("d1")).unwrap();
    let outside = env.path("outside");
    fs::write(&outside, b"planted").unwrap();
    fs::hard_link(&outside, dst.join("d1/a")).unwrap();
    let out = restore_expecting_losses(&env, &dst, &[]);
    let v = json(&out);
    assert_eq!(v["summary"]["files_failed"], 2, "{v}");
    let link = dst.join("d2/a_link");
    assert!(
        !link.exists()
            || fs::metadata(&link).unwrap().ino() != fs::metadata(&outside).unwrap().ino(),
        "a later name linked to the planted file"
    );
    assert_eq!(fs::metadata(&outside).unwrap().nlink(), 2);
}

/// Closed stderr (`2>&1 | head -c1`) with debug logging: log lines are
/// dropped, and the backup either fails or saves a snapshot whose every
/// blob is indexed, never a snapshot pointing at unindexed packs.
#[test]
fn a_closed_stderr_never_leaves_an_unrestorable_snapshot() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    random_tree(&src, 12, 40);
    let mut c = env.cmd();
    c.args(["-vv", "backup", src.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_ne!(status.code(), Some(101), "no panic");
    let out = env.cmd().args(["check", "--read-data"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    if status.success() {
        let dst = env.path("dst");
        env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
        assert_same_tree(&src, &dst);
    }
}

#[test]
fn delete_never_crosses_into_a_mounted_filesystem() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to mount a tmpfs");
        return;
    }
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    env.backup(&src, &[]);
    let dst = env.path("dst");
    let mnt = dst.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs", mnt.to_str().unwrap()])
        .status()
        .unwrap()
        .success();
    if !ok {
        eprintln!("skipped: tmpfs mount refused");
        return;
    }
    fs::write(mnt.join("important"), b"another filesystem").unwrap();
    let out = env
        .cmd()
        .args([
            "--json",
            "restore",
            "latest",
            "--target",
            dst.to_str().unwrap(),
            "--delete",
        ])
        .output()
        .unwrap();
    let kept = fs::read(mnt.join("important"));
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert_eq!(kept.unwrap(), b"another filesystem");
    assert!(json(&out)["summary"]["errors"]
        .to_string()
        .contains("mount point"));
}

#[test]
fn updating_a_sparse_file_in_place_keeps_it_sparse() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    // 64 MiB, mostly hole, with three 4 KiB islands of data.
    let f = fs::File::create(src.join("sparse.img")).unwrap();
    f.set_len(64 << 20).unwrap();
    for at in [1u64 << 20, 20 << 20, 50 << 20] {
        f.write_all_at(&random_bytes(&mut rng(at), 4096), at)
            .unwrap();
    }
    drop(f);
    env.backup(&src, &[]);
    // The target already holds the file, all zeros (an interrupted
    // restore, or a volume initialised with a hole of the right size).
    let dst = env.path("dst");
    fs::create_dir_all(&dst).unwrap();
    fs::File::create(dst.join("sparse.img"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    env.ok(&[
        "restore",
        "latest",
        "--overwrite",
        "if-changed",
        "--target",
        dst.to_str().unwrap(),
    ]);
    assert_same_tree(&src, &dst);
    let allocated = fs::metadata(dst.join("sparse.img")).unwrap().blocks() * 512;
    assert!(
        allocated <= 1 << 20,
        "{allocated} bytes allocated for 12 KiB of data: zero runs were written"
    );
}

/// A restore of more files than one batch plans at a time: every file
/// arrives whole, and a hard link whose first name was fetched in an
/// earlier batch is linked to the finished file.
#[test]
fn many_files_are_restored_in_batches_with_hard_links_across_them() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    for d in ["a", "m", "z"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    let mut r = rng(8);
    fs::write(src.join("a/first"), random_bytes(&mut r, 70_000)).unwrap();
    for i in 0..45_000 {
        fs::write(src.join(format!("m/f{i:05}")), format!("file {i}\n")).unwrap();
    }
    fs::hard_link(src.join("a/first"), src.join("z/second")).unwrap();
    env.backup(&src, &[]);
    let dst = env.path("dst");
    let v = env.json(&["restore", "latest", "--target", dst.to_str().unwrap()]);
    assert_eq!(
        v["summary"]["errors"].as_array().map(Vec::len),
        Some(0),
        "{v}"
    );
    assert_eq!(v["summary"]["files"], 45_002, "{v}");
    assert_same_tree(&src, &dst);
    use std::os::unix::fs::MetadataExt;
    let (a, z) = (
        fs::metadata(dst.join("a/first")).unwrap(),
        fs::metadata(dst.join("z/second")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (z.ino(), 2), "one file, two names");
}
