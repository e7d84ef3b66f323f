//! `marmoset cat KIND [ID]`: one repository object as JSON (config, keys,
//! snapshot, tree, index file, pack trailer), or a blob's raw bytes.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use marmoset_storage::backend::FileKind;
use marmoset_storage::{Id, Node, NodeKind, PackEntry, Repository};
use serde_json::json;

use crate::cli::{split_target, CatArgs, Global};
use crate::output::print_json;
use crate::repo_open::open;

pub(super) fn run(g: &Global, a: CatArgs) -> Result<ExitCode> {
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
            tree(&repo, &need_id()?)?;
        }
        "index" => {
            let repo = open(g)?;
            let packs = repo.load_index_file(&need_id()?)?;
            print_json(&packs_json(&packs))?;
        }
        "pack" => {
            let repo = open(g)?;
            pack(&repo, &need_id()?)?;
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

/// The entries of a directory: `TREE_ID` (a tree blob) or `SNAP[:path]`.
fn tree(repo: &Repository, target: &str) -> Result<()> {
    let (spec, path) = split_target(target);
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
    )?)
}

/// A pack's blobs, read from its trailer.
fn pack(repo: &Repository, id: &str) -> Result<()> {
    let size = repo.backend().size(FileKind::Pack, id)?;
    let entries = repo.read_pack_trailer(id, size)?;
    let pid = Id::from_hex(id).unwrap_or_default();
    print_json(&packs_json(&[(pid, entries)]))
}

fn node_json(n: &Node) -> serde_json::Value {
    json!({
        "name": n.name_lossy(), "type": n.kind, "mode": n.mode, "uid": n.uid, "gid": n.gid,
        "mtime_ns": n.mtime_ns, "size": n.size, "content": n.content, "indirect": n.indirect,
        "subtree": n.subtree, "link_target": n.link_target.as_ref().map(|t| String::from_utf8_lossy(t).into_owned()),
        "inode": n.inode, "links": n.links, "xattrs": n.xattrs.len(),
    })
}

fn packs_json(packs: &[(Id, Vec<PackEntry>)]) -> serde_json::Value {
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
