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
        if dir.join(DONE_FILE).exists() {
            return Ok(());
        }
        let failed = dir.join(FAILED_FILE);
        if failed.exists() {
            let why = std::fs::read_to_string(&failed).unwrap_or_default();
            return Err(Error::Restore(format!(
                "the volume restore failed: {}",
                why.trim()
            )));
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
