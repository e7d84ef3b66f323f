//! S3-compatible object storage (AWS S3, Backblaze B2, MinIO, ...) through
//! `aws-sdk-s3`.
//!
//! One attempt per call: retries, bandwidth limits and request counts are
//! the wrappers' business ([`super::retry`], [`super::throttle`],
//! [`super::metered`], stacked by [`super::open()`]). What this module does is
//! classify failures so those wrappers can act: 5xx, 429 and SlowDown,
//! timeouts, connection resets and truncated bodies come back as
//! [`Error::Backend`] errors that are [`Error::retryable`]; a missing object
//! is [`Error::NotFound`]; 403 and a missing bucket are final, with bucket
//! and key in the message. Objects are written with a single PUT, or above a
//! threshold a multipart upload (at most `connections` parts in flight), so
//! no reader ever sees half an object; a failed part aborts the upload and
//! the whole write fails (the retry layer then writes it again).
//!
//! # Sync and async
//!
//! The backend traits are synchronous (the engine's pipelines are thread
//! pools); each call blocks its thread on one tokio runtime shared by every
//! S3 backend of the process, and parallelism comes from the callers'
//! threads (8 pack uploaders by default, see `write_parallelism`). The rule
//! for async callers: call storage from a blocking thread
//! (`tokio::task::spawn_blocking`, as the agent does), never directly from
//! an async task. A direct call still works — on a multi-threaded runtime
//! the task's worker is handed over with `block_in_place`, on a
//! current-thread runtime the call runs on a helper thread — but it blocks
//! that task (and a current-thread runtime) until the request is done.
//!
//! The runtime is a process-wide static (`runtime()`) rather than one
//! per backend: a runtime owned by the backend was dropped with the last
//! repository handle, and tokio panics when a runtime is dropped inside an
//! async context ("Cannot drop a runtime in a context where blocking is not
//! allowed"), which is exactly where the agent drops its repository at
//! shutdown. A static is never dropped, and one pool of a few threads
//! serves every repository handle instead of four threads per handle.
//! (Shutting each runtime down with `shutdown_background` in `Drop` would
//! also avoid the panic, but keeps a thread pool per handle and silently
//! abandons whatever the dropped runtime was still running.)

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};
use tokio::task::JoinSet;
use tracing::warn;

use super::{
    object_path, Bytes, DeleteBackend, FileKind, ListBackend, ObjectInfo, ReadBackend, WriteBackend,
};
use crate::error::{Error, Result};

/// Where and how to reach the bucket. `Debug` is written by hand: options
/// end up in logs and error reports, credentials must not.
#[derive(Clone)]
pub struct S3Options {
    /// e.g. `https://s3.us-east-005.backblazeb2.com`; `None` = AWS.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Key prefix without leading/trailing slash, e.g. `velero`.
    pub prefix: String,
    pub path_style: bool,
    /// Send/validate checksums only when the API requires them (many
    /// S3-compatibles reject the newer default checksum headers).
    pub checksums_when_required: bool,
    /// Parallel pack uploads, and parts in flight per multipart upload.
    pub connections: usize,
    /// Objects above this size use multipart uploads.
    pub multipart_threshold: usize,
    pub part_size: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Access key and secret; `None` = the standard AWS chain (env vars,
    /// profile, instance metadata).
    pub static_credentials: Option<(String, String)>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const REDACTED: &str = "<redacted>";
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
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
            .finish()
    }
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".into(),
            bucket: String::new(),
            prefix: String::new(),
            path_style: true,
            checksums_when_required: true,
            connections: 8,
            multipart_threshold: 64 << 20,
            part_size: 16 << 20,
            timeout: Duration::from_secs(120),
            static_credentials: None,
        }
    }
}

