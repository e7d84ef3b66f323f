//! Source trees: random ones to back up, and a strict comparison of a
//! restored tree with its source.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rand::Rng;

use crate::random::{random_bytes, rng, text_bytes};

/// Creates `dir` holding `count` files `f0`, `f1`, … of `size` random
/// (incompressible) bytes each, drawn from `rng`.
pub fn random_files(dir: &Path, rng: &mut rand::rngs::StdRng, count: usize, size: usize) {
    fs::create_dir_all(dir).expect("mkdir");
    for i in 0..count {
        fs::write(dir.join(format!("f{i}")), random_bytes(rng, size)).expect("write");
    }
}

/// Writes a random tree: nested dirs, empty and non-empty files of mixed
/// sizes, symlinks, unicode and long names.
pub fn random_tree(root: &Path, seed: u64, files: usize) {
    let mut r = rng(seed);
    fs::create_dir_all(root).expect("root");
    let mut dirs = vec![root.to_path_buf()];
    for i in 0..files {
        let parent = dirs[r.gen_range(0..dirs.len())].clone();
        match r.gen_range(0..10) {
            0 => {
                let d = parent.join(format!("dir-{i}-ünïcødé"));
                fs::create_dir_all(&d).expect("dir");
                dirs.push(d);
            }
            1 => {
                let _ = std::os::unix::fs::symlink(
                    format!("../target-{i}"),
                    parent.join(format!("link{i}")),
                );
            }
            2 => fs::write(parent.join(format!("empty{i}")), b"").expect("file"),
            3 => {
                let name = format!("{}{i}", "long".repeat(60));
                fs::write(parent.join(name), text_bytes(&mut r, 100)).expect("file");
            }
            4 => {
                let n = r.gen_range(0..3_000_000);
                fs::write(parent.join(format!("big{i}.bin")), random_bytes(&mut r, n))
                    .expect("file");
            }
            _ => {
                let n = r.gen_range(1..20_000);
                fs::write(parent.join(format!("f{i}.txt")), text_bytes(&mut r, n)).expect("file");
            }
        }
        if r.gen_bool(0.2) {
            fs::create_dir_all(parent.join(format!("emptydir{i}"))).expect("dir");
        }
    }
    // Varied modes and times.
    for (i, d) in dirs.iter().enumerate().skip(1) {
        let _ = fs::set_permissions(
            d,
            fs::Permissions::from_mode(if i % 2 == 0 { 0o750 } else { 0o755 }),
        );
    }
}

/// Asserts two trees are identical: types, bytes, modes, mtimes, owners,
/// symlink targets.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let mut names_a = list(a);
    let mut names_b = list(b);
    names_a.sort();
    names_b.sort();
    assert_eq!(
        names_a,
        names_b,
        "entries of {} and {} differ",
        a.display(),
        b.display()
    );
    for name in names_a {
        let pa = a.join(&name);
        let pb = b.join(&name);
        let ma = fs::symlink_metadata(&pa).expect("meta a");
        let mb = fs::symlink_metadata(&pb).expect("meta b");
        assert_eq!(ma.file_type(), mb.file_type(), "type of {}", pb.display());
        if !ma.file_type().is_symlink() {
            assert_eq!(
                ma.mode() & 0o7777,
                mb.mode() & 0o7777,
                "mode of {}",
                pb.display()
            );
        }
        assert_eq!(
            (ma.uid(), ma.gid()),
            (mb.uid(), mb.gid()),
            "owner of {}",
            pb.display()
        );
        if ma.is_dir() {
            assert_same_tree(&pa, &pb);
        } else if ma.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(&pa).expect("link"),
                fs::read_link(&pb).expect("link")
            );
        } else if ma.is_file() {
            assert_eq!(ma.len(), mb.len(), "size of {}", pb.display());
            assert!(
                fs::read(&pa).expect("read a") == fs::read(&pb).expect("read b"),
                "content of {}",
                pb.display()
            );
        }
        if !ma.file_type().is_symlink() {
            assert_eq!(
                (ma.mtime(), ma.mtime_nsec()),
                (mb.mtime(), mb.mtime_nsec()),
                "mtime of {}",
                pb.display()
            );
        }
    }
}

fn list(p: &Path) -> Vec<std::ffi::OsString> {
    fs::read_dir(p)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect()
}

/// Bytes in all files under `p`.
pub fn total_bytes_in(p: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(p).expect("read_dir") {
        let e = e.expect("entry");
        let m = e.metadata().expect("meta");
        n += if m.is_dir() {
            total_bytes_in(&e.path())
        } else {
            m.len()
        };
    }
    n
}
