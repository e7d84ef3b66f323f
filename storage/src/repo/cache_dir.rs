//! The private per-user cache root: where the index cache and the
//! last-key hint live, and the checks that keep it this user's own.

use std::path::{Path, PathBuf};

use super::OpenOptions;
use crate::error::{Error, Result};

impl OpenOptions {
    /// The cache root used when none is configured: `$XDG_CACHE_HOME/marmoset`,
    /// `~/.cache/marmoset`, or with neither set `$TMPDIR/marmoset-cache-<uid>`.
    pub fn default_cache_root() -> PathBuf {
        default_root().0
    }
}

/// [`OpenOptions::default_cache_root`], and whether it is the fallback in
/// the temporary folder, which every user can write to.
pub(super) fn default_root() -> (PathBuf, bool) {
    let set = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty());
    if let Some(x) = set("XDG_CACHE_HOME") {
        return (PathBuf::from(x).join("marmoset"), false);
    }
    if let Some(h) = set("HOME") {
        return (PathBuf::from(h).join(".cache").join("marmoset"), false);
    }
    // Per user: a fixed name in a shared folder can be created first by
    // anyone, who would then read (or swap) the cache.
    let uid = nix::unistd::geteuid().as_raw();
    (
        std::env::temp_dir().join(format!("marmoset-cache-{uid}")),
        true,
    )
}

/// Makes sure a cache root is this user's own before anything is read from
/// or written to it: it holds plaintext source paths and which key opens
/// the repository, and whoever owns it could read or swap what is inside.
/// Created `0700` when missing. In the shared temporary folder it must also
/// be a real directory (not a symlink planted there) and is kept `0700`.
pub(super) fn ensure_private_cache_dir(dir: &Path, shared_tmp: bool) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let io = |e| Error::io(dir, e);
    let refuse = |reason: String| Error::UnsafeCacheDir {
        path: dir.to_owned(),
        reason,
    };
    // Only the last component is ours to create in the shared folder.
    match std::fs::DirBuilder::new()
        .recursive(!shared_tmp)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let lookup = if shared_tmp {
        std::fs::symlink_metadata(dir)
    } else {
        std::fs::metadata(dir)
    };
    let meta = lookup.map_err(io)?;
    if meta.file_type().is_symlink() {
        return Err(refuse(
            "is a symbolic link in a folder other users can write to".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(refuse("is not a directory".into()));
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(refuse(format!(
            "owned by uid {}, not by this user (uid {uid})",
            meta.uid()
        )));
    }
    // Ours but open to others (a 1777 folder given as the cache root, an
    // old 0775 one): close it, so nobody else can plant entries in it.
    if (shared_tmp && meta.mode() & 0o077 != 0) || meta.mode() & 0o022 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}