impl S3Options {
    /// Parses `s3:https://host[:port]/bucket[/prefix]` (custom endpoint,
    /// path style) or `s3://bucket[/prefix]` / `s3:bucket[/prefix]` (AWS).
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!("invalid S3 repository {url:?}: use s3:https://endpoint/bucket/prefix or s3://bucket/prefix"))
        };
        // Credentials never belong in the URL (they would reach logs, `ps`,
        // shell history, and as a "bucket name" a third party): refuse any
        // `@` without echoing the URL.
        if url.contains('@') {
            return Err(Error::InvalidArgument(
                "credentials do not belong in the repository URL: use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the agent's Secret)".into(),
            ));
        }
        let rest = url.strip_prefix("s3:").ok_or_else(bad)?;
        let mut o = S3Options::default();
        let path = if let Some(r) = rest.strip_prefix("//") {
            r.to_string()
        } else if rest
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
            || rest
                .get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        {
            let scheme_end = rest.find("://").ok_or_else(bad)? + 3;
            let host_end = rest[scheme_end..]
                .find('/')
                .map(|i| i + scheme_end)
                .ok_or_else(bad)?;
            o.endpoint = Some(rest[..host_end].to_string());
            rest[host_end + 1..].to_string()
        } else {
            rest.to_string()
        };
        let path = path.trim_matches('/');
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(bad());
        }
        o.bucket = bucket.to_string();
        o.prefix = prefix.trim_matches('/').to_string();
        if let Some(ep) = &o.endpoint {
            // s3.<region>.backblazeb2.com and s3.<region>.amazonaws.com carry
            // their region in the host name.
            let host = ep.split("://").nth(1).unwrap_or("");
            let parts: Vec<&str> = host.split('.').collect();
            if parts.len() > 2 && parts[0] == "s3" {
                o.region = parts[1].to_string();
            }
        }
        Ok(o)
    }
}

/// Worker threads of the shared runtime: requests are I/O, and most of
/// them are driven by the calling threads inside `block_on`; the workers
/// run the I/O driver and the parts of multipart uploads.
fn runtime_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4)
}

/// The one tokio runtime of every S3 backend in the process, built on first
/// use and never dropped (see the module documentation for why).
fn runtime() -> Result<&'static Runtime> {
    static RUNTIME: OnceLock<std::io::Result<Runtime>> = OnceLock::new();
    let built = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(runtime_workers())
            .enable_all()
            .thread_name("marmoset-s3")
            .build()
    });
    match built {
        Ok(rt) => Ok(rt),
        Err(e) => Err(Error::io(
            "tokio runtime",
            std::io::Error::new(e.kind(), e.to_string()),
        )),
    }
}

/// Runs the future `make` returns to completion on `rt`, from synchronous
/// code on any thread, without the panics of a plain `block_on` inside an
/// async context:
///
/// * no tokio context (engine threads, `spawn_blocking` threads): blocks
///   right here;
/// * a multi-threaded runtime's context (an async task, or its
///   `block_on`): `block_in_place` hands the worker's other tasks to another
///   thread first (on a `spawn_blocking` thread it does nothing);
/// * a current-thread runtime's context, where neither is allowed: on a
///   scoped helper thread. The future is built there, so it need not be
///   `Send`; only `make` and the output cross threads.
fn block_on<M, F, T>(rt: &'static Runtime, make: M) -> T
where
    M: FnOnce() -> F + Send,
    F: Future<Output = T>,
    T: Send,
{
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Err(_) => rt.block_on(make()),
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| rt.block_on(make())),
        Ok(_) => std::thread::scope(|s| match s.spawn(move || rt.block_on(make())).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
    }
}

/// What a failed request means for the caller.
enum Class {
    NotFound,
    /// Transient: the `io::ErrorKind` the error carries, one that
    /// [`Error::retryable`] accepts.
    Retry(std::io::ErrorKind),
    Fatal,
}

struct Failure {
    class: Class,
    msg: String,
}

/// Transient: the server asks to come back later (5xx, 429, SlowDown).
/// `WouldBlock` is EAGAIN, "resource temporarily unavailable".
const TRY_LATER: std::io::ErrorKind = std::io::ErrorKind::WouldBlock;
/// Transient: the connection failed, or a body arrived cut short.
const CONNECTION: std::io::ErrorKind = std::io::ErrorKind::ConnectionReset;
/// Transient: no answer in time.
const TIMEOUT: std::io::ErrorKind = std::io::ErrorKind::TimedOut;

