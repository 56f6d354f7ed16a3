//! The provisioning session against a real mosquitto, with the devhub's hub side answering:
//! the first broker of the hub is down, the next one provisions the device, and the token is
//! kept. Fails when mosquitto is not installed.

use std::time::Duration;

use evp_devhub::hub::{HubSide, ProvisionProfile};
use evp_hubd::config::{HubSection, ProvisionKey, resolve};
use evp_hubd::core::ConnectionState;
use evp_hubd::provision::{Credentials, session, store};
use evp_system_tests::mosquitto::Mosquitto;
use tokio::sync::watch;

/// Upper bound for the provisioning: one refused connection, a backoff of at most 1 s, one
/// exchange on loopback.
const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn provisioning_goes_on_to_the_next_broker_of_the_hub_and_keeps_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path(), None).unwrap();
    let hub = HubSide::connect(&mosquitto.url()).await.unwrap();
    let profile = ProvisionProfile::generated();
    hub.set_provisioning(Some(profile.clone()));
    // Nothing listens on the first broker's port.
    let down = evp_system_tests::free_port().unwrap();
    let section = HubSection {
        mqtt_host: Some("127.0.0.1".into()),
        mqtt_port: Some(down),
        mqtt_failover_brokers: Some(vec![format!("127.0.0.1:{}", mosquitto.port)]),
        client_id: Some("dev-1".into()),
        ..HubSection::default()
    };
    let cfg = resolve(section, |_| None).unwrap();
    let key = ProvisionKey {
        key: profile.key.clone(),
        secret: profile.secret.clone(),
    };
    let (connection, shown) = watch::channel(ConnectionState::Disconnected);
    let obtained = session::obtain(&cfg, None, &key, "dev-1", dir.path(), &connection);
    let credentials = tokio::time::timeout(WAIT, obtained).await.unwrap();

    let token = hub.provisioned()["dev-1"].clone();
    assert_eq!(credentials, Credentials::AccessToken { token });
    assert_eq!(store::load(dir.path()).unwrap(), Some(credentials));
    assert_eq!(*shown.borrow(), ConnectionState::Provisioning);
    assert_eq!(
        hub.provision_requests().len(),
        1,
        "one request, to the broker that is up"
    );
    hub.close().await;
}
