//! A stand-in for sdk-broker on one instance socket, for tests of runtimed-wasm's instances
//! without D-Bus: it keeps the states it is sent, delivers configurations and direct commands
//! the test queues, completes every request with `SENT`, and sends `exit` when told. A blob
//! GET makes its file and stays under way until the exit, which ends it with EXIT (as
//! sdk-broker does); a blob PUT is done at once (201).

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use evp_schemas::sdk::{
    self as wire, BlobOutcome, BlobReason, Event, EvpResult, MessageSentReason, Request, Response,
    RpcResponseReason, StateReason, TelemetryReason,
};

#[derive(Default)]
struct Inner {
    events: VecDeque<Event>,
    configs: Vec<(String, Vec<u8>)>,
    exiting: bool,
    states: HashMap<String, Vec<u8>>,
    telemetry: Vec<(String, String)>,
    rpc_answers: Vec<(u64, String, u32)>,
    connections: usize,
    /// Blob GETs under way: their callbacks.
    transfers: Vec<wire::Callback>,
    /// Every blob operation: its op and file name.
    blobs: Vec<(u32, String)>,
    /// Connections still to be closed at once, as sdk-broker's peer check closes a connection
    /// from a process the socket is not bound to.
    refuse: usize,
}

/// The fake broker of one instance.
#[derive(Clone)]
pub struct FakeBroker {
    /// Its socket.
    pub socket: PathBuf,
    inner: Arc<(Mutex<Inner>, Condvar)>,
}

/// How long the test helpers wait for something.
const WAIT: Duration = Duration::from_secs(20);

