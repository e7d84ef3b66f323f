//! Deduplication and incremental backups.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;

use marmoset_testing::random::{random_bytes, rng};
use marmoset_testing::trees::{assert_same_tree, random_tree};

use crate::integration::cli::Env;

const MIB: u64 = 1 << 20;

#[test]
fn same_data_twice_adds_almost_nothing_and_a_changed_middle_adds_only_its_chunks() {
    let env = Env::new();
    env.init();
    let mut r = rng(200);
    let data = random_bytes(&mut r, 200 << 20);
    let a = env.path("a");
    fs::create_dir_all(&a).unwrap();
    fs::write(a.join("big.bin"), &data).unwrap();
    let first = env.backup(&a, &[]);
    let added1 = first["summary"]["bytes_added"].as_u64().unwrap();
    assert!(
        added1 > 200 * MIB,
        "first backup stores everything: {added1}"
    );

    // Same bytes under another path and source: read again, stored once.
    let b = env.path("b");
    fs::create_dir_all(&b).unwrap();
    fs::write(b.join("copy.bin"), &data).unwrap();
    let second = env.backup(&b, &[]);
    assert_eq!(second["summary"]["bytes_read"].as_u64().unwrap(), 200 * MIB);
    let added2 = second["summary"]["bytes_added"].as_u64().unwrap();
    assert!(added2 < 2 * MIB, "second copy adds < 1%: {added2}");

    // 1 MiB changed in the middle: only the chunks around it are new.
    let mut changed = data.clone();
    let mid = 100 << 20;
    changed[mid..mid + (1 << 20)].copy_from_slice(&random_bytes(&mut r, 1 << 20));
    let c = env.path("c");
    fs::create_dir_all(&c).unwrap();
    fs::write(c.join("changed.bin"), &changed).unwrap();
    let third = env.backup(&c, &[]);
    let added3 = third["summary"]["bytes_added"].as_u64().unwrap();
    assert!(added3 > MIB, "the changed MiB is stored: {added3}");
    assert!(
        added3 < 10 * MIB,
        "only the chunks around the change are stored: {added3}"
    );

    let stats = env.json(&["stats"]);
    let raw = stats["raw_bytes"].as_u64().unwrap();
    assert!(
        raw < 212 * MIB,
        "three 200 MiB snapshots need ~201 MiB of unique data: {raw}"
    );
}

#[test]
fn unchanged_rebackup_reads_nothing_and_adds_only_a_snapshot() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    random_tree(&src, 11, 200);
    let first = env.backup(&src, &[]);
    assert!(first["summary"]["bytes_read"].as_u64().unwrap() > 0);
    let packs_before = env.pack_names();

    let second = env.backup(&src, &[]);
    let s = &second["summary"];
    assert_eq!(s["bytes_read"], 0, "no file data read: {s}");
    assert_eq!(s["files_new"], 0);
    assert_eq!(s["files_changed"], 0);
    assert_eq!(s["files_unmodified"], first["summary"]["files_total"]);
    assert_eq!(s["data_blobs_added"], 0);
    assert_eq!(s["tree_blobs_added"], 0, "identical trees deduplicate");
    assert_eq!(env.pack_names(), packs_before, "no new pack");
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 2);

    // Touch one file: exactly that one is read again; its new tree path is added.
    let victim = fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_file())
        .unwrap();
    let len = fs::metadata(&victim).unwrap().len();
    fs::write(&victim, b"modified").unwrap();
    let third = env.backup(&src, &[]);
    let s = &third["summary"];
    assert_eq!(s["files_changed"], 1, "{s}");
    assert_eq!(s["bytes_read"], 8);
    assert!(s["tree_blobs_added"].as_u64().unwrap() >= 1);
    let _ = len;

    // --force reads everything again but stores nothing new.
    let forced = env.backup(&src, &["--force"]);
    assert_eq!(
        forced["summary"]["bytes_read"],
        forced["summary"]["bytes_total"]
    );
    assert_eq!(forced["summary"]["data_blobs_added"], 0);
}

#[test]
fn deleting_the_cache_rebuilds_it_from_the_repository() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    random_tree(&src, 5, 50);
    env.backup(&src, &[]);
    fs::remove_dir_all(&env.cache).unwrap();
    // Dedup still works: the index is rebuilt from index files.
    let again = env.backup(&src, &[]);
    assert_eq!(again["summary"]["data_blobs_added"], 0);
    let dst = env.path("dst");
    env.ok(&["restore", "latest", "--target", dst.to_str().unwrap()]);
    assert_same_tree(&src, &dst);
}
