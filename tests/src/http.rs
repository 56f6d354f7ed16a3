//! An HTTP/1.1 file server on loopback with the faults a cellular link and odd servers produce:
//! a transfer cut mid-way, Range ignored, a slow body. GET serves a file, PUT stores one. It
//! records every request (its method and headers) and how its answer ended. It is written on std's TCP rather than an HTTP crate because the faults
//! (a connection that ends short of its Content-Length) are what a well-kept server library
//! exists to prevent.

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
    /// `GET` or `PUT`.
    pub method: String,
    /// Every header, as sent.
    pub headers: Vec<(String, String)>,
    /// The file name asked for (the path, without its query).
    pub name: String,
    /// The query, if any (a SAS token's, say).
    pub query: Option<String>,
    /// Its `Range` header, if any.
    pub range: Option<String>,
    /// `None` while the answer is being sent; then whether the whole body went out (false:
    /// cut by the server's fault settings, or the client went away).
    pub completed: Option<bool>,
}

/// Size of the body chunks a paced transfer pauses between.
const PACE_CHUNK: usize = 16 * 1024;

/// A file server on 127.0.0.1, one thread per connection, `Connection: close` always, so a
/// cut transfer really ends the connection early. Stops on drop.
pub struct FileServer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    requests: Arc<Mutex<Vec<Request>>>,
    /// Its port.
    pub port: u16,
}

impl FileServer {
    /// Serves the files of `root` (GET `/name`) and stores uploads there (PUT `/name`,
    /// answered 201); anything else is a 404.
    pub fn start(root: PathBuf) -> Result<FileServer> {
        Self::start_with(root, Behaviour::default())
    }

    /// Serves the files of `root` with the given faults.
    pub fn start_with(root: PathBuf, behaviour: Behaviour) -> Result<FileServer> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (log, halt) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (log, root) = (log.clone(), root.clone());
                        std::thread::spawn(move || serve(stream, &root, behaviour, &log));
                    }
                    // Polled, so that drop can stop the server without a connection.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(FileServer {
            stop,
            thread: Some(thread),
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

/// A request's head: its method, path and headers.
struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the request head.
fn read_head(stream: &mut std::net::TcpStream) -> Option<Head> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 || head.len() > 16 * 1024 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers = lines
        .filter_map(|l| {
            let (name, value) = l.split_once(':')?;
            Some((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect();
    Some(Head {
        method,
        path,
        headers,
    })
}

/// Stores a PUT body of Content-Length bytes as `root/name` (complete bodies only).
fn store(
    stream: &mut std::net::TcpStream,
    root: &std::path::Path,
    name: &str,
    head: &Head,
) -> bool {
    use std::io::Write;
    let Some(len) = head
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return false;
    };
    let partial = root.join(format!(".{name}.partial"));
    let Ok(mut out) = std::fs::File::create(&partial) else {
        return false;
    };
    let copied = std::io::copy(&mut stream.take(len), &mut out).unwrap_or(0);
    if copied != len || std::fs::rename(&partial, root.join(name)).is_err() {
        return false;
    }
    stream
        .write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .is_ok()
}

fn serve(
    mut stream: std::net::TcpStream,
    root: &std::path::Path,
    behaviour: Behaviour,
    log: &Mutex<Vec<Request>>,
) {
    use std::io::Write;
    let _ = stream.set_nonblocking(false);
    let Some(head) = read_head(&mut stream) else {
        return;
    };
    let range = head.header("range").map(str::to_owned);
    let (path, query) = match head.path.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (head.path.as_str(), None),
    };
    let name = path.trim_start_matches('/').to_owned();
    let (index, nth_for_file) = {
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.push(Request {
            method: head.method.clone(),
            headers: head.headers.clone(),
            name: name.clone(),
            query,
            range: range.clone(),
            completed: None,
        });
        (log.len() - 1, log.iter().filter(|r| r.name == name).count())
    };
    let finish = |completed: bool| {
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log[index].completed = Some(completed);
    };
    if head.method == "PUT" && !name.contains('/') && !name.is_empty() {
        let stored = store(&mut stream, root, &name, &head);
        finish(stored);
        return;
    }
    let file = (!name.contains('/') && !name.is_empty())
        .then(|| std::fs::File::open(root.join(&name)).ok())
        .flatten();
    let Some(mut file) = file else {
        let ok = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .is_ok();
        finish(ok);
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
    let offset = start.unwrap_or(0);
    let mut head = match start {
        Some(n) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {n}-{}/{len}\r\n",
            len.saturating_sub(1)
        ),
        None => "HTTP/1.1 200 OK\r\n".to_owned(),
    };
    head.push_str(&format!(
        "Content-Length: {}\r\nAccept-Ranges: bytes\r\nETag: \"{len}\"\r\nConnection: close\r\n\r\n",
        len - offset
    ));
    if stream.write_all(head.as_bytes()).is_err() || file.seek(SeekFrom::Start(offset)).is_err() {
        finish(false);
        return;
    }
    let cut = (nth_for_file <= behaviour.cut_requests).then_some(behaviour.cut_after);
    let mut sent = 0u64;
    let mut buf = vec![0u8; PACE_CHUNK];
    let completed = loop {
        let mut want = PACE_CHUNK;
        if let Some(cut) = cut {
            if sent >= cut {
                break false;
            }
            want = want.min((cut - sent) as usize);
        }
        if let Some(pause) = behaviour.pace {
            std::thread::sleep(pause);
        }
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => break true,
            Ok(n) => n,
            Err(_) => break false,
        };
        if stream
            .write_all(&buf[..n])
            .and_then(|_| stream.flush())
            .is_err()
        {
            break false;
        }
        sent += n as u64;
    };
    // A cut ends the connection with the body short of its Content-Length.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    finish(completed);
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
