//! Helpers shared by the integration tests: a scratch repository, the
//! marmoset binary, random source trees and a strict tree comparison.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use marmoset_storage::backend::fs::FsBackend;
use marmoset_storage::{Config, OpenOptions, Repository};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

pub const PASSWORD: &str = "correct horse battery staple";

pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub cache: PathBuf,
    pub pwfile: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join("repo");
        let cache = dir.path().join("cache");
        let pwfile = dir.path().join("pw");
        fs::write(&pwfile, PASSWORD).expect("pw");
        Env {
            dir,
            repo,
            cache,
            pwfile,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_marmoset"));
        c.env("MARMOSET_REPOSITORY", &self.repo)
            .env("MARMOSET_PASSWORD_FILE", &self.pwfile)
            .env("MARMOSET_CACHE_DIR", &self.cache)
            .env_remove("MARMOSET_PASSWORD")
            .arg("-q");
        c
    }

    /// Runs marmoset with `args`; panics with its output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.cmd().args(args).output().expect("spawn marmoset");
        assert!(
            out.status.success(),
            "marmoset {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_slice(&out.stdout).expect("json output")
    }

    pub fn init(&self) {
        self.ok(&["init"]);
    }

    pub fn open(&self) -> Repository {
        Repository::open(
            Arc::new(FsBackend::new(&self.repo)),
            PASSWORD.as_bytes(),
            &OpenOptions {
                cache_root: Some(self.cache.clone()),
            },
        )
        .expect("open repository")
    }

    pub fn init_lib(&self) -> Repository {
        Repository::init(
            Arc::new(FsBackend::new(&self.repo)),
            PASSWORD.as_bytes(),
            Config::new(),
            &OpenOptions {
                cache_root: Some(self.cache.clone()),
            },
        )
        .expect("init repository")
    }

    /// Backs up `path` through the CLI and returns the JSON summary.
    pub fn backup(&self, path: &Path, extra: &[&str]) -> serde_json::Value {
        let p = path.to_str().expect("utf8 path");
        let mut args = vec!["backup", p];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    pub fn pack_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in fs::read_dir(self.repo.join("packs")).expect("packs dir") {
            for f in fs::read_dir(sub.expect("entry").path()).expect("pack subdir") {
                let name = f.expect("entry").file_name().to_string_lossy().into_owned();
                if !name.starts_with(".tmp-") {
                    out.push(name);
                }
            }
        }
        out.sort();
        out
    }

    pub fn pack_path(&self, name: &str) -> PathBuf {
        self.repo.join("packs").join(&name[..2]).join(name)
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// Text-like compressible bytes.
pub fn text_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "alpha ",
        "beta ",
        "gamma ",
        "delta\n",
        "log line ",
        "level=info ",
        "42 ",
    ];
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        v.extend_from_slice(WORDS[rng.gen_range(0..WORDS.len())].as_bytes());
    }
    v.truncate(n);
    v
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

/// Runs the command as root without the capabilities that bypass file
/// permissions, so an unreadable file really is unreadable.
pub fn without_dac_override(mut c: Command) -> Command {
    if nix::unistd::geteuid().is_root() {
        let prog = c.get_program().to_owned();
        let args: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
        let envs: Vec<_> = c
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
            .collect();
        let mut w = Command::new("setpriv");
        w.args([
            "--inh-caps=-all",
            "--bounding-set=-dac_override,-dac_read_search",
            "--",
        ])
        .arg(prog)
        .args(args);
        for (k, v) in envs {
            match v {
                Some(v) => w.env(k, v),
                None => w.env_remove(k),
            };
        }
        c = w;
    }
    c
}

/// A real S3-compatible server (moto) on a free loopback port, with one
/// bucket; killed on drop. `None` (test skipped with a message) when moto
/// is not installed — `./scripts/test` installs it.
pub struct S3Server {
    child: std::process::Child,
    pub port: u16,
    pub bucket: String,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(30) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

impl S3Server {
    pub fn start() -> Option<S3Server> {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("skipping: moto_server not installed (pip install 'moto[server]')");
            return None;
        };
        let mut s = S3Server {
            child,
            port,
            bucket: "marmoset".into(),
        };
        assert!(wait_port(port), "moto did not start");
        // Create the bucket with a plain HTTP PUT (moto accepts it unsigned).
        // The port may accept connections before the app answers: retry.
        use std::io::{Read, Write};
        let mut resp = String::new();
        for _ in 0..100 {
            resp.clear();
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = write!(c, "PUT /{} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", s.bucket);
                let _ = c.read_to_string(&mut resp);
            }
            if resp.starts_with("HTTP/1.1 200") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(resp.starts_with("HTTP/1.1 200"), "bucket creation: {resp}");
        s.bucket = s.bucket.clone();
        Some(s)
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3:http://127.0.0.1:{}/{}/{prefix}", self.port, self.bucket)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fault-injecting proxy in front of a port; killed on drop.
pub struct FaultProxy {
    child: std::process::Child,
    pub port: u16,
}

impl FaultProxy {
    pub fn start(upstream: u16, probability: f64, seed: u64, delay_ms: u64) -> FaultProxy {
        let port = free_port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fault_proxy.py");
        let child = Command::new("python3")
            .arg(script)
            .args([
                port.to_string(),
                upstream.to_string(),
                probability.to_string(),
                seed.to_string(),
                delay_ms.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_port(port), "proxy did not start");
        FaultProxy { child, port }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Env {
    /// A command against an S3 repository URL with test credentials.
    pub fn s3_cmd(&self, url: &str) -> Command {
        let mut c = self.cmd();
        c.env("MARMOSET_REPOSITORY", url)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_PROFILE");
        c
    }

    pub fn s3_ok(&self, url: &str, args: &[&str]) -> Output {
        let out = self
            .s3_cmd(url)
            .args(args)
            .output()
            .expect("spawn marmoset");
        assert!(
            out.status.success(),
            "marmoset {args:?} on {url} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}
