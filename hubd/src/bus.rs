//! The D-Bus side of hubd: the `org.evp.Hub1` object, and the tasks that link the MQTT session
//! to reconcilerd (deployments in, status out) and sdk-broker (configurations and direct
//! commands in; states, answers and telemetry out).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use evp_daemon::Backoff;
use evp_schemas::dbus::{
    EvpError, HUB_PATH, Reconciler1Proxy, SdkBroker1Proxy, error_message, error_name,
};
use evp_schemas::{DeploymentStatus, TelemetryEntry};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use zbus::interface;
use zbus::proxy::CacheProperties;

use crate::core::{
    ApplyOutcome, ConfigurationDelivery, ConnectionState, DeploymentRequest, MethodCall,
    RegistryAuth, SdkEvent, SdkLinks,
};
use crate::spool::task::SpoolReport;
use crate::storage::{TokenError, TokenRequest};
use crate::telemetry::TelemetryBatch;

/// The D-Bus error reconcilerd returns for a deployment it refuses.
const INVALID_MANIFEST: &str = "org.evp.Error.InvalidManifest";
/// First wait before handing a deployment to reconcilerd again when it is not reachable.
const APPLY_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest such wait: reconcilerd (re)starting takes seconds, and a new deployment from the hub
/// is tried at once anyway.
const APPLY_RETRY_MAX: Duration = Duration::from_secs(30);
/// Wait before building a proxy again after the bus refused to.
const PROXY_RETRY: Duration = Duration::from_secs(5);
/// The D-Bus errors that mean a configuration itself is refused, so delivering it again cannot
/// help; every other failure (sdk-broker not on the bus yet, busy, restarting) is retried.
const PERMANENT_DELIVERY_ERRORS: &[&str] = &[
    "org.evp.Error.InvalidArgument",
    "org.evp.Error.Denied",
    "org.freedesktop.DBus.Error.AccessDenied",
];
/// First wait before delivering failed configurations again.
const DELIVERY_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest such wait; sdk-broker coming on the bus triggers a retry at once anyway.
const DELIVERY_RETRY_MAX: Duration = Duration::from_secs(60);
/// Most bytes (values, names and topics) held for a retry: eight of the largest MQTT messages
/// hubd accepts. Beyond it no further configuration is taken from the session until
/// sdk-broker takes some (back-pressure: nothing accepted from the hub is dropped).
const MAX_HELD_CONFIGURATION_BYTES: usize = 8 << 20;

/// The `org.evp.Hub1` object. It reads what the session loop publishes and hands it
/// requests; it holds no lock across a call, so a storage token waiting for the hub delays
/// no property read.
#[derive(Debug)]
pub struct Hub1 {
    connection: watch::Receiver<ConnectionState>,
    protocol: String,
    device_id: String,
    storage_tokens: mpsc::Sender<TokenRequest>,
    registry_auth: watch::Receiver<RegistryAuth>,
    spool: watch::Receiver<SpoolReport>,
}

/// What the `org.evp.Hub1` object reads from and hands to the session loop (the
/// [`crate::core::LinkEnds`] fields of the same names).
#[derive(Debug)]
pub struct Hub1Links {
    /// The connection state.
    pub connection: watch::Receiver<ConnectionState>,
    /// Where storage token requests go.
    pub storage_tokens: mpsc::Sender<TokenRequest>,
    /// The registry credentials in effect.
    pub registry_auth: watch::Receiver<RegistryAuth>,
    /// The spool's figures.
    pub spool: watch::Receiver<SpoolReport>,
}

impl Hub1 {
    /// The object for a device speaking `protocol`.
    pub fn new(protocol: &str, device_id: String, links: Hub1Links) -> Self {
        Hub1 {
            connection: links.connection,
            protocol: protocol.to_owned(),
            device_id,
            storage_tokens: links.storage_tokens,
            registry_auth: links.registry_auth,
            spool: links.spool,
        }
    }
}

