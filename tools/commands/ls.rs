//! `marmoset ls SNAP[:path]`: one directory of a snapshot, or everything
//! below it with `-R` (depth-first, in name order); `-l` adds mode, owner,
//! size and time, `--json` prints one JSON object per line.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Result;
use marmoset_storage::{Node, NodeKind};
use serde_json::json;

use crate::cli::{split_target, Global, LsArgs};
use crate::repo_open::open;
use crate::terminal::shown;

pub(super) fn run(g: &Global, a: LsArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let (spec, path) = split_target(&a.target);
    let (_, snap) = repo.resolve_snapshot(spec)?;
    let node = repo.find_node(&snap, path)?;
    let base = path.trim_matches('/').to_string();
    let tty = std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    let mut stack = vec![(node, base)];
    let mut first = true;
    while let Some((node, p)) = stack.pop() {
        if node.kind != NodeKind::Dir {
            emit(&mut out, g.json, &node, &p, a.long, tty)?;
            continue;
        }
        if !first && !a.recursive {
            continue;
        }
        first = false;
        let entries = repo.dir_entries(&node)?;
        let mut subdirs = Vec::new();
        for e in entries {
            let child = child_path(&p, &e);
            emit(&mut out, g.json, &e, &child, a.long, tty)?;
            if e.kind == NodeKind::Dir && a.recursive {
                subdirs.push((e, child));
            }
        }
        // Depth-first in name order: push in reverse.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(ExitCode::SUCCESS)
}

/// The printed path of entry `e` of the directory at `parent`.
fn child_path(parent: &str, e: &Node) -> String {
    if parent.is_empty() {
        format!("/{}", e.name_lossy())
    } else {
        format!("/{}/{}", parent.trim_start_matches('/'), e.name_lossy())
    }
}

fn emit(
    out: &mut impl Write,
    json: bool,
    n: &Node,
    path: &str,
    long: bool,
    tty: bool,
) -> Result<()> {
    if json {
        serde_json::to_writer(
            &mut *out,
            &json!({
                "path": path, "type": n.kind, "mode": n.mode, "uid": n.uid, "gid": n.gid,
                "size": n.size, "mtime_ns": n.mtime_ns,
                "link_target": n.link_target.as_ref().map(|t| String::from_utf8_lossy(t).into_owned()),
            }),
        )?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", node_line(n, path, long, tty))?;
    }
    Ok(())
}

fn node_line(n: &Node, path: &str, long: bool, tty: bool) -> String {
    let path = shown(path, tty);
    if !long {
        return path.into_owned();
    }
    let t = chrono::DateTime::from_timestamp_nanos(n.mtime_ns).with_timezone(&chrono::Local);
    let mut line = format!(
        "{}{:04o} {:>5} {:>5} {:>12} {} {path}",
        kind_char(n.kind),
        n.mode,
        n.uid,
        n.gid,
        n.size,
        t.format("%Y-%m-%d %H:%M:%S")
    );
    if let Some(target) = &n.link_target {
        line.push_str(" -> ");
        line.push_str(&shown(&String::from_utf8_lossy(target), tty));
    }
    line
}

/// The type letter of `ls -l`.
fn kind_char(kind: NodeKind) -> char {
    match kind {
        NodeKind::Dir => 'd',
        NodeKind::Symlink => 'l',
        NodeKind::Fifo => 'p',
        NodeKind::Socket => 's',
        NodeKind::Chardev => 'c',
        NodeKind::Blockdev => 'b',
        NodeKind::File => '-',
    }
}
