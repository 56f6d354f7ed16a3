//! The broker's state and rules, independent of D-Bus and of sockets: instances and their
//! event queues, configuration, states, telemetry batches, message routing, direct commands,
//! back-pressure and the exit protocol. `conn.rs` serves the sockets on top of it; `lib.rs`
//! exposes it on the bus.
//!
//! One mutex guards everything and is never held across an `.await`: every signal is emitted
//! after the lock is released, and the callbacks that depend on it are queued afterwards.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use evp_schemas::routing::Routing;
use evp_schemas::sdk::{
    Callback, Event, EvpResult, MAX_PAYLOAD, MessageSentReason, Request, Response,
    RpcResponseReason, RpcStatus, StateReason, TelemetryReason,
};
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::limits;
use crate::peer::Binding;
use crate::settings::Settings;
use crate::store::ConfigStore;

/// Bytes a pending callback event is counted for in its instance's event queue: the size of a
/// `*Output` event on the wire, reserved when the request is accepted so that its callback can
/// always be queued later.
pub const CALLBACK_COST: usize = 64;

/// Most entries in one `sendTelemetry`, as the EVP agent allows for WASM modules.
pub const MAX_TELEMETRY_ENTRIES: usize = 1000;

/// Most entries in one `Telemetry` signal: big enough to carry a burst in few signals, small
/// enough that one signal stays far below D-Bus's message limit.
pub const MAX_BATCH_ENTRIES: usize = 1000;

/// Most bytes of keys and values in one `Telemetry` signal (D-Bus allows 128 MiB per message;
/// a quarter MiB keeps hubd's decoding and any single MQTT publish small).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Keys per instance whose non-JSON telemetry is warned about (once each); a module that
/// makes up keys without end gets no more warnings past this, so the set stays small.
const MAX_NON_JSON_WARNINGS: usize = 256;

/// Largest configuration value plus topic accepted: it must fit an event in one SDK record,
/// with room for the tables around it.
pub const MAX_CONFIG_BYTES: usize = MAX_PAYLOAD - 1024;

/// A signal for hubd, emitted on `org.evp.SdkBroker1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// `StateReported(instance, topic, value)`.
    State {
        /// Instance name.
        instance: String,
        /// State topic.
        topic: String,
        /// Latest value.
        value: Vec<u8>,
    },
    /// `Telemetry(a(sss))`: `(instance, key, JSON value)` in call order.
    Telemetry(Vec<(String, String, String)>),
    /// `RpcResponse(reqid, instance, status, response)`.
    RpcResponse {
        /// The hub's request id.
        reqid: u64,
        /// Instance name.
        instance: String,
        /// `EVP_RPC_RESPONSE_STATUS`.
        status: u32,
        /// Response text.
        response: String,
    },
}

/// Where the broker's signals go: the bus in the daemon, a channel in tests.
pub trait Sink: Send + Sync + 'static {
    /// Emits one signal; an error means hubd could not be told.
    fn emit(&self, signal: Signal) -> BoxFuture<'_, Result<(), String>>;
}

/// A [`Sink`] that sends every signal into a channel (for tests and tools).
#[derive(Debug, Clone)]
pub struct ChannelSink(pub tokio::sync::mpsc::UnboundedSender<Signal>);

impl Sink for ChannelSink {
    fn emit(&self, signal: Signal) -> BoxFuture<'_, Result<(), String>> {
        let r = self
            .0
            .send(signal)
            .map_err(|_| "signal receiver dropped".to_owned());
        Box::pin(async move { r })
    }
}

/// Why a D-Bus call on the broker was refused.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// An argument is malformed (an instance name that cannot be a file name, bad JSON).
    #[error("{0}")]
    InvalidArgument(String),
    /// The instance is still exiting from a `CloseInstance`; retry after its socket is gone.
    #[error("{0}")]
    Busy(String),
    /// Creating the socket or persisting configuration failed.
    #[error("{0}")]
    Io(String),
}

/// What a getEvent finds in the queue.
#[derive(Debug)]
pub(crate) enum Popped {
    /// The next event.
    Event(Event),
    /// Nothing queued; wait on the notifier.
    Empty,
    /// Exit was requested and the queue is drained.
    Exit,
    /// The instance or this connection is no longer current: close.
    Gone,
}

/// One queued event and the bytes it counts for.
#[derive(Debug)]
struct Queued {
    event: Event,
    bytes: usize,
    /// The connection a callback event belongs to; `None` for events for the instance.
    conn: Option<u64>,
}

/// A state waiting to be collected.
#[derive(Debug)]
struct PendingState {
    value: Vec<u8>,
    /// Its [`limits::state_cost`].
    cost: usize,
    cb: Callback,
    conn: u64,
}

/// One accepted `sendTelemetry`, waiting in the global batch.
#[derive(Debug)]
struct PendingTelemetry {
    instance: String,
    inst_id: u64,
    conn: u64,
    cb: Callback,
    entries: Vec<(String, String)>,
    bytes: usize,
}