/// The D-Bus error of a storage token that was not given.
fn token_error(e: TokenError) -> EvpError {
    match e {
        TokenError::Busy => EvpError::Busy(e.to_string()),
        TokenError::Refused(_) => EvpError::Denied(e.to_string()),
        TokenError::Timeout { .. } | TokenError::Offline { .. } | TokenError::NotSent(_) => {
            EvpError::Io(e.to_string())
        }
    }
}

#[interface(name = "org.evp.Hub1")]
impl Hub1 {
    /// `connected`, `connecting` or `disconnected`; `provisioning` or `provisioning-refused`
    /// while a device without credentials registers itself.
    #[zbus(property)]
    async fn connection(&self) -> String {
        self.connection.borrow().as_str().to_owned()
    }

    /// `EVP2-TB`.
    #[zbus(property)]
    async fn protocol(&self) -> String {
        self.protocol.clone()
    }

    /// The device's permanent id.
    #[zbus(property)]
    async fn device_id(&self) -> String {
        self.device_id.clone()
    }

    /// Bytes accepted for the hub and not yet acknowledged by its broker: the spool's
    /// direct-command answers and telemetry (reports are rebuilt, never queued).
    #[zbus(property)]
    async fn queued_bytes(&self) -> u64 {
        self.spool.borrow().queued_bytes
    }

