//! The MQTT side of hubd: the connection with its reconnect backoff, the EVP2-TB session,
//! decoding the hub's changes, sending status and instance-state reports, direct commands and
//! telemetry. It talks to the rest of the device only through [`Links`] and [`SdkLinks`], so
//! it runs (and is tested) without D-Bus.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

use evp_schemas::codec::{DeviceConfig, IncomingDropped, Losses};
use evp_schemas::evp2::{sizes, topics};
use evp_schemas::{
    Deployment, DeploymentStatus, DesiredChange, DirectCommandResponse, HubCodec, RpcStatus,
};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::HubConfig;
use crate::device_config::{AgentSettings, DeviceConfigStore};
use crate::outbox::Outbox;
use crate::report::{self, Rejection};
use crate::rotation;
use crate::rpc::{self, PendingCommands};
use crate::session::Session;
use crate::spool::Spool;
use crate::spool::task::{Response, SpoolInputs, SpoolOutputs};
use crate::states::{States, StatesFile};
use crate::storage::{TokenCache, Waiting};
use crate::timing::ReportTimer;

mod commands;
mod dial;
mod drive;
mod links;
mod publishing;
mod tokens;

pub use dial::{connection_options, mqtt_options};
use drive::{DriverLinks, MqttEvent, drive};

pub use links::{
    ApplyOutcome, CONFIGURATION_CHANNEL, ConfigurationDelivery, ConnectionState, DeploymentRequest,
    LinkEnds, Links, METHOD_CALL_CHANNEL, MethodCall, OUTCOME_CHANNEL, RegistryAuth,
    SDK_EVENT_CHANNEL, STORAGE_TOKEN_CHANNEL, SdkEnds, SdkEvent, SdkLinks, TELEMETRY_CHANNEL,
};

/// Largest MQTT packet hubd sends: EVP's 128 KiB send buffer, which hubs are sized for.
pub const MAX_OUTGOING_PACKET: usize = sizes::MAX_PACKET;
/// Largest MQTT packet hubd reads. rumqttc ends the connection on a larger one, and a retained
/// one would then end every connection after it, so this is far above anything hubd uses:
/// such a message is read (the memory is transient) and dropped by [`MAX_INCOMING_PAYLOAD`].
const MAX_INCOMING_PACKET: usize = 16 << 20;
/// Largest payload hubd acts on: above EVP's 128 KiB receive buffer, so a big manifest or the
/// device's own report echoed by a plain broker still counts; a larger one is dropped, logged
/// and counted in the status report (`state/$agent/incoming-dropped`).
pub const MAX_INCOMING_PAYLOAD: usize = 1 << 20;
/// Bytes of an MQTT PUBLISH besides topic and payload.
pub const PUBLISH_OVERHEAD: usize = sizes::PUBLISH_OVERHEAD;
/// Requests waiting for rumqttc's event loop, which writes one per poll. A publisher that
/// finds it full waits for room (a bounded time) rather than dropping, so its size does not
/// limit the rate: the in-process benchmark (`tests/sdk_flow.rs`) measured the same telemetry
/// rate with 64 and 512. The small size bounds what it holds to 64 messages of at most
/// [`MAX_OUTGOING_PACKET`] (8 MiB at worst; telemetry messages are typically small).
pub const REQUEST_CHANNEL: usize = 64;
/// MQTT events waiting for the session loop.
const EVENT_CHANNEL: usize = 256;
/// States that change while the hub is away are written at most this often: only the latest
/// matters, and each write is a file, two fsyncs and a rename (a power cut loses at most the
/// states of this window; the same bound as the spool's cursor).
const STATES_SAVE_DELAY: Duration = Duration::from_secs(5);
/// Retry delay of a report that could not be queued for sending.
const REPORT_RETRY: Duration = Duration::from_secs(1);
/// How long a clean shutdown waits for the DISCONNECT to go out.
const DISCONNECT_GRACE: Duration = Duration::from_secs(3);

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// The session loop's state.
struct Core {
    cfg: HubConfig,
    /// The hub's dialect (`[hub] protocol`).
    codec: &'static dyn HubCodec,
    outbox: Outbox,
    store: DeviceConfigStore,
    hub_device_config: Option<DeviceConfig>,
    settings: AgentSettings,
    system_info: evp_schemas::codec::SystemInfo,
    session: Session,
    timer: ReportTimer,
    report_wake: Option<Instant>,
    states: States,
    /// Where the states are kept while the hub is away.
    states_file: StatesFile,
    /// When the states changed while offline and are not on disk yet: when to write them.
    states_save_at: Option<Instant>,
    /// Whether the file holds states the hub has not been sent yet.
    states_on_disk: bool,
    states_timer: ReportTimer,
    states_wake: Option<Instant>,
    /// The encoded instance-state report (all its messages joined, to compare, and each
    /// message), or `None` when the states changed since.
    states_payload: Option<(String, Vec<String>)>,
    pending: PendingCommands,
    calls: mpsc::Sender<MethodCall>,
    rejection: Option<Rejection>,
    seq: u64,
    connected: bool,
    status: Option<DeploymentStatus>,
    deployments: watch::Sender<Option<DeploymentRequest>>,
    configurations: mpsc::Sender<ConfigurationDelivery>,
    /// Configurations accepted from the hub that the delivery queue had no room for yet, in
    /// order; no further MQTT message is read until they are handed over (back-pressure).
    config_backlog: VecDeque<ConfigurationDelivery>,
    /// Storage token requests waiting for the hub.
    tokens: Waiting,
    /// The `multifile` storage tokens kept for use while offline.
    token_cache: TokenCache,
    /// The registry credentials in effect, for `Hub1.RegistryAuth`.
    registry_auth: watch::Sender<RegistryAuth>,
    /// Direct-command answers, through the spool.
    responses: mpsc::UnboundedSender<Response>,
    /// Whether the spool may drain: set once a new connection's reports are out.
    drain: watch::Sender<bool>,
    /// What the status report counts as lost.
    losses: Losses,
    /// Attributes the hub sent that its dialect does not have, each logged once.
    not_in_dialect: BTreeSet<String>,
}

