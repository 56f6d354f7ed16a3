//! The test HTTP(S) server and proxy the download tests play faults with: a plain TCP
//! listener speaking just enough HTTP/1.1 (so a cut transfer really ends short), with Range,
//! If-Range, ETags, a proxy's Basic auth and a CONNECT tunnel, and a PKI made per test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Clone)]
pub struct File {
    pub body: Vec<u8>,
    pub etag: String,
}

/// What one request asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    /// The request-target as sent: `/m` to an origin, `http://host:port/m` to a proxy,
    /// `host:port` in a CONNECT.
    pub target: String,
    /// The file asked for (the target's path without its leading `/`).
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub proxy_authorization: Option<String>,
    pub status: u16,
}

#[derive(Default)]
pub struct Behaviour {
    pub files: HashMap<String, File>,
    /// The next this many responses send only this many body bytes, then close.
    pub cut: Vec<usize>,
    pub ignore_range: bool,
    /// Pause between 1 KiB body chunks.
    pub slow: Option<Duration>,
    /// The next this many requests get a 500.
    pub fail: usize,
    /// Answers `CONNECT` with 200 and then speaks TLS with this itself, as a proxy whose
    /// tunnel ends here (the origin named in the CONNECT is never contacted); without it
    /// a `CONNECT` gets a 405.
    pub tunnel_tls: Option<TlsAcceptor>,
}

/// A connection, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A request's line and the headers the tests look at.
pub struct Head {
    pub method: String,
    pub target: String,
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub proxy_authorization: Option<String>,
}

pub async fn read_head(stream: &mut BufReader<Box<dyn Io>>) -> std::io::Result<Head> {
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
pub struct Server {
    pub addr: std::net::SocketAddr,
    /// `https` when it speaks TLS from the first byte.
    pub scheme: &'static str,
    pub behaviour: Arc<Mutex<Behaviour>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub active: Arc<AtomicUsize>,
    pub max_active: Arc<AtomicUsize>,
}

impl Server {
    pub async fn start() -> Server {
        Server::listen(None).await
    }

    /// An HTTPS server: TLS with `tls` from the first byte.
    pub async fn start_tls(tls: TlsAcceptor) -> Server {
        Server::listen(Some(tls)).await
    }

    pub async fn listen(tls: Option<TlsAcceptor>) -> Server {
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

    pub fn put(&self, path: &str, body: Vec<u8>, etag: &str) {
        self.behaviour.lock().unwrap().files.insert(
            path.into(),
            File {
                body,
                etag: etag.into(),
            },
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}/{path}", self.scheme, self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

pub async fn serve(
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

/// A CA made for the test (its PEM written to `dir/<name>`) and a TLS acceptor whose
/// certificate for 127.0.0.1 that CA signed.
pub fn pki(dir: &Path, name: &str) -> (PathBuf, TlsAcceptor) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("test CA {name}"));
    let ca =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
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
