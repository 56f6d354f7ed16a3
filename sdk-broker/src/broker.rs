//! The broker: the rules of `rules.rs` under one lock, with the effects they ask for run
//! around them. It opens each instance's socket through `conn.rs` (which knows the broker only
//! as its `Backend`), persists configuration through [`ConfigStore`], emits signals for hubd
//! through a [`Sink`] and runs the background work: the flusher of states and telemetry, the
//! expiry of direct commands and the exit grace. `lib.rs` exposes it on the bus.
//!
//! The lock is never held across an `.await`: every signal is emitted after it is released, and
//! the callbacks that depend on the emission are queued afterwards.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use evp_schemas::routing::{Routing, RoutingError};
use evp_schemas::sdk::{Request, Response, RpcResponseReason};
use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::conn::{self, Backend, Socket, SocketError};
use crate::peer::Binding;
pub use crate::rules::{
    CALLBACK_COST, MAX_BATCH_BYTES, MAX_BATCH_ENTRIES, MAX_CONFIG_BYTES, MAX_TELEMETRY_ENTRIES,
    Signal,
};
use crate::rules::{Closing, Detached, Handled, InstanceRef, Peer, Popped, Rules, Then};
use crate::settings::Settings;
use crate::store::ConfigStore;

/// A storage token: where to upload, and the headers to send.
pub type StorageToken = (String, Vec<(String, String)>);

/// Where the broker's signals go, and whom it asks for storage tokens: hubd on the bus in the
/// daemon, a channel in tests.
pub trait Sink: Send + Sync + 'static {
    /// Emits one signal; an error means hubd could not be told.
    fn emit(&self, signal: Signal) -> BoxFuture<'_, Result<(), String>>;

    /// Asks the hub where `target` is uploaded (`Hub1.RequestStorageToken`); an error says
    /// why there is no token. Without a hub, there never is.
    fn storage_token<'a>(
        &'a self,
        target: &'a crate::blob::StorageTarget,
    ) -> BoxFuture<'a, Result<StorageToken, String>> {
        let _ = target;
        Box::pin(async { Err("no hub to ask for a storage token".to_owned()) })
    }
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
    /// `OpenInstance` or `DeliverConfiguration` named an instance that cannot be a file name.
    #[error("instance {instance:?}: {reason}")]
    InstanceName {
        /// The name given.
        instance: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `OpenInstance` while the instance is still exiting from a `CloseInstance`; retry after
    /// its socket is gone.
    #[error("instance {instance} is still exiting; open it again once it stopped")]
    StillExiting {
        /// Instance name.
        instance: String,
    },
    /// `BindInstance` with a pid that no instance can have (0 or 1).
    #[error("instance {instance}: pid {pid} cannot be an instance's process")]
    NotAProcess {
        /// Instance name.
        instance: String,
        /// The pid given.
        pid: u32,
    },
    /// `BindInstance` of an instance that `OpenInstance` did not open.
    #[error("instance {instance} is not open; call OpenInstance first")]
    NotOpen {
        /// Instance name.
        instance: String,
    },
    /// `SetRouting` with a document that is not a routing table.
    #[error(transparent)]
    Routing(#[from] RoutingError),
    /// `DeliverConfiguration` of a value that cannot fit one SDK record.
    #[error(
        "configuration {instance}/{topic} is {bytes} bytes; an SDK record holds at most {MAX_CONFIG_BYTES}"
    )]
    ConfigTooBig {
        /// Instance name.
        instance: String,
        /// Configuration topic.
        topic: String,
        /// Topic plus value.
        bytes: usize,
    },
    /// `OpenInstance` could not create the socket.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// `DeliverConfiguration` could not persist the value (nothing changed).
    #[error("{0:#}")]
    Persist(anyhow::Error),
}

/// Everything the lock guards: the rules, and the socket of each instance they hold open.
#[derive(Debug)]
struct Core {
    rules: Rules,
    sockets: HashMap<String, Socket>,
}

impl Core {
    /// Removes the socket of an instance the rules removed: its listener and connection stop.
    fn remove_socket(&mut self, instance: &str) {
        if let Some(socket) = self.sockets.remove(instance) {
            socket.close();
            info!(instance, "instance closed, socket removed");
        }
    }
}

/// The broker. Cheap to share: wrap it in an `Arc`.
pub struct Broker {
    settings: Settings,
    sdk_dir: PathBuf,
    store: ConfigStore,
    sink: Arc<dyn Sink>,
    core: Mutex<Core>,
    /// Wakes the flusher when a state or telemetry is pending.
    flush_wake: Notify,
    /// Wakes the flusher at once when a telemetry batch is full.
    flush_full: Notify,
    /// The client of blob transfers (the proxy and CA of module downloads).
    http: reqwest::Client,
    /// This broker, for the tasks it starts.
    me: std::sync::Weak<Broker>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("sdk_dir", &self.sdk_dir)
            .finish_non_exhaustive()
    }
}

