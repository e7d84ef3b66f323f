//! S3-compatible object storage (AWS S3, Backblaze B2, MinIO, ...) through
//! `aws-sdk-s3` on a private tokio runtime.
//!
//! The backend traits are synchronous (the engine's pipelines are thread
//! pools); each call blocks on the runtime, and parallelism comes from the
//! callers' threads (8 pack uploaders by default, see `write_parallelism`).
//! Every request goes through one retry loop with exponential backoff and
//! full jitter for 5xx, SlowDown, timeouts, resets and truncated bodies;
//! 403 / missing bucket fail at once with bucket and key in the message.
//! Objects are written with a single PUT, or a multipart upload (parts in
//! parallel) above a threshold, so no reader ever sees half an object.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use rand::Rng;
use serde::Serialize;
use tracing::{debug, warn};

use super::{
    object_path, DeleteBackend, FileKind, ListBackend, ObjectInfo, ReadBackend, WriteBackend,
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
    /// Parallel pack uploads.
    pub connections: usize,
    /// Objects above this size use multipart uploads.
    pub multipart_threshold: usize,
    pub part_size: usize,
    pub max_attempts: u32,
    /// Upload bandwidth limit in bytes per second (`None` = unlimited).
    pub limit_upload: Option<u64>,
    /// Per-attempt timeout.
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
            .field("max_attempts", &self.max_attempts)
            .field("limit_upload", &self.limit_upload)
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
            max_attempts: 10,
            limit_upload: None,
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

/// Request counts and bytes, for the `--json` and human summaries.
/// Backblaze bills class A (uploads, deletes: free), class B (downloads)
/// and class C (listing and the rest) differently.
#[derive(Debug, Default, Serialize, Clone)]
pub struct BackendStats {
    pub put: u64,
    pub get: u64,
    pub head: u64,
    pub list: u64,
    pub delete: u64,
    pub multipart: u64,
    pub retries: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub b2_class_a: u64,
    pub b2_class_b: u64,
    pub b2_class_c: u64,
}

#[derive(Default)]
struct Counters {
    put: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
    multipart_other: AtomicU64,
    retries: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// Token bucket shared by all uploads.
struct Limiter {
    rate: f64,
    state: Mutex<(Instant, f64)>,
}

impl Limiter {
    fn wait_time(&self, bytes: u64) -> Duration {
        let mut g = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let (last, tokens) = *g;
        // Allow a burst of one second's worth.
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.rate);
        let left = tokens - bytes as f64;
        *g = (now, left);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.rate)
        }
    }
}

enum Class {
    NotFound,
    Retry,
    Fatal,
}

struct Failure {
    class: Class,
    msg: String,
}

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
            } else if status >= 500
                || status == 429
                || code == "SlowDown"
                || code == "RequestTimeout"
            {
                Class::Retry
            } else {
                Class::Fatal
            };
            Failure { class, msg }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Failure {
                class: Class::Retry,
                msg: format!(
                    "{}",
                    aws_smithy_types::error::display::DisplayErrorContext(&e)
                ),
            }
        }
        _ => Failure {
            class: Class::Fatal,
            msg: format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(&e)
            ),
        },
    }
}

pub struct S3Backend {
    client: Client,
    rt: tokio::runtime::Runtime,
    opts: S3Options,
    counters: Arc<Counters>,
    limiter: Option<Limiter>,
}

