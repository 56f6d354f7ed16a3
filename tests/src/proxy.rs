//! An HTTP CONNECT proxy on loopback with Basic auth, which a test can cut like the
//! [`Relay`](crate::relay::Relay): a CONNECT with the right credentials to a loopback address
//! gets `200` and a tunnel; wrong or missing credentials get `407`; any other target `403`
//! (tests send traffic to loopback only). It records each request, and the first byte the
//! client sent through each tunnel (`0x16` opens a TLS handshake).

use std::sync::{Arc, Mutex};

use anyhow::Result;
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::relay::{Cuttable, pipe, wait_listening};

/// The longest request head read; a CONNECT is a few lines.
const MAX_HEAD: usize = 8192;

/// One request the proxy answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request line's target (`host:port` for a CONNECT).
    pub target: String,
    /// The status answered.
    pub status: u16,
    /// The first byte the client sent through the tunnel, once it did.
    pub first_byte: Option<u8>,
}

/// The running proxy; stops on drop.
pub struct ConnectProxy {
    /// Where clients connect, on 127.0.0.1.
    pub port: u16,
    up: Arc<watch::Sender<bool>>,
    requests: Arc<Mutex<Vec<Request>>>,
    task: JoinHandle<()>,
}

impl ConnectProxy {
    /// A proxy that lets through CONNECTs authenticated as `user`:`password`, up.
    pub async fn start(user: &str, password: &str) -> Result<ConnectProxy> {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        let (port, up, task) = Cuttable::start(move |client, cut| {
            serve(client, cut, expected.clone(), Arc::clone(&log))
        })
        .await?;
        Ok(ConnectProxy {
            port,
            up,
            requests,
            task,
        })
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("proxy log").clone()
    }

    /// Cuts the proxy: open tunnels are reset and new connections refused.
    pub fn down(&self) {
        self.up.send_replace(false);
    }

    /// Lets clients through again.
    pub async fn up(&self) -> Result<()> {
        self.up.send_replace(true);
        wait_listening(self.port).await
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The request head: its bytes up to the blank line, and any bytes read past it.
async fn read_head(client: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What to answer `head`, and the upstream to tunnel to on a 200.
async fn decide(head: &str, expected_auth: &str) -> (String, u16, Option<TcpStream>) {
    let mut lines = head.lines();
    let mut words = lines.next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default().to_owned(),
    );
    if method != "CONNECT" {
        return (target, 405, None);
    }
    let authorized = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("proxy-authorization") && value.trim() == expected_auth
        })
    });
    if !authorized {
        return (target, 407, None);
    }
    let Ok(addrs) = tokio::net::lookup_host(target.as_str()).await else {
        return (target, 502, None);
    };
    let addrs: Vec<_> = addrs.collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        return (target, 403, None);
    }
    match TcpStream::connect(&addrs[..]).await {
        Ok(upstream) => (target, 200, Some(upstream)),
        Err(_) => (target, 502, None),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "Connection established",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        _ => "Bad Gateway",
    }
}

async fn serve(
    mut client: TcpStream,
    cut: watch::Receiver<bool>,
    expected_auth: String,
    log: Arc<Mutex<Vec<Request>>>,
) {
    let Some((head, rest)) = read_head(&mut client).await else {
        return;
    };
    let (target, status, upstream) = decide(&head, &expected_auth).await;
    let index = {
        let mut log = log.lock().expect("proxy log");
        log.push(Request {
            target,
            status,
            first_byte: rest.first().copied(),
        });
        log.len() - 1
    };
    // A 2xx answer to CONNECT carries no Content-Length (RFC 9110 §9.3.6).
    let headers = match status {
        200 => "",
        407 => "Proxy-Authenticate: Basic realm=\"evp-test\"\r\nContent-Length: 0\r\n",
        _ => "Content-Length: 0\r\n",
    };
    let answer = format!("HTTP/1.1 {status} {}\r\n{headers}\r\n", reason(status));
    if client.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let Some(mut upstream) = upstream else {
        return;
    };
    let mut first = rest;
    if first.is_empty() {
        let mut byte = [0u8; 1];
        match client.read(&mut byte).await {
            Ok(1) => first.push(byte[0]),
            _ => return,
        }
        log.lock().expect("proxy log")[index].first_byte = Some(byte[0]);
    }
    if upstream.write_all(&first).await.is_err() {
        return;
    }
    pipe(client, upstream, cut).await;
}