    /// Where to upload `remote_name` for `instance` (EVP_BLOB_TYPE_EVP_EXT): the URL, its
    /// headers and when it expires (ms since the epoch, 0 when the hub did not say). An empty
    /// `storage_name` is the default storage. Waits for the hub up to 5 s; offline, a kept
    /// `multifile` answer serves. sdk-broker only (the bus policy).
    #[zbus(out_args("url", "headers", "expires_at_ms"))]
    async fn request_storage_token(
        &self,
        instance: String,
        storage_name: String,
        remote_name: String,
    ) -> Result<(String, HashMap<String, String>, i64), EvpError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = TokenRequest {
            instance,
            storage_name,
            remote_name,
            reply,
        };
        self.storage_tokens.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                EvpError::Busy("too many storage token requests wait for hubd".into())
            }
            mpsc::error::TrySendError::Closed(_) => {
                EvpError::Io("hubd's MQTT session is not running".into())
            }
        })?;
        let token = answer
            .await
            .map_err(|_| EvpError::Io("hubd's MQTT session stopped".into()))?
            .map_err(token_error)?;
        let expires = token.expires_at_ms.unwrap_or(0);
        Ok((token.url, token.headers.into_iter().collect(), expires))
    }

    /// Registry domain → `X-Registry-Auth` value for image pulls: the hub's device
    /// configuration's, else the local `EVP_REGISTRY_AUTH`. runtimed-container only (the bus
    /// policy): these are credentials.
    #[zbus(out_args("registry_auth"))]
    async fn registry_auth(&self) -> HashMap<String, String> {
        self.registry_auth
            .borrow()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Emits PropertiesChanged for `Hub1.Connection` at each change of the session's state (the
/// object reads the same state).
pub async fn follow_connection(
    conn: zbus::Connection,
    mut state: watch::Receiver<ConnectionState>,
) -> zbus::Result<()> {
    let iface = conn.object_server().interface::<_, Hub1>(HUB_PATH).await?;
    let mut told = *state.borrow_and_update();
    while state.changed().await.is_ok() {
        let now = *state.borrow_and_update();
        if now != told {
            told = now;
            iface
                .get()
                .await
                .connection_changed(iface.signal_emitter())
                .await?;
        }
    }
    Ok(())
}

fn publish_status(text: &str, tx: &watch::Sender<Option<DeploymentStatus>>) {
    if text.is_empty() {
        return;
    }
    match DeploymentStatus::from_json(text) {
        Ok(s) => {
            tx.send_replace(Some(s));
        }
        Err(e) => warn!("reconcilerd's DeploymentStatus is not valid: {e}"),
    }
}

/// Follows `Reconciler1.DeploymentStatus`: its value when reconcilerd is (or comes) on the
/// bus, then every change. Survives reconcilerd starting after hubd and restarting.
pub async fn watch_status(conn: zbus::Connection, tx: watch::Sender<Option<DeploymentStatus>>) {
    loop {
        let proxy = match Reconciler1Proxy::new(&conn).await {
            Ok(p) => p,
            Err(e) => {
                warn!("reconcilerd proxy: {e}");
                tokio::time::sleep(PROXY_RETRY).await;
                continue;
            }
        };
        // Subscribe to owner changes before the first read, so a start in between is seen.
        let mut owner = match proxy.inner().receive_owner_changed().await {
            Ok(s) => s,
            Err(e) => {
                warn!("watching reconcilerd's bus name: {e}");
                tokio::time::sleep(PROXY_RETRY).await;
                continue;
            }
        };
        let mut changes = proxy.receive_deployment_status_changed().await;
        match proxy.deployment_status().await {
            Ok(text) => publish_status(&text, &tx),
            Err(e) => debug!("reconcilerd's status is not available yet: {e}"),
        }
        loop {
            tokio::select! {
                c = changes.next() => match c {
                    Some(c) => match c.get().await {
                        Ok(text) => publish_status(&text, &tx),
                        Err(e) => debug!("reading DeploymentStatus: {e}"),
                    },
                    None => {
                        // The stream ended (the bus connection is going away): do not spin.
                        tokio::time::sleep(PROXY_RETRY).await;
                        break;
                    }
                },
                o = owner.next() => match o {
                    Some(Some(_)) => {
                        info!("reconcilerd is on the bus: reading its status");
                        break;
                    }
                    Some(None) => info!("reconcilerd left the bus; keeping its last status"),
                    None => {
                        tokio::time::sleep(PROXY_RETRY).await;
                        break;
                    }
                },
            }
        }
    }
}

/// Hands each deployment to `Reconciler1.ApplyDeployment`, the latest first and only once
/// answered; retries while reconcilerd is not reachable.
pub async fn apply_deployments(
    conn: zbus::Connection,
    mut rx: watch::Receiver<Option<DeploymentRequest>>,
    outcomes: mpsc::Sender<ApplyOutcome>,
) {
    let proxy = loop {
        match Reconciler1Proxy::builder(&conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
        {
            Ok(p) => break p,
            Err(e) => {
                warn!("reconcilerd proxy: {e}");
                tokio::time::sleep(PROXY_RETRY).await;
            }
        }
    };
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        // No jitter in these schedules: the peer is one local daemon, not a fleet's broker.
        let mut backoff = Backoff::new(APPLY_RETRY_FIRST, APPLY_RETRY_MAX);
        loop {
            let Some(req) = rx.borrow_and_update().clone() else {
                break;
            };
            let id = req.deployment_id.as_deref().unwrap_or("(no id)").to_owned();
            let outcome = match proxy.apply_deployment(&req.json).await {
                Ok(()) => {
                    info!("reconcilerd accepted deployment {id}");
                    ApplyOutcome::Accepted { seq: req.seq }
                }
                Err(e) if error_name(&e) == Some(INVALID_MANIFEST) => {
                    let message = error_message(&e);
                    warn!("reconcilerd refused deployment {id}: {message}");
                    ApplyOutcome::Refused {
                        seq: req.seq,
                        deployment_id: req.deployment_id.clone(),
                        message,
                    }
                }
                Err(e) => {
                    let delay = backoff.next_delay_with(0.0);
                    warn!(
                        "deployment {id} not handed to reconcilerd: {}; trying again in {delay:?}",
                        error_message(&e)
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        r = rx.changed() => if r.is_err() { return },
                    }
                    continue;
                }
            };
            if outcomes.send(outcome).await.is_err() {
                return;
            }
            break;
        }
    }
}

async fn sdk_broker_proxy(conn: &zbus::Connection) -> SdkBroker1Proxy<'static> {
    loop {
        match SdkBroker1Proxy::builder(conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
        {
            Ok(p) => return p,
            Err(e) => {
                warn!("sdk-broker proxy: {e}");
                tokio::time::sleep(PROXY_RETRY).await;
            }
        }
    }
}

/// Configurations sdk-broker did not take yet, the latest per instance and topic. Never drops
/// one: when it holds [`MAX_HELD_CONFIGURATION_BYTES`], no more are taken in.
#[derive(Debug, Default)]
struct HeldConfigurations {
    queue: VecDeque<ConfigurationDelivery>,
    bytes: usize,
}

fn held_size(d: &ConfigurationDelivery) -> usize {
    d.instance.len() + d.topic.len() + d.value.len()
}

impl HeldConfigurations {
    fn forget(&mut self, instance: &str, topic: &str) {
        let at = self
            .queue
            .iter()
            .position(|d| d.instance == instance && d.topic == topic);
        if let Some(d) = at.and_then(|i| self.queue.remove(i)) {
            self.bytes -= held_size(&d);
        }
    }

    fn hold(&mut self, d: ConfigurationDelivery) {
        self.forget(&d.instance, &d.topic);
        self.bytes += held_size(&d);
        self.queue.push_back(d);
    }

    fn pop(&mut self) -> Option<ConfigurationDelivery> {
        let d = self.queue.pop_front()?;
        self.bytes -= held_size(&d);
        Some(d)
    }

    /// Whether no more should be taken in until some are delivered.
    fn is_full(&self) -> bool {
        self.bytes >= MAX_HELD_CONFIGURATION_BYTES
    }
}

/// Delivers `d`; false when it should be tried again later.
async fn deliver(proxy: &SdkBroker1Proxy<'_>, d: &ConfigurationDelivery, first: bool) -> bool {
    match proxy
        .deliver_configuration(&d.instance, &d.topic, &d.value)
        .await
    {
        Ok(()) => {
            debug!("configuration {}/{} delivered", d.instance, d.topic);
            true
        }
        Err(e) if error_name(&e).is_some_and(|n| PERMANENT_DELIVERY_ERRORS.contains(&n)) => {
            warn!(
                "sdk-broker refused configuration {}/{}: {}",
                d.instance,
                d.topic,
                error_message(&e)
            );
            true
        }
        Err(e) => {
            let message = error_message(&e);
            if first {
                warn!(
                    "configuration {}/{} not delivered to sdk-broker yet: {message}; trying again",
                    d.instance, d.topic
                );
            } else {
                debug!(
                    "configuration {}/{} still not delivered: {message}",
                    d.instance, d.topic
                );
            }
            false
        }
    }
}

/// Hands configurations to `SdkBroker1.DeliverConfiguration`. Those that fail (sdk-broker not
/// up yet) are held, the latest per instance and topic, and delivered again with backoff from
/// 1 s to 60 s, and at once when sdk-broker comes on the bus; sdk-broker persists what it took.
pub async fn deliver_configurations(
    conn: zbus::Connection,
    mut rx: mpsc::Receiver<ConfigurationDelivery>,
) {
    let proxy = sdk_broker_proxy(&conn).await;
    let mut owner = match proxy.inner().receive_owner_changed().await {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("watching sdk-broker's bus name: {e}; retrying deliveries on a timer only");
            None
        }
    };
    let mut held = HeldConfigurations::default();
    let mut backoff = Backoff::new(DELIVERY_RETRY_FIRST, DELIVERY_RETRY_MAX);
    let mut delay = backoff.next_delay_with(0.0);
    let mut retry_at: Option<Instant> = None;
    loop {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let owner_next = async {
            match owner.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            d = rx.recv(), if !held.is_full() => {
                let Some(d) = d else { return };
                held.forget(&d.instance, &d.topic);
                if !deliver(&proxy, &d, true).await {
                    held.hold(d);
                    retry_at.get_or_insert_with(|| Instant::now() + delay);
                }
            }
            _ = retry => {
                let mut failed = VecDeque::new();
                while let Some(d) = held.pop() {
                    if !deliver(&proxy, &d, false).await {
                        failed.push_back(d);
                    }
                }
                for d in failed {
                    held.hold(d);
                }
                if held.queue.is_empty() {
                    backoff.reset();
                    delay = backoff.next_delay_with(0.0);
                    retry_at = None;
                } else {
                    delay = backoff.next_delay_with(0.0);
                    retry_at = Some(Instant::now() + delay);
                }
            }
            o = owner_next => match o {
                Some(Some(_)) if !held.queue.is_empty() => {
                    info!("sdk-broker is on the bus: delivering {} held configurations", held.queue.len());
                    backoff.reset();
                    delay = backoff.next_delay_with(0.0);
                    retry_at = Some(Instant::now());
                }
                Some(_) => {}
                None => owner = None,
            },
        }
    }
}

