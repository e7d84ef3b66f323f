//! One function per command: validate arguments, call the engine, print.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use marmoset_storage::backend::fs::FsBackend;
use marmoset_storage::backend::{Backend, FileKind};
use marmoset_storage::{Config, Id, Node, NodeKind, OpenOptions, Repository};
use serde_json::json;

use crate::cli::*;
use crate::progress::{bytes, Ticker};
use crate::terminal::shown;

pub fn run(cli: Cli) -> Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Init(a) => init(g, a),
        Command::Backup(a) => backup(g, a),
        Command::Snapshots(a) => snapshots(g, a),
        Command::Ls(a) => ls(g, a),
        Command::Restore(a) => restore(g, a),
        Command::Cat(a) => cat(g, a),
        Command::Stats(a) => stats(g, a),
        Command::Forget(a) => forget(g, a),
        Command::Maintain(a) => maintain(g, a),
        Command::Check(a) => check(g, a),
        Command::Verify(a) => verify(g, a),
        Command::Mount(a) => mount(g, a),
        Command::Agent(a) => crate::agent::run(g, a),
        Command::Diff(a) => diff(g, a),
        Command::Find(a) => find(g, a),
        Command::Key { command } => key(g, command),
        Command::Repair { command } => match command {
            RepairCommand::Index => repair_index(g),
            RepairCommand::Snapshots { dry_run } => repair_snapshots(g, dry_run),
        },
    }
}

fn open_backend(g: &Global) -> Result<Arc<dyn Backend>> {
    let Some(repo) = g.repo.as_deref() else {
        bail!("no repository given: use --repo or MARMOSET_REPOSITORY");
    };
    if repo.starts_with("s3:") {
        let mut o = marmoset_storage::backend::s3::S3Options::from_url(repo)?;
        if let Some(r) = g
            .s3_region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
        {
            o.region = r;
        }
        o.path_style = g.s3_path_style;
        o.checksums_when_required = match g.s3_checksums.as_str() {
            "when_required" => true,
            "when_supported" => false,
            other => bail!("--s3-checksums {other:?}: use when_required or when_supported"),
        };
        o.connections = g.s3_connections.max(1);
        o.multipart_threshold = g.s3_multipart_mib.max(5) << 20;
        o.part_size = o.multipart_threshold.clamp(5 << 20, 16 << 20);
        o.limit_upload = g.limit_upload.map(|k| k * 1024);
        let s3: Arc<dyn Backend> = Arc::new(marmoset_storage::backend::s3::S3Backend::new(o)?);
        // Index files and snapshots are immutable: keep local copies.
        let root = g.cache_dir.clone().unwrap_or_else(default_cache_root);
        let dir = root
            .join("objects")
            .join(Id::of_bytes(s3.location().as_bytes()).short());
        return Ok(Arc::new(
            marmoset_storage::backend::cache::CachedBackend::new(s3, dir),
        ));
    }
    let path = repo.strip_prefix("local:").unwrap_or(repo);
    Ok(Arc::new(FsBackend::new(path)))
}

/// The engine's default, so both caches share one root: with no home it is
/// a per-user folder in the temporary directory, never a shared name there;
/// the engine checks the root is this user's own before the repository
/// opens.
fn default_cache_root() -> std::path::PathBuf {
    OpenOptions::default_cache_root()
}

fn print_backend_stats(repo: &Repository) {
    if let Some(s) = repo.backend().stats() {
        println!(
            "requests: {} put, {} get, {} head, {} list, {} delete, {} multipart, {} retries; {} up, {} down (B2 class A {}, B {}, C {})",
            s.put, s.get, s.head, s.list, s.delete, s.multipart, s.retries,
            bytes(s.bytes_up), bytes(s.bytes_down), s.b2_class_a, s.b2_class_b, s.b2_class_c
        );
    }
}

fn read_password_file(path: &std::path::Path) -> Result<Vec<u8>> {
    let raw =
        std::fs::read(path).with_context(|| format!("reading password file {}", path.display()))?;
    let line = raw.split(|&b| b == b'\n').next().unwrap_or(&[]);
    Ok(line.strip_suffix(b"\r").unwrap_or(line).to_vec())
}

