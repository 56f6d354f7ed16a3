//! The per-instance sockets: creating them with the right mode, checking each peer against the
//! instance's binding (its process and uid, see [`crate::peer`]), and serving one connection at
//! a time, one request at a time (read, process, answer), as the EVP agent does. Framing errors
//! get the answer docs/sdk-wire.md §4 documents and never take the broker down: an oversized
//! record is drained and answered `EVP_TOOBIG`; a bad header is answered `EVP_INVAL` and
//! closes; a payload that fails verification closes at once.
//!
//! What a request means is not decided here: a connection hands decoded requests to its
//! [`Backend`] (the broker) and waits on it for events.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use evp_schemas::sdk::{
    EvpResult, HEADER_LEN, Header, HeaderError, MAX_PAYLOAD, Request, Response, encode_frame,
};
use futures_util::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::peer::{self, Binding, Refusal};
use crate::rules::{InstanceRef, Peer, Popped};
use crate::wait::Wait;

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
/// A connection's read buffer: larger than most requests (telemetry, states), so one `recv`
/// takes each whole; a larger one is read on in pieces.
const READ_BUFFER: usize = 16 * 1024;

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

/// Why creating an instance's socket failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {io}")]
pub struct SocketError {
    /// The step that failed, with its path.
    what: String,
    io: std::io::Error,
}

/// What serving a socket needs of the broker. This module knows the broker only through it
/// (as Firecracker's vsock device knows only its backend), so the dependency goes one way:
/// the broker opens sockets here and implements the trait.
pub(crate) trait Backend: Send + Sync + 'static {
    /// A checked peer connected: it becomes the instance's connection, given the notifier
    /// that says an event was queued. `None` when the instance is gone, replaced or exiting.
    fn attach(&self, instance: &InstanceRef) -> Option<(Peer, Arc<Notify>)>;
    /// The next event for a getEvent of `peer`.
    fn next_event(&self, peer: &Peer) -> Popped;
    /// The answer to any request but getEvent.
    fn handle<'a>(&'a self, peer: &'a Peer, request: Request) -> BoxFuture<'a, Response>;
    /// The connection ended.
    fn detach<'a>(&'a self, peer: &'a Peer) -> BoxFuture<'a, ()>;
}

/// An instance's socket, created and not served yet.
#[derive(Debug)]
pub(crate) struct Listening {
    listener: UnixListener,
    path: PathBuf,
}

