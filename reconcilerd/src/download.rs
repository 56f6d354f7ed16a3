//! Module downloads into the cache: HTTP(S) with resume (`Range` from where `<hash>.partial`
//! ends, `If-Range` with the validator first seen), `file://` copies, the SHA-256 of the whole
//! file checked before it appears under its hash, a bound on concurrent transfers, and the
//! per-module tasks that retry with backoff until the module is no longer wanted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, ETAG, HeaderMap, IF_RANGE, LAST_MODIFIED, RANGE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::crash;
use crate::store::ModuleCache;

/// Why a module could not be fetched. The `Display` texts of the first two are EVP's own
/// failure messages, which hubs may already show to operators.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The whole file's SHA-256 is not the manifest's `hash` (or the hash is not 64 hex
    /// digits); the partial file was deleted, so the next attempt starts from 0.
    #[error("Module hash mismatch")]
    HashMismatch,
    /// The server answered with a status other than 200, 206 or 416.
    #[error("Download failed HTTP Response = {0}")]
    HttpStatus(u16),
    /// The connection failed, was cut, or stalled longer than the read timeout; what was
    /// received is kept for the next attempt to resume from.
    #[error("Download failed: {0}")]
    Transfer(String),
    /// The URL scheme is not `http`, `https` or `file`.
    #[error("unsupported download URL {0:?}")]
    UnsupportedScheme(String),
    /// Reading the source file or writing the cache failed.
    #[error("Error when saving module: {0}")]
    Io(#[from] std::io::Error),
}

impl FetchError {
    /// Whether trying again later may help; an unsupported URL never will.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, FetchError::UnsupportedScheme(_))
    }
}

/// Why the HTTP client could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `EVP_HTTP_PROXY_HOST`/`PORT` (or `[reconciler] http_proxy_*`) do not form a proxy URL.
    #[error("HTTP proxy {url:?}: {source}")]
    Proxy {
        /// The proxy URL built from host and port.
        url: String,
        /// What reqwest said.
        source: reqwest::Error,
    },
    /// The file named by `EVP_HTTPS_CA_CERT` (or `EVP_TLS_CA_CERT`) cannot be read.
    #[error("reading the HTTPS CA certificate {path}: {source}")]
    CaRead {
        /// The CA file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The CA file holds no PEM certificate and is not one DER certificate either.
    #[error("the HTTPS CA certificate {0} holds no PEM or DER certificate")]
    CaParse(PathBuf),
    /// reqwest refused the client configuration (for example the TLS roots).
    #[error("building the HTTP client: {0}")]
    Build(reqwest::Error),
}

/// An HTTP proxy for module downloads (EVP's `EVP_HTTP_PROXY_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Basic-auth user, if the proxy wants one.
    pub username: Option<String>,
    /// Basic-auth password.
    pub password: Option<String>,
}

/// How downloads are made.
#[derive(Debug, Clone)]
pub struct DownloadConfig {
    /// Transfers running at once; more wait their turn.
    pub max_concurrent: usize,
    /// A transfer that receives nothing for this long fails (and is resumed later).
    pub read_timeout: Duration,
    /// Proxy for HTTP and HTTPS downloads.
    pub proxy: Option<ProxyConfig>,
    /// An extra trusted CA (PEM bundle or one DER certificate) besides the system's.
    pub ca_cert: Option<PathBuf>,
    /// First retry delay of a failed download.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            max_concurrent: 4,
            read_timeout: Duration::from_secs(60),
            proxy: None,
            ca_cert: None,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// How far a transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the module file on disk so far (resumed bytes included).
    pub done: u64,
    /// The whole file's size, when the server said.
    pub total: Option<u64>,
}

/// Shortest interval between two progress reports of one transfer: the status (and so the
/// hub's report) follows a download without a D-Bus signal per network read.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Interval between two progress lines in the log for one transfer.
const LOG_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on connection establishment; a link that cannot connect in this long is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Read buffer for `file://` copies and for hashing a partial file.
const COPY_BUFFER: usize = 64 * 1024;
/// Length of a SHA-256 in hex digits.
const SHA256_HEX_LEN: usize = 64;

/// What is kept beside `<hash>.partial`: where it came from and the validator that `If-Range`
/// must match for the server to send the rest rather than a different file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PartialMeta {
    url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    validator: Option<String>,
}

/// Fetches modules into a [`ModuleCache`]; cheap to clone, shared by all download tasks.
#[derive(Clone)]
pub struct Downloader {
    cache: ModuleCache,
    http: reqwest::Client,
    permits: Arc<Semaphore>,
    /// One lock per hash: two modules with the same content never write the same partial.
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Downloader {
    /// A downloader into `cache`, configured by `config`.
    pub fn new(cache: ModuleCache, config: &DownloadConfig) -> Result<Self, ClientError> {
        // One process-wide TLS provider, chosen explicitly: ring builds without cmake or nasm.
        // Installing it twice is harmless (the second call is refused).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .tls_backend_rustls()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(config.read_timeout);
        if let Some(p) = &config.proxy {
            let url = format!("http://{}:{}", p.host, p.port);
            let mut proxy = reqwest::Proxy::all(&url).map_err(|source| ClientError::Proxy {
                url: url.clone(),
                source,
            })?;
            if let Some(user) = &p.username {
                proxy = proxy.basic_auth(user, p.password.as_deref().unwrap_or(""));
            }
            builder = builder.proxy(proxy);
        }
        if let Some(path) = &config.ca_cert {
            let bytes = std::fs::read(path).map_err(|source| ClientError::CaRead {
                path: path.clone(),
                source,
            })?;
            builder = builder.tls_certs_merge(parse_ca(path, &bytes)?);
        }
        let http = builder.build().map_err(ClientError::Build)?;
        Ok(Downloader {
            cache,
            http,
            permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            locks: Arc::default(),
        })
    }

    /// The cache this downloader fills.
    pub fn cache(&self) -> &ModuleCache {
        &self.cache
    }

    /// Returns the cached file with this hash, fetching `url` into the cache first if it is
    /// not there. Nothing appears under the final name unless the whole file's hash matched.
    /// `progress` is called at most every 250 ms while bytes arrive.
    pub async fn fetch(
        &self,
        url: &str,
        sha256: &str,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PathBuf, FetchError> {
        let sha256 = sha256.to_ascii_lowercase();
        if sha256.len() != SHA256_HEX_LEN || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(FetchError::HashMismatch);
        }
        let target = self.cache.path_of(&sha256);
        if target.exists() {
            return Ok(target);
        }
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
            locks.entry(sha256.clone()).or_default().clone()
        };
        let _same_hash = lock.lock().await;
        if target.exists() {
            return Ok(target);
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| FetchError::Transfer("the downloader was shut down".into()))?;
        let partial = self.cache.partial_of(&sha256);
        let meta = self.cache.partial_meta_of(&sha256);
        let written = if let Some(path) = url.strip_prefix("file://") {
            copy_file(Path::new(path), &partial, progress).await
        } else if url.starts_with("http://") || url.starts_with("https://") {
            self.download(url, &sha256, &partial, &meta, progress).await
        } else {
            return Err(FetchError::UnsupportedScheme(url.to_owned()));
        };
        let got = written?;
        crash::point("module-partial-written");
        if got != sha256 {
            let _ = tokio::fs::remove_file(&partial).await;
            let _ = tokio::fs::remove_file(&meta).await;
            warn!("module from {url}: expected SHA-256 {sha256}, got {got}; partial file deleted");
            return Err(FetchError::HashMismatch);
        }
        set_mode(&partial, MODULE_MODE)?;
        tokio::fs::rename(&partial, &target).await?;
        crash::point("module-renamed");
        std::fs::File::open(self.cache.dir())?.sync_all()?;
        let _ = tokio::fs::remove_file(&meta).await;
        info!(sha256, url, "module cached");
        Ok(target)
    }

