//! FUSE mount: real mounts through /dev/fuse. Every test skips with a
//! message when /dev/fuse is unavailable (e.g. an unprivileged container);
//! `./scripts/test` installs fuse3 and runs as root, so CI exercises them.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use marmoset_testing::random::{random_bytes, rng};
use marmoset_testing::trees::{assert_same_tree, random_tree};
use rand::Rng;

use crate::integration::cli::Env;

fn fuse_available() -> bool {
    let ok =
        Path::new("/dev/fuse").exists() && Command::new("fusermount3").arg("-V").output().is_ok();
    if !ok {
        eprintln!("skipping: FUSE is not available here");
    }
    ok
}

struct Mounted {
    child: Child,
    mp: PathBuf,
}

impl Mounted {
    fn new(env: &Env, mp: &Path) -> Mounted {
        fs::create_dir_all(mp).unwrap();
        let child = env.cmd().arg("mount").arg(mp).spawn().unwrap();
        let start = Instant::now();
        while !mp.join("snapshots").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "mount did not appear"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Mounted {
            child,
            mp: mp.to_owned(),
        }
    }

    /// SIGTERM; returns the exit status of `marmoset mount`.
    fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "mount did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mp)
            .output();
    }
}

fn is_mounted(mp: &Path) -> bool {
    let canon = mp.canonicalize().unwrap_or(mp.to_owned());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}

#[test]
fn mount_shows_every_snapshot_exactly() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    env.init();
    let mut srcs = Vec::new();
    for i in 0..3u64 {
        let src = env.path(&format!("src{i}"));
        random_tree(&src, 40 + i, 80);
        fs::write(src.join("big.bin"), random_bytes(&mut rng(i), 9 << 20)).unwrap();
        xattr::set(src.join("big.bin"), "user.note", b"hello").ok();
        let out = env.backup(
            &src,
            &[
                "--tag",
                if i == 2 { "weekly" } else { "daily" },
                "--source",
                &format!("ns/pvc{}", i % 2),
            ],
        );
        srcs.push((out["snapshot"].as_str().unwrap().to_string(), src));
    }
    let mp = env.path("mnt");
    let m = Mounted::new(&env, &mp);

    for (id, src) in &srcs {
        assert_same_tree(src, &mp.join("snapshots").join(&id[..8]));
    }
    // by-source with a latest link, by-tag.
    let pvc0 = mp.join("by-source").join("ns%2Fpvc0");
    let link = fs::read_link(pvc0.join("latest")).unwrap();
    assert_same_tree(&srcs[2].1, &pvc0.join(link));
    assert_eq!(
        fs::read_dir(pvc0).unwrap().count(),
        3,
        "two snapshots + latest"
    );
    assert_same_tree(&srcs[2].1, &mp.join("by-tag/weekly").join(&srcs[2].0[..8]));
    if xattr::get(srcs[0].1.join("big.bin"), "user.note")
        .unwrap()
        .is_some()
    {
        let x = xattr::get(
            mp.join("snapshots").join(&srcs[0].0[..8]).join("big.bin"),
            "user.note",
        )
        .unwrap();
        assert_eq!(x.as_deref(), Some(&b"hello"[..]));
    }

    // Random-offset reads from concurrent readers match the source.
    let file = mp.join("snapshots").join(&srcs[1].0[..8]).join("big.bin");
    let want = fs::read(srcs[1].1.join("big.bin")).unwrap();
    let readers: Vec<_> = (0..4u64)
        .map(|t| {
            let (file, want) = (file.clone(), want.clone());
            std::thread::spawn(move || {
                let mut r = rng(t);
                let mut f = fs::File::open(&file).unwrap();
                for _ in 0..50 {
                    let off = r.gen_range(0..want.len());
                    let len = r.gen_range(1..300_000).min(want.len() - off);
                    let mut buf = vec![0; len];
                    f.seek(SeekFrom::Start(off as u64)).unwrap();
                    f.read_exact(&mut buf).unwrap();
                    assert!(buf == want[off..off + len], "bytes at {off}+{len}");
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }

    // cp -a out of the mount reproduces a subtree exactly.
    let copy = env.path("copy");
    let st = Command::new("cp")
        .arg("-a")
        .arg(mp.join("snapshots").join(&srcs[0].0[..8]))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    assert_same_tree(&srcs[0].1, &copy);

    // Read-only: writes fail with EROFS.
    let err = fs::write(mp.join("snapshots").join(&srcs[0].0[..8]).join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_erofs()));

    // A snapshot taken while mounted appears without remounting.
    let src = env.path("later");
    random_tree(&src, 99, 10);
    let id = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let start = Instant::now();
    while !mp.join("snapshots").join(&id[..8]).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "new snapshot did not appear"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_same_tree(&src, &mp.join("snapshots").join(&id[..8]));

    assert!(m.stop().success(), "clean exit on SIGTERM");
    assert!(!is_mounted(&mp), "unmounted");
}

fn libc_erofs() -> i32 {
    nix::errno::Errno::EROFS as i32
}

#[test]
fn corrupted_pack_gives_eio_never_wrong_bytes_and_unmount_with_active_reader() {
    if !fuse_available() {
        return;
    }
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("victim.bin"), random_bytes(&mut rng(1), 3 << 20)).unwrap();
    let id = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let first_packs = env.pack_names();
    fs::write(src.join("healthy.bin"), random_bytes(&mut rng(2), 3 << 20)).unwrap();
    let id2 = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let victim_pack = first_packs
        .iter()
        .max_by_key(|p| fs::metadata(env.pack_path(p)).unwrap().len())
        .unwrap();
    let path = env.pack_path(victim_pack);
    let mut bytes = fs::read(&path).unwrap();
    bytes[2 << 20] ^= 0x10;
    fs::write(&path, bytes).unwrap();

    let mp = env.path("mnt");
    let m = Mounted::new(&env, &mp);
    let snap = mp.join("snapshots").join(&id2[..8]);
    let err = fs::read(snap.join("victim.bin")).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::EIO as i32),
        "{err}"
    );
    assert_eq!(
        fs::read(snap.join("healthy.bin")).unwrap(),
        fs::read(src.join("healthy.bin")).unwrap()
    );
    let _ = id;

    // Unmount while a reader holds the file open and is reading.
    let mut f = fs::File::open(snap.join("healthy.bin")).unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0; 4096];
        let mut n = 0u64;
        for _ in 0..100_000 {
            match f.read(&mut buf) {
                Ok(0) => {
                    f.seek(SeekFrom::Start(0)).unwrap();
                }
                Ok(k) => n += k as u64,
                Err(_) => break,
            }
        }
        n
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(m.stop().success());
    assert!(reader.join().unwrap() > 0);
    assert!(!is_mounted(&mp));
}

