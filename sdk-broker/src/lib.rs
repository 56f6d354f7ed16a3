//! sdk-broker: owns `org.evp.SdkBroker1` and serves the EVP remote SDK (docs/sdk-wire.md) on one
//! UNIX socket per instance, `<run_dir>/sdk/<instance>.sock`, so that modules built against
//! the EVP agent run unchanged.
//!
//! - `rules`: the rules (event queues, configuration, states, telemetry, messages, direct
//!   commands, back-pressure, the exit protocol), without sockets, D-Bus or files.
//! - [`broker`]: the rules under one lock, with their effects: sockets opened, configuration
//!   persisted, signals emitted, background work (flusher, command expiry, exit grace).
//! - `conn`: the sockets and the framing, which reach the broker through a small trait;
//!   [`peer`]: who may use a socket.
//! - [`settings`]: the `[sdk_broker]` table of `agent.toml`.
//! - [`store`]: persisted configuration under `<data_dir>/sdk/config/`.
//!
//! The contract with reconcilerd: `OpenInstance(instance)` before starting an instance (pass
//! the returned path as the runtime's `sdk_socket` option), `BindInstance(instance, pid, uid)`
//! with what `StartInstance` answered, `SetRouting(Routing JSON)` whenever
//! the deployment changes, `CloseInstance(instance)` before `Runtime1.StopInstance`.

pub mod blob;
pub mod broker;
mod conn;
mod hub_link;
pub mod limits;
mod orphans;
pub mod peer;
mod rules;
pub mod settings;
pub mod store;
mod wait;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use evp_daemon::{AgentConfig, DaemonArgs};
use evp_schemas::dbus::{
    EvpError, HUB_NAME, HUB_TELEMETRY_NAME, Hub1Proxy, SDK_BROKER_NAME, SDK_BROKER_PATH,
};
use futures_util::future::BoxFuture;
use tracing::info;
use zbus::interface;
use zbus::object_server::SignalEmitter;

pub use broker::{Broker, BrokerError, ChannelSink, Signal, Sink};
pub use conn::SocketError;
pub use settings::Settings;

/// The name of sdk-broker's table in `agent.toml`.
pub const SECTION: &str = "sdk_broker";

impl From<BrokerError> for EvpError {
    fn from(e: BrokerError) -> Self {
        let message = e.to_string();
        match e {
            BrokerError::InstanceName { .. }
            | BrokerError::NotAProcess { .. }
            | BrokerError::NotOpen { .. }
            | BrokerError::Routing(_)
            | BrokerError::ConfigTooBig { .. } => EvpError::InvalidArgument(message),
            BrokerError::StillExiting { .. } => EvpError::Busy(message),
            BrokerError::Socket(_) | BrokerError::Persist(_) => EvpError::Io(message),
        }
    }
}

/// The `org.evp.SdkBroker1` object.
#[derive(Debug)]
pub struct SdkBroker {
    broker: Arc<Broker>,
}

impl SdkBroker {
    /// The D-Bus face of `broker`.
    pub fn new(broker: Arc<Broker>) -> SdkBroker {
        SdkBroker { broker }
    }
}

#[interface(name = "org.evp.SdkBroker1")]
impl SdkBroker {
    /// Creates the instance's socket (before the instance starts) and returns its path.
    #[zbus(out_args("socket_path"))]
    async fn open_instance(&self, instance: &str) -> Result<String, EvpError> {
        let path = self.broker.open_instance(instance)?;
        path.into_os_string()
            .into_string()
            .map_err(|p| EvpError::Io(format!("socket path {p:?} is not UTF-8")))
    }

    /// Serves the instance's socket only to process `pid` (or a descendant) running as `uid`.
    async fn bind_instance(&self, instance: &str, pid: u32, uid: u32) -> Result<(), EvpError> {
        Ok(self.broker.bind_instance(instance, pid, uid)?)
    }

    /// Delivers the exit event, then removes the socket once the module left, or after
    /// `grace_ms` (at most `exit_grace_ms`: the caller's runtime decides how long its kind
    /// may take, EVP gives WASM 5 s and processes 10 s). Answers once the socket is gone.
    async fn close_instance(&self, instance: &str, grace_ms: u32) -> Result<(), EvpError> {
        let grace = Duration::from_millis(u64::from(grace_ms));
        self.broker.close_instance_within(instance, grace).await;
        Ok(())
    }

    /// Replaces the message routes of every instance.
    async fn set_routing(&self, routing_json: &str) -> Result<(), EvpError> {
        Ok(self.broker.set_routing(routing_json)?)
    }

    /// Keeps, persists and delivers a configuration value.
    async fn deliver_configuration(
        &self,
        instance: &str,
        topic: &str,
        value: Vec<u8>,
    ) -> Result<(), EvpError> {
        Ok(self.broker.deliver_configuration(instance, topic, &value)?)
    }

    /// Delivers a direct command; the answer comes as `RpcResponse`.
    async fn call_method(
        &self,
        instance: &str,
        reqid: u64,
        method: &str,
        params: &str,
    ) -> Result<(), EvpError> {
        self.broker
            .call_method(instance, reqid, method, params)
            .await;
        Ok(())
    }

    /// The latest state of a topic of an instance.
    #[zbus(signal)]
    async fn state_reported(
        emitter: &SignalEmitter<'_>,
        instance: &str,
        topic: &str,
        value: &[u8],
    ) -> zbus::Result<()>;

    /// Batched telemetry `(instance, key, JSON value)`.
    #[zbus(signal)]
    async fn telemetry(
        emitter: &SignalEmitter<'_>,
        entries: &[(String, String, String)],
    ) -> zbus::Result<()>;

