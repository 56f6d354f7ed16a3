//! A real HTTP server on loopback that serves module files from a directory, with the faults a
//! cellular link and odd servers produce: a transfer cut mid-way, Range ignored, a slow body.
//! It records every request it answered.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

/// How the server treats requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Behaviour {
    /// The first this-many GETs of a file are cut after `cut_after` bytes of body.
    pub cut_requests: usize,
    /// Where a cut transfer stops, in bytes of body.
    pub cut_after: u64,
    /// Answer every GET with the whole file (200), whatever `Range` says.
    pub ignore_range: bool,
    /// Pause this long after each 16 KiB of body: a slow link, so a test can act mid-transfer.
    pub pace: Option<Duration>,
}

/// What one request asked for, and how its answer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The file name asked for.
    pub name: String,
    /// Its `Range` header, if any.
    pub range: Option<String>,
    /// `None` while the answer is being sent; then whether the whole body went out (false:
    /// cut by the server's fault settings, or the client went away).
    pub completed: Option<bool>,
}

/// Size of the body chunks a paced transfer pauses between.
const PACE_CHUNK: usize = 16 * 1024;

/// A file server on 127.0.0.1; stops on drop.
pub struct FileServer {
    server: Arc<tiny_http::Server>,
    threads: Vec<std::thread::JoinHandle<()>>,
    requests: Arc<Mutex<Vec<Request>>>,
    /// Its port.
    pub port: u16,
}

impl FileServer {
    /// Serves the files of `root` (GET `/name`); anything else is a 404.
    pub fn start(root: PathBuf) -> Result<FileServer> {
        Self::start_with(root, Behaviour::default())
    }

    /// Serves the files of `root` with the given faults.
    pub fn start_with(root: PathBuf, behaviour: Behaviour) -> Result<FileServer> {
        let server =
            Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| anyhow::anyhow!("{e}"))?);
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .ok_or_else(|| anyhow::anyhow!("no IP address"))?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        // A few threads, so a paced transfer does not hold up other downloads.
        let threads = (0..4)
            .map(|_| {
                let (s, log, root) = (server.clone(), requests.clone(), root.clone());
                std::thread::spawn(move || {
                    for request in s.incoming_requests() {
                        serve(request, &root, behaviour, &log);
                    }
                })
            })
            .collect();
        Ok(FileServer {
            server,
            threads,
            requests,
            port,
        })
    }

    /// The URL of a file it serves.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// How many requests it answered.
    pub fn request_count(&self) -> usize {
        self.requests().len()
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn serve(
    request: tiny_http::Request,
    root: &std::path::Path,
    behaviour: Behaviour,
    log: &Mutex<Vec<Request>>,
) {
    let name = request.url().trim_start_matches('/').to_owned();
    let range = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .map(|h| h.value.as_str().to_owned());
    let (index, nth_for_file) = {
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.push(Request {
            name: name.clone(),
            range: range.clone(),
            completed: None,
        });
        (log.len() - 1, log.iter().filter(|r| r.name == name).count())
    };
    let finish = |completed: bool| {
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log[index].completed = Some(completed);
    };
    let file = (!name.contains('/') && !name.is_empty())
        .then(|| std::fs::File::open(root.join(&name)).ok())
        .flatten();
    let Some(mut file) = file else {
        finish(request.respond(tiny_http::Response::empty(404)).is_ok());
        return;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = match (&range, behaviour.ignore_range) {
        (Some(r), false) => r
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| *n < len),
        _ => None,
    };
    let mut headers = vec![
        header("Accept-Ranges", "bytes"),
        header("ETag", &format!("\"{len}\"")),
    ];
    let status = match start {
        Some(n) => {
            headers.push(header(
                "Content-Range",
                &format!("bytes {n}-{}/{len}", len.saturating_sub(1)),
            ));
            206
        }
        None => 200,
    };
    let offset = start.unwrap_or(0);
    if file.seek(SeekFrom::Start(offset)).is_err() {
        finish(request.respond(tiny_http::Response::empty(500)).is_ok());
        return;
    }
    let cut = (nth_for_file <= behaviour.cut_requests).then_some(behaviour.cut_after);
    let body = FaultyBody {
        inner: file,
        sent: 0,
        cut,
        pace: behaviour.pace,
    };
    let response = tiny_http::Response::new(
        tiny_http::StatusCode(status),
        headers,
        body,
        Some((len - offset) as usize),
        None,
    );
    finish(request.respond(response).is_ok());
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

/// A body that fails after `cut` bytes (the connection then drops mid-transfer) and may pause
/// between chunks.
struct FaultyBody {
    inner: std::fs::File,
    sent: u64,
    cut: Option<u64>,
    pace: Option<Duration>,
}

impl Read for FaultyBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut want = buf.len().min(PACE_CHUNK);
        if let Some(cut) = self.cut {
            if self.sent >= cut {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "transfer cut by the test server",
                ));
            }
            want = want.min((cut - self.sent) as usize);
        }
        if let Some(pause) = self.pace {
            std::thread::sleep(pause);
        }
        let n = self.inner.read(&mut buf[..want])?;
        self.sent += n as u64;
        Ok(n)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        for _ in &self.threads {
            self.server.unblock();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
