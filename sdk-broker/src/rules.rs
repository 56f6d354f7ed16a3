//! The broker's rules, apart from sockets, D-Bus and files: the open instances and their
//! bounded event queues, configuration kept per instance, states, telemetry batches, message
//! routing, direct commands, back-pressure and the exit protocol.
//!
//! [`Rules`] takes decoded requests and D-Bus calls and says what to answer and what is left to
//! do: a [`Signal`] for hubd, the flusher to wake, a socket to remove. It does no I/O (the
//! persisting of configuration is handed in as a closure) and reads no clock (deadlines come
//! with `now`), so every rule is unit-tested on its own (`rules/tests.rs`). `broker.rs` runs the
//! effects under one lock; `conn.rs` carries the requests.

mod instance;
mod requests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evp_schemas::routing::Routing;
use evp_schemas::sdk::{Callback, Event, RpcStatus, StateReason, TelemetryReason};
use tokio::sync::Notify;
use tracing::debug;

use crate::limits;
use crate::orphans::Orphans;
use crate::settings::Settings;
use instance::{Instance, PendingState};
pub(crate) use requests::{Handled, Then};

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
pub const MAX_CONFIG_BYTES: usize = evp_schemas::sdk::MAX_PAYLOAD - 1024;

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

/// The broker's own answer `status: error, {"error": message}` to direct command `reqid`.
fn error_answer(reqid: u64, instance: &str, message: &str) -> Signal {
    Signal::RpcResponse {
        reqid,
        instance: instance.to_owned(),
        status: RpcStatus::Error.code(),
        response: serde_json::json!({ "error": message }).to_string(),
    }
}

/// One opening of an instance: its name and the id of that opening, so that a connection or a
/// timer of an instance that was closed and opened again never touches the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRef {
    /// Instance name.
    pub name: String,
    /// Which opening.
    pub id: u64,
}

/// One module connection to its instance's socket: callbacks belong to it, and a request made
/// on a connection that was replaced or closed is no longer answered with events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The instance connected to.
    pub instance: InstanceRef,
    /// Which connection.
    pub conn: u64,
}

/// What a getEvent finds in the queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Popped {
    /// The next event.
    Event(Event),
    /// Nothing queued; wait on the notifier.
    Empty,
    /// Exit was requested and the queue is drained.
    Exit,
    /// The instance or this connection is no longer current: close.
    Gone,
}

/// What `CloseInstance` started.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Closing {
    /// The instance is not open: nothing to do.
    NotOpen,
    /// An earlier `CloseInstance` is under way; its outcome is this one's.
    UnderWay,
    /// The exit protocol began.
    Began {
        /// The opening that is exiting (for its grace timer).
        instance: InstanceRef,
        /// Error answers for the commands that waited for it.
        answers: Vec<Signal>,
        /// No module was connected, so the instance is gone already (remove its socket);
        /// otherwise it goes when the module disconnects or after the grace.
        removed: bool,
    },
}

/// What the end of a connection left to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Detached {
    /// Error answers for the commands that waited for the module.
    pub(crate) answers: Vec<Signal>,
    /// The instance was exiting and is gone now (remove its socket).
    pub(crate) removed: bool,
}

/// One accepted `sendTelemetry`, waiting in the global batch.
#[derive(Debug)]
struct PendingTelemetry {
    peer: Peer,
    cb: Callback,
    entries: Vec<(String, String)>,
    bytes: usize,
}

/// Accepted telemetry of every instance, in call order, with its totals.
#[derive(Debug, Default)]
struct TelemetryQueue {
    calls: VecDeque<PendingTelemetry>,
    entries: usize,
    bytes: usize,
}

/// A state taken for emission by [`Rules::take_states`]; give it back to
/// [`Rules::state_sent`].
#[derive(Debug)]
pub(crate) struct StateToSend {
    instance: InstanceRef,
    topic: String,
    pending: PendingState,
    /// The value is the one reported last: nothing to emit, the callback says SENT.
    same: bool,
}

impl StateToSend {
    /// The signal to emit; `None` when the value is the one reported last.
    pub(crate) fn signal(&self) -> Option<Signal> {
        (!self.same).then(|| Signal::State {
            instance: self.instance.name.clone(),
            topic: self.topic.clone(),
            value: self.pending.value.clone(),
        })
    }
}