    /// A module's answer to a direct command, or the broker's own error answer.
    #[zbus(signal)]
    async fn rpc_response(
        emitter: &SignalEmitter<'_>,
        reqid: u64,
        instance: &str,
        status: u32,
        response: &str,
    ) -> zbus::Result<()>;
}

/// The one consumer of a signal: its module data (states, telemetry, command answers) is for
/// hubd alone, so it is sent to hubd's name (unicast), never broadcast; the policy also denies
/// everyone else the receiving.
fn destination(signal: &Signal) -> &'static str {
    match signal {
        Signal::Telemetry(_) => HUB_TELEMETRY_NAME,
        Signal::State { .. } | Signal::RpcResponse { .. } => HUB_NAME,
    }
}

/// Emits the broker's signals on the bus, each to its one consumer.
#[derive(Debug)]
struct BusSink {
    conn: zbus::Connection,
    /// hubd's telemetry name, followed (see [`hub_link`]).
    hub_telemetry: tokio::sync::watch::Receiver<hub_link::Owner>,
    /// Telemetry sent lately, for a new hubd.
    recent: std::sync::Mutex<hub_link::Recent>,
}

/// Longest wait for hubd's telemetry name to come back before a batch is sent anyway (and
/// lost): systemd restarts hubd within seconds; this only bounds a hubd that is gone for good.
const HUB_AWAY_WAIT: Duration = Duration::from_secs(30);

impl BusSink {
    /// Sends `entries` to hubd's telemetry name once it is on the bus; a new hubd first gets
    /// again what the previous one may not have read.
    async fn telemetry(
        &self,
        emitter: &SignalEmitter<'_>,
        entries: hub_link::Batch,
    ) -> zbus::Result<()> {
        if !self.hub_telemetry.borrow().present {
            info!("hubd's telemetry name is not on the bus: telemetry waits for it");
            let mut owner = self.hub_telemetry.clone();
            if tokio::time::timeout(HUB_AWAY_WAIT, owner.wait_for(|o| o.present))
                .await
                .is_err()
            {
                tracing::warn!(
                    "hubd's telemetry name stayed away {HUB_AWAY_WAIT:?}: sending anyway"
                );
            }
        }
        let owner = *self.hub_telemetry.borrow();
        let lock = || self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let replay = lock().replay_for(&owner);
        if !replay.is_empty() {
            info!(
                "a new hubd: sending again {} telemetry batches of the last moments",
                replay.len()
            );
        }
        for batch in replay {
            SdkBroker::telemetry(emitter, &batch).await?;
            lock().sent(std::time::Instant::now(), batch);
        }
        SdkBroker::telemetry(emitter, &entries).await?;
        lock().sent(std::time::Instant::now(), entries);
        Ok(())
    }
}

impl Sink for BusSink {
    fn emit(&self, signal: Signal) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let to =
                zbus::names::BusName::try_from(destination(&signal)).map_err(|e| e.to_string())?;
            let emitter = SignalEmitter::new(&self.conn, SDK_BROKER_PATH)
                .map_err(|e| e.to_string())?
                .set_destination(to);
            let r = match signal {
                Signal::State {
                    instance,
                    topic,
                    value,
                } => SdkBroker::state_reported(&emitter, &instance, &topic, &value).await,
                Signal::Telemetry(entries) => self.telemetry(&emitter, entries).await,
                Signal::RpcResponse {
                    reqid,
                    instance,
                    status,
                    response,
                } => SdkBroker::rpc_response(&emitter, reqid, &instance, status, &response).await,
            };
            r.map_err(|e| e.to_string())
        })
    }

    fn storage_token<'a>(
        &'a self,
        target: &'a blob::StorageTarget,
    ) -> BoxFuture<'a, Result<broker::StorageToken, String>> {
        Box::pin(async move {
            let hub = Hub1Proxy::builder(&self.conn)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .map_err(|e| format!("hubd proxy: {e}"))?;
            let (url, headers, _expires) = hub
                .request_storage_token(&target.instance, &target.storage_name, &target.remote_name)
                .await
                .map_err(|e| evp_schemas::dbus::error_message(&e))?;
            Ok((url, headers.into_iter().collect()))
        })
    }
}

/// Runs sdk-broker until SIGTERM.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let config = AgentConfig::load(&args)?;
    let settings: Settings = config.section(SECTION)?;
    let conn = evp_daemon::bus_builder(&args)?
        .build()
        .await
        .context("connecting to D-Bus")?;
    evp_daemon::exit_when_closed(&conn, SDK_BROKER_NAME);
    // Blob transfers go through the proxy and CA of module downloads.
    let http: evp_daemon::http::HttpSettings = config.section("reconciler")?;
    let broker = Broker::with_http(
        settings,
        config.common.run_dir.clone(),
        config.common.data_dir.clone(),
        Arc::new(BusSink {
            conn: conn.clone(),
            hub_telemetry: hub_link::follow_owner(&conn, HUB_TELEMETRY_NAME),
            recent: Default::default(),
        }),
        &http,
    )?;
    broker.start();
    conn.object_server()
        .at(SDK_BROKER_PATH, SdkBroker::new(Arc::clone(&broker)))
        .await
        .context("serving /org/evp/SdkBroker1")?;
    evp_daemon::own_name(&conn, SDK_BROKER_NAME).await?;
    info!(sockets = %broker.sdk_dir().display(), "serving {SDK_BROKER_NAME}");
    evp_daemon::notify_ready(&conn, SDK_BROKER_NAME);
    evp_daemon::wait_for_shutdown().await
}
