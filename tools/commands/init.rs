//! `marmoset init`: create a repository with the chosen chunking, pack size
//! and compression, or with another repository's chunking
//! (`--copy-chunker-params`, for `marmoset copy` between them).

use std::process::ExitCode;

use anyhow::{bail, Result};
use marmoset_storage::{Config, Repository};
use serde_json::json;

use crate::cli::{Global, InitArgs};
use crate::output::print_json;
use crate::output::{errln, outln};
use crate::repo_open::{open_backend, open_from, open_opts, password};

pub(super) fn run(g: &Global, a: InitArgs) -> Result<ExitCode> {
    let backend = open_backend(g)?;
    let mut config = config(&a)?;
    // The source is opened (and its password asked) before ours.
    let seed = if a.copy_chunker_params {
        let from = open_from(g, &a.from)?;
        config.chunker = from.config().chunker.clone();
        Some(from.keys().chunker_seed())
    } else {
        if a.from.from_repo.is_some() {
            errln!("warning: --from-repo is used only with --copy-chunker-params; ignored");
        }
        None
    };
    let pw = password(g, true)?;
    let repo =
        Repository::init_with_chunker_seed(backend.clone(), &pw, config, seed, &open_opts(g))?;
    if g.json {
        print_json(
            &json!({"repository_id": repo.config().repository_id, "location": backend.location()}),
        )?;
    } else {
        outln!(
            "created repository {} at {}",
            repo.config().repository_id.short(),
            backend.location()
        );
        outln!("keep the password safe: data cannot be recovered without it");
    }
    Ok(ExitCode::SUCCESS)
}

/// The new repository's config: defaults, with the flags given.
fn config(a: &InitArgs) -> Result<Config> {
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
    Ok(config)
}
