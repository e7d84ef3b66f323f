//! `marmoset repair index|snapshots`: rebuild the index files from the pack
//! trailers, or rewrite snapshots without their unreadable parts.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::Global;
use crate::output::print_json;
use crate::output::{errln, outln};
use crate::repo_open::open;

pub(super) fn index(g: &Global) -> Result<ExitCode> {
    let repo = open(g)?;
    let r = repo.repair_index()?;
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        outln!(
            "rebuilt index from {} packs ({} blobs): {} index files written, {} removed",
            r.packs,
            r.blobs,
            r.index_files_written,
            r.index_files_removed
        );
        for p in &r.unreadable_packs {
            errln!("warning: pack {p} has a damaged trailer and was left out of the index");
        }
        if r.blobs_salvaged > 0 {
            outln!(
                "{} blobs of those packs were whole and were copied into new packs",
                r.blobs_salvaged
            );
        }
        for b in &r.blobs_lost {
            errln!("error: blob lost: {b}");
        }
    }
    Ok(
        if r.blobs_lost.is_empty() && r.unreadable_packs.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}

pub(super) fn snapshots(g: &Global, dry_run: bool, read_data: bool) -> Result<ExitCode> {
    let repo = open(g)?;
    let r = marmoset_storage::repair_snapshots(&repo, dry_run, read_data)?;
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        // Entries are dropped from a snapshot that is then replaced; the
        // snapshot itself stays.
        let verb = if dry_run { "would drop" } else { "dropped" };
        for e in &r.removed_entries {
            outln!("{verb} from {e}");
        }
        for (old, new) in &r.repaired {
            if new.is_empty() {
                outln!("would repair snapshot {}", &old[..8]);
            } else {
                outln!("snapshot {} replaced by {}", &old[..8], &new[..8]);
            }
        }
        outln!(
            "{} snapshots checked, {} {}",
            r.snapshots_checked,
            r.repaired.len(),
            if dry_run {
                "would be repaired"
            } else {
                "repaired"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
