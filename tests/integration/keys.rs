//! Key management: add, list, remove, passwd without rewriting data.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;

use marmoset_testing::trees::{assert_same_tree, random_tree};

use crate::integration::cli::Env;

#[test]
fn passwords_can_be_added_changed_and_removed() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    random_tree(&src, 3, 20);
    env.backup(&src, &[]);
    let packs = env.pack_names();

    let pw2 = env.path("pw2");
    fs::write(&pw2, "second password").unwrap();
    env.ok(&["key", "add", "--new-password-file", pw2.to_str().unwrap()]);
    let keys = env.json(&["key", "list"]);
    assert_eq!(keys.as_array().unwrap().len(), 2);

    // The second password opens the repository too.
    let out = env
        .cmd()
        .args(["--password-file", pw2.to_str().unwrap(), "snapshots"])
        .output()
        .unwrap();
    assert!(out.status.success());

    // passwd replaces the current key; the old password stops working.
    let pw3 = env.path("pw3");
    fs::write(&pw3, "third password").unwrap();
    env.ok(&[
        "key",
        "passwd",
        "--new-password-file",
        pw3.to_str().unwrap(),
    ]);
    let old = env.cmd().arg("snapshots").output().unwrap();
    assert_eq!(old.status.code(), Some(12), "old password rejected");
    let dst = env.path("dst");
    let out = env
        .cmd()
        .args([
            "--password-file",
            pw3.to_str().unwrap(),
            "restore",
            "latest",
            "--target",
            dst.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&src, &dst);
    assert_eq!(
        env.pack_names(),
        packs,
        "changing passwords never rewrites data"
    );

    // Remove the second key; the last key cannot be removed.
    let keys = env.json(&["--password-file", pw3.to_str().unwrap(), "key", "list"]);
    let other = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["current"] == false)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let current = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["current"] == true)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    env.ok(&[
        "--password-file",
        pw3.to_str().unwrap(),
        "key",
        "remove",
        &other[..8],
    ]);
    let last = env
        .cmd()
        .args([
            "--password-file",
            pw3.to_str().unwrap(),
            "key",
            "remove",
            &current[..8],
        ])
        .output()
        .unwrap();
    assert!(!last.status.success());
    assert!(String::from_utf8_lossy(&last.stderr).contains("last key"));
}