    /// Downloads `url` into `partial`, resuming from its end when the server allows; returns
    /// the hex SHA-256 of the whole partial file once the body is complete and synced.
    async fn download(
        &self,
        url: &str,
        sha256: &str,
        partial: &Path,
        meta_path: &Path,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<String, FetchError> {
        if partial.exists() {
            // A crash may have left it read-only (its final mode is set just before rename).
            set_mode(partial, PARTIAL_MODE)?;
        }
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(partial)
            .await?;
        let mut have = out.metadata().await?.len();
        let mut hasher = Sha256::new();
        if have > 0 {
            hash_file(partial, &mut hasher).await?;
            if hex::encode(hasher.clone().finalize()) == sha256 {
                info!(url, bytes = have, "partial download is already complete");
                return Ok(sha256.to_owned());
            }
        }
        let meta = read_meta(meta_path).await.filter(|m| m.url == url);
        // At most twice: a refused resume starts over from 0 once in the same attempt.
        let mut response = loop {
            let mut request = self.http.get(url);
            if have > 0 {
                request = request.header(RANGE, format!("bytes={have}-"));
                if let Some(v) = meta.as_ref().and_then(|m| m.validator.as_deref()) {
                    request = request.header(IF_RANGE, v);
                }
                info!(url, from = have, "resuming module download");
            } else {
                info!(url, "downloading module");
            }
            let response = request
                .send()
                .await
                .map_err(|e| FetchError::Transfer(error_chain(&e)))?;
            let status = response.status();
            let resumed_at = (status == StatusCode::PARTIAL_CONTENT)
                .then(|| content_range(response.headers()))
                .flatten();
            match status {
                StatusCode::PARTIAL_CONTENT
                    if have > 0 && resumed_at.map(|r| r.0) == Some(have) =>
                {
                    break response;
                }
                StatusCode::OK => {
                    if have > 0 {
                        info!(
                            url,
                            had = have,
                            "the server sent the whole file (Range ignored, or the file changed); starting over"
                        );
                        restart_partial(&mut out, &mut hasher, &mut have).await?;
                    }
                    let validator = validator(response.headers());
                    write_meta(
                        meta_path,
                        &PartialMeta {
                            url: url.to_owned(),
                            validator,
                        },
                    )
                    .await?;
                    break response;
                }
                StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
                    // A range we did not ask for, or the file is now shorter than what we have.
                    info!(url, had = have, %status, "the server cannot resume this file; starting over");
                    restart_partial(&mut out, &mut hasher, &mut have).await?;
                }
                other => return Err(FetchError::HttpStatus(other.as_u16())),
            }
        };
        let total = match content_range(response.headers()) {
            Some((_, total)) => total,
            None => response.content_length().map(|n| n + have),
        };
        let mut done = have;
        progress(Progress { done, total });
        let mut last_report = Instant::now();
        let mut last_log = Instant::now();
        let body = loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if let Err(e) = out.write_all(&chunk).await {
                        break Err(FetchError::Io(e));
                    }
                    hasher.update(&chunk);
                    done += chunk.len() as u64;
                    if last_report.elapsed() >= PROGRESS_INTERVAL {
                        last_report = Instant::now();
                        progress(Progress { done, total });
                    }
                    if last_log.elapsed() >= LOG_INTERVAL {
                        last_log = Instant::now();
                        info!(url, done, total, "module download progress");
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(FetchError::Transfer(error_chain(&e))),
            }
        };
        // What arrived stays on disk for the next attempt, also after a failure.
        out.flush().await?;
        if let Err(e) = body {
            warn!(url, done, total, "module download interrupted: {e}");
            return Err(e);
        }
        out.sync_all().await?;
        progress(Progress { done, total });
        info!(url, bytes = done, "module download complete");
        Ok(hex::encode(hasher.finalize()))
    }
}

/// The certificates of a CA file: a PEM bundle, or one DER certificate. Each is parsed here,
/// so a file that holds no certificate is refused at start rather than trusted as nothing.
fn parse_ca(path: &Path, bytes: &[u8]) -> Result<Vec<reqwest::Certificate>, ClientError> {
    let mut ders: Vec<Vec<u8>> = rustls_pemfile::certs(&mut &bytes[..])
        .filter_map(Result::ok)
        .map(|c| c.as_ref().to_vec())
        .collect();
    if ders.is_empty() {
        ders.push(bytes.to_vec());
    }
    ders.iter()
        .map(|der| {
            x509_parser::parse_x509_certificate(der)
                .ok()
                .and_then(|_| reqwest::Certificate::from_der(der).ok())
                .ok_or_else(|| ClientError::CaParse(path.to_owned()))
        })
        .collect()
}

