//! The embedded default backend: a directory on a local filesystem.
//!
//! Writes are crash-atomic: data goes to a temporary file in the target
//! folder, is fsynced, renamed over the final name and the folder is fsynced,
//! so a crash leaves either the old state or the complete new object, never a
//! torn one. Leftover `.tmp-*` files from a crash are ignored by `list`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{object_path, DeleteBackend, FileKind, ListBackend, ReadBackend, WriteBackend};
use crate::error::{Error, Result};

pub struct FsBackend {
    root: PathBuf,
}

const TMP_PREFIX: &str = ".tmp-";

impl FsBackend {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, kind: FileKind, name: &str) -> PathBuf {
        self.root.join(object_path(kind, name))
    }

    fn err(op: &'static str, kind: FileKind, name: &str, source: std::io::Error) -> Error {
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::NotFound {
                kind,
                name: name.to_string(),
            };
        }
        Error::Backend {
            op,
            kind,
            name: name.to_string(),
            source,
        }
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl ReadBackend for FsBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        fs::read(self.path(kind, name)).map_err(|e| Self::err("read", kind, name, e))
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let e = |err| Self::err("read", kind, name, err);
        let mut f = File::open(self.path(kind, name)).map_err(e)?;
        f.seek(SeekFrom::Start(offset)).map_err(e)?;
        let len = usize::try_from(length)
            .map_err(|_| Error::InvalidArgument(format!("range of {length} bytes is too large")))?;
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).map_err(|err| {
            if err.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt(
                    format!("{kind} {name}"),
                    format!("object is shorter than {offset}+{length} bytes (truncated?)"),
                )
            } else {
                e(err)
            }
        })?;
        Ok(buf)
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        fs::metadata(self.path(kind, name))
            .map(|m| m.len())
            .map_err(|e| Self::err("stat", kind, name, e))
    }

    /// A local write of a sealed pack takes milliseconds: one writer keeps
    /// up, and every extra one would hold another pack in memory.
    fn write_parallelism(&self) -> usize {
        1
    }
}

impl ListBackend for FsBackend {
    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        let e = |err| Self::err("list", kind, "", err);
        let mut out = Vec::new();
        match kind {
            FileKind::Config => {
                if let Ok(m) = fs::metadata(self.root.join(super::CONFIG_NAME)) {
                    out.push((super::CONFIG_NAME.to_string(), m.len()));
                }
            }
            FileKind::Pack => {
                let dir = self.root.join("packs");
                if !dir.exists() {
                    return Ok(out);
                }
                for sub in fs::read_dir(&dir).map_err(e)? {
                    let sub = sub.map_err(e)?;
                    if sub.file_type().map_err(e)?.is_dir() {
                        list_dir(&sub.path(), &mut out).map_err(e)?;
                    }
                }
            }
            other => {
                let dir = self.root.join(other.folder().unwrap_or(""));
                list_dir(&dir, &mut out).map_err(e)?;
            }
        }
        Ok(out)
    }
}

/// Lists one folder. A folder that does not exist yet holds no objects,
/// like an S3 prefix (repositories made before a kind existed lack it).
fn list_dir(dir: &Path, out: &mut Vec<(String, u64)>) -> std::io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(TMP_PREFIX) {
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_file() {
            out.push((name, meta.len()));
        }
    }
    Ok(())
}

impl WriteBackend for FsBackend {
    fn create(&self) -> Result<()> {
        let e = |err| Error::io(&self.root, err);
        fs::create_dir_all(&self.root).map_err(e)?;
        for kind in FileKind::ALL {
            if let Some(folder) = kind.folder() {
                fs::create_dir_all(self.root.join(folder)).map_err(e)?;
            }
        }
        for i in 0..=255u8 {
            fs::create_dir_all(self.root.join("packs").join(hex::encode([i]))).map_err(e)?;
        }
        fsync_dir(&self.root).map_err(e)?;
        Ok(())
    }

    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        let e = |err| Self::err("write", kind, name, err);
        let path = self.path(kind, name);
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(e)?;
        }
        let tmp = dir.join(format!("{TMP_PREFIX}{}", crate::id::Id::random().short()));
        let result = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)?;
            fsync_dir(&dir)
        })();
        if result.is_err() {
            // A failed write (full disk, permission) must not leave debris.
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(e)
    }
}

impl DeleteBackend for FsBackend {
    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        match fs::remove_file(self.path(kind, name)) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(Self::err("remove", kind, name, err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_backend_passes_conformance() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mrm-fs-conf-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let b = FsBackend::new(&dir);
        b.create()?;
        super::super::conformance::run_all(&b)?;
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn a_missing_kind_folder_lists_empty_and_is_created_on_write() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("mrm-fs-old-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let b = FsBackend::new(&dir);
        b.create()?;
        fs::remove_dir_all(dir.join("plans")).map_err(|e| Error::io(&dir, e))?;
        assert!(b.list(FileKind::Plan)?.is_empty());
        b.write(FileKind::Plan, "p1", b"{}")?;
        assert_eq!(b.list(FileKind::Plan)?.len(), 1);
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }
}
