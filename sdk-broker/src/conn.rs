//! The per-instance sockets: creating them with the right mode, checking each peer against the
//! instance's binding (its process and uid, see [`crate::peer`]), and serving one connection at
//! a time, one request at a time (read, process, answer), as the EVP
//! agent does. Framing errors get the answer docs/sdk-wire.md §4 documents and never take the broker
//! down: an oversized record is drained and answered `EVP_TOOBIG`; a bad header is answered
//! `EVP_INVAL` and closes; a payload that fails verification closes at once.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use evp_schemas::sdk::{
    EvpResult, HEADER_LEN, Header, HeaderError, MAX_PAYLOAD, Request, Response, encode_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::broker::{Broker, BrokerError, Popped};
use crate::peer::{self, Refusal};

/// Socket mode: anyone who can reach it may connect, since who may use it is decided from the
/// peer's credentials (its uid and pid against `BindInstance`), not by the file mode: instances
/// run under uids of their own that no group could list in advance.
const SOCKET_MODE: u32 = 0o666;
/// Mode of `<run_dir>/sdk`: instances may reach a socket whose name they know, but not list the
/// directory.
const DIR_MODE: u32 = 0o711;
/// How long a connection is held waiting for `BindInstance` before it is refused: the bind
/// follows `StartInstance` at once, so only a connection to a socket whose instance is not
/// being started waits this long.
const BIND_WAIT: Duration = Duration::from_secs(15);
/// Connections held (waiting for the binding, or checked and waiting for the one slot) per
/// instance; beyond that a new one is refused at once, so a flood cannot pile up.
const MAX_HELD_PEERS: usize = 8;
/// Longest wait of one getEvent before the deadline is looked at again (a deadline far in the
/// future must not overflow the timer).
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnEnd {
    #[error("peer closed the connection")]
    Closed,
    #[error("socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad record header: {0}")]
    Header(HeaderError),
    #[error("payload refused: {0}")]
    Decode(#[from] evp_schemas::sdk::DecodeError),
    #[error("the instance was closed or the connection replaced")]
    Gone,
}

/// Creates `<run_dir>/sdk/<instance>.sock` and its directory with their modes.
pub(crate) fn bind(
    broker: &Broker,
    instance: &str,
) -> Result<(UnixListener, PathBuf), BrokerError> {
    let io = |what: String| move |e: std::io::Error| BrokerError::Io(format!("{what}: {e}"));
    let dir = broker.sdk_dir();
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
        .map_err(io(format!("chmod {}", dir.display())))?;
    let path = dir.join(format!("{instance}.sock"));
    match std::fs::remove_file(&path) {
        Ok(()) => debug!("removed a stale {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("removing stale {}", path.display()))(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .map_err(io(format!("binding {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io(format!("chmod {}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(io("making the listener non-blocking".into()))?;
    let listener =
        UnixListener::from_std(listener).map_err(io("registering the listener".into()))?;
    Ok((listener, path))
}

/// Accepts connections until the instance is removed and serves those of the instance's own
/// process, one at a time. Each new connection is checked apart (held until the instance is
/// bound), so a connection that waits or is refused never takes the slot from the module.
pub(crate) async fn serve(
    broker: Arc<Broker>,
    instance: String,
    inst_id: u64,
    listener: UnixListener,
    mut stop: watch::Receiver<bool>,
) {
    let (checked_tx, mut checked) = mpsc::channel(MAX_HELD_PEERS);
    let acceptor = tokio::spawn(accept_and_check(
        Arc::clone(&broker),
        instance.clone(),
        inst_id,
        listener,
        checked_tx,
    ));
    loop {
        let (stream, pid, uid) = tokio::select! {
            c = checked.recv() => match c {
                Some(c) => c,
                None => break,
            },
            _ = stopped(&mut stop) => break,
        };
        // Checked again against the binding in force now: a restart may have replaced it
        // while this connection waited for the slot.
        let current = broker.binding(&instance, inst_id).and_then(|b| *b.borrow());
        match current.map(|b| peer::check(b, pid, uid, peer::parent_of)) {
            Some(Ok(())) => {}
            Some(Err(why)) => {
                warn!(instance, pid, uid, "refused an SDK peer: {why}");
                continue;
            }
            None => break,
        }
        serve_connection(&broker, &instance, inst_id, stream, uid, &stop).await;
    }
    acceptor.abort();
}

/// Accepts every connection and checks each in a task of its own; those of the instance's
/// process go to `checked`.
async fn accept_and_check(
    broker: Arc<Broker>,
    instance: String,
    inst_id: u64,
    listener: UnixListener,
    checked: mpsc::Sender<(UnixStream, u32, u32)>,
) {
    let held = Arc::new(Semaphore::new(MAX_HELD_PEERS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(instance, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (pid, uid) = match stream.peer_cred() {
            Ok(c) => (c.pid().and_then(|p| u32::try_from(p).ok()), c.uid()),
            Err(e) => {
                warn!(instance, "SO_PEERCRED failed, refusing the peer: {e}");
                continue;
            }
        };
        let Some(pid) = pid else {
            warn!(instance, uid, "refused an SDK peer whose pid is unknown");
            continue;
        };
        let Ok(permit) = Arc::clone(&held).try_acquire_owned() else {
            warn!(
                instance,
                pid, uid, "refused an SDK peer: {MAX_HELD_PEERS} connections are already waiting"
            );
            continue;
        };
        let Some(mut binding) = broker.binding(&instance, inst_id) else {
            return;
        };
        let (instance, checked) = (instance.clone(), checked.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let bound = tokio::time::timeout(BIND_WAIT, async {
                binding
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|b| *b)
            })
            .await;
            let verdict = match bound {
                Ok(Some(b)) => peer::check(b, pid, uid, peer::parent_of),
                // The instance is gone.
                Ok(None) => return,
                Err(_) => Err(Refusal::Unbound(BIND_WAIT.as_millis())),
            };
            match verdict {
                Ok(()) => {
                    let _ = checked.send((stream, pid, uid)).await;
                }
                Err(why) => warn!(instance, pid, uid, "refused an SDK peer: {why}"),
            }
        });
    }
}

/// Serves one accepted connection until it ends.
async fn serve_connection(
    broker: &Arc<Broker>,
    instance: &str,
    inst_id: u64,
    stream: UnixStream,
    uid: u32,
    stop: &watch::Receiver<bool>,
) {
    let Some((conn, notify)) = broker.attach(instance, inst_id) else {
        debug!(instance, "refused a peer: the instance is closing");
        return;
    };
    info!(instance, uid, "module connected");
    // Each connection gets a thread of its own with a single-threaded runtime: a module
    // makes one request at a time and waits for the answer, so the round trip is the
    // cost of every SDK call, and a thread woken straight by its socket halves it
    // compared with a task of the shared multi-threaded runtime.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = {
        let (broker, instance, mut stop) = (broker.clone(), instance.to_owned(), stop.clone());
        let stream = stream.into_std();
        std::thread::Builder::new()
            .name(format!("sdk-{instance}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(instance, "cannot serve the module: {e}");
                        return;
                    }
                };
                runtime.block_on(async {
                    let end = match stream.and_then(UnixStream::from_std) {
                        Ok(stream) => {
                            let mut c = Conn {
                                broker: &broker,
                                instance: &instance,
                                inst_id,
                                conn,
                                notify,
                                stream,
                            };
                            let end = tokio::select! {
                                e = c.run() => e,
                                _ = stopped(&mut stop) => ConnEnd::Gone,
                            };
                            drop(c);
                            end
                        }
                        Err(e) => ConnEnd::Io(e),
                    };
                    match end {
                        ConnEnd::Closed | ConnEnd::Gone => {
                            info!(instance, "module disconnected: {end}")
                        }
                        other => warn!(instance, "closing the module's connection: {other}"),
                    }
                    broker.detach(&instance, inst_id, conn).await;
                });
                let _ = done_tx.send(());
            })
    };
    match thread {
        // One connection at a time, as the EVP agent serves them.
        Ok(_) => {
            let _ = done_rx.await;
        }
        Err(e) => {
            warn!(instance, "cannot start a thread for the module: {e}");
            broker.detach(instance, inst_id, conn).await;
        }
    }
}

/// Resolves once the instance is removed.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which also means the instance is.
    let _ = stop.wait_for(|s| *s).await;
}

/// One connection.
struct Conn<'a> {
    broker: &'a Broker,
    instance: &'a str,
    inst_id: u64,
    conn: u64,
    notify: Arc<Notify>,
    stream: UnixStream,
}

impl Conn<'_> {
    async fn run(&mut self) -> ConnEnd {
        loop {
            if let Err(e) = self.one().await {
                return e;
            }
        }
    }

    /// Reads one request and answers it.
    async fn one(&mut self) -> Result<(), ConnEnd> {
        let mut head = [0u8; HEADER_LEN];
        match self.stream.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ConnEnd::Closed),
            Err(e) => return Err(e.into()),
        }
        let header = Header::parse(&head);
        match header.check() {
            Ok(()) => {}
            Err(HeaderError::TooBig(size)) => {
                self.drain(u64::from(size)).await?;
                self.answer(header.xid, &Response::Simple(EvpResult::TooBig))
                    .await?;
                return Ok(());
            }
            Err(e) => {
                let _ = self
                    .answer(header.xid, &Response::Simple(EvpResult::Inval))
                    .await;
                return Err(ConnEnd::Header(e));
            }
        }
        let mut payload = vec![0u8; header.size as usize];
        self.stream.read_exact(&mut payload).await?;
        let request = Request::decode(&payload)?;
        drop(payload);
        let response = match request {
            Request::GetEvent {
                deadline_sec,
                deadline_nsec,
            } => Response::GetEvent(self.get_event(deadline_sec, deadline_nsec).await?),
            other => {
                let name = other.name();
                let r = self
                    .broker
                    .handle(self.instance, self.inst_id, self.conn, other)
                    .await;
                if r != Response::Simple(EvpResult::Ok) {
                    debug!(
                        instance = self.instance,
                        request = name,
                        ?r,
                        "request not OK"
                    );
                }
                r
            }
        };
        self.answer(header.xid, &response).await
    }

    /// Reads and discards `n` bytes of an oversized record, in small pieces.
    async fn drain(&mut self, mut n: u64) -> Result<(), ConnEnd> {
        let mut sink = vec![0u8; 16 * 1024];
        while n > 0 {
            let want = usize::try_from(n.min(sink.len() as u64)).unwrap_or(sink.len());
            let got = self.stream.read(&mut sink[..want]).await?;
            if got == 0 {
                return Err(ConnEnd::Closed);
            }
            n -= got as u64;
        }
        Ok(())
    }

    async fn answer(&mut self, xid: u64, response: &Response) -> Result<(), ConnEnd> {
        let payload = response.encode();
        debug_assert!(payload.len() <= MAX_PAYLOAD);
        let record = encode_frame(xid, &payload)
            .map_err(|e| ConnEnd::Io(std::io::Error::other(e.to_string())))?;
        self.stream.write_all(&record).await?;
        Ok(())
    }

    /// Waits for an event until the absolute `CLOCK_REALTIME` deadline (a deadline in the past
    /// is a poll), watching for the peer closing meanwhile.
    async fn get_event(
        &mut self,
        deadline_sec: u64,
        deadline_nsec: u64,
    ) -> Result<evp_schemas::sdk::Event, ConnEnd> {
        let deadline = Duration::from_secs(deadline_sec)
            .checked_add(Duration::from_nanos(deadline_nsec))
            .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d));
        let mut peer_quiet = true;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.broker.pop(self.instance, self.inst_id, self.conn) {
                Popped::Event(e) => return Ok(e),
                Popped::Exit => return Ok(evp_schemas::sdk::Event::Exit),
                Popped::Gone => return Err(ConnEnd::Gone),
                Popped::Empty => {}
            }
            let wait = match deadline {
                Some(d) => match d.duration_since(SystemTime::now()) {
                    Ok(left) if !left.is_zero() => left.min(MAX_WAIT),
                    _ => return Ok(evp_schemas::sdk::Event::None),
                },
                None => MAX_WAIT,
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(wait) => {}
                closed = peer_closed(&self.stream), if peer_quiet => {
                    if closed? {
                        return Err(ConnEnd::Closed);
                    }
                    // The client already wrote its next request: stop watching, keep waiting.
                    peer_quiet = false;
                }
            }
        }
    }
}

/// Resolves when the peer's side has something to read: `true` for end of file, `false` for
/// data (a pipelined request), without consuming it.
async fn peer_closed(stream: &UnixStream) -> std::io::Result<bool> {
    let mut byte = [0u8; 1];
    loop {
        stream.readable().await?;
        let peek = stream.try_io(tokio::io::Interest::READABLE, || {
            nix::sys::socket::recv(
                stream.as_raw_fd(),
                &mut byte,
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            )
            .map_err(std::io::Error::from)
        });
        match peek {
            Ok(n) => return Ok(n == 0),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
