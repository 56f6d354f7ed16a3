//! runtimed-container: owns `org.evp.Runtime1.Container` and runs the modules that are not
//! WASM. One [`runtime::Runtime`] per module kind (`spawn` in this build; `docker` and `python`
//! join as sibling modules) behind one [`runtime::Supervisor`], which the D-Bus object
//! delegates to. The daemon's own exit or crash does not disturb its instances: their output
//! goes to files ([`logs`]), what it started is recorded ([`record`]), and its next start
//! re-adopts what still runs ([`process`]).
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod logs;
pub mod process;
pub mod record;
pub mod runtime;
pub mod spawn;

#[cfg(test)]
mod recovery_tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use evp_daemon::{AgentConfig, DaemonArgs};
use evp_schemas::dbus::{EvpError, RUNTIME_CONTAINER_NAME, RUNTIME_CONTAINER_PATH, StartOptions};
use tokio::sync::mpsc;
use tracing::{info, warn};
use zbus::interface;
use zbus::object_server::SignalEmitter;

use crate::logs::LogPolicy;
use crate::runtime::{InstanceEvent, InstanceOptions, OnExit, Supervisor};

/// How long a stopping daemon waits for its last instance changes to reach the bus; they are
/// a few small signals, so a stuck bus is the only reason to hit it.
const EVENT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The `[container]` section of `agent.toml`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerConfig {
    /// Grace each instance gets between SIGTERM and SIGKILL when the daemon itself stops them
    /// (with `stop_instances_on_exit`).
    pub stop_grace_ms: u64,
    /// Whether the daemon stops its instances when it exits. Off by default: they keep running
    /// and its next start re-adopts them, so updating or restarting the runtime does not
    /// restart the workloads (as Azure IoT Edge and Ankaios treat theirs).
    pub stop_instances_on_exit: bool,
    /// Size at which an instance's `logs/stdout.log` or `logs/stderr.log` is truncated, once
    /// what it holds was logged.
    pub log_max_bytes: u64,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        // EVP gives spawned modules 10 s (CONFIG_EVP_MODULE_INSTANCE_STOP_TIMEOUT) to exit.
        ContainerConfig {
            stop_grace_ms: 10_000,
            stop_instances_on_exit: false,
            log_max_bytes: logs::DEFAULT_LOG_MAX_BYTES,
        }
    }
}

/// Errors in the `[container]` section.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `log_max_bytes = 0` would truncate every output file at every poll.
    #[error("[container] log_max_bytes must be at least 1")]
    ZeroLogMaxBytes,
}

impl ContainerConfig {
    /// Refuses values that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.log_max_bytes == 0 {
            return Err(ConfigError::ZeroLogMaxBytes);
        }
        Ok(())
    }

    /// What the daemon does with its instances when it exits.
    pub fn on_exit(&self) -> OnExit {
        if self.stop_instances_on_exit {
            OnExit::Stop {
                grace: Duration::from_millis(self.stop_grace_ms),
            }
        } else {
            OnExit::LeaveRunning
        }
    }

    /// How instance output files are kept.
    pub fn log_policy(&self) -> LogPolicy {
        LogPolicy {
            max_bytes: self.log_max_bytes,
        }
    }
}

/// The `org.evp.Runtime1` object; every call is delegated to the supervisor.
pub struct ContainerRuntime {
    supervisor: Arc<Supervisor>,
}

impl ContainerRuntime {
    /// The object serving this supervisor.
    pub fn new(supervisor: Arc<Supervisor>) -> ContainerRuntime {
        ContainerRuntime { supervisor }
    }
}

#[interface(name = "org.evp.Runtime1")]
impl ContainerRuntime {
    /// Module kinds this runtime runs.
    #[zbus(property)]
    async fn kinds(&self) -> Vec<String> {
        self.supervisor.kinds()
    }

    async fn load_module(
        &self,
        module_id: &str,
        kind: &str,
        path_or_image: &str,
        sha256: &str,
    ) -> Result<(), EvpError> {
        self.supervisor
            .load_module(module_id, kind, path_or_image, sha256)
            .await
    }

    async fn unload_module(&self, module_id: &str) -> Result<(), EvpError> {
        self.supervisor.unload_module(module_id)
    }

    async fn start_instance(
        &self,
        instance: &str,
        module_id: &str,
        options: StartOptions,
    ) -> Result<(), EvpError> {
        let options = InstanceOptions::from_dbus(options)?;
        self.supervisor
            .start_instance(instance, module_id, options)
            .await
    }

    async fn stop_instance(&self, instance: &str, grace_ms: u32) -> Result<(), EvpError> {
        self.supervisor
            .stop_instance(instance, Duration::from_millis(grace_ms.into()))
            .await
    }

    async fn purge_instance(&self, instance: &str) -> Result<(), EvpError> {
        self.supervisor.purge_instance(instance).await
    }

