//! Blob transfers for modules (`EVP_blobOperation`): GET from a URL into a file of the
//! instance's workspace, or PUT such a file to a URL, streamed in chunks so no blob is ever
//! held in memory. The deciding half is pure ([`confine`], [`parse_headers`], checked by the
//! rules before a transfer is accepted); [`run`] is the thin executor.
//!
//! The file is opened with `openat2(RESOLVE_BENEATH)` below the workspace, so neither `..` nor
//! a symlink can reach outside it. A cut GET is resumed with `Range` where the server allows
//! it. An EVP storage upload (`EVP_BLOB_TYPE_EVP_EXT`, and the deprecated `EVP`) learns its URL
//! and headers from the hub's storage token first ([`StorageTarget`], [`Job::set_token`]).

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use evp_schemas::sdk::{
    BLOB_RESULT_ERROR, BLOB_RESULT_ERROR_HTTP, BLOB_RESULT_SUCCESS, BLOB_TYPE_AZURE_BLOB,
    BlobOutcome, BlobRequest, is_http_url,
};
use futures_util::StreamExt;
use reqwest::header::{ACCEPT_RANGES, CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue, RANGE};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{info, warn};

/// Most blob operations one instance may have under way; a request beyond is `EVP_DENIED`.
pub const MAX_LIVE_BLOBS: usize = 10;
/// The workspace folder inside an instance directory (`<data_dir>/instances/<name>/`).
pub const WORKSPACE_DIR: &str = "default_workspace";
/// The workspace as a docker module sees it (the instance directory is bound at `/evp`).
pub const CONTAINER_WORKSPACE: &str = "/evp/default_workspace";
/// A transfer that receives nothing for this long fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How many times a GET cut mid-way is resumed.
const GET_RESUMES: u32 = 3;
/// Read size of an upload: few system calls, little memory.
const PUT_CHUNK: usize = 64 * 1024;
/// Mode of a downloaded file: the instance's (it is given to the workspace's owner).
const GET_FILE_MODE: u32 = 0o600;
/// `EIO`, for failures that carry no errno of their own (a broken connection).
const EIO: u32 = 5;

/// `EVP_BLOB_OPERATION`: GET downloads into the file, PUT uploads it.
pub use evp_schemas::sdk::BlobOperation as Direction;

/// One accepted transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// `EVP_BLOB_TYPE` of the request, for the result's shape.
    pub kind: u32,
    /// GET or PUT.
    pub direction: Direction,
    /// The URL.
    pub url: String,
    /// Request headers (HTTP_EXT's, Azure's blob type), checked.
    pub headers: HeaderMap,
    /// The instance's workspace on this host.
    pub workspace: PathBuf,
    /// The file below it.
    pub file: PathBuf,
    /// EVP storage: `url` and `headers` come from the hub's storage token, asked for this
    /// before the transfer.
    pub storage: Option<StorageTarget>,
}

/// What a storage token is asked for (`Hub1.RequestStorageToken`'s arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageTarget {
    /// The instance uploading.
    pub instance: String,
    /// Its storage name, "" for the default storage (a NULL `storage_name`).
    pub storage_name: String,
    /// The module's `remote_name`.
    pub remote_name: String,
}

impl Job {
    /// Takes the storage token's URL and headers; refused (the job unchanged) when the hub's
    /// URL is not http(s) or a header cannot be sent.
    pub fn set_token(
        &mut self,
        url: String,
        headers: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), String> {
        if !is_http_url(&url) {
            return Err(format!("the storage token's URL {url:?} is not http(s)"));
        }
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let (n, v) = header(&name, &value)
                .ok_or_else(|| format!("the storage token's header {name:?} cannot be sent"))?;
            map.append(n, v);
        }
        self.url = url;
        self.headers = map;
        Ok(())
    }

    /// The outcome of a job that failed before any transfer (no storage token): an error
    /// with `EIO`, as EVP reports it.
    pub fn failed(&self, why: &str) -> BlobOutcome {
        warn!(file = %self.file.display(), "blob transfer not started: {why}");
        outcome(self.kind, BLOB_RESULT_ERROR, EIO, 0)
    }
}