impl FakeBroker {
    /// Listens on `<dir>/<name>.sock`.
    pub fn start(dir: &Path, name: &str) -> FakeBroker {
        let socket = dir.join(format!("{name}.sock"));
        let listener = UnixListener::bind(&socket).unwrap();
        let broker = FakeBroker {
            socket,
            inner: Arc::default(),
        };
        let served = broker.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let me = served.clone();
                // Small stacks: memory tests count this process's RSS.
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || me.serve(stream))
                    .unwrap();
            }
        });
        broker
    }

    fn serve(&self, mut stream: std::os::unix::net::UnixStream) {
        {
            let mut inner = self.inner.0.lock().unwrap();
            inner.connections += 1;
            if inner.refuse > 0 {
                inner.refuse -= 1;
                return;
            }
        }
        while let Ok((header, payload)) = wire::read_frame(&mut stream) {
            let Ok(request) = Request::decode(&payload) else {
                return;
            };
            let response = self.answer(request);
            let frame = wire::encode_frame(header.xid, &response.encode()).unwrap();
            if std::io::Write::write_all(&mut stream, &frame).is_err() {
                return;
            }
        }
    }

    fn answer(&self, request: Request) -> Response {
        let (lock, changed) = &*self.inner;
        let mut inner = lock.lock().unwrap();
        let ok = Response::Simple(EvpResult::Ok);
        let response = match request {
            Request::GetEvent {
                deadline_sec,
                deadline_nsec,
            } => {
                let deadline = SystemTime::UNIX_EPOCH
                    + Duration::from_secs(deadline_sec.min(u64::from(u32::MAX)))
                    + Duration::from_nanos(deadline_nsec);
                loop {
                    if let Some(event) = inner.events.pop_front() {
                        return Response::GetEvent(event);
                    }
                    if inner.exiting {
                        return Response::GetEvent(Event::Exit);
                    }
                    let left = deadline
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    if left.is_zero() {
                        return Response::GetEvent(Event::None);
                    }
                    inner = changed.wait_timeout(inner, left).unwrap().0;
                }
            }
            Request::RequestResendConfig => {
                let configs = inner.configs.clone();
                for (topic, blob) in configs {
                    inner.events.push_back(Event::Config { topic, blob });
                }
                ok
            }
            Request::SendState { topic, blob, cb } => {
                inner.states.insert(topic, blob);
                inner.events.push_back(Event::State {
                    cb,
                    reason: StateReason::Sent,
                });
                ok
            }
            Request::SendTelemetry { entries, cb } => {
                inner
                    .telemetry
                    .extend(entries.into_iter().map(|e| (e.key, e.value)));
                inner.events.push_back(Event::Telemetry {
                    cb,
                    reason: TelemetryReason::Sent,
                });
                ok
            }
            Request::SendMessage { cb, .. } => {
                inner.events.push_back(Event::MessageSent {
                    cb,
                    reason: MessageSentReason::Error,
                });
                ok
            }
            Request::SendRpcResponse {
                id,
                response,
                status,
                cb,
            } => {
                inner
                    .rpc_answers
                    .push((id, response.unwrap_or_default(), status));
                inner.events.push_back(Event::RpcResponse {
                    cb,
                    reason: RpcResponseReason::Sent,
                });
                ok
            }
            Request::StreamParamsRequest { .. } => Response::StreamParams {
                result: EvpResult::Inval,
                kind: 0,
                direction: 0,
            },
            Request::BlobOperation {
                kind,
                op,
                filename,
                cb,
                ..
            } => {
                if op == 0 {
                    std::fs::write(&filename, b"partial").unwrap();
                    inner.transfers.push(cb);
                } else {
                    inner.events.push_back(Event::Blob {
                        cb,
                        reason: BlobReason::Done,
                        result: BlobOutcome {
                            kind,
                            http_status: 201,
                            ..Default::default()
                        },
                    });
                }
                inner.blobs.push((op, filename));
                ok
            }
        };
        changed.notify_all();
        response
    }

    fn push(&self, f: impl FnOnce(&mut Inner)) {
        let (lock, changed) = &*self.inner;
        f(&mut lock.lock().unwrap());
        changed.notify_all();
    }

    /// Sets a configuration, delivered now and again on `RequestResendConfig`.
    pub fn configure(&self, topic: &str, value: &[u8]) {
        self.push(|i| {
            i.configs.push((topic.to_owned(), value.to_vec()));
            i.events.push_back(Event::Config {
                topic: topic.to_owned(),
                blob: value.to_vec(),
            });
        });
    }

    /// Delivers a direct command.
    pub fn call(&self, id: u64, method: &str, params: &str) {
        self.push(|i| {
            i.events.push_back(Event::RpcRequest {
                id,
                method: method.to_owned(),
                params: params.to_owned(),
            })
        });
    }

    /// Sends `exit` once the queue is empty, as CloseInstance does.
    pub fn exit(&self) {
        self.push(|i| {
            i.exiting = true;
            for cb in std::mem::take(&mut i.transfers) {
                i.events.push_back(Event::Blob {
                    cb,
                    reason: BlobReason::Exit,
                    result: BlobOutcome::default(),
                });
            }
        });
    }

    /// Waits for `n` blob operations and returns them: `(op, file name)`.
    pub fn wait_blobs(&self, n: usize) -> Vec<(u32, String)> {
        self.wait(&format!("{n} blob operations"), |i| {
            (i.blobs.len() >= n).then(|| i.blobs.clone())
        })
    }

    /// Waits until `check` holds of the broker's state, and returns what it gave.
    fn wait<T>(&self, what: &str, check: impl Fn(&Inner) -> Option<T>) -> T {
        let (lock, changed) = &*self.inner;
        let end = Instant::now() + WAIT;
        let mut inner = lock.lock().unwrap();
        loop {
            if let Some(v) = check(&inner) {
                return v;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            inner = changed.wait_timeout(inner, left).unwrap().0;
        }
    }

    /// Waits for the state `topic` and returns its value.
    pub fn wait_state(&self, topic: &str) -> Vec<u8> {
        self.wait(&format!("state {topic}"), |i| i.states.get(topic).cloned())
    }

    /// Waits for the answer to direct command `id`: `(response, status)`.
    pub fn wait_rpc_answer(&self, id: u64) -> (String, u32) {
        self.wait(&format!("the answer to command {id}"), |i| {
            i.rpc_answers
                .iter()
                .find(|a| a.0 == id)
                .map(|a| (a.1.clone(), a.2))
        })
    }

    /// Closes the next `n` connections at once, unanswered.
    pub fn refuse(&self, n: usize) {
        self.push(|i| i.refuse = n);
    }

    /// How many connections the instance made.
    pub fn connections(&self) -> usize {
        self.inner.0.lock().unwrap().connections
    }
}