/// Follows sdk-broker's `StateReported` and `RpcResponse` signals into `events`, whether
/// sdk-broker starts before or after hubd.
pub async fn follow_sdk_broker(conn: zbus::Connection, events: mpsc::Sender<SdkEvent>) {
    loop {
        let proxy = sdk_broker_proxy(&conn).await;
        let (mut states, mut answers) =
            match tokio::try_join!(proxy.receive_state_reported(), proxy.receive_rpc_response()) {
                Ok(s) => s,
                Err(e) => {
                    warn!("subscribing to sdk-broker's signals: {e}");
                    tokio::time::sleep(PROXY_RETRY).await;
                    continue;
                }
            };
        loop {
            let event = tokio::select! {
                s = states.next() => match s.map(|s| s.args().map(|a| SdkEvent::State {
                    instance: a.instance().to_string(),
                    topic: a.topic().to_string(),
                    value: a.value().clone(),
                })) {
                    Some(Ok(e)) => e,
                    Some(Err(e)) => {
                        warn!("a StateReported signal cannot be read: {e}");
                        continue;
                    }
                    None => break,
                },
                r = answers.next() => match r.map(|r| r.args().map(|a| SdkEvent::RpcResponse {
                    reqid: *a.reqid(),
                    instance: a.instance().to_string(),
                    status: *a.status(),
                    response: a.response().to_string(),
                })) {
                    Some(Ok(e)) => e,
                    Some(Err(e)) => {
                        warn!("an RpcResponse signal cannot be read: {e}");
                        continue;
                    }
                    None => break,
                },
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
        // A stream ended: the bus connection is going away. Do not spin.
        tokio::time::sleep(PROXY_RETRY).await;
    }
}

/// Delivers direct commands with `SdkBroker1.CallMethod`, each on its own task so a slow
/// call does not hold the others; a call that fails comes back as [`SdkEvent::CallFailed`].
pub async fn call_methods(
    conn: zbus::Connection,
    mut calls: mpsc::Receiver<MethodCall>,
    events: mpsc::Sender<SdkEvent>,
) {
    let proxy = sdk_broker_proxy(&conn).await;
    while let Some(call) = calls.recv().await {
        let proxy = proxy.clone();
        let events = events.clone();
        tokio::spawn(async move {
            if let Err(e) = proxy
                .call_method(&call.instance, call.reqid, &call.method, &call.params)
                .await
            {
                let failed = SdkEvent::CallFailed {
                    reqid: call.reqid,
                    message: error_message(&e),
                };
                let _ = events.send(failed).await;
            }
        });
    }
}

/// Links the MQTT session to sdk-broker: its states and answers followed on `conn`, direct
/// commands called on it, and its telemetry followed on `telemetry_conn`, a connection of its
/// own (see [`follow_telemetry`]). Spawns the tasks; call it within a Tokio runtime.
pub fn link_sdk_broker(conn: &zbus::Connection, telemetry_conn: zbus::Connection) -> SdkLinks {
    link_sdk_broker_subscribed(conn, telemetry_conn, None)
}

/// [`link_sdk_broker`] with the `Telemetry` subscription already made ([`telemetry_signals`]),
/// so that nothing sent to the telemetry name once it is taken falls before it.
pub fn link_sdk_broker_subscribed(
    conn: &zbus::Connection,
    telemetry_conn: zbus::Connection,
    telemetry: Option<zbus::proxy::SignalStream<'static>>,
) -> SdkLinks {
    let (sdk, ends) = SdkLinks::new();
    tokio::spawn(follow_sdk_broker(conn.clone(), ends.events.clone()));
    tokio::spawn(call_methods(conn.clone(), ends.calls, ends.events));
    tokio::spawn(follow_telemetry(telemetry_conn, ends.telemetry, telemetry));
    sdk
}

/// Subscribes `conn` to sdk-broker's `Telemetry` signals. zbus drops a message no stream waits
/// for, so hubd subscribes before it takes `org.evp.Hub1.Telemetry`: sdk-broker sends a new
/// hubd what the previous one may not have read as soon as the name is taken.
pub async fn telemetry_signals(
    conn: &zbus::Connection,
) -> zbus::Result<zbus::proxy::SignalStream<'static>> {
    let proxy = sdk_broker_proxy(conn).await;
    proxy.inner().receive_signal("Telemetry").await
}

/// A `Telemetry` signal's body, read in place.
struct SignalBatch(zbus::message::Body);

impl TelemetryBatch for SignalBatch {
    fn entries(&self) -> Result<Vec<TelemetryEntry<'_>>, String> {
        let entries: Vec<(&str, &str, &str)> = self.0.deserialize().map_err(|e| e.to_string())?;
        Ok(entries
            .into_iter()
            .map(|(instance, key, value)| TelemetryEntry {
                instance,
                key,
                value,
            })
            .collect())
    }
}