/// Empties the partial file and the running hash, to download from 0.
async fn restart_partial(
    out: &mut tokio::fs::File,
    hasher: &mut Sha256,
    have: &mut u64,
) -> std::io::Result<()> {
    out.set_len(0).await?;
    *hasher = Sha256::new();
    *have = 0;
    Ok(())
}

/// Copies a local file into `partial` (from 0), returning its hex SHA-256.
async fn copy_file(
    src: &Path,
    partial: &Path,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<String, FetchError> {
    let mut input = tokio::fs::File::open(src).await?;
    let total = input.metadata().await.ok().map(|m| m.len());
    if partial.exists() {
        set_mode(partial, PARTIAL_MODE)?;
    }
    let mut out = tokio::fs::File::create(partial).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut done = 0u64;
    let mut last_report = Instant::now();
    loop {
        let n = input.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).await?;
        done += n as u64;
        if last_report.elapsed() >= PROGRESS_INTERVAL {
            last_report = Instant::now();
            progress(Progress { done, total });
        }
    }
    out.flush().await?;
    out.sync_all().await?;
    progress(Progress { done, total });
    Ok(hex::encode(hasher.finalize()))
}

async fn hash_file(path: &Path, hasher: &mut Sha256) -> std::io::Result<()> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

async fn read_meta(path: &Path) -> Option<PartialMeta> {
    let text = tokio::fs::read(path).await.ok()?;
    serde_json::from_slice(&text).ok()
}

async fn write_meta(path: &Path, meta: &PartialMeta) -> std::io::Result<()> {
    let text = serde_json::to_vec(meta).map_err(std::io::Error::other)?;
    tokio::fs::write(path, text).await
}

/// The validator `If-Range` may carry: a strong ETag, else Last-Modified (weak ETags are not
/// allowed in `If-Range`).
fn validator(headers: &HeaderMap) -> Option<String> {
    let etag = headers
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.starts_with("W/"));
    etag.or_else(|| headers.get(LAST_MODIFIED).and_then(|v| v.to_str().ok()))
        .map(str::to_owned)
}

/// `Content-Range: bytes <start>-<end>/<total or *>` → (start, total).
fn content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// reqwest's error with its sources, which say what actually failed (reset, timeout, TLS).
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Mode of a verified module file: readable and executable by the runtimes (through the cache
/// directory's group), writable by nobody, so a module never changes under a running instance.
const MODULE_MODE: u32 = 0o550;
/// Mode of a partial file while it is written.
const PARTIAL_MODE: u32 = 0o640;

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// What a download task reports to the reconcile loop. `task` tells a task apart from an
/// earlier, cancelled one for the same hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadEvent {
    /// An attempt started.
    Started {
        /// The module file's hash.
        hash: String,
        /// The task's number.
        task: u64,
    },
    /// Bytes arrived.
    Progress {
        /// The module file's hash.
        hash: String,
        /// The task's number.
        task: u64,
        /// How far.
        progress: Progress,
    },
    /// An attempt failed; the task retries after `retry_in`, or never when `None`.
    Failed {
        /// The module file's hash.
        hash: String,
        /// The task's number.
        task: u64,
        /// The failure message for the module's status.
        message: String,
        /// When the next attempt comes.
        retry_in: Option<Duration>,
    },
    /// The file is in the cache; the task ended.
    Done {
        /// The module file's hash.
        hash: String,
        /// The task's number.
        task: u64,
    },
}

/// Where download tasks send their events.
pub type EventSink = Arc<dyn Fn(DownloadEvent) + Send + Sync>;

struct Task {
    id: u64,
    url: String,
    handle: JoinHandle<()>,
}

/// The running download tasks, one per module hash; owned by the reconcile loop.
pub struct Downloads {
    downloader: Downloader,
    sink: EventSink,
    retry_base: Duration,
    retry_max: Duration,
    tasks: HashMap<String, Task>,
    next_id: u64,
}

impl Downloads {
    /// No tasks yet; they will report to `sink`.
    pub fn new(downloader: Downloader, config: &DownloadConfig, sink: EventSink) -> Self {
        Downloads {
            downloader,
            sink,
            retry_base: config.retry_base,
            retry_max: config.retry_max,
            tasks: HashMap::new(),
            next_id: 0,
        }
    }

    /// The cache the tasks fill.
    pub fn cache(&self) -> &ModuleCache {
        self.downloader.cache()
    }

    /// Makes sure a task fetches `hash` (from `url`); an existing one carries on untouched.
    pub fn ensure(&mut self, hash: &str, url: &str) {
        if self.tasks.contains_key(hash) {
            return;
        }
        self.next_id += 1;
        let id = self.next_id;
        let downloader = self.downloader.clone();
        let sink = self.sink.clone();
        let mut backoff = Backoff::new(self.retry_base, self.retry_max);
        let (h, u) = (hash.to_owned(), url.to_owned());
        let handle = tokio::spawn(async move {
            loop {
                sink(DownloadEvent::Started {
                    hash: h.clone(),
                    task: id,
                });
                let report = |progress| {
                    sink(DownloadEvent::Progress {
                        hash: h.clone(),
                        task: id,
                        progress,
                    })
                };
                match downloader.fetch(&u, &h, &report).await {
                    Ok(_) => {
                        sink(DownloadEvent::Done { hash: h, task: id });
                        return;
                    }
                    Err(e) => {
                        let retry_in = e.is_retryable().then(|| backoff.next_delay());
                        warn!(url = %u, retry_in = ?retry_in, "module download failed: {e}");
                        sink(DownloadEvent::Failed {
                            hash: h.clone(),
                            task: id,
                            message: e.to_string(),
                            retry_in,
                        });
                        match retry_in {
                            Some(d) => tokio::time::sleep(d).await,
                            None => return,
                        }
                    }
                }
            }
        });
        self.tasks.insert(
            hash.to_owned(),
            Task {
                id,
                url: url.to_owned(),
                handle,
            },
        );
    }

