//! `marmoset mount`: every snapshot as a read-only FUSE filesystem, in the
//! foreground until Ctrl-C unmounts it.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;

use crate::cli::{Global, MountArgs};
use crate::output::errln;
use crate::repo_open::open;

pub(super) fn run(g: &Global, a: MountArgs) -> Result<ExitCode> {
    // Fail fast on a missing FUSE before asking for a password.
    marmoset_fuse::preflight(&a.mountpoint)?;
    let repo = Arc::new(open(g)?);
    let opts = marmoset_fuse::MountOptions {
        allow_other: a.allow_other,
        cache_bytes: a.cache_mib << 20,
        ..Default::default()
    };
    if !g.json {
        errln!(
            "mounted at {}; press Ctrl-C to unmount",
            a.mountpoint.display()
        );
    }
    marmoset_fuse::run_foreground(repo, &a.mountpoint, &opts)?;
    Ok(ExitCode::SUCCESS)
}
