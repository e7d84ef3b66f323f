//! Ctrl-C (SIGINT) and SIGTERM during a backup: the first asks the backup
//! to stop cleanly (its workers stop, no snapshot is written, its session
//! lease is removed, and the packs already written are reused by the next
//! run); a second ends the process at once, as operators expect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only async-signal-safe work here: an atomic swap, and `_exit`.
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe and ends the process.
        #[allow(unsafe_code)]
        unsafe {
            libc::_exit(130)
        };
    }
}

/// Installs the handlers and returns a flag that turns true at the first
/// signal (for [`marmoset_storage::BackupOptions::cancel`]).
#[allow(unsafe_code)]
pub fn cancel_flag() -> Arc<AtomicBool> {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls _exit.
        unsafe {
            libc::signal(sig, handler);
        }
    }
    let flag = Arc::new(AtomicBool::new(false));
    let copy = flag.clone();
    // The handler cannot reach the backup's flag: a thread passes it on.
    std::thread::spawn(move || {
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!("interrupted: stopping the backup (interrupt again to quit at once)");
        copy.store(true, Ordering::SeqCst);
    });
    flag
}
