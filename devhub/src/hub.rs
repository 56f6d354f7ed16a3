//! The hub's side of EVP2-TB (or EVP1, translated in [`dialect`]) over MQTT: shared attributes, answers to the device's attribute
//! requests, PATCHes, and the reports the device sends (docs/hub-protocol.md §3-§13).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use evp_schemas::Protocol;
use evp_schemas::evp2::topics::{ATTRIBUTES, RPC_REQUEST_PREFIX};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

mod connection;
pub mod dialect;
mod provision;
mod storage;
use connection::{publish_tracked, run_events, run_outbox};
pub use provision::{ProvisionProfile, ProvisionSeen};
pub use storage::StorageAnswer;

/// The device's attribute requests, any id (the agent's initial GET uses 10000).
const ATTRIBUTES_REQUEST_FILTER: &str = "v1/devices/me/attributes/request/+";

/// The default MQTT port, used when a broker URL names none.
const DEFAULT_MQTT_PORT: u16 = 1883;
/// Room in the client's request queue: a burst of answers and re-published reports.
const REQUEST_QUEUE: usize = 256;
/// Reports kept for a subscriber that lags behind before it misses some.
const REPORT_QUEUE: usize = 1024;
/// Keep-alive towards the broker; short, so a dead broker is noticed in a dev loop.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Pause between two connection attempts, so a missing broker does not spin the CPU.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// How long a publish may wait for the broker's PUBACK.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`HubSide::close`] waits for the DISCONNECT to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest MQTT packet sent or received; see [`crate::broker::MAX_PACKET_BYTES`].
const MAX_PACKET_BYTES: usize = crate::broker::MAX_PACKET_BYTES;

/// Why the hub side failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The broker URL is not `mqtt://HOST[:PORT]`.
    #[error("bad broker URL {url:?}: {reason} (expected mqtt://HOST:PORT)")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The broker could not be reached in time.
    #[error("cannot connect to the MQTT broker at {url} within {timeout:?}: {reason}")]
    Connect {
        /// The broker URL.
        url: String,
        /// How long it was tried.
        timeout: Duration,
        /// The last connection error.
        reason: String,
    },
    /// The connection's task ended; the hub side was closed.
    #[error("the MQTT connection is closed")]
    Closed,
    /// The broker did not acknowledge a publish in time.
    #[error("the broker did not acknowledge the publish on {topic} within {timeout:?}")]
    PublishTimeout {
        /// The topic of the publish.
        topic: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// A direct command got no answer in time.
    #[error("no answer to direct command {mqtt_id} within {timeout:?}")]
    CommandTimeout {
        /// The request topic's id.
        mqtt_id: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// No status report satisfied the condition in time.
    #[error("{}", status_timeout_message(*.timeout, *.received, .last.as_deref()))]
    StatusTimeout {
        /// How long it waited.
        timeout: Duration,
        /// Status reports received in that time.
        received: u64,
        /// The last status report seen, if any.
        last: Option<Box<Value>>,
    },
}

fn status_timeout_message(timeout: Duration, received: u64, last: Option<&Value>) -> String {
    match last {
        None => format!("no status report from the device within {timeout:?}"),
        Some(last) => format!(
            "no status report satisfied the condition within {timeout:?} ({received} received); last report: {last}"
        ),
    }
}

/// What the device sent, as [`HubSide::subscribe`] hands it out.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceReport {
    /// A status report (`systemInfo`, `deploymentStatus`, `state/$agent/...`).
    Status(Value),
    /// An instance-state report (`state/<instance>/<topic>` keys).
    InstanceState(Value),
    /// A telemetry message (`<instance>/<key>` keys).
    Telemetry(Value),
    /// A storage-token request (the object under `storagetoken-request`), answered as
    /// [`HubSide::set_storage`] says (not at all by default).
    StorageTokenRequest(Value),
    /// A device provisioning request, answered as [`HubSide::set_provisioning`] says (not at
    /// all by default).
    ProvisionRequest(ProvisionSeen),
    /// An answer to a direct command, on `v1/devices/me/rpc/response/<mqtt_id>`.
    CommandResponse {
        /// The id of the request topic it answers.
        mqtt_id: String,
        /// The payload (`{"direct-command-response": {...}}` in EVP2).
        payload: Value,
    },
}