/// Follows sdk-broker's `Telemetry` signals into `batches`. Give it a bus connection of its
/// own, named `org.evp.Hub1.Telemetry` (sdk-broker sends telemetry to that name only): when
/// MQTT is slow this task waits, and only that connection's reading waits with it.
pub async fn follow_telemetry(
    conn: zbus::Connection,
    batches: mpsc::Sender<Box<dyn TelemetryBatch>>,
    mut subscribed: Option<zbus::proxy::SignalStream<'static>>,
) {
    loop {
        let subscription = match subscribed.take() {
            Some(s) => Ok(s),
            None => telemetry_signals(&conn).await,
        };
        let mut signals = match subscription {
            Ok(s) => s,
            Err(e) => {
                warn!("subscribing to sdk-broker's Telemetry: {e}");
                tokio::time::sleep(PROXY_RETRY).await;
                continue;
            }
        };
        while let Some(msg) = signals.next().await {
            if batches
                .send(Box::new(SignalBatch(msg.body())))
                .await
                .is_err()
            {
                return;
            }
        }
        tokio::time::sleep(PROXY_RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(topic: &str, len: usize) -> ConfigurationDelivery {
        ConfigurationDelivery {
            instance: "i".into(),
            topic: topic.into(),
            value: vec![b'v'; len],
        }
    }

    #[test]
    fn held_configurations_keep_the_latest_per_topic_and_push_back_when_full() {
        let mut held = HeldConfigurations::default();
        held.hold(delivery("a", 1));
        held.hold(delivery("b", 2));
        held.hold(delivery("a", 3));
        let topics: Vec<&str> = held.queue.iter().map(|d| d.topic.as_str()).collect();
        assert_eq!(topics, ["b", "a"], "the newer value replaces the older");
        assert_eq!(held.bytes, 4 + 5);
        held.forget("i", "b");
        assert_eq!(held.bytes, 5);

        for i in 0..3000 {
            held.hold(delivery(&i.to_string(), 0));
        }
        assert_eq!(held.queue.len(), 3001, "none is dropped");
        assert!(!held.is_full());
        held.hold(delivery("big", MAX_HELD_CONFIGURATION_BYTES));
        assert!(held.is_full(), "no more is taken in");
        assert_eq!(held.queue.len(), 3002);
        while held.pop().is_some() {}
        assert_eq!((held.bytes, held.is_full()), (0, false));
    }
}
