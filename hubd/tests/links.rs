//! Links that fail without closing, and a broker that keeps handing hubd a message too large
//! for it: the session notices a dead link within its keep-alive bound and reconnects, and an
//! oversized message is dropped and reported, never a reason to lose the connection.
//!
//! The dead link is made for real: mosquitto runs in a network namespace the test creates,
//! behind a veth pair, and a `tc` blackhole qdisc in that namespace drops every packet it
//! sends (a NAT that forgot the flow, a cut cable). Needs root and iproute2, as CI has.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{WAIT, local_config, wait_connection};
use evp_hubd::config::{HubSection, resolve};
use evp_hubd::core::{self, ConnectionState};
use evp_hubd::device_config::DeviceConfigStore;
use evp_system_tests::mosquitto::{self, Mosquitto};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Runs `cmd` and fails the test with its output if it fails.
fn run(cmd: &[&str]) {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a veth pair to the test's own, and mosquitto listening inside it.
struct Island {
    ns: String,
    inner_if: String,
    broker_ip: String,
    broker: Child,
    _dir: tempfile::TempDir,
}

impl Island {
    fn start() -> Island {
        let id = std::process::id() % 200 + 20;
        let ns = format!("evp-island-{}", std::process::id());
        let (outer_if, inner_if) = (format!("evpo{id}"), format!("evpi{id}"));
        let (host_ip, broker_ip) = (format!("10.213.{id}.1"), format!("10.213.{id}.2"));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run(&["ip", "netns", "add", &ns]);
        run(&[
            "ip", "link", "add", &outer_if, "type", "veth", "peer", "name", &inner_if,
        ]);
        run(&["ip", "link", "set", &inner_if, "netns", &ns]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &outer_if,
        ]);
        run(&["ip", "link", "set", &outer_if, "up"]);
        let inside = ["ip", "netns", "exec", ns.as_str()];
        let ip_in = |args: &[&str]| run(&[&inside[..], args].concat());
        ip_in(&[
            "ip",
            "addr",
            "add",
            &format!("{broker_ip}/30"),
            "dev",
            &inner_if,
        ]);
        ip_in(&["ip", "link", "set", &inner_if, "up"]);
        ip_in(&["ip", "link", "set", "lo", "up"]);
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "persistence false\nallow_anonymous true\nuser root\nlistener 1883 {broker_ip}\n"
            ),
        )
        .unwrap();
        let binary = mosquitto::binary().unwrap();
        let broker = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Island {
            ns,
            inner_if,
            broker_ip,
            broker,
            _dir: dir,
        }
    }

    /// Every packet the island sends is dropped from now on (or again delivered).
    fn blackhole(&self, on: bool) {
        let action = if on { "add" } else { "del" };
        let mut cmd = vec![
            "ip", "netns", "exec", &self.ns, "tc", "qdisc", action, "dev",
        ];
        cmd.extend([self.inner_if.as_str(), "root", "blackhole"]);
        run(&cmd);
    }
}