/// What a JSON object on `v1/devices/me/attributes` is: the topic carries both the device's
/// reports and the hub's own PATCHes (from this or another devhub process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttributesKind {
    /// The device's status report.
    Status,
    /// The device's instance-state report.
    InstanceState,
    /// Anything else: a hub's PATCH.
    HubPatch,
}

/// The key prefix of the agent's own states in a status report.
const AGENT_STATE_PREFIX: &str = "state/$agent/";

/// Classifies an object published on `v1/devices/me/attributes`.
pub fn classify_attributes(object: &Map<String, Value>) -> AttributesKind {
    if object.contains_key("systemInfo")
        || object.contains_key("deploymentStatus")
        || object.keys().any(|k| k.starts_with(AGENT_STATE_PREFIX))
    {
        AttributesKind::Status
    } else if object.keys().any(|k| k.starts_with("state/")) {
        AttributesKind::InstanceState
    } else {
        AttributesKind::HubPatch
    }
}

/// Whether `key` is a shared attribute the agent understands (docs/hub-protocol.md §5).
pub fn is_agent_shared_key(key: &str) -> bool {
    key == "deployment" || key == "desiredDeviceConfig" || key.starts_with("configuration/")
}

/// Merges a PATCH into the store of shared attributes: the keys the agent understands are
/// set (a `null` deployment is kept, so a later request also removes it), `deleted` removes
/// the keys it lists, and everything else is left out. Returns whether the store changed.
pub fn merge_shared(store: &mut Map<String, Value>, patch: &Map<String, Value>) -> bool {
    let mut changed = false;
    for (key, value) in patch {
        if key == "deleted" {
            for gone in value.as_array().into_iter().flatten() {
                if let Some(gone) = gone.as_str() {
                    changed |= store.remove(gone).is_some();
                }
            }
        } else if is_agent_shared_key(key) && store.get(key) != Some(value) {
            store.insert(key.clone(), value.clone());
            changed = true;
        }
    }
    changed
}

