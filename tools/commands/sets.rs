//! `marmoset sets [describe NAME]`: the node agent's backup sets (one per
//! scheduled run, across every node), like `velero backup get` and
//! `velero backup describe`.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{bail, Result};
use marmoset_storage::BackupSet;

use crate::cli::{Global, SetsCommand};
use crate::output::print_json;
use crate::output::{errln, outln};
use crate::progress::bytes;
use crate::repo_open::open;
use crate::terminal::shown;

pub(super) fn run(g: &Global, command: Option<SetsCommand>) -> Result<ExitCode> {
    let repo = open(g)?;
    let (sets, bad) = marmoset_storage::sets(&repo, chrono::Utc::now())?;
    for b in &bad {
        errln!("warning: {b}");
    }
    match command {
        None => {
            if g.json {
                print_json(&serde_json::to_value(&sets)?)?;
            } else {
                print_table(&sets);
            }
        }
        Some(SetsCommand::Describe { name }) => {
            let Some(set) = sets.iter().find(|s| s.name == name) else {
                bail!("no backup set named {name:?} (marmoset sets lists them)");
            };
            if g.json {
                print_json(&serde_json::to_value(set)?)?;
            } else {
                describe(set);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(sets: &[BackupSet]) {
    outln!(
        "{:<28} {:<16} {:<20} {:>7} {:>7} {:>10} {:<}",
        "NAME",
        "PHASE",
        "STARTED",
        "VOLUMES",
        "FAILED",
        "READ",
        "NODES"
    );
    for s in sets {
        let failed = s.volumes.iter().filter(|v| v.phase != "Completed").count();
        outln!(
            "{:<28} {:<16} {:<20} {:>7} {:>7} {:>10} {}",
            s.name,
            s.phase,
            s.started
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S"),
            s.volumes.len(),
            failed,
            bytes(s.bytes_read),
            s.nodes.join(",")
        );
    }
}

fn describe(s: &BackupSet) {
    let tty = std::io::stdout().is_terminal();
    outln!("Name:      {}", s.name);
    outln!("Schedule:  {}", s.schedule);
    outln!("Phase:     {}", s.phase);
    outln!(
        "Started:   {}",
        s.started
            .with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S")
    );
    outln!(
        "Finished:  {}",
        s.finished
            .with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S")
    );
    if let Some(c) = s.closed {
        outln!(
            "Closed:    {}",
            c.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S")
        );
    }
    outln!("Nodes:     {}", s.nodes.join(", "));
    match &s.objects {
        Some(o) => outln!(
            "Objects:   {} saved from {} (snapshot {}){}",
            o.count,
            o.namespaces.join(", "),
            o.snapshot
                .as_deref()
                .map(|x| &x[..x.len().min(8)])
                .unwrap_or("-"),
            if o.errors.is_empty() {
                String::new()
            } else {
                format!("; {} errors", o.errors.len())
            }
        ),
        None => outln!("Objects:   none saved"),
    }
    if !s.missing_nodes.is_empty() {
        outln!("Missing:   {}", s.missing_nodes.join(", "));
    }
    outln!(
        "Data:      {} read, {} added",
        bytes(s.bytes_read),
        bytes(s.bytes_added)
    );
    outln!();
    outln!(
        "{:<44} {:<12} {:<16} {:<10} {:>10} {:>9}",
        "VOLUME",
        "NODE",
        "PHASE",
        "SNAPSHOT",
        "READ",
        "SECONDS"
    );
    for v in &s.volumes {
        outln!(
            "{:<44} {:<12} {:<16} {:<10} {:>10} {:>9.1}",
            shown(&format!("{}/{}", v.namespace, v.pvc), tty),
            shown(&v.node, tty),
            v.phase,
            v.snapshot
                .as_deref()
                .map(|id| &id[..id.len().min(8)])
                .unwrap_or("-"),
            bytes(v.bytes_read),
            v.duration_secs
        );
    }
    if !s.errors.is_empty() {
        outln!();
        outln!("Errors:");
        for e in &s.errors {
            outln!("  {}", shown(e, tty));
        }
    }
}
