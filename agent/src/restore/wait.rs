//! `marmoset k8s restore-wait`: the init container of a restored pod. It
//! holds the pod until the agent of its node has restored the pod's
//! volumes and written `done` into the wait directory, or fails it with
//! the agent's reason (`failed`), so the application never starts on an
//! empty or half-restored volume.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::restore::{DONE_FILE, FAILED_FILE};

/// Waits for the outcome in `dir`; `tick` is called about every minute
/// with the time waited (for a log line).
pub fn wait(
    dir: &Path,
    timeout: Duration,
    poll: Duration,
    mut tick: impl FnMut(Duration),
) -> Result<()> {
    let start = Instant::now();
    let mut last_tick = Instant::now();
    loop {
        // `failed` wins; either must be a file the agent wrote.
        let failed = dir.join(FAILED_FILE);
        if let Ok(m) = std::fs::symlink_metadata(&failed) {
            // Only a file is read: a FIFO would block, a link leads elsewhere.
            let why = if m.is_file() {
                read_start(&failed)
            } else {
                "(the agent's failed entry is not a file)".to_string()
            };
            return Err(Error::Restore(format!(
                "the volume restore failed: {}",
                why.trim()
            )));
        }
        if std::fs::symlink_metadata(dir.join(DONE_FILE)).is_ok_and(|m| m.is_file()) {
            return Ok(());
        }
        if !dir.is_dir() {
            return Err(Error::Restore(format!(
                "{} is not mounted: this container needs the restore's wait volume",
                dir.display()
            )));
        }
        if start.elapsed() >= timeout {
            return Err(Error::Restore(format!(
                "no volume restore after {}s: is the marmoset agent running on this node?",
                timeout.as_secs()
            )));
        }
        if last_tick.elapsed() >= Duration::from_secs(60) {
            last_tick = Instant::now();
            tick(start.elapsed());
        }
        std::thread::sleep(poll);
    }
}

/// The first 4 KiB of a file, as text.
fn read_start(path: &Path) -> String {
    use std::io::Read;
    let mut buf = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(4096).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}