/// Largest buffer reserved up front from a response's Content-Length; a
/// larger body still arrives, growing the buffer as it goes.
const MAX_PREALLOCATION: u64 = 64 << 20;

fn classify<E>(e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("").to_string();
            let message = se.err().message().unwrap_or("").to_string();
            let mut msg = format!("HTTP {status} {code} {message}").trim().to_string();
            if code.is_empty() {
                msg = format!(
                    "HTTP {status}: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&e)
                );
            }
            let class = if code == "NoSuchBucket" {
                Class::Fatal
            } else if status == 404 || code == "NoSuchKey" || code == "NotFound" {
                Class::NotFound
            } else if code == "RequestTimeout" {
                Class::Retry(TIMEOUT)
            } else if status >= 500 || status == 429 || code == "SlowDown" {
                Class::Retry(TRY_LATER)
            } else {
                Class::Fatal
            };
            Failure { class, msg }
        }
        SdkError::TimeoutError(_) => Failure {
            class: Class::Retry(TIMEOUT),
            msg: format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(&e)
            ),
        },
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => Failure {
            class: Class::Retry(CONNECTION),
            msg: format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(&e)
            ),
        },
        _ => Failure {
            class: Class::Fatal,
            msg: format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(&e)
            ),
        },
    }
}

/// The SDK client for `opts` (credentials from the options or the standard
/// AWS chain; the SDK's own retries off, the retry layer decides).
async fn build_client(opts: &S3Options) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(opts.region.clone()));
    if let Some((key, secret)) = &opts.static_credentials {
        loader = loader.credentials_provider(aws_credential_types::Credentials::new(
            key.clone(),
            secret.clone(),
            None,
            None,
            "marmoset",
        ));
    }
    let shared = loader.load().await;
    let mut b = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(opts.path_style)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .operation_attempt_timeout(opts.timeout)
                .build(),
        );
    if let Some(ep) = &opts.endpoint {
        b = b.endpoint_url(ep);
    }
    if opts.checksums_when_required {
        b = b
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    }
    Client::from_conf(b.build())
}

pub struct S3Backend {
    client: Client,
    rt: &'static Runtime,
    opts: S3Options,
    multipart_uploads: AtomicU64,
}

impl S3Backend {
    pub fn new(opts: S3Options) -> Result<Self> {
        let rt = runtime()?;
        let for_client = opts.clone();
        let client = block_on(rt, move || async move { build_client(&for_client).await });
        Ok(Self {
            client,
            rt,
            opts,
            multipart_uploads: AtomicU64::new(0),
        })
    }

    fn key(&self, kind: FileKind, name: &str) -> String {
        let p = object_path(kind, name);
        if self.opts.prefix.is_empty() {
            p
        } else {
            format!("{}/{p}", self.opts.prefix)
        }
    }

    fn err(&self, op: &'static str, kind: FileKind, name: &str, f: Failure) -> Error {
        let io_kind = match f.class {
            Class::NotFound => {
                return Error::NotFound {
                    kind,
                    name: name.to_string(),
                }
            }
            Class::Retry(k) => k,
            Class::Fatal => std::io::ErrorKind::Other,
        };
        Error::Backend {
            op,
            kind,
            name: name.to_string(),
            source: std::io::Error::new(
                io_kind,
                format!(
                    "s3://{}/{}: {}",
                    self.opts.bucket,
                    self.key(kind, name),
                    f.msg
                ),
            ),
        }
    }

