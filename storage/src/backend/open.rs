//! One constructor for every repository location: [`open`] parses where the
//! repository lives and stacks the wrappers over the storage, so the CLI,
//! the agent and tests all get the same engine:
//!
//! ```text
//! fs | s3  →  retry (remote only)  →  throttle (if limited)  →  metered  →  cache (remote, with a cache root)
//! ```
//!
//! Retries sit right on the storage, so every layer above sees one call
//! per operation; metering sits above the throttle, so waits are not
//! requests; the metadata cache is outermost, so a cache hit is not a
//! request at all.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::cache::CachedBackend;
use super::fs::FsBackend;
use super::metered::MeteredBackend;
use super::retry::{RetryBackend, RetryPolicy};
use super::s3::{S3Backend, S3Options};
use super::throttle::ThrottleBackend;
use super::Backend;
use crate::error::{Error, Result};
use crate::format::id::Id;

/// How to reach and use a repository's storage, apart from where it is
/// (that is the URL given to [`open`]). The S3 settings are ignored for a
/// local repository. `Debug` is written by hand: credentials must not reach
/// logs.
#[derive(Clone)]
pub struct BackendOptions {
    /// S3: region; `None` = from the endpoint's host name, else us-east-1.
    pub region: Option<String>,
    /// S3: path-style addressing (host/bucket/key).
    pub path_style: bool,
    /// S3: send/validate checksums only when the API requires them.
    pub checksums_when_required: bool,
    /// S3: parallel pack uploads, and parts in flight per multipart upload.
    pub connections: usize,
    /// S3: objects above this many bytes use multipart uploads.
    pub multipart_threshold: usize,
    /// S3: bytes per part of a multipart upload (at least 5 MiB).
    pub part_size: usize,
    /// S3: per-request timeout.
    pub timeout: Duration,
    /// S3: access key and secret; `None` = the standard AWS chain.
    pub static_credentials: Option<(String, String)>,
    /// Retries of a remote storage (a local one is not retried).
    pub retry: RetryPolicy,
    /// Upload limit in bytes per second (`None` or 0 = unlimited).
    pub limit_upload: Option<u64>,
    /// Download limit in bytes per second (`None` or 0 = unlimited).
    pub limit_download: Option<u64>,
    /// Root of the local caches: a remote repository keeps copies of its
    /// immutable metadata objects under `<root>/objects/<location id>`.
    /// `None` = no metadata cache.
    pub cache_root: Option<PathBuf>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        let s3 = S3Options::default();
        Self {
            region: None,
            path_style: s3.path_style,
            checksums_when_required: s3.checksums_when_required,
            connections: s3.connections,
            multipart_threshold: s3.multipart_threshold,
            part_size: s3.part_size,
            timeout: s3.timeout,
            static_credentials: None,
            retry: RetryPolicy::default(),
            limit_upload: None,
            limit_download: None,
            cache_root: None,
        }
    }
}

impl std::fmt::Debug for BackendOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const REDACTED: &str = "<redacted>";
        f.debug_struct("BackendOptions")
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("checksums_when_required", &self.checksums_when_required)
            .field("connections", &self.connections)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("part_size", &self.part_size)
            .field("timeout", &self.timeout)
            .field(
                "static_credentials",
                &self
                    .static_credentials
                    .as_ref()
                    .map(|_| (REDACTED, REDACTED)),
            )
            .field("retry", &self.retry)
            .field("limit_upload", &self.limit_upload)
            .field("limit_download", &self.limit_download)
            .field("cache_root", &self.cache_root)
            .finish()
    }
}

impl BackendOptions {
    /// `url_options` (what an `s3:` URL says) with these settings applied.
    pub fn apply_to(&self, url_options: S3Options) -> S3Options {
        let mut o = url_options;
        if let Some(region) = &self.region {
            o.region = region.clone();
        }
        o.path_style = self.path_style;
        o.checksums_when_required = self.checksums_when_required;
        o.connections = self.connections.max(1);
        o.multipart_threshold = self.multipart_threshold;
        o.part_size = self.part_size;
        o.timeout = self.timeout;
        if self.static_credentials.is_some() {
            o.static_credentials = self.static_credentials.clone();
        }
        o
    }
}

/// Where a repository lives, as parsed from its URL.
#[derive(Debug, Clone)]
pub enum Location {
    /// A directory: a plain path, `local:PATH` or `file:///PATH`.
    Fs(PathBuf),
    /// A bucket and prefix: `s3:https://endpoint/bucket/prefix`,
    /// `s3://bucket/prefix` or `s3:bucket/prefix` (the settings beyond the
    /// URL at their defaults).
    S3(S3Options),
}

impl Location {
    pub fn parse(url: &str) -> Result<Self> {
        if url.starts_with("s3:") {
            return Ok(Location::S3(S3Options::from_url(url)?));
        }
        if let Some(rest) = url.strip_prefix("file://") {
            return Ok(Location::Fs(file_url_path(url, rest)?));
        }
        let path = url.strip_prefix("local:").unwrap_or(url);
        if path.is_empty() {
            return Err(Error::InvalidArgument(
                "empty repository location: give a directory, file:///path or s3:URL".into(),
            ));
        }
        // `sftp://...`, `rest://...`: a scheme this build does not know,
        // not a folder named "sftp:".
        if let Some((scheme, _)) = path.split_once("://") {
            let is_scheme = scheme
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
            if is_scheme {
                return Err(Error::InvalidArgument(format!(
                    "unsupported repository location {scheme}://...: use a directory, file:///path or s3:URL"
                )));
            }
        }
        Ok(Location::Fs(PathBuf::from(path)))
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Location::S3(_))
    }
}