/// An instance with an open socket.
#[derive(Debug)]
struct Inst {
    id: u64,
    socket: PathBuf,
    /// The current connection's id, when a module is connected.
    conn: Option<u64>,
    events: VecDeque<Queued>,
    /// Bytes of queued events plus reserved callbacks.
    used: usize,
    notify: Arc<Notify>,
    exiting: bool,
    stop: watch::Sender<bool>,
    /// The process the socket is served to, once `BindInstance` said.
    binding: watch::Sender<Option<Binding>>,
    pending_states: BTreeMap<String, PendingState>,
    /// The last value reported per topic, to suppress identical ones.
    reported: HashMap<String, Vec<u8>>,
    /// The share of the instance-state report they take ([`limits::state_cost`]).
    reported_bytes: usize,
    telemetry_bytes: usize,
    /// Telemetry keys already warned about for a value that is not JSON.
    non_json_warned: HashSet<String>,
    /// Direct commands waiting for the module's answer, with their deadlines.
    rpcs: HashMap<u64, Instant>,
}

impl Inst {
    /// The instance's share of the instance-state report once `topic` is `value`: every
    /// topic at its newest value (pending, else reported), as encoded for the hub.
    fn state_share_with(&self, instance: &str, topic: &str, value: &[u8]) -> usize {
        let reported = |t: &str| {
            self.reported
                .get(t)
                .map_or(0, |v| limits::state_cost(instance, t, v))
        };
        let pending_growth: isize = self
            .pending_states
            .iter()
            .filter(|(t, _)| t.as_str() != topic)
            .map(|(t, p)| p.cost as isize - reported(t) as isize)
            .sum();
        let others = self.reported_bytes as isize - reported(topic) as isize + pending_growth;
        others.max(0) as usize + limits::state_cost(instance, topic, value)
    }

    /// Reserves a callback's bytes; false when the queue is full.
    fn reserve(&mut self, limit: usize) -> bool {
        if self.used + CALLBACK_COST > limit {
            return false;
        }
        self.used += CALLBACK_COST;
        true
    }

    /// Queues a callback event whose bytes were reserved, or releases the reservation when
    /// the connection that made the request is gone (its callback pointers mean nothing now).
    fn complete(&mut self, conn: u64, event: Event) {
        if self.conn == Some(conn) {
            self.events.push_back(Queued {
                event,
                bytes: CALLBACK_COST,
                conn: Some(conn),
            });
            self.notify.notify_one();
        } else {
            self.used -= CALLBACK_COST;
        }
    }

    /// Queues an event for the instance itself (a message, a command, a configuration).
    fn push(&mut self, event: Event) {
        let bytes = event.wire_size();
        self.used += bytes;
        self.events.push_back(Queued {
            event,
            bytes,
            conn: None,
        });
        self.notify.notify_one();
    }

    /// Queues a configuration, replacing a queued one of the same topic (the latest wins).
    fn push_config(&mut self, topic: &str, value: &[u8]) {
        for q in self.events.iter_mut() {
            if let Event::Config { topic: t, blob } = &mut q.event
                && t == topic
            {
                self.used = self.used - blob.len() + value.len();
                q.bytes = q.bytes - blob.len() + value.len();
                *blob = value.to_vec();
                return;
            }
        }
        self.push(Event::Config {
            topic: topic.to_owned(),
            blob: value.to_vec(),
        });
    }

    /// Removes queued events matching `pred`, releasing their bytes.
    fn drop_events(&mut self, pred: impl Fn(&Queued) -> bool) {
        let mut freed = 0;
        self.events.retain(|q| {
            let drop = pred(q);
            if drop {
                freed += q.bytes;
            }
            !drop
        });
        self.used -= freed;
    }
}

/// Everything the mutex guards.
#[derive(Debug, Default)]
struct State {
    instances: HashMap<String, Inst>,
    configs: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    routing: Routing,
    telemetry: VecDeque<PendingTelemetry>,
    telemetry_entries: usize,
    telemetry_bytes: usize,
    states_pending: bool,
}

/// A direct command answered by the broker itself.
type RpcAnswer = (u64, String, String);

/// The broker. Cheap to share: wrap it in an `Arc`.
pub struct Broker {
    settings: Settings,
    sdk_dir: PathBuf,
    store: ConfigStore,
    sink: Arc<dyn Sink>,
    state: Mutex<State>,
    ids: AtomicU64,
    /// Wakes the flusher when a state or telemetry is pending.
    flush_wake: Notify,
    /// Wakes the flusher at once when a telemetry batch is full.
    flush_full: Notify,
    /// (instance, field) pairs already logged as holding a NUL: one warning each, so a module
    /// that loops on a refused call cannot flood the journal.
    nul_logged: Mutex<HashSet<(String, String)>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("sdk_dir", &self.sdk_dir)
            .finish_non_exhaustive()
    }
}

