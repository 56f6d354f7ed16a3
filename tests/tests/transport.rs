//! The device's way to the hub through an HTTP CONNECT proxy (`EVP_MQTT_PROXY_*`): the tests'
//! proxy on loopback checks Basic auth and tunnels to mosquitto's mutual-TLS listener, so the
//! TLS handshake (verified against the broker's name) runs inside the tunnel; the proxy is cut
//! and restored, and a wrong password is refused with a clear error.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use evp_schemas::dbus::SdkBroker1Proxy;
use evp_system_tests::system::{
    Options, System, deploy_and_wait, deployment_of, hub1, wait_connection, wait_log_line,
};
use evp_system_tests::{DEADLINE, wait_for};

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// The `seq` values of `instance`'s telemetry the hub received.
fn collect_seqs(sys: &System, instance: &str) -> Arc<Mutex<BTreeSet<u64>>> {
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let (into, key) = (Arc::clone(&seen), format!("{instance}/seq"));
    let mut reports = sys.hub.subscribe();
    tokio::spawn(async move {
        while let Ok(report) = reports.recv().await {
            if let evp_devhub::DeviceReport::Telemetry(v) = report
                && let Some(n) = v.get(&key).and_then(|n| n.as_u64())
            {
                into.lock().unwrap().insert(n);
            }
        }
    });
    seen
}

async fn wait_seqs(seen: &Mutex<BTreeSet<u64>>, n: u64) {
    wait_for(&format!("{n} telemetry values"), DEADLINE, async || {
        (seen.lock().unwrap().len() as u64 >= n).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        let got = seen.lock().unwrap().clone();
        let missing: Vec<u64> = (0..n).filter(|v| !got.contains(v)).take(10).collect();
        panic!("{e}: {} received, missing {missing:?}", got.len())
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt_tunnels_through_the_proxy_with_tls_inside_and_comes_back_after_a_cut() {
    const COUNT: u64 = 40;
    let sys = System::start_with(Options {
        tls: true,
        proxy: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let hub = hub1(&sys).await;
    wait_connection(&hub, true, DEADLINE).await;
    let proxy = sys.proxy.as_ref().unwrap();
    let broker = format!("127.0.0.1:{}", sys.mosquitto.tls_port.unwrap());
    let requests = proxy.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.target == broker && r.status == 200 && r.first_byte == Some(TLS_HANDSHAKE)),
        "hubd's CONNECT to {broker}, authenticated, carrying TLS: {requests:?}"
    );
    // Reports and deployments flow through the tunnel.
    deploy_and_wait(
        &sys,
        &deployment_of("dep-proxy", &[("t", "evp-test-ticker")]),
    )
    .await;
    let seen = collect_seqs(&sys, "t");
    let sdk = SdkBroker1Proxy::new(&sys.conn).await.unwrap();
    for (topic, value) in [("period_ms", 50u64), ("count", COUNT)] {
        sdk.deliver_configuration("t", topic, value.to_string().as_bytes())
            .await
            .unwrap();
    }
    wait_seqs(&seen, 3).await;

    // Cut: the tunnel is reset and the proxy refuses; the ticker goes on into hubd's spool.
    proxy.down();
    wait_connection(&hub, false, DEADLINE).await;
    let log = sys.instance_dir("t").join("logs/stderr.log");
    wait_for("the ticker to finish", DEADLINE, async || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains(&format!("ticker: all {COUNT} done"))
            .then_some(())
    })
    .await
    .unwrap();
    let tunnels_before = proxy.requests().len();
    proxy.up().await.unwrap();
    wait_connection(&hub, true, DEADLINE).await;
    wait_seqs(&seen, COUNT).await;
    assert!(
        proxy.requests()[tunnels_before..]
            .iter()
            .any(|r| r.target == broker && r.status == 200),
        "the reconnection went through the proxy: {:?}",
        proxy.requests()
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_proxy_password_is_refused_with_an_error_naming_the_settings() {
    let sys = System::start_with(Options {
        proxy: true,
        env: vec![("EVP_MQTT_PROXY_PASSWORD".into(), "wrong".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    let line = wait_log_line(&sys, "evp-hubd", &["407", "through the proxy"]).await;
    assert!(
        line.contains("EVP_MQTT_PROXY_PASSWORD") && !line.contains("wrong"),
        "{line}"
    );
    let hub = hub1(&sys).await;
    assert_ne!(hub.connection().await.unwrap(), "connected");
    let requests = sys.proxy.as_ref().unwrap().requests();
    assert!(
        !requests.is_empty() && requests.iter().all(|r| r.status == 407),
        "{requests:?}"
    );
    assert_eq!(sys.hub.status_count(), 0, "a report got past the proxy");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_inside_the_tunnel_still_verifies_the_broker() {
    let sys = System::start_with(Options {
        tls: true,
        wrong_ca: true,
        proxy: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let line = wait_log_line(
        &sys,
        "evp-hubd",
        &["invalid peer certificate", "through the proxy"],
    )
    .await;
    assert!(line.contains("UnknownIssuer"), "{line}");
    let hub = hub1(&sys).await;
    assert_ne!(hub.connection().await.unwrap(), "connected");
    assert_eq!(
        sys.hub.status_count(),
        0,
        "a report reached an unverified broker"
    );
    sys.stop().await;
}