/// Whole `sendTelemetry` calls taken for one signal by [`Rules::take_telemetry`]; give them
/// back to [`Rules::telemetry_sent`].
#[derive(Debug)]
pub(crate) struct TelemetryBatch(Vec<PendingTelemetry>);

impl TelemetryBatch {
    /// The signal to emit; `None` when the calls carry no entry at all.
    pub(crate) fn signal(&self) -> Option<Signal> {
        let entries: Vec<(String, String, String)> = self
            .0
            .iter()
            .flat_map(|p| {
                p.entries
                    .iter()
                    .map(|(k, v)| (p.peer.instance.name.clone(), k.clone(), v.clone()))
            })
            .collect();
        (!entries.is_empty()).then_some(Signal::Telemetry(entries))
    }
}

/// The broker's state and rules. Not shared by itself: the broker keeps it under its lock.
#[derive(Debug)]
pub(crate) struct Rules {
    settings: Settings,
    instances: HashMap<String, Instance>,
    /// Every instance's configuration, open or not, as persisted.
    configs: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    routing: Routing,
    telemetry: TelemetryQueue,
    /// Some instance has a state waiting to be collected.
    states_pending: bool,
    /// Source of instance and connection ids.
    next_id: u64,
    /// (instance, field) pairs already logged as holding a NUL: one warning each, so a module
    /// that loops on a refused call cannot flood the journal.
    nul_logged: HashSet<(String, String)>,
    /// `<data_dir>/instances`: each instance's workspace is `<name>/default_workspace` below.
    instances_dir: std::path::PathBuf,
    /// Which kept configurations belong to instances out of the deployment.
    orphans: Orphans,
}

impl Rules {
    /// The rules with `settings` in force and the configuration persisted so far.
    pub(crate) fn new(
        settings: Settings,
        configs: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    ) -> Rules {
        Rules {
            orphans: Orphans::new(Duration::from_millis(settings.orphan_config_grace_ms)),
            settings,
            instances: HashMap::new(),
            configs,
            routing: Routing::default(),
            telemetry: TelemetryQueue::default(),
            states_pending: false,
            next_id: 1,
            nul_logged: HashSet::new(),
            instances_dir: std::path::PathBuf::new(),
        }
    }

    /// The same rules, with instance workspaces below `instances_dir`.
    pub(crate) fn with_instances_dir(mut self, instances_dir: std::path::PathBuf) -> Rules {
        self.instances_dir = instances_dir;
        self
    }

    /// The end of a blob transfer of `peer`: its callback, `Done` with the outcome, or `Exit`
    /// when the instance's exit cut it short (`None`).
    pub(crate) fn blob_done(
        &mut self,
        peer: &Peer,
        cb: Callback,
        kind: u32,
        outcome: Option<evp_schemas::sdk::BlobOutcome>,
    ) {
        let Some(inst) = self.current(&peer.instance) else {
            return;
        };
        inst.live_blobs = inst.live_blobs.saturating_sub(1);
        let (reason, result) = match outcome {
            Some(result) => (evp_schemas::sdk::BlobReason::Done, result),
            None => (
                evp_schemas::sdk::BlobReason::Exit,
                evp_schemas::sdk::BlobOutcome {
                    kind,
                    ..Default::default()
                },
            ),
        };
        inst.complete(peer.conn, Event::Blob { cb, reason, result });
    }

    /// What ends `peer`'s instance's transfers when it exits.
    pub(crate) fn blob_cancel(
        &mut self,
        peer: &Peer,
    ) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.current(&peer.instance)
            .map(|inst| inst.blob_cancel.subscribe())
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The instance if `instance` is still its current opening.
    fn current(&mut self, instance: &InstanceRef) -> Option<&mut Instance> {
        current(&mut self.instances, instance)
    }

    // ----- D-Bus calls -----

    /// Whether the open instance `name` is exiting; `None` when it is not open.
    pub(crate) fn is_exiting(&self, name: &str) -> Option<bool> {
        self.instances.get(name).map(|i| i.exiting)
    }

