//! MQTT over mutual TLS against a real mosquitto: the broker's certificate is verified against
//! the configured CA, a wrong CA fails, and the insecure switch gets past it; through the
//! tests' CONNECT proxy, TLS inside the tunnel is verified against the broker's name. Fails
//! when mosquitto is not installed.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{local_config, wait_connection};
use evp_hubd::config::HubSection;
use evp_hubd::core::{self, ConnectionState};
use evp_hubd::device_config::DeviceConfigStore;
use evp_system_tests::certs::{self, Pki};
use evp_system_tests::mosquitto::{Mosquitto, TlsFiles};
use evp_system_tests::proxy::ConnectProxy;

/// CN of the client certificate, which becomes the MQTT client id.
const DEVICE_CN: &str = "device-cn-7";

/// The proxy's Basic-auth user and password.
const PROXY_USER: &str = "device";
const PROXY_PASSWORD: &str = "proxy secret";

/// How a session names and reaches the broker.
#[derive(Clone, Copy)]
struct Route<'a> {
    /// `mqtt_host`, the name the broker's certificate must carry.
    host: &'a str,
    /// The CONNECT proxy on the way, if any.
    proxy: Option<&'a ConnectProxy>,
}

const DIRECT: Route<'static> = Route {
    host: "127.0.0.1",
    proxy: None,
};

/// Runs a session with `ca` and the insecure switch along `route`; true when it reached
/// `connected`.
async fn connects(
    dir: &Path,
    route: Route<'_>,
    port: u16,
    pki: &Pki,
    ca: &Path,
    insecure: bool,
) -> bool {
    let mut cfg = local_config(
        port,
        HubSection {
            tls_ca_cert: Some(ca.to_owned()),
            tls_client_cert: Some(pki.client_cert.clone()),
            tls_client_key: Some(pki.client_key.clone()),
            tls_insecure_skip_verify: Some(insecure),
            mqtt_proxy_host: route.proxy.map(|_| "127.0.0.1".to_owned()),
            mqtt_proxy_port: route.proxy.map(|p| p.port),
            mqtt_proxy_username: route.proxy.map(|_| PROXY_USER.to_owned()),
            mqtt_proxy_password: route.proxy.map(|_| PROXY_PASSWORD.to_owned()),
            ..Default::default()
        },
    );
    cfg.mqtt_host = route.host.to_owned();
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
    let broker = Mosquitto::start(dir.path(), Some(&TlsFiles::server_of(&pki))).unwrap();
    let port = broker.tls_port.unwrap();
    assert!(connects(dir.path(), DIRECT, port, &pki, &pki.ca, false).await);
    assert!(
        !connects(dir.path(), DIRECT, port, &pki, &pki.other_ca, false).await,
        "a broker certificate from another CA is refused"
    );
    assert!(
        connects(dir.path(), DIRECT, port, &pki, &pki.other_ca, true).await,
        "the development switch skips verification"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_through_the_proxy_is_verified_against_the_brokers_name() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    // The broker's certificate names `localhost` only; the proxy is reached as 127.0.0.1.
    let pki = certs::make_for(dir.path(), DEVICE_CN, &["localhost"]).unwrap();
    let broker = Mosquitto::start(dir.path(), Some(&TlsFiles::server_of(&pki))).unwrap();
    let port = broker.tls_port.unwrap();
    let proxy = ConnectProxy::start(PROXY_USER, PROXY_PASSWORD)
        .await
        .unwrap();
    let by_name = Route {
        host: "localhost",
        proxy: Some(&proxy),
    };
    assert!(connects(dir.path(), by_name, port, &pki, &pki.ca, false).await);
    let target = format!("localhost:{port}");
    assert!(
        proxy
            .requests()
            .iter()
            .any(|r| r.target == target && r.status == 200 && r.first_byte == Some(0x16)),
        "the tunnel was asked for the broker by name and carried TLS: {:?}",
        proxy.requests()
    );
    let by_address = Route {
        host: "127.0.0.1",
        proxy: Some(&proxy),
    };
    assert!(
        !connects(dir.path(), by_address, port, &pki, &pki.ca, false).await,
        "a broker whose certificate does not name it is refused inside the tunnel too"
    );
}
