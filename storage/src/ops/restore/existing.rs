//! Restoring over an existing directory: what to do with a file already
//! there (`--overwrite`) and with entries the snapshot does not have
//! (`--delete`). Everything here works from directory handles below the
//! target; nothing follows a symlink.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

use marmoset_index::BlobLocation;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use crate::format::crypto::Keys;
use crate::format::id::Id;
use crate::format::tree::Node;

/// What to do with a file that already exists at a restored path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Overwrite {
    /// Replace it (the default).
    #[default]
    Always,
    /// Keep it when size and mtime match; otherwise compare its content
    /// chunk by chunk and fetch only the chunks that differ. A restore
    /// run again this way resumes: files already correct are not
    /// downloaded again.
    IfChanged,
    /// Keep whatever is there.
    Never,
}

impl std::str::FromStr for Overwrite {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "always" => Ok(Overwrite::Always),
            "if-changed" => Ok(Overwrite::IfChanged),
            "never" => Ok(Overwrite::Never),
            other => Err(format!(
                "--overwrite {other:?}: use always, if-changed or never"
            )),
        }
    }
}

/// An existing regular file that may be kept.
pub(super) struct Existing {
    pub file: File,
    /// Opened for writing and safe to update in place; otherwise it is
    /// replaced by a new file, its matching chunks copied over.
    pub in_place: bool,
    pub dev: u64,
    pub ino: u64,
    pub uid: u32,
    pub gid: u32,
    /// Same size and mtime as recorded: taken as unchanged.
    pub same_stat: bool,
}

/// Opens `name` in `dir` with `flags` only if it is a regular file that
/// `accept`s: the entry is first held by an `O_PATH` handle (which opens
/// nothing: a fifo or device node is never opened for I/O) and checked,
/// then reopened through `/proc/self/fd`, which reaches exactly that inode.
/// `Ok(None)`: something else is there.
pub(super) fn open_regular(
    dir: &OwnedFd,
    name: &OsStr,
    flags: OFlag,
    accept: impl Fn(&libc::stat) -> bool,
) -> io::Result<Option<File>> {
    let path = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let st = nix::sys::stat::fstat(&path)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || !accept(&st) {
        return Ok(None);
    }
    let file = nix::fcntl::open(
        format!("/proc/self/fd/{}", path.as_raw_fd()).as_str(),
        flags | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let file = File::from(file);
    let again = nix::sys::stat::fstat(&file)?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Ok(None);
    }
    Ok(Some(file))
}

/// Opens the regular file at `name` in `dir`, if there is one: for update
/// in place when that is safe (its only name, and writable), else read
/// only, so that its matching chunks can be copied into a new file instead
/// of downloaded again. `None`: nothing, or not a regular file, is there.
pub(super) fn open_existing(dir: &OwnedFd, name: &OsStr, node: &Node) -> Option<Existing> {
    // A hard-linked file is never changed in place: the other names may be
    // outside what this restore owns (a link to a system file planted in
    // the target would otherwise get the snapshot's owner and mode).
    let writable = open_regular(dir, name, OFlag::O_RDWR, |st| st.st_nlink == 1)
        .ok()
        .flatten();
    let (file, in_place) = match writable {
        Some(f) => (f, true),
        None => (
            open_regular(dir, name, OFlag::O_RDONLY, |_| true).ok()??,
            false,
        ),
    };
    let st = nix::sys::stat::fstat(&file).ok()?;
    let mtime_ns = st.st_mtime.saturating_mul(1_000_000_000) + st.st_mtime_nsec;
    Some(Existing {
        file,
        in_place,
        dev: st.st_dev,
        ino: st.st_ino,
        uid: st.st_uid,
        gid: st.st_gid,
        same_stat: u64::try_from(st.st_size).ok() == Some(node.size) && mtime_ns == node.mtime_ns,
    })
}

impl Existing {
    /// Whether size and mtime may stand for the content. Not when the
    /// restore would then hand the file privileges on the strength of
    /// metadata anyone who can write the target can forge: set-id bits,
    /// file capabilities, or (restoring owners) another owner than
    /// recorded. Those files are compared by content.
    pub fn trusted(&self, node: &Node, chown: bool) -> bool {
        let privileged =
            node.mode & 0o6000 != 0 || node.xattrs.iter().any(|x| x.name.starts_with(b"security."));
        let owner_differs = chown && (self.uid != node.uid || self.gid != node.gid);
        !privileged && !owner_differs
    }
}

/// Which chunks of an existing file already hold the snapshot's content:
/// `true` at index i when the bytes at chunk i's offset hash to its id.
/// With `copy_to`, each matching chunk is also written there at its offset
/// (zero blocks left as holes: `copy_to` is new and sized).
pub(super) fn matching_chunks(
    file: &File,
    keys: &Keys,
    chunks: &[(Id, BlobLocation)],
    copy_to: Option<&File>,
) -> io::Result<Vec<bool>> {
    let mut buf = Vec::new();
    let mut offset = 0u64;
    let mut same = Vec::with_capacity(chunks.len());
    for (id, loc) in chunks {
        buf.resize(loc.raw_length as usize, 0);
        let matches = file.read_exact_at(&mut buf, offset).is_ok() && keys.content_id(&buf) == *id;
        if let (true, Some(to)) = (matches, copy_to) {
            super::fetch::write_data(to, &buf, offset, true)?;
        }
        same.push(matches);
        offset += u64::from(loc.raw_length);
    }
    Ok(same)
}

/// Removes every entry of `dir` whose name is not in `keep` and not
/// `protected` (directories with everything below them, never crossing
/// into another filesystem); returns how many entries were removed.
pub(super) fn delete_extras(
    dir: &OwnedFd,
    keep: &HashSet<OsString>,
    protected: &dyn Fn(&OsStr) -> bool,
) -> io::Result<u64> {
    let dev = nix::sys::stat::fstat(dir)?.st_dev;
    let mut removed = 0;
    for name in list(dir)? {
        if !keep.contains(&name) && !protected(&name) {
            removed += remove_tree(dir, &name, dev)?;
        }
    }
    Ok(removed)
}

/// Names in `dir` (without `.` and `..`).
fn list(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    let mut d = nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(out)
}

/// Removes `name` in `dir`: a directory is emptied through its own handle
/// first (opened `O_NOFOLLOW`, so a symlink is removed, not followed).
fn remove_tree(dir: &OwnedFd, name: &OsStr, dev: u64) -> io::Result<u64> {
    match nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => return Ok(1),
        Err(Errno::EISDIR | Errno::EPERM) => {}
        Err(Errno::ENOENT) => return Ok(0),
        Err(e) => return Err(e.into()),
    }
    let st = nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(Errno::EPERM.into());
    }
    if st.st_dev != dev {
        return Err(io::Error::other(format!(
            "{}: a mount point (another filesystem): left alone",
            name.to_string_lossy()
        )));
    }
    let sub = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut n = 0;
    // The handle must still be the directory stat'ed (not swapped).
    let held = nix::sys::stat::fstat(&sub)?;
    if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino) {
        return Err(io::Error::other("replaced during the restore: left alone"));
    }
    for child in list(&sub)? {
        n += remove_tree(&sub, &child, dev)?;
    }
    nix::unistd::unlinkat(dir, name, UnlinkatFlags::RemoveDir)?;
    Ok(n + 1)
}
