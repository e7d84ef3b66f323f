//! Hostile repository objects written without the key, and local exposure
//! (issue 13, sections 4 and 5): planted key files cannot make an open slow,
//! abort it or lock the owner out; repository and cache files are private to
//! their owner; a cache directory someone else controls is refused.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use marmoset_testing::trees::random_tree;

use crate::integration::cli::Env;

/// Far more than a capped key derivation takes, far less than a 4 GiB one.
const LIMIT: Duration = Duration::from_secs(60);

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `cmd`, killing it (and failing the test) if it outlives `LIMIT`.
fn run_bounded(mut cmd: Command) -> Output {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn marmoset");
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("marmoset still running after {LIMIT:?}: {}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn key_files(env: &Env) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(env.repo.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    out
}

fn genuine_key(env: &Env) -> serde_json::Value {
    let keys = key_files(env);
    assert_eq!(keys.len(), 1, "a fresh repository has one key");
    serde_json::from_slice(&fs::read(&keys[0]).unwrap()).unwrap()
}

fn plant(env: &Env, name: &str, bytes: &[u8]) {
    fs::write(env.repo.join("keys").join(name), bytes).unwrap();
}

/// `snapshots` with a cache of its own: no remembered key to try first.
fn snapshots_fresh_cache(env: &Env, cache: &str, password_file: &Path) -> Output {
    let mut c = env.cmd();
    c.env("MARMOSET_CACHE_DIR", env.path(cache))
        .env("MARMOSET_PASSWORD_FILE", password_file)
        .arg("snapshots");
    run_bounded(c)
}

#[test]
fn a_planted_key_file_with_extreme_argon2_costs_is_skipped() {
    let env = Env::new();
    env.init();
    let mut v = genuine_key(&env);
    // 4 GiB over 50 passes: accepted before (minutes, or an abort when the
    // allocation fails).
    v["kdf"]["memory_kib"] = 4_194_304.into();
    v["kdf"]["iterations"] = 50.into();
    let planted = format!("00000000{}", "1".repeat(56));
    plant(&env, &planted, &serde_json::to_vec(&v).unwrap());

    let out = snapshots_fresh_cache(&env, "cache-a", &env.pwfile);
    assert!(out.status.success(), "right password: {}", stderr(&out));

    let bad = env.path("bad");
    fs::write(&bad, "not the password").unwrap();
    let out = snapshots_fresh_cache(&env, "cache-b", &bad);
    assert_eq!(
        out.status.code(),
        Some(12),
        "wrong password: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("wrong password"), "{}", stderr(&out));

    // Damaged and oversized key files do not break `key list`, which marks
    // them, and `key remove` deletes them.
    let garbage = format!("22222222{}", "2".repeat(56));
    let huge = format!("33333333{}", "3".repeat(56));
    plant(&env, &garbage, b"{ not json");
    plant(&env, &huge, " ".repeat(100 * 1024).as_bytes());
    let listed = env.json(&["key", "list"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 4, "{listed:?}");
    for name in [&planted, &garbage, &huge] {
        let k = listed
            .iter()
            .find(|k| k["id"].as_str() == Some(name.as_str()))
            .unwrap();
        let user = k["username"].as_str().unwrap();
        assert!(user.contains("invalid key file"), "{name}: {user}");
    }
    for name in [&planted, &garbage, &huge] {
        env.ok(&["key", "remove", &name[..8]]);
    }
    assert_eq!(key_files(&env).len(), 1);
    env.ok(&["snapshots"]);
}

#[test]
fn the_number_of_key_files_tried_is_bounded() {
    let env = Env::new();
    env.init();
    let genuine = genuine_key(&env);
    // Cheap but well-formed key files that do not open with any password.
    for i in 0..40u32 {
        let mut v = genuine.clone();
        v["kdf"]["memory_kib"] = 8.into();
        v["kdf"]["iterations"] = 1.into();
        v["kdf"]["salt"] = format!("{i:032x}").into();
        let name = format!("ffffffff{i:056x}");
        plant(&env, &name, &serde_json::to_vec(&v).unwrap());
    }
    // The key remembered from `init` is tried first; with a fresh cache the
    // older genuine key comes before the planted ones.
    env.ok(&["snapshots"]);
    let out = snapshots_fresh_cache(&env, "cache-fresh", &env.pwfile);
    assert!(out.status.success(), "{}", stderr(&out));

    let bad = env.path("bad");
    fs::write(&bad, "not the password").unwrap();
    let out = snapshots_fresh_cache(&env, "cache-bad", &bad);
    assert!(!out.status.success());
    let msg = stderr(&out);
    assert!(msg.contains("41 key files"), "{msg}");
    assert!(msg.contains("key remove"), "{msg}");
}

/// Every folder below `dir` is 0700 and every file 0600.
fn assert_private_tree(dir: &Path) {
    assert_eq!(mode(dir), 0o700, "folder {}", dir.display());
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let meta = fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            assert_private_tree(&p);
        } else {
            assert_eq!(mode(&p), 0o600, "file {}", p.display());
        }
    }
}

#[test]
fn repository_and_cache_files_are_private() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    random_tree(&src, 11, 15);
    env.backup(&src, &[]);
    env.ok(&["key", "list"]);
    assert_private_tree(&env.repo);
    assert!(!key_files(&env).is_empty());

    assert_eq!(mode(&env.cache), 0o700, "cache root");
    let mut index_dirs = 0;
    let mut hints = 0;
    for e in fs::read_dir(&env.cache).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            index_dirs += 1;
            assert_eq!(mode(&p), 0o700, "cache folder {}", p.display());
        } else if name.ends_with(".lastkey") {
            hints += 1;
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    assert!(index_dirs >= 1, "no index cache folder");
    assert_eq!(hints, 1, "remembered key");
}

