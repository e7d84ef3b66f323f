//! `marmoset verify`: fail when a source's latest snapshot is older than
//! `--max-age`; with `--restore-test`, restore it to a temporary directory
//! and check every byte (`--stream`: without writing them). The weekly
//! verify job in one command.

use std::process::ExitCode;

use anyhow::Result;
use marmoset_storage::{VerifyOptions, VerifyReport};

use crate::cli::{Global, VerifyArgs};
use crate::output::outln;
use crate::output::print_json;
use crate::progress::bytes;
use crate::repo_open::open;

pub(super) fn run(g: &Global, a: VerifyArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let opts = VerifyOptions {
        max_age: marmoset_storage::parse_duration(&a.max_age)?,
        restore_test: a.restore_test,
        sources: a.sources,
        temp_dir: a.temp_dir,
        stream: a.stream,
        newest_tag: a.newest_tag,
    };
    let r = marmoset_storage::verify(&repo, &opts)?;
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        print_report(&r, opts.restore_test || opts.stream);
    }
    Ok(if r.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One PASS/FAIL line per source (with its errors), then the verdict.
fn print_report(r: &VerifyReport, restore_test: bool) {
    if let Some(set) = &r.set {
        outln!("backup set {set}");
    }
    for e in &r.errors {
        outln!("FAIL {e}");
    }
    for s in &r.sources {
        outln!(
            "{} {}: snapshot {} age {}{}",
            if s.pass { "PASS" } else { "FAIL" },
            s.source,
            s.snapshot.as_deref().map(|x| &x[..8]).unwrap_or("-"),
            s.age_hours
                .map(|h| format!("{h:.1}h"))
                .unwrap_or_else(|| "-".into()),
            if restore_test {
                format!(
                    ", restored {} files ({}), {} chunks verified",
                    s.restored_files,
                    bytes(s.restored_bytes),
                    s.verified_chunks
                )
            } else {
                String::new()
            }
        );
        for e in &s.errors {
            outln!("    {e}");
        }
    }
    outln!(
        "{}",
        if r.pass {
            "verify passed"
        } else {
            "verify FAILED"
        }
    );
}