    /// `(instance, module_id, status, failure_message)` for what this runtime hosts now.
    #[zbus(property)]
    async fn instances(&self) -> Vec<(String, String, String, String)> {
        self.supervisor.instances()
    }

    /// An instance changed state: `starting`, `ok`, `self-exiting`, `error` or `stopped`.
    #[zbus(signal)]
    async fn instance_changed(
        emitter: &SignalEmitter<'_>,
        instance: &str,
        status: &str,
        failure_message: &str,
    ) -> zbus::Result<()>;
}

/// Emits every instance change as `InstanceChanged` and `PropertiesChanged(Instances)`, in
/// order, until the supervisor closes its event stream.
async fn publish_events(
    conn: zbus::Connection,
    mut events: mpsc::UnboundedReceiver<InstanceEvent>,
) {
    let iface = match conn
        .object_server()
        .interface::<_, ContainerRuntime>(RUNTIME_CONTAINER_PATH)
        .await
    {
        Ok(iface) => iface,
        Err(e) => {
            warn!("instance changes will not be published: {e}");
            return;
        }
    };
    while let Some(ev) = events.recv().await {
        let emitter = iface.signal_emitter();
        if let Err(e) = ContainerRuntime::instance_changed(
            emitter,
            &ev.instance,
            &ev.status,
            &ev.failure_message,
        )
        .await
        {
            warn!(instance = %ev.instance, "emitting InstanceChanged failed: {e}");
        }
        if let Err(e) = iface.get().await.instances_changed(emitter).await {
            warn!(instance = %ev.instance, "emitting PropertiesChanged(Instances) failed: {e}");
        }
    }
}

/// Runs runtimed-container until SIGTERM, then exits, leaving its instances running for its
/// next start (or stopping them, with `[container] stop_instances_on_exit = true`).
pub async fn run(args: DaemonArgs) -> Result<()> {
    let config = AgentConfig::load(&args)?;
    let section: ContainerConfig = config.section("container")?;
    let bus = evp_daemon::bus_builder(&args)?;
    serve(
        &section,
        config.common.data_dir.join("instances"),
        bus,
        async {
            let _ = evp_daemon::wait_for_shutdown().await;
        },
    )
    .await
}

/// Re-adopts what the previous run left, serves the bus until `shutdown` resolves, then does
/// what `section` says with the instances.
pub async fn serve(
    section: &ContainerConfig,
    instances_dir: PathBuf,
    bus: zbus::connection::Builder<'static>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    section.validate()?;
    let (supervisor, events) = Supervisor::new(
        instances_dir.clone(),
        vec![Arc::new(spawn::SpawnRuntime::new(section.log_policy())) as Arc<dyn runtime::Runtime>],
    );
    // Before the name is owned, so a StartInstance of a re-adopted instance is already the
    // no-op it is for any running one.
    supervisor.recover().await;
    let conn = bus
        .name(RUNTIME_CONTAINER_NAME)
        .serve_at(
            RUNTIME_CONTAINER_PATH,
            ContainerRuntime::new(supervisor.clone()),
        )
        .build()
        .await
        .with_context(|| format!("connecting to D-Bus as {RUNTIME_CONTAINER_NAME}"))?;
    let publisher = tokio::spawn(publish_events(conn.clone(), events));
    info!(
        kinds = ?supervisor.kinds(),
        instances_dir = %instances_dir.display(),
        "serving {RUNTIME_CONTAINER_NAME}"
    );
    evp_daemon::notify_ready();
    shutdown.await;

    let on_exit = section.on_exit();
    supervisor.shutdown(on_exit).await;
    if tokio::time::timeout(EVENT_FLUSH_TIMEOUT, publisher)
        .await
        .is_err()
    {
        warn!("the last instance changes did not reach the bus in time");
    }
    match on_exit {
        OnExit::Stop { .. } => info!("all instances stopped"),
        OnExit::LeaveRunning => info!("exiting; instances left running"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_outlive_the_daemon_unless_configured_otherwise() {
        let parse = |text: &str| -> ContainerConfig {
            let config = AgentConfig::parse(text).unwrap();
            config.section("container").unwrap()
        };
        let default = parse("");
        assert_eq!(default.on_exit(), OnExit::LeaveRunning);
        assert_eq!(default.log_policy().max_bytes, 1024 * 1024);
        default.validate().unwrap();

        let set = parse(
            "[container]\nstop_instances_on_exit = true\nstop_grace_ms = 300\nlog_max_bytes = 4096\n",
        );
        assert_eq!(
            set.on_exit(),
            OnExit::Stop {
                grace: Duration::from_millis(300)
            }
        );
        assert_eq!(set.log_policy().max_bytes, 4096);
        assert!(matches!(
            parse("[container]\nlog_max_bytes = 0\n").validate(),
            Err(ConfigError::ZeroLogMaxBytes)
        ));
    }
}
