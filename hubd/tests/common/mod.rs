//! What the MQTT session tests share: a broker-local configuration, and `core::run` started
//! with the test holding the other ends of its links (reconcilerd and sdk-broker played by
//! channels).

use std::time::Duration;

use evp_hubd::config::{HubConfig, HubSection, resolve};
use evp_hubd::core::{self, ConnectionState, LinkEnds, Links};
use evp_hubd::device_config::DeviceConfigStore;
use rumqttc::MqttOptions;
use tokio::sync::{oneshot, watch};
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

/// A running `core::run`.
pub struct Session {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Starts the MQTT session of `cfg` with `options` on a task. The test holds the other ends
/// of its links (reconcilerd, the configuration delivery, `Hub1.Connection`); dropping one
/// would look like what it stands for going away, so keep them until the session stopped.
pub fn start(
    cfg: HubConfig,
    options: MqttOptions,
    store: DeviceConfigStore,
) -> (Session, LinkEnds) {
    let (links, ends) = Links::new();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(core::run(cfg, options, store, None, links, async {
        let _ = stop_rx.await;
    }));
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
