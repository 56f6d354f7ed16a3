//! The EVP module SDK in Rust: the API of the EVP C SDK (`EVP_initialize`, `EVP_sendState`,
//! `EVP_processEvent`, ...) in idiomatic Rust, over the remote SDK socket that sdk-broker (or
//! the EVP agent) serves. It speaks exactly the protocol of docs/sdk-wire.md, with the framing and
//! tables of `evp_schemas::sdk`, over a blocking `UnixStream`: one request at a time, request
//! ids counting from 1000, like the C client.
//!
//! Two styles, which mix:
//!
//! - **Callbacks**, as in C: register handlers with [`Client::set_configuration_callback`],
//!   [`Client::set_message_callback`] and [`Client::set_rpc_callback`], then call
//!   [`Client::process_event`] in a loop until it returns [`EvpResult::ShouldExit`].
//! - **Events**: call [`Client::next_event`] and match on [`Event`].
//!
//! Every `send_*` call takes a completion closure that runs inside a later
//! `process_event`/`next_event`, with the reason docs/sdk-wire.md §6 gives (`SENT`, `OVERWRITTEN`, `EXIT`,
//! ...). A refused call returns [`Error::Agent`] with the agent's code, for example
//! [`EvpResult::Again`] when a queue is full: try again after processing events.
//!
//! ```no_run
//! use evp_sdk::{Client, EvpResult};
//! use std::time::Duration;
//!
//! let mut client = Client::initialize().expect("no SDK socket");
//! client
//!     .set_configuration_callback(|client, topic, value| {
//!         let _ = client.send_state(topic, value, |_| {});
//!     })
//!     .expect("configuration callback");
//! loop {
//!     if client.process_event(Some(Duration::from_secs(1))) == EvpResult::ShouldExit {
//!         break;
//!     }
//! }
//! ```

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use evp_schemas::sdk::{self as wire, Callback, FIRST_XID, Request, Response};

pub use evp_schemas::sdk::{
    BLOB_RESULT_ERROR, BLOB_RESULT_ERROR_HTTP, BLOB_RESULT_SUCCESS, BLOB_TYPE_AZURE_BLOB,
    BLOB_TYPE_EVP_EXT, BLOB_TYPE_HTTP, BLOB_TYPE_HTTP_EXT, BlobOutcome, BlobReason, BlobRequest,
    EvpResult, MessageSentReason, RpcResponseReason, RpcStatus, StateReason, TelemetryReason,
};

/// The environment variable that names the instance's SDK socket, `EVP_MODULE_SDK_SOCKET_PATH`.
pub const ENV_SOCKET: &str = evp_schemas::instance::ENV_SDK_SOCKET;
/// The environment variable that names the instance's workspace,
/// `EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH`.
pub const ENV_WORKSPACE: &str = evp_schemas::instance::ENV_DEFAULT_WORKSPACE;
/// The socket path when [`ENV_SOCKET`] is unset (docker mounts the instance directory at /evp).
pub const DEFAULT_SOCKET: &str = "/evp/sdk.sock";
/// The workspace when [`ENV_WORKSPACE`] is unset.
pub const DEFAULT_WORKSPACE: &str = "/evp/default_workspace";
/// How long a call other than getEvent waits for its answer: the C client's limit.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an SDK call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent refused the call with this code (`EVP_AGAIN`: a queue is full, retry after
    /// processing events; `EVP_INVAL`: a bad argument; `EVP_TOOBIG`: too large).
    #[error("the agent answered {0}")]
    Agent(EvpResult),
    /// The SDK socket could not be reached at initialisation.
    #[error("cannot connect to the SDK socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The socket failed or closed while talking to the agent; the module should exit.
    #[error("SDK socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The agent's answer broke the protocol (wrong xid, undecodable table).
    #[error("the agent broke the SDK protocol: {0}")]
    Protocol(String),
}

