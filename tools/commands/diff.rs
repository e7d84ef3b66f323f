//! `marmoset diff FROM TO`: paths added (+), removed (-) and modified (M)
//! between two snapshots; `--metadata` adds metadata-only changes (U).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Result;
use marmoset_storage::{Change, DiffEntry, NodeKind};

use crate::cli::{DiffArgs, Global};
use crate::output::print_json;
use crate::repo_open::open;
use crate::terminal::shown;

pub(super) fn run(g: &Global, a: DiffArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let (_, from) = repo.resolve_snapshot(&a.from)?;
    let (_, to) = repo.resolve_snapshot(&a.to)?;
    let entries: Vec<_> = marmoset_storage::diff(&repo, &from, &to)?
        .into_iter()
        .filter(|e| a.metadata || e.change != Change::Metadata)
        .collect();
    if g.json {
        print_json(&serde_json::to_value(&entries)?)?;
    } else {
        print_entries(&entries)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per change, then the counts.
fn print_entries(entries: &[DiffEntry]) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    let (mut added, mut removed, mut modified) = (0, 0, 0);
    for e in entries {
        let sign = match e.change {
            Change::Added => {
                added += 1;
                "+"
            }
            Change::Removed => {
                removed += 1;
                "-"
            }
            Change::Modified => {
                modified += 1;
                "M"
            }
            Change::Metadata => "U",
        };
        let slash = if e.kind == NodeKind::Dir { "/" } else { "" };
        writeln!(out, "{sign}    {}{slash}", shown(&e.path, tty))?;
    }
    writeln!(out, "{added} added, {removed} removed, {modified} modified")?;
    Ok(())
}
