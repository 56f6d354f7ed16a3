//! The device's way to the hub. Through an HTTP CONNECT proxy (`EVP_MQTT_PROXY_*`): the tests'
//! proxy on loopback checks Basic auth and tunnels to mosquitto's mutual-TLS listener, so the
//! TLS handshake (verified against the broker's name) runs inside the tunnel; the proxy is cut
//! and restored, and a wrong password is refused with a clear error. To a broker cluster
//! (`mqtt_failover_brokers`): two mosquitto nodes bridged to the hub's, one killed at a time.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use evp_schemas::dbus::SdkBroker1Proxy;
use evp_system_tests::mosquitto::{Mosquitto, wait_bridge_up};
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

/// A cluster of two mosquitto nodes, each bridged to the System's mosquitto where the hub
/// listens; the device is given node 1 as `mqtt_host` and node 2 in `mqtt_failover_brokers`.
struct Cluster {
    nodes: [Mosquitto; 2],
    core: u16,
}

const NODE_NAMES: [&str; 2] = ["node1", "node2"];

impl Cluster {
    async fn start(sys: &System, ports: [u16; 2], up: usize) -> Mosquitto {
        let dir = sys.dir.path().join(NODE_NAMES[up]);
        std::fs::create_dir_all(&dir).unwrap();
        let node =
            Mosquitto::start_node(&dir, ports[up], sys.mosquitto.port, NODE_NAMES[up]).unwrap();
        wait_bridge_up(sys.mosquitto.port, NODE_NAMES[up])
            .await
            .unwrap();
        node
    }

    /// Restarts node `i` and waits until it is bridged again.
    async fn restart(&mut self, i: usize) {
        self.nodes[i].restart().unwrap();
        wait_bridge_up(self.core, NODE_NAMES[i]).await.unwrap();
    }
}

/// Waits until hubd says it connected to `port`, after `after` such lines.
async fn wait_connected_to(sys: &System, port: u16, after: usize) -> usize {
    let log = sys.stack.config().log_dir().join("evp-hubd.log");
    let want = format!("connected to the MQTT broker 127.0.0.1:{port}");
    wait_for(
        &format!("hubd to connect to {port}"),
        DEADLINE,
        async || {
            let text = std::fs::read_to_string(&log).ok()?;
            let count = text.lines().filter(|l| l.contains(&want)).count();
            (count > after).then_some(count)
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_fails_over_to_the_next_broker_and_back_and_keeps_working() {
    let ports = [
        evp_system_tests::free_port().unwrap(),
        evp_system_tests::free_port().unwrap(),
    ];
    let sys = System::start_with(Options {
        env: vec![("EVP_MQTT_PORT".into(), ports[0].to_string())],
        extra_toml: format!(
            "[hub]\nmqtt_failover_brokers = [\"127.0.0.1:{}\"]\n",
            ports[1]
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let hub = hub1(&sys).await;
    // Node 1 first, so that the device is on it when node 2 comes.
    let first = Cluster::start(&sys, ports, 0).await;
    wait_connection(&hub, true, DEADLINE).await;
    let second = Cluster::start(&sys, ports, 1).await;
    let mut cluster = Cluster {
        nodes: [first, second],
        core: sys.mosquitto.port,
    };
    let on_first = wait_connected_to(&sys, ports[0], 0).await;
    let module = ("one", "evp-test-ticker");
    deploy_and_wait(&sys, &deployment_of("dep-node1", &[module])).await;

    // Node 1 goes away: the device moves to node 2, where reports and deployments flow.
    cluster.nodes[0].stop();
    let on_second = wait_connected_to(&sys, ports[1], 0).await;
    let reports = sys.hub.status_count();
    deploy_and_wait(&sys, &deployment_of("dep-node2", &[module])).await;
    assert!(sys.hub.status_count() > reports);

    // Node 1 back, node 2 away: the device moves back to node 1.
    cluster.restart(0).await;
    cluster.nodes[1].stop();
    wait_connected_to(&sys, ports[0], on_first).await;
    deploy_and_wait(&sys, &deployment_of("dep-node1-again", &[module])).await;
    assert_eq!(on_second, 1, "connected to node 2 once");
    assert_eq!(hub.connection().await.unwrap(), "connected");
    sys.stop().await;
}