fn password(g: &Global, confirm: bool) -> Result<Vec<u8>> {
    if let Some(p) = &g.password_file {
        return read_password_file(p);
    }
    if let Ok(p) = std::env::var("MARMOSET_PASSWORD") {
        return Ok(p.into_bytes());
    }
    prompt("repository password", confirm)
}

fn prompt(what: &str, confirm: bool) -> Result<Vec<u8>> {
    let p = rpassword::prompt_password(format!("enter {what}: "))
        .context("reading password from the terminal")?;
    if confirm {
        let again = rpassword::prompt_password(format!("enter {what} again: "))?;
        if again != p {
            bail!("passwords do not match");
        }
    }
    if p.is_empty() {
        bail!("empty password");
    }
    Ok(p.into_bytes())
}

fn new_password(a: &NewPassword) -> Result<Vec<u8>> {
    match &a.new_password_file {
        Some(p) => read_password_file(p),
        None => prompt("new password", true),
    }
}

fn open_opts(g: &Global) -> OpenOptions {
    OpenOptions {
        cache_root: g.cache_dir.clone(),
    }
}

pub(crate) fn open(g: &Global) -> Result<Repository> {
    let backend = open_backend(g)?;
    let pw = password(g, false)?;
    Ok(Repository::open(backend, &pw, &open_opts(g))?)
}

