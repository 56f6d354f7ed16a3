//! reconcilerd: owns the desired deployment. It validates and persists what hubd hands it,
//! downloads and verifies modules into a cache, drives the runtimes so the device matches the
//! deployment, and publishes the status as `org.evp.Reconciler1.DeploymentStatus`.
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod reconcile;
pub mod store;

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use evp_daemon::{AgentConfig, DaemonArgs};
use evp_schemas::dbus::{EvpError, RECONCILER_NAME, RECONCILER_PATH};
use evp_schemas::{Deployment, DeploymentStatus, ReconcileStatus};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{error, info};
use zbus::interface;

use crate::reconcile::{Desired, Reconciler, SharedStatus, StatusChanged};
use crate::store::{DesiredStore, ModuleCache};

/// The `[reconciler]` section of agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcilerConfig {
    /// How long an instance may take to exit when stopped before it is killed. EVP gives
    /// spawned modules 10 s.
    #[serde(default = "default_stop_grace_ms")]
    pub stop_grace_ms: u32,
}

fn default_stop_grace_ms() -> u32 {
    10_000
}

/// The `org.evp.Reconciler1` object.
pub struct ReconcilerService {
    store: DesiredStore,
    desired_tx: watch::Sender<Desired>,
    status: SharedStatus,
}

impl ReconcilerService {
    fn status(&self) -> DeploymentStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[interface(name = "org.evp.Reconciler1")]
impl ReconcilerService {
    /// Validates and persists the deployment, answers, then reconciles in the background.
    async fn apply_deployment(&self, deployment_json: &str) -> Result<(), EvpError> {
        let deployment = Deployment::from_json(deployment_json)
            .map_err(|e| EvpError::InvalidManifest(e.to_string()))?;
        self.store
            .save(&deployment)
            .map_err(|e| EvpError::Io(e.to_string()))?;
        info!(
            deployment = deployment.deployment_id.as_deref().unwrap_or("-"),
            instances = deployment.instance_specs.len(),
            "deployment accepted"
        );
        self.desired_tx
            .send_modify(|d| d.deployment = Some(deployment));
        Ok(())
    }

    /// Holds deployment changes until resumed.
    async fn pause_deployment(&self) {
        self.desired_tx.send_modify(|d| d.paused = true);
    }

    /// Resumes deployment changes.
    async fn resume_deployment(&self) {
        self.desired_tx.send_modify(|d| d.paused = false);
    }

    /// The canonical status JSON.
    #[zbus(property)]
    async fn deployment_status(&self) -> String {
        self.status().to_json()
    }

    /// `applying`, `ok`, `error` or `paused`; empty before any deployment.
    #[zbus(property)]
    async fn reconcile_status(&self) -> String {
        self.status()
            .reconcile_status
            .map(ReconcileStatus::as_str)
            .unwrap_or_default()
            .to_owned()
    }
}

/// Runs reconcilerd until SIGTERM.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let config = AgentConfig::load(&args)?;
    let section: ReconcilerConfig = config.section("reconciler")?;
    let store = DesiredStore::new(config.data_subdir("deployment")?);
    let modules_dir = config.common.data_dir.join("modules");
    create_shared_dir(&modules_dir)?;
    let cache = ModuleCache::new(modules_dir)?;

    let initial = store.load();
    if let Some(d) = &initial {
        info!(
            deployment = d.deployment_id.as_deref().unwrap_or("-"),
            "resuming the last desired deployment from disk"
        );
    }
    let (desired_tx, desired_rx) = watch::channel(Desired {
        deployment: initial,
        paused: false,
    });
    let status: SharedStatus = Arc::new(Mutex::new(DeploymentStatus::default()));
    let service = ReconcilerService {
        store,
        desired_tx,
        status: status.clone(),
    };
    let conn = evp_daemon::bus_builder(&args)?
        .name(RECONCILER_NAME)
        .serve_at(RECONCILER_PATH, service)
        .build()
        .await
        .context("connecting to D-Bus as org.evp.Reconciler1")?;
    let iface = conn
        .object_server()
        .interface::<_, ReconcilerService>(RECONCILER_PATH)
        .await
        .context("looking up our own object")?;
    let (changed_tx, mut changed_rx) = watch::channel(());
    let changed: StatusChanged = Arc::new(move || {
        let _ = changed_tx.send(());
    });
    // PropertiesChanged is emitted from one task, coalescing bursts of updates.
    tokio::spawn(async move {
        while changed_rx.changed().await.is_ok() {
            let this = iface.get().await;
            let emitter = iface.signal_emitter();
            if let Err(e) = this.deployment_status_changed(emitter).await {
                error!("emitting DeploymentStatus change: {e}");
            }
            if let Err(e) = this.reconcile_status_changed(emitter).await {
                error!("emitting ReconcileStatus change: {e}");
            }
        }
    });
    tokio::spawn(reconcile::follow_runtime_events(
        conn.clone(),
        status.clone(),
        changed.clone(),
    ));
    let reconciler = Reconciler::new(conn.clone(), cache, status, changed, section.stop_grace_ms);
    tokio::spawn(reconciler.run(desired_rx));
    info!("serving {RECONCILER_NAME}");
    evp_daemon::notify_ready();
    evp_daemon::wait_for_shutdown().await
}

/// The module cache is read by the runtimes through its group (set-group-id, so files inherit
/// it); nobody else may look in.
fn create_shared_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o2750)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}