/// Why a request was refused before any transfer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The file is not inside the workspace (`..`, another folder, nothing).
    #[error("{0:?} is not a file inside the instance's workspace")]
    OutsideWorkspace(String),
    /// A header is not `Name: value`.
    #[error("header {0:?} is not `Name: value`")]
    BadHeader(String),
}

/// The file `filename` names, relative to the workspace: given as the module sees it (the
/// host path for spawned, python and WASM modules, `/evp/default_workspace/…` for docker),
/// or relative. `..`, an empty name and any other absolute path are refused.
pub fn confine(filename: &str, workspace: &Path) -> Result<PathBuf, Refused> {
    let refused = || Refused::OutsideWorkspace(filename.to_owned());
    let path = Path::new(filename);
    let below = if let Ok(rest) = path.strip_prefix(workspace) {
        rest
    } else if let Ok(rest) = path.strip_prefix(CONTAINER_WORKSPACE) {
        rest
    } else if path.is_relative() {
        path
    } else {
        return Err(refused());
    };
    let mut out = PathBuf::new();
    for part in below.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return Err(refused()),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(refused());
    }
    Ok(out)
}

/// The headers of a request: HTTP_EXT's `Name: value` strings, and for an Azure blob PUT the
/// blob type Azure requires.
pub fn parse_headers(request: &BlobRequest, direction: Direction) -> Result<HeaderMap, Refused> {
    let mut out = HeaderMap::new();
    if let BlobRequest::HttpExt { headers, .. } = request {
        for h in headers {
            let (name, value) = h
                .split_once(':')
                .and_then(|(name, value)| header(name, value))
                .ok_or_else(|| Refused::BadHeader(h.clone()))?;
            out.append(name, value);
        }
    }
    if matches!(request, BlobRequest::AzureBlob { .. }) && direction == Direction::Put {
        out.append(
            HeaderName::from_static("x-ms-blob-type"),
            HeaderValue::from_static("BlockBlob"),
        );
    }
    Ok(out)
}

/// A header as a transfer sends it, spaces around the name and value trimmed; `None` when
/// either cannot be sent.
fn header(name: &str, value: &str) -> Option<(HeaderName, HeaderValue)> {
    let name = HeaderName::from_bytes(name.trim().as_bytes()).ok()?;
    let value = HeaderValue::from_str(value.trim()).ok()?;
    Some((name, value))
}

/// Runs `job`; `cancel` turning true (the instance is exiting) ends it early with `None`.
pub async fn run(
    client: &reqwest::Client,
    job: Job,
    mut cancel: watch::Receiver<bool>,
) -> Option<BlobOutcome> {
    let transfer = async {
        match job.direction {
            Direction::Get => get(client, &job).await,
            Direction::Put => put(client, &job).await,
        }
    };
    let result = tokio::select! {
        r = transfer => r,
        _ = cancel.wait_for(|c| *c) => return None,
    };
    Some(match result {
        Ok(status) => {
            info!(url = %job.url, status, file = %job.file.display(), "blob transfer done");
            outcome(job.kind, BLOB_RESULT_SUCCESS, 0, status)
        }
        Err(Failure::Http(status)) => {
            warn!(url = %job.url, status, "blob transfer refused by the server");
            outcome(job.kind, BLOB_RESULT_ERROR_HTTP, 0, status)
        }
        Err(Failure::Errno(errno, why)) => {
            warn!(url = %job.url, file = %job.file.display(), "blob transfer failed: {why}");
            outcome(job.kind, BLOB_RESULT_ERROR, errno, 0)
        }
    })
}

