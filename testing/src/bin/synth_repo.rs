//! Builds a repository with millions of chunks in minutes, for the
//! memory and time benchmarks of `check` and `maintain` at scale
//! (`benches/limits.sh --cases index`): backing up ten million real files
//! would take longer than the benchmark itself.
//!
//!   synth_repo REPO_DIR PASSWORD_FILE CACHE_DIR CHUNKS
//!
//! Writes CHUNKS distinct small data blobs (packs of 50 000, each with its
//! index file, as `save_blobs` stores them), a tree of 1000 one-chunk files
//! per directory over them, and two snapshots: "all" over every chunk and
//! "most" over the first 90 %. Forgetting "all" leaves 10 % garbage.

use marmoset_storage::backend::{self, BackendOptions};
use marmoset_storage::{
    BackupSummary, BlobType, Config, Id, Node, NodeKind, OpenOptions, Repository, Snapshot, Tree,
};

const PER_PACK: u64 = 50_000;
const PER_DIR: u64 = 1000;
const DIRS_PER_PARENT: u64 = 100;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, repo_dir, pw_file, cache, chunks] = args.as_slice() else {
        return Err("usage: synth_repo REPO_DIR PASSWORD_FILE CACHE_DIR CHUNKS".into());
    };
    let chunks: u64 = chunks.parse()?;
    let password = std::fs::read_to_string(pw_file)?;
    let backend = backend::open(repo_dir, &BackendOptions::default())?;
    let mut config = Config::new();
    config.compression_level = 0;
    let opts = OpenOptions {
        cache_root: Some(cache.into()),
    };
    let repo = Repository::init(backend, password.trim_end().as_bytes(), config, &opts)?;

    let mut ids = Vec::with_capacity(chunks as usize);
    let mut start = 0;
    while start < chunks {
        let end = (start + PER_PACK).min(chunks);
        let blobs: Vec<(BlobType, Vec<u8>)> =
            (start..end).map(|i| (BlobType::Data, body(i))).collect();
        ids.extend(repo.save_blobs(&blobs)?);
        start = end;
    }
    let most = chunks * 9 / 10;
    for (tag, n) in [("all", chunks), ("most", most)] {
        let root = save_dirs(&repo, &ids[..n as usize])?;
        repo.save_snapshot(&snapshot(root, tag, n))?;
    }
    eprintln!("{chunks} chunks, snapshots \"all\" and \"most\" ({most})");
    Ok(())
}

/// 48 distinct bytes per chunk: a counter and a fixed pattern.
fn body(i: u64) -> Vec<u8> {
    let mut b = i.to_le_bytes().to_vec();
    b.extend((0..40u8).map(|k| k.wrapping_mul(37) ^ (i as u8)));
    b
}

/// Leaves of `PER_DIR` one-chunk files, grouped `DIRS_PER_PARENT` to a
/// parent until one root remains; returns the root tree.
fn save_dirs(repo: &Repository, ids: &[Id]) -> Result<Id, Box<dyn std::error::Error>> {
    let mut level: Vec<Tree> = ids
        .chunks(PER_DIR as usize)
        .map(|files| Tree {
            nodes: files
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let mut n = Node::new(format!("f{i:04}").into_bytes(), NodeKind::File);
                    n.mode = 0o644;
                    n.size = 48;
                    n.content = vec![*id];
                    n
                })
                .collect(),
        })
        .collect();
    loop {
        let mut saved = Vec::with_capacity(level.len());
        for batch in level.chunks(PER_PACK as usize / 100) {
            let blobs = batch
                .iter()
                .map(|t| Ok((BlobType::Tree, t.encode()?)))
                .collect::<Result<Vec<_>, marmoset_storage::Error>>()?;
            saved.extend(repo.save_blobs(&blobs)?);
        }
        if saved.len() == 1 {
            return Ok(saved[0]);
        }
        level = saved
            .chunks(DIRS_PER_PARENT as usize)
            .map(|subs| Tree {
                nodes: subs
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        let mut n = Node::new(format!("d{i:03}").into_bytes(), NodeKind::Dir);
                        n.mode = 0o755;
                        n.subtree = vec![*id];
                        n
                    })
                    .collect(),
            })
            .collect();
    }
}

fn snapshot(tree: Id, tag: &str, files: u64) -> Snapshot {
    Snapshot {
        version: 1,
        time: chrono::Utc::now(),
        hostname: "synth".into(),
        username: "root".into(),
        source: format!("synth-{tag}"),
        paths: vec!["/synth".into()],
        tags: vec![tag.into()],
        tree,
        tree_parts: Vec::new(),
        parent: None,
        program_version: "synth_repo".into(),
        incomplete: false,
        original: None,
        summary: BackupSummary {
            files_new: files,
            ..Default::default()
        },
    }
}
