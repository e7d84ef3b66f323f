//! Bad input gets a clear error, never a panic or a silently wrong result,
//! and nothing stored before is harmed.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;

use marmoset_testing::privileges::without_dac_override;
use marmoset_testing::random::{random_bytes, rng};

use crate::integration::cli::Env;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn wrong_password_is_rejected_clearly() {
    let env = Env::new();
    env.init();
    let bad = env.path("bad");
    fs::write(&bad, "not the password").unwrap();
    let out = env
        .cmd()
        .args(["--password-file", bad.to_str().unwrap(), "snapshots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(12));
    assert!(stderr(&out).contains("wrong password"), "{}", stderr(&out));
}

#[test]
fn missing_repository_is_reported() {
    let env = Env::new();
    let out = env.cmd().arg("snapshots").output().unwrap();
    assert_eq!(out.status.code(), Some(10));
    assert!(
        stderr(&out).contains("no repository at"),
        "{}",
        stderr(&out)
    );
    let none = env
        .cmd()
        .env_remove("MARMOSET_REPOSITORY")
        .arg("snapshots")
        .output()
        .unwrap();
    assert!(!none.status.success());
    assert!(stderr(&none).contains("no repository given"));
    // init twice refuses to overwrite.
    env.init();
    let again = env.cmd().arg("init").output().unwrap();
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already exists"));
}

#[test]
fn newer_format_version_is_refused() {
    let env = Env::new();
    env.init();
    let cfg = env.repo.join("marmoset.repository");
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"format_version\": 1", "\"format_version\": 2");
    fs::write(&cfg, text).unwrap();
    let out = env.cmd().arg("snapshots").output().unwrap();
    assert_eq!(out.status.code(), Some(11));
    assert!(
        stderr(&out).contains("newer than this marmoset supports"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn tampered_config_is_detected() {
    let env = Env::new();
    env.init();
    let cfg = env.repo.join("marmoset.repository");
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"compression_level\": 3", "\"compression_level\": 5");
    fs::write(&cfg, text).unwrap();
    let out = env.cmd().arg("snapshots").output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("MAC mismatch"), "{}", stderr(&out));
}

/// Two files in two different packs; the pack of one gets damaged.
fn two_pack_repo(env: &Env) -> (String, String) {
    env.init();
    let a = env.path("a");
    fs::create_dir_all(&a).unwrap();
    let mut r = rng(9);
    fs::write(a.join("victim.bin"), random_bytes(&mut r, 3 << 20)).unwrap();
    env.backup(&a, &[]);
    let first_packs = env.pack_names();
    fs::write(a.join("healthy.bin"), random_bytes(&mut r, 3 << 20)).unwrap();
    env.backup(&a, &[]);
    let victim_pack = first_packs
        .iter()
        .find(|p| fs::metadata(env.pack_path(p)).unwrap().len() > 1 << 20)
        .unwrap()
        .clone();
    let snap = env.json(&["snapshots"])[1]["id"]
        .as_str()
        .unwrap()
        .to_string();
    (victim_pack, snap)
}

#[test]
fn corrupted_byte_in_pack_fails_that_file_only_and_names_it() {
    let env = Env::new();
    let (pack, snap) = two_pack_repo(&env);
    let path = env.pack_path(&pack);
    let mut bytes = fs::read(&path).unwrap();
    bytes[1000] ^= 0x40;
    fs::write(&path, &bytes).unwrap();

    let dst = env.path("dst");
    let out = env
        .cmd()
        .args(["restore", &snap, "--target", dst.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("victim.bin") && err.contains("authentication failed"),
        "{err}"
    );
    assert!(err.contains(&pack), "names the pack: {err}");
    assert!(
        !dst.join("victim.bin").exists(),
        "no silently wrong file left"
    );
    assert_eq!(
        fs::read(dst.join("healthy.bin")).unwrap(),
        fs::read(env.path("a/healthy.bin")).unwrap()
    );
}

#[test]
fn truncated_pack_is_reported_and_other_files_restore() {
    let env = Env::new();
    let (pack, snap) = two_pack_repo(&env);
    let path = env.pack_path(&pack);
    let len = fs::metadata(&path).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);

    let dst = env.path("dst");
    let out = env
        .cmd()
        .args(["restore", &snap, "--target", dst.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(
        err.contains("victim.bin") && err.contains("truncated"),
        "{err}"
    );
    assert!(!dst.join("victim.bin").exists());
    assert!(dst.join("healthy.bin").exists());
    // repair index drops the damaged pack and says so, keeping the rest.
    let out = env.cmd().args(["repair", "index"]).output().unwrap();
    assert!(stderr(&out).contains(&pack), "{}", stderr(&out));
}

#[test]
fn unreadable_source_files_are_skipped_and_reported() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("locked-dir")).unwrap();
    fs::write(src.join("ok.txt"), b"fine").unwrap();
    fs::write(src.join("secret.txt"), b"hidden").unwrap();
    fs::write(src.join("locked-dir/inner"), b"x").unwrap();
    fs::set_permissions(src.join("secret.txt"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(src.join("locked-dir"), fs::Permissions::from_mode(0o000)).unwrap();
    // Root ignores permissions: the helper drops that capability.
    let mut c = env.cmd();
    c.args(["--json", "backup", src.to_str().unwrap()]);
    let out = without_dac_override(c).output().unwrap();
    fs::set_permissions(src.join("locked-dir"), fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit code 3 = incomplete: {}",
        stderr(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["incomplete"], true);
    let errors = v["summary"]["errors"].as_array().unwrap();
    let paths: Vec<&str> = errors.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert!(paths.iter().any(|p| p.ends_with("secret.txt")), "{paths:?}");
    assert!(paths.iter().any(|p| p.ends_with("locked-dir")), "{paths:?}");
    // The readable file is in the snapshot.
    let ls = env.ok(&["ls", "latest"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("/ok.txt"));
}

#[test]
fn missing_source_path_and_bad_snapshot_ids_are_clear_errors() {
    let env = Env::new();
    env.init();
    let out = env
        .cmd()
        .args(["backup", "/nonexistent/path/xyz"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent/path/xyz"));
    let out = env
        .cmd()
        .args(["restore", "deadbeef", "--target", "/tmp/x"])
        .output()
        .unwrap();
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    let out = env.cmd().args(["ls", "latest"]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn crafted_tree_with_traversal_names_is_refused_on_restore() {
    use marmoset_storage::Tree;
    let env = Env::new();
    let repo = env.init_lib();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("good"), b"good").unwrap();
    let (_, mut snap) =
        marmoset_storage::backup(&repo, &[src], &Default::default(), &Default::default()).unwrap();
    // A hostile repository writer re-points the snapshot at a hand-made
    // tree whose names try to escape the restore target.
    let good = repo.load_tree(&snap.tree).unwrap().nodes.remove(0);
    let mut evil = good.clone();
    evil.name = b"..".to_vec();
    let mut slash = good.clone();
    slash.name = b"a/../../escape".to_vec();
    let t = Tree {
        nodes: vec![evil, slash, good],
    };
    snap.tree = repo.save_tree_blob(&t).unwrap();
    let dst = env.path("deep/dst");
    let sum = marmoset_storage::restore(
        &repo,
        &snap,
        "",
        &dst,
        &Default::default(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(sum.errors.len(), 2, "{:?}", sum.errors);
    assert!(sum
        .errors
        .iter()
        .all(|e| e.error.contains("unsafe file name")));
    assert!(dst.join("good").exists());
    assert!(!env.path("deep/escape").exists() && !env.path("escape").exists());
}
