//! A real HTTP server on loopback that serves module files from a directory, and counts the
//! requests it answered.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;

/// A file server on 127.0.0.1; stops on drop.
pub struct FileServer {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    requests: Arc<AtomicUsize>,
    /// Its port.
    pub port: u16,
}

impl FileServer {
    /// Serves the files of `root` (GET `/name`); anything else is a 404.
    pub fn start(root: PathBuf) -> Result<FileServer> {
        let server =
            Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| anyhow::anyhow!("{e}"))?);
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .ok_or_else(|| anyhow::anyhow!("no IP address"))?;
        let requests = Arc::new(AtomicUsize::new(0));
        let (s, count) = (server.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            for request in s.incoming_requests() {
                count.fetch_add(1, Ordering::SeqCst);
                let name = request.url().trim_start_matches('/').to_owned();
                let file = (!name.contains('/') && !name.is_empty())
                    .then(|| std::fs::File::open(root.join(&name)).ok())
                    .flatten();
                let _ = match file {
                    Some(f) => request.respond(tiny_http::Response::from_file(f)),
                    None => request.respond(tiny_http::Response::empty(404)),
                };
            }
        });
        Ok(FileServer {
            server,
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
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