/// The path of a `file://` URL: absolute, host empty or `localhost`,
/// percent-escapes decoded.
fn file_url_path(url: &str, rest: &str) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let bad = |why: &str| Error::InvalidArgument(format!("invalid file URL {url:?}: {why}"));
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    if !path.starts_with('/') {
        return Err(bad("use file:///absolute/path"));
    }
    let raw = path.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("broken %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    Ok(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

/// Opens the storage at `url` (see [`Location`]) with the wrappers the
/// options call for. Nothing is read or created: `create` or a repository
/// open does that.
pub fn open(url: &str, options: &BackendOptions) -> Result<Arc<dyn Backend>> {
    match Location::parse(url)? {
        Location::Fs(path) => Ok(stack(FsBackend::new(path), options)),
        Location::S3(url_options) => {
            let base = S3Backend::new(options.apply_to(url_options))?;
            Ok(stack(base, options))
        }
    }
}

/// Stacks the wrappers over `base` (see the module documentation).
fn stack<B: Backend + 'static>(base: B, options: &BackendOptions) -> Arc<dyn Backend> {
    let remote = base.is_remote();
    let retried: Arc<dyn Backend> = if remote {
        Arc::new(RetryBackend::new(base, options.retry.clone()))
    } else {
        Arc::new(base)
    };
    let limited = |l: Option<u64>| l.is_some_and(|l| l > 0);
    let throttled: Arc<dyn Backend> =
        if limited(options.limit_upload) || limited(options.limit_download) {
            Arc::new(ThrottleBackend::new(
                retried,
                options.limit_upload,
                options.limit_download,
            ))
        } else {
            retried
        };
    let metered: Arc<dyn Backend> = Arc::new(MeteredBackend::new(throttled));
    match &options.cache_root {
        Some(root) if remote => {
            // Index files and snapshots are immutable: keep local copies,
            // one folder per storage location.
            let dir = root
                .join("objects")
                .join(Id::of_bytes(metered.location().as_bytes()).short());
            Arc::new(CachedBackend::new(metered, dir))
        }
        _ => metered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Bytes, FileKind, RequestStats};

    fn fs_path(url: &str) -> Option<PathBuf> {
        match Location::parse(url) {
            Ok(Location::Fs(p)) => Some(p),
            _ => None,
        }
    }

    #[test]
    fn parses_local_locations() {
        assert_eq!(fs_path("/srv/repo"), Some("/srv/repo".into()));
        assert_eq!(fs_path("relative/repo"), Some("relative/repo".into()));
        assert_eq!(fs_path("local:/srv/repo"), Some("/srv/repo".into()));
        assert_eq!(fs_path("file:///srv/repo"), Some("/srv/repo".into()));
        assert_eq!(
            fs_path("file://localhost/srv/repo"),
            Some("/srv/repo".into())
        );
        assert_eq!(
            fs_path("file:///srv/my%20repo"),
            Some("/srv/my repo".into())
        );
        assert_eq!(fs_path("backups:2024"), Some("backups:2024".into()));
        for bad in [
            "",
            "local:",
            "file://host/srv",
            "file://srv",
            "file:///a%2",
            "file:///a%+1",
            "sftp://h/p",
        ] {
            assert!(Location::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_s3_locations_and_applies_options() -> Result<()> {
        let Location::S3(o) = Location::parse("s3:https://s3.eu-central-003.backblazeb2.com/b/p")?
        else {
            panic!("not an S3 location");
        };
        assert_eq!((o.bucket.as_str(), o.prefix.as_str()), ("b", "p"));
        assert_eq!(o.region, "eu-central-003");
        let options = BackendOptions {
            connections: 0,
            static_credentials: Some(("id".into(), "secret".into())),
            ..BackendOptions::default()
        };
        let applied = options.apply_to(o.clone());
        assert_eq!(applied.region, "eu-central-003", "no override: the URL's");
        assert_eq!(applied.connections, 1);
        assert!(applied.static_credentials.is_some());
        let applied = BackendOptions {
            region: Some("us-west-2".into()),
            ..options
        }
        .apply_to(o);
        assert_eq!(applied.region, "us-west-2");
        assert!(!format!("{:?}", BackendOptions::default()).contains("secret"));
        Ok(())
    }

    #[test]
    fn an_s3_location_gets_retry_metering_and_the_metadata_cache() -> Result<()> {
        let cache = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let options = BackendOptions {
            static_credentials: Some(("k".into(), "s".into())),
            cache_root: Some(cache.path().to_path_buf()),
            ..BackendOptions::default()
        };
        let b = open("s3:http://127.0.0.1:9/bucket/prefix", &options)?;
        assert!(b.is_remote());
        assert_eq!(b.location(), "s3:http://127.0.0.1:9/bucket/prefix");
        assert_eq!(b.write_parallelism(), 8);
        assert_eq!(b.stats(), Some(RequestStats::default()));
        Ok(())
    }

    #[test]
    fn a_local_location_is_metered_and_throttled_but_not_retried() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let options = BackendOptions {
            limit_download: Some(1 << 30),
            cache_root: Some(dir.path().join("cache")),
            ..BackendOptions::default()
        };
        let b = open(
            &format!("file://{}", dir.path().join("repo").display()),
            &options,
        )?;
        assert!(!b.is_remote());
        // The file system's own answer, through every wrapper.
        assert_eq!(b.write_parallelism(), 1);
        b.create()?;
        b.write(FileKind::Snapshot, "s1", Bytes::from_static(b"snap"))?;
        assert_eq!(b.read(FileKind::Snapshot, "s1")?, b"snap");
        let s = b.stats().unwrap_or_default();
        assert_eq!((s.put, s.get, s.bytes_up, s.bytes_down), (1, 1, 4, 4));
        // No metadata cache for a local repository.
        assert!(!dir.path().join("cache").exists());
        Ok(())
    }
}
