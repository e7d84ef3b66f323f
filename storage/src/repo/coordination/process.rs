//! Which process holds a lease, as the kernel knows it: boot id, PID
//! namespace, pid and start time, and the boot-time clock that counts
//! pauses.

use std::time::Duration;

use crate::format::lease::ProcessId;

impl ProcessId {
    pub fn current() -> Self {
        let pid = std::process::id();
        Self {
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            pid_ns: std::fs::read_link("/proc/self/ns/pid")
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            pid,
            start_ticks: start_ticks("self").unwrap_or(0),
        }
    }

    /// True only when the holder provably no longer runs: same boot, same
    /// PID namespace, and either no process with that pid (the kernel says
    /// so: `kill(pid, 0)` gives ESRCH, whatever `/proc` hides) or one that
    /// started at another time (the pid was reused). A process `/proc`
    /// does not show us (`hidepid`) is never taken for a dead one.
    pub fn provably_gone(&self) -> bool {
        let me = Self::current();
        if self.boot_id.is_empty()
            || self.pid_ns.is_empty()
            || self.start_ticks == 0
            || self.boot_id != me.boot_id
            || self.pid_ns != me.pid_ns
        {
            return false;
        }
        if self.pid == me.pid {
            return self.start_ticks != me.start_ticks;
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
            Err(nix::errno::Errno::ESRCH) => true,
            // Alive (or not ours to signal): gone only if it is another
            // process under a reused pid, as far as `/proc` tells.
            _ => {
                proc_is_own_namespace()
                    && start_ticks(&self.pid.to_string()).is_some_and(|t| t != self.start_ticks)
            }
        }
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Field 22 of `/proc/<pid>/stat` (after the parenthesised command name,
/// which may itself contain spaces and parentheses).
pub(super) fn start_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the mounted `/proc` numbers processes as our PID namespace does
/// (not so after `unshare -p` without remounting `/proc`).
fn proc_is_own_namespace() -> bool {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse::<u32>().ok()))
        == Some(std::process::id())
}

/// Time since boot, counting time suspended or stopped: a process frozen
/// by SIGSTOP sees the whole pause when it resumes.
pub(crate) fn boottime() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| Duration::new(t.tv_sec().max(0) as u64, t.tv_nsec().max(0) as u32))
        .unwrap_or_default()
}
