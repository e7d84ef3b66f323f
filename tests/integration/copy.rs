//! `marmoset copy`: snapshots into a second repository with its own key,
//! restored bit-identically from there; incremental, resumable after
//! kill -9, deduplicated when the chunker parameters are shared, and
//! refusing to pass damage on as good data.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use marmoset_testing::random::{random_bytes, rng};
use marmoset_testing::s3_server::S3Server;
use marmoset_testing::trees::{assert_same_tree, random_files, random_tree};

use crate::integration::cli::Env;

/// The second repository: its own directory and password; the primary
/// (`env.repo`) is the source of every copy.
struct Target {
    repo: String,
    pwfile: PathBuf,
}

impl Target {
    fn local(env: &Env) -> Self {
        let pwfile = env.path("pw-target");
        fs::write(&pwfile, "another password entirely").unwrap();
        Target {
            repo: env.path("target").to_str().unwrap().to_string(),
            pwfile,
        }
    }

    fn cmd(&self, env: &Env) -> Command {
        let mut c = env.cmd();
        c.env("MARMOSET_REPOSITORY", &self.repo)
            .env("MARMOSET_PASSWORD_FILE", &self.pwfile)
            .env("MARMOSET_FROM_REPOSITORY", &env.repo)
            .env("MARMOSET_FROM_PASSWORD_FILE", &env.pwfile)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_PROFILE");
        c
    }

    fn run(&self, env: &Env, args: &[&str]) -> Output {
        self.cmd(env).args(args).output().unwrap()
    }