fn outcome(kind: u32, result: u32, error: u32, http_status: u32) -> BlobOutcome {
    BlobOutcome {
        kind,
        result,
        error,
        http_status,
    }
}

/// How a transfer failed.
enum Failure {
    /// The server answered this status (not 2xx).
    Http(u32),
    /// A local or network error, with its errno and why.
    Errno(u32, String),
}

fn io_failure(what: &str, e: &std::io::Error) -> Failure {
    let errno = e
        .raw_os_error()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(EIO);
    Failure::Errno(errno, format!("{what}: {e}"))
}

fn net_failure(e: &reqwest::Error) -> Failure {
    // The errno of the socket error inside, if there is one (ECONNREFUSED, say).
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && let Some(n) = io.raw_os_error()
        {
            return Failure::Errno(u32::try_from(n).unwrap_or(EIO), e.to_string());
        }
        source = s.source();
    }
    Failure::Errno(EIO, e.to_string())
}

/// Opens `file` below `workspace` without leaving it: no `..`, no symlink out, no magic link.
fn open_beneath(workspace: &Path, file: &Path, write: bool) -> std::io::Result<std::fs::File> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
    use nix::sys::stat::Mode;
    let dir: OwnedFd = open(
        workspace,
        OFlag::O_DIRECTORY | OFlag::O_PATH | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let flags = if write {
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC
    } else {
        OFlag::O_RDONLY
    };
    // openat2 refuses a mode without O_CREAT.
    let mode = if write { GET_FILE_MODE } else { 0 };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = openat2(&dir, file, how)?;
    let opened = std::fs::File::from(fd);
    if write {
        // The instance's file, not the broker's: it is given to the workspace's owner.
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(workspace)?;
        std::os::unix::fs::fchown(&opened, Some(owner.uid()), Some(owner.gid()))?;
    }
    Ok(opened)
}

/// Downloads into the file, resuming a cut transfer where the server accepts ranges.
async fn get(client: &reqwest::Client, job: &Job) -> Result<u32, Failure> {
    let file = open_beneath(&job.workspace, &job.file, true)
        .map_err(|e| io_failure("opening the file", &e))?;
    let mut out = tokio::fs::File::from_std(file);
    let mut written: u64 = 0;
    let mut resumes = 0;
    let mut status = 0;
    loop {
        let mut request = client.get(&job.url).headers(job.headers.clone());
        if written > 0 {
            request = request.header(RANGE, format!("bytes={written}-"));
        }
        let response = request.send().await.map_err(|e| net_failure(&e))?;
        let code = u32::from(response.status().as_u16());
        if !response.status().is_success() {
            return Err(Failure::Http(code));
        }
        if written > 0 && code != 206 {
            // The server sent the whole blob again: start the file over.
            out.set_len(0)
                .await
                .map_err(|e| io_failure("truncating", &e))?;
            written = 0;
        }
        if status == 0 {
            status = code;
        }
        let ranges = response
            .headers()
            .get(ACCEPT_RANGES)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"bytes"));
        let mut body = response.bytes_stream();
        let mut cut = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    out.write_all(&bytes)
                        .await
                        .map_err(|e| io_failure("writing the file", &e))?;
                    written += bytes.len() as u64;
                }
                Err(e) => {
                    cut = Some(e);
                    break;
                }
            }
        }
        match cut {
            None => break,
            Some(e) if ranges && resumes < GET_RESUMES => {
                resumes += 1;
                warn!(url = %job.url, written, "blob download cut ({e}); resuming");
            }
            Some(e) => return Err(net_failure(&e)),
        }
    }
    out.flush()
        .await
        .map_err(|e| io_failure("writing the file", &e))?;
    out.sync_all()
        .await
        .map_err(|e| io_failure("syncing the file", &e))?;
    Ok(status)
}