    /// Gets an object, or the inclusive byte range `first..=last` of it.
    async fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> std::result::Result<Vec<u8>, Failure> {
        let mut req = self.client.get_object().bucket(&self.opts.bucket).key(key);
        if let Some((first, last)) = range {
            req = req.range(format!("bytes={first}-{last}"));
        }
        let out = req.send().await.map_err(classify)?;
        let expected = out.content_length().and_then(|l| u64::try_from(l).ok());
        // The body is copied once, as it arrives, into a buffer of the
        // announced size: collecting it first and then flattening cost two
        // more copies and two fresh buffers of a pack's size per request.
        // The announced size is only a hint (capped), never trusted.
        let hint = expected.map_or(0, |e| e.min(MAX_PREALLOCATION) as usize);
        let mut bytes = Vec::with_capacity(hint);
        let mut body = out.body;
        while let Some(chunk) = body.try_next().await.map_err(|e| Failure {
            class: Class::Retry(CONNECTION),
            msg: format!("body interrupted: {e}"),
        })? {
            bytes.extend_from_slice(&chunk);
        }
        if expected.is_some_and(|e| e != bytes.len() as u64) {
            return Err(Failure {
                class: Class::Retry(CONNECTION),
                msg: format!("truncated body: {} of {:?} bytes", bytes.len(), expected),
            });
        }
        Ok(bytes)
    }

    /// The size S3 reports for `key` (`None` if it reports none).
    async fn head(&self, key: &str) -> std::result::Result<Option<i64>, Failure> {
        let out = self
            .client
            .head_object()
            .bucket(&self.opts.bucket)
            .key(key)
            .send()
            .await
            .map_err(classify)?;
        Ok(out.content_length())
    }

