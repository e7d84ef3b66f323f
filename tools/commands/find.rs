//! `marmoset find PATTERN`: files whose name (or path, when the glob holds
//! a `/`) matches, across all snapshots or the ones given. Exit code 1
//! when nothing matches, like grep.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Result;
use marmoset_storage::{FindMatch, Id, Repository, Snapshot};

use crate::cli::{FindArgs, Global};
use crate::output::print_json;
use crate::repo_open::open;
use crate::terminal::shown;

pub(super) fn run(g: &Global, a: FindArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let snaps = snapshots(&repo, &a)?;
    let matches = marmoset_storage::find(&repo, &a.pattern, &snaps)?;
    if g.json {
        print_json(&serde_json::to_value(&matches)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    print_matches(&matches, snaps.len())?;
    Ok(if matches.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The snapshots to search: those named, or all (of `--source`).
fn snapshots(repo: &Repository, a: &FindArgs) -> Result<Vec<(Id, Snapshot)>> {
    if a.snapshots.is_empty() {
        return Ok(repo
            .snapshots()?
            .0
            .into_iter()
            .filter(|(_, s)| a.source.as_ref().is_none_or(|src| &s.source == src))
            .collect());
    }
    Ok(a.snapshots
        .iter()
        .map(|s| repo.resolve_snapshot(s))
        .collect::<marmoset_storage::Result<Vec<_>>>()?)
}

fn print_matches(matches: &[FindMatch], snapshots: usize) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    for m in matches {
        writeln!(
            out,
            "{} {} {:>12} {}",
            m.snapshot.short(),
            m.time
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S"),
            m.size,
            shown(&m.path, tty)
        )?;
    }
    writeln!(out, "{} matches in {} snapshots", matches.len(), snapshots)?;
    Ok(())
}