impl Error {
    /// The `EVP_RESULT` the C SDK would return for this failure.
    pub fn result(&self) -> EvpResult {
        match self {
            Error::Agent(r) => *r,
            Error::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                EvpResult::TimedOut
            }
            // The C client turns any I/O error into SHOULDEXIT: the agent is gone.
            Error::Io(_) | Error::Connect { .. } => EvpResult::ShouldExit,
            Error::Protocol(_) => EvpResult::AgentProtocolError,
        }
    }
}

impl From<wire::FrameError> for Error {
    fn from(e: wire::FrameError) -> Self {
        match e {
            wire::FrameError::Io(e) => Error::Io(e),
            other => Error::Protocol(other.to_string()),
        }
    }
}

/// A direct command from the hub, to be answered once with [`Client::send_rpc_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcRequest {
    /// The request id to answer.
    pub id: u64,
    /// Method name.
    pub method: String,
    /// Parameters, JSON text.
    pub params: String,
}

/// One event from the agent, as [`Client::next_event`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A configuration value for `topic`.
    Configuration {
        /// Configuration topic.
        topic: String,
        /// Value bytes.
        value: Vec<u8>,
    },
    /// A message from another instance; `topic` is this instance's subscribe alias.
    Message {
        /// Subscribe alias.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A direct command.
    RpcRequest(RpcRequest),
    /// The completion of an earlier `send_*` call; its closure has already run.
    Completed,
    /// Nothing happened before the timeout (`EVP_TIMEDOUT`).
    TimedOut,
    /// The agent asks the module to exit and nothing is left to process (`EVP_SHOULDEXIT`).
    Exit,
}

/// A completion closure waiting for its callback event.
enum Done {
    State(Box<dyn FnOnce(StateReason) + Send>),
    Message(Box<dyn FnOnce(MessageSentReason) + Send>),
    Telemetry(Box<dyn FnOnce(TelemetryReason) + Send>),
    Rpc(Box<dyn FnOnce(RpcResponseReason) + Send>),
    Blob(Box<dyn FnOnce(wire::BlobReason, wire::BlobOutcome) + Send>),
}

/// A configuration handler.
type ConfigHandler = Box<dyn FnMut(&mut Client, &str, &[u8]) + Send>;
/// A message handler.
type MessageHandler = Box<dyn FnMut(&mut Client, &str, &[u8]) + Send>;
/// A direct-command handler.
type RpcHandler = Box<dyn FnMut(&mut Client, RpcRequest) + Send>;

/// The SDK socket at the level of the wire: one request at a time, each answered by the
/// response with its xid. [`Client`] builds the C SDK's API on it; runtimed-wasm serves the
/// `env.EVP_*` imports of WASM modules with it.
#[derive(Debug)]
pub struct Connection {
    /// The socket, read through a buffer: an answer (header and payload, sent in one write)
    /// then costs one `recv`, not two. Written to through `get_ref`, unbuffered.
    reader: BufReader<UnixStream>,
    /// The read timeout last set on the socket (`None`: never set), so that it is set again
    /// only when it will not do (see [`read_timeout_will_do`]): an SDK call is then two
    /// system calls, not three.
    read_timeout: Option<Option<Duration>>,
    next_xid: u64,
}

/// Whether the socket's read timeout `current` (`None`: never set; `Some(None)`: none) serves
/// a call that wants `wanted`. The timeout only catches an agent that stopped answering, so
/// one up to [`CALL_TIMEOUT`] longer than wanted does: a module alternating between calls
/// (`CALL_TIMEOUT`) and getEvents (their timeout plus `CALL_TIMEOUT`) sets it once.
fn read_timeout_will_do(current: Option<Option<Duration>>, wanted: Option<Duration>) -> bool {
    match (current, wanted) {
        (Some(None), None) => true,
        (Some(Some(current)), Some(wanted)) => {
            current >= wanted && current - wanted <= CALL_TIMEOUT
        }
        _ => false,
    }
}