/// The answer `{"error": message}` that the broker gives for a command it answers itself.
fn error_response(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

impl Broker {
    /// A broker whose sockets live in `<run_dir>/sdk` and configuration in `<data_dir>/sdk`,
    /// with the persisted configuration loaded. Call [`Broker::start`] from a tokio runtime.
    pub fn new(
        settings: Settings,
        run_dir: PathBuf,
        data_dir: PathBuf,
        sink: Arc<dyn Sink>,
    ) -> anyhow::Result<Arc<Broker>> {
        let store = ConfigStore::open(data_dir.join("sdk"))?;
        let configs = store.load_all();
        if settings.allowed_uids.is_some() || settings.instance_group.is_some() {
            warn!(
                "[sdk_broker] allowed_uids and instance_group are ignored: each socket is \
                 served to the process BindInstance names (its uid and pid) only"
            );
        }
        Ok(Arc::new(Broker {
            settings,
            sdk_dir: run_dir.join("sdk"),
            store,
            sink,
            state: Mutex::new(State {
                configs,
                ..State::default()
            }),
            ids: AtomicU64::new(1),
            flush_wake: Notify::new(),
            flush_full: Notify::new(),
            nul_logged: Mutex::default(),
        }))
    }

    /// Starts the background work: the flusher of states and telemetry, and the expiry of
    /// direct commands nobody answered.
    pub fn start(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.flusher().await });
        let me = Arc::clone(self);
        tokio::spawn(async move { me.rpc_expiry().await });
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state is still consistent enough to go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    // ----- D-Bus methods -----

    /// `OpenInstance`: creates `<run_dir>/sdk/<instance>.sock` and starts serving it. Opening
    /// an instance that is already open returns its path and changes nothing.
    pub fn open_instance(self: &Arc<Self>, instance: &str) -> Result<PathBuf, BrokerError> {
        evp_schemas::deployment::validate_instance_name(instance)
            .map_err(|e| BrokerError::InvalidArgument(format!("instance {instance:?}: {e}")))?;
        {
            let st = self.lock();
            if let Some(inst) = st.instances.get(instance) {
                if inst.exiting {
                    return Err(BrokerError::Busy(format!(
                        "instance {instance} is still exiting; open it again once it stopped"
                    )));
                }
                return Ok(inst.socket.clone());
            }
        }
        let (listener, path) = crate::conn::bind(self, instance)?;
        let id = self.next_id();
        let (stop, stop_rx) = watch::channel(false);
        {
            let mut st = self.lock();
            st.instances.insert(
                instance.to_owned(),
                Inst {
                    id,
                    socket: path.clone(),
                    conn: None,
                    events: VecDeque::new(),
                    used: 0,
                    notify: Arc::new(Notify::new()),
                    exiting: false,
                    stop,
                    binding: watch::Sender::new(None),
                    pending_states: BTreeMap::new(),
                    reported: HashMap::new(),
                    reported_bytes: 0,
                    telemetry_bytes: 0,
                    non_json_warned: HashSet::new(),
                    rpcs: HashMap::new(),
                },
            );
        }
        let me = Arc::clone(self);
        let name = instance.to_owned();
        tokio::spawn(async move { crate::conn::serve(me, name, id, listener, stop_rx).await });
        info!(instance, socket = %path.display(), "instance opened");
        Ok(path)
    }

    /// `BindInstance`: the socket is served only to process `pid` (or a descendant) running as
    /// `uid`, from now on; an earlier binding (a previous start) is replaced.
    pub fn bind_instance(&self, instance: &str, pid: u32, uid: u32) -> Result<(), BrokerError> {
        if pid <= 1 {
            return Err(BrokerError::InvalidArgument(format!(
                "instance {instance}: pid {pid} cannot be an instance's process"
            )));
        }
        let st = self.lock();
        let inst = st.instances.get(instance).ok_or_else(|| {
            BrokerError::InvalidArgument(format!(
                "instance {instance} is not open; call OpenInstance first"
            ))
        })?;
        let was = inst.binding.send_replace(Some(Binding { pid, uid }));
        info!(instance, pid, uid, ?was, "instance bound to its process");
        Ok(())
    }

    /// The instance's binding as it changes; `None` when the instance is gone.
    pub(crate) fn binding(
        &self,
        instance: &str,
        inst_id: u64,
    ) -> Option<watch::Receiver<Option<Binding>>> {
        let st = self.lock();
        let inst = st.instances.get(instance)?;
        (inst.id == inst_id).then(|| inst.binding.subscribe())
    }

    /// `CloseInstance`: the exit protocol. Pending requests get their EXIT callbacks, the
    /// module gets `exit` once its queue drains, and the socket goes when the module
    /// disconnects or after the grace. Returns once the socket is gone, so the caller (which
    /// then stops the process) knows a module that follows the protocol has let go: its
    /// process is exiting by itself. Closing an unknown instance does nothing.
    pub async fn close_instance(self: &Arc<Self>, instance: &str) {
        let mut answers = Vec::new();
        let grace_needed;
        let mut closed;
        let already_closing;
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            let Some(inst) = st.instances.get_mut(instance) else {
                return;
            };
            closed = inst.stop.subscribe();
            already_closing = inst.exiting;
            inst.exiting = true;
            if already_closing {
                grace_needed = false;
            } else {
                for (_, p) in std::mem::take(&mut inst.pending_states) {
                    inst.complete(
                        p.conn,
                        Event::State {
                            cb: p.cb,
                            reason: StateReason::Exit,
                        },
                    );
                }
                let id = inst.id;
                let mut kept = VecDeque::new();
                for p in std::mem::take(&mut st.telemetry) {
                    if p.instance == instance && p.inst_id == id {
                        st.telemetry_entries -= p.entries.len();
                        st.telemetry_bytes -= p.bytes;
                        inst.telemetry_bytes -= p.bytes;
                        inst.complete(
                            p.conn,
                            Event::Telemetry {
                                cb: p.cb,
                                reason: TelemetryReason::Exit,
                            },
                        );
                    } else {
                        kept.push_back(p);
                    }
                }
                st.telemetry = kept;
                inst.drop_events(|q| matches!(q.event, Event::RpcRequest { .. }));
                for (reqid, _) in inst.rpcs.drain() {
                    answers.push((
                        reqid,
                        instance.to_owned(),
                        error_response(&format!("instance {instance} is stopping")),
                    ));
                }
                inst.notify.notify_one();
                grace_needed = inst.conn.is_some();
                if !grace_needed {
                    self.remove(st, instance);
                }
            }
        }
        if already_closing {
            // A second close waits for the first one's outcome.
            let _ = closed.wait_for(|gone| *gone).await;
            return;
        }
        info!(instance, "instance closing");
        self.answer_errors(answers).await;
        if grace_needed {
            let me = Arc::clone(self);
            let name = instance.to_owned();
            let grace = Duration::from_millis(self.settings.exit_grace_ms);
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                let mut st = me.lock();
                if st.instances.get(&name).is_some_and(|i| i.exiting) {
                    warn!(instance = %name, "module still connected after the exit grace; closing its socket");
                    me.remove(&mut st, &name);
                }
            });
            // The sender is dropped with the instance, which ends the wait too.
            let _ = closed.wait_for(|gone| *gone).await;
        }
    }

    /// Forgets an instance: stops its listener and connection, removes its socket file.
    fn remove(&self, st: &mut State, instance: &str) {
        if let Some(inst) = st.instances.remove(instance) {
            // The file first: whoever waits for the stop (CloseInstance) finds it gone.
            if let Err(e) = std::fs::remove_file(&inst.socket)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(instance, "removing {}: {e}", inst.socket.display());
            }
            let _ = inst.stop.send(true);
            info!(instance, "instance closed, socket removed");
        }
    }

    /// `SetRouting`: replaces the message routes of every instance.
    pub fn set_routing(&self, routing_json: &str) -> Result<(), BrokerError> {
        let routing = Routing::from_json(routing_json)
            .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        debug!(instances = routing.instances.len(), "routing replaced");
        self.lock().routing = routing;
        Ok(())
    }

    /// `DeliverConfiguration`: keeps and persists the value, and queues it to the module now
    /// when it is connected (replacing a queued value of the same topic).
    pub fn deliver_configuration(
        &self,
        instance: &str,
        topic: &str,
        value: &[u8],
    ) -> Result<(), BrokerError> {
        evp_schemas::deployment::validate_instance_name(instance)
            .map_err(|e| BrokerError::InvalidArgument(format!("instance {instance:?}: {e}")))?;
        if topic.len() + value.len() > MAX_CONFIG_BYTES {
            return Err(BrokerError::InvalidArgument(format!(
                "configuration {instance}/{topic} is {} bytes; an SDK record holds at most {MAX_CONFIG_BYTES}",
                topic.len() + value.len()
            )));
        }
        let mut st = self.lock();
        let mut topics = st.configs.get(instance).cloned().unwrap_or_default();
        if topics.get(topic).map(Vec::as_slice) != Some(value) {
            topics.insert(topic.to_owned(), value.to_vec());
            self.store
                .save(instance, &topics)
                .map_err(|e| BrokerError::Io(format!("{e:#}")))?;
            st.configs.insert(instance.to_owned(), topics);
        }
        if let Some(inst) = st.instances.get_mut(instance)
            && inst.conn.is_some()
            && !inst.exiting
        {
            inst.push_config(topic, value);
        }
        Ok(())
    }

    /// `CallMethod`: queues the command to the instance; answers `status: error` at once when
    /// the instance is absent, exiting, or cannot take another event.
    pub async fn call_method(&self, instance: &str, reqid: u64, method: &str, params: &str) {
        let refusal = {
            let mut st = self.lock();
            match st.instances.get_mut(instance) {
                None => Some(format!("instance {instance} is not running on this device")),
                Some(inst) if inst.exiting => Some(format!("instance {instance} is stopping")),
                Some(inst) if inst.rpcs.contains_key(&reqid) => Some(format!(
                    "request {reqid} is already waiting for instance {instance}"
                )),
                Some(inst) => {
                    let event = Event::RpcRequest {
                        id: reqid,
                        method: method.to_owned(),
                        params: params.to_owned(),
                    };
                    if inst.used + event.wire_size() > self.settings.event_queue_bytes {
                        Some(format!("instance {instance} has too many queued events"))
                    } else {
                        inst.push(event);
                        let timeout = Duration::from_millis(self.settings.rpc_timeout_ms);
                        inst.rpcs.insert(reqid, Instant::now() + timeout);
                        None
                    }
                }
            }
        };
        if let Some(message) = refusal {
            debug!(instance, reqid, method, "direct command refused: {message}");
            self.answer_errors(vec![(reqid, instance.to_owned(), error_response(&message))])
                .await;
        }
    }

    async fn answer_errors(&self, answers: Vec<RpcAnswer>) {
        for (reqid, instance, response) in answers {
            let signal = Signal::RpcResponse {
                reqid,
                instance,
                status: RpcStatus::Error.code(),
                response,
            };
            if let Err(e) = self.sink.emit(signal).await {
                warn!(reqid, "RpcResponse not emitted: {e}");
            }
        }
    }

    // ----- connections -----

    /// A peer connected to the instance's socket: it becomes the current connection and is
    /// given every stored configuration again. `None` when the instance is gone or exiting.
    pub(crate) fn attach(&self, instance: &str, inst_id: u64) -> Option<(u64, Arc<Notify>)> {
        let conn = self.next_id();
        let mut guard = self.lock();
        let st = &mut *guard;
        let inst = st.instances.get_mut(instance)?;
        if inst.id != inst_id || inst.exiting {
            return None;
        }
        inst.conn = Some(conn);
        inst.drop_events(|q| matches!(q.event, Event::Config { .. }));
        if let Some(topics) = st.configs.get(instance) {
            for (topic, value) in topics {
                inst.push_config(topic, value);
            }
        }
        Some((conn, Arc::clone(&inst.notify)))
    }

    /// The connection ended: its callback events and its configuration events go (they are
    /// re-delivered on the next connection), commands waiting for it are answered with an
    /// error, and an exiting instance is removed.
    pub(crate) async fn detach(&self, instance: &str, inst_id: u64, conn: u64) {
        let mut answers = Vec::new();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            let Some(inst) = st.instances.get_mut(instance) else {
                return;
            };
            if inst.id != inst_id || inst.conn != Some(conn) {
                return;
            }
            inst.conn = None;
            inst.drop_events(|q| {
                q.conn.is_some()
                    || matches!(q.event, Event::Config { .. } | Event::RpcRequest { .. })
            });
            for (reqid, _) in inst.rpcs.drain() {
                answers.push((
                    reqid,
                    instance.to_owned(),
                    error_response(&format!(
                        "instance {instance} disconnected before answering"
                    )),
                ));
            }
            if inst.exiting {
                self.remove(st, instance);
            }
        }
        self.answer_errors(answers).await;
    }

    /// Takes the next event for a getEvent of connection `conn`.
    pub(crate) fn pop(&self, instance: &str, inst_id: u64, conn: u64) -> Popped {
        let mut st = self.lock();
        let Some(inst) = st.instances.get_mut(instance) else {
            return Popped::Gone;
        };
        if inst.id != inst_id || inst.conn != Some(conn) {
            return Popped::Gone;
        }
        match inst.events.pop_front() {
            Some(q) => {
                inst.used -= q.bytes;
                Popped::Event(q.event)
            }
            None if inst.exiting => Popped::Exit,
            None => Popped::Empty,
        }
    }

    /// Serves every request but getEvent (which `conn.rs` waits for).
    pub(crate) async fn handle(
        &self,
        instance: &str,
        inst_id: u64,
        conn: u64,
        request: Request,
    ) -> Response {
        use Response::Simple;
        if let Err(e) = request.check_bus_strings() {
            let first = self
                .nul_logged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((instance.to_owned(), e.field.clone()));
            if first {
                warn!(
                    instance,
                    "request refused with EVP_INVAL: {e} (logged once per field)"
                );
            }
            return Simple(EvpResult::Inval);
        }
        match request {
            Request::GetEvent { .. } => Simple(EvpResult::AgentProtocolError),
            Request::RequestResendConfig => {
                let mut guard = self.lock();
                let st = &mut *guard;
                if let Some(inst) = st.instances.get_mut(instance)
                    && inst.id == inst_id
                    && !inst.exiting
                    && let Some(topics) = st.configs.get(instance)
                {
                    for (topic, value) in topics {
                        inst.push_config(topic, value);
                    }
                }
                Simple(EvpResult::Ok)
            }
            Request::SendState { topic, blob, cb } => {
                Simple(self.send_state(instance, inst_id, conn, topic, blob, cb))
            }
            Request::SendTelemetry { entries, cb } => {
                Simple(self.send_telemetry(instance, inst_id, conn, entries, cb))
            }
            Request::SendMessage { topic, blob, cb } => {
                Simple(self.send_message(instance, inst_id, conn, &topic, blob, cb))
            }
            Request::SendRpcResponse {
                id,
                response,
                status,
                cb,
            } => Simple(
                self.send_rpc_response(instance, inst_id, conn, id, response, status, cb)
                    .await,
            ),
            // Blob transfers are not served yet (they need the storage-token work).
            Request::BlobOperation { .. } => Simple(EvpResult::NotSup),
            // No stream is ever declared yet, so none can be opened.
            Request::StreamParamsRequest { .. } => Response::StreamParams {
                result: EvpResult::Inval,
                kind: 0,
                direction: 0,
            },
        }
    }

    /// Runs `f` on the instance if `inst_id` is still current; `EVP_ERROR` otherwise.
    fn with_inst(
        &self,
        instance: &str,
        inst_id: u64,
        f: impl FnOnce(&mut State) -> EvpResult,
    ) -> EvpResult {
        let mut st = self.lock();
        match st.instances.get(instance) {
            Some(inst) if inst.id == inst_id => f(&mut st),
            _ => EvpResult::Error,
        }
    }

    fn send_state(
        &self,
        instance: &str,
        inst_id: u64,
        conn: u64,
        topic: String,
        blob: Vec<u8>,
        cb: Callback,
    ) -> EvpResult {
        let limit = self.settings.event_queue_bytes;
        let state_limit = self.settings.state_bytes;
        let r = self.with_inst(instance, inst_id, |st| {
            let Some(inst) = st.instances.get_mut(instance) else {
                return EvpResult::Error;
            };
            // Counted as the hub will get them, escaping included: what cannot fit one
            // report message, or would take the instance past its share, is refused now.
            if !limits::state_fits(instance, &topic, &blob)
                || inst.state_share_with(instance, &topic, &blob) > state_limit
            {
                return EvpResult::TooBig;
            }
            if !inst.reserve(limit) {
                return EvpResult::Again;
            }
            if inst.exiting {
                inst.complete(
                    conn,
                    Event::State {
                        cb,
                        reason: StateReason::Exit,
                    },
                );
                return EvpResult::Ok;
            }
            let new = PendingState {
                cost: limits::state_cost(instance, &topic, &blob),
                value: blob,
                cb,
                conn,
            };
            if let Some(old) = inst.pending_states.insert(topic, new) {
                inst.complete(
                    old.conn,
                    Event::State {
                        cb: old.cb,
                        reason: StateReason::Overwritten,
                    },
                );
            }
            st.states_pending = true;
            EvpResult::Ok
        });
        if r == EvpResult::Ok {
            self.flush_wake.notify_one();
        }
        r
    }

    fn send_telemetry(
        &self,
        instance: &str,
        inst_id: u64,
        conn: u64,
        entries: Vec<evp_schemas::sdk::TelemetryEntry>,
        cb: Callback,
    ) -> EvpResult {
        if entries.len() > MAX_TELEMETRY_ENTRIES {
            return EvpResult::TooBig;
        }
        // EVP accepts a value that is not JSON (and then drops it); unchanged modules rely on
        // EVP_OK, so it is accepted and goes to the hub as a JSON string instead.
        let mut non_json = Vec::new();
        let entries: Vec<(String, String)> = entries
            .into_iter()
            .map(|e| match limits::telemetry_json(&e.value) {
                None => (e.key, e.value),
                Some(json) => {
                    non_json.push(e.key.clone());
                    (e.key, json)
                }
            })
            .collect();
        if !limits::telemetry_fits(instance, &entries) {
            return EvpResult::TooBig;
        }
        let bytes: usize = entries
            .iter()
            .map(|(key, value)| instance.len() + key.len() + value.len())
            .sum();
        let limit = self.settings.event_queue_bytes;
        let tel_limit = self.settings.telemetry_queue_bytes;
        let mut full = false;
        let r = self.with_inst(instance, inst_id, |st| {
            let Some(inst) = st.instances.get_mut(instance) else {
                return EvpResult::Error;
            };
            if inst.telemetry_bytes + bytes > tel_limit {
                return if bytes > tel_limit {
                    EvpResult::TooBig
                } else {
                    EvpResult::Again
                };
            }
            if !inst.reserve(limit) {
                return EvpResult::Again;
            }
            if inst.exiting {
                inst.complete(
                    conn,
                    Event::Telemetry {
                        cb,
                        reason: TelemetryReason::Exit,
                    },
                );
                return EvpResult::Ok;
            }
            for key in non_json {
                if inst.non_json_warned.len() < MAX_NON_JSON_WARNINGS
                    && inst.non_json_warned.insert(key.clone())
                {
                    warn!(
                        instance,
                        key, "telemetry value is not JSON: sent to the hub as a JSON string"
                    );
                }
            }
            inst.telemetry_bytes += bytes;
            st.telemetry_entries += entries.len();
            st.telemetry_bytes += bytes;
            full =
                st.telemetry_entries >= MAX_BATCH_ENTRIES || st.telemetry_bytes >= MAX_BATCH_BYTES;
            st.telemetry.push_back(PendingTelemetry {
                instance: instance.to_owned(),
                inst_id,
                conn,
                cb,
                entries,
                bytes,
            });
            EvpResult::Ok
        });
        if r == EvpResult::Ok {
            self.flush_wake.notify_one();
            if full {
                self.flush_full.notify_one();
            }
        }
        r
    }

    fn send_message(
        &self,
        instance: &str,
        inst_id: u64,
        conn: u64,
        alias: &str,
        blob: Vec<u8>,
        cb: Callback,
    ) -> EvpResult {
        let limit = self.settings.event_queue_bytes;
        self.with_inst(instance, inst_id, |st| {
            let Some(inst) = st.instances.get_mut(instance) else {
                return EvpResult::Error;
            };
            if !inst.reserve(limit) {
                return EvpResult::Again;
            }
            if inst.exiting {
                inst.complete(
                    conn,
                    Event::MessageSent {
                        cb,
                        reason: MessageSentReason::Exit,
                    },
                );
                return EvpResult::Ok;
            }
            let targets: Vec<(String, String)> = match st.routing.publish_topic(instance, alias) {
                Some(topic) => st
                    .routing
                    .subscribers(topic)
                    .filter(|(name, _)| st.instances.get(*name).is_some_and(|i| !i.exiting))
                    .map(|(n, a)| (n.to_owned(), a.to_owned()))
                    .collect(),
                None => Vec::new(),
            };
            // All or nothing: when a subscriber's queue is full, the sender retries later
            // rather than some subscribers silently missing the message.
            let mut need: HashMap<&str, usize> = HashMap::new();
            for (name, a) in &targets {
                *need.entry(name.as_str()).or_default() += CALLBACK_COST + a.len() + blob.len();
            }
            let room = need
                .iter()
                .all(|(name, n)| st.instances.get(*name).is_some_and(|i| i.used + n <= limit));
            if !room {
                if let Some(inst) = st.instances.get_mut(instance) {
                    inst.used -= CALLBACK_COST;
                }
                return EvpResult::Again;
            }
            for (name, a) in &targets {
                if let Some(sub) = st.instances.get_mut(name) {
                    sub.push(Event::MessageReceived {
                        topic: a.clone(),
                        blob: blob.clone(),
                    });
                }
            }
            let reason = if targets.is_empty() {
                MessageSentReason::Error
            } else {
                MessageSentReason::Sent
            };
            if let Some(inst) = st.instances.get_mut(instance) {
                inst.complete(conn, Event::MessageSent { cb, reason });
            }
            EvpResult::Ok
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_rpc_response(
        &self,
        instance: &str,
        inst_id: u64,
        conn: u64,
        id: u64,
        response: Option<String>,
        status: u32,
        cb: Callback,
    ) -> EvpResult {
        let Some(response) = response else {
            return EvpResult::Inval;
        };
        if RpcStatus::from_code(status).is_none() {
            return EvpResult::Inval;
        }
        if !limits::rpc_response_fits(id, status, &response) {
            // The module gets EVP_TOOBIG; the hub, which waits for this command, gets an error
            // answer now rather than none.
            let was_waiting = {
                let mut st = self.lock();
                st.instances
                    .get_mut(instance)
                    .filter(|i| i.id == inst_id)
                    .is_some_and(|i| i.rpcs.remove(&id).is_some())
            };
            if was_waiting {
                warn!(instance, reqid = id, "answer too big for one MQTT message");
                let message = format!(
                    "the answer of instance {instance} does not fit one MQTT message once \
                     encoded ({} bytes of response)",
                    response.len()
                );
                self.answer_errors(vec![(id, instance.to_owned(), error_response(&message))])
                    .await;
            }
            return EvpResult::TooBig;
        }
        let limit = self.settings.event_queue_bytes;
        let mut waiting = false;
        let r = self.with_inst(instance, inst_id, |st| {
            let Some(inst) = st.instances.get_mut(instance) else {
                return EvpResult::Error;
            };
            if !inst.reserve(limit) {
                return EvpResult::Again;
            }
            if inst.exiting {
                inst.complete(
                    conn,
                    Event::RpcResponse {
                        cb,
                        reason: RpcResponseReason::Exit,
                    },
                );
            } else if inst.rpcs.remove(&id).is_some() {
                waiting = true;
            } else {
                inst.complete(
                    conn,
                    Event::RpcResponse {
                        cb,
                        reason: RpcResponseReason::Error,
                    },
                );
            }
            EvpResult::Ok
        });
        if waiting {
            let signal = Signal::RpcResponse {
                reqid: id,
                instance: instance.to_owned(),
                status,
                response,
            };
            let reason = match self.sink.emit(signal).await {
                Ok(()) => RpcResponseReason::Sent,
                Err(e) => {
                    warn!(instance, reqid = id, "RpcResponse not emitted: {e}");
                    RpcResponseReason::Error
                }
            };
            let mut st = self.lock();
            if let Some(inst) = st.instances.get_mut(instance)
                && inst.id == inst_id
            {
                inst.complete(conn, Event::RpcResponse { cb, reason });
            }
        }
        r
    }

    // ----- background work -----

    /// Emits pending states and telemetry batches, a few milliseconds after the first one
    /// arrived (or at once when a batch is full), then queues their callbacks.
    async fn flusher(self: Arc<Self>) {
        let interval = Duration::from_millis(self.settings.telemetry_flush_ms);
        loop {
            self.flush_wake.notified().await;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.flush_full.notified() => {}
            }
            self.flush_states().await;
            while self.flush_telemetry().await {}
        }
    }

    async fn flush_states(&self) {
        let mut work = Vec::new();
        {
            let mut st = self.lock();
            if !std::mem::take(&mut st.states_pending) {
                return;
            }
            for (name, inst) in st.instances.iter_mut() {
                for (topic, p) in std::mem::take(&mut inst.pending_states) {
                    let same = inst.reported.get(&topic) == Some(&p.value);
                    work.push((name.clone(), inst.id, topic, p, same));
                }
            }
        }
        for (name, id, topic, p, same) in work {
            let reason = if same {
                StateReason::Sent
            } else {
                let signal = Signal::State {
                    instance: name.clone(),
                    topic: topic.clone(),
                    value: p.value.clone(),
                };
                match self.sink.emit(signal).await {
                    Ok(()) => StateReason::Sent,
                    Err(e) => {
                        warn!(instance = %name, topic, "StateReported not emitted: {e}");
                        StateReason::Denied
                    }
                }
            };
            let mut st = self.lock();
            if let Some(inst) = st.instances.get_mut(&name)
                && inst.id == id
            {
                if reason == StateReason::Sent && !same {
                    inst.reported_bytes += limits::state_cost(&name, &topic, &p.value);
                    if let Some(old) = inst.reported.insert(topic.clone(), p.value) {
                        inst.reported_bytes -= limits::state_cost(&name, &topic, &old);
                    }
                }
                inst.complete(p.conn, Event::State { cb: p.cb, reason });
            }
        }
    }

    /// Emits one batch of whole calls; true when more are waiting.
    async fn flush_telemetry(&self) -> bool {
        let batch: Vec<PendingTelemetry> = {
            let mut st = self.lock();
            let mut batch = Vec::new();
            let (mut n, mut bytes) = (0, 0);
            while let Some(p) = st.telemetry.front() {
                if !batch.is_empty()
                    && (n + p.entries.len() > MAX_BATCH_ENTRIES
                        || bytes + p.bytes > MAX_BATCH_BYTES)
                {
                    break;
                }
                n += p.entries.len();
                bytes += p.bytes;
                if let Some(p) = st.telemetry.pop_front() {
                    batch.push(p);
                }
            }
            st.telemetry_entries -= n;
            st.telemetry_bytes -= bytes;
            batch
        };
        if batch.is_empty() {
            return false;
        }
        let entries: Vec<(String, String, String)> = batch
            .iter()
            .flat_map(|p| {
                p.entries
                    .iter()
                    .map(|(k, v)| (p.instance.clone(), k.clone(), v.clone()))
            })
            .collect();
        let reason = if entries.is_empty() {
            TelemetryReason::Sent
        } else {
            match self.sink.emit(Signal::Telemetry(entries)).await {
                Ok(()) => TelemetryReason::Sent,
                Err(e) => {
                    warn!("Telemetry not emitted: {e}");
                    TelemetryReason::Error
                }
            }
        };
        let mut st = self.lock();
        for p in batch {
            if let Some(inst) = st.instances.get_mut(&p.instance)
                && inst.id == p.inst_id
            {
                inst.telemetry_bytes -= p.bytes;
                inst.complete(p.conn, Event::Telemetry { cb: p.cb, reason });
            }
        }
        !st.telemetry.is_empty()
    }

    /// Answers `status: error` for direct commands that no module answered in time (a module
    /// without an RPC callback never answers; EVP let those hang forever).
    async fn rpc_expiry(self: Arc<Self>) {
        /// How often deadlines are checked; the timeout is counted in seconds, so this is fine.
        const CHECK_EVERY: Duration = Duration::from_millis(250);
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let now = Instant::now();
            let mut answers = Vec::new();
            {
                let mut st = self.lock();
                for (name, inst) in st.instances.iter_mut() {
                    let expired: Vec<u64> = inst
                        .rpcs
                        .iter()
                        .filter(|(_, deadline)| **deadline <= now)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in expired {
                        inst.rpcs.remove(&id);
                        inst.drop_events(
                            |q| matches!(q.event, Event::RpcRequest { id: i, .. } if i == id),
                        );
                        answers.push((
                            id,
                            name.clone(),
                            error_response(&format!(
                                "instance {name} did not answer within {} ms (no RPC callback?)",
                                self.settings.rpc_timeout_ms
                            )),
                        ));
                    }
                }
            }
            self.answer_errors(answers).await;
        }
    }

    /// The directory that holds the sockets.
    pub fn sdk_dir(&self) -> &std::path::Path {
        &self.sdk_dir
    }

    /// Bytes counted in an instance's event queue (queued events and reserved callbacks), for
    /// tests and diagnostics; `None` for an instance that is not open.
    pub fn queued_bytes(&self, instance: &str) -> Option<usize> {
        self.lock().instances.get(instance).map(|i| i.used)
    }

    /// Bytes of an instance's telemetry waiting to be emitted.
    pub fn pending_telemetry_bytes(&self, instance: &str) -> Option<usize> {
        self.lock()
            .instances
            .get(instance)
            .map(|i| i.telemetry_bytes)
    }
}
