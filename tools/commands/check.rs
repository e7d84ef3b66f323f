//! `marmoset check`: the repository's structure, and with `--read-data`
//! (or a `--read-data-subset`) every blob of the packs read.

use std::process::ExitCode;

use anyhow::Result;
use marmoset_storage::{CheckReport, ReadData};

use crate::cli::{CheckArgs, Global};
use crate::output::outln;
use crate::output::print_json;
use crate::progress::{bytes, Ticker};
use crate::repo_open::open;

pub(super) fn run(g: &Global, a: CheckArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let read = match (&a.read_data_subset, a.read_data) {
        (Some(s), _) => ReadData::parse_subset(s)?,
        (None, true) => ReadData::All,
        (None, false) => ReadData::None,
    };
    let ticker = Ticker::start(!g.quiet && !g.json, || "checking".to_string());
    let r = marmoset_storage::check(&repo, read)?;
    drop(ticker);
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        print_report(&r);
    }
    Ok(if r.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_report(r: &CheckReport) {
    outln!(
        "checked {} keys, {} index files, {} packs, {} snapshots, {} trees, {} data blobs",
        r.keys,
        r.index_files,
        r.packs,
        r.snapshots,
        r.trees,
        r.data_blobs_referenced
    );
    if r.packs_read > 0 {
        outln!(
            "read {} packs ({}), {} of {} blobs authenticated",
            r.packs_read,
            bytes(r.bytes_read),
            r.blobs_ok,
            r.blobs_read
        );
    }
    for w in &r.warnings {
        outln!("warning: {w}");
    }
    for e in &r.errors {
        outln!("error: {e}");
    }
    outln!(
        "{}",
        if r.ok() {
            "no errors found"
        } else {
            "repository has errors"
        }
    );
}
