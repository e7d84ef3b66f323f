//! `marmoset copy`: snapshots of another repository (`--from-repo`) into
//! this one (`--repo`), re-encrypted for this repository's key.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Result};
use marmoset_storage::{
    CopyOptions, CopyReport, Error as StorageError, Id, Progress, Repository, Snapshot,
};
use serde_json::json;

use crate::cli::{CopyArgs, Global};
use crate::output::print_json;
use crate::output::{errln, outln};
use crate::progress::{bytes, Ticker};
use crate::repo_open::{open_from, open_target};

pub(super) fn run(g: &Global, a: CopyArgs) -> Result<ExitCode> {
    let src = open_from(g, &a.from)?;
    let dst = open_target(g)?;
    let (snaps, unreadable) = select(&src, &a)?;
    let opts = CopyOptions {
        dry_run: a.dry_run,
        threads: a.threads,
    };
    let progress = Arc::new(Progress::default());
    let ticker = Ticker::start(!g.quiet && !g.json, progress_line(progress.clone()));
    let report = marmoset_storage::copy(&src, &dst, snaps, &opts, &progress)?;
    drop(ticker);
    if g.json {
        let mut v = serde_json::to_value(&report)?;
        v["unreadable"] = json!(unreadable
            .iter()
            .map(|(name, e)| json!({"source_id": name, "error": e}))
            .collect::<Vec<_>>());
        v["backend"] = json!({
            "source": src.backend().stats(),
            "target": dst.backend().stats(),
        });
        print_json(&v)?;
    } else {
        print_report(&report, &src, &dst);
    }
    for f in &report.failed {
        errln!(
            "error: snapshot {} not copied: {}",
            &f.source_id[..8],
            f.error.as_deref().unwrap_or("")
        );
    }
    for (name, e) in &unreadable {
        errln!("error: source snapshot {name} unreadable, not copied: {e}");
    }
    Ok(if report.failed.is_empty() && unreadable.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A source snapshot file that could not be read, and why.
type Unreadable = (String, String);
/// A source snapshot to copy.
type Chosen = (Id, Snapshot);

/// The source snapshots named (ids, prefixes, `latest`: the newest that
/// the filters select) or, with none named, all of them, narrowed by
/// `--source`, `--host` and `--tag` (every tag given must be present; a
/// backup set is `--tag set=NAME`); and the snapshot files of the source
/// that could not be read (damaged: not copied, reported as failures).
fn select(src: &Repository, a: &CopyArgs) -> Result<(Vec<Chosen>, Vec<Unreadable>)> {
    let (all, bad) = src.snapshots()?;
    let unreadable: Vec<Unreadable> = bad
        .into_iter()
        .map(|(name, e)| (name, e.to_string()))
        .collect();
    let wanted = |s: &Snapshot| {
        (a.sources.is_empty() || a.sources.contains(&s.source))
            && (a.hosts.is_empty() || a.hosts.contains(&s.hostname))
            && a.tags.iter().all(|t| s.tags.contains(t))
    };
    if a.snapshots.is_empty() {
        let chosen = all.into_iter().filter(|(_, s)| wanted(s)).collect();
        return Ok((chosen, unreadable));
    }
    let mut chosen: Vec<Chosen> = Vec::new();
    let mut failed: Vec<Unreadable> = Vec::new();
    for spec in &a.snapshots {
        let found = if spec == "latest" {
            // An unreadable snapshot may be newer than the one found: the
            // run reports them and fails, rather than pass for up to date.
            failed.extend(unreadable.iter().cloned());
            // Snapshots are listed oldest first.
            match all.iter().rev().find(|(_, s)| wanted(s)) {
                Some(f) => f.clone(),
                None => bail!("no snapshot of the source repository matches the filters"),
            }
        } else {
            let found = match src.resolve_snapshot(spec) {
                Ok(f) => f,
                // A damaged snapshot named by id fails alone.
                Err(e @ (StorageError::Corrupt { .. } | StorageError::Decrypt { .. })) => {
                    failed.push((spec.clone(), e.to_string()));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if !wanted(&found.1) {
                bail!("source snapshot {spec} does not match the filters");
            }
            found
        };
        if !chosen.iter().any(|(id, _)| *id == found.0) {
            chosen.push(found);
        }
    }
    failed.sort();
    failed.dedup();
    Ok((chosen, failed))
}

fn progress_line(p: Arc<Progress>) -> impl Fn() -> String + Send + 'static {
    move || {
        format!(
            "copying: {} read, {} added",
            bytes(p.bytes_read.load(Ordering::Relaxed)),
            bytes(p.bytes_added.load(Ordering::Relaxed)),
        )
    }
}

fn print_report(r: &CopyReport, src: &Repository, dst: &Repository) {
    let verb = if r.dry_run { "would copy" } else { "copied" };
    for s in &r.copied {
        outln!(
            "{verb} {} {} {}{}",
            &s.source_id[..8],
            s.time.format("%Y-%m-%d %H:%M:%S"),
            s.source,
            s.target_id
                .as_deref()
                .map(|t| format!(" -> {}", &t[..8]))
                .unwrap_or_default()
        );
    }
    outln!(
        "{} snapshots {verb}, {} already in the target, {} failed",
        r.copied.len(),
        r.skipped.len(),
        r.failed.len()
    );
    if r.dry_run {
        outln!(
            "at most {} ({} blobs) to read from the source; {} blobs known from earlier copies",
            bytes(r.bytes_read),
            r.data_blobs_read,
            r.data_blobs_known
        );
        return;
    }
    outln!(
        "read {} ({} blobs) from the source; {} blobs known from earlier copies",
        bytes(r.bytes_read),
        r.data_blobs_read,
        r.data_blobs_known
    );
    outln!(
        "added {} in {} packs ({} data blobs, {} tree blobs)",
        bytes(r.bytes_added),
        r.packs_written,
        r.data_blobs_added,
        r.tree_blobs_added
    );
    for (side, repo) in [("source", src), ("target", dst)] {
        if !repo.backend().is_remote() {
            continue;
        }
        if let Some(s) = repo.backend().stats() {
            outln!(
                "{side} requests: {} put, {} get, {} ranged get, {} list; {} up, {} down",
                s.put,
                s.get,
                s.get_range,
                s.list,
                bytes(s.bytes_up),
                bytes(s.bytes_down)
            );
        }
    }
}