    fn ok(&self, env: &Env, args: &[&str]) -> Output {
        let out = self.run(env, args);
        assert!(
            out.status.success(),
            "marmoset {args:?} (target) failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn json(&self, env: &Env, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_slice(&self.ok(env, &a).stdout).unwrap()
    }

    fn restore(&self, env: &Env, snap: &str, dst: &Path) {
        self.ok(env, &["restore", snap, "--target", dst.to_str().unwrap()]);
    }
}

/// Source data: a random tree and one file large enough (at 1 KiB chunks)
/// to be stored as chunk lists.
fn source_data(env: &Env) -> PathBuf {
    let src = env.path("src");
    random_tree(&src, 31, 150);
    fs::write(src.join("big.bin"), random_bytes(&mut rng(32), 6 << 20)).unwrap();
    src
}

fn ids(v: &serde_json::Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["source_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn local_copy_restores_identically_and_a_second_copy_moves_only_new_data() {
    let env = Env::new();
    env.ok(&["init", "--chunk-size", "1024"]);
    let src = source_data(&env);
    let first = env.backup(&src, &["--tag", "set=daily-1"]);
    let before = env.path("before");
    env.ok(&[
        "restore",
        first["snapshot"].as_str().unwrap(),
        "--target",
        before.to_str().unwrap(),
    ]);
    fs::write(src.join("added.bin"), random_bytes(&mut rng(33), 300_000)).unwrap();
    let second = env.backup(&src, &["--tag", "set=daily-2"]);

    let t = Target::local(&env);
    t.ok(&env, &["init", "--copy-chunker-params"]);
    // A dry run counts and writes nothing.
    let dry = t.json(&env, &["copy", "--dry-run"]);
    assert_eq!(dry["copied"].as_array().unwrap().len(), 2, "{dry}");
    assert!(dry["bytes_read"].as_u64().unwrap() >= 6 << 20, "{dry}");
    assert_eq!(t.json(&env, &["snapshots"]).as_array().unwrap().len(), 0);

    let v = t.json(&env, &["copy"]);
    assert_eq!(
        ids(&v, "copied"),
        [
            first["snapshot"].as_str().unwrap(),
            second["snapshot"].as_str().unwrap()
        ],
        "{v}"
    );
    assert_eq!(v["failed"].as_array().unwrap().len(), 0, "{v}");
    assert!(
        v["backend"]["source"]["get_range"].as_u64().unwrap() > 0,
        "{v}"
    );
    assert!(v["backend"]["target"]["put"].as_u64().unwrap() > 0, "{v}");
    // Both copies restore exactly, and the copies name their originals.
    let snaps = t.json(&env, &["snapshots"]);
    let originals: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["snapshot"]["original"].as_str().unwrap())
        .collect();
    assert_eq!(
        originals,
        [
            first["snapshot"].as_str().unwrap(),
            second["snapshot"].as_str().unwrap()
        ]
    );
    let old_copy = snaps[0]["id"].as_str().unwrap();
    assert_eq!(snaps[1]["snapshot"]["parent"].as_str(), Some(old_copy));
    let out_old = env.path("out-old");
    t.restore(&env, old_copy, &out_old);
    assert_same_tree(&before, &out_old);
    let out = env.path("out");
    t.restore(&env, "latest", &out);
    assert_same_tree(&src, &out);
    t.ok(&env, &["check", "--read-data"]);

    // Nothing new: nothing read, nothing stored.
    let again = t.json(&env, &["copy"]);
    assert_eq!(again["copied"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["skipped"].as_array().unwrap().len(), 2, "{again}");
    assert_eq!(again["data_blobs_read"], 0, "{again}");
    assert_eq!(again["packs_written"], 0, "{again}");

    // The next day's copy reads and stores only the new file's data.
    let new_data = 500_000u64;
    fs::write(
        src.join("day3.bin"),
        random_bytes(&mut rng(34), new_data as usize),
    )
    .unwrap();
    env.backup(&src, &["--tag", "set=daily-3"]);
    let day = t.json(&env, &["copy", "--tag", "set=daily-3"]);
    assert_eq!(day["copied"].as_array().unwrap().len(), 1, "{day}");
    let read = day["bytes_read"].as_u64().unwrap();
    assert!(read >= new_data && read <= new_data + (64 << 10), "{day}");
    let up = day["backend"]["target"]["bytes_up"].as_u64().unwrap();
    // New data, encrypted, plus the directories on its path and the
    // session's small files.
    assert!(
        up < new_data * 11 / 10 + (256 << 10),
        "uploaded {up}: {day}"
    );
    let out3 = env.path("out3");
    t.restore(&env, "latest", &out3);
    assert_same_tree(&src, &out3);
}

/// The target's own backup of the same files: with shared chunker
/// parameters the copy finds every data blob already there.
#[test]
fn shared_chunker_parameters_deduplicate_against_the_target() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big.bin"), random_bytes(&mut rng(35), 12 << 20)).unwrap();
    env.backup(&src, &[]);

    let shared = Target::local(&env);
    shared.ok(&env, &["init", "--copy-chunker-params"]);
    shared.ok(&env, &["backup", src.to_str().unwrap()]);
    let v = shared.json(&env, &["copy"]);
    assert_eq!(v["copied"].as_array().unwrap().len(), 1, "{v}");
    assert!(v["data_blobs_read"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["data_blobs_added"], 0, "{v}");

    // Without them the same file is cut elsewhere: stored again.
    let mut other = Target::local(&env);
    other.repo = env.path("target2").to_str().unwrap().to_string();
    other.ok(&env, &["init"]);
    other.ok(&env, &["backup", src.to_str().unwrap()]);
    let v = other.json(&env, &["copy"]);
    assert!(v["data_blobs_added"].as_u64().unwrap() > 0, "{v}");
    let out = env.path("out");
    other.restore(&env, "latest", &out);
    assert_same_tree(&src, &out);
}

/// kill -9 in the middle of a copy: the next run finishes it without
/// storing again what the first one had stored.
#[test]
fn an_interrupted_copy_is_resumed_without_uploading_again() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    let mut r = rng(36);
    random_files(&src, &mut r, 12, 2 << 20);
    env.backup(&src, &[]);
    let t = Target::local(&env);
    t.ok(
        &env,
        &["init", "--copy-chunker-params", "--pack-size-mib", "1"],
    );
    // Slow uploads, so the copy is surely cut in the middle.
    let mut child = t
        .cmd(&env)
        .args(["--limit-upload", "2048", "copy"])
        .spawn()
        .unwrap();
    let packs = Path::new(&t.repo).join("packs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_files(&packs) < 4 {
        assert!(Instant::now() < deadline, "no packs written");
        assert!(child.try_wait().unwrap().is_none(), "copy ended too soon");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = count_files(&packs);
    assert_eq!(t.json(&env, &["snapshots"]).as_array().unwrap().len(), 0);

    let v = t.json(&env, &["copy"]);
    assert_eq!(v["copied"].as_array().unwrap().len(), 1, "{v}");
    let total = 12 * (2u64 << 20);
    let read = v["bytes_read"].as_u64().unwrap();
    assert!(
        read < total,
        "{kept} packs were kept, yet all {total} bytes were read again: {v}"
    );
    let out = env.path("out");
    t.restore(&env, "latest", &out);
    assert_same_tree(&src, &out);
    t.ok(&env, &["check", "--read-data"]);
}

fn count_files(dir: &Path) -> usize {
    let Ok(subs) = fs::read_dir(dir) else {
        return 0;
    };
    subs.flatten()
        .filter_map(|s| fs::read_dir(s.path()).ok())
        .map(|d| {
            d.flatten()
                .filter(|f| !f.file_name().to_string_lossy().starts_with(".tmp-"))
                .count()
        })
        .sum()
}

#[test]
fn a_wrong_password_names_the_repository_it_is_for() {
    let env = Env::new();
    env.init();
    let src = source_data(&env);
    env.backup(&src, &[]);
    let t = Target::local(&env);
    t.ok(&env, &["init"]);
    let wrong = env.path("pw-wrong");
    fs::write(&wrong, "not it").unwrap();

    let out = t
        .cmd(&env)
        .env("MARMOSET_FROM_PASSWORD_FILE", &wrong)
        .arg("copy")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("source repository"), "{err}");
    assert!(err.contains("password"), "{err}");

    let out = t
        .cmd(&env)
        .env("MARMOSET_PASSWORD_FILE", &wrong)
        .arg("copy")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("target repository"), "{err}");