/// Runs the MQTT session until `shutdown` completes, then disconnects cleanly.
/// `device_config` is the one stored at the last run, if any. Without sdk-broker: direct
/// commands are answered with an error, and nothing reports states or telemetry.
pub async fn run(
    cfg: HubConfig,
    options: MqttOptions,
    store: DeviceConfigStore,
    device_config: Option<DeviceConfig>,
    links: Links,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (sdk, _closed) = SdkLinks::new();
    drop(_closed);
    run_with_sdk(cfg, options, store, device_config, links, sdk, shutdown).await
}

/// [`run`], with sdk-broker's states, answers and telemetry.
pub async fn run_with_sdk(
    cfg: HubConfig,
    options: MqttOptions,
    store: DeviceConfigStore,
    device_config: Option<DeviceConfig>,
    links: Links,
    sdk: SdkLinks,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let SdkLinks {
        events: mut sdk_events,
        calls,
        telemetry: telemetry_batches,
    } = sdk;
    let Links {
        deployments,
        mut outcomes,
        configurations,
        mut status,
        connection,
        mut storage_tokens,
        registry_auth,
        spool: spool_report,
        credentials,
    } = links;
    let spool_dir = store.dir().join("spool");
    let spool = Spool::open(&spool_dir, cfg.spool)
        .map_err(|e| anyhow::anyhow!("opening the spool: {e}"))?;
    if spool.queued_bytes() > 0 {
        info!(
            "the spool holds {} bytes for the hub from an earlier run",
            spool.queued_bytes()
        );
    }
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
    let outbox = Outbox::new(client);
    let (events_tx, mut events) = mpsc::channel(EVENT_CHANNEL);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (acks_tx, acks) = mpsc::unbounded_channel();
    let (responses_tx, responses) = mpsc::unbounded_channel();
    let (drain_tx, drain) = watch::channel(false);
    let (dropped_tx, mut dropped) = watch::channel(BTreeMap::new());
    let spool_task = tokio::spawn(crate::spool::task::run(
        spool,
        outbox.clone(),
        SpoolInputs {
            telemetry: telemetry_batches,
            responses,
            acks,
            drain,
            stop: stop_rx.clone(),
        },
        SpoolOutputs {
            report: spool_report,
            dropped: dropped_tx,
        },
    ));
    let rotation = tokio::spawn(rotation::reconnect_when_renewed(
        credentials.clone(),
        outbox.clone(),
    ));
    let mut driver = tokio::spawn(drive(
        cfg.clone(),
        eventloop,
        DriverLinks {
            outbox: outbox.clone(),
            acks: acks_tx,
            events: events_tx,
            connection,
            stop: stop_rx,
            credentials: credentials.clone(),
        },
    ));
    let settings = AgentSettings::new(&cfg, device_config.as_ref());
    registry_auth.send_replace(settings.registry_auth.clone());
    let token_cache = TokenCache::load(store.dir());
    let system_info = report::system_info(cfg.device_id.as_deref());
    let states_file = StatesFile::new(&spool_dir);
    let mut core = Core {
        codec: cfg.protocol.codec(),
        cfg,
        outbox,
        store,
        hub_device_config: device_config,
        settings,
        system_info,
        session: Session::new(),
        timer: ReportTimer::new(),
        report_wake: None,
        states: states_file.load(),
        states_on_disk: false,
        states_file,
        states_save_at: None,
        states_timer: ReportTimer::new(),
        states_wake: None,
        states_payload: None,
        pending: PendingCommands::new(),
        calls,
        rejection: None,
        seq: 0,
        connected: false,
        status: status.borrow_and_update().clone(),
        deployments,
        configurations: configurations.clone(),
        config_backlog: VecDeque::new(),
        tokens: Waiting::default(),
        token_cache,
        registry_auth,
        responses: responses_tx,
        drain: drain_tx,
        losses: Losses::default(),
        not_in_dialect: BTreeSet::new(),
    };
    core.losses
        .telemetry
        .clone_from(&dropped.borrow_and_update());
    let mut status_open = true;
    let mut outcomes_open = true;
    let mut sdk_open = true;
    let mut tokens_open = true;
    let mut failure = None;
    tokio::pin!(shutdown);
    loop {
        let wake = core.next_wake(Instant::now());
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let backlog = !core.config_backlog.is_empty();
        tokio::select! {
            _ = &mut shutdown => break,
            // A PATCH's configurations are all handed over before the next message is read.
            permit = configurations.reserve(), if backlog => match permit {
                Ok(permit) => {
                    if let Some(d) = core.config_backlog.pop_front() {
                        permit.send(d);
                    }
                }
                Err(_) => {
                    failure = Some(anyhow::anyhow!("the configuration delivery task stopped"));
                    break;
                }
            },
            ev = events.recv(), if !backlog => match ev {
                Some(ev) => core.on_mqtt(ev),
                None => {
                    failure = Some(anyhow::anyhow!("the MQTT event loop stopped unexpectedly"));
                    break;
                }
            },
            r = status.changed(), if status_open => match r {
                Ok(()) => {
                    core.status = status.borrow_and_update().clone();
                    core.drop_states_of_departed();
                }
                Err(_) => status_open = false,
            },
            e = sdk_events.recv(), if sdk_open => match e {
                Some(e) => core.on_sdk(e),
                None => sdk_open = false,
            },
            o = outcomes.recv(), if outcomes_open => match o {
                Some(o) => core.on_outcome(o),
                None => outcomes_open = false,
            },
            t = storage_tokens.recv(), if tokens_open => match t {
                Some(t) => core.on_token_request(t, Instant::now()),
                None => tokens_open = false,
            },
            r = dropped.changed() => match r {
                Ok(()) => core.losses.telemetry.clone_from(&dropped.borrow_and_update()),
                Err(_) => {
                    failure = Some(anyhow::anyhow!("the spooler stopped unexpectedly"));
                    break;
                }
            },
            _ = sleep => {}
        }
        core.tick(Instant::now());
    }
    // Clean exit: DISCONNECT when connected, then let the driver finish; the spooler syncs
    // and writes its cursor.
    if core.connected {
        let _ = core.outbox.client().try_disconnect();
    }
    let _ = stop_tx.send(true);
    rotation.abort();
    if tokio::time::timeout(DISCONNECT_GRACE, spool_task)
        .await
        .is_err()
    {
        warn!("the spooler did not stop within {DISCONNECT_GRACE:?}");
    }
    if tokio::time::timeout(DISCONNECT_GRACE, &mut driver)
        .await
        .is_err()
    {
        warn!("the MQTT DISCONNECT did not go out within {DISCONNECT_GRACE:?}");
        driver.abort();
    }
    failure.map_or(Ok(()), Err)
}

