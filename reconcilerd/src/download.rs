//! Module downloads into the cache: HTTP(S) with resume (`Range` from where `<hash>.partial`
//! ends, `If-Range` with the validator first seen), `file://` copies, the SHA-256 of the whole
//! file checked before it appears under its hash, and a bound on concurrent transfers. The
//! per-module tasks that retry with backoff until the module is no longer wanted are
//! [`tasks`]. Tested against HTTP(S) servers and a proxy on loopback in
//! `reconcilerd/tests/download.rs`.

pub mod local;
mod tasks;

pub use evp_daemon::http::{ClientError, ProxyConfig};
pub use tasks::{DownloadEvent, Downloads, EventSink};

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
use tracing::{info, warn};

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
    /// A `file://` URL the device may not read ([`local`]).
    #[error("{0}")]
    LocalFile(#[from] local::LocalFileError),
    /// Reading the source file or writing the cache failed.
    #[error("Error when saving module: {0}")]
    Io(#[from] std::io::Error),
}

impl FetchError {
    /// Whether trying again later may help; an unsupported URL never will.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            FetchError::UnsupportedScheme(_) | FetchError::LocalFile(_)
        )
    }
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
    /// The directories `file://` URLs may name ([`local`]); none by default.
    pub file_url_dirs: Vec<PathBuf>,
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
            file_url_dirs: Vec::new(),
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
    file_url_dirs: Arc<[PathBuf]>,
    /// One lock per hash: two modules with the same content never write the same partial.
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Downloader {
    /// A downloader into `cache`, configured by `config`.
    pub fn new(cache: ModuleCache, config: &DownloadConfig) -> Result<Self, ClientError> {
        let http = evp_daemon::http::client(
            config.proxy.as_ref(),
            config.ca_cert.as_deref(),
            config.read_timeout,
        )?;
        Ok(Downloader {
            cache,
            http,
            permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            file_url_dirs: config.file_url_dirs.clone().into(),
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
        // Refused even when the hash is cached, so the rule does not depend on the cache.
        if url.starts_with("file://") {
            local::check_url(url, &self.file_url_dirs)?;
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
        let written = if url.starts_with("file://") {
            let input = local::open(url, &self.file_url_dirs).await?;
            copy_file(input, &partial, progress).await
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

/// Copies an opened local file into `partial` (from 0), returning its hex SHA-256.
async fn copy_file(
    mut input: tokio::fs::File,
    partial: &Path,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<String, FetchError> {
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

/// `Content-Range: bytes <start>-<end>/<total or *>` → (start, total). Public for the fuzz
/// target (fuzz/fuzz_targets/download_headers.rs).
pub fn content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
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
