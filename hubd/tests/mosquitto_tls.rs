//! MQTT over mutual TLS against a real mosquitto: the broker's certificate is verified against
//! the configured CA, a wrong CA fails, and the insecure switch gets past it. Fails when
//! mosquitto is not installed.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{local_config, wait_connection};
use evp_hubd::config::HubSection;
use evp_hubd::core::{self, ConnectionState};
use evp_hubd::device_config::DeviceConfigStore;
use evp_system_tests::certs::{self, Pki};
use evp_system_tests::mosquitto::{Mosquitto, TlsFiles};

/// CN of the client certificate, which becomes the MQTT client id.
const DEVICE_CN: &str = "device-cn-7";

/// Runs a session with `ca` and the insecure switch; true when it reached `connected`.
async fn connects(dir: &Path, port: u16, pki: &Pki, ca: &Path, insecure: bool) -> bool {
    let cfg = local_config(
        port,
        HubSection {
            tls_ca_cert: Some(ca.to_owned()),
            tls_client_cert: Some(pki.client_cert.clone()),
            tls_client_key: Some(pki.client_key.clone()),
            tls_insecure_skip_verify: Some(insecure),
            ..Default::default()
        },
    );
    let tls = evp_hubd::tls::load(cfg.tls.as_ref().unwrap(), insecure).unwrap();
    assert_eq!(tls.client_cn.as_deref(), Some(DEVICE_CN));
    let options = core::mqtt_options(&cfg, Some(&tls));
    assert_eq!(options.client_id(), DEVICE_CN);
    let (session, mut ends) = common::start(cfg, options, DeviceConfigStore::new(dir));
    // A refused handshake never connects: this bound is how long the test gives it.
    let ok = wait_connection(&mut ends.connection, Duration::from_secs(4), |c| {
        *c == ConnectionState::Connected
    })
    .await;
    session.stop().await;
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_verifies_the_broker() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::make(dir.path(), DEVICE_CN).unwrap();
    let broker = Mosquitto::start(
        dir.path(),
        Some(&TlsFiles {
            ca: pki.ca.clone(),
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
        }),
    )
    .unwrap();
    let port = broker.tls_port.unwrap();
    assert!(connects(dir.path(), port, &pki, &pki.ca, false).await);
    assert!(
        !connects(dir.path(), port, &pki, &pki.other_ca, false).await,
        "a broker certificate from another CA is refused"
    );
    assert!(
        connects(dir.path(), port, &pki, &pki.other_ca, true).await,
        "the development switch skips verification"
    );
}