    /// Opens instance `name` afresh (its socket is ready): nothing queued, no module yet.
    pub(crate) fn open(&mut self, name: &str) -> InstanceRef {
        let id = self.next_id();
        self.instances.insert(name.to_owned(), Instance::new(id));
        InstanceRef {
            name: name.to_owned(),
            id,
        }
    }

    /// `CloseInstance`: pending states and telemetry get their EXIT callbacks, queued commands
    /// are dropped and answered with an error, and the module gets `exit` once its queue
    /// drains. An instance with no module connected is removed at once.
    pub(crate) fn close(&mut self, name: &str) -> Closing {
        let Some(inst) = self.instances.get_mut(name) else {
            return Closing::NotOpen;
        };
        if inst.exiting {
            return Closing::UnderWay;
        }
        inst.exiting = true;
        inst.blob_cancel.send_replace(true);
        for (_, p) in std::mem::take(&mut inst.pending_states) {
            inst.complete(
                p.conn,
                Event::State {
                    cb: p.cb,
                    reason: StateReason::Exit,
                },
            );
        }
        let instance = InstanceRef {
            name: name.to_owned(),
            id: inst.id,
        };
        let queue = &mut self.telemetry;
        let (leaving, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut queue.calls)
            .into_iter()
            .partition(|p| p.peer.instance == instance);
        queue.calls = kept;
        for p in leaving {
            queue.entries -= p.entries.len();
            queue.bytes -= p.bytes;
            inst.telemetry_bytes -= p.bytes;
            inst.complete(
                p.peer.conn,
                Event::Telemetry {
                    cb: p.cb,
                    reason: TelemetryReason::Exit,
                },
            );
        }
        inst.drop_events(|q| matches!(q.event, Event::RpcRequest { .. }));
        let answers = inst
            .rpcs
            .drain()
            .map(|(reqid, _)| error_answer(reqid, name, &format!("instance {name} is stopping")))
            .collect();
        inst.notify.notify_one();
        let removed = inst.conn.is_none();
        if removed {
            self.instances.remove(name);
        }
        Closing::Began {
            instance,
            answers,
            removed,
        }
    }

    /// The exit grace of `instance` ran out: true when it was still there (now removed).
    pub(crate) fn grace_over(&mut self, instance: &InstanceRef) -> bool {
        let exiting = self.current(instance).is_some_and(|i| i.exiting);
        if exiting {
            self.instances.remove(&instance.name);
        }
        exiting
    }

    /// `SetRouting`: replaces the message routes of every instance. Its instances are the
    /// deployment's: the configurations of the others start their grace at `now`.
    pub(crate) fn set_routing(&mut self, routing: Routing, now: Instant) {
        let deployed = routing.instances.keys().cloned().collect();
        self.orphans
            .deployment(deployed, self.configs.keys().map(String::as_str), now);
        self.routing = routing;
    }

    /// Forgets the configurations whose instance has been out of the deployment for the grace
    /// at `now` (see [`Orphans`]), and returns their instances (whose files are to go).
    pub(crate) fn collect_configs(&mut self, now: Instant) -> Vec<String> {
        let instances = &self.instances;
        let due = self.orphans.due(now, |name| instances.contains_key(name));
        for name in &due {
            self.configs.remove(name);
        }
        due
    }