    /// Whether `task` is the current task for `hash` (events of cancelled tasks are stale).
    pub fn is_current(&self, hash: &str, task: u64) -> bool {
        self.tasks.get(hash).is_some_and(|t| t.id == task)
    }

    /// Whether a task for `hash` exists (running or waiting to retry).
    pub fn contains(&self, hash: &str) -> bool {
        self.tasks.contains_key(hash)
    }

    /// The hashes that have a task.
    pub fn hashes(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    /// Forgets the task of `hash` after it reported `Done`.
    pub fn finished(&mut self, hash: &str) {
        self.tasks.remove(hash);
    }

    /// Cancels every task whose hash `wanted` refuses; returns their hashes. What a cancelled
    /// transfer received stays in its partial file, to resume if the module comes back.
    pub fn retain(&mut self, wanted: impl Fn(&str) -> bool) -> Vec<String> {
        let unwanted: Vec<String> = self.tasks.keys().filter(|h| !wanted(h)).cloned().collect();
        for hash in &unwanted {
            if let Some(task) = self.tasks.remove(hash) {
                task.handle.abort();
                info!(url = %task.url, sha256 = %hash, "module download cancelled: no longer in the deployment");
            }
        }
        unwanted
    }
}

impl Drop for Downloads {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio_rustls::TlsAcceptor;

    /// How long a test waits for something that should happen quickly.
    const DEADLINE: Duration = Duration::from_secs(20);

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// Bytes that differ from one position to the next, so a misplaced range is caught.
    fn content(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[derive(Clone)]
    struct File {
        body: Vec<u8>,
        etag: String,
    }

    /// What one request asked for.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Seen {
        method: String,
        /// The request-target as sent: `/m` to an origin, `http://host:port/m` to a proxy,
        /// `host:port` in a CONNECT.
        target: String,
        /// The file asked for (the target's path without its leading `/`).
        path: String,
        range: Option<String>,
        if_range: Option<String>,
        proxy_authorization: Option<String>,
        status: u16,
    }

    #[derive(Default)]
    struct Behaviour {
        files: HashMap<String, File>,
        /// The next this many responses send only this many body bytes, then close.
        cut: Vec<usize>,
        ignore_range: bool,
        /// Pause between 1 KiB body chunks.
        slow: Option<Duration>,
        /// The next this many requests get a 500.
        fail: usize,
        /// Answers `CONNECT` with 200 and then speaks TLS with this itself, as a proxy whose
        /// tunnel ends here (the origin named in the CONNECT is never contacted); without it
        /// a `CONNECT` gets a 405.
        tunnel_tls: Option<TlsAcceptor>,
    }

    /// A connection, plain or TLS.
    trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

    /// A request's line and the headers the tests look at.
    struct Head {
        method: String,
        target: String,
        path: String,
        range: Option<String>,
        if_range: Option<String>,
        proxy_authorization: Option<String>,
    }

    async fn read_head(stream: &mut BufReader<Box<dyn Io>>) -> std::io::Result<Head> {
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or_default().to_owned();
        let target = words.next().unwrap_or("/").to_owned();
        // An origin gets `/m`; a proxy gets the absolute URI `http://host:port/m`.
        let path = match target.split_once("://") {
            Some((_, rest)) => rest.split_once('/').map_or("", |(_, p)| p),
            None => target.trim_start_matches('/'),
        }
        .to_owned();
        let mut head = Head {
            method,
            target,
            path,
            range: None,
            if_range: None,
            proxy_authorization: None,
        };
        loop {
            line.clear();
            if stream.read_line(&mut line).await? == 0 || line.trim_end().is_empty() {
                return Ok(head);
            }
            if let Some((k, v)) = line.split_once(':') {
                let v = Some(v.trim().to_owned());
                match k.trim().to_ascii_lowercase().as_str() {
                    "range" => head.range = v,
                    "if-range" => head.if_range = v,
                    "proxy-authorization" => head.proxy_authorization = v,
                    _ => {}
                }
            }
        }
    }

    /// A small HTTP/1.1 server on 127.0.0.1 that can cut bodies, ignore Range, change files
    /// and count concurrent transfers. It also answers as a proxy: absolute-form requests
    /// are served from its own files, and a `CONNECT` is tunnelled to itself (`tunnel_tls`).
    struct Server {
        addr: std::net::SocketAddr,
        /// `https` when it speaks TLS from the first byte.
        scheme: &'static str,
        behaviour: Arc<Mutex<Behaviour>>,
        seen: Arc<Mutex<Vec<Seen>>>,
        active: Arc<AtomicUsize>,
        max_active: Arc<AtomicUsize>,
    }

    impl Server {
        async fn start() -> Server {
            Server::listen(None).await
        }

        /// An HTTPS server: TLS with `tls` from the first byte.
        async fn start_tls(tls: TlsAcceptor) -> Server {
            Server::listen(Some(tls)).await
        }

