//! `marmoset maintain [--full]`: merge index files (quick), or collect
//! garbage and compact packs (full). Never takes an exclusive lock, so it
//! is safe while backups run.

use std::process::ExitCode;

use anyhow::Result;
use marmoset_storage::{MaintainOptions, MaintainReport};

use crate::cli::{Global, MaintainArgs};
use crate::output::print_json;
use crate::output::{errln, outln};
use crate::progress::{bytes, Ticker};
use crate::repo_open::open;

pub(super) fn run(g: &Global, a: MaintainArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let opts = MaintainOptions {
        full: a.full,
        safety_margin: safety_margin(&a.safety_margin)?,
        max_unused: a.max_unused,
        dry_run: a.dry_run,
    };
    let ticker = Ticker::start(!g.quiet && !g.json, || "maintaining".to_string());
    let r = marmoset_storage::maintain(&repo, &opts)?;
    drop(ticker);
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        print_report(&r);
    }
    if r.damaged_blobs.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for d in &r.damaged_blobs {
        errln!("warning: {d}");
    }
    errln!(
        "warning: {} damaged blobs were left where they are; `marmoset check --read-data` \
         names the snapshots affected, `marmoset repair snapshots` drops the files that use them",
        r.damaged_blobs.len()
    );
    Ok(ExitCode::from(1))
}

/// `--safety-margin`: the engine's duration syntax, plus `0`/`0s` (tests
/// and operators who know no backup is running), which it refuses as a
/// retention span.
fn safety_margin(s: &str) -> Result<std::time::Duration> {
    Ok(match s {
        "0" | "0s" => std::time::Duration::ZERO,
        s => marmoset_storage::parse_duration(s)?.to_std()?,
    })
}

fn print_report(r: &MaintainReport) {
    outln!(
        "{} maintenance{} in {:.2}s (peak memory {})",
        if r.full { "full" } else { "quick" },
        if r.dry_run { " (dry run)" } else { "" },
        r.duration_secs,
        bytes(r.peak_rss_kib * 1024)
    );
    outln!(
        "  index files: {} -> {}",
        r.index_files_before,
        r.index_files_after
    );
    if r.full {
        print_full(r);
    }
    if r.leases_removed > 0 {
        outln!("  removed {} stale leases", r.leases_removed);
    }
}

/// What only a full run does: marking, rewriting and deleting packs.
fn print_full(r: &MaintainReport) {
    outln!(
        "  snapshots: {}, trees walked: {}, blobs marked: {}",
        r.snapshots,
        r.trees_walked,
        r.blobs_marked
    );
    outln!(
        "  packs: {} total, {} rewritten ({} new), {} planned for deletion ({})",
        r.packs_total,
        r.packs_rewritten,
        r.packs_written,
        r.packs_planned,
        bytes(r.bytes_planned)
    );
    outln!(
        "  earlier plans: {} packs deleted ({} reclaimed), {} rescued, {} plans deferred",
        r.packs_deleted,
        bytes(r.bytes_reclaimed),
        r.packs_rescued,
        r.plans_deferred
    );
}