/// Checks a name given over D-Bus that becomes a socket and a file name.
fn valid_instance_name(instance: &str) -> Result<(), BrokerError> {
    evp_schemas::deployment::validate_instance_name(instance).map_err(|reason| {
        BrokerError::InstanceName {
            instance: instance.to_owned(),
            reason,
        }
    })
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
        Self::with_http(settings, run_dir, data_dir, sink, &Default::default())
    }

    /// As [`Broker::new`], blob transfers going through the proxy and CA of `http` (the
    /// `[reconciler]` keys module downloads use; the `EVP_*` variables win).
    pub fn with_http(
        settings: Settings,
        run_dir: PathBuf,
        data_dir: PathBuf,
        sink: Arc<dyn Sink>,
        http: &evp_daemon::http::HttpSettings,
    ) -> anyhow::Result<Arc<Broker>> {
        let store = ConfigStore::open(data_dir.join("sdk"))?;
        let configs = store.load_all();
        if settings.allowed_uids.is_some() || settings.instance_group.is_some() {
            warn!(
                "[sdk_broker] allowed_uids and instance_group are ignored: each socket is \
                 served to the process BindInstance names (its uid and pid) only"
            );
        }
        let http = {
            let (proxy, ca) = http.resolve(evp_daemon::http::env_lookup)?;
            evp_daemon::http::client(proxy.as_ref(), ca.as_deref(), crate::blob::READ_TIMEOUT)?
        };
        let instances_dir = data_dir.join("instances");
        Ok(Arc::new_cyclic(|me| Broker {
            sdk_dir: run_dir.join("sdk"),
            store,
            sink,
            core: Mutex::new(Core {
                rules: Rules::new(settings.clone(), configs).with_instances_dir(instances_dir),
                sockets: HashMap::new(),
            }),
            settings,
            flush_wake: Notify::new(),
            flush_full: Notify::new(),
            http,
            me: me.clone(),
        }))
    }

    /// Starts the background work: the flusher of states and telemetry, and the expiry of
    /// direct commands nobody answered.
    pub fn start(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.flusher().await });
        let me = Arc::clone(self);
        tokio::spawn(async move { me.rpc_expiry().await });
        let me = Arc::clone(self);
        tokio::spawn(async move { me.config_collection().await });
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock is a bug; the state is still consistent enough to go on.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Emits `signal`; false (and logged) when hubd could not be told.
    async fn emit(&self, signal: Signal) -> bool {
        let what = match &signal {
            Signal::State {
                instance, topic, ..
            } => format!("StateReported of {instance}/{topic}"),
            Signal::Telemetry(_) => "Telemetry".to_owned(),
            Signal::RpcResponse {
                reqid, instance, ..
            } => format!("RpcResponse to {reqid} from {instance}"),
        };
        match self.sink.emit(signal).await {
            Ok(()) => true,
            Err(e) => {
                warn!("{what} not emitted: {e}");
                false
            }
        }
    }

    async fn emit_all(&self, signals: Vec<Signal>) {
        for signal in signals {
            self.emit(signal).await;
        }
    }

    // ----- D-Bus methods -----

    /// `OpenInstance`: creates `<run_dir>/sdk/<instance>.sock` and starts serving it. Opening
    /// an instance that is already open returns its path and changes nothing.
    pub fn open_instance(self: &Arc<Self>, instance: &str) -> Result<PathBuf, BrokerError> {
        valid_instance_name(instance)?;
        {
            let core = self.lock();
            match (core.rules.is_exiting(instance), core.sockets.get(instance)) {
                (Some(true), _) => {
                    return Err(BrokerError::StillExiting {
                        instance: instance.to_owned(),
                    });
                }
                (Some(false), Some(socket)) => return Ok(socket.path().to_owned()),
                _ => {}
            }
        }
        let listening = conn::listen(&self.sdk_dir, instance)?;
        let mut core = self.lock();
        let opened = core.rules.open(instance);
        let backend: Arc<dyn Backend> = Arc::clone(self) as Arc<dyn Backend>;
        let socket = listening.serve(backend, opened);
        let path = socket.path().to_owned();
        core.sockets.insert(instance.to_owned(), socket);
        info!(instance, socket = %path.display(), "instance opened");
        Ok(path)
    }

    /// `BindInstance`: the socket is served only to process `pid` (or a descendant) running as
    /// `uid`, from now on; an earlier binding (a previous start) is replaced.
    pub fn bind_instance(&self, instance: &str, pid: u32, uid: u32) -> Result<(), BrokerError> {
        if pid <= 1 {
            return Err(BrokerError::NotAProcess {
                instance: instance.to_owned(),
                pid,
            });
        }
        let core = self.lock();
        let socket = core
            .sockets
            .get(instance)
            .ok_or_else(|| BrokerError::NotOpen {
                instance: instance.to_owned(),
            })?;
        let was = socket.bind(Binding { pid, uid });
        info!(instance, pid, uid, ?was, "instance bound to its process");
        Ok(())
    }

    /// `CloseInstance`: the exit protocol. Pending requests get their EXIT callbacks, the
    /// module gets `exit` once its queue drains, and the socket goes when the module
    /// disconnects or after the grace. Returns once the socket is gone, so the caller (which
    /// then stops the process) knows a module that follows the protocol has let go: its
    /// process is exiting by itself. Closing an unknown instance does nothing.
    pub async fn close_instance(self: &Arc<Self>, instance: &str) {
        let grace = Duration::from_millis(self.settings.exit_grace_ms);
        self.close_instance_within(instance, grace).await;
    }

    /// [`Broker::close_instance`] with a grace of at most `grace` (and never longer than the
    /// `exit_grace_ms` setting).
    pub async fn close_instance_within(self: &Arc<Self>, instance: &str, grace: Duration) {
        let grace = grace.min(Duration::from_millis(self.settings.exit_grace_ms));
        let (closing, mut closed) = {
            let mut core = self.lock();
            let Some(closed) = core.sockets.get(instance).map(Socket::closed) else {
                return;
            };
            let closing = core.rules.close(instance);
            if matches!(closing, Closing::Began { removed: true, .. }) {
                core.remove_socket(instance);
            }
            (closing, closed)
        };
        let (exiting, answers, removed) = match closing {
            Closing::NotOpen => return,
            Closing::UnderWay => {
                // A second close waits for the first one's outcome.
                let _ = closed.wait_for(|gone| *gone).await;
                return;
            }
            Closing::Began {
                instance,
                answers,
                removed,
            } => (instance, answers, removed),
        };
        info!(instance, "instance closing");
        self.emit_all(answers).await;
        if removed {
            return;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let mut core = me.lock();
            if core.rules.grace_over(&exiting) {
                warn!(
                    instance = exiting.name,
                    "module still connected after the exit grace; closing its socket"
                );
                core.remove_socket(&exiting.name);
            }
        });
        // The sender is dropped with the socket, which ends the wait too.
        let _ = closed.wait_for(|gone| *gone).await;
    }

    /// `SetRouting`: replaces the message routes of every instance.
    pub fn set_routing(&self, routing_json: &str) -> Result<(), BrokerError> {
        let routing = Routing::from_json(routing_json)?;
        debug!(instances = routing.instances.len(), "routing replaced");
        self.lock().rules.set_routing(routing, Instant::now());
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
        valid_instance_name(instance)?;
        let bytes = topic.len() + value.len();
        if bytes > MAX_CONFIG_BYTES {
            return Err(BrokerError::ConfigTooBig {
                instance: instance.to_owned(),
                topic: topic.to_owned(),
                bytes,
            });
        }
        self.lock()
            .rules
            .deliver_configuration(instance, topic, value, Instant::now(), |topics| {
                self.store.save(instance, topics)
            })
            .map_err(BrokerError::Persist)
    }

    /// `CallMethod`: queues the command to the instance; answers `status: error` at once when
    /// the instance is absent, exiting, or cannot take another event.
    pub async fn call_method(&self, instance: &str, reqid: u64, method: &str, params: &str) {
        let called = self
            .lock()
            .rules
            .call_method(instance, reqid, method, params, Instant::now());
        if let Err(answer) = called {
            self.emit(answer).await;
        }
    }

    // ----- requests -----

    /// Serves one request of `peer` and does what its rule left to do.
    async fn serve_request(&self, peer: &Peer, request: Request) -> Response {
        let Handled { response, then } = self.lock().rules.handle(peer, request);
        match then {
            Then::Nothing => {}
            Then::Flush { full } => {
                self.flush_wake.notify_one();
                if full {
                    self.flush_full.notify_one();
                }
            }
            Then::EmitAnswer { signal, cb } => {
                let reason = if self.emit(signal).await {
                    RpcResponseReason::Sent
                } else {
                    RpcResponseReason::Error
                };
                self.lock().rules.rpc_answered(peer, cb, reason);
            }
            Then::AnswerHub(signal) => {
                self.emit(signal).await;
            }
            Then::Transfer { job, cb } => self.start_transfer(peer, job, cb),
        }
        response
    }

    /// Runs a blob transfer in the background; its end becomes the module's callback.
    fn start_transfer(&self, peer: &Peer, job: crate::blob::Job, cb: evp_schemas::sdk::Callback) {
        let (Some(me), Some(cancel)) = (self.me.upgrade(), self.lock().rules.blob_cancel(peer))
        else {
            return;
        };
        let peer = peer.clone();
        tokio::spawn(async move {
            let kind = job.kind;
            let outcome = match me.with_storage_token(job, cancel.clone()).await {
                Ok(Some(job)) => crate::blob::run(&me.http, job, cancel).await,
                Ok(None) => None,
                Err(failed) => Some(failed),
            };
            me.lock().rules.blob_done(&peer, cb, kind, outcome);
        });
    }

    /// The job with its storage token's URL and headers when it is an EVP storage upload;
    /// `Ok(None)` when `cancel` came first, `Err` with the outcome when there is no token.
    async fn with_storage_token(
        &self,
        mut job: crate::blob::Job,
        mut cancel: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<crate::blob::Job>, evp_schemas::sdk::BlobOutcome> {
        let Some(target) = job.storage.clone() else {
            return Ok(Some(job));
        };
        let token = tokio::select! {
            t = self.sink.storage_token(&target) => t,
            _ = cancel.wait_for(|c| *c) => return Ok(None),
        };
        match token.and_then(|(url, headers)| job.set_token(url, headers)) {
            Ok(()) => Ok(Some(job)),
            Err(why) => Err(job.failed(&format!(
                "no storage token for {:?} of {}: {why}",
                target.remote_name, target.instance
            ))),
        }
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
            let states = self.lock().rules.take_states();
            for state in states {
                let emitted = match state.signal() {
                    Some(signal) => self.emit(signal).await,
                    None => true,
                };
                self.lock().rules.state_sent(state, emitted);
            }
            loop {
                let Some(batch) = self.lock().rules.take_telemetry() else {
                    break;
                };
                let emitted = match batch.signal() {
                    Some(signal) => self.emit(signal).await,
                    None => true,
                };
                if !self.lock().rules.telemetry_sent(batch, emitted) {
                    break;
                }
            }
        }
    }

    /// Answers `status: error` for direct commands that no module answered in time.
    async fn rpc_expiry(self: Arc<Self>) {
        /// How often deadlines are checked; the timeout is counted in seconds, so this is fine.
        const CHECK_EVERY: Duration = Duration::from_millis(250);
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let answers = self.lock().rules.expire_commands(Instant::now());
            self.emit_all(answers).await;
        }
    }

    /// Removes the configurations of instances out of the deployment for the grace
    /// (`orphan_config_grace_ms`), from memory and disk.
    async fn config_collection(self: Arc<Self>) {
        let every = Duration::from_millis(self.settings.orphan_config_grace_ms / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(60));
        loop {
            tokio::time::sleep(every).await;
            let core = &mut *self.lock();
            for instance in core.rules.collect_configs(Instant::now()) {
                match self.store.remove(&instance) {
                    Ok(()) => info!(
                        instance,
                        "configuration collected: the instance is not deployed"
                    ),
                    Err(e) => warn!(instance, "collecting its configuration: {e:#}"),
                }
            }
        }
    }

    // ----- diagnostics -----

    /// The directory that holds the sockets.
    pub fn sdk_dir(&self) -> &Path {
        &self.sdk_dir
    }

    /// Bytes counted in an instance's event queue (queued events and reserved callbacks), for
    /// tests and diagnostics; `None` for an instance that is not open.
    pub fn queued_bytes(&self, instance: &str) -> Option<usize> {
        self.lock().rules.queued_bytes(instance)
    }

    /// Bytes of an instance's telemetry waiting to be emitted.
    pub fn pending_telemetry_bytes(&self, instance: &str) -> Option<usize> {
        self.lock().rules.pending_telemetry_bytes(instance)
    }
}

/// What `conn.rs` asks of the broker for each connection.
impl Backend for Broker {
    fn attach(&self, instance: &InstanceRef) -> Option<(Peer, Arc<Notify>)> {
        self.lock().rules.attach(instance)
    }

    fn next_event(&self, peer: &Peer) -> Popped {
        self.lock().rules.next_event(peer)
    }

    fn handle<'a>(&'a self, peer: &'a Peer, request: Request) -> BoxFuture<'a, Response> {
        Box::pin(self.serve_request(peer, request))
    }

    fn detach<'a>(&'a self, peer: &'a Peer) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Detached { answers, .. } = {
                let mut core = self.lock();
                let detached = core.rules.detach(peer);
                if detached.removed {
                    core.remove_socket(&peer.instance.name);
                }
                detached
            };
            self.emit_all(answers).await;
        })
    }
}
