//! The `marmoset` command-line tool: parses arguments, opens the repository,
//! calls the engine in `marmoset-storage`, prints tables or JSON.
//!
//! Exit codes: 0 success, 1 error, 2 usage error, 3 backup incomplete (some
//! source files unreadable) or restore with damaged files, 10 repository not
//! found, 11 repository format too new, 12 wrong password.

mod cli;
mod commands;
mod interrupt;
mod output;
mod progress;
mod repo_open;
mod terminal;

use output::errln;

use std::process::ExitCode;

use clap::Parser;
use marmoset_storage::Error as StorageError;

fn main() -> ExitCode {
    tune_allocator();
    let cli = cli::Cli::parse();
    init_logging(cli.global.verbose);
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            errln!("error: {}", describe(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The error and its causes, skipping causes whose text the message
/// already contains (library errors include their cause's text).
fn describe(err: &anyhow::Error) -> String {
    let mut msg = err.to_string();
    for cause in err.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

fn exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<StorageError>() {
        Some(StorageError::RepositoryNotFound { .. }) => 10,
        Some(StorageError::UnsupportedVersion { .. }) => 11,
        Some(StorageError::WrongPassword | StorageError::NoUsableKey { .. }) => 12,
        _ => 1,
    }
}

/// Pack-sized buffers (8 MiB and more) are mmapped and returned to the OS
/// on free. glibc's default lets its dynamic threshold climb, so freed pack
/// buffers stayed in per-thread arenas and peak RSS of a 2 GiB backup was
/// ~90 MiB higher (measured: 196 -> ~100 MiB).
#[allow(unsafe_code)]
fn tune_allocator() {
    // Fixing the mmap threshold also fixes the trim threshold at 128 KiB,
    // which would shrink and regrow the heap around every chunk: 8 MiB is
    // above the largest chunk (4 MiB), so chunk buffers are reused, and low
    // enough that freed pack trailers and entry lists go back to the OS
    // (64 MiB kept 300 000 small files at 140 MiB instead of ~120 MiB).
    //
    // Two arenas rather than glibc's eight per core: each thread of the
    // pipeline otherwise got an arena of its own, each kept its free
    // memory, and a backup of a million small files peaked at 211 MiB
    // instead of 163 MiB (300 000 files: 175 -> 148 MiB). Two keep the
    // two sides of the pipeline (reading, hashing/sealing) from contending.
    // glibc's own variables (MALLOC_ARENA_MAX and so on) still win, for
    // operators and for measuring.
    for (param, value, env) in [
        (libc::M_MMAP_THRESHOLD, 8 << 20, "MALLOC_MMAP_THRESHOLD_"),
        (libc::M_TRIM_THRESHOLD, 8 << 20, "MALLOC_TRIM_THRESHOLD_"),
        (libc::M_ARENA_MAX, 2, "MALLOC_ARENA_MAX"),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only changes allocator parameters; it is
            // called before any other thread exists.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
    // Free memory inside the heaps (between live allocations: the
    // per-file and per-blob records of millions of small files, pack
    // trailers, index batches) is kept by glibc whatever the trim
    // threshold, which only concerns the top of a heap. Returning it once a
    // second cost nothing measurable and took the peak of a backup of a
    // million small files from 124-128 MiB to 97-107 MiB.
    std::thread::spawn(|| loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        // SAFETY: malloc_trim only returns free memory to the system.
        unsafe {
            libc::malloc_trim(0);
        }
        if tracing::enabled!(tracing::Level::TRACE) {
            // SAFETY: mallinfo2 only reads the allocator's counters.
            let m = unsafe { libc::mallinfo2() };
            tracing::trace!(
                in_use = m.uordblks,
                free = m.fordblks,
                mmapped = m.hblkhd,
                "allocator after trim"
            );
        }
    });
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    // MARMOSET_LOG, else RUST_LOG as tracing users expect, else -v/-q.
    let filter = tracing_subscriber::EnvFilter::try_from_env("MARMOSET_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // A log line that cannot be written (stderr closed: `2>&1 | head`) is
    // dropped; reporting that on stderr would panic the logging thread.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .log_internal_errors(false);
    // Log fields carry file names: on a terminal, escape them (and so go
    // without colours, whose escape codes would be escaped too).
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        builder
            .with_ansi(false)
            .with_writer(|| terminal::EscapingStderr)
            .init();
    } else {
        // A file or a pipe: no colour codes either.
        builder.with_ansi(false).with_writer(std::io::stderr).init();
    }
}