impl Core {
    fn next_wake(&self, now: Instant) -> Option<Instant> {
        // Storage token requests time out whether connected or not.
        let tokens = self.tokens.next_deadline();
        if !self.connected {
            return [tokens, self.states_save_at].into_iter().flatten().min();
        }
        [
            self.session.get_due(now),
            self.report_wake,
            self.states_wake,
            tokens,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_mqtt(&mut self, event: MqttEvent) {
        match event {
            MqttEvent::Connected => {
                self.connected = true;
                self.session.on_connected();
                self.timer.reset();
                self.states_timer.reset();
                // As EVP does: the hub's request ids of the old session mean nothing now.
                if !self.pending.is_empty() {
                    info!(
                        "{} direct commands still waiting are forgotten with the old session",
                        self.pending.len()
                    );
                    self.pending.clear();
                }
                for filter in [
                    topics::ATTRIBUTES,
                    topics::ATTRIBUTES_RESPONSE_FILTER,
                    topics::RPC_REQUEST_FILTER,
                    topics::RPC_RESPONSE_FILTER,
                ] {
                    if let Err(e) = self.outbox.client().try_subscribe(filter, QoS::AtMostOnce) {
                        warn!("subscribing to {filter}: {e}");
                    }
                }
            }
            MqttEvent::Disconnected => {
                self.connected = false;
                if !self.states.is_empty() {
                    // The last report may not have made it: kept until the next one goes.
                    self.states_save_at = Some(Instant::now());
                }
                self.drain.send_replace(false);
                self.tokens_offline(Instant::now());
                self.report_wake = None;
                self.states_wake = None;
            }
            MqttEvent::Publish { topic, payload } if payload.len() > MAX_INCOMING_PAYLOAD => {
                let count = self.losses.incoming.as_ref().map_or(0, |d| d.count) + 1;
                error!(
                    "dropped a {}-byte message on {topic}: larger than the {MAX_INCOMING_PAYLOAD} \
                     bytes hubd accepts ({count} dropped so far)",
                    payload.len(),
                );
                self.losses.incoming = Some(IncomingDropped {
                    count,
                    last_topic: topic,
                    last_bytes: payload.len() as u64,
                });
            }
            MqttEvent::Publish { topic, payload } => self.on_publish(&topic, &payload),
        }
    }

    fn on_publish(&mut self, topic: &str, payload: &[u8]) {
        if topic == topics::ATTRIBUTES {
            let changes = self.codec.decode_attribute_update(payload);
            if !changes.is_empty() && !self.session.answered() {
                info!("attribute update before the initial GET answer: held until it arrives");
            }
            for change in self.session.on_patch(changes, payload.len()) {
                self.apply(change);
            }
        } else if let Some(id) = topic.strip_prefix(topics::ATTRIBUTES_RESPONSE_PREFIX) {
            if id == topics::INITIAL_GET_ID.to_string() {
                let first = !self.session.answered();
                let changes = self.codec.decode_attribute_response(payload);
                if first {
                    info!("initial attribute GET answered ({} changes)", changes.len());
                }
                for change in self.session.on_get_answer(changes) {
                    self.apply(change);
                }
            } else {
                debug!("ignoring an attribute response with id {id}");
            }
        } else if let Some(id) = topic.strip_prefix(topics::RPC_REQUEST_PREFIX) {
            self.on_rpc_request(id, payload, Instant::now());
        } else if let Some(id) = topic.strip_prefix(topics::RPC_RESPONSE_PREFIX) {
            match self.codec.decode_storage_token_response(id, payload) {
                Some(answer) => self.on_token_answer(answer),
                // Our own direct-command answers, echoed by a plain broker.
                None => debug!("ignoring {topic} ({} bytes)", payload.len()),
            }
        } else {
            debug!("ignoring a message on {topic}");
        }
    }

    fn apply(&mut self, change: DesiredChange) {
        match change {
            DesiredChange::Deployment(d) => self.request_deployment(&d),
            DesiredChange::DeploymentRemoved => {
                info!("the hub removed the deployment: applying an empty one");
                self.request_deployment(&Deployment::default());
            }
            DesiredChange::RejectedDeployment {
                deployment_id,
                error,
            } => {
                self.seq += 1;
                warn!(
                    "refused deployment {}: {error}; the previous deployment keeps running",
                    deployment_id.as_deref().unwrap_or("(no id)")
                );
                self.rejection = Some(Rejection {
                    seq: self.seq,
                    deployment_id,
                    message: error.to_string(),
                });
            }
            DesiredChange::DeviceConfig(dc) => {
                if let Err(e) = self.store.save(&dc) {
                    warn!("device configuration applied but not stored: {e}");
                }
                self.settings = AgentSettings::new(&self.cfg, Some(&dc));
                self.registry_auth.send_if_modified(|held| {
                    replace_if_changed(held, &self.settings.registry_auth)
                });
                info!(
                    "device configuration from the hub: report intervals {}s..{}s",
                    self.settings.min_s(),
                    self.settings.max_s()
                );
                self.hub_device_config = Some(dc);
            }
            DesiredChange::Configuration {
                instance,
                topic,
                value,
            } => {
                let delivery = ConfigurationDelivery {
                    instance,
                    topic,
                    value,
                };
                if !self.config_backlog.is_empty() {
                    self.config_backlog.push_back(delivery);
                } else if let Err(e) = self.configurations.try_send(delivery) {
                    // Full: kept, in order, until there is room (never dropped). Closed: kept
                    // too, and the session loop stops at its next turn, finding it closed.
                    let (mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d)) =
                        e;
                    self.config_backlog.push_back(d);
                }
            }
            DesiredChange::ConfigurationDeleted { instance, topic } => {
                // SdkBroker1 has no deletion method; EVP does not tell the module either.
                info!(
                    "the hub deleted configuration/{instance}/{topic}: not forwarded (sdk-broker \
                     keeps the last value until a new one arrives)"
                );
            }
            DesiredChange::Invalid(e) => warn!("ignored part of an attribute update: {e}"),
            DesiredChange::NotInDialect(key) => {
                if self.not_in_dialect.insert(key.clone()) {
                    warn!(
                        "the hub sent {key}, which {} does not have: ignored (logged once)",
                        self.codec.protocol_name()
                    );
                }
            }
        }
    }

    fn request_deployment(&mut self, d: &Deployment) {
        self.seq += 1;
        info!(
            "deployment {} from the hub: handing it to reconcilerd",
            d.deployment_id.as_deref().unwrap_or("(no id)")
        );
        self.deployments.send_replace(Some(DeploymentRequest {
            seq: self.seq,
            deployment_id: d.deployment_id.clone(),
            json: d.to_json(),
        }));
    }

    fn on_outcome(&mut self, outcome: ApplyOutcome) {
        match outcome {
            ApplyOutcome::Accepted { seq } => {
                if self.rejection.as_ref().is_some_and(|r| r.seq < seq) {
                    self.rejection = None;
                }
            }
            ApplyOutcome::Refused {
                seq,
                deployment_id,
                message,
            } => {
                if self.rejection.as_ref().is_none_or(|r| r.seq < seq) {
                    self.rejection = Some(Rejection {
                        seq,
                        deployment_id,
                        message,
                    });
                }
            }
        }
    }

    /// Something from sdk-broker.
    fn on_sdk(&mut self, event: SdkEvent) {
        let now = Instant::now();
        match event {
            SdkEvent::State {
                instance,
                topic,
                value,
            } => {
                let key = (instance, topic);
                if self.states.get(&key) != Some(&value) {
                    self.states.insert(key, value);
                    self.states_payload = None;
                    if !self.connected {
                        self.states_save_at.get_or_insert(now + STATES_SAVE_DELAY);
                    }
                }
            }
            SdkEvent::RpcResponse {
                reqid,
                instance,
                status,
                response,
            } => {
                let Some(mqtt_id) = self.pending.take(reqid, now) else {
                    warn!(
                        "answer of {instance} to direct command {reqid} dropped: no request waits \
                         for it (answered already, or older than {:?})",
                        rpc::PENDING_EXPIRY
                    );
                    return;
                };
                let answer = DirectCommandResponse {
                    reqid,
                    status: RpcStatus::from_wire(status),
                    error_message: None,
                    response: (!response.is_empty()).then_some(response),
                };
                self.respond(&instance, &mqtt_id, &answer);
            }
            SdkEvent::CallFailed { reqid, message } => {
                let Some(mqtt_id) = self.pending.take(reqid, now) else {
                    return;
                };
                warn!("direct command {reqid} not delivered to sdk-broker: {message}");
                self.respond("", &mqtt_id, &rpc::error_response(reqid, message));
            }
        }
    }

    /// Forgets the states of instances that are not in the deployment status any more.
    fn drop_states_of_departed(&mut self) {
        let Some(status) = &self.status else {
            return;
        };
        let before = self.states.len();
        self.states
            .retain(|(instance, _), _| status.instances.contains_key(instance));
        if self.states.len() != before {
            let left: BTreeSet<&String> = self.states.keys().map(|(i, _)| i).collect();
            debug!("states of departed instances dropped; states kept for {left:?}");
            self.states_payload = None;
        }
    }
}

/// Replaces `held` with `new` when they differ; whether it did.
fn replace_if_changed(held: &mut RegistryAuth, new: &RegistryAuth) -> bool {
    if held == new {
        return false;
    }
    held.clone_from(new);
    true
}