        async fn listen(tls: Option<TlsAcceptor>) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server = Server {
                addr: listener.local_addr().unwrap(),
                scheme: if tls.is_some() { "https" } else { "http" },
                behaviour: Arc::default(),
                seen: Arc::default(),
                active: Arc::default(),
                max_active: Arc::default(),
            };
            let (b, seen, active, max_active) = (
                server.behaviour.clone(),
                server.seen.clone(),
                server.active.clone(),
                server.max_active.clone(),
            );
            tokio::spawn(async move {
                while let Ok((sock, _)) = listener.accept().await {
                    let (b, seen, active, max_active) =
                        (b.clone(), seen.clone(), active.clone(), max_active.clone());
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let sock: Box<dyn Io> = match tls {
                            None => Box::new(sock),
                            // A client that refuses the certificate ends the handshake here.
                            Some(tls) => match tls.accept(sock).await {
                                Ok(s) => Box::new(s),
                                Err(_) => return,
                            },
                        };
                        let _ = serve(sock, b, seen, &active, &max_active).await;
                    });
                }
            });
            server
        }

        fn put(&self, path: &str, body: Vec<u8>, etag: &str) {
            self.behaviour.lock().unwrap().files.insert(
                path.into(),
                File {
                    body,
                    etag: etag.into(),
                },
            );
        }

        fn url(&self, path: &str) -> String {
            format!("{}://{}/{path}", self.scheme, self.addr)
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    async fn serve(
        sock: Box<dyn Io>,
        behaviour: Arc<Mutex<Behaviour>>,
        seen: Arc<Mutex<Vec<Seen>>>,
        active: &AtomicUsize,
        max_active: &AtomicUsize,
    ) -> std::io::Result<()> {
        struct Leave<'a>(&'a AtomicUsize);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let mut stream = BufReader::new(sock);
        let mut head = read_head(&mut stream).await?;
        if head.method == "CONNECT" {
            let tunnel = behaviour.lock().unwrap().tunnel_tls.clone();
            seen.lock().unwrap().push(Seen {
                method: head.method,
                target: head.target,
                path: head.path,
                range: head.range,
                if_range: head.if_range,
                proxy_authorization: head.proxy_authorization,
                status: if tunnel.is_some() { 200 } else { 405 },
            });
            let Some(tls) = tunnel else {
                stream
                    .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
                    .await?;
                return stream.flush().await;
            };
            stream
                .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await?;
            stream.flush().await?;
            // The client waits for the 200 before its ClientHello: nothing is buffered yet.
            assert!(stream.buffer().is_empty());
            let tunnelled: Box<dyn Io> = Box::new(tls.accept(stream.into_inner()).await?);
            stream = BufReader::new(tunnelled);
            head = read_head(&mut stream).await?;
        }
        let Head {
            method,
            target,
            path,
            range,
            if_range,
            proxy_authorization,
        } = head;
        // A transfer counts from its request (the client holds its permit; an idle pooled
        // connection does not count) to the last body byte handed to the kernel (the client
        // cannot have read it yet, so it still holds the permit).
        let n = active.fetch_add(1, Ordering::SeqCst) + 1;
        max_active.fetch_max(n, Ordering::SeqCst);
        let leave = Leave(active);
        let (head, body, cut, slow) = {
            let mut b = behaviour.lock().unwrap();
            let fail = b.fail > 0;
            if fail {
                b.fail -= 1;
            }
            let cut = if b.cut.is_empty() {
                None
            } else {
                Some(b.cut.remove(0))
            };
            let slow = b.slow;
            let (head, body, status) = match b.files.get(&path) {
                _ if fail => (
                    "HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n".to_owned(),
                    vec![],
                    500,
                ),
                None => (
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n".to_owned(),
                    vec![],
                    404,
                ),
                Some(f) => {
                    let start = range
                        .as_deref()
                        .and_then(|r| r.strip_prefix("bytes="))
                        .and_then(|r| r.strip_suffix('-'))
                        .and_then(|n| n.parse::<usize>().ok());
                    let validator_ok = if_range.as_deref().is_none_or(|v| v == f.etag);
                    let len = f.body.len();
                    match start {
                        Some(s) if !b.ignore_range && validator_ok && s >= len => (
                            format!(
                                "HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{len}\r\ncontent-length: 0\r\n"
                            ),
                            vec![],
                            416,
                        ),
                        Some(s) if !b.ignore_range && validator_ok => (
                            format!(
                                "HTTP/1.1 206 Partial Content\r\netag: {}\r\ncontent-range: bytes {s}-{}/{len}\r\ncontent-length: {}\r\n",
                                f.etag,
                                len - 1,
                                len - s
                            ),
                            f.body[s..].to_vec(),
                            206,
                        ),
                        _ => (
                            format!(
                                "HTTP/1.1 200 OK\r\netag: {}\r\ncontent-length: {len}\r\n",
                                f.etag
                            ),
                            f.body.clone(),
                            200,
                        ),
                    }
                }
            };
            seen.lock().unwrap().push(Seen {
                method,
                target,
                path,
                range,
                if_range,
                proxy_authorization,
                status,
            });
            (head, body, cut, slow)
        };
        stream
            .write_all(format!("{head}connection: close\r\n\r\n").as_bytes())
            .await?;
        let body = match cut {
            Some(n) => &body[..n.min(body.len())],
            None => &body[..],
        };
        for (i, chunk) in body.chunks(1024).enumerate() {
            if let Some(d) = slow.filter(|_| i > 0) {
                tokio::time::sleep(d).await;
            }
            stream.write_all(chunk).await?;
        }
        drop(leave);
        stream.flush().await?;
        Ok(())
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        cache_dir: PathBuf,
        downloader: Downloader,
    }

    fn fixture(config: DownloadConfig) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("modules");
        std::fs::create_dir(&cache_dir).unwrap();
        let downloader = Downloader::new(ModuleCache::new(cache_dir.clone()), &config).unwrap();
        Fixture {
            _dir: dir,
            cache_dir,
            downloader,
        }
    }

    fn cache_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn no_progress(_: Progress) {}

    /// A CA made for the test (its PEM written to `dir/<name>`) and a TLS acceptor whose
    /// certificate for 127.0.0.1 that CA signed.
    fn pki(dir: &Path, name: &str) -> (PathBuf, TlsAcceptor) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test CA {name}"));
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let ca_path = dir.join(name);
        std::fs::write(&ca_path, ca.pem()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .unwrap();
        (ca_path, TlsAcceptor::from(Arc::new(config)))
    }

    /// A port on 127.0.0.1 where nothing listens (bound, then released): an origin that can
    /// only be reached through a proxy.
    fn dead_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn proxy_to(server: &Server, username: Option<&str>, password: Option<&str>) -> ProxyConfig {
        ProxyConfig {
            host: "127.0.0.1".into(),
            port: server.addr.port(),
            username: username.map(str::to_owned),
            password: password.map(str::to_owned),
        }
    }

    /// `Basic` credentials of `evp-user` / `s3cr:et` (a colon in the password is legal).
    const BASIC_EVP_USER: &str = "Basic ZXZwLXVzZXI6czNjcjpldA==";

    /// The module is not in the cache and not one byte of it was written.
    fn nothing_cached(f: &Fixture, hash: &str) {
        assert!(!f.downloader.cache().contains(hash));
        let partial = f.downloader.cache().partial_of(hash);
        let written = std::fs::metadata(&partial).map_or(0, |m| m.len());
        assert_eq!(written, 0, "{:?}", cache_files(&f.cache_dir));
    }

    #[tokio::test]
    async fn https_downloads_trust_the_configured_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, tls) = pki(dir.path(), "ca.pem");
        let server = Server::start_tls(tls).await;
        let body = content(70_000, 50);
        server.put("m", body.clone(), "\"v\"");
        let f = fixture(DownloadConfig {
            ca_cert: Some(ca),
            ..Default::default()
        });
        let hash = sha(&body);
        let url = server.url("m");
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
        let path = f.downloader.fetch(&url, &hash, &no_progress).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), body);
        assert_eq!(path, f.downloader.cache().path_of(&hash));
        assert_eq!(cache_files(&f.cache_dir), vec![hash]);
        let seen = server.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].method.as_str(), seen[0].status), ("GET", 200));
    }

    #[tokio::test]
    async fn https_downloads_refuse_a_certificate_no_trusted_ca_signed() {
        let dir = tempfile::tempdir().unwrap();
        let (_ca, tls) = pki(dir.path(), "ca.pem");
        let (other_ca, _) = pki(dir.path(), "other-ca.pem");
        let server = Server::start_tls(tls).await;
        let body = content(10_000, 51);
        server.put("m", body.clone(), "\"v\"");
        let hash = sha(&body);
        // Only the system's roots, then another CA besides them.
        for ca_cert in [None, Some(other_ca)] {
            let f = fixture(DownloadConfig {
                ca_cert: ca_cert.clone(),
                ..Default::default()
            });
            let e = f
                .downloader
                .fetch(&server.url("m"), &hash, &no_progress)
                .await
                .unwrap_err();
            let FetchError::Transfer(message) = &e else {
                panic!("{ca_cert:?}: {e:?}");
            };
            assert!(
                message.contains("invalid peer certificate: UnknownIssuer"),
                "{ca_cert:?}: {message}"
            );
            assert!(e.is_retryable());
            nothing_cached(&f, &hash);
        }
        assert!(server.seen().is_empty(), "a request went out over TLS");
    }

    #[tokio::test]
    async fn http_downloads_go_through_the_configured_proxy_with_basic_auth() {
        let proxy = Server::start().await;
        let body = content(30_000, 52);
        proxy.put("m", body.clone(), "\"v\"");
        let hash = sha(&body);
        let origin = format!("http://127.0.0.1:{}/m", dead_port());

        // Without the proxy the origin is unreachable.
        let direct = fixture(DownloadConfig::default());
        let e = direct
            .downloader
            .fetch(&origin, &hash, &no_progress)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Transfer(_)), "{e}");
        assert!(proxy.seen().is_empty());

        let f = fixture(DownloadConfig {
            proxy: Some(proxy_to(&proxy, Some("evp-user"), Some("s3cr:et"))),
            ..Default::default()
        });
        let path = f
            .downloader
            .fetch(&origin, &hash, &no_progress)
            .await
            .unwrap();
        assert_eq!(std::fs::read(path).unwrap(), body);
        let seen = proxy.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, "GET");
        assert_eq!(seen[0].target, origin, "absolute-form request to the proxy");
        assert_eq!(seen[0].proxy_authorization.as_deref(), Some(BASIC_EVP_USER));

        // No user, no credentials.
        let anonymous = fixture(DownloadConfig {
            proxy: Some(proxy_to(&proxy, None, None)),
            ..Default::default()
        });
        anonymous
            .downloader
            .fetch(&origin, &hash, &no_progress)
            .await
            .unwrap();
        let seen = proxy.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].target, origin);
        assert_eq!(seen[1].proxy_authorization, None);
    }

    #[tokio::test]
    async fn https_downloads_tunnel_through_the_proxy_and_still_verify_the_origin() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, tls) = pki(dir.path(), "ca.pem");
        let proxy = Server::start().await;
        proxy.behaviour.lock().unwrap().tunnel_tls = Some(tls);
        let body = content(30_000, 53);
        proxy.put("m", body.clone(), "\"v\"");
        let hash = sha(&body);
        let authority = format!("127.0.0.1:{}", dead_port());
        let origin = format!("https://{authority}/m");

        let f = fixture(DownloadConfig {
            proxy: Some(proxy_to(&proxy, Some("evp-user"), Some("s3cr:et"))),
            ca_cert: Some(ca),
            ..Default::default()
        });
        let path = f
            .downloader
            .fetch(&origin, &hash, &no_progress)
            .await
            .unwrap();
        assert_eq!(std::fs::read(path).unwrap(), body);
        let seen = proxy.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].method, "CONNECT");
        assert_eq!(seen[0].target, authority);
        assert_eq!(seen[0].proxy_authorization.as_deref(), Some(BASIC_EVP_USER));
        // Inside the tunnel: an origin-form request, and the proxy credentials stay outside.
        assert_eq!(
            (seen[1].method.as_str(), seen[1].target.as_str()),
            ("GET", "/m")
        );
        assert_eq!(seen[1].proxy_authorization, None);
        assert_eq!(seen[1].status, 200);

        // The tunnel does not bypass verification: without the CA the certificate is refused.
        let untrusting = fixture(DownloadConfig {
            proxy: Some(proxy_to(&proxy, Some("evp-user"), Some("s3cr:et"))),
            ..Default::default()
        });
        let e = untrusting
            .downloader
            .fetch(&origin, &hash, &no_progress)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("invalid peer certificate: UnknownIssuer"),
            "{e}"
        );
        nothing_cached(&untrusting, &hash);
        let seen = proxy.seen();
        assert_eq!(seen.len(), 3, "only the CONNECT: {seen:?}");
        assert_eq!(seen[2].method, "CONNECT");
    }

    #[tokio::test]
    async fn a_cut_transfer_resumes_with_range_and_if_range() {
        let server = Server::start().await;
        let body = content(100_000, 1);
        server.put("m", body.clone(), "\"v1\"");
        server.behaviour.lock().unwrap().cut = vec![30_000];
        let f = fixture(DownloadConfig::default());
        let hash = sha(&body);

        let e = f
            .downloader
            .fetch(&server.url("m"), &hash, &no_progress)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Transfer(_)), "{e}");
        let partial = f.downloader.cache().partial_of(&hash);
        assert_eq!(std::fs::metadata(&partial).unwrap().len(), 30_000);

        let progress = Arc::new(Mutex::new(Vec::new()));
        let p = progress.clone();
        let record = move |x: Progress| p.lock().unwrap().push(x);
        let path = f
            .downloader
            .fetch(&server.url("m"), &hash, &record)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), body);
        let seen = server.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].range.as_deref(), Some("bytes=30000-"));
        assert_eq!(seen[1].if_range.as_deref(), Some("\"v1\""));
        assert_eq!(seen[1].status, 206);
        let progress = progress.lock().unwrap().clone();
        assert_eq!(
            progress.first(),
            Some(&Progress {
                done: 30_000,
                total: Some(100_000)
            })
        );
        assert_eq!(
            progress.last(),
            Some(&Progress {
                done: 100_000,
                total: Some(100_000)
            })
        );
        assert_eq!(cache_files(&f.cache_dir), vec![hash]);
    }

    #[tokio::test]
    async fn a_server_that_ignores_range_gets_a_fresh_download() {
        let server = Server::start().await;
        let body = content(50_000, 2);
        server.put("m", body.clone(), "\"v1\"");
        {
            let mut b = server.behaviour.lock().unwrap();
            b.cut = vec![20_000];
            b.ignore_range = true;
        }
        let f = fixture(DownloadConfig::default());
        let hash = sha(&body);
        assert!(
            f.downloader
                .fetch(&server.url("m"), &hash, &no_progress)
                .await
                .is_err()
        );
        let path = f
            .downloader
            .fetch(&server.url("m"), &hash, &no_progress)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), body);
        let seen = server.seen();
        assert_eq!(seen[1].range.as_deref(), Some("bytes=20000-"));
        assert_eq!(seen[1].status, 200, "the server ignored the range");
    }

    #[tokio::test]
    async fn a_changed_file_is_downloaded_again_from_the_start() {
        let server = Server::start().await;
        let old = content(40_000, 3);
        let new = content(45_000, 4);
        server.put("m", old, "\"old\"");
        server.behaviour.lock().unwrap().cut = vec![10_000];
        let f = fixture(DownloadConfig::default());
        let hash = sha(&new);
        assert!(
            f.downloader
                .fetch(&server.url("m"), &hash, &no_progress)
                .await
                .is_err()
        );
        // The server now has the file the manifest meant; its validator changed.
        server.put("m", new.clone(), "\"new\"");
        let path = f
            .downloader
            .fetch(&server.url("m"), &hash, &no_progress)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), new);
        let seen = server.seen();
        assert_eq!(seen[1].if_range.as_deref(), Some("\"old\""));
        assert_eq!(seen[1].status, 200, "If-Range did not match: whole file");
    }

    #[tokio::test]
    async fn a_resumed_file_that_does_not_hash_right_is_deleted() {
        let server = Server::start().await;
        let good = content(40_000, 5);
        server.put("m", good.clone(), "\"same\"");
        server.behaviour.lock().unwrap().cut = vec![10_000];
        let f = fixture(DownloadConfig::default());
        let hash = sha(&good);
        assert!(
            f.downloader
                .fetch(&server.url("m"), &hash, &no_progress)
                .await
                .is_err()
        );
        // A server that changes the file but not its ETag: the resumed bytes do not fit.
        server.put("m", content(40_000, 6), "\"same\"");
        let e = f
            .downloader
            .fetch(&server.url("m"), &hash, &no_progress)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::HashMismatch));
        assert_eq!(e.to_string(), "Module hash mismatch");
        assert_eq!(server.seen()[1].status, 206);
        assert!(
            cache_files(&f.cache_dir).is_empty(),
            "{:?}",
            cache_files(&f.cache_dir)
        );
        // The next attempt starts from 0 and, with the right file back, succeeds.
        server.put("m", good.clone(), "\"same\"");
        f.downloader
            .fetch(&server.url("m"), &hash, &no_progress)
            .await
            .unwrap();
        assert_eq!(server.seen()[2].range, None);
    }

    #[tokio::test]
    async fn a_complete_partial_file_needs_no_request() {
        let server = Server::start().await;
        let body = content(5_000, 7);
        let f = fixture(DownloadConfig::default());
        let hash = sha(&body);
        // As a power cut right after the last byte was written and synced leaves it.
        std::fs::write(f.downloader.cache().partial_of(&hash), &body).unwrap();
        let path = f
            .downloader
            .fetch(&server.url("m"), &hash, &no_progress)
            .await
            .unwrap();
        assert_eq!(std::fs::read(path).unwrap(), body);
        assert!(server.seen().is_empty());
    }

    #[tokio::test]
    async fn a_partial_file_longer_than_the_module_starts_over() {
        let server = Server::start().await;
        let body = content(5_000, 8);
        server.put("m", body.clone(), "\"v\"");
        let f = fixture(DownloadConfig::default());
        let hash = sha(&body);
        std::fs::write(f.downloader.cache().partial_of(&hash), content(6_000, 9)).unwrap();
        let path = f
            .downloader
            .fetch(&server.url("m"), &hash, &no_progress)
            .await
            .unwrap();
        assert_eq!(std::fs::read(path).unwrap(), body);
        let statuses: Vec<u16> = server.seen().iter().map(|s| s.status).collect();
        assert_eq!(statuses, vec![416, 200]);
    }

    #[tokio::test]
    async fn concurrent_downloads_stay_within_the_bound() {
        let server = Server::start().await;
        server.behaviour.lock().unwrap().slow = Some(Duration::from_millis(2));
        let bodies: Vec<Vec<u8>> = (0..6).map(|i| content(20_000, 10 + i)).collect();
        for (i, b) in bodies.iter().enumerate() {
            server.put(&format!("m{i}"), b.clone(), "\"v\"");
        }
        let f = fixture(DownloadConfig {
            max_concurrent: 2,
            ..Default::default()
        });
        let fetches = bodies.iter().enumerate().map(|(i, b)| {
            let d = f.downloader.clone();
            let url = server.url(&format!("m{i}"));
            let hash = sha(b);
            async move { d.fetch(&url, &hash, &no_progress).await }
        });
        for r in futures_util::future::join_all(fetches).await {
            r.unwrap();
        }
        assert_eq!(server.max_active.load(Ordering::SeqCst), 2);
        assert_eq!(server.seen().len(), 6);
    }

    #[tokio::test]
    async fn the_same_content_under_two_ids_is_fetched_once() {
        let server = Server::start().await;
        server.behaviour.lock().unwrap().slow = Some(Duration::from_millis(1));
        let body = content(20_000, 20);
        server.put("m", body.clone(), "\"v\"");
        let f = fixture(DownloadConfig::default());
        let hash = sha(&body);
        let url = server.url("m");
        let (a, b) = tokio::join!(
            f.downloader.fetch(&url, &hash, &no_progress),
            f.downloader.fetch(&url, &hash, &no_progress)
        );
        assert_eq!(a.unwrap(), b.unwrap());
        assert_eq!(server.seen().len(), 1);
    }

    #[tokio::test]
    async fn file_urls_are_copied_and_wrong_hashes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.bin");
        std::fs::write(&src, b"module").unwrap();
        let f = fixture(DownloadConfig::default());
        let url = format!("file://{}", src.display());
        let e = f
            .downloader
            .fetch(&url, &sha(b"other"), &no_progress)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "Module hash mismatch");
        assert!(cache_files(&f.cache_dir).is_empty());
        // A hash of the wrong length is a mismatch too, as in EVP.
        let e = f.downloader.fetch(&url, "abcd", &no_progress).await;
        assert!(matches!(e, Err(FetchError::HashMismatch)));
        let path = f
            .downloader
            .fetch(&url, &sha(b"module").to_uppercase(), &no_progress)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"module");
        assert_eq!(path, f.downloader.cache().path_of(&sha(b"module")));
        let e = f
            .downloader
            .fetch("ftp://x/y", &sha(b"module2"), &no_progress)
            .await;
        assert!(matches!(e, Err(FetchError::UnsupportedScheme(_))));
    }

    fn downloads(f: &Fixture) -> (Downloads, mpsc::UnboundedReceiver<DownloadEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink: EventSink = Arc::new(move |ev| {
            let _ = tx.send(ev);
        });
        let config = DownloadConfig {
            retry_base: Duration::from_millis(10),
            retry_max: Duration::from_millis(40),
            ..Default::default()
        };
        (Downloads::new(f.downloader.clone(), &config, sink), rx)
    }

    /// Waits for the first event that `pick` accepts, failing after the deadline.
    async fn wait_event(
        rx: &mut mpsc::UnboundedReceiver<DownloadEvent>,
        what: &str,
        pick: impl Fn(&DownloadEvent) -> bool,
    ) -> Vec<DownloadEvent> {
        let mut before = Vec::new();
        let found = tokio::time::timeout(DEADLINE, async {
            while let Some(ev) = rx.recv().await {
                let done = pick(&ev);
                before.push(ev);
                if done {
                    return;
                }
            }
        })
        .await;
        assert!(found.is_ok(), "no {what} within {DEADLINE:?}: {before:?}");
        before
    }

    #[tokio::test]
    async fn failed_downloads_are_retried_until_they_succeed() {
        let server = Server::start().await;
        let body = content(10_000, 30);
        server.put("m", body.clone(), "\"v\"");
        {
            let mut b = server.behaviour.lock().unwrap();
            b.fail = 2;
            b.cut = vec![0, 0, 4_000];
        }
        let f = fixture(DownloadConfig::default());
        let (mut d, mut rx) = downloads(&f);
        let hash = sha(&body);
        d.ensure(&hash, &server.url("m"));
        let events = wait_event(&mut rx, "Done", |e| matches!(e, DownloadEvent::Done { .. })).await;
        let failures: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                DownloadEvent::Failed { message, .. } => Some(message.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            failures[..2],
            [
                "Download failed HTTP Response = 500",
                "Download failed HTTP Response = 500"
            ]
        );
        assert_eq!(failures.len(), 3, "{failures:?}");
        assert!(f.downloader.cache().contains(&hash));
        let seen = server.seen();
        assert_eq!(seen.last().unwrap().range.as_deref(), Some("bytes=4000-"));
    }

    #[tokio::test]
    async fn preemption_cancels_only_the_downloads_no_longer_wanted() {
        let server = Server::start().await;
        server.behaviour.lock().unwrap().slow = Some(Duration::from_millis(5));
        let kept = content(200_000, 40);
        let dropped = content(200_000, 41);
        server.put("kept", kept.clone(), "\"k\"");
        server.put("dropped", dropped.clone(), "\"d\"");
        let f = fixture(DownloadConfig::default());
        let (mut d, mut rx) = downloads(&f);
        let (kh, dh) = (sha(&kept), sha(&dropped));
        d.ensure(&kh, &server.url("kept"));
        d.ensure(&dh, &server.url("dropped"));
        // Both transfers are under way.
        wait_event(&mut rx, "progress of the dropped module", |e| {
            matches!(e, DownloadEvent::Progress { hash, progress, .. } if *hash == dh && progress.done > 0)
        })
        .await;
        // A newer deployment wants only `kept`; ensuring it again changes nothing.
        let cancelled = d.retain(|h| h == kh);
        d.ensure(&kh, &server.url("kept"));
        assert_eq!(cancelled, vec![dh.clone()]);
        assert!(!d.contains(&dh));
        let events = wait_event(
            &mut rx,
            "Done of the kept module",
            |e| matches!(e, DownloadEvent::Done { hash, .. } if *hash == kh),
        )
        .await;
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, DownloadEvent::Done { hash, .. } if *hash == dh)),
            "the cancelled download finished"
        );
        assert!(f.downloader.cache().contains(&kh));
        assert!(!f.downloader.cache().contains(&dh));
        let kept_requests = server.seen().iter().filter(|s| s.path == "kept").count();
        assert_eq!(kept_requests, 1, "the wanted download was restarted");
        // What the cancelled transfer got stays, to resume if the module comes back.
        let partial = std::fs::metadata(f.downloader.cache().partial_of(&dh)).unwrap();
        assert!(partial.len() > 0 && partial.len() < 200_000);
    }
}
