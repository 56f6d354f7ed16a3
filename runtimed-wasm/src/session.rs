//! One instance's SDK state on the host: its connection to sdk-broker (over the instance's own
//! socket, the remote modules' protocol, opened at the first call that needs it), the
//! callbacks the module registered, and the control block through which a stop reaches an
//! instance thread that is busy or blocked.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use evp_schemas::sdk::{self as wire, EvpResult, Request};
use evp_sdk::{Connection, Error};

use crate::memory_blob::MemoryBlobs;

/// How long a refused first connection is tried again (see [`Session::with_conn`]): more than
/// the few D-Bus round trips between `StartInstance`'s answer and `BindInstance`.
const REBIND_WAIT: Duration = Duration::from_secs(3);
/// The first wait before connecting again; it doubles up to [`REBIND_RETRY_MAX`].
const REBIND_RETRY_FIRST: Duration = Duration::from_millis(10);
/// The longest wait between two connections.
const REBIND_RETRY_MAX: Duration = Duration::from_millis(200);

/// Why an instance's threads are told to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interruption {
    /// The instance is being stopped.
    Stop,
    /// One of its threads failed: the instance fails with this.
    Failure(String),
    /// One of its threads called `proc_exit` with this status, which ends the instance.
    Exited(i32),
}

/// What a stop (or a failing thread of the instance) tells the instance's threads.
#[derive(Debug, Default)]
pub struct Control {
    interrupted: AtomicBool,
    why: Mutex<Option<Interruption>>,
    socket: Mutex<Option<UnixStream>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single store or take: the value is consistent after a panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Control {
    /// Whether the instance must end now: WASM code traps at its next epoch check.
    pub fn is_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    /// Ends the instance: its WASM traps at the next epoch tick and a call blocked on its SDK
    /// socket returns (the socket is shut down). The first reason given is kept.
    pub fn interrupt(&self, why: Interruption) {
        {
            let mut first = lock(&self.why);
            if first.is_none() {
                *first = Some(why);
            }
        }
        self.interrupted.store(true, Ordering::Relaxed);
        if let Some(socket) = lock(&self.socket).as_ref() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Why the instance was interrupted, if it was.
    pub fn interruption(&self) -> Option<Interruption> {
        lock(&self.why).clone()
    }

    /// Keeps a handle on the instance's SDK socket for [`Control::interrupt`]; if the instance
    /// is already interrupted, the socket is shut down at once.
    fn watch_socket(&self, socket: UnixStream) {
        *lock(&self.socket) = Some(socket);
        if self.is_interrupted()
            && let Some(s) = lock(&self.socket).as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A callback the module registered: a function-table index and its user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// Index into table 0.
    pub index: u32,
    /// The `userData` argument, handed back as it came.
    pub user: i32,
}

/// The SDK side of one instance.
#[derive(Debug)]
pub struct Session {
    socket: PathBuf,
    conn: Option<Connection>,
    /// The connection has had an answer: sdk-broker accepted it.
    accepted: bool,
    control: Arc<Control>,
    /// `EVP_setConfigurationCallback`'s, once called.
    pub configuration: Option<Registered>,
    /// `EVP_setMessageCallback`'s, once called.
    pub message: Option<Registered>,
    /// `EVP_setRpcCallback`'s, once called.
    pub rpc: Option<Registered>,
    /// The guest copy of the workspace path, made at the first `EVP_getWorkspaceDirectory`.
    pub workspace_ptr: Option<u32>,
    /// The memory blob operations under way.
    pub memory_blobs: MemoryBlobs,
}

/// The callback fields of a request: the guest's table index and user data, which sdk-broker
/// echoes in the completion event.
pub fn wire_callback(index: i32, user: i32) -> wire::Callback {
    wire::Callback {
        cb: u64::from(index as u32),
        userdata: u64::from(user as u32),
    }
}

/// The `(index, user)` of a completion event, as the guest gave them.
pub fn guest_callback(cb: &wire::Callback) -> Option<Registered> {
    let index = u32::try_from(cb.cb).ok().filter(|i| *i != 0)?;
    Some(Registered {
        index,
        user: cb.userdata as u32 as i32,
    })
}

impl Session {
    /// The session of an instance whose SDK socket is `socket`.
    pub fn new(socket: PathBuf, control: Arc<Control>) -> Session {
        Session {
            socket,
            conn: None,
            accepted: false,
            control,
            configuration: None,
            message: None,
            rpc: None,
            workspace_ptr: None,
            memory_blobs: MemoryBlobs::default(),
        }
    }

    /// The connection, made now if it is the first call.
    fn conn(&mut self) -> Result<&mut Connection, Error> {
        if self.control.is_interrupted() {
            return Err(Error::Io(std::io::Error::other(
                "the instance is being stopped",
            )));
        }
        if self.conn.is_none() {
            let conn = Connection::connect(&self.socket)?;
            self.control.watch_socket(conn.stream().try_clone()?);
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| Error::Protocol("no connection".into()))
    }

    /// Runs `call` on the connection. A new connection that sdk-broker closes before its first
    /// answer was refused by its peer check: while the instance restarts, the socket is still
    /// bound to its previous process until reconcilerd's `BindInstance` (which follows
    /// `StartInstance`) arrives, so the call is made again on a new connection for a moment.
    /// A request is never processed on a refused connection, so sending it again is safe.
    fn with_conn<T>(
        &mut self,
        mut call: impl FnMut(&mut Connection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let mut delay = REBIND_RETRY_FIRST;
        loop {
            let result = self.conn().and_then(&mut call);
            match result {
                Err(Error::Io(e))
                    if !self.accepted
                        && self.conn.is_some()
                        && !self.control.is_interrupted()
                        && started.elapsed() < REBIND_WAIT =>
                {
                    tracing::debug!(
                        "the SDK connection was closed before its first answer ({e}); connecting again"
                    );
                    self.conn = None;
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(REBIND_RETRY_MAX);
                }
                result => {
                    self.accepted |= result.is_ok() || matches!(result, Err(Error::Agent(_)));
                    return result;
                }
            }
        }
    }

    /// A request answered with an `EVP_RESULT`, as the guest gets it.
    pub fn simple(&mut self, request: &Request) -> EvpResult {
        match self.with_conn(|c| c.simple(request)) {
            Ok(()) => EvpResult::Ok,
            Err(e) => e.result(),
        }
    }

    /// Any request, with its response.
    pub fn call(&mut self, request: &Request) -> Result<wire::Response, Error> {
        self.with_conn(|c| c.call(request, Some(evp_sdk::CALL_TIMEOUT)))
    }

    /// `getEvent` with the guest's timeout in milliseconds (0: poll; negative: forever).
    pub fn get_event(&mut self, timeout_ms: i32) -> Result<wire::Event, Error> {
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        self.with_conn(|c| c.get_event(timeout))
    }

    /// Closes the connection (sdk-broker sees the module let go).
    pub fn close(&mut self) {
        self.conn = None;
        self.accepted = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_round_trip_through_the_wire_fields() {
        fn check(index: i32, user: i32, expect: Option<(u32, i32)>) {
            let back = guest_callback(&wire_callback(index, user));
            assert_eq!(back.map(|r| (r.index, r.user)), expect, "{index} {user}");
        }
        check(5, 7, Some((5, 7)));
        check(5, -1, Some((5, -1)));
        check(0, 7, None);
        check(-1, 0, Some((u32::MAX, 0)));
    }

    #[test]
    fn an_interrupted_session_makes_no_connection() {
        let control = Arc::new(Control::default());
        control.interrupt(Interruption::Stop);
        control.interrupt(Interruption::Failure("later".into()));
        assert_eq!(control.interruption(), Some(Interruption::Stop));
        let mut s = Session::new("/nonexistent.sock".into(), control);
        assert_eq!(
            s.simple(&Request::RequestResendConfig),
            EvpResult::ShouldExit
        );
    }
}