/// Uploads the file, streamed, with its length.
async fn put(client: &reqwest::Client, job: &Job) -> Result<u32, Failure> {
    let file = open_beneath(&job.workspace, &job.file, false)
        .map_err(|e| io_failure("opening the file", &e))?;
    let size = file
        .metadata()
        .map_err(|e| io_failure("reading the file's size", &e))?
        .len();
    let file = tokio::fs::File::from_std(file);
    let chunks = evp_daemon::fs::chunks(file, PUT_CHUNK);
    let response = client
        .put(&job.url)
        .headers(job.headers.clone())
        .header(CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .map_err(|e| net_failure(&e))?;
    let code = u32::from(response.status().as_u16());
    if !response.status().is_success() {
        return Err(Failure::Http(code));
    }
    Ok(code)
}

/// Whether `kind` is a blob type transferred here: every `EVP_BLOB_TYPE`.
pub fn served_kind(kind: u32) -> bool {
    use evp_schemas::sdk::{BLOB_TYPE_EVP, BLOB_TYPE_EVP_EXT, BLOB_TYPE_HTTP, BLOB_TYPE_HTTP_EXT};
    matches!(
        kind,
        BLOB_TYPE_AZURE_BLOB
            | BLOB_TYPE_EVP
            | BLOB_TYPE_HTTP
            | BLOB_TYPE_EVP_EXT
            | BLOB_TYPE_HTTP_EXT
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_confined_to_the_workspace_whatever_the_modules_view() {
        fn check(filename: &str, expect: Result<&str, ()>) {
            let ws = Path::new("/var/lib/evp/instances/cam/default_workspace");
            let got = confine(filename, ws).map_err(|_| ());
            assert_eq!(got, expect.map(PathBuf::from), "{filename}");
        }
        check(
            "/var/lib/evp/instances/cam/default_workspace/a.bin",
            Ok("a.bin"),
        );
        check("/evp/default_workspace/dir/b.bin", Ok("dir/b.bin"));
        check("c.bin", Ok("c.bin"));
        check("./d/./e.bin", Ok("d/e.bin"));
        check(
            "/var/lib/evp/instances/cam/default_workspace/../other/x",
            Err(()),
        );
        check("/evp/default_workspace/../../etc/passwd", Err(()));
        check("../x", Err(()));
        check("/etc/passwd", Err(()));
        check("/var/lib/evp/instances/cam/default_workspace", Err(()));
        check("", Err(()));
    }

    /// The headers as `(name, value)` strings; a `HeaderMap` keeps names in lower case (HTTP
    /// names are case-insensitive).
    fn pairs(headers: &HeaderMap) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn http_ext_headers_and_azures_blob_type() {
        let ext = BlobRequest::HttpExt {
            url: "http://h/x".into(),
            headers: vec!["X-A: 1".into(), "Authorization:Bearer t".into()],
        };
        assert_eq!(
            pairs(&parse_headers(&ext, Direction::Get).unwrap()),
            [
                ("x-a".to_owned(), "1".to_owned()),
                ("authorization".to_owned(), "Bearer t".to_owned())
            ]
        );
        let bad = BlobRequest::HttpExt {
            url: "http://h/x".into(),
            headers: vec!["no colon".into()],
        };
        assert!(parse_headers(&bad, Direction::Get).is_err());
        let azure = BlobRequest::AzureBlob {
            url: "https://a.blob/x?sig".into(),
        };
        assert_eq!(
            pairs(&parse_headers(&azure, Direction::Put).unwrap()),
            [("x-ms-blob-type".to_owned(), "BlockBlob".to_owned())]
        );
        assert!(parse_headers(&azure, Direction::Get).unwrap().is_empty());
    }

    #[test]
    fn a_symlink_out_of_the_workspace_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let ws = root.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        std::fs::write(root.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), ws.join("link")).unwrap();
        std::fs::write(ws.join("mine"), b"m").unwrap();
        assert!(open_beneath(&ws, Path::new("link"), false).is_err());
        assert!(open_beneath(&ws, Path::new("mine"), false).is_ok());
    }
}
