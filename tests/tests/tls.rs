//! MQTT over mutual TLS against mosquitto configured to require client certificates, with a
//! PKI the test makes: the device connects and works, a broker it cannot verify is refused,
//! and credentials renewed on disk are used without a restart (broken ones refused).

use std::path::Path;
use std::time::Instant;

use evp_system_tests::system::{
    DEVICE, Options, System, deploy_and_wait, deployment, deployment_of, hub1, instance_status,
    wait_log_line,
};
use evp_system_tests::telemetry::{Received, first_arrivals, tick};
use evp_system_tests::{DEADLINE, certs, wait_for};

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

/// Replaces `path` as renewal tools do: a new file renamed over the old one.
fn replace(path: &Path, contents: impl AsRef<[u8]>) {
    let new = path.with_extension("new");
    std::fs::write(&new, contents).unwrap();
    std::fs::rename(&new, path).unwrap();
}

/// Connections mosquitto accepted from client id `cn` (with `use_identity_as_username`, the
/// user name is the certificate's CN: `... as <id> (p2, c1, k30, u'<CN>')`).
fn connections_as(sys: &System, cn: &str) -> usize {
    let log = std::fs::read_to_string(sys.dir.path().join("mosquitto.log")).unwrap();
    let id = format!(" as {cn} (");
    let user = format!("u'{cn}'");
    log.lines()
        .filter(|l| l.contains("New client connected") && l.contains(&id) && l.contains(&user))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn renewed_credentials_are_used_without_a_restart_and_broken_ones_are_refused() {
    /// The CN of the renewed certificate: the device's new client id, which mosquitto shows.
    const RENEWED: &str = "device-renewed";
    /// Values the ticker sends (every 20 ms): more than the test's run.
    const COUNT: u64 = 100_000;
    let sys = System::start_with(Options {
        tls: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let pki = sys.pki.clone().unwrap();
    deploy_and_wait(
        &sys,
        &deployment_of("dep-tick", &[("t1", "evp-test-ticker")]),
    )
    .await;
    let received = Received::follow(&sys).await;
    tick(&sys, "t1", COUNT, 20).await;
    received.wait_distinct("t1", 20, DEADLINE).await;
    let hub = hub1(&sys).await;
    assert_eq!(connections_as(&sys, DEVICE), 1);

    // A broken certificate: refused with the file named, the connection kept.
    replace(
        &pki.client_cert,
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
    );
    let line = wait_log_line(&sys, "evp-hubd", &["refused the changed MQTT TLS files"]).await;
    assert!(line.contains(&path_str(&pki.client_cert)), "{line}");
    let flowing = received.distinct("t1");
    received.wait_distinct("t1", flowing + 20, DEADLINE).await;
    assert_eq!(hub.connection().await.unwrap(), "connected");
    assert_eq!(connections_as(&sys, DEVICE), 1, "the connection was kept");

    // A renewal: the certificate of a new key and CN, left alone long enough to be refused as
    // not matching the old key; a new CA bundle (the CA, and one more); then the key.
    let (cert, key) = certs::renewed_client(&pki, RENEWED).unwrap();
    replace(&pki.client_cert, cert);
    let line = wait_log_line(&sys, "evp-hubd", &["is not the key of the certificate"]).await;
    assert!(line.contains(&path_str(&pki.client_key)), "{line}");
    let mut bundle = std::fs::read(&pki.ca).unwrap();
    bundle.extend(std::fs::read(&pki.other_ca).unwrap());
    replace(&pki.ca, bundle);
    assert_eq!(connections_as(&sys, RENEWED), 0);
    let key_written = Instant::now();
    replace(&pki.client_key, key);
    wait_for(
        "the device connected as its renewed CN",
        DEADLINE,
        async || (connections_as(&sys, RENEWED) > 0).then_some(()),
    )
    .await
    .unwrap();
    eprintln!(
        "renewed credentials: connected with them {:?} after the key was written",
        key_written.elapsed()
    );

    // Telemetry went on over the new connection, and none was lost on the way: every value
    // arrived, the first time in order (a value sent again after the reconnect is allowed).
    let renewed = received.distinct("t1");
    received.wait_distinct("t1", renewed + 50, DEADLINE).await;
    let values = received.of("t1");
    let order = first_arrivals(&values);
    assert!(
        order.iter().copied().eq(0..order.len() as u64),
        "a value is missing or late: {:?}",
        order.windows(2).find(|w| w[1] != w[0] + 1)
    );
    eprintln!(
        "renewed credentials: {} values, {} sent twice",
        order.len(),
        values.len() - order.len()
    );
    assert_eq!(hub.connection().await.unwrap(), "connected");
    assert_eq!(connections_as(&sys, RENEWED), 1, "one reconnection");
    assert_eq!(
        connections_as(&sys, DEVICE),
        1,
        "no restart with the old files"
    );
    sys.stop().await;
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}