impl Drop for Island {
    fn drop(&mut self) {
        let _ = self.broker.kill();
        let _ = self.broker.wait();
        // Deleting the namespace deletes its end of the veth pair, and so the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_stops_carrying_packets_is_noticed_within_the_keep_alive_and_reconnected() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: making a network namespace needs root");
        return;
    }
    let island = Island::start();
    let keep_alive = Duration::from_secs(2);
    let cfg = resolve(
        HubSection {
            mqtt_host: Some(island.broker_ip.clone()),
            mqtt_port: Some(1883),
            client_id: Some("device-1".into()),
            mqtt_keep_alive_s: Some(keep_alive.as_secs()),
            ..Default::default()
        },
        |_| None,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = core::mqtt_options(&cfg, None);
    let (session, mut ends) = common::start(cfg, options, DeviceConfigStore::new(dir.path()));
    assert!(
        wait_connection(&mut ends.connection, WAIT, |c| *c
            == ConnectionState::Connected)
        .await,
        "hubd never connected to the broker in the namespace"
    );

    island.blackhole(true);
    let cut = Instant::now();
    assert!(
        wait_connection(&mut ends.connection, WAIT, |c| *c
            != ConnectionState::Connected)
        .await,
        "the dead link was never noticed"
    );
    let noticed = cut.elapsed();
    // A PINGREQ goes out every keep-alive; one unanswered at the next ends the connection. The
    // flush of a write that cannot leave may end it sooner; nothing may take longer.
    assert!(
        noticed <= keep_alive * 2 + Duration::from_millis(1500),
        "noticed after {noticed:?}, beyond twice the {keep_alive:?} keep-alive"
    );

    island.blackhole(false);
    assert!(
        wait_connection(&mut ends.connection, WAIT, |c| *c
            == ConnectionState::Connected)
        .await,
        "hubd did not reconnect once the link carried packets again"
    );
    eprintln!("dead link noticed after {noticed:?}");
    session.stop().await;
}

/// A client of the plain broker on `port` with room for `max` bytes each way; the messages of
/// the topics it subscribes to come out of the receiver.
async fn client(
    id: &str,
    port: u16,
    max: usize,
    topics: &[&str],
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Value)>) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(max, max);
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    for t in topics {
        client.subscribe(*t, QoS::AtMostOnce).await.unwrap();
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    let _ = tx.send((p.topic, v));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    ready.recv().await.unwrap();
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_too_large_are_dropped_and_reported_and_the_session_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), None).unwrap();
    // The hub leaves a 2 MB attribute message retained: every subscriber gets it at once.
    let (hub, mut seen) = client("hub", broker.port, 16 << 20, &["v1/devices/me/attributes"]).await;
    let huge = json!({ "junk": "x".repeat(2_000_000) }).to_string();
    hub.publish(
        "v1/devices/me/attributes",
        QoS::AtLeastOnce,
        true,
        huge.clone(),
    )
    .await
    .unwrap();

    let cfg = local_config(
        broker.port,
        HubSection {
            client_id: Some("device-1".into()),
            report_status_interval_min_ms: Some(0),
            ..Default::default()
        },
    );
    let options = core::mqtt_options(&cfg, None);
    let (session, mut ends) = common::start(cfg, options, DeviceConfigStore::new(dir.path()));
    let mut connects = ends.connection.clone();
    let connected = tokio::spawn(async move {
        let mut n = 0;
        while connects.changed().await.is_ok() {
            if *connects.borrow_and_update() == ConnectionState::Connected {
                n += 1;
            }
        }
        n
    });

    // The status report says what was dropped.
    let report = tokio::time::timeout(WAIT, async {
        loop {
            let (topic, v) = seen.recv().await.unwrap();
            if topic == "v1/devices/me/attributes"
                && v.get("state/$agent/incoming-dropped").is_some()
            {
                return v;
            }
        }
    })
    .await
    .expect("a status report counting the dropped message");
    let dropped = &report["state/$agent/incoming-dropped"];
    assert_eq!(dropped["count"], 1, "{dropped}");
    assert_eq!(dropped["lastTopic"], "v1/devices/me/attributes");
    assert_eq!(dropped["lastBytes"], huge.len());

    // A 10 MiB PATCH from a misbehaving hub: dropped the same way.
    let ten_mib = json!({ "deployment": "x".repeat(10 << 20) }).to_string();
    hub.publish(
        "v1/devices/me/attributes",
        QoS::AtLeastOnce,
        false,
        ten_mib.clone(),
    )
    .await
    .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            let (topic, v) = seen.recv().await.unwrap();
            if topic == "v1/devices/me/attributes"
                && v["state/$agent/incoming-dropped"]["count"] == 2
            {
                assert_eq!(
                    v["state/$agent/incoming-dropped"]["lastBytes"],
                    ten_mib.len()
                );
                return;
            }
        }
    })
    .await
    .expect("a status report counting the 10 MiB message");

    // The session goes on: a deployment after it is applied on the same connection.
    let d = json!({
        "deploymentId": "after-junk",
        "instanceSpecs": {}, "modules": {}, "publishTopics": {}, "subscribeTopics": {}
    });
    // The initial GET's answer lets PATCHes apply.
    hub.publish(
        "v1/devices/me/attributes/response/10000",
        QoS::AtLeastOnce,
        false,
        json!({"shared": {"deployment": d}, "client": {}}).to_string(),
    )
    .await
    .unwrap();
    tokio::time::timeout(
        WAIT,
        ends.deployments.wait_for(|r| {
            r.as_ref()
                .is_some_and(|r| r.deployment_id.as_deref() == Some("after-junk"))
        }),
    )
    .await
    .expect("the deployment after the junk")
    .unwrap();
    assert_eq!(*ends.connection.borrow(), ConnectionState::Connected);
    session.stop().await;
    assert_eq!(connected.await.unwrap(), 1, "the session reconnected");
}