/// The read buffer: larger than the answers modules usually get, so one `recv` takes each
/// whole; a larger answer is read on in pieces.
const READ_BUFFER: usize = 16 * 1024;

impl Connection {
    /// Connects to the SDK socket at `socket`.
    pub fn connect(socket: &Path) -> Result<Connection, Error> {
        let stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
            path: socket.to_owned(),
            source,
        })?;
        Ok(Connection {
            reader: BufReader::with_capacity(READ_BUFFER, stream),
            read_timeout: None,
            next_xid: FIRST_XID,
        })
    }

    /// The socket itself, for whoever must unblock a call from another thread (by shutting it
    /// down) or poll it.
    pub fn stream(&self) -> &UnixStream {
        self.reader.get_ref()
    }

    /// Sends one request and reads its answer, waiting at most `timeout` (`None`: forever).
    pub fn call(
        &mut self,
        request: &Request,
        timeout: Option<Duration>,
    ) -> Result<Response, Error> {
        let xid = self.next_xid;
        self.next_xid += 1;
        let payload = request.encode();
        let record = wire::encode_frame(xid, &payload).map_err(|e| match e {
            wire::FrameError::TooBig(_) => Error::Agent(EvpResult::TooBig),
            other => other.into(),
        })?;
        if !read_timeout_will_do(self.read_timeout, timeout) {
            self.reader.get_ref().set_read_timeout(timeout)?;
            self.read_timeout = Some(timeout);
        }
        self.reader.get_ref().write_all(&record)?;
        let (header, payload) = wire::read_frame(&mut self.reader)?;
        if header.xid != xid {
            return Err(Error::Protocol(format!(
                "answer to request {} arrived for request {xid}",
                header.xid
            )));
        }
        Response::decode(&payload).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// A call answered with `Simple`: `Ok` for `EVP_OK`, the agent's code otherwise.
    pub fn simple(&mut self, request: &Request) -> Result<(), Error> {
        match self.call(request, Some(CALL_TIMEOUT))? {
            Response::Simple(EvpResult::Ok) => Ok(()),
            Response::Simple(r) => Err(Error::Agent(r)),
            other => Err(Error::Protocol(format!(
                "{} answered with {other:?}",
                request.name()
            ))),
        }
    }

    /// `getEvent`: waits for one event for at most `timeout` (`None`: until one arrives;
    /// zero: poll). `Event::None` means nothing came in time.
    pub fn get_event(&mut self, timeout: Option<Duration>) -> Result<wire::Event, Error> {
        /// A deadline for "forever": far enough, and still a valid `time_t`.
        const FOREVER_SECS: u64 = i64::MAX as u64;
        let (sec, nsec, read_timeout) = match timeout {
            Some(t) => {
                let at = SystemTime::now()
                    .checked_add(t)
                    .and_then(|d| d.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .unwrap_or(Duration::from_secs(FOREVER_SECS));
                (
                    at.as_secs(),
                    u64::from(at.subsec_nanos()),
                    Some(t.saturating_add(CALL_TIMEOUT)),
                )
            }
            None => (FOREVER_SECS, 0, None),
        };
        let request = Request::GetEvent {
            deadline_sec: sec,
            deadline_nsec: nsec,
        };
        match self.call(&request, read_timeout)? {
            Response::GetEvent(e) => Ok(e),
            Response::Simple(r) => Err(Error::Agent(r)),
            other => Err(Error::Protocol(format!("getEvent answered with {other:?}"))),
        }
    }
}

/// A module's connection to the agent (`struct EVP_client`).
pub struct Client {
    conn: Connection,
    workspace: PathBuf,
    done: HashMap<u64, Done>,
    next_cb: u64,
    on_config: Option<ConfigHandler>,
    config_set: bool,
    on_message: Option<MessageHandler>,
    on_rpc: Option<RpcHandler>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("workspace", &self.workspace)
            .field("next_xid", &self.conn.next_xid)
            .field("pending_callbacks", &self.done.len())
            .finish_non_exhaustive()
    }
}

