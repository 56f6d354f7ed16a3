//! The MQTT side of hubd: the connection with its reconnect backoff, the EVP2-TB session,
//! decoding the hub's changes and sending status reports. It talks to the rest of the device
//! only through [`Links`], so it runs (and is tested) without D-Bus.

use std::future::Future;
use std::time::{Duration, Instant};

use evp_schemas::codec::DeviceConfig;
use evp_schemas::evp2::{Evp2Codec, topics};
use evp_schemas::{Deployment, DeploymentStatus, DesiredChange, HubCodec};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, Transport};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::HubConfig;
use crate::device_config::{AgentSettings, DeviceConfigStore};
use crate::report::{self, Rejection};
use crate::session::Session;
use crate::timing::{BACKOFF_RESET_AFTER, Backoff, ReportDecision, ReportTimer};
use crate::tls::TlsMaterial;

/// MQTT keep-alive (EVP: 400 s).
const KEEP_ALIVE: Duration = Duration::from_secs(400);
/// Largest MQTT packet hubd sends: EVP's 128 KiB send buffer, which hubs are sized for.
pub const MAX_OUTGOING_PACKET: usize = 131_072;
/// Largest MQTT packet hubd accepts. Larger than EVP's 128 KiB receive buffer so a big
/// manifest, or the device's own report echoed by a plain broker, never drops the connection.
const MAX_INCOMING_PACKET: usize = 1 << 20;
/// Bytes of an MQTT PUBLISH besides topic and payload: fixed header (up to 5), topic length (2)
/// and packet id (2), rounded up.
const PUBLISH_OVERHEAD: usize = 16;
/// Requests waiting for rumqttc's event loop. hubd publishes at most a report and a GET at a
/// time, so a full channel means the connection is stuck; requests are then dropped, never
/// waited for.
const REQUEST_CHANNEL: usize = 64;
/// MQTT events waiting for the session loop.
const EVENT_CHANNEL: usize = 256;
/// Retry delay of a report that could not be queued for sending.
const REPORT_RETRY: Duration = Duration::from_secs(1);
/// How long a clean shutdown waits for the DISCONNECT to go out.
const DISCONNECT_GRACE: Duration = Duration::from_secs(3);

/// The `Hub1.Connection` states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// The MQTT session is up.
    Connected,
    /// A connection attempt is under way.
    Connecting,
    /// Not connected; waiting before the next attempt, or stopped.
    Disconnected,
}

impl ConnectionState {
    /// The property value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Connected => "connected",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Disconnected => "disconnected",
        }
    }
}

/// The latest deployment for reconcilerd; newer ones replace older ones not yet applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRequest {
    /// Order among the hub's deployment changes.
    pub seq: u64,
    /// Its id, for logs.
    pub deployment_id: Option<String>,
    /// Canonical JSON for `Reconciler1.ApplyDeployment`.
    pub json: String,
}

/// What reconcilerd answered to a [`DeploymentRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Accepted (it will be reconciled).
    Accepted {
        /// The request's `seq`.
        seq: u64,
    },
    /// Refused as invalid (`org.evp.Error.InvalidManifest`); nothing changed.
    Refused {
        /// The request's `seq`.
        seq: u64,
        /// Its id.
        deployment_id: Option<String>,
        /// reconcilerd's message.
        message: String,
    },
}

/// A configuration value for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigurationDelivery {
    /// The instance.
    pub instance: String,
    /// The topic.
    pub topic: String,
    /// The value.
    pub value: Vec<u8>,
}

/// The session's channels to the rest of the device.
#[derive(Debug)]
pub struct Links {
    /// Deployments for reconcilerd.
    pub deployments: watch::Sender<Option<DeploymentRequest>>,
    /// reconcilerd's answers.
    pub outcomes: mpsc::Receiver<ApplyOutcome>,
    /// Configurations for sdk-broker.
    pub configurations: mpsc::Sender<ConfigurationDelivery>,
    /// reconcilerd's deployment status; `None` before it ever answered.
    pub status: watch::Receiver<Option<DeploymentStatus>>,
    /// The connection state, for `Hub1.Connection`.
    pub connection: watch::Sender<ConnectionState>,
}

