//! Reliability campaigns (quick forms; set MARMOSET_CAMPAIGN_TRIALS for the
//! long forms, e.g. 100): corruption of every object kind, crash of every
//! writing command, full disk, odd source trees, concurrency, security.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use marmoset_testing::privileges::without_dac_override;
use marmoset_testing::random::{random_bytes, rng};
use marmoset_testing::trees::{assert_same_tree, random_tree};
use rand::Rng;

use crate::integration::cli::Env;

fn trials(quick: u64) -> u64 {
    std::env::var("MARMOSET_CAMPAIGN_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(quick)
}

fn all_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Flip or truncate bytes of a random repository object; `check
/// --read-data` must report it, and restore must deliver every undamaged
/// file while refusing damaged ones by name.
#[test]
fn corruption_campaign_every_damage_is_detected() {
    let n = trials(12);
    let mut detected = 0;
    for seed in 0..n {
        let env = Env::new();
        env.init();
        let src = env.path("src");
        random_tree(&src, seed, 40);
        fs::write(src.join("big.bin"), random_bytes(&mut rng(seed), 5 << 20)).unwrap();
        env.backup(&src, &[]);
        let mut r = rng(1000 + seed);
        // Choose an object kind in rotation so every kind is covered.
        let kinds = ["packs", "index", "snapshots", "keys", "marmoset.repository"];
        let kind = kinds[(seed as usize) % kinds.len()];
        let victims: Vec<_> = all_files(&env.repo)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(kind) && !p.ends_with(".tmp"))
            .collect();
        let victim = &victims[r.gen_range(0..victims.len())];
        let mut bytes = fs::read(victim).unwrap();
        if r.gen_bool(0.5) && bytes.len() > 1 {
            let cut = r.gen_range(0..bytes.len());
            bytes.truncate(cut);
        } else {
            let i = r.gen_range(0..bytes.len());
            bytes[i] ^= 1 << r.gen_range(0..8);
        }
        fs::write(victim, &bytes).unwrap();
        let out = env
            .cmd()
            .args(["--json", "check", "--read-data"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!stderr.contains("panicked"), "{stderr}");
        let reported = !out.status.success();
        assert!(
            reported,
            "seed {seed}: damage to {} went unnoticed",
            victim.display()
        );
        detected += 1;
        // Data damage: restore names the damaged files and delivers the rest.
        if kind == "packs" {
            let dst = env.path("dst");
            let out = env
                .cmd()
                .args([
                    "--json",
                    "restore",
                    "latest",
                    "--target",
                    dst.to_str().unwrap(),
                ])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(!stderr.contains("panicked"), "{stderr}");
            if out.status.code() == Some(3) {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let bad: Vec<String> = v["summary"]["errors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["path"].as_str().unwrap().to_string())
                    .collect();
                for f in all_files(&dst)
                    .into_iter()
                    .filter(|f| fs::symlink_metadata(f).unwrap().is_file())
                {
                    let rel = f.strip_prefix(&dst).unwrap();
                    assert_eq!(
                        fs::read(&f).unwrap(),
                        fs::read(src.join(rel)).unwrap(),
                        "undamaged file {} restored exactly",
                        rel.display()
                    );
                }
                assert!(!bad.is_empty());
            }
        }
    }
    eprintln!("corruption campaign: {detected}/{n} corruptions detected");
}

/// kill -9 of backup, forget and maintain at seeded points: check passes,
/// completed snapshots restore, and the next run completes.
#[test]
fn crash_campaign_kill9_never_breaks_the_repository() {
    let n = trials(4);
    for seed in 0..n {
        let env = Env::new();
        env.init();
        let src = env.path("src");
        random_tree(&src, seed, 60);
        fs::write(
            src.join("big.bin"),
            random_bytes(&mut rng(seed + 77), 30 << 20),
        )
        .unwrap();
        env.backup(&src, &["--source", "s"]);
        fs::write(
            src.join("big2.bin"),
            random_bytes(&mut rng(seed + 78), 30 << 20),
        )
        .unwrap();
        env.backup(&src, &["--source", "s"]);
        let mut r = rng(seed);
        let cmds: [&[&str]; 3] = [
            &["backup", "--threads", "1", "--source", "s"],
            &["forget", "--keep-last", "1"],
            &["maintain", "--full", "--safety-margin", "0s"],
        ];
        for (k, args) in cmds.iter().enumerate() {
            if k == 0 {
                fs::write(
                    src.join("big3.bin"),
                    random_bytes(&mut rng(seed + 79), 40 << 20),
                )
                .unwrap();
            }
            let mut c = env.cmd();
            c.args(*args);
            if k == 0 {
                c.arg(&src);
            }
            let mut child = c.spawn().unwrap();
            std::thread::sleep(Duration::from_millis(r.gen_range(0..400)));
            let _ = child.kill();
            let _ = child.wait();
            let out = env.cmd().args(["--json", "check"]).output().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert!(
                out.status.success(),
                "seed {seed} after killing {args:?}: {v}"
            );
        }
        env.json(&["maintain", "--full", "--safety-margin", "0s"]);
        env.json(&["maintain", "--full", "--safety-margin", "0s"]);
        env.backup(&src, &["--source", "s"]);
        let out = env.cmd().args(["check", "--read-data"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let dst = env.path("dst");
        env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
        assert_same_tree(&src, &dst);
    }
}

/// A full disk: the backup fails with a clear error, the repository stays
/// valid, and earlier snapshots restore.
#[test]
fn full_disk_fails_cleanly() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root to mount a small tmpfs");
        return;
    }
    let env = Env::new();
    let small = env.path("small");
    fs::create_dir_all(&small).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success());
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Umount(small.clone());
    let repo = small.join("repo");
    let mut c = env.cmd();
    c.env("MARMOSET_REPOSITORY", &repo).arg("init");
    assert!(c.status().unwrap().success());
    let src = env.path("src");
    random_tree(&src, 3, 20);
    let out = env
        .cmd()
        .env("MARMOSET_REPOSITORY", &repo)
        .args(["backup", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    fs::write(src.join("huge.bin"), random_bytes(&mut rng(5), 40 << 20)).unwrap();
    let out = env
        .cmd()
        .env("MARMOSET_REPOSITORY", &repo)
        .args(["backup", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("panicked"));
    // No temp debris, repository valid, first snapshot intact.
    assert!(all_files(&repo).iter().all(|p| !p
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(".tmp-")));
    let out = env
        .cmd()
        .env("MARMOSET_REPOSITORY", &repo)
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dst = env.path("dst");
    let out = env
        .cmd()
        .env("MARMOSET_REPOSITORY", &repo)
        .args(["restore", "latest", "--target", dst.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    fs::remove_file(src.join("huge.bin")).unwrap();
    assert_same_tree(&src, &dst);
}

/// Read-only repository: a clear permission error, nothing half-written.
#[test]
fn read_only_repository_is_a_clear_error() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    random_tree(&src, 4, 10);
    for d in ["packs", "index", "snapshots", "locks"] {
        fs::set_permissions(env.repo.join(d), fs::Permissions::from_mode(0o555)).unwrap();
    }
    let mut c = env.cmd();
    c.args(["backup", src.to_str().unwrap()]);
    let out = without_dac_override(c).output().unwrap();
    for d in ["packs", "index", "snapshots", "locks"] {
        fs::set_permissions(env.repo.join(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.ok(&["check"]);
}

/// Odd source trees: newline and invalid-UTF-8 names, deep nesting, many
/// empty files, a huge sparse file, symlink loops, fifos and sockets.
#[test]
fn odd_source_trees_round_trip() {
    use std::os::unix::ffi::OsStrExt;
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("new\nline"), b"nl").unwrap();
    fs::write(
        src.join(std::ffi::OsStr::from_bytes(b"bad-\xff\xfe-utf8")),
        b"raw",
    )
    .unwrap();
    let mut deep = src.join("deep");
    for i in 0..120 {
        deep = deep.join(format!("d{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom"), b"deep").unwrap();
    let many = src.join("many-empty");
    fs::create_dir_all(&many).unwrap();
    for i in 0..trials(20_000) {
        fs::File::create(many.join(i.to_string())).unwrap();
    }
    let sparse = fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(2 << 30).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"tail", (2 << 30) - 4).unwrap();
    drop(sparse);
    std::os::unix::fs::symlink("loop-b", src.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", src.join("loop-b")).unwrap();
    std::os::unix::fs::symlink(".", src.join("self")).unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    let out = env.backup(&src, &[]);
    assert_eq!(out["incomplete"], false, "{out}");
    let added = out["summary"]["bytes_added"].as_u64().unwrap();
    assert!(
        added < 16 << 20,
        "2 GiB of holes stores almost nothing: {added}"
    );
    let dst = env.path("dst");
    env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
    // The socket is recorded but not recreated (nothing to restore).
    fs::remove_file(src.join("sock")).unwrap();
    assert_same_tree(&src, &dst);
}

/// The holes of a sparse file are not read: the backup reads about its
/// data only, the restored copy is sparse again, and the same bytes
/// stored densely are cut into the same chunks (nothing new to store).
#[test]
fn holes_are_not_read_and_cut_as_if_they_were() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let size: u64 = 256 << 20;
    let f = fs::File::create(src.join("disk.img")).unwrap();
    f.set_len(size).unwrap();
    let mut r = rng(3);
    for off in [0u64, 40 << 20, (130 << 20) + 12_345, size - (1 << 20)] {
        f.write_all_at(&random_bytes(&mut r, 1 << 20), off).unwrap();
    }
    drop(f);
    let allocated = |p: &std::path::Path| fs::metadata(p).unwrap().blocks() * 512;
    assert!(allocated(&src.join("disk.img")) < 8 << 20);

    let (out, read) = env.ok_counting_reads(&["--json", "backup", src.to_str().unwrap()]);
    let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(out["summary"]["bytes_total"], size, "{out}");
    assert!(
        read < size / 4,
        "{read} bytes read for 4 MiB of data in a {size}-byte file"
    );

    let dst = env.path("dst");
    env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
    assert_same_tree(&src, &dst);
    assert!(
        allocated(&dst.join("disk.img")) < 16 << 20,
        "restored dense"
    );

    // The same bytes, every block allocated: same chunks, nothing added.
    let dense = env.path("dense");
    fs::create_dir_all(&dense).unwrap();
    let status = std::process::Command::new("cp")
        .args(["--sparse=never"])
        .arg(src.join("disk.img"))
        .arg(dense.join("disk.img"))
        .status()
        .unwrap();
    assert!(status.success());
    assert!(allocated(&dense.join("disk.img")) >= size);
    let out = env.backup(&dense, &[]);
    assert_eq!(out["summary"]["data_blobs_added"], 0, "{out}");
    env.ok(&["check", "--read-data"]);
}

/// Files that change or vanish while being read: the backup completes,
/// records what it read, and reports vanished files.
#[test]
fn files_changing_or_vanishing_during_backup() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..200 {
        fs::write(
            src.join(format!("f{i}")),
            random_bytes(&mut rng(i), 200_000),
        )
        .unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (src, stop) = (src.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut r = rng(1);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let i = r.gen_range(0..200);
                let p = src.join(format!("f{i}"));
                if r.gen_bool(0.5) {
                    let _ = fs::remove_file(&p);
                } else {
                    let _ = fs::write(&p, random_bytes(&mut r, 100_000));
                }
            }
        })
    };
    let out = env
        .cmd()
        .args(["--json", "backup", src.to_str().unwrap()])
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    env.ok(&["check", "--read-data"]);
    let dst = env.path("dst");
    env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
}

/// Two backups into one repository at the same time (the second process
/// finds the cache locked and uses a private one).
#[test]
fn concurrent_backups_into_one_repository() {
    let env = std::sync::Arc::new(Env::new());
    env.init();
    let handles: Vec<_> = (0..2u64)
        .map(|i| {
            let env = env.clone();
            std::thread::spawn(move || {
                let src = env.path(&format!("src{i}"));
                random_tree(&src, 300 + i, 80);
                fs::write(src.join("big.bin"), random_bytes(&mut rng(i), 20 << 20)).unwrap();
                let id = env.backup(&src, &[])["snapshot"]
                    .as_str()
                    .unwrap()
                    .to_string();
                (id, src)
            })
        })
        .collect();
    let done: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    env.ok(&["check", "--read-data"]);
    for (id, src) in done {
        let dst = env.path(&format!("dst-{}", &id[..8]));
        env.ok(&["restore", &id, "--target", dst.to_str().unwrap()]);
        assert_same_tree(&src, &dst);
    }
}

/// No plaintext of file data or names in the repository; secrets never in
/// logs or JSON output.
#[test]
fn no_plaintext_in_repository_and_no_secrets_in_output() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let marker_name = "SECRET-FILENAME-MARKER-6f1e";
    let marker_data = "SECRET-CONTENT-MARKER-a83b ".repeat(2000);
    fs::write(src.join(marker_name), &marker_data).unwrap();
    let secret_pw = "hunter2-super-secret-pw";
    let pwfile = env.path("pw2");
    fs::write(&pwfile, secret_pw).unwrap();
    let repo2 = env.path("repo2");
    let run = |args: &[&str]| {
        env.cmd()
            .env("MARMOSET_REPOSITORY", &repo2)
            .env("MARMOSET_PASSWORD_FILE", &pwfile)
            .env("AWS_SECRET_ACCESS_KEY", "aws-secret-should-not-leak")
            .env("MARMOSET_LOG", "debug")
            .args(args)
            .output()
            .unwrap()
    };
    let mut outputs = Vec::new();
    for args in [
        &["init"][..],
        &["--json", "-vv", "backup", src.to_str().unwrap()],
        &["--json", "-vv", "snapshots"],
        &["--json", "check", "--read-data"],
    ] {
        let o = run(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        outputs.push(o);
    }
    for o in &outputs {
        for text in [&o.stdout, &o.stderr] {
            let t = String::from_utf8_lossy(text);
            assert!(!t.contains(secret_pw), "password leaked");
            assert!(
                !t.contains("aws-secret-should-not-leak"),
                "S3 secret leaked"
            );
        }
    }
    for f in all_files(&repo2) {
        let bytes = fs::read(&f).unwrap();
        let hay = String::from_utf8_lossy(&bytes);
        assert!(!hay.contains(marker_name), "file name in {}", f.display());
        assert!(
            !hay.contains("SECRET-CONTENT-MARKER"),
            "file data in {}",
            f.display()
        );
    }
    // A tampered key file is rejected.
    let key = all_files(&repo2.join("keys")).remove(0);
    let text = fs::read_to_string(&key).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let wrapped = v["wrapped_key"].as_str().unwrap();
    let flipped = format!(
        "{}{}",
        if wrapped.starts_with('0') { "1" } else { "0" },
        &wrapped[1..]
    );
    fs::write(&key, text.replace(wrapped, &flipped)).unwrap();
    let o = run(&["snapshots"]);
    assert_eq!(
        o.status.code(),
        Some(12),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