    async fn head_bucket(&self) -> std::result::Result<(), Failure> {
        self.client
            .head_bucket()
            .bucket(&self.opts.bucket)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> std::result::Result<(), Failure> {
        self.client
            .delete_object()
            .bucket(&self.opts.bucket)
            .key(key)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn put(&self, key: &str, data: Bytes) -> std::result::Result<(), Failure> {
        if data.len() > self.opts.multipart_threshold {
            return self.put_multipart(key, &data).await;
        }
        let len = data.len() as i64;
        self.client
            .put_object()
            .bucket(&self.opts.bucket)
            .key(key)
            .content_length(len)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn put_multipart(&self, key: &str, data: &Bytes) -> std::result::Result<(), Failure> {
        self.multipart_uploads.fetch_add(1, Ordering::Relaxed);
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.opts.bucket)
            .key(key)
            .send()
            .await
            .map_err(classify)?;
        let upload_id = out.upload_id().map(str::to_string).ok_or(Failure {
            class: Class::Fatal,
            msg: "no upload id".into(),
        })?;
        let completed = match self.upload_parts(key, &upload_id, data).await {
            Ok(parts) => parts,
            Err(f) => {
                // Leave nothing half-written behind.
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.opts.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                return Err(f);
            }
        };
        let done = CompletedMultipartUpload::builder()
            .set_parts(Some(completed))
            .build();
        let res = self
            .client
            .complete_multipart_upload()
            .bucket(&self.opts.bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(done)
            .send()
            .await;
        match res {
            Ok(_) => {}
            // Some S3-compatibles (moto, older MinIO) answer 200 with a
            // differently named XML root the SDK refuses; the upload is
            // complete, which the size check below confirms.
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 200 => {}
            Err(e) => return Err(classify(e)),
        }
        // Never report success for an object that is not whole.
        let size = self.head(key).await?.unwrap_or(-1);
        if size != data.len() as i64 {
            return Err(Failure {
                class: Class::Retry(std::io::ErrorKind::ConnectionAborted),
                msg: format!(
                    "multipart upload produced {size} bytes, expected {}",
                    data.len()
                ),
            });
        }
        Ok(())
    }

    /// Uploads the parts of `data`, at most `connections` at a time, each a
    /// task on the shared runtime sharing `data`'s buffer. The first
    /// failure stops the rest (they are aborted and waited for, so none
    /// lands after the caller aborts the upload). Returns the parts in
    /// order.
    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        data: &Bytes,
    ) -> std::result::Result<Vec<CompletedPart>, Failure> {
        let part_size = self.opts.part_size.max(5 << 20);
        let in_flight = self.opts.connections.max(1);
        let mut running: JoinSet<std::result::Result<(i32, CompletedPart), Failure>> =
            JoinSet::new();
        let mut done: Vec<(i32, CompletedPart)> = Vec::new();
        let mut start = 0usize;
        let mut number = 1i32;
        loop {
            if start < data.len() && running.len() < in_flight {
                let end = data.len().min(start.saturating_add(part_size));
                running.spawn_on(
                    upload_part(
                        self.client.clone(),
                        self.opts.bucket.clone(),
                        key.to_string(),
                        upload_id.to_string(),
                        number,
                        data.slice(start..end),
                    ),
                    self.rt.handle(),
                );
                start = end;
                number += 1;
                continue;
            }
            let failure = match running.join_next().await {
                None => break,
                Some(Ok(Ok(part))) => {
                    done.push(part);
                    continue;
                }
                Some(Ok(Err(f))) => f,
                Some(Err(e)) => Failure {
                    class: Class::Fatal,
                    msg: format!("part upload task failed: {e}"),
                },
            };
            running.shutdown().await;
            return Err(failure);
        }
        done.sort_by_key(|(n, _)| *n);
        Ok(done.into_iter().map(|(_, part)| part).collect())
    }

    /// Multipart uploads started (each attempt of a retried write counts).
    pub fn multipart_uploads(&self) -> u64 {
        self.multipart_uploads.load(Ordering::Relaxed)
    }

    pub fn options(&self) -> &S3Options {
        &self.opts
    }
}

/// One part of a multipart upload: owns everything, so it can be a task.
async fn upload_part(
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    number: i32,
    chunk: Bytes,
) -> std::result::Result<(i32, CompletedPart), Failure> {
    let len = chunk.len() as i64;
    let out = client
        .upload_part()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .part_number(number)
        .content_length(len)
        .body(ByteStream::from(chunk))
        .send()
        .await
        .map_err(classify)?;
    let part = CompletedPart::builder()
        .part_number(number)
        .set_e_tag(out.e_tag().map(str::to_string))
        .build();
    Ok((number, part))
}

impl ReadBackend for S3Backend {
    fn location(&self) -> String {
        format!(
            "s3:{}/{}/{}",
            self.opts.endpoint.as_deref().unwrap_or("aws"),
            self.opts.bucket,
            self.opts.prefix
        )
    }

    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        let key = self.key(kind, name);
        block_on(self.rt, move || async move { self.get(&key, None).await })
            .map_err(|f| self.err("read", kind, name, f))
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        if length == 0 {
            return Ok(Vec::new());
        }
        let short = || {
            Error::corrupt(
                format!("{kind} {name}"),
                format!("object is shorter than {offset}+{length} bytes (truncated?)"),
            )
        };
        // Ranges come from index entries: a hostile offset must not wrap.
        let last = offset.checked_add(length - 1).ok_or_else(short)?;
        let key = self.key(kind, name);
        let data = block_on(self.rt, move || async move {
            self.get(&key, Some((offset, last))).await
        })
        .map_err(|f| self.err("read", kind, name, f))?;
        if data.len() as u64 != length {
            return Err(short());
        }
        Ok(data)
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        let key = self.key(kind, name);
        let size = block_on(self.rt, move || async move { self.head(&key).await })
            .map_err(|f| self.err("stat", kind, name, f))?;
        Ok(size.and_then(|l| u64::try_from(l).ok()).unwrap_or(0))
    }

    fn write_parallelism(&self) -> usize {
        self.opts.connections.max(1)
    }

    fn is_remote(&self) -> bool {
        true
    }
}

impl ListBackend for S3Backend {
    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        Ok(self
            .list_objects(kind)?
            .into_iter()
            .map(|o| (o.name, o.size))
            .collect())
    }

    /// `LastModified` as set by the storage's clock, not this host's.
    fn list_info(&self, kind: FileKind) -> Result<Vec<ObjectInfo>> {
        self.list_objects(kind)
    }
}

