//! `marmoset restore SNAP[:path]`: a snapshot, or a path in it, into a
//! directory. `latest` with `--source`/`--tag` picks the newest complete
//! snapshot that matches, so an operator restores a volume by its name.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use marmoset_storage::{
    Id, Repository, RestoreOptions, RestoreProgress, RestoreSummary, Snapshot, SnapshotFilter,
};
use serde_json::json;

use crate::cli::{split_target, Global, RestoreArgs};
use crate::output::print_json;
use crate::output::{errln, outln};
use crate::progress::{bytes, Ticker};
use crate::repo_open::open;
use crate::terminal::shown;

pub(super) fn run(g: &Global, a: RestoreArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let (spec, path) = split_target(&a.snapshot);
    let (id, snap) = pick_snapshot(&repo, spec, &a)?;
    if snap.incomplete {
        // A repaired snapshot (parts dropped as unreadable) or one saved
        // with files missing: say so before an exit status of 0 does not.
        errln!(
            "warning: snapshot {} is incomplete (tags: {}): what it still holds is restored, \
             and dropped parts are not",
            id.short(),
            snap.tags.join(",")
        );
    }
    let opts = RestoreOptions {
        includes: a.includes,
        excludes: a.excludes,
        threads: a.threads,
        no_owner: a.no_owner,
        no_special: a.no_special,
        no_xattrs: a.no_xattrs,
        overwrite: a.overwrite,
        delete: a.delete,
    };
    let progress = Arc::new(RestoreProgress::default());
    let ticker = Ticker::start(
        !g.quiet && !g.json,
        progress_line(progress.clone(), snap.summary.bytes_total),
    );
    let summary = marmoset_storage::restore(&repo, &snap, path, &a.target, &opts, &progress)?;
    drop(ticker);
    if g.json {
        print_json(
            &json!({"snapshot": id, "incomplete": snap.incomplete, "summary": summary, "backend": repo.backend().stats()}),
        )?;
    } else {
        print_summary(&summary, &a.target);
    }
    if !summary.errors.is_empty() {
        errln!("{} files could not be restored", summary.errors.len());
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

/// `spec` resolved; `latest` with a source or tags is the newest complete
/// snapshot matching them.
fn pick_snapshot(repo: &Repository, spec: &str, a: &RestoreArgs) -> Result<(Id, Snapshot)> {
    if spec != "latest" || (a.source.is_none() && a.tags.is_empty()) {
        return Ok(repo.resolve_snapshot(spec)?);
    }
    let filter = SnapshotFilter {
        sources: a.source.iter().cloned().collect(),
        tags: a.tags.clone(),
    };
    let (snaps, _) = repo.snapshots()?;
    snaps
        .into_iter()
        .rev()
        .find(|(_, s)| filter.matches(s) && !s.incomplete)
        .with_context(|| {
            format!(
                "no complete snapshot of source {:?} with tags {:?}",
                a.source.as_deref().unwrap_or("*"),
                a.tags
            )
        })
}

/// The spinner's message: files and bytes written of the snapshot's total.
fn progress_line(p: Arc<RestoreProgress>, total: u64) -> impl Fn() -> String + Send + 'static {
    move || {
        format!(
            "{} files, {} of {}",
            p.files_done.load(Ordering::Relaxed),
            bytes(p.bytes_written.load(Ordering::Relaxed)),
            bytes(total)
        )
    }
}

fn print_summary(summary: &RestoreSummary, target: &std::path::Path) {
    let tty = std::io::stderr().is_terminal();
    for e in &summary.errors {
        errln!("error: {}: {}", shown(&e.path, tty), shown(&e.error, tty));
    }
    if !summary.skipped.is_empty() {
        errln!(
            "skipped {} fifos and device files (--no-special)",
            summary.skipped.len()
        );
    }
    outln!(
        "restored {} files, {} dirs, {} links, {} in {:.2}s to {}",
        summary
            .files
            .saturating_sub(summary.files_unchanged + summary.files_failed),
        summary.dirs,
        summary.links,
        bytes(summary.bytes),
        summary.duration_secs,
        target.display()
    );
    let others = [
        (summary.files_unchanged, "files already correct"),
        (
            summary.files_kept,
            "existing files kept unchecked (--overwrite never)",
        ),
        (summary.files_failed, "files failed"),
        (summary.deleted, "entries deleted"),
    ];
    let others: Vec<String> = others
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    if !others.is_empty() {
        outln!("{}", others.join(", "));
    }
    outln!(
        "downloaded {} in {} reads of {} packs ({} blobs)",
        bytes(summary.bytes_downloaded),
        summary.requests,
        summary.packs,
        summary.blobs_fetched
    );
}
