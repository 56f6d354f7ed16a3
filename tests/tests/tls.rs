//! MQTT over mutual TLS against mosquitto configured to require client certificates, with a
//! PKI the test makes: the device connects and works, and a broker it cannot verify is refused.

use evp_system_tests::system::{Options, System, deployment, instance_status, wait_log_line};

#[tokio::test(flavor = "multi_thread")]
async fn device_works_over_mutual_tls() {
    let sys = System::start_with(Options {
        tls: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let (url, hash) = sys.module("a", "exec /bin/sleep 300").unwrap();
    sys.deploy(&deployment(
        "dep-tls",
        &[("one", "a")],
        &[("a", &url, &hash)],
    ))
    .await
    .unwrap();
    let status = sys
        .wait_status(|s| {
            s["deploymentId"] == "dep-tls"
                && s["reconcileStatus"] == "ok"
                && instance_status(s, "one") == "ok"
        })
        .await
        .unwrap();
    assert_eq!(status["modules"]["a"]["status"], "ok");
    let hub = evp_schemas::dbus::Hub1Proxy::new(&sys.conn).await.unwrap();
    assert_eq!(hub.connection().await.unwrap(), "connected");
    // The broker saw the device's certificate: it logs the client id it authenticated.
    let log = std::fs::read_to_string(sys.dir.path().join("mosquitto.log")).unwrap();
    assert!(log.contains(evp_system_tests::system::DEVICE), "{log}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_with_a_certificate_from_another_ca_is_refused() {
    let sys = System::start_with(Options {
        tls: true,
        wrong_ca: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let line = wait_log_line(&sys, "evp-hubd", &["invalid peer certificate"]).await;
    assert!(line.contains("UnknownIssuer"), "{line}");
    let hub = evp_schemas::dbus::Hub1Proxy::new(&sys.conn).await.unwrap();
    assert_ne!(hub.connection().await.unwrap(), "connected");
    assert_eq!(
        sys.hub.status_count(),
        0,
        "a report reached the hub over an unverified link"
    );
    sys.stop().await;
}