impl S3Backend {
    /// The one listing behind `list` and `list_info` (ListObjectsV2, page
    /// after page; a failed page fails the listing).
    fn list_objects(&self, kind: FileKind) -> Result<Vec<ObjectInfo>> {
        let prefix = match kind {
            FileKind::Config => self.key(kind, ""),
            _ => {
                let folder = kind.folder().unwrap_or("");
                if self.opts.prefix.is_empty() {
                    format!("{folder}/")
                } else {
                    format!("{}/{folder}/", self.opts.prefix)
                }
            }
        };
        block_on(self.rt, move || async move {
            self.list_pages(kind, &prefix).await
        })
        .map_err(|f| self.err("list", kind, "", f))
    }

    async fn list_pages(
        &self,
        kind: FileKind,
        prefix: &str,
    ) -> std::result::Result<Vec<ObjectInfo>, Failure> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.opts.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(classify)?;
            for obj in page.contents() {
                let Some(key) = obj.key() else { continue };
                let name = key.rsplit('/').next().unwrap_or(key);
                if kind == FileKind::Config && key != prefix {
                    continue;
                }
                out.push(ObjectInfo {
                    name: name.to_string(),
                    size: obj.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    modified: obj.last_modified().and_then(to_chrono),
                });
            }
            token = page.next_continuation_token().map(str::to_string);
            if token.is_none() {
                return Ok(out);
            }
        }
    }
}

/// An S3 timestamp as a chrono time (`None` if out of chrono's range).
fn to_chrono(t: &aws_smithy_types::DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::<chrono::Utc>::from_timestamp(t.secs(), t.subsec_nanos())
}

impl WriteBackend for S3Backend {
    fn create(&self) -> Result<()> {
        // Buckets are provisioned by operators (credentials rarely allow
        // creating them); check it exists so the error comes early.
        block_on(self.rt, move || async move { self.head_bucket().await }).map_err(|f| {
            let (io_kind, msg) = match f.class {
                Class::NotFound => (
                    std::io::ErrorKind::Other,
                    format!("bucket {} does not exist", self.opts.bucket),
                ),
                Class::Retry(k) => (k, f.msg),
                Class::Fatal => (std::io::ErrorKind::Other, f.msg),
            };
            Error::Backend {
                op: "create",
                kind: FileKind::Config,
                name: String::new(),
                source: std::io::Error::new(io_kind, format!("s3://{}: {msg}", self.opts.bucket)),
            }
        })
    }

    fn write(&self, kind: FileKind, name: &str, data: Bytes) -> Result<()> {
        let key = self.key(kind, name);
        block_on(self.rt, move || async move { self.put(&key, data).await })
            .map_err(|f| self.err("write", kind, name, f))
    }
}

