//! `marmoset backup`: one new snapshot of the given paths, with a progress
//! line while it runs and its summary at the end.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;
use marmoset_storage::{BackupOptions, Id, Progress, Repository, Snapshot};
use serde_json::json;

use crate::cli::{BackupArgs, Global};
use crate::output::print_json;
use crate::output::{errln, outln};
use crate::progress::{bytes, Ticker};
use crate::repo_open::open;
use crate::terminal::shown;

pub(super) fn run(g: &Global, a: BackupArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let opts = BackupOptions {
        source: a.source,
        tags: a.tags,
        excludes: a.excludes,
        threads: a.threads,
        force_read: a.force,
        uploaders: None,
        hostname: a.host,
        cancel: Some(crate::interrupt::cancel_flag()),
    };
    let progress = Arc::new(Progress::default());
    let ticker = Ticker::start(!g.quiet && !g.json, progress_line(progress.clone()));
    let (id, snap) = marmoset_storage::backup(&repo, &a.paths, &opts, &progress)?;
    drop(ticker);
    if g.json {
        print_json(
            &json!({"snapshot": id, "source": snap.source, "incomplete": snap.incomplete, "summary": &snap.summary, "backend": repo.backend().stats()}),
        )?;
    } else {
        print_summary(&repo, &id, &snap);
    }
    Ok(if snap.incomplete {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// The spinner's message, read from the engine's counters.
fn progress_line(p: Arc<Progress>) -> impl Fn() -> String + Send + 'static {
    move || {
        format!(
            "{} files, {} read, {} added, {} errors  {}",
            p.files_done.load(Ordering::Relaxed),
            bytes(p.bytes_read.load(Ordering::Relaxed)),
            bytes(p.bytes_added.load(Ordering::Relaxed)),
            p.errors.load(Ordering::Relaxed),
            p.current.lock().map(|c| c.clone()).unwrap_or_default()
        )
    }
}

fn print_summary(repo: &Repository, id: &Id, snap: &Snapshot) {
    let s = &snap.summary;
    for e in &s.errors {
        let tty = std::io::stderr().is_terminal();
        errln!("warning: {}: {}", shown(&e.path, tty), shown(&e.error, tty));
    }
    outln!(
        "files: {} new, {} changed, {} unmodified; {} dirs",
        s.files_new,
        s.files_changed,
        s.files_unmodified,
        s.dirs_total
    );
    outln!(
        "read {} of {}; added {} in {} packs ({} data blobs, {} tree blobs)",
        bytes(s.bytes_read),
        bytes(s.bytes_total),
        bytes(s.bytes_added),
        s.packs_written,
        s.data_blobs_added,
        s.tree_blobs_added
    );
    outln!("snapshot {} saved in {:.2}s", id.short(), s.duration_secs);
    print_backend_stats(repo);
    if snap.incomplete {
        errln!(
            "warning: {} files or folders could not be read; the snapshot is incomplete",
            s.errors.len()
        );
    }
}

/// Request counts and traffic of a remote repository (local ones are not
/// billed per request; `--json` has their counts too).
fn print_backend_stats(repo: &Repository) {
    if !repo.backend().is_remote() {
        return;
    }
    if let Some(s) = repo.backend().stats() {
        outln!(
            "requests: {} put, {} get, {} ranged get, {} head, {} list, {} delete, {} errors, {} retries; {} up, {} down (B2 class A {}, B {}, C {})",
            s.put, s.get, s.get_range, s.head, s.list, s.delete, s.errors, s.retries,
            bytes(s.bytes_up), bytes(s.bytes_down), s.b2_class_a, s.b2_class_b, s.b2_class_c
        );
    }
}
