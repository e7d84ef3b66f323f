//! `marmoset stats`: the engine's repository statistics
//! (`marmoset_storage::stats`), or one snapshot's summary with
//! `--snapshot`.

use std::process::ExitCode;

use anyhow::Result;
use marmoset_storage::{Repository, StatsReport};
use serde_json::json;

use crate::cli::{Global, StatsArgs};
use crate::output::outln;
use crate::output::print_json;
use crate::progress::bytes;
use crate::repo_open::open;

pub(super) fn run(g: &Global, a: StatsArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    if let Some(spec) = a.snapshot {
        return snapshot(g, &repo, &spec);
    }
    let r = marmoset_storage::stats(&repo)?;
    if g.json {
        print_json(&report_json(&r))?;
    } else {
        print_report(&r);
    }
    Ok(ExitCode::SUCCESS)
}

/// One snapshot's summary, as recorded when it was taken.
fn snapshot(g: &Global, repo: &Repository, spec: &str) -> Result<ExitCode> {
    let (id, s) = repo.resolve_snapshot(spec)?;
    if g.json {
        print_json(&json!({"snapshot": id, "summary": s.summary}))?;
    } else {
        let m = &s.summary;
        outln!("snapshot {} of {} at {}", id.short(), s.source, s.time);
        outln!(
            "  files: {}  dirs: {}  size: {}",
            m.files_total,
            m.dirs_total,
            bytes(m.bytes_total)
        );
        outln!(
            "  added when taken: {}  took {:.2}s",
            bytes(m.bytes_added),
            m.duration_secs
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The `--json` document: the report without the repository id, which
/// the JSON output has never carried.
fn report_json(r: &StatsReport) -> serde_json::Value {
    json!({
        "snapshots": r.snapshots, "packs": r.packs, "pack_bytes": r.pack_bytes,
        "data_blobs": r.data_blobs, "tree_blobs": r.tree_blobs, "raw_bytes": r.raw_bytes,
        "stored_blob_bytes": r.stored_blob_bytes,
        "logical_bytes_all_snapshots": r.logical_bytes_all_snapshots,
        "dedup_ratio": r.dedup_ratio, "compression_ratio": r.compression_ratio,
    })
}

fn print_report(r: &StatsReport) {
    outln!("repository {}", r.repository_id.short());
    outln!("  snapshots:          {}", r.snapshots);
    outln!(
        "  packs:              {} ({})",
        r.packs,
        bytes(r.pack_bytes)
    );
    outln!(
        "  blobs:              {} data, {} tree",
        r.data_blobs,
        r.tree_blobs
    );
    outln!(
        "  unique data:        {} ({} stored)",
        bytes(r.raw_bytes),
        bytes(r.stored_blob_bytes)
    );
    outln!(
        "  all snapshots size: {}",
        bytes(r.logical_bytes_all_snapshots)
    );
    outln!("  dedup ratio:        {:.2}x", r.dedup_ratio);
    outln!("  compression ratio:  {:.2}x", r.compression_ratio);
}
