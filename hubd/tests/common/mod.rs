//! What the MQTT session tests share: a broker-local configuration, and `core::run` started
//! with the test holding the other ends of its links (reconcilerd and sdk-broker played by
//! channels).

use std::time::Duration;

use evp_hubd::config::{HubConfig, HubSection, resolve};
use evp_hubd::core::{
    self, ApplyOutcome, ConfigurationDelivery, ConnectionState, DeploymentRequest, Links,
};
use evp_hubd::device_config::DeviceConfigStore;
use evp_schemas::DeploymentStatus;
use rumqttc::MqttOptions;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Upper bound for an awaited condition of the session.
pub const WAIT: Duration = Duration::from_secs(15);

/// `section` for the broker on 127.0.0.1:`port`, resolved without any environment.
pub fn local_config(port: u16, section: HubSection) -> HubConfig {
    resolve(
        HubSection {
            mqtt_host: Some("127.0.0.1".into()),
            mqtt_port: Some(port),
            ..section
        },
        |_| None,
    )
    .unwrap()
}

/// The test's ends of the session's [`Links`]; dropping one would look like the daemon it
/// stands for going away, so keep them until the session stopped.
#[allow(
    dead_code,
    reason = "a test that only watches the connection holds the other ends unread"
)]
pub struct Ends {
    /// What hubd asks reconcilerd to apply.
    pub deployments: watch::Receiver<Option<DeploymentRequest>>,
    /// reconcilerd's answers.
    pub outcomes: mpsc::Sender<ApplyOutcome>,
    /// Configurations hubd delivers to sdk-broker.
    pub configurations: mpsc::Receiver<ConfigurationDelivery>,
    /// reconcilerd's deployment status.
    pub status: watch::Sender<Option<DeploymentStatus>>,
    /// The connection state hubd publishes.
    pub connection: watch::Receiver<ConnectionState>,
}

/// A running `core::run`.
pub struct Session {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Starts the MQTT session of `cfg` with `options` on a task.
pub fn start(cfg: HubConfig, options: MqttOptions, store: DeviceConfigStore) -> (Session, Ends) {
    let (deployments_tx, deployments) = watch::channel(None);
    let (outcomes, outcomes_rx) = mpsc::channel(16);
    let (config_tx, configurations) = mpsc::channel(16);
    let (status, status_rx) = watch::channel(None);
    let (connection_tx, connection) = watch::channel(ConnectionState::Disconnected);
    let links = Links {
        deployments: deployments_tx,
        outcomes: outcomes_rx,
        configurations: config_tx,
        status: status_rx,
        connection: connection_tx,
    };
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(core::run(cfg, options, store, None, links, async {
        let _ = stop_rx.await;
    }));
    let ends = Ends {
        deployments,
        outcomes,
        configurations,
        status,
        connection,
    };
    (Session { stop, task }, ends)
}

impl Session {
    /// Asks the session to stop and asserts that it ends cleanly.
    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the session did not stop")
            .unwrap()
            .unwrap();
    }
}

/// Waits up to `timeout` for the connection state to satisfy `pred`; false when it did not.
pub async fn wait_connection(
    connection: &mut watch::Receiver<ConnectionState>,
    timeout: Duration,
    pred: impl FnMut(&ConnectionState) -> bool,
) -> bool {
    tokio::time::timeout(timeout, connection.wait_for(pred))
        .await
        .is_ok_and(|r| r.is_ok())
}
