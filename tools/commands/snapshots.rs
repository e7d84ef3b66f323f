//! `marmoset snapshots`: the readable snapshots, oldest first, optionally
//! of one source or tag. Unreadable ones are warned about on stderr.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use marmoset_storage::{Id, Snapshot};
use serde_json::json;

use crate::cli::{Global, SnapshotsArgs};
use crate::output::print_json;
use crate::output::{errln, outln};
use crate::progress::bytes;
use crate::repo_open::open;
use crate::terminal::shown;

pub(super) fn run(g: &Global, a: SnapshotsArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let (snaps, bad) = repo.snapshots()?;
    for (name, e) in &bad {
        errln!("warning: snapshot {name} unreadable: {e}");
    }
    let snaps: Vec<_> = snaps
        .into_iter()
        .filter(|(_, s)| a.source.as_ref().is_none_or(|src| &s.source == src))
        .filter(|(_, s)| a.tag.as_ref().is_none_or(|t| s.tags.contains(t)))
        .collect();
    if g.json {
        let v: Vec<_> = snaps
            .iter()
            .map(|(id, s)| json!({"id": id, "snapshot": s}))
            .collect();
        print_json(&serde_json::Value::Array(v))?;
    } else {
        print_table(&snaps);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(snaps: &[(Id, Snapshot)]) {
    outln!(
        "{:<10} {:<20} {:<30} {:<16} {:>10}",
        "ID",
        "Time",
        "Source",
        "Tags",
        "Size"
    );
    // Sources and tags come from whoever wrote the snapshot.
    let tty = std::io::stdout().is_terminal();
    for (id, s) in snaps {
        outln!(
            "{:<10} {:<20} {:<30} {:<16} {:>10}{}",
            id.short(),
            s.time
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S"),
            shown(&s.source, tty),
            shown(&s.tags.join(","), tty),
            bytes(s.summary.bytes_total),
            if s.incomplete { " (incomplete)" } else { "" }
        );
    }
    outln!("{} snapshots", snaps.len());
}
