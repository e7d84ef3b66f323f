//! Backup → restore round trips: random trees (property test), metadata,
//! special files, hard links, xattrs, partial restores.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use marmoset_storage::{BackupOptions, Progress, RestoreOptions, RestoreProgress};
use marmoset_testing::trees::{assert_same_tree, random_tree};
use proptest::prelude::*;

use crate::integration::cli::Env;

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip_bit_identically(seed in any::<u64>(), files in 1usize..120) {
        let env = Env::new();
        let repo = env.init_lib();
        let src = env.path("src");
        random_tree(&src, seed, files);
        let (_, snap) = marmoset_storage::backup(&repo, std::slice::from_ref(&src), &BackupOptions::default(), &Progress::default()).unwrap();
        prop_assert!(!snap.incomplete);
        let dst = env.path("dst");
        let sum = marmoset_storage::restore(&repo, &snap, "", &dst, &RestoreOptions::default(), &RestoreProgress::default()).unwrap();
        prop_assert!(sum.errors.is_empty(), "{:?}", sum.errors);
        assert_same_tree(&src, &dst);
    }
}

#[test]
fn cli_round_trip_with_special_files_hardlinks_and_xattrs() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    random_tree(&src, 7, 60);
    fs::write(src.join("hl-a"), b"hard linked content").unwrap();
    fs::hard_link(src.join("hl-a"), src.join("hl-b")).unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    fs::write(src.join("ro"), b"read only").unwrap();
    fs::set_permissions(src.join("ro"), fs::Permissions::from_mode(0o444)).unwrap();
    let xattr_ok = xattr::set(src.join("ro"), "user.marmoset", b"value").is_ok();
    // Sparse file: 64 MiB hole with data at both ends.
    let sparse = fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"start", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"end", (64 << 20) - 3).unwrap();
    drop(sparse);

    let out = env.backup(&src, &["--tag", "t1"]);
    let snap = out["snapshot"].as_str().unwrap().to_string();
    assert_eq!(out["incomplete"], false);
    let dst = env.path("dst");
    env.ok(&["restore", &snap[..8], "--target", dst.to_str().unwrap()]);
    assert_same_tree(&src, &dst);
    let a = fs::metadata(dst.join("hl-a")).unwrap();
    let b = fs::metadata(dst.join("hl-b")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard links restored as links");
    assert!(fs::symlink_metadata(dst.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo_like());
    if xattr_ok {
        assert_eq!(
            xattr::get(dst.join("ro"), "user.marmoset")
                .unwrap()
                .as_deref(),
            Some(&b"value"[..])
        );
    }
    // The hole stayed a hole.
    assert!(fs::metadata(dst.join("sparse")).unwrap().blocks() * 512 < 8 << 20);

    // Partial restores: a sub path, and include/exclude globs.
    let part = env.path("part");
    env.ok(&[
        "restore",
        &format!("{}:/hl-a", &snap[..8]),
        "--target",
        part.to_str().unwrap(),
    ]);
    assert_eq!(fs::read(part.join("hl-a")).unwrap(), b"hard linked content");
    assert_eq!(fs::read_dir(&part).unwrap().count(), 1);
    let inc = env.path("inc");
    env.ok(&[
        "restore",
        "latest",
        "--target",
        inc.to_str().unwrap(),
        "--include",
        "*.txt",
        "--exclude",
        "dir-*",
    ]);
    for e in walk(&inc) {
        let name = e.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            e.is_dir() || name.ends_with(".txt"),
            "{name} should not be restored"
        );
        assert!(
            !e.to_string_lossy().contains("/dir-"),
            "{} excluded",
            e.display()
        );
    }
    assert!(
        walk(&inc).iter().any(|p| p.is_file()),
        "some .txt files restored"
    );
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[test]
fn ls_cat_and_snapshots_show_the_backup() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/file.txt"), b"hello").unwrap();
    env.backup(&src, &["--source", "default/my-pvc", "--tag", "daily"]);
    let snaps = env.json(&["snapshots"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    assert_eq!(snaps[0]["snapshot"]["source"], "default/my-pvc");
    assert_eq!(snaps[0]["snapshot"]["tags"][0], "daily");
    let out = env.ok(&["ls", "latest", "-R"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("/sub\n") && text.contains("/sub/file.txt"),
        "{text}"
    );
    let tree = env.json(&["cat", "tree", "latest:/sub"]);
    assert_eq!(tree[0]["name"], "file.txt");
    assert_eq!(tree[0]["size"], 5);
    let cfg = env.json(&["cat", "config"]);
    assert_eq!(cfg["format_version"], 1);
    let stats = env.json(&["stats"]);
    assert_eq!(stats["snapshots"], 1);
    assert!(stats["packs"].as_u64().unwrap() >= 1);
}

#[test]
fn directory_with_more_entries_than_one_tree_part() {
    let env = Env::new();
    let repo = env.init_lib();
    let src = env.path("src");
    fs::create_dir_all(src.join("many")).unwrap();
    for i in 0..25_000 {
        fs::write(src.join("many").join(format!("{i:06}")), i.to_string()).unwrap();
    }
    let (_, snap) = marmoset_storage::backup(
        &repo,
        std::slice::from_ref(&src),
        &BackupOptions::default(),
        &Progress::default(),
    )
    .unwrap();
    let node = repo.find_node(&snap, "many").unwrap();
    assert_eq!(node.subtree.len(), 3, "25k entries split into 3 parts");
    assert_eq!(repo.find_node(&snap, "many/024999").unwrap().size, 5);
    let dst = env.path("dst");
    marmoset_storage::restore(
        &repo,
        &snap,
        "",
        &dst,
        &RestoreOptions::default(),
        &RestoreProgress::default(),
    )
    .unwrap();
    assert_same_tree(&src, &dst);
}