    // The same repository on both sides is refused.
    let out = t
        .cmd(&env)
        .env("MARMOSET_REPOSITORY", &env.repo)
        .env("MARMOSET_PASSWORD_FILE", &env.pwfile)
        .arg("copy")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("same repository"), "{err}");
    assert_eq!(t.json(&env, &["snapshots"]).as_array().unwrap().len(), 0);
}

/// A blob that no longer authenticates in the source: its snapshot is
/// reported and not copied; the other snapshot is, and the target stays
/// clean.
#[test]
fn a_damaged_source_blob_is_reported_and_not_copied() {
    let env = Env::new();
    env.init();
    let a = env.path("a");
    let b = env.path("b");
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fs::write(a.join("victim"), random_bytes(&mut rng(37), 200_000)).unwrap();
    env.backup(&a, &[]);
    fs::write(b.join("fine"), random_bytes(&mut rng(38), 200_000)).unwrap();
    let good = env.backup(&b, &[]);

    let tree = env.json(&["cat", "tree", &format!("{}:/", first_snapshot(&env))]);
    let chunk = tree[0]["content"][0].as_str().unwrap().to_string();
    let (pack, offset) = env.locate(&chunk);
    let path = env.pack_path(&pack);
    let mut bytes = fs::read(&path).unwrap();
    bytes[offset as usize + 40] ^= 0x55;
    fs::write(&path, bytes).unwrap();

    let t = Target::local(&env);
    t.ok(&env, &["init"]);
    let out = t.run(&env, &["--json", "copy"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        ids(&v, "copied"),
        [good["snapshot"].as_str().unwrap()],
        "{v}"
    );
    let failed = &v["failed"][0];
    let why = failed["error"].as_str().unwrap();
    assert!(why.contains(&pack), "the error names the pack: {v}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not copied"));
    let snaps = t.json(&env, &["snapshots"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    t.ok(&env, &["check", "--read-data"]);
}

fn first_snapshot(env: &Env) -> String {
    env.json(&["snapshots"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn local_to_s3_copy_restores_identically_and_repeats_as_a_no_op() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let env = Env::new();
    env.ok(&["init", "--chunk-size", "1024"]);
    let src = source_data(&env);
    env.backup(&src, &[]);
    let mut t = Target::local(&env);
    t.repo = server.url("secondary");
    t.ok(&env, &["init", "--copy-chunker-params"]);
    let v = t.json(&env, &["copy"]);
    assert_eq!(v["copied"].as_array().unwrap().len(), 1, "{v}");
    assert!(
        v["backend"]["target"]["bytes_up"].as_u64().unwrap() > 6 << 20,
        "{v}"
    );
    let out = env.path("out");
    t.restore(&env, "latest", &out);
    assert_same_tree(&src, &out);
    let again = t.json(&env, &["copy"]);
    assert_eq!(again["skipped"].as_array().unwrap().len(), 1, "{again}");
    assert!(
        again["backend"]["target"]["bytes_up"].as_u64().unwrap() < 64 << 10,
        "{again}"
    );
    t.ok(&env, &["check", "--read-data"]);
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// `latest` is the newest snapshot the filters select; a dry run leaves
/// the target exactly as it was; a source snapshot file that cannot be
/// read fails the copy (exit 1) while the others are copied.
#[test]
fn latest_follows_the_filters_dry_runs_write_nothing_and_unreadable_snapshots_fail() {
    let env = Env::new();
    env.init();
    let a = env.path("a");
    fs::create_dir_all(&a).unwrap();
    fs::write(a.join("x"), b"first").unwrap();
    let tagged = env.backup(&a, &["--tag", "keep", "--host", "h1"]);
    fs::write(a.join("x"), b"second").unwrap();
    let newest = env.backup(&a, &["--host", "h2"]);

    let t = Target::local(&env);
    t.ok(&env, &["init"]);
    let before = files_under(Path::new(&t.repo));
    let dry = t.json(&env, &["copy", "--dry-run", "latest", "--tag", "keep"]);
    assert_eq!(
        ids(&dry, "copied"),
        [tagged["snapshot"].as_str().unwrap()],
        "{dry}"
    );
    let dry = t.json(&env, &["copy", "--dry-run", "latest", "--host", "h2"]);
    assert_eq!(
        ids(&dry, "copied"),
        [newest["snapshot"].as_str().unwrap()],
        "{dry}"
    );
    assert_eq!(files_under(Path::new(&t.repo)), before, "a dry run wrote");

    // Nothing selected: nothing to do, and no error.
    let none = t.json(&env, &["copy", "--tag", "no-such-tag"]);
    assert_eq!(none["copied"].as_array().unwrap().len(), 0);

    let snap = env
        .repo
        .join("snapshots")
        .join(newest["snapshot"].as_str().unwrap());
    let mut bytes = fs::read(&snap).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 1;
    fs::write(&snap, bytes).unwrap();
    let out = t.run(&env, &["--json", "copy"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        ids(&v, "copied"),
        [tagged["snapshot"].as_str().unwrap()],
        "{v}"
    );
    assert_eq!(v["unreadable"].as_array().unwrap().len(), 1, "{v}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreadable"));

    // `latest` cannot vouch for being the newest: it fails too.
    let t2 = Target {
        repo: env.path("target2").to_str().unwrap().to_string(),
        pwfile: t.pwfile.clone(),
    };
    t2.ok(&env, &["init"]);
    let out = t2.run(&env, &["--json", "copy", "latest"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["unreadable"].as_array().unwrap().len(), 1, "{v}");
    // A damaged snapshot named by id fails alone; the other named one is
    // copied.
    let out = t2.run(
        &env,
        &[
            "--json",
            "copy",
            tagged["snapshot"].as_str().unwrap(),
            newest["snapshot"].as_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["unreadable"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        v["copied"].as_array().unwrap().len() + v["skipped"].as_array().unwrap().len(),
        1,
        "{v}"
    );
}

/// Two copies of the same snapshot at once: one snapshot in the target,
/// the other run reports it as already there.
#[test]
fn concurrent_copies_of_one_snapshot_write_it_once() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), random_bytes(&mut rng(39), 6 << 20)).unwrap();
    env.backup(&src, &[]);
    let t = Target::local(&env);
    t.ok(&env, &["init"]);
    let spawn = |cache: &str| {
        t.cmd(&env)
            .env("MARMOSET_CACHE_DIR", env.path(cache))
            .args(["--json", "--limit-upload", "3072", "copy"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (one, two) = (spawn("cache-1"), spawn("cache-2"));
    // (Both may pass the check for an existing copy at the same moment:
    // then the later-sorting snapshot is withdrawn.)
    let mut copied = 0;
    let mut skipped = 0;
    for child in [one, two] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        copied += v["copied"].as_array().unwrap().len();
        skipped += v["skipped"].as_array().unwrap().len();
    }
    assert_eq!((copied, skipped), (1, 1));
    assert_eq!(t.json(&env, &["snapshots"]).as_array().unwrap().len(), 1);
    t.ok(&env, &["check", "--read-data"]);
    let out = env.path("out");
    t.restore(&env, "latest", &out);
    assert_same_tree(&src, &out);
}