impl DeleteBackend for S3Backend {
    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        let key = self.key(kind, name);
        let shown = key.clone();
        match block_on(self.rt, move || async move { self.delete(&key).await }) {
            Ok(()) => Ok(()),
            Err(f) if matches!(f.class, Class::NotFound) => Ok(()),
            Err(f) => {
                warn!(key = %shown, error = %f.msg, "delete failed");
                Err(self.err("remove", kind, name, f))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repository_urls() -> Result<()> {
        let o = S3Options::from_url("s3:https://s3.us-east-005.backblazeb2.com/Marmoset/velero")?;
        assert_eq!(
            o.endpoint.as_deref(),
            Some("https://s3.us-east-005.backblazeb2.com")
        );
        assert_eq!(
            (o.bucket.as_str(), o.prefix.as_str(), o.region.as_str()),
            ("Marmoset", "velero", "us-east-005")
        );
        let o = S3Options::from_url("s3://bucket/a/b/")?;
        assert_eq!(
            (o.endpoint, o.bucket.as_str(), o.prefix.as_str()),
            (None, "bucket", "a/b")
        );
        let o = S3Options::from_url("s3:http://127.0.0.1:9000/b")?;
        assert_eq!(
            (o.endpoint.as_deref(), o.prefix.as_str()),
            (Some("http://127.0.0.1:9000"), "")
        );
        assert!(S3Options::from_url("s3:").is_err());
        assert!(S3Options::from_url("s3:https://host-only").is_err());
        for url in [
            "s3:http://AKID:s3cr3tvalue@127.0.0.1:9000/b",
            "s3:HTTP://AKID:s3cr3tvalue@127.0.0.1:9000/b",
            "s3://AKID:s3cr3tvalue@127.0.0.1/b",
        ] {
            let err = S3Options::from_url(url)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("credentials do not belong"), "{url}: {err}");
            assert!(!err.contains("s3cr3tvalue"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn debug_output_redacts_credentials() {
        let o = S3Options {
            static_credentials: Some(("AKIAEXAMPLEKEYID".into(), "wJalrXUtnFEMI-secret".into())),
            bucket: "backups".into(),
            ..S3Options::default()
        };
        for shown in [format!("{o:?}"), format!("{o:#?}")] {
            assert!(!shown.contains("wJalrXUtnFEMI-secret"), "{shown}");
            assert!(!shown.contains("AKIAEXAMPLEKEYID"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
            assert!(shown.contains("backups"), "{shown}");
        }
    }

    #[test]
    fn storage_times_convert_to_chrono() {
        let t = aws_smithy_types::DateTime::from_secs_and_nanos(1_700_000_000, 250_000_000);
        let c = to_chrono(&t).map(|c| (c.timestamp(), c.timestamp_subsec_nanos()));
        assert_eq!(c, Some((1_700_000_000, 250_000_000)));
    }

    /// Regression test for the agent's shutdown panic: a backend made and
    /// dropped inside an async task (as the agent drops its repository in
    /// `block_on`) must not drop a runtime there, and blocking calls from
    /// async contexts of either runtime flavour must not panic.
    #[test]
    fn backends_are_made_and_dropped_inside_async_contexts_without_panics() -> Result<()> {
        let o = S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            bucket: "b".into(),
            static_credentials: Some(("k".into(), "s".into())),
            ..S3Options::default()
        };
        let current = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("runtime", e))?;
        current.block_on(async {
            let b = S3Backend::new(o.clone())?;
            assert_eq!(b.multipart_uploads(), 0);
            drop(b);
            Ok::<(), Error>(())
        })?;
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Error::io("runtime", e))?;
        multi.block_on(async {
            let b = S3Backend::new(o.clone())?;
            drop(b);
            Ok::<(), Error>(())
        })?;
        // And from a blocking thread, the way the agent calls storage.
        let from_blocking = multi.block_on(async move {
            tokio::task::spawn_blocking(move || S3Backend::new(o).map(drop)).await
        });
        assert!(matches!(from_blocking, Ok(Ok(()))));
        Ok(())
    }

    #[test]
    fn failures_map_to_retryable_errors_by_class() -> Result<()> {
        let b = S3Backend::new(S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            bucket: "b".into(),
            static_credentials: Some(("k".into(), "s".into())),
            ..S3Options::default()
        })?;
        let f = |class| Failure {
            class,
            msg: "m".into(),
        };
        assert!(b
            .err("read", FileKind::Pack, "p", f(Class::Retry(TRY_LATER)))
            .retryable());
        assert!(b
            .err("read", FileKind::Pack, "p", f(Class::Retry(CONNECTION)))
            .retryable());
        assert!(b
            .err("read", FileKind::Pack, "p", f(Class::Retry(TIMEOUT)))
            .retryable());
        assert!(b
            .err(
                "write",
                FileKind::Pack,
                "p",
                f(Class::Retry(std::io::ErrorKind::ConnectionAborted))
            )
            .retryable());
        assert!(!b
            .err("read", FileKind::Pack, "p", f(Class::Fatal))
            .retryable());
        assert!(matches!(
            b.err("read", FileKind::Pack, "p", f(Class::NotFound)),
            Error::NotFound { .. }
        ));
        let shown = b
            .err("read", FileKind::Pack, "p", f(Class::Fatal))
            .to_string();
        assert!(shown.contains("s3://b/"), "{shown}");
        Ok(())
    }
}