/// An environment variable, with empty meaning unset.
fn env_path(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

impl Client {
    /// `EVP_initialize`: connects to the socket named by [`ENV_SOCKET`], with the workspace
    /// named by [`ENV_WORKSPACE`] (or their defaults).
    pub fn initialize() -> Result<Client, Error> {
        Client::connect(
            &env_path(ENV_SOCKET, DEFAULT_SOCKET),
            env_path(ENV_WORKSPACE, DEFAULT_WORKSPACE),
        )
    }

    /// Connects to the SDK socket at `socket`, with `workspace` as the workspace directory.
    pub fn connect(socket: &Path, workspace: PathBuf) -> Result<Client, Error> {
        Ok(Client {
            conn: Connection::connect(socket)?,
            workspace,
            done: HashMap::new(),
            next_cb: 1,
            on_config: None,
            config_set: false,
            on_message: None,
            on_rpc: None,
        })
    }

    /// `EVP_getWorkspaceDirectory`: the instance's persistent workspace.
    pub fn workspace_directory(&self) -> &Path {
        &self.workspace
    }

    /// Sends a request carrying a completion; the closure is kept only if the agent took it.
    fn with_done(
        &mut self,
        done: Done,
        build: impl FnOnce(Callback) -> Request,
    ) -> Result<(), Error> {
        let id = self.next_cb;
        self.next_cb += 1;
        let request = build(Callback {
            cb: id,
            userdata: 0,
        });
        self.conn.simple(&request)?;
        self.done.insert(id, done);
        Ok(())
    }

    /// `EVP_setConfigurationCallback`: registers `handler` and asks the agent to deliver every
    /// stored configuration again. A second call fails with `EVP_ERROR`.
    pub fn set_configuration_callback(
        &mut self,
        handler: impl FnMut(&mut Client, &str, &[u8]) + Send + 'static,
    ) -> Result<(), Error> {
        if self.config_set {
            return Err(Error::Agent(EvpResult::Error));
        }
        self.conn.simple(&Request::RequestResendConfig)?;
        self.on_config = Some(Box::new(handler));
        self.config_set = true;
        Ok(())
    }

    /// `EVP_setMessageCallback`: registers the handler of messages on subscribe aliases. A
    /// second call fails with `EVP_INVAL`.
    pub fn set_message_callback(
        &mut self,
        handler: impl FnMut(&mut Client, &str, &[u8]) + Send + 'static,
    ) -> Result<(), Error> {
        if self.on_message.is_some() {
            return Err(Error::Agent(EvpResult::Inval));
        }
        self.on_message = Some(Box::new(handler));
        Ok(())
    }

    /// `EVP_setRpcCallback`: registers the handler of direct commands; it must answer each
    /// one once with [`Client::send_rpc_response`]. A second call fails with `EVP_INVAL`.
    /// Without a handler, [`Client::process_event`] answers commands with `ERROR` itself.
    pub fn set_rpc_callback(
        &mut self,
        handler: impl FnMut(&mut Client, RpcRequest) + Send + 'static,
    ) -> Result<(), Error> {
        if self.on_rpc.is_some() {
            return Err(Error::Agent(EvpResult::Inval));
        }
        self.on_rpc = Some(Box::new(handler));
        Ok(())
    }

    /// `EVP_sendState`: schedules the state of `topic`; `done` gets `SENT`, `OVERWRITTEN` (a
    /// newer value replaced it first), `EXIT` or `DENIED`.
    pub fn send_state(
        &mut self,
        topic: &str,
        value: &[u8],
        done: impl FnOnce(StateReason) + Send + 'static,
    ) -> Result<(), Error> {
        self.with_done(Done::State(Box::new(done)), |cb| Request::SendState {
            topic: topic.to_owned(),
            blob: value.to_vec(),
            cb,
        })
    }

    /// `EVP_sendTelemetry`: `(key, JSON value)` entries, sent as one call. A value that is not
    /// JSON is accepted, as EVP accepts it, and reaches the hub as a JSON string; a call too
    /// big for one MQTT message gives `EVP_TOOBIG`, a full queue `EVP_AGAIN`.
    pub fn send_telemetry(
        &mut self,
        entries: &[(&str, &str)],
        done: impl FnOnce(TelemetryReason) + Send + 'static,
    ) -> Result<(), Error> {
        self.with_done(Done::Telemetry(Box::new(done)), |cb| {
            Request::SendTelemetry {
                entries: entries
                    .iter()
                    .map(|(k, v)| wire::TelemetryEntry {
                        key: (*k).to_owned(),
                        value: (*v).to_owned(),
                    })
                    .collect(),
                cb,
            }
        })
    }

    /// `EVP_sendMessage`: sends `payload` on the publish alias `topic`; `done` gets `SENT` if
    /// at least one instance received it, `ERROR` otherwise, or `EXIT`.
    pub fn send_message(
        &mut self,
        topic: &str,
        payload: &[u8],
        done: impl FnOnce(MessageSentReason) + Send + 'static,
    ) -> Result<(), Error> {
        self.with_done(Done::Message(Box::new(done)), |cb| Request::SendMessage {
            topic: topic.to_owned(),
            blob: payload.to_vec(),
            cb,
        })
    }

    /// `EVP_sendRpcResponse`: answers the direct command `id`.
    pub fn send_rpc_response(
        &mut self,
        id: u64,
        response: &str,
        status: RpcStatus,
        done: impl FnOnce(RpcResponseReason) + Send + 'static,
    ) -> Result<(), Error> {
        self.with_done(Done::Rpc(Box::new(done)), |cb| Request::SendRpcResponse {
            id,
            response: Some(response.to_owned()),
            status: status.code(),
            cb,
        })
    }

    /// `EVP_blobOperation` on a file: `kind` is the `EVP_BLOB_TYPE` (`wire::BLOB_TYPE_HTTP`,
    /// ...), `op` GET 0 or PUT 1, `filename` inside the workspace; `done` gets the reason
    /// (`DONE`, `EXIT`) and the transfer's result. A request refused at once (too many under
    /// way: `EVP_DENIED`; a file outside the workspace: `EVP_INVAL`) is the error.
    pub fn blob_operation(
        &mut self,
        kind: u32,
        op: u32,
        request: wire::BlobRequest,
        filename: &str,
        done: impl FnOnce(wire::BlobReason, wire::BlobOutcome) + Send + 'static,
    ) -> Result<(), Error> {
        self.with_done(Done::Blob(Box::new(done)), |cb| Request::BlobOperation {
            kind,
            op,
            request,
            filename: filename.to_owned(),
            cb,
        })
    }

    /// Waits for one event for at most `timeout` (`None`: until one arrives; zero: poll).
    /// Completion closures run here and are reported as [`Event::Completed`].
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Event, Error> {
        let event = self.conn.get_event(timeout)?;
        Ok(match event {
            wire::Event::None => Event::TimedOut,
            wire::Event::Exit => Event::Exit,
            wire::Event::Config { topic, blob } => Event::Configuration { topic, value: blob },
            wire::Event::MessageReceived { topic, blob } => Event::Message {
                topic,
                payload: blob,
            },
            wire::Event::RpcRequest { id, method, params } => {
                Event::RpcRequest(RpcRequest { id, method, params })
            }
            wire::Event::State { cb, reason } => {
                if let Some(Done::State(f)) = self.done.remove(&cb.cb) {
                    f(reason);
                }
                Event::Completed
            }
            wire::Event::MessageSent { cb, reason } => {
                if let Some(Done::Message(f)) = self.done.remove(&cb.cb) {
                    f(reason);
                }
                Event::Completed
            }
            wire::Event::Telemetry { cb, reason } => {
                if let Some(Done::Telemetry(f)) = self.done.remove(&cb.cb) {
                    f(reason);
                }
                Event::Completed
            }
            wire::Event::RpcResponse { cb, reason } => {
                if let Some(Done::Rpc(f)) = self.done.remove(&cb.cb) {
                    f(reason);
                }
                Event::Completed
            }
            wire::Event::Blob { cb, reason, result } => {
                if let Some(Done::Blob(f)) = self.done.remove(&cb.cb) {
                    f(reason, result);
                }
                Event::Completed
            }
        })
    }

    /// `EVP_processEvent`: dispatches one event to its handler. `EVP_OK` when one was
    /// handled, `EVP_TIMEDOUT` when none came, `EVP_SHOULDEXIT` when the agent asks the
    /// module to exit (or is gone): the module should then return from `main`.
    pub fn process_event(&mut self, timeout: Option<Duration>) -> EvpResult {
        let event = match self.next_event(timeout) {
            Ok(e) => e,
            Err(e) => return e.result(),
        };
        match event {
            Event::TimedOut => return EvpResult::TimedOut,
            Event::Exit => return EvpResult::ShouldExit,
            Event::Completed => {}
            Event::Configuration { topic, value } => {
                if let Some(mut h) = self.on_config.take() {
                    h(self, &topic, &value);
                    self.on_config.get_or_insert(h);
                }
            }
            Event::Message { topic, payload } => {
                if let Some(mut h) = self.on_message.take() {
                    h(self, &topic, &payload);
                    self.on_message.get_or_insert(h);
                }
            }
            Event::RpcRequest(req) => match self.on_rpc.take() {
                Some(mut h) => {
                    h(self, req);
                    self.on_rpc.get_or_insert(h);
                }
                None => {
                    // EVP leaves such a command unanswered; an answer is better for the hub.
                    let _ = self.send_rpc_response(
                        req.id,
                        "{\"error\":\"this module has no RPC callback\"}",
                        RpcStatus::Error,
                        |_| {},
                    );
                }
            },
        }
        EvpResult::Ok
    }

    /// Runs completion closures and handlers until the agent asks the module to exit, the
    /// connection ends or breaks; `idle` runs whenever `tick` passes without an event.
    /// Returns what ended the loop (`EVP_SHOULDEXIT` normally).
    pub fn run_until_exit(
        &mut self,
        tick: Duration,
        mut idle: impl FnMut(&mut Client),
    ) -> EvpResult {
        loop {
            match self.process_event(Some(tick)) {
                EvpResult::Ok => {}
                EvpResult::TimedOut => idle(self),
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_timeout_is_set_again_only_when_it_will_not_do() {
        fn check(current: Option<Option<u64>>, wanted: Option<u64>, will_do: bool) {
            let secs = |s: Option<u64>| s.map(Duration::from_secs);
            let got = read_timeout_will_do(current.map(secs), secs(wanted));
            assert_eq!(got, will_do, "current {current:?}, wanted {wanted:?}");
        }
        let call = CALL_TIMEOUT.as_secs();
        check(None, Some(call), false);
        check(None, None, false);
        check(Some(Some(call)), Some(call), true);
        // A getEvent of 5 s after a call, then calls again: set once, then kept.
        check(Some(Some(call)), Some(call + 5), false);
        check(Some(Some(call + 5)), Some(call), true);
        // Far longer than wanted: a stalled agent would be noticed too late.
        check(Some(Some(3 * call)), Some(call), false);
        check(Some(Some(call - 1)), Some(call), false);
        // Forever and a bound are never each other.
        check(Some(None), None, true);
        check(Some(None), Some(call), false);
        check(Some(Some(call)), None, false);
    }
}