    /// `DeliverConfiguration` at `now`: keeps the value (`persist` writes an instance's topics
    /// before they are kept; its error changes nothing), and queues it to the module now when
    /// it is connected, replacing a queued value of the same topic.
    pub(crate) fn deliver_configuration<E>(
        &mut self,
        instance: &str,
        topic: &str,
        value: &[u8],
        now: Instant,
        persist: impl FnOnce(&BTreeMap<String, Vec<u8>>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut topics = self.configs.get(instance).cloned().unwrap_or_default();
        if topics.get(topic).map(Vec::as_slice) != Some(value) {
            topics.insert(topic.to_owned(), value.to_vec());
            persist(&topics)?;
            self.configs.insert(instance.to_owned(), topics);
        }
        self.orphans.configured(instance, now);
        if let Some(inst) = self.instances.get_mut(instance)
            && inst.conn.is_some()
            && !inst.exiting
        {
            inst.push_config(topic, value);
        }
        Ok(())
    }

    /// `CallMethod`: queues the command to the instance, to be answered before
    /// `now + rpc_timeout_ms`. `Err` is the broker's own error answer, when the instance is
    /// absent, exiting, already has that request id, or cannot take another event.
    pub(crate) fn call_method(
        &mut self,
        instance: &str,
        reqid: u64,
        method: &str,
        params: &str,
        now: Instant,
    ) -> Result<(), Signal> {
        let limit = self.settings.event_queue_bytes;
        let timeout = Duration::from_millis(self.settings.rpc_timeout_ms);
        let refusal = match self.instances.get_mut(instance) {
            None => format!("instance {instance} is not running on this device"),
            Some(inst) if inst.exiting => format!("instance {instance} is stopping"),
            Some(inst) if inst.rpcs.contains_key(&reqid) => {
                format!("request {reqid} is already waiting for instance {instance}")
            }
            Some(inst) => {
                let event = Event::RpcRequest {
                    id: reqid,
                    method: method.to_owned(),
                    params: params.to_owned(),
                };
                if inst.used + event.wire_size() > limit {
                    format!("instance {instance} has too many queued events")
                } else {
                    inst.push(event);
                    inst.rpcs.insert(reqid, now + timeout);
                    return Ok(());
                }
            }
        };
        debug!(instance, reqid, method, "direct command refused: {refusal}");
        Err(error_answer(reqid, instance, &refusal))
    }

    /// Error answers for the direct commands whose deadline passed at `now` (a module without
    /// an RPC callback never answers; EVP let those hang forever); their events still queued
    /// are dropped.
    pub(crate) fn expire_commands(&mut self, now: Instant) -> Vec<Signal> {
        let timeout_ms = self.settings.rpc_timeout_ms;
        let mut answers = Vec::new();
        for (name, inst) in self.instances.iter_mut() {
            let expired: Vec<u64> = inst
                .rpcs
                .iter()
                .filter(|(_, deadline)| **deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                inst.rpcs.remove(&id);
                inst.drop_events(|q| matches!(q.event, Event::RpcRequest { id: i, .. } if i == id));
                let message = format!(
                    "instance {name} did not answer within {timeout_ms} ms (no RPC callback?)"
                );
                answers.push(error_answer(id, name, &message));
            }
        }
        answers
    }

    // ----- connections -----

    /// A checked peer connected to the instance's socket: it becomes the current connection
    /// and is given every stored configuration again. `None` when `instance` is gone,
    /// replaced or exiting.
    pub(crate) fn attach(&mut self, instance: &InstanceRef) -> Option<(Peer, Arc<Notify>)> {
        let conn = self.next_id();
        let inst = current(&mut self.instances, instance).filter(|i| !i.exiting)?;
        inst.conn = Some(conn);
        inst.drop_events(|q| matches!(q.event, Event::Config { .. }));
        if let Some(topics) = self.configs.get(&instance.name) {
            inst.push_configs(topics);
        }
        let peer = Peer {
            instance: instance.clone(),
            conn,
        };
        Some((peer, Arc::clone(&inst.notify)))
    }

    /// The connection ended: its callback events and its configuration events go (they are
    /// re-delivered on the next connection), commands waiting for it are answered with an
    /// error, and an exiting instance is removed.
    pub(crate) fn detach(&mut self, peer: &Peer) -> Detached {
        let name = peer.instance.name.as_str();
        let Some(inst) = self.current(&peer.instance) else {
            return Detached::default();
        };
        if inst.conn != Some(peer.conn) {
            return Detached::default();
        }
        inst.conn = None;
        inst.drop_events(|q| {
            q.conn.is_some() || matches!(q.event, Event::Config { .. } | Event::RpcRequest { .. })
        });
        let message = format!("instance {name} disconnected before answering");
        let answers = inst
            .rpcs
            .drain()
            .map(|(reqid, _)| error_answer(reqid, name, &message))
            .collect();
        let removed = inst.exiting;
        if removed {
            self.instances.remove(name);
        }
        Detached { answers, removed }
    }

    /// Takes the next event for a getEvent of `peer`.
    pub(crate) fn next_event(&mut self, peer: &Peer) -> Popped {
        let Some(inst) = self.current(&peer.instance) else {
            return Popped::Gone;
        };
        if inst.conn != Some(peer.conn) {
            return Popped::Gone;
        }
        match inst.pop() {
            Some(event) => Popped::Event(event),
            // Exit once the transfers cut short have given their EXIT callbacks too.
            None if inst.exiting && inst.live_blobs == 0 => Popped::Exit,
            None => Popped::Empty,
        }
    }

    // ----- collection of states and telemetry -----

    /// Takes every state waiting to be collected, once any was sent since the last time.
    pub(crate) fn take_states(&mut self) -> Vec<StateToSend> {
        if !std::mem::take(&mut self.states_pending) {
            return Vec::new();
        }
        let mut taken = Vec::new();
        for (name, inst) in self.instances.iter_mut() {
            for (topic, pending) in std::mem::take(&mut inst.pending_states) {
                let same = inst.reported.get(&topic) == Some(&pending.value);
                let instance = InstanceRef {
                    name: name.clone(),
                    id: inst.id,
                };
                taken.push(StateToSend {
                    instance,
                    topic,
                    pending,
                    same,
                });
            }
        }
        taken
    }

    /// A taken state was emitted (`emitted`) or not: its callback is queued (SENT, or DENIED
    /// when hubd could not be told) and a sent value becomes the one reported.
    pub(crate) fn state_sent(&mut self, state: StateToSend, emitted: bool) {
        let StateToSend {
            instance,
            topic,
            pending,
            same,
        } = state;
        let Some(inst) = self.current(&instance) else {
            return;
        };
        let reason = if same || emitted {
            StateReason::Sent
        } else {
            StateReason::Denied
        };
        if reason == StateReason::Sent && !same {
            inst.reported_bytes += limits::state_cost(&instance.name, &topic, &pending.value);
            if let Some(old) = inst.reported.insert(topic.clone(), pending.value) {
                inst.reported_bytes -= limits::state_cost(&instance.name, &topic, &old);
            }
        }
        let event = Event::State {
            cb: pending.cb,
            reason,
        };
        inst.complete(pending.conn, event);
    }

    /// Takes the oldest whole calls that fit one `Telemetry` signal; `None` when none waits.
    pub(crate) fn take_telemetry(&mut self) -> Option<TelemetryBatch> {
        let queue = &mut self.telemetry;
        let mut batch = Vec::new();
        let (mut entries, mut bytes) = (0, 0);
        while let Some(p) = queue.calls.front() {
            if !batch.is_empty()
                && (entries + p.entries.len() > MAX_BATCH_ENTRIES
                    || bytes + p.bytes > MAX_BATCH_BYTES)
            {
                break;
            }
            entries += p.entries.len();
            bytes += p.bytes;
            batch.extend(queue.calls.pop_front());
        }
        queue.entries -= entries;
        queue.bytes -= bytes;
        (!batch.is_empty()).then_some(TelemetryBatch(batch))
    }

    /// A taken batch was emitted (`emitted`) or not: its callbacks are queued (SENT, or ERROR
    /// when hubd could not be told). True when more telemetry waits.
    pub(crate) fn telemetry_sent(&mut self, batch: TelemetryBatch, emitted: bool) -> bool {
        let reason = if emitted {
            TelemetryReason::Sent
        } else {
            TelemetryReason::Error
        };
        for p in batch.0 {
            if let Some(inst) = self.current(&p.peer.instance) {
                inst.telemetry_bytes -= p.bytes;
                inst.complete(p.peer.conn, Event::Telemetry { cb: p.cb, reason });
            }
        }
        !self.telemetry.calls.is_empty()
    }

    // ----- diagnostics -----

    /// Bytes counted in an instance's event queue (queued events and reserved callbacks);
    /// `None` for an instance that is not open.
    pub(crate) fn queued_bytes(&self, name: &str) -> Option<usize> {
        self.instances.get(name).map(|i| i.used)
    }

    /// Bytes of an instance's telemetry waiting to be emitted.
    pub(crate) fn pending_telemetry_bytes(&self, name: &str) -> Option<usize> {
        self.instances.get(name).map(|i| i.telemetry_bytes)
    }
}

/// The instance in `instances` if `instance` is still its current opening.
fn current<'a>(
    instances: &'a mut HashMap<String, Instance>,
    instance: &InstanceRef,
) -> Option<&'a mut Instance> {
    instances
        .get_mut(&instance.name)
        .filter(|i| i.id == instance.id)
}
