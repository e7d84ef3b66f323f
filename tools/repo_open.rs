//! Opening the repository from the global flags: the backend named by
//! `--repo` (a directory, or an S3 URL with its connection flags) and the
//! password from `--password-file`, `MARMOSET_PASSWORD` or a prompt.
//!
//! Every command and the agent open a repository the same way, so this
//! lives beside them rather than inside `commands`: the agent can use it
//! without importing the command dispatcher that calls it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use marmoset_storage::backend::retry::RetryPolicy;
use marmoset_storage::backend::{self, Backend, BackendOptions};
use marmoset_storage::{OpenOptions, Repository};

use crate::cli::{FromRepo, Global, NewPassword};

/// Opens the repository with the password from the flags, environment or
/// a prompt.
pub(crate) fn open(g: &Global) -> Result<Repository> {
    let backend = open_backend(g)?;
    let pw = password(g, false)?;
    Ok(Repository::open(backend, &pw, &open_opts(g))?)
}

/// The repository `--repo` names as the target of a copy: errors say so.
pub(crate) fn open_target(g: &Global) -> Result<Repository> {
    let what = || match g.repo.as_deref() {
        Some(r) => format!("target repository (--repo {r})"),
        None => "target repository".to_string(),
    };
    open(g).with_context(what)
}

/// The repository `--from-repo` names, with its own password and (when
/// given) its own S3 credentials; errors say it is the source.
pub(crate) fn open_from(g: &Global, f: &FromRepo) -> Result<Repository> {
    let Some(url) = f.from_repo.as_deref() else {
        bail!("no source repository given: use --from-repo or MARMOSET_FROM_REPOSITORY");
    };
    open_other(
        g,
        url,
        f.from_password_file.as_deref(),
        "MARMOSET_FROM",
        &format!("source repository (--from-repo {url})"),
    )
}

/// The node agent's secondary repository (`secondary` in its config).
pub(crate) fn open_secondary(
    g: &Global,
    url: &str,
    password_file: Option<&Path>,
) -> Result<Repository> {
    open_other(
        g,
        url,
        password_file,
        "MARMOSET_SECONDARY",
        &format!("secondary repository ({url})"),
    )
}

/// A repository other than `--repo`'s, with the same connection flags:
/// its password from `password_file`, `{env}_PASSWORD` or a prompt; its
/// S3 credentials from `{env}_AWS_ACCESS_KEY_ID` and
/// `{env}_AWS_SECRET_ACCESS_KEY` when both are set (another account or
/// provider), else the usual AWS ones. Errors name it as `what`.
fn open_other(
    g: &Global,
    url: &str,
    password_file: Option<&Path>,
    env: &str,
    what: &str,
) -> Result<Repository> {
    let mut opts = backend_options(g)?;
    if let (Ok(id), Ok(secret)) = (
        std::env::var(format!("{env}_AWS_ACCESS_KEY_ID")),
        std::env::var(format!("{env}_AWS_SECRET_ACCESS_KEY")),
    ) {
        opts.static_credentials = Some((id, secret));
    }
    let backend = backend::open(url, &opts).with_context(|| what.to_string())?;
    let pw = match password_file {
        Some(p) => read_password_file(p),
        None => match std::env::var(format!("{env}_PASSWORD")) {
            Ok(p) => Ok(p.into_bytes()),
            Err(_) => prompt(&format!("{what} password"), false),
        },
    }
    .with_context(|| what.to_string())?;
    Repository::open(backend, &pw, &open_opts(g)).with_context(|| what.to_string())
}

pub(crate) fn open_opts(g: &Global) -> OpenOptions {
    OpenOptions {
        cache_root: g.cache_dir.clone(),
    }
}

/// The backend `--repo` names (`s3:URL`, or a directory, optionally
/// `local:PATH` or `file://PATH`), with the engine's wrappers: retries for
/// S3, the bandwidth limits, request metering and, for S3, the local copy
/// of immutable metadata under the cache root.
pub(crate) fn open_backend(g: &Global) -> Result<Arc<dyn Backend>> {
    let Some(repo) = g.repo.as_deref() else {
        bail!("no repository given: use --repo or MARMOSET_REPOSITORY");
    };
    Ok(backend::open(repo, &backend_options(g)?)?)
}

/// The connection and bandwidth flags.
fn backend_options(g: &Global) -> Result<BackendOptions> {
    let defaults = BackendOptions::default();
    let multipart_threshold = g.s3_multipart_mib.max(5) << 20;
    Ok(BackendOptions {
        region: g
            .s3_region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok()),
        path_style: g.s3_path_style,
        checksums_when_required: match g.s3_checksums.as_str() {
            "when_required" => true,
            "when_supported" => false,
            other => bail!("--s3-checksums {other:?}: use when_required or when_supported"),
        },
        connections: g.s3_connections.max(1),
        multipart_threshold,
        part_size: multipart_threshold.clamp(5 << 20, 16 << 20),
        limit_upload: kib_per_sec("--limit-upload", g.limit_upload)?,
        limit_download: kib_per_sec("--limit-download", g.limit_download)?,
        cache_root: Some(g.cache_dir.clone().unwrap_or_else(default_cache_root)),
        retry: RetryPolicy {
            max_attempts: g.s3_retries,
            ..defaults.retry.clone()
        },
        ..defaults
    })
}

/// A bandwidth limit in KiB/s as bytes/s; 0 means unlimited.
fn kib_per_sec(flag: &str, v: Option<u64>) -> Result<Option<u64>> {
    match v {
        None => Ok(None),
        Some(k) => match k.checked_mul(1024) {
            Some(b) => Ok(Some(b)),
            None => bail!("{flag} {k}: too large (KiB/s)"),
        },
    }
}

/// The engine's default, so both caches share one root: with no home it is
/// a per-user folder in the temporary directory, never a shared name there;
/// the engine checks the root is this user's own before the repository
/// opens.
fn default_cache_root() -> std::path::PathBuf {
    OpenOptions::default_cache_root()
}

/// The repository password: `--password-file`, then `MARMOSET_PASSWORD`,
/// then a prompt (asked twice when `confirm`).
pub(crate) fn password(g: &Global, confirm: bool) -> Result<Vec<u8>> {
    if let Some(p) = &g.password_file {
        return read_password_file(p);
    }
    if let Ok(p) = std::env::var("MARMOSET_PASSWORD") {
        return Ok(p.into_bytes());
    }
    prompt("repository password", confirm)
}

/// A new key's password: `--new-password-file` or a confirmed prompt.
pub(crate) fn new_password(a: &NewPassword) -> Result<Vec<u8>> {
    match &a.new_password_file {
        Some(p) => read_password_file(p),
        None => prompt("new password", true),
    }
}

/// The first line of the file, without its line ending.
fn read_password_file(path: &Path) -> Result<Vec<u8>> {
    let raw =
        std::fs::read(path).with_context(|| format!("reading password file {}", path.display()))?;
    let line = raw.split(|&b| b == b'\n').next().unwrap_or(&[]);
    Ok(line.strip_suffix(b"\r").unwrap_or(line).to_vec())
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
