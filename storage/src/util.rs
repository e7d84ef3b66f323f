//! Small helpers without a better home.

pub fn hostname() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn username() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

/// Locks a mutex, ignoring poisoning: the data guarded here (counters,
/// queues) stays consistent even if a holder panicked.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `OsStr` from raw bytes (Unix file names are bytes).
pub(crate) fn os_str(b: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(b)
}

/// The wall clock. `MARMOSET_CLOCK_OFFSET_SECS` shifts it (by at most a
/// century either way), so reliability campaigns can run two processes
/// whose clocks disagree.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    const CENTURY: i64 = 100 * 366 * 86_400;
    let offset = std::env::var("MARMOSET_CLOCK_OFFSET_SECS")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0)
        .clamp(-CENTURY, CENTURY);
    let now = chrono::Utc::now();
    chrono::Duration::try_seconds(offset)
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(now)
}
