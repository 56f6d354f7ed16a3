//! sdk-broker: owns `org.evp.SdkBroker1`. The per-instance SDK sockets are not served by this
//! build yet; every method answers `org.evp.Error.NotSupported` so callers can tell.
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

use anyhow::{Context, Result};
use evp_daemon::{AgentConfig, DaemonArgs};
use evp_schemas::dbus::{EvpError, SDK_BROKER_NAME, SDK_BROKER_PATH};
use tracing::info;
use zbus::interface;
use zbus::object_server::SignalEmitter;

/// What every method answers until the SDK sockets land.
const NO_SOCKETS: &str = "this sdk-broker does not serve SDK sockets yet";

/// The `org.evp.SdkBroker1` object.
#[derive(Debug, Default)]
pub struct SdkBroker;

#[interface(name = "org.evp.SdkBroker1")]
impl SdkBroker {
    #[zbus(out_args("socket_path"))]
    async fn open_instance(&self, instance: &str) -> Result<String, EvpError> {
        Err(EvpError::NotSupported(format!(
            "{NO_SOCKETS} (instance {instance})"
        )))
    }

    async fn close_instance(&self, instance: &str) -> Result<(), EvpError> {
        Err(EvpError::NotSupported(format!(
            "{NO_SOCKETS} (instance {instance})"
        )))
    }

    async fn set_routing(&self, routing_json: &str) -> Result<(), EvpError> {
        let _ = routing_json;
        Err(EvpError::NotSupported(NO_SOCKETS.into()))
    }

    async fn deliver_configuration(
        &self,
        instance: &str,
        topic: &str,
        value: Vec<u8>,
    ) -> Result<(), EvpError> {
        let _ = value;
        Err(EvpError::NotSupported(format!(
            "{NO_SOCKETS}: configuration {instance}/{topic} not delivered"
        )))
    }

    async fn call_method(
        &self,
        instance: &str,
        reqid: u64,
        method: &str,
        params: &str,
    ) -> Result<(), EvpError> {
        let _ = params;
        Err(EvpError::NotSupported(format!(
            "{NO_SOCKETS}: call {reqid} of {method} on {instance} not delivered"
        )))
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

    /// A module's answer to a direct command.
    #[zbus(signal)]
    async fn rpc_response(
        emitter: &SignalEmitter<'_>,
        reqid: u64,
        instance: &str,
        status: u32,
        response: &str,
    ) -> zbus::Result<()>;
}

/// Runs sdk-broker until SIGTERM.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let _config = AgentConfig::load(&args)?;
    let _conn = evp_daemon::bus_builder(&args)?
        .name(SDK_BROKER_NAME)
        .serve_at(SDK_BROKER_PATH, SdkBroker)
        .build()
        .await
        .context("connecting to D-Bus as org.evp.SdkBroker1")?;
    info!("serving {SDK_BROKER_NAME}");
    evp_daemon::notify_ready();
    evp_daemon::wait_for_shutdown().await
}