#[test]
fn without_home_the_cache_is_per_user_and_must_be_ours() {
    let env = Env::new();
    env.init();
    // A private stand-in for the shared temporary folder, so no real cache
    // in /tmp is touched.
    let tmp = env.path("tmp");
    fs::create_dir(&tmp).unwrap();
    let uid = nix::unistd::geteuid().as_raw();
    let cache = tmp.join(format!("marmoset-cache-{uid}"));
    let run = || {
        let mut c = env.cmd();
        c.env_remove("HOME")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("MARMOSET_CACHE_DIR")
            .env("TMPDIR", &tmp)
            .arg("snapshots");
        run_bounded(c)
    };

    // Created per user, 0700.
    let out = run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode(&cache), 0o700);
    assert!(!tmp.join("marmoset-cache").exists(), "shared name used");

    // Ours but opened up: made private again.
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o777)).unwrap();
    let out = run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode(&cache), 0o700);

    // A symlink planted under the name is refused, not followed.
    fs::remove_dir_all(&cache).unwrap();
    let elsewhere = env.path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &cache).unwrap();
    let out = run();
    assert!(!out.status.success(), "symlinked cache used");
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    fs::remove_file(&cache).unwrap();

    // Created first by another user: refused.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping the foreign-owner case: needs root to chown");
        return;
    }
    fs::create_dir(&cache).unwrap();
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(&cache, Some(12345), Some(12345)).unwrap();
    let out = run();
    let msg = stderr(&out);
    fs::remove_dir_all(&cache).unwrap();
    assert!(!out.status.success(), "foreign cache used");
    assert!(msg.contains("owned by uid 12345"), "{msg}");
    assert!(msg.contains("cache directory"), "{msg}");
}

#[test]
fn a_cache_entry_planted_in_the_cache_root_is_refused() {
    let env = Env::new();
    env.init();
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(env.repo.join("marmoset.repository")).unwrap()).unwrap();
    let id = config["repository_id"].as_str().unwrap().to_string();
    // A cache root others could write to, with this repository's entry
    // planted as a symlink to someone's folder.
    let root = env.path("shared-cache");
    fs::create_dir_all(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o1777)).unwrap();
    let victim = env.path("victim");
    fs::create_dir_all(&victim).unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&victim, root.join(&id)).unwrap();
    let out = env
        .cmd()
        .env("MARMOSET_CACHE_DIR", &root)
        .args(["snapshots"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a planted cache entry is refused");
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    assert_eq!(mode(&victim), 0o755, "the victim folder is untouched");
    assert!(fs::read_dir(&victim).unwrap().next().is_none());
    assert_eq!(mode(&root), 0o700, "the root is closed to others");
}
