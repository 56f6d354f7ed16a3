//! The D-Bus side of hubd: the `org.evp.Hub1` object, and the tasks that link the MQTT session
//! to reconcilerd (deployments in, status out) and sdk-broker (configurations).

use std::collections::HashSet;
use std::time::Duration;

use evp_schemas::DeploymentStatus;
use evp_schemas::dbus::{HUB_PATH, Reconciler1Proxy, SdkBroker1Proxy, error_message, error_name};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use zbus::interface;
use zbus::proxy::CacheProperties;

use crate::core::{ApplyOutcome, ConfigurationDelivery, ConnectionState, DeploymentRequest};

/// The D-Bus error reconcilerd returns for a deployment it refuses.
const INVALID_MANIFEST: &str = "org.evp.Error.InvalidManifest";
/// First wait before handing a deployment to reconcilerd again when it is not reachable.
const APPLY_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest such wait: reconcilerd (re)starting takes seconds, and a new deployment from the hub
/// is tried at once anyway.
const APPLY_RETRY_MAX: Duration = Duration::from_secs(30);
/// Wait before building a proxy again after the bus refused to.
const PROXY_RETRY: Duration = Duration::from_secs(5);

/// The `org.evp.Hub1` object.
#[derive(Debug)]
pub struct Hub1 {
    connection: ConnectionState,
    protocol: String,
    device_id: String,
}

impl Hub1 {
    /// The object for a device speaking `protocol`.
    pub fn new(protocol: &str, device_id: String) -> Self {
        Hub1 {
            connection: ConnectionState::Disconnected,
            protocol: protocol.to_owned(),
            device_id,
        }
    }
}

#[interface(name = "org.evp.Hub1")]
impl Hub1 {
    /// `connected`, `connecting` or `disconnected`.
    #[zbus(property)]
    async fn connection(&self) -> String {
        self.connection.as_str().to_owned()
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

    /// Bytes waiting to be sent to the hub. Always 0: this build has no offline queue yet
    /// (reports are rebuilt from the current state after a reconnect instead).
    #[zbus(property)]
    async fn queued_bytes(&self) -> u64 {
        0
    }
}

/// Keeps `Hub1.Connection` equal to the session's state, with PropertiesChanged.
pub async fn follow_connection(
    conn: zbus::Connection,
    mut state: watch::Receiver<ConnectionState>,
) -> zbus::Result<()> {
    let iface = conn.object_server().interface::<_, Hub1>(HUB_PATH).await?;
    loop {
        let now = *state.borrow_and_update();
        {
            let mut hub = iface.get_mut().await;
            if hub.connection != now {
                hub.connection = now;
                hub.connection_changed(iface.signal_emitter()).await?;
            }
        }
        if state.changed().await.is_err() {
            return Ok(());
        }
    }
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
        let mut delay = APPLY_RETRY_FIRST;
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
                    warn!(
                        "deployment {id} not handed to reconcilerd: {}; trying again in {delay:?}",
                        error_message(&e)
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        r = rx.changed() => if r.is_err() { return },
                    }
                    delay = (delay * 2).min(APPLY_RETRY_MAX);
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

/// Hands configurations to `SdkBroker1.DeliverConfiguration`. A failure (such as this build's
/// sdk-broker answering `NotSupported`) is logged once per instance and topic, then at debug.
pub async fn deliver_configurations(
    conn: zbus::Connection,
    mut rx: mpsc::Receiver<ConfigurationDelivery>,
) {
    let proxy = loop {
        match SdkBroker1Proxy::builder(&conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
        {
            Ok(p) => break p,
            Err(e) => {
                warn!("sdk-broker proxy: {e}");
                tokio::time::sleep(PROXY_RETRY).await;
            }
        }
    };
    let mut warned: HashSet<(String, String)> = HashSet::new();
    while let Some(d) = rx.recv().await {
        match proxy
            .deliver_configuration(&d.instance, &d.topic, &d.value)
            .await
        {
            Ok(()) => debug!("configuration {}/{} delivered", d.instance, d.topic),
            Err(e) => {
                let message = error_message(&e);
                if warned.insert((d.instance.clone(), d.topic.clone())) {
                    warn!(
                        "configuration {}/{} not delivered to sdk-broker: {message}",
                        d.instance, d.topic
                    );
                } else {
                    debug!(
                        "configuration {}/{} not delivered to sdk-broker: {message}",
                        d.instance, d.topic
                    );
                }
            }
        }
    }
}