/// The MQTT options of the configuration, and the client id they use.
pub fn mqtt_options(cfg: &HubConfig, tls: Option<&TlsMaterial>) -> MqttOptions {
    // The TLS client certificate's CN wins, then the configured id, else empty (EVP's order).
    let client_id = tls
        .and_then(|t| t.client_cn.clone())
        .or_else(|| cfg.client_id.clone())
        .unwrap_or_default();
    let mut o = MqttOptions::new(client_id, cfg.mqtt_host.clone(), cfg.mqtt_port);
    o.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
        .set_request_channel_capacity(REQUEST_CHANNEL);
    if let Some(user) = &cfg.username {
        o.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    if let Some(t) = tls {
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(t.config.clone()),
        ));
    }
    o
}

#[derive(Debug)]
enum MqttEvent {
    Connected,
    Disconnected,
    Publish { topic: String, payload: Vec<u8> },
}

/// Drives rumqttc's event loop: reconnects with backoff, forwards what the session needs, and
/// stops after the DISCONNECT went out (or at once when not connected and `stop` is set).
async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::Sender<MqttEvent>,
    connection: watch::Sender<ConnectionState>,
    mut stop: watch::Receiver<bool>,
) {
    let broker = format!(
        "{}:{}",
        eventloop.mqtt_options.broker_address().0,
        eventloop.mqtt_options.broker_address().1
    );
    let mut backoff = Backoff::new();
    let mut up_since: Option<Instant> = None;
    loop {
        let polled = if up_since.is_some() {
            eventloop.poll().await
        } else {
            connection.send_replace(ConnectionState::Connecting);
            tokio::select! {
                r = eventloop.poll() => r,
                _ = stop.wait_for(|s| *s) => break,
            }
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!("connected to the MQTT broker {broker}");
                up_since = Some(Instant::now());
                connection.send_replace(ConnectionState::Connected);
                if events.send(MqttEvent::Connected).await.is_err() {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let event = MqttEvent::Publish {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                };
                if events.send(event).await.is_err() {
                    break;
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                connection.send_replace(ConnectionState::Disconnected);
                if *stop.borrow() {
                    break;
                }
                if let Some(since) = up_since.take() {
                    if since.elapsed() >= BACKOFF_RESET_AFTER {
                        backoff.reset();
                    }
                    if events.send(MqttEvent::Disconnected).await.is_err() {
                        break;
                    }
                }
                let delay = backoff.next_delay(rand::random::<f64>());
                warn!("MQTT connection to {broker}: {e}; next attempt in {delay:.1?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        }
    }
    connection.send_replace(ConnectionState::Disconnected);
}

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
    codec: Evp2Codec,
    client: AsyncClient,
    store: DeviceConfigStore,
    hub_device_config: Option<DeviceConfig>,
    settings: AgentSettings,
    system_info: evp_schemas::codec::SystemInfo,
    session: Session,
    timer: ReportTimer,
    report_wake: Option<Instant>,
    rejection: Option<Rejection>,
    seq: u64,
    connected: bool,
    status: Option<DeploymentStatus>,
    deployments: watch::Sender<Option<DeploymentRequest>>,
    configurations: mpsc::Sender<ConfigurationDelivery>,
}

/// Runs the MQTT session until `shutdown` completes, then disconnects cleanly.
/// `device_config` is the one stored at the last run, if any.
pub async fn run(
    cfg: HubConfig,
    options: MqttOptions,
    store: DeviceConfigStore,
    device_config: Option<DeviceConfig>,
    links: Links,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Links {
        deployments,
        mut outcomes,
        configurations,
        mut status,
        connection,
    } = links;
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
    let (events_tx, mut events) = mpsc::channel(EVENT_CHANNEL);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut driver = tokio::spawn(drive(eventloop, events_tx, connection, stop_rx));
    let settings = AgentSettings::new(&cfg, device_config.as_ref());
    let mut core = Core {
        cfg,
        codec: Evp2Codec,
        client,
        store,
        hub_device_config: device_config,
        settings,
        system_info: report::system_info(),
        session: Session::new(),
        timer: ReportTimer::new(),
        report_wake: None,
        rejection: None,
        seq: 0,
        connected: false,
        status: status.borrow_and_update().clone(),
        deployments,
        configurations,
    };
    let mut status_open = true;
    let mut outcomes_open = true;
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
        tokio::select! {
            _ = &mut shutdown => break,
            ev = events.recv() => match ev {
                Some(ev) => core.on_mqtt(ev),
                None => {
                    failure = Some(anyhow::anyhow!("the MQTT event loop stopped unexpectedly"));
                    break;
                }
            },
            r = status.changed(), if status_open => match r {
                Ok(()) => core.status = status.borrow_and_update().clone(),
                Err(_) => status_open = false,
            },
            o = outcomes.recv(), if outcomes_open => match o {
                Some(o) => core.on_outcome(o),
                None => outcomes_open = false,
            },
            _ = sleep => {}
        }
        core.tick(Instant::now());
    }
    // Clean exit: DISCONNECT when connected, then let the driver finish.
    if core.connected {
        let _ = core.client.try_disconnect();
    }
    let _ = stop_tx.send(true);
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
        if !self.connected {
            return None;
        }
        match (self.session.get_due(now), self.report_wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_mqtt(&mut self, event: MqttEvent) {
        match event {
            MqttEvent::Connected => {
                self.connected = true;
                self.session.on_connected();
                self.timer.reset();
                for filter in [
                    topics::ATTRIBUTES,
                    topics::ATTRIBUTES_RESPONSE_FILTER,
                    topics::RPC_REQUEST_FILTER,
                    topics::RPC_RESPONSE_FILTER,
                ] {
                    if let Err(e) = self.client.try_subscribe(filter, QoS::AtMostOnce) {
                        warn!("subscribing to {filter}: {e}");
                    }
                }
            }
            MqttEvent::Disconnected => {
                self.connected = false;
                self.report_wake = None;
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
        } else if topic.starts_with("v1/devices/me/rpc/") {
            // Direct commands and storage tokens are not handled by this build; our own
            // requests come back here on a plain broker and are never answered.
            debug!(
                "ignoring {topic} ({} bytes): RPC is not handled yet",
                payload.len()
            );
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
                if let Err(e) = self.configurations.try_send(delivery) {
                    warn!("configuration dropped, the delivery queue is full or closed: {e}");
                }
            }
            DesiredChange::ConfigurationDeleted { instance, topic } => {
                warn!(
                    "the hub deleted configuration/{instance}/{topic}; deleting configurations is not supported yet"
                );
            }
            DesiredChange::Invalid(e) => warn!("ignored part of an attribute update: {e}"),
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

    /// Sends what is due: the initial GET, the status report.
    fn tick(&mut self, now: Instant) {
        if !self.connected {
            return;
        }
        if self.session.get_due(now).is_some_and(|at| at <= now) {
            let topic = format!(
                "{}{}",
                topics::ATTRIBUTES_REQUEST_PREFIX,
                topics::INITIAL_GET_ID
            );
            if self.publish(&topic, QoS::AtMostOnce, b"{}".to_vec()) == Published::Queued {
                debug!("initial attribute GET sent");
            }
            // Sent or not, it is tried again after the resend period.
            self.session.get_sent(now);
        }
        let report = report::build(
            &self.system_info,
            &self.settings,
            self.status.as_ref(),
            self.rejection.as_ref(),
        );
        let payload = self.codec.encode_status_report(&report).to_string();
        self.report_wake = match self.timer.decide(now, &payload, self.settings.intervals) {
            ReportDecision::SendNow => {
                let level = qos(self.cfg.status_qos);
                match self.publish(topics::ATTRIBUTES, level, payload.clone().into_bytes()) {
                    Published::NotQueued => Some(now + REPORT_RETRY),
                    // Too big is recorded as sent: trying again would only fail again, until
                    // the report changes.
                    Published::Queued | Published::TooBig => {
                        self.timer.sent(now, payload);
                        self.settings.intervals.max.map(|max| now + max)
                    }
                }
            }
            ReportDecision::WaitUntil(at) => Some(at),
            ReportDecision::Idle => None,
        };
    }

    /// Queues a publish without waiting.
    fn publish(&self, topic: &str, level: QoS, payload: Vec<u8>) -> Published {
        let size = topic.len() + payload.len() + PUBLISH_OVERHEAD;
        if size > MAX_OUTGOING_PACKET {
            error!(
                "not publishing {size} bytes on {topic}: larger than the {MAX_OUTGOING_PACKET}-byte MQTT limit"
            );
            return Published::TooBig;
        }
        match self.client.try_publish(topic, level, false, payload) {
            Ok(()) => Published::Queued,
            Err(e) => {
                warn!("publish on {topic} not queued: {e}");
                Published::NotQueued
            }
        }
    }
}

/// What became of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Published {
    /// Handed to the MQTT event loop.
    Queued,
    /// Larger than the MQTT limit; dropped.
    TooBig,
    /// The request channel is full or closed.
    NotQueued,
}