impl S3Backend {
    pub fn new(opts: S3Options) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .thread_name("marmoset-s3")
            .build()
            .map_err(|e| Error::io("tokio runtime", e))?;
        let client = rt.block_on(async {
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
        });
        let limiter = opts.limit_upload.filter(|&r| r > 0).map(|r| Limiter {
            rate: r as f64,
            state: Mutex::new((Instant::now(), r as f64)),
        });
        Ok(Self {
            client,
            rt,
            opts,
            counters: Arc::default(),
            limiter,
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
        match f.class {
            Class::NotFound => Error::NotFound {
                kind,
                name: name.to_string(),
            },
            _ => Error::Backend {
                op,
                kind,
                name: name.to_string(),
                source: std::io::Error::other(format!(
                    "s3://{}/{}: {}",
                    self.opts.bucket,
                    self.key(kind, name),
                    f.msg
                )),
            },
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the attempts
    /// are used up; backoff doubles from 200 ms (cap 20 s) with full jitter.
    async fn retry<T, F, Fut>(&self, what: &str, mut attempt: F) -> std::result::Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Failure>>,
    {
        let mut n = 0;
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(f) if matches!(f.class, Class::Retry) && n + 1 < self.opts.max_attempts => {
                    n += 1;
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    let cap = (200u64 << n.min(7)).min(20_000);
                    let ms = rand::thread_rng().gen_range(0..=cap);
                    debug!(what, attempt = n, error = %f.msg, "retrying in {ms} ms");
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Err(mut f) => {
                    if matches!(f.class, Class::Retry) {
                        f.msg = format!("{} (gave up after {} attempts)", f.msg, n + 1);
                    }
                    return Err(f);
                }
            }
        }
    }

    async fn throttle(&self, bytes: u64) {
        if let Some(l) = &self.limiter {
            let wait = l.wait_time(bytes);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }

    /// Gets an object, or the inclusive byte range `first..=last` of it.
    async fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> std::result::Result<Vec<u8>, Failure> {
        self.retry(key, || async {
            self.counters.get.fetch_add(1, Ordering::Relaxed);
            let mut req = self.client.get_object().bucket(&self.opts.bucket).key(key);
            if let Some((first, last)) = range {
                req = req.range(format!("bytes={first}-{last}"));
            }
            let out = req.send().await.map_err(classify)?;
            let expected = out.content_length().and_then(|l| u64::try_from(l).ok());
            let body = out.body.collect().await.map_err(|e| Failure {
                class: Class::Retry,
                msg: format!("body interrupted: {e}"),
            })?;
            let bytes = body.into_bytes().to_vec();
            self.counters
                .bytes_down
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if expected.is_some_and(|e| e != bytes.len() as u64) {
                return Err(Failure {
                    class: Class::Retry,
                    msg: format!("truncated body: {} of {:?} bytes", bytes.len(), expected),
                });
            }
            Ok(bytes)
        })
        .await
    }

    async fn put(&self, key: &str, data: &[u8]) -> std::result::Result<(), Failure> {
        if data.len() > self.opts.multipart_threshold {
            return self.put_multipart(key, data).await;
        }
        self.throttle(data.len() as u64).await;
        self.retry(key, || async {
            self.counters.put.fetch_add(1, Ordering::Relaxed);
            self.client
                .put_object()
                .bucket(&self.opts.bucket)
                .key(key)
                .content_length(data.len() as i64)
                .body(ByteStream::from(data.to_vec()))
                .send()
                .await
                .map_err(classify)?;
            self.counters
                .bytes_up
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok(())
        })
        .await
    }

    async fn put_multipart(&self, key: &str, data: &[u8]) -> std::result::Result<(), Failure> {
        let upload_id = self
            .retry(key, || async {
                self.counters
                    .multipart_other
                    .fetch_add(1, Ordering::Relaxed);
                let out = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.opts.bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(classify)?;
                out.upload_id().map(str::to_string).ok_or(Failure {
                    class: Class::Fatal,
                    msg: "no upload id".into(),
                })
            })
            .await?;
        let parts: Vec<(i32, &[u8])> = data
            .chunks(self.opts.part_size.max(5 << 20))
            .enumerate()
            .map(|(i, c)| (i as i32 + 1, c))
            .collect();
        let uploads = parts.iter().map(|(n, chunk)| {
            let upload_id = upload_id.clone();
            async move {
                self.throttle(chunk.len() as u64).await;
                self.retry(key, || async {
                    self.counters.put.fetch_add(1, Ordering::Relaxed);
                    let out = self
                        .client
                        .upload_part()
                        .bucket(&self.opts.bucket)
                        .key(key)
                        .upload_id(&upload_id)
                        .part_number(*n)
                        .content_length(chunk.len() as i64)
                        .body(ByteStream::from(chunk.to_vec()))
                        .send()
                        .await
                        .map_err(classify)?;
                    self.counters
                        .bytes_up
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    Ok(CompletedPart::builder()
                        .part_number(*n)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .build())
                })
                .await
            }
        });
        let results = futures_join_all(uploads).await;
        let mut completed = Vec::new();
        for r in results {
            match r {
                Ok(p) => completed.push(p),
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
            }
        }
        let done = CompletedMultipartUpload::builder()
            .set_parts(Some(completed))
            .build();
        self.retry(key, || async {
            self.counters
                .multipart_other
                .fetch_add(1, Ordering::Relaxed);
            let res = self
                .client
                .complete_multipart_upload()
                .bucket(&self.opts.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(done.clone())
                .send()
                .await;
            match res {
                Ok(_) => Ok(()),
                // Some S3-compatibles (moto, older MinIO) answer 200 with a
                // differently named XML root the SDK refuses; the upload is
                // complete, which the size check below confirms.
                Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 200 => Ok(()),
                Err(e) => Err(classify(e)),
            }
        })
        .await?;
        // Never report success for an object that is not whole.
        let size = self
            .retry(key, || async {
                self.counters.head.fetch_add(1, Ordering::Relaxed);
                let out = self
                    .client
                    .head_object()
                    .bucket(&self.opts.bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(classify)?;
                Ok(out.content_length().unwrap_or(-1))
            })
            .await?;
        if size != data.len() as i64 {
            return Err(Failure {
                class: Class::Retry,
                msg: format!(
                    "multipart upload produced {size} bytes, expected {}",
                    data.len()
                ),
            });
        }
        Ok(())
    }

    pub fn stats(&self) -> BackendStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (put, get, head, list, delete, mp) = (
            l(&c.put),
            l(&c.get),
            l(&c.head),
            l(&c.list),
            l(&c.delete),
            l(&c.multipart_other),
        );
        BackendStats {
            put,
            get,
            head,
            list,
            delete,
            multipart: mp,
            retries: l(&c.retries),
            bytes_up: l(&c.bytes_up),
            bytes_down: l(&c.bytes_down),
            b2_class_a: put + delete,
            b2_class_b: get + head,
            b2_class_c: list + mp,
        }
    }

    pub fn options(&self) -> &S3Options {
        &self.opts
    }
}

/// Runs futures concurrently on the current task (no extra dependency).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let futs: Vec<_> = futs.map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    let mut pending: Vec<(usize, std::pin::Pin<Box<F>>)> = futs.into_iter().enumerate().collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|(i, f)| match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => {
                outs[*i] = Some(v);
                false
            }
            std::task::Poll::Pending => true,
        });
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outs.into_iter().flatten().collect()
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
        self.rt
            .block_on(self.get(&key, None))
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
        let data = self
            .rt
            .block_on(self.get(&key, Some((offset, last))))
            .map_err(|f| self.err("read", kind, name, f))?;
        if data.len() as u64 != length {
            return Err(short());
        }
        Ok(data)
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        let key = self.key(kind, name);
        self.rt
            .block_on(self.retry(&key, || async {
                self.counters.head.fetch_add(1, Ordering::Relaxed);
                let out = self
                    .client
                    .head_object()
                    .bucket(&self.opts.bucket)
                    .key(&key)
                    .send()
                    .await
                    .map_err(classify)?;
                Ok(out
                    .content_length()
                    .and_then(|l| u64::try_from(l).ok())
                    .unwrap_or(0))
            }))
            .map_err(|f| self.err("stat", kind, name, f))
    }

    fn stats(&self) -> Option<BackendStats> {
        Some(S3Backend::stats(self))
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
    /// after page).
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
        let result = self.rt.block_on(async {
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let page = self
                    .retry(&prefix, || async {
                        self.counters.list.fetch_add(1, Ordering::Relaxed);
                        self.client
                            .list_objects_v2()
                            .bucket(&self.opts.bucket)
                            .prefix(&prefix)
                            .set_continuation_token(token.clone())
                            .send()
                            .await
                            .map_err(classify)
                    })
                    .await?;
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
        });
        result.map_err(|f| self.err("list", kind, "", f))
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
        self.rt
            .block_on(self.retry(&self.opts.bucket, || async {
                self.counters.head.fetch_add(1, Ordering::Relaxed);
                self.client
                    .head_bucket()
                    .bucket(&self.opts.bucket)
                    .send()
                    .await
                    .map_err(classify)?;
                Ok(())
            }))
            .map_err(|f| {
                let msg = if matches!(f.class, Class::NotFound) {
                    format!("bucket {} does not exist", self.opts.bucket)
                } else {
                    f.msg
                };
                Error::Backend {
                    op: "create",
                    kind: FileKind::Config,
                    name: String::new(),
                    source: std::io::Error::other(format!("s3://{}: {msg}", self.opts.bucket)),
                }
            })
    }

    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        let key = self.key(kind, name);
        self.rt
            .block_on(self.put(&key, data))
            .map_err(|f| self.err("write", kind, name, f))
    }
}

impl DeleteBackend for S3Backend {
    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        let key = self.key(kind, name);
        let r = self.rt.block_on(self.retry(&key, || async {
            self.counters.delete.fetch_add(1, Ordering::Relaxed);
            self.client
                .delete_object()
                .bucket(&self.opts.bucket)
                .key(&key)
                .send()
                .await
                .map_err(classify)?;
            Ok(())
        }));
        match r {
            Ok(()) => Ok(()),
            Err(f) if matches!(f.class, Class::NotFound) => Ok(()),
            Err(f) => {
                warn!(key = %key, error = %f.msg, "delete failed");
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

    #[test]
    fn limiter_spaces_out_uploads() {
        let l = Limiter {
            rate: 1000.0,
            state: Mutex::new((Instant::now(), 1000.0)),
        };
        assert_eq!(l.wait_time(500), Duration::ZERO);
        assert!(l.wait_time(1500) >= Duration::from_millis(900));
    }
}
