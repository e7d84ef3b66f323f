//! Mounting: preflight checks with clear errors, then a foreground session
//! that unmounts cleanly on Ctrl-C / SIGTERM or when unmounted externally.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};
use marmoset_storage::Repository;
use tracing::info;

use crate::fs::MarmosetFs;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("FUSE is not available: /dev/fuse is missing (load the fuse kernel module; in a container, pass --device /dev/fuse)")]
    NoDevice,
    #[error(
        "FUSE is not available: fusermount3 was not found in PATH (install the fuse3 package)"
    )]
    NoFusermount,
    #[error("mountpoint {0}: does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error("mountpoint {0}: something is already mounted there")]
    Busy(PathBuf),
    #[error("mountpoint {0}: directory is not empty")]
    NotEmpty(PathBuf),
    #[error("mount {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct MountOptions {
    pub allow_other: bool,
    /// Bytes of decrypted chunks kept in memory.
    pub cache_bytes: usize,
    /// FUSE worker threads.
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            allow_other: false,
            cache_bytes: 256 << 20,
            threads: 4,
        }
    }
}

fn in_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

fn is_mountpoint(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|mp| Path::new(&mp.replace("\\040", " ")) == canon)
    })
}

/// Checks everything that commonly goes wrong before touching FUSE.
pub fn preflight(mountpoint: &Path) -> Result<(), MountError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoDevice);
    }
    if !in_path("fusermount3") && !in_path("fusermount") {
        return Err(MountError::NoFusermount);
    }
    if !mountpoint.is_dir() {
        return Err(MountError::NotADirectory(mountpoint.to_owned()));
    }
    if is_mountpoint(mountpoint) {
        return Err(MountError::Busy(mountpoint.to_owned()));
    }
    let non_empty = std::fs::read_dir(mountpoint)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if non_empty {
        return Err(MountError::NotEmpty(mountpoint.to_owned()));
    }
    Ok(())
}

/// Mounts in the background; the mount lives until the returned session
/// is dropped or `umount_and_join` is called.
pub fn spawn(
    repo: Arc<Repository>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<fuser::BackgroundSession, MountError> {
    preflight(mountpoint)?;
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("marmoset".into()),
        MountOption::Subtype("marmoset".into()),
        MountOption::AutoUnmount,
        MountOption::DefaultPermissions,
        MountOption::NoExec,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    cfg.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::RootAndOwner
    };
    cfg.n_threads = Some(opts.threads.max(1));
    let fs = MarmosetFs::new(repo, opts.cache_bytes);
    fuser::spawn_mount(fs, mountpoint, &cfg).map_err(|source| MountError::Mount {
        path: mountpoint.to_owned(),
        source,
    })
}

/// Mounts and serves until SIGINT/SIGTERM or an external unmount.
pub fn run_foreground(
    repo: Arc<Repository>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<(), MountError> {
    let session = spawn(repo, mountpoint, opts)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    info!(mountpoint = %mountpoint.display(), "mounted; Ctrl-C to unmount");
    while !stop.load(Ordering::Relaxed) && !session.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !session.guard.is_finished() {
        // Worker threads block in read(/dev/fuse) until the kernel ends the
        // connection: a lazy unmount does that even while a reader is
        // active, and the threads then return.
        unmount(mountpoint);
    }
    session.join().map_err(|source| MountError::Mount {
        path: mountpoint.to_owned(),
        source,
    })?;
    info!("unmounted");
    Ok(())
}

/// Lazily unmounts `mountpoint` with fusermount3 (or fusermount).
pub fn unmount(mountpoint: &Path) {
    for bin in ["fusermount3", "fusermount"] {
        let ok = std::process::Command::new(bin)
            .args(["-u", "-z"])
            .arg(mountpoint)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
    }
}