#[test]
fn mount_errors_are_clear() {
    let env = Env::new();
    env.init();
    // Not empty.
    let mp = env.path("busy");
    fs::create_dir_all(&mp).unwrap();
    fs::write(mp.join("f"), b"x").unwrap();
    let out = env.cmd().arg("mount").arg(&mp).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("not empty") || err.contains("FUSE is not available"),
        "{err}"
    );
    // Missing fusermount3: an empty PATH.
    let empty = env.path("empty");
    fs::create_dir_all(&empty).unwrap();
    let out = env
        .cmd()
        .env("PATH", env.path("nobin"))
        .arg("mount")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("fusermount3 was not found") || err.contains("/dev/fuse is missing"),
        "{err}"
    );
    // Missing mountpoint.
    let out = env
        .cmd()
        .arg("mount")
        .arg(env.path("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn diff_and_find_compare_snapshots() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("keep.txt"), b"same").unwrap();
    fs::write(src.join("change.txt"), b"v1").unwrap();
    fs::write(src.join("gone.log"), b"bye").unwrap();
    fs::write(src.join("d/inner.log"), b"inner").unwrap();
    let a = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    fs::write(src.join("change.txt"), b"v2 longer").unwrap();
    fs::remove_file(src.join("gone.log")).unwrap();
    fs::write(src.join("new.log"), b"hello").unwrap();
    let b = env.backup(&src, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let d = env.json(&["diff", &a, &b]);
    let got: Vec<(String, String)> = d
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["change"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        got.contains(&("modified".into(), "/change.txt".into())),
        "{got:?}"
    );
    assert!(got.contains(&("removed".into(), "/gone.log".into())));
    assert!(got.contains(&("added".into(), "/new.log".into())));
    assert!(!got
        .iter()
        .any(|(_, p)| p == "/keep.txt" || p.starts_with("/d")));

    let f = env.json(&["find", "*.log"]);
    let hits: Vec<String> = f
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}:{}",
                &m["snapshot"].as_str().unwrap()[..8],
                m["path"].as_str().unwrap()
            )
        })
        .collect();
    assert!(hits.contains(&format!("{}:/gone.log", &a[..8])));
    assert!(hits.contains(&format!("{}:/new.log", &b[..8])));
    assert!(hits.contains(&format!("{}:/d/inner.log", &b[..8])));
    assert_eq!(hits.len(), 4, "{hits:?}");
    let none = env.cmd().args(["find", "*.nothing"]).output().unwrap();
    assert_eq!(none.status.code(), Some(1));
}