pub(crate) fn print_json(v: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn init(g: &Global, a: InitArgs) -> Result<ExitCode> {
    let backend = open_backend(g)?;
    let mut config = Config::new();
    if let Some(avg) = a.chunk_size {
        if !(256..=(4 << 20)).contains(&avg) || !avg.is_multiple_of(4) {
            bail!("--chunk-size must be a multiple of 4 between 256 and 4194304");
        }
        config.chunker.avg_size = avg;
        config.chunker.min_size = (avg / 4).max(64);
        config.chunker.max_size = avg * 4;
    }
    if let Some(p) = a.pack_size_mib {
        config.pack_size = p.clamp(1, 1024) << 20;
    }
    if let Some(c) = a.compression {
        config.compression_level = c.clamp(0, 22);
    }
    let pw = password(g, true)?;
    let repo = Repository::init(backend.clone(), &pw, config, &open_opts(g))?;
    if g.json {
        print_json(
            &json!({"repository_id": repo.config().repository_id, "location": backend.location()}),
        )?;
    } else {
        println!(
            "created repository {} at {}",
            repo.config().repository_id.short(),
            backend.location()
        );
        println!("keep the password safe: data cannot be recovered without it");
    }
    Ok(ExitCode::SUCCESS)
}

fn backup(g: &Global, a: BackupArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let opts = marmoset_storage::BackupOptions {
        source: a.source,
        tags: a.tags,
        excludes: a.excludes,
        threads: a.threads,
        force_read: a.force,
        uploaders: None,
        hostname: a.host,
    };
    let progress = Arc::new(marmoset_storage::Progress::default());
    let p = progress.clone();
    let ticker = Ticker::start(!g.quiet && !g.json, move || {
        format!(
            "{} files, {} read, {} added, {} errors  {}",
            p.files_done.load(Ordering::Relaxed),
            bytes(p.bytes_read.load(Ordering::Relaxed)),
            bytes(p.bytes_added.load(Ordering::Relaxed)),
            p.errors.load(Ordering::Relaxed),
            p.current.lock().map(|c| c.clone()).unwrap_or_default()
        )
    });
    let (id, snap) = marmoset_storage::backup(&repo, &a.paths, &opts, &progress)?;
    drop(ticker);
    let s = &snap.summary;
    if g.json {
        print_json(
            &json!({"snapshot": id, "source": snap.source, "incomplete": snap.incomplete, "summary": s, "backend": repo.backend().stats()}),
        )?;
    } else {
        for e in &s.errors {
            let tty = std::io::stderr().is_terminal();
            eprintln!("warning: {}: {}", shown(&e.path, tty), shown(&e.error, tty));
        }
        println!(
            "files: {} new, {} changed, {} unmodified; {} dirs",
            s.files_new, s.files_changed, s.files_unmodified, s.dirs_total
        );
        println!(
            "read {} of {}; added {} in {} packs ({} data blobs, {} tree blobs)",
            bytes(s.bytes_read),
            bytes(s.bytes_total),
            bytes(s.bytes_added),
            s.packs_written,
            s.data_blobs_added,
            s.tree_blobs_added
        );
        println!("snapshot {} saved in {:.2}s", id.short(), s.duration_secs);
        print_backend_stats(&repo);
        if snap.incomplete {
            eprintln!(
                "warning: {} files or folders could not be read; the snapshot is incomplete",
                s.errors.len()
            );
        }
    }
    Ok(if snap.incomplete {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn snapshots(g: &Global, a: SnapshotsArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let (snaps, bad) = repo.snapshots()?;
    for (name, e) in &bad {
        eprintln!("warning: snapshot {name} unreadable: {e}");
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
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:<20} {:<30} {:<16} {:>10}",
        "ID", "Time", "Source", "Tags", "Size"
    );
    // Sources and tags come from whoever wrote the snapshot.
    let tty = std::io::stdout().is_terminal();
    for (id, s) in &snaps {
        println!(
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
    println!("{} snapshots", snaps.len());
    Ok(ExitCode::SUCCESS)
}

fn split_target(t: &str) -> (&str, &str) {
    match t.split_once(':') {
        Some((s, p)) => (s, p),
        None => (t, ""),
    }
}

fn node_line(n: &Node, path: &str, long: bool, tty: bool) -> String {
    let path = shown(path, tty);
    if !long {
        return path.into_owned();
    }
    let kind = match n.kind {
        NodeKind::Dir => 'd',
        NodeKind::Symlink => 'l',
        NodeKind::Fifo => 'p',
        NodeKind::Socket => 's',
        NodeKind::Chardev => 'c',
        NodeKind::Blockdev => 'b',
        NodeKind::File => '-',
    };
    let t = chrono::DateTime::from_timestamp_nanos(n.mtime_ns).with_timezone(&chrono::Local);
    let mut line = format!(
        "{kind}{:04o} {:>5} {:>5} {:>12} {} {path}",
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

fn ls(g: &Global, a: LsArgs) -> Result<ExitCode> {
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
            let child = if p.is_empty() {
                format!("/{}", e.name_lossy())
            } else {
                format!("/{}/{}", p.trim_start_matches('/'), e.name_lossy())
            };
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

fn restore(g: &Global, a: RestoreArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let (spec, path) = split_target(&a.snapshot);
    let (id, snap) = if spec == "latest" && (a.source.is_some() || !a.tags.is_empty()) {
        let filter = marmoset_storage::SnapshotFilter {
            sources: a.source.iter().cloned().collect(),
            tags: a.tags.clone(),
        };
        let (snaps, _) = repo.snapshots()?;
        snaps
            .into_iter()
            .rev()
            .find(|(_, s)| filter.matches(s) && !s.incomplete)
            .with_context(|| {
                format!(
                    "no complete snapshot of source {:?} with tags {:?}",
                    a.source.as_deref().unwrap_or("*"),
                    a.tags
                )
            })?
    } else {
        repo.resolve_snapshot(spec)?
    };
    let opts = marmoset_storage::RestoreOptions {
        includes: a.includes,
        excludes: a.excludes,
        threads: a.threads,
        no_owner: a.no_owner,
        no_special: a.no_special,
        no_xattrs: a.no_xattrs,
    };
    let progress = Arc::new(marmoset_storage::RestoreProgress::default());
    let p = progress.clone();
    let total = snap.summary.bytes_total;
    let ticker = Ticker::start(!g.quiet && !g.json, move || {
        format!(
            "{} files, {} of {}",
            p.files_done.load(Ordering::Relaxed),
            bytes(p.bytes_written.load(Ordering::Relaxed)),
            bytes(total)
        )
    });
    let summary = marmoset_storage::restore(&repo, &snap, path, &a.target, &opts, &progress)?;
    drop(ticker);
    if g.json {
        print_json(
            &json!({"snapshot": id, "summary": summary, "backend": repo.backend().stats()}),
        )?;
    } else {
        let tty = std::io::stderr().is_terminal();
        for e in &summary.errors {
            eprintln!("error: {}: {}", shown(&e.path, tty), shown(&e.error, tty));
        }
        if !summary.skipped.is_empty() {
            eprintln!(
                "skipped {} fifos and device files (--no-special)",
                summary.skipped.len()
            );
        }
        println!(
            "restored {} files, {} dirs, {} links, {} in {:.2}s to {}",
            summary.files,
            summary.dirs,
            summary.links,
            bytes(summary.bytes),
            summary.duration_secs,
            a.target.display()
        );
    }
    if !summary.errors.is_empty() {
        eprintln!("{} files could not be restored", summary.errors.len());
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

fn cat(g: &Global, a: CatArgs) -> Result<ExitCode> {
    let need_id = || a.id.clone().context("this object needs an id argument");
    match a.kind.as_str() {
        "config" => {
            let repo = open(g)?;
            print_json(&serde_json::to_value(repo.config())?)?;
        }
        "keys" => {
            let repo = open(g)?;
            print_json(&serde_json::to_value(repo.list_keys()?)?)?;
        }
        "snapshot" => {
            let repo = open(g)?;
            let (id, s) = repo.resolve_snapshot(&need_id()?)?;
            print_json(&json!({"id": id, "snapshot": s}))?;
        }
        "tree" => {
            let repo = open(g)?;
            let target = need_id()?;
            let (spec, path) = split_target(&target);
            let node = match Id::from_hex(spec) {
                Some(tree_id) if path.is_empty() => {
                    let mut n = Node::new(Vec::new(), NodeKind::Dir);
                    n.subtree = vec![tree_id];
                    n
                }
                _ => {
                    let (_, snap) = repo.resolve_snapshot(spec)?;
                    repo.find_node(&snap, path)?
                }
            };
            let entries = repo.dir_entries(&node)?;
            print_json(&serde_json::to_value(
                entries.iter().map(node_json).collect::<Vec<_>>(),
            )?)?;
        }
        "index" => {
            let repo = open(g)?;
            let packs = repo.load_index_file(&need_id()?)?;
            print_json(&packs_json(&packs))?;
        }
        "pack" => {
            let repo = open(g)?;
            let id = need_id()?;
            let size = repo.backend().size(FileKind::Pack, &id)?;
            let entries = repo.read_pack_trailer(&id, size)?;
            let pid = Id::from_hex(&id).unwrap_or_default();
            print_json(&packs_json(&[(pid, entries)]))?;
        }
        "blob" => {
            let repo = open(g)?;
            let id = Id::from_hex(&need_id()?).context("blob id must be 64 hex digits")?;
            std::io::stdout().write_all(&repo.load_blob(&id)?)?;
        }
        other => {
            bail!("unknown object kind {other:?} (config, keys, snapshot, tree, index, pack, blob)")
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn node_json(n: &Node) -> serde_json::Value {
    json!({
        "name": n.name_lossy(), "type": n.kind, "mode": n.mode, "uid": n.uid, "gid": n.gid,
        "mtime_ns": n.mtime_ns, "size": n.size, "content": n.content, "indirect": n.indirect,
        "subtree": n.subtree, "link_target": n.link_target.as_ref().map(|t| String::from_utf8_lossy(t).into_owned()),
        "inode": n.inode, "links": n.links, "xattrs": n.xattrs.len(),
    })
}

fn packs_json(packs: &[(Id, Vec<marmoset_storage::PackEntry>)]) -> serde_json::Value {
    serde_json::Value::Array(
        packs
            .iter()
            .map(|(p, es)| {
                json!({"pack": p, "blobs": es.iter().map(|e| json!({
                    "id": e.id, "type": format!("{:?}", e.kind).to_lowercase(), "offset": e.offset,
                    "length": e.length, "raw_length": e.raw_length, "compressed": e.flags & 1 != 0,
                })).collect::<Vec<_>>()})
            })
            .collect(),
    )
}

fn stats(g: &Global, a: StatsArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    if let Some(spec) = a.snapshot {
        let (id, s) = repo.resolve_snapshot(&spec)?;
        if g.json {
            print_json(&json!({"snapshot": id, "summary": s.summary}))?;
        } else {
            let m = &s.summary;
            println!("snapshot {} of {} at {}", id.short(), s.source, s.time);
            println!(
                "  files: {}  dirs: {}  size: {}",
                m.files_total,
                m.dirs_total,
                bytes(m.bytes_total)
            );
            println!(
                "  added when taken: {}  took {:.2}s",
                bytes(m.bytes_added),
                m.duration_secs
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (snaps, _) = repo.snapshots()?;
    let packs = repo.backend().list(FileKind::Pack)?;
    let pack_bytes: u64 = packs.iter().map(|(_, s)| s).sum();
    let (mut data, mut trees, mut raw, mut stored) = (0u64, 0u64, 0u64, 0u64);
    repo.index().for_each_blob(|_, loc| {
        if loc.kind == 0 {
            data += 1;
        } else {
            trees += 1;
        }
        raw += u64::from(loc.raw_length);
        stored += u64::from(loc.length);
    })?;
    let logical: u64 = snaps.iter().map(|(_, s)| s.summary.bytes_total).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    if g.json {
        print_json(&json!({
            "snapshots": snaps.len(), "packs": packs.len(), "pack_bytes": pack_bytes,
            "data_blobs": data, "tree_blobs": trees, "raw_bytes": raw, "stored_blob_bytes": stored,
            "logical_bytes_all_snapshots": logical,
            "dedup_ratio": ratio(logical, raw), "compression_ratio": ratio(raw, stored),
        }))?;
    } else {
        println!("repository {}", repo.config().repository_id.short());
        println!("  snapshots:          {}", snaps.len());
        println!(
            "  packs:              {} ({})",
            packs.len(),
            bytes(pack_bytes)
        );
        println!("  blobs:              {data} data, {trees} tree");
        println!(
            "  unique data:        {} ({} stored)",
            bytes(raw),
            bytes(stored)
        );
        println!("  all snapshots size: {}", bytes(logical));
        println!("  dedup ratio:        {:.2}x", ratio(logical, raw));
        println!("  compression ratio:  {:.2}x", ratio(raw, stored));
    }
    Ok(ExitCode::SUCCESS)
}

fn key(g: &Global, c: KeyCommand) -> Result<ExitCode> {
    let mut repo = open(g)?;
    match c {
        KeyCommand::Add(a) => {
            let id = repo.add_key(&new_password(&a)?)?;
            if g.json {
                print_json(&json!({"added": id}))?;
            } else {
                println!("added key {}", &id[..8]);
            }
        }
        KeyCommand::List => {
            let keys = repo.list_keys()?;
            if g.json {
                print_json(&serde_json::to_value(keys)?)?;
            } else {
                println!("  {:<10} {:<20} {:<16} User", "ID", "Created", "Host");
                for k in keys {
                    println!(
                        "{} {:<10} {:<20} {:<16} {}",
                        if k.current { "*" } else { " " },
                        &k.id[..8],
                        k.created.format("%Y-%m-%d %H:%M:%S"),
                        k.hostname,
                        k.username
                    );
                }
            }
        }
        KeyCommand::Remove { id } => {
            repo.remove_key(&id)?;
            if g.json {
                print_json(&json!({"removed": id}))?;
            } else {
                println!("removed key {id}");
            }
        }
        KeyCommand::Passwd(a) => {
            let id = repo.change_password(&new_password(&a)?)?;
            if g.json {
                print_json(&json!({"key": id}))?;
            } else {
                println!(
                    "password changed (new key {}); data was not rewritten",
                    &id[..8]
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn repair_index(g: &Global) -> Result<ExitCode> {
    let repo = open(g)?;
    let r = repo.repair_index()?;
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        println!(
            "rebuilt index from {} packs ({} blobs): {} index files written, {} removed",
            r.packs, r.blobs, r.index_files_written, r.index_files_removed
        );
        for p in &r.unreadable_packs {
            eprintln!("warning: pack {p} is unreadable and was left out");
        }
    }
    Ok(if r.unreadable_packs.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn forget(g: &Global, a: ForgetArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let dur = |s: &Option<String>| -> Result<Option<chrono::Duration>> {
        Ok(match s {
            Some(s) => Some(marmoset_storage::parse_duration(s)?),
            None => None,
        })
    };
    let policy = marmoset_storage::RetentionPolicy {
        keep_last: a.keep_last,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
        keep_yearly: a.keep_yearly,
        keep_within: dur(&a.keep_within)?,
        ttl: dur(&a.ttl)?,
        keep_tags: a.keep_tags,
    };
    let group_by = match a.group_by.as_str() {
        "source" => marmoset_storage::GroupBy::Source,
        "tags" => marmoset_storage::GroupBy::Tags,
        "source,tags" | "tags,source" => marmoset_storage::GroupBy::SourceAndTags,
        other => bail!("--group-by {other:?}: use source, tags or source,tags"),
    };
    let filter = marmoset_storage::SnapshotFilter {
        sources: a.sources,
        tags: a.tags,
    };
    let report = if a.utc {
        marmoset_storage::forget(&repo, &policy, &filter, group_by, a.dry_run, &chrono::Utc)?
    } else {
        marmoset_storage::forget(&repo, &policy, &filter, group_by, a.dry_run, &chrono::Local)?
    };
    if g.json {
        print_json(&serde_json::to_value(&report)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for (group, decisions) in &report.groups {
        println!("group {group}:");
        for d in decisions {
            println!(
                "  {} {} {:<8} {}",
                if d.keep { "keep  " } else { "remove" },
                d.id.short(),
                d.time
                    .with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M"),
                if d.keep {
                    d.reasons.join(", ")
                } else {
                    "no policy keeps it".into()
                }
            );
        }
    }
    println!(
        "{} kept, {} {}",
        report.kept,
        report.removed,
        if a.dry_run {
            "would be removed (dry run)"
        } else {
            "removed"
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn maintain(g: &Global, a: MaintainArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let margin = match a.safety_margin.as_str() {
        "0" | "0s" => std::time::Duration::ZERO,
        s => marmoset_storage::parse_duration(s)?.to_std()?,
    };
    let opts = marmoset_storage::MaintainOptions {
        full: a.full,
        safety_margin: margin,
        max_unused: a.max_unused,
        dry_run: a.dry_run,
    };
    let ticker = Ticker::start(!g.quiet && !g.json, || "maintaining".to_string());
    let r = marmoset_storage::maintain(&repo, &opts)?;
    drop(ticker);
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        println!(
            "{} maintenance{} in {:.2}s (peak memory {})",
            if r.full { "full" } else { "quick" },
            if r.dry_run { " (dry run)" } else { "" },
            r.duration_secs,
            bytes(r.peak_rss_kib * 1024)
        );
        println!(
            "  index files: {} -> {}",
            r.index_files_before, r.index_files_after
        );
        if r.full {
            println!(
                "  snapshots: {}, trees walked: {}, blobs marked: {}",
                r.snapshots, r.trees_walked, r.blobs_marked
            );
            println!(
                "  packs: {} total, {} rewritten ({} new), {} planned for deletion ({})",
                r.packs_total,
                r.packs_rewritten,
                r.packs_written,
                r.packs_planned,
                bytes(r.bytes_planned)
            );
            println!(
                "  earlier plans: {} packs deleted ({} reclaimed), {} rescued, {} plans deferred",
                r.packs_deleted,
                bytes(r.bytes_reclaimed),
                r.packs_rescued,
                r.plans_deferred
            );
        }
        if r.leases_removed > 0 {
            println!("  removed {} stale leases", r.leases_removed);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check(g: &Global, a: CheckArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let read = match (&a.read_data_subset, a.read_data) {
        (Some(s), _) => marmoset_storage::ReadData::parse_subset(s)?,
        (None, true) => marmoset_storage::ReadData::All,
        (None, false) => marmoset_storage::ReadData::None,
    };
    let ticker = Ticker::start(!g.quiet && !g.json, || "checking".to_string());
    let r = marmoset_storage::check(&repo, read)?;
    drop(ticker);
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        println!(
            "checked {} keys, {} index files, {} packs, {} snapshots, {} trees, {} data blobs",
            r.keys, r.index_files, r.packs, r.snapshots, r.trees, r.data_blobs_referenced
        );
        if r.packs_read > 0 {
            println!(
                "read {} packs ({}), {} blobs authenticated",
                r.packs_read,
                bytes(r.bytes_read),
                r.blobs_read
            );
        }
        for w in &r.warnings {
            println!("warning: {w}");
        }
        for e in &r.errors {
            println!("error: {e}");
        }
        println!(
            "{}",
            if r.ok() {
                "no errors found"
            } else {
                "repository has errors"
            }
        );
    }
    Ok(if r.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn verify(g: &Global, a: VerifyArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let opts = marmoset_storage::VerifyOptions {
        max_age: marmoset_storage::parse_duration(&a.max_age)?,
        restore_test: a.restore_test,
        sources: a.sources,
        temp_dir: a.temp_dir,
    };
    let r = marmoset_storage::verify(&repo, &opts)?;
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        for s in &r.sources {
            println!(
                "{} {}: snapshot {} age {}{}",
                if s.pass { "PASS" } else { "FAIL" },
                s.source,
                s.snapshot.as_deref().map(|x| &x[..8]).unwrap_or("-"),
                s.age_hours
                    .map(|h| format!("{h:.1}h"))
                    .unwrap_or_else(|| "-".into()),
                if opts.restore_test {
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
                println!("    {e}");
            }
        }
        println!(
            "{}",
            if r.pass {
                "verify passed"
            } else {
                "verify FAILED"
            }
        );
    }
    Ok(if r.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn repair_snapshots(g: &Global, dry_run: bool) -> Result<ExitCode> {
    let repo = open(g)?;
    let r = marmoset_storage::repair_snapshots(&repo, dry_run)?;
    if g.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        for e in &r.removed_entries {
            println!("dropped {e}");
        }
        for (old, new) in &r.repaired {
            if new.is_empty() {
                println!("would repair snapshot {}", &old[..8]);
            } else {
                println!("snapshot {} replaced by {}", &old[..8], &new[..8]);
            }
        }
        println!(
            "{} snapshots checked, {} repaired",
            r.snapshots_checked,
            r.repaired.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn mount(g: &Global, a: MountArgs) -> Result<ExitCode> {
    // Fail fast on a missing FUSE before asking for a password.
    marmoset_fuse::preflight(&a.mountpoint)?;
    let repo = Arc::new(open(g)?);
    let opts = marmoset_fuse::MountOptions {
        allow_other: a.allow_other,
        cache_bytes: a.cache_mib << 20,
        ..Default::default()
    };
    if !g.json {
        eprintln!(
            "mounted at {}; press Ctrl-C to unmount",
            a.mountpoint.display()
        );
    }
    marmoset_fuse::run_foreground(repo, &a.mountpoint, &opts)?;
    Ok(ExitCode::SUCCESS)
}

fn diff(g: &Global, a: DiffArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let (_, from) = repo.resolve_snapshot(&a.from)?;
    let (_, to) = repo.resolve_snapshot(&a.to)?;
    let entries: Vec<_> = marmoset_storage::diff(&repo, &from, &to)?
        .into_iter()
        .filter(|e| a.metadata || e.change != marmoset_storage::Change::Metadata)
        .collect();
    if g.json {
        print_json(&serde_json::to_value(&entries)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let tty = std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    let (mut added, mut removed, mut modified) = (0, 0, 0);
    for e in &entries {
        let sign = match e.change {
            marmoset_storage::Change::Added => {
                added += 1;
                "+"
            }
            marmoset_storage::Change::Removed => {
                removed += 1;
                "-"
            }
            marmoset_storage::Change::Modified => {
                modified += 1;
                "M"
            }
            marmoset_storage::Change::Metadata => "U",
        };
        let slash = if e.kind == NodeKind::Dir { "/" } else { "" };
        writeln!(out, "{sign}    {}{slash}", shown(&e.path, tty))?;
    }
    writeln!(out, "{added} added, {removed} removed, {modified} modified")?;
    Ok(ExitCode::SUCCESS)
}

fn find(g: &Global, a: FindArgs) -> Result<ExitCode> {
    let repo = open(g)?;
    let snaps = if a.snapshots.is_empty() {
        repo.snapshots()?
            .0
            .into_iter()
            .filter(|(_, s)| a.source.as_ref().is_none_or(|src| &s.source == src))
            .collect::<Vec<_>>()
    } else {
        a.snapshots
            .iter()
            .map(|s| repo.resolve_snapshot(s))
            .collect::<marmoset_storage::Result<Vec<_>>>()?
    };
    let matches = marmoset_storage::find(&repo, &a.pattern, &snaps)?;
    if g.json {
        print_json(&serde_json::to_value(&matches)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let tty = std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    for m in &matches {
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
    writeln!(
        out,
        "{} matches in {} snapshots",
        matches.len(),
        snaps.len()
    )?;
    Ok(if matches.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