/// Splits `mqtt://HOST[:PORT]` (also `tcp://`) into host and port; the port defaults to 1883.
pub fn parse_broker_url(url: &str) -> Result<(String, u16), HubError> {
    let bad = |reason: &str| HubError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| bad("only mqtt:// (plain TCP) is supported"))?;
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('@') {
        return Err(bad("no path or credentials allowed"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in IPv6 address"))?;
        (host, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None => DEFAULT_MQTT_PORT,
        Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
    };
    Ok((host.to_owned(), port))
}

/// How a [`HubSide`] behaves.
#[derive(Debug, Clone)]
pub struct HubSideOptions {
    /// Answer the device's attribute requests from the store. Only one hub side on a broker
    /// should (the one of `evp-devhub up`); a short-lived CLI publisher should not.
    pub answer_requests: bool,
    /// Re-publish each status report, retained, on this topic (`evp-devhub up` uses
    /// [`crate::DEVHUB_STATUS_TOPIC`]).
    pub republish_status: Option<String>,
    /// The MQTT client id; a unique `evp-devhub-<pid>-<n>` when `None`.
    pub client_id: Option<String>,
    /// How long [`HubSide::connect_with`] tries to reach the broker.
    pub connect_timeout: Duration,
    /// The device's dialect: what is handed over in EVP2's shapes is translated on the wire
    /// (see [`dialect`]).
    pub protocol: Protocol,
}

impl Default for HubSideOptions {
    fn default() -> Self {
        HubSideOptions {
            answer_requests: true,
            republish_status: None,
            client_id: None,
            connect_timeout: Duration::from_secs(10),
            protocol: Protocol::Evp2,
        }
    }
}

impl HubSideOptions {
    /// Options for a short-lived publisher or watcher: it answers no attribute requests.
    pub fn passive() -> Self {
        HubSideOptions {
            answer_requests: false,
            ..Default::default()
        }
    }
}

/// A unique client id, so several devhub processes share a broker without kicking each other.
fn unique_client_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "evp-devhub-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A publish waiting for the broker's PUBACK.
type AckWaiter = oneshot::Sender<()>;

/// What the connection's task and the handle share.
#[derive(Debug)]
struct Shared {
    options: HubSideOptions,
    attributes: Mutex<Map<String, Value>>,
    latest_status: Mutex<Option<Value>>,
    instance_states: Mutex<Map<String, Value>>,
    status_count: AtomicU64,
    reports: broadcast::Sender<DeviceReport>,
    connected: watch::Sender<bool>,
    last_error: Mutex<String>,
    closing: AtomicBool,
    /// How storage-token requests are answered; `None`: they are not.
    storage: Mutex<Option<StorageAnswer>>,
    /// The provisioning key and secret accepted; `None`: requests are not answered.
    provisioning: Mutex<Option<ProvisionProfile>>,
    /// Tokens granted by provisioning: device name → token.
    provisioned: Mutex<std::collections::BTreeMap<String, String>>,
    /// Every provisioning request answered, in order.
    provision_requests: Mutex<Vec<ProvisionSeen>>,
    /// Waiters of publishes requested but not yet sent, in request order.
    unsent: Mutex<VecDeque<AckWaiter>>,
    /// Waiters of publishes sent, by packet id.
    unacked: Mutex<HashMap<u16, AckWaiter>>,
    /// Held while a waiter is queued and its publish requested, so that waiters and packets
    /// match one to one, whoever publishes (the handle or the outbox task).
    publish_order: tokio::sync::Mutex<()>,
}

/// Locks a mutex, also after a panic elsewhere: the data is plain values, never left half
/// updated by this module.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The hub's side of EVP2-TB, connected to a broker.
#[derive(Debug)]
pub struct HubSide {
    url: String,
    client: AsyncClient,
    shared: Arc<Shared>,
    events: Option<JoinHandle<()>>,
    outbox: Option<JoinHandle<()>>,
}

/// A message the connection's task wants published (answers, re-published reports).
struct OutboxItem {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

impl HubSide {
    /// Connects to the broker at `url` (`mqtt://HOST:PORT`) with the default options: it
    /// answers attribute requests and re-publishes nothing.
    pub async fn connect(url: &str) -> Result<HubSide, HubError> {
        Self::connect_with(url, HubSideOptions::default()).await
    }

    /// Connects to the broker at `url`, subscribes, and returns once the subscriptions are
    /// acknowledged.
    pub async fn connect_with(url: &str, options: HubSideOptions) -> Result<HubSide, HubError> {
        let (host, port) = parse_broker_url(url)?;
        let client_id = options.client_id.clone().unwrap_or_else(unique_client_id);
        let mut mqtt = MqttOptions::new(client_id, host, port);
        mqtt.set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        let (client, eventloop) = AsyncClient::new(mqtt, REQUEST_QUEUE);
        let (reports, _) = broadcast::channel(REPORT_QUEUE);
        let (connected, mut connected_rx) = watch::channel(false);
        let timeout = options.connect_timeout;
        let shared = Arc::new(Shared {
            options,
            attributes: Mutex::default(),
            latest_status: Mutex::default(),
            instance_states: Mutex::default(),
            status_count: AtomicU64::new(0),
            reports,
            connected,
            last_error: Mutex::new("no answer yet".into()),
            closing: AtomicBool::new(false),
            storage: Mutex::default(),
            provisioning: Mutex::default(),
            provisioned: Mutex::default(),
            provision_requests: Mutex::default(),
            unsent: Mutex::default(),
            unacked: Mutex::default(),
            publish_order: tokio::sync::Mutex::new(()),
        });
        let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
        let events = tokio::spawn(run_events(
            eventloop,
            client.clone(),
            shared.clone(),
            outbox_tx,
        ));
        let mut hub = HubSide {
            url: url.to_owned(),
            client,
            shared,
            events: Some(events),
            outbox: None,
        };
        let waited = tokio::time::timeout(timeout, connected_rx.wait_for(|c| *c)).await;
        if !matches!(waited, Ok(Ok(_))) {
            let reason = lock(&hub.shared.last_error).clone();
            return Err(HubError::Connect {
                url: url.to_owned(),
                timeout,
                reason,
            });
        }
        hub.outbox = Some(tokio::spawn(run_outbox(
            outbox_rx,
            hub.client.clone(),
            hub.shared.clone(),
        )));
        Ok(hub)
    }

    /// The broker URL this hub side is connected to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the MQTT session is up now (it reconnects by itself after a loss).
    pub fn is_connected(&self) -> bool {
        *self.shared.connected.borrow()
    }

    /// The shared attributes the hub holds for the device, as the next attribute request
    /// would get them.
    pub fn attributes(&self) -> Map<String, Value> {
        lock(&self.shared.attributes).clone()
    }

    /// The last status report received.
    pub fn latest_status(&self) -> Option<Value> {
        lock(&self.shared.latest_status).clone()
    }

    /// How many status reports were received.
    pub fn status_count(&self) -> u64 {
        self.shared.status_count.load(Ordering::SeqCst)
    }

    /// Every instance state reported so far, the latest value of each
    /// `state/<instance>/<topic>` key.
    pub fn instance_states(&self) -> Map<String, Value> {
        lock(&self.shared.instance_states).clone()
    }

    /// Sends a direct command as an EVP2 hub does (`evp-c2d` with a `direct-command-request`),
    /// or an EVP1 hub (`ModuleMethodCall` on topic id `reqid`), and returns the device's
    /// `direct-command-response` object (EVP1's answer in that shape). `params` is JSON text,
    /// as EVP2 carries it.
    pub async fn call(
        &self,
        instance: &str,
        method: &str,
        params: &str,
        reqid: u64,
        timeout: Duration,
    ) -> Result<Value, HubError> {
        static NEXT_MQTT_ID: AtomicU64 = AtomicU64::new(1);
        let next = NEXT_MQTT_ID.fetch_add(1, Ordering::Relaxed).to_string();
        let mut reports = self.subscribe();
        let (mqtt_id, request) = dialect::command_to_wire(
            self.shared.options.protocol,
            next,
            reqid,
            instance,
            method,
            params,
        );
        self.publish_raw(
            &format!("{RPC_REQUEST_PREFIX}{mqtt_id}"),
            request.to_string().into_bytes(),
        )
        .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, reports.recv()).await {
                Err(_) | Ok(Err(broadcast::error::RecvError::Closed)) => {
                    return Err(HubError::CommandTimeout { mqtt_id, timeout });
                }
                Ok(Ok(DeviceReport::CommandResponse {
                    mqtt_id: id,
                    payload,
                })) if id == mqtt_id => {
                    return Ok(payload
                        .get("direct-command-response")
                        .cloned()
                        .unwrap_or(payload));
                }
                Ok(_) => {}
            }
        }
    }

    /// Answers the device's storage-token requests from now on as `answer` says (`None`:
    /// leaves them unanswered, so the device's wait times out).
    pub fn set_storage(&self, answer: Option<StorageAnswer>) {
        *lock(&self.shared.storage) = answer;
    }

    /// Answers device provisioning requests: a token for `profile`'s key and secret, a
    /// `FAILURE` for any other; `None` (the default) answers none. Only a hub side that
    /// answers requests ([`HubSideOptions::answer_requests`]) hears them.
    pub fn set_provisioning(&self, profile: Option<ProvisionProfile>) {
        *lock(&self.shared.provisioning) = profile;
    }

    /// The tokens granted by provisioning so far: device name → token.
    pub fn provisioned(&self) -> std::collections::BTreeMap<String, String> {
        lock(&self.shared.provisioned).clone()
    }

    /// Every provisioning request answered so far, in order.
    pub fn provision_requests(&self) -> Vec<ProvisionSeen> {
        lock(&self.shared.provision_requests).clone()
    }

    /// Every report the device sends from now on, as it comes.
    pub fn subscribe(&self) -> broadcast::Receiver<DeviceReport> {
        self.shared.reports.subscribe()
    }

    /// Waits until a status report satisfies `condition`, and returns it. The latest report
    /// already received counts: if it satisfies the condition, it is returned at once.
    pub async fn wait_for_status<F>(
        &self,
        condition: F,
        timeout: Duration,
    ) -> Result<Value, HubError>
    where
        F: Fn(&Value) -> bool,
    {
        // Subscribing before looking at the latest report leaves no gap between the two.
        let mut reports = self.subscribe();
        let start_count = self.status_count();
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || HubError::StatusTimeout {
            timeout,
            received: self.status_count().saturating_sub(start_count),
            last: self.latest_status().map(Box::new),
        };
        if let Some(latest) = self.latest_status()
            && condition(&latest)
        {
            return Ok(latest);
        }
        loop {
            match tokio::time::timeout_at(deadline, reports.recv()).await {
                Err(_) => return Err(timed_out()),
                Ok(Ok(DeviceReport::Status(status))) => {
                    if condition(&status) {
                        return Ok(status);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    // Reports were missed; the latest one still tells the current state.
                    if let Some(latest) = self.latest_status()
                        && condition(&latest)
                    {
                        return Ok(latest);
                    }
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return Err(HubError::Closed),
            }
        }
    }

    /// Publishes a PATCH of shared attributes (in EVP2's shapes, translated for an EVP1 device),
    /// merges it into the store, and returns once the broker acknowledged it.
    pub async fn patch(&self, attributes: Map<String, Value>) -> Result<(), HubError> {
        let attributes = dialect::patch_to_wire(self.shared.options.protocol, attributes);
        merge_shared(&mut lock(&self.shared.attributes), &attributes);
        let payload = Value::Object(attributes).to_string();
        self.publish(ATTRIBUTES, payload.into_bytes(), false).await
    }

    /// Deploys `deployment` (the manifest itself, docs/hub-protocol.md §6): PATCH
    /// `{"deployment": <deployment>}`. `Value::Null` removes the deployment.
    pub async fn deploy(&self, deployment: &Value) -> Result<(), HubError> {
        self.patch(Map::from_iter([("deployment".into(), deployment.clone())]))
            .await
    }

    /// Sets a configuration value of an instance: PATCH
    /// `{"configuration/<instance>/<topic>": "<value>"}`.
    pub async fn set_configuration(
        &self,
        instance: &str,
        topic: &str,
        value: &str,
    ) -> Result<(), HubError> {
        self.patch(Map::from_iter([(
            format!("configuration/{instance}/{topic}"),
            Value::String(value.to_owned()),
        )]))
        .await
    }

    /// Deletes a configuration value of an instance, as ThingsBoard notifies it:
    /// PATCH `{"deleted": ["configuration/<instance>/<topic>"]}`.
    pub async fn delete_configuration(&self, instance: &str, topic: &str) -> Result<(), HubError> {
        self.patch(Map::from_iter([(
            "deleted".into(),
            json!([format!("configuration/{instance}/{topic}")]),
        )]))
        .await
    }

    /// Sets the agent's settings. `config` is the inner object (the four
    /// `configuration/$agent/...` keys); it is sent double-wrapped, as EVP2 expects
    /// (docs/hub-protocol.md §12).
    pub async fn set_device_config(&self, config: &Value) -> Result<(), HubError> {
        self.patch(Map::from_iter([(
            "desiredDeviceConfig".into(),
            json!({ "desiredDeviceConfig": config }),
        )]))
        .await
    }

    /// Publishes arbitrary bytes (malformed ones too) on any topic, not retained, and
    /// returns once the broker acknowledged them. The store is not touched directly; a
    /// well-formed PATCH on the attributes topic is merged when the broker echoes it.
    pub async fn publish_raw(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), HubError> {
        self.publish(topic, payload.into(), false).await
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), HubError> {
        let acked = publish_tracked(&self.client, &self.shared, topic, payload, retain).await?;
        match tokio::time::timeout(PUBLISH_TIMEOUT, acked).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(HubError::Closed),
            Err(_) => Err(HubError::PublishTimeout {
                topic: topic.to_owned(),
                timeout: PUBLISH_TIMEOUT,
            }),
        }
    }

    /// Disconnects cleanly: what was published before goes out first.
    pub async fn close(mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        if let Some(outbox) = self.outbox.take() {
            outbox.abort();
        }
        if self.client.disconnect().await.is_ok()
            && let Some(events) = self.events.take()
        {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, events).await;
        }
    }
}

impl Drop for HubSide {
    fn drop(&mut self) {
        if let Some(t) = self.events.take() {
            t.abort();
        }
        if let Some(t) = self.outbox.take() {
            t.abort();
        }
    }
}

/// Reads the latest status report without staying connected: the one `evp-devhub up`
/// re-published, retained, on [`crate::DEVHUB_STATUS_TOPIC`], or else the first status
/// report the device sends within `timeout`. `Ok(None)` when neither came.
pub async fn fetch_status(url: &str, timeout: Duration) -> Result<Option<Value>, HubError> {
    let (host, port) = parse_broker_url(url)?;
    let mut mqtt = MqttOptions::new(unique_client_id(), host, port);
    mqtt.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    let (client, mut eventloop) = AsyncClient::new(mqtt, REQUEST_QUEUE);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = "no answer yet".to_owned();
    let mut connected = false;
    let found = loop {
        let event = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => break None,
            Ok(event) => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                let subs = [crate::DEVHUB_STATUS_TOPIC, ATTRIBUTES]
                    .map(|f| rumqttc::SubscribeFilter::new(f.to_owned(), QoS::AtLeastOnce));
                // The queue is empty right after connecting, so this does not wait.
                if client.try_subscribe_many(subs).is_err() {
                    return Err(HubError::Closed);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(&p.payload)
                    && classify_attributes(&object) == AttributesKind::Status
                {
                    break Some(Value::Object(object));
                }
            }
            Ok(_) => {}
            Err(e) => {
                last_error = e.to_string();
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        }
    };
    if !connected {
        return Err(HubError::Connect {
            url: url.to_owned(),
            timeout,
            reason: last_error,
        });
    }
    let _ = client.try_disconnect();
    // Let the DISCONNECT go out; the broker drops the session either way.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn reports_and_patches_are_told_apart() {
        let status = obj(json!({"systemInfo": {}, "deploymentStatus": {}}));
        assert_eq!(classify_attributes(&status), AttributesKind::Status);
        let status_only_agent = obj(json!({"state/$agent/report-status-interval-min": 3}));
        assert_eq!(
            classify_attributes(&status_only_agent),
            AttributesKind::Status
        );
        let deployment_only = obj(json!({"deploymentStatus": {"instances": {}}}));
        assert_eq!(
            classify_attributes(&deployment_only),
            AttributesKind::Status
        );
        let states = obj(json!({"state/sensor-1/status": "x"}));
        assert_eq!(classify_attributes(&states), AttributesKind::InstanceState);
        let patch = obj(json!({"deployment": {}, "configuration/a/b": "c"}));
        assert_eq!(classify_attributes(&patch), AttributesKind::HubPatch);
        assert_eq!(classify_attributes(&Map::new()), AttributesKind::HubPatch);
    }

    #[test]
    fn only_the_agents_shared_keys_are_merged() {
        let mut store = Map::new();
        let patch = obj(json!({
            "deployment": {"deploymentId": "d1"},
            "desiredDeviceConfig": {"desiredDeviceConfig": {}},
            "configuration/inst/topic/with/slashes": "v",
            "somethingElse": 1,
        }));
        assert!(merge_shared(&mut store, &patch));
        assert_eq!(store.len(), 3);
        assert!(!store.contains_key("somethingElse"));
        // The same PATCH again (the broker's echo) changes nothing.
        assert!(!merge_shared(&mut store, &patch));
    }

    #[test]
    fn deleted_removes_and_a_null_deployment_is_kept() {
        let mut store = obj(json!({
            "deployment": {"deploymentId": "d1"},
            "configuration/a/t1": "1",
            "configuration/a/t2": "2",
        }));
        let patch = obj(json!({"deleted": ["configuration/a/t1", "configuration/x/y", 7]}));
        assert!(merge_shared(&mut store, &patch));
        assert!(!store.contains_key("configuration/a/t1"));
        assert!(store.contains_key("configuration/a/t2"));
        assert!(merge_shared(&mut store, &obj(json!({"deployment": null}))));
        assert_eq!(store.get("deployment"), Some(&Value::Null));
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".to_owned(), 1884)
        );
        assert_eq!(
            parse_broker_url("mqtt://broker.local").unwrap(),
            ("broker.local".to_owned(), 1883)
        );
        assert_eq!(
            parse_broker_url("tcp://[::1]:1999/").unwrap(),
            ("::1".to_owned(), 1999)
        );
        for bad in [
            "mqtts://h:1",
            "h:1",
            "mqtt://:1",
            "mqtt://h:x",
            "mqtt://h:1/p",
        ] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_status_timeout_shows_the_last_report() {
        let e = HubError::StatusTimeout {
            timeout: Duration::from_secs(2),
            received: 3,
            last: Some(Box::new(
                json!({"deploymentStatus": {"reconcileStatus": "applying"}}),
            )),
        };
        let text = e.to_string();
        assert!(text.contains("applying"), "{text}");
        assert!(text.contains("3 received"), "{text}");
    }
}