/// Creates `<dir>/<instance>.sock` and `dir` with their modes.
pub(crate) fn listen(dir: &Path, instance: &str) -> Result<Listening, SocketError> {
    let failed = |what: String| move |io| SocketError { what, io };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(failed(format!("creating {}", dir.display())))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
        .map_err(failed(format!("chmod {}", dir.display())))?;
    let path = dir.join(format!("{instance}.sock"));
    match std::fs::remove_file(&path) {
        Ok(()) => debug!("removed a stale {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(format!("removing stale {}", path.display()))(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .map_err(failed(format!("binding {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(failed(format!("chmod {}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(failed("making the listener non-blocking".into()))?;
    let listener =
        UnixListener::from_std(listener).map_err(failed("registering the listener".into()))?;
    Ok(Listening { listener, path })
}

impl Listening {
    /// Starts serving the socket to `instance`'s process, once [`Socket::bind`] says which it
    /// is. Call from a tokio runtime.
    pub(crate) fn serve(self, backend: Arc<dyn Backend>, instance: InstanceRef) -> Socket {
        let (stop, stop_rx) = watch::channel(false);
        let binding = watch::Sender::new(None);
        let binding_rx = binding.subscribe();
        tokio::spawn(serve(backend, instance, self.listener, stop_rx, binding_rx));
        Socket {
            path: self.path,
            stop,
            binding,
        }
    }
}

/// A socket being served: dropping it stops the serving, [`Socket::close`] also removes the
/// file.
#[derive(Debug)]
pub(crate) struct Socket {
    path: PathBuf,
    stop: watch::Sender<bool>,
    /// The process the socket is served to, once `BindInstance` said.
    binding: watch::Sender<Option<Binding>>,
}

impl Socket {
    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Serves the socket to `binding` from now on; returns the binding it replaces.
    pub(crate) fn bind(&self, binding: Binding) -> Option<Binding> {
        self.binding.send_replace(Some(binding))
    }

    /// Becomes true once the socket is closed (and ends, with an error, if it is dropped).
    pub(crate) fn closed(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Removes the file, then stops the listener and the connection.
    pub(crate) fn close(self) {
        // The file first: whoever waits for the stop (CloseInstance) finds it gone.
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!("removing {}: {e}", self.path.display());
        }
        self.stop.send_replace(true);
    }
}

/// Whether the socket's [`Socket`] is gone (closed or dropped).
fn gone(binding: &watch::Receiver<Option<Binding>>) -> bool {
    binding.has_changed().is_err()
}

/// Accepts connections until the socket is closed and serves those of the instance's own
/// process, one at a time. Each new connection is checked apart (held until the instance is
/// bound), so a connection that waits or is refused never takes the slot from the module.
async fn serve(
    backend: Arc<dyn Backend>,
    instance: InstanceRef,
    listener: UnixListener,
    mut stop: watch::Receiver<bool>,
    binding: watch::Receiver<Option<Binding>>,
) {
    let name = instance.name.as_str();
    let (checked_tx, mut checked) = mpsc::channel(MAX_HELD_PEERS);
    let acceptor = tokio::spawn(accept_and_check(
        name.to_owned(),
        listener,
        binding.clone(),
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
        if gone(&binding) {
            break;
        }
        let current = *binding.borrow();
        match current.map(|b| peer::check(b, pid, uid, peer::parent_of)) {
            Some(Ok(())) => {}
            Some(Err(why)) => {
                warn!(instance = name, pid, uid, "refused an SDK peer: {why}");
                continue;
            }
            None => break,
        }
        serve_connection(&backend, &instance, stream, uid, &stop).await;
    }
    acceptor.abort();
}

/// Accepts every connection and checks each in a task of its own against `binding`; those
/// of the instance's process go to `checked`.
async fn accept_and_check(
    instance: String,
    listener: UnixListener,
    binding: watch::Receiver<Option<Binding>>,
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
        if gone(&binding) {
            return;
        }
        let (instance, checked, mut binding) = (instance.clone(), checked.clone(), binding.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // Held until a binding it may be judged by: the first one, or, while the bound
            // process is gone, the next one (see `peer::awaits_rebinding`).
            let bound = tokio::time::timeout(BIND_WAIT, async {
                binding
                    .wait_for(|b| {
                        b.is_some_and(|b| {
                            !peer::awaits_rebinding(b, pid, uid, peer::parent_of, peer::alive)
                        })
                    })
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
    backend: &Arc<dyn Backend>,
    instance: &InstanceRef,
    stream: UnixStream,
    uid: u32,
    stop: &watch::Receiver<bool>,
) {
    let name = instance.name.as_str();
    let Some((peer, notify)) = backend.attach(instance) else {
        debug!(instance = name, "refused a peer: the instance is closing");
        return;
    };
    info!(instance = name, uid, "module connected");
    // Each connection gets a thread of its own with a single-threaded runtime: a module
    // makes one request at a time and waits for the answer, so the round trip is the
    // cost of every SDK call, and a thread woken straight by its socket halves it
    // compared with a task of the shared multi-threaded runtime.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = {
        let (backend, peer, mut stop) = (Arc::clone(backend), peer.clone(), stop.clone());
        let stream = stream.into_std();
        std::thread::Builder::new()
            .name(format!("sdk-{name}"))
            .spawn(move || {
                let instance = peer.instance.name.as_str();
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
                            let mut c = Conn::new(&*backend, &peer, notify, stream);
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
                    backend.detach(&peer).await;
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
            warn!(instance = name, "cannot start a thread for the module: {e}");
            backend.detach(&peer).await;
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
    backend: &'a dyn Backend,
    peer: &'a Peer,
    notify: Arc<Notify>,
    /// Read through a buffer: a request (header and payload, one write of the module's) is
    /// then one `recv`, and that read coming up short tells tokio the socket is drained, so
    /// the next wait goes to epoll without a `recv` that fails with `EAGAIN`.
    stream: BufReader<UnixStream>,
}

impl<'a> Conn<'a> {
    fn new(
        backend: &'a dyn Backend,
        peer: &'a Peer,
        notify: Arc<Notify>,
        stream: UnixStream,
    ) -> Conn<'a> {
        Conn {
            backend,
            peer,
            notify,
            stream: BufReader::with_capacity(READ_BUFFER, stream),
        }
    }

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
                let r = self.backend.handle(self.peer, other).await;
                if r != Response::Simple(EvpResult::Ok) {
                    debug!(
                        instance = self.peer.instance.name,
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
        self.stream.get_mut().write_all(&record).await?;
        Ok(())
    }

    /// Waits for an event until the absolute `CLOCK_REALTIME` deadline (a deadline in the past
    /// is a poll), counted on the monotonic clock from the request's arrival ([`Wait`]),
    /// watching for the peer closing meanwhile.
    async fn get_event(
        &mut self,
        deadline_sec: u64,
        deadline_nsec: u64,
    ) -> Result<evp_schemas::sdk::Event, ConnEnd> {
        let wait = Wait::of_deadline(
            deadline_sec,
            deadline_nsec,
            SystemTime::now(),
            Instant::now(),
        );
        let mut peer_quiet = true;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.backend.next_event(self.peer) {
                Popped::Event(e) => return Ok(e),
                Popped::Exit => return Ok(evp_schemas::sdk::Event::Exit),
                Popped::Gone => return Err(ConnEnd::Gone),
                Popped::Empty => {}
            }
            let slice = match wait.left(Instant::now()) {
                Some(left) if left.is_zero() => return Ok(evp_schemas::sdk::Event::None),
                Some(left) => left.min(MAX_WAIT),
                None => MAX_WAIT,
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(slice) => {}
                closed = peer_closed(self.stream.get_ref()), if peer_quiet => {
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

#[cfg(test)]
mod tests {
    //! A connection against a fake [`Backend`] over a socket pair: the framing and the waiting,
    //! without a broker, a socket file or a peer check.

    use std::collections::VecDeque;
    use std::sync::Mutex;

    use evp_schemas::sdk::{Callback, Event};

    use super::*;

    /// Hands out the events it was given and answers every request `EVP_OK`, keeping them.
    #[derive(Default)]
    struct Fake {
        /// What successive getEvents find; `Empty` once they run out.
        events: Mutex<VecDeque<Popped>>,
        handled: Mutex<Vec<Request>>,
    }

    impl Backend for Fake {
        fn attach(&self, _: &InstanceRef) -> Option<(Peer, Arc<Notify>)> {
            None
        }
        fn next_event(&self, _: &Peer) -> Popped {
            self.events
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Popped::Empty)
        }
        fn handle<'a>(&'a self, _: &'a Peer, request: Request) -> BoxFuture<'a, Response> {
            self.handled.lock().unwrap().push(request);
            Box::pin(async { Response::Simple(EvpResult::Ok) })
        }
        fn detach<'a>(&'a self, _: &'a Peer) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }
    }

    /// Serves one connection against `fake` while `client` talks on the other end; what the
    /// client returned and what ended the connection (the client's end closing, at the latest).
    async fn talk<T, F: Future<Output = T>>(
        fake: &Fake,
        notify: Arc<Notify>,
        client: impl FnOnce(UnixStream) -> F,
    ) -> (T, ConnEnd) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let instance = InstanceRef {
            name: "i".into(),
            id: 1,
        };
        let peer = Peer { instance, conn: 2 };
        let conn = Conn::new(fake, &peer, notify, ours);
        // The connection is dropped once it ends, as serving does, so the client sees EOF.
        let serve = async move {
            let mut conn = conn;
            conn.run().await
        };
        tokio::join!(client(theirs), serve)
    }

    async fn send(s: &mut UnixStream, header: Header, payload: &[u8]) {
        s.write_all(&header.to_bytes()).await.unwrap();
        s.write_all(payload).await.unwrap();
    }

    async fn request(s: &mut UnixStream, xid: u64, request: &Request) {
        let payload = request.encode();
        send(s, Header::new(payload.len() as u32, xid), &payload).await;
    }

    /// The next answer and its xid; `None` once the connection is closed.
    async fn answer(s: &mut UnixStream) -> Option<(u64, Response)> {
        let mut head = [0u8; HEADER_LEN];
        s.read_exact(&mut head).await.ok()?;
        let header = Header::parse(&head);
        let mut payload = vec![0u8; header.size as usize];
        s.read_exact(&mut payload).await.unwrap();
        Some((header.xid, Response::decode(&payload).unwrap()))
    }

    fn state() -> Request {
        Request::SendState {
            topic: "t".into(),
            blob: b"1".to_vec(),
            cb: Callback::default(),
        }
    }

    const OK: Response = Response::Simple(EvpResult::Ok);

    #[tokio::test]
    async fn requests_reach_the_backend_and_answers_carry_their_xid() {
        let fake = Fake::default();
        let (answers, end) = talk(&fake, Arc::default(), async |mut s| {
            request(&mut s, 7, &state()).await;
            let first = answer(&mut s).await;
            request(&mut s, 8, &Request::RequestResendConfig).await;
            [first, answer(&mut s).await]
        })
        .await;
        assert_eq!(answers, [Some((7, OK)), Some((8, OK))]);
        assert_eq!(
            *fake.handled.lock().unwrap(),
            [state(), Request::RequestResendConfig]
        );
        assert!(matches!(end, ConnEnd::Closed), "{end}");
    }

    #[tokio::test]
    async fn an_oversized_record_is_drained_and_answered_toobig_and_serving_goes_on() {
        let fake = Fake::default();
        let too_big = MAX_PAYLOAD + 1;
        let (answers, end) = talk(&fake, Arc::default(), async |mut s| {
            send(&mut s, Header::new(too_big as u32, 5), &vec![0u8; too_big]).await;
            let first = answer(&mut s).await;
            request(&mut s, 6, &state()).await;
            [first, answer(&mut s).await]
        })
        .await;
        let toobig = Response::Simple(EvpResult::TooBig);
        assert_eq!(answers, [Some((5, toobig)), Some((6, OK))]);
        assert_eq!(fake.handled.lock().unwrap().len(), 1);
        assert!(matches!(end, ConnEnd::Closed), "{end}");
    }

    /// A record `header` + `payload` gets `expect` (or nothing), then the connection closes
    /// with `end`, and the backend sees nothing.
    async fn check_refused(
        header: Header,
        payload: &[u8],
        expect: Option<Response>,
        end: fn(&ConnEnd) -> bool,
    ) {
        let fake = Fake::default();
        let (answers, ended) = talk(&fake, Arc::default(), async |mut s| {
            send(&mut s, header, payload).await;
            [answer(&mut s).await, answer(&mut s).await]
        })
        .await;
        let expect = expect.map(|r| (header.xid, r));
        assert_eq!(answers, [expect, None], "{header:?}");
        assert!(end(&ended), "{header:?}: {ended}");
        assert!(fake.handled.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_bad_header_is_answered_inval_and_a_bad_payload_closes_at_once() {
        let inval = Some(Response::Simple(EvpResult::Inval));
        let header = |e: &ConnEnd| matches!(e, ConnEnd::Header(_));
        let decode = |e: &ConnEnd| matches!(e, ConnEnd::Decode(_));
        let reserved = Header {
            size: 4,
            zero: 1,
            xid: 3,
        };
        check_refused(Header::new(0, 1), &[], inval.clone(), header).await;
        check_refused(reserved, &[0; 4], inval, header).await;
        check_refused(Header::new(8, 4), &[0xff; 8], None, decode).await;
    }

    /// A getEvent with `deadline` while the backend has `queued` is answered `expect`; `None`:
    /// the connection ends unanswered because the instance is gone. `wake`: an event was
    /// notified before the getEvent came.
    async fn check_get_event(
        queued: Vec<Popped>,
        deadline: u64,
        wake: bool,
        expect: Option<Event>,
    ) {
        let fake = Fake {
            events: Mutex::new(queued.into()),
            ..Fake::default()
        };
        let notify = Arc::new(Notify::new());
        if wake {
            notify.notify_one();
        }
        let get_event = Request::GetEvent {
            deadline_sec: deadline,
            deadline_nsec: 0,
        };
        let (got, end) = talk(&fake, notify, async |mut s| {
            request(&mut s, 9, &get_event).await;
            answer(&mut s).await
        })
        .await;
        let expect_end = if expect.is_some() { "Closed" } else { "Gone" };
        assert_eq!(got, expect.map(|e| (9, Response::GetEvent(e))));
        assert!(format!("{end:?}").starts_with(expect_end), "{end:?}");
    }

    #[tokio::test]
    async fn a_get_event_takes_the_next_event_waits_for_one_or_times_out() {
        let later = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let event = || Event::Config {
            topic: "t".into(),
            blob: b"v".to_vec(),
        };
        use Popped::{Empty, Exit, Gone};
        check_get_event(vec![Popped::Event(event())], later, false, Some(event())).await;
        check_get_event(
            vec![Empty, Popped::Event(event())],
            later,
            true,
            Some(event()),
        )
        .await;
        check_get_event(vec![], 0, false, Some(Event::None)).await;
        check_get_event(vec![Exit], later, false, Some(Event::Exit)).await;
        check_get_event(vec![Gone], later, false, None).await;
    }
}
