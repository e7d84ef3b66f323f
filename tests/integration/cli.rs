//! The `marmoset` binary against a scratch repository: a temporary
//! directory with the repository, a private cache and a password file.
//! It lives here, not in `marmoset-testing`, because Cargo gives the
//! binary's path (`CARGO_BIN_EXE_marmoset`) only to this package's tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use marmoset_storage::backend::fs::FsBackend;
use marmoset_storage::{Config, OpenOptions, Repository};

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

    /// The pack holding blob `id`, and the blob's offset in it.
    pub fn locate(&self, id: &str) -> (String, u64) {
        for p in self.pack_names() {
            let listing = self.json(&["cat", "pack", &p]);
            for b in listing[0]["blobs"].as_array().expect("blobs") {
                if b["id"] == id {
                    return (p, b["offset"].as_u64().expect("offset"));
                }
            }
        }
        panic!("blob {id} in no pack");
    }

    pub fn pack_path(&self, name: &str) -> PathBuf {
        self.repo.join("packs").join(&name[..2]).join(name)
    }

    /// Runs marmoset with `args` (it must succeed) and returns its stdout
    /// and the bytes it got from `read` calls: a shell runs it and then
    /// reads its own `/proc/PID/io`, which includes the reaped child's.
    pub fn ok_counting_reads(&self, args: &[&str]) -> (Vec<u8>, u64) {
        let out = Command::new("sh")
            .arg("-c")
            .arg(r#""$@" > "$OUT" || exit $?; grep '^rchar:' /proc/$$/io"#)
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_marmoset"))
            .arg("-q")
            .args(args)
            .env("OUT", self.path("counted.out"))
            .env("MARMOSET_REPOSITORY", &self.repo)
            .env("MARMOSET_PASSWORD_FILE", &self.pwfile)
            .env("MARMOSET_CACHE_DIR", &self.cache)
            .env_remove("MARMOSET_PASSWORD")
            .output()
            .expect("spawn sh");
        assert!(
            out.status.success(),
            "marmoset {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let rchar = line
            .trim()
            .strip_prefix("rchar:")
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no rchar in {line:?}"));
        (fs::read(self.path("counted.out")).expect("output"), rchar)
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
