//! The MQTT session against a real mosquitto, with the hub played by a test client and
//! reconcilerd and sdk-broker played by channels. Skipped when mosquitto is not installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use evp_hubd::config::{HubSection, resolve};
use evp_hubd::core::{self, ApplyOutcome, ConnectionState, DeploymentRequest, Links};
use evp_hubd::device_config::DeviceConfigStore;
use evp_schemas::{DeploymentStatus, ReconcileStatus};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

const WAIT: Duration = Duration::from_secs(15);

fn mosquitto() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("mosquitto"))
                    .find(|p| p.exists())
            })
        })
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_broker(bin: &Path, dir: &Path) -> (Broker, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let broker = Broker(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (broker, port);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("mosquitto did not listen on {port}");
}

/// The hub's side: every message the device publishes, as (topic, JSON).
async fn hub_client(port: u16) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Value)>) {
    let mut o = MqttOptions::new("hub", "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    client
        .subscribe("v1/devices/me/attributes/request/+", QoS::AtMostOnce)
        .await
        .unwrap();
    client
        .subscribe("v1/devices/me/attributes", QoS::AtMostOnce)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    tokio::spawn(async move {
        let mut subacks = 0;
        let mut errors = 0;
        loop {
            let ev = match eventloop.poll().await {
                Ok(ev) => ev,
                // The broker may still be starting: rumqttc reconnects on the next poll.
                Err(e) if errors < 50 => {
                    errors += 1;
                    eprintln!("hub client: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(_) => break,
            };
            match ev {
                Event::Incoming(Packet::SubAck(_)) => {
                    subacks += 1;
                    if subacks == 2
                        && let Some(r) = ready_tx.take()
                    {
                        let _ = r.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    let _ = tx.send((p.topic, v));
                }
                _ => {}
            }
        }
    });
    ready_rx.await.unwrap();
    (client, rx)
}

/// Waits for a message matching `pred`.
async fn expect(
    rx: &mut mpsc::UnboundedReceiver<(String, Value)>,
    what: &str,
    pred: impl Fn(&str, &Value) -> bool,
) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let (topic, v) = rx.recv().await.expect("hub client stopped");
            if pred(&topic, &v) {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn is_report(topic: &str, v: &Value) -> bool {
    topic == "v1/devices/me/attributes" && v.get("systemInfo").is_some()
}

fn deployment(id: &str) -> Value {
    json!({
        "deploymentId": id,
        "instanceSpecs": { "i": { "moduleId": "m", "publish": {}, "subscribe": {} } },
        "modules": { "m": { "moduleImpl": "spawn", "entryPoint": "main" } }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_against_mosquitto() {
    let Some(bin) = mosquitto() else {
        println!("mosquitto is not installed: skipping the MQTT session test");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_broker, port) = start_broker(&bin, dir.path());
    let (hub, mut from_device) = hub_client(port).await;

    let cfg = resolve(
        HubSection {
            mqtt_host: Some("127.0.0.1".into()),
            mqtt_port: Some(port),
            client_id: Some("device-1".into()),
            report_status_interval_min_ms: Some(0),
            ..Default::default()
        },
        |_| None,
    )
    .unwrap();
    let options = core::mqtt_options(&cfg, None);
    let store = DeviceConfigStore::new(dir.path());

    // reconcilerd: accepts everything but the deployment "bad-late", which it refuses.
    let (deployments_tx, mut deployments_rx) = watch::channel::<Option<DeploymentRequest>>(None);
    let (outcomes_tx, outcomes_rx) = mpsc::channel(16);
    let (applied_tx, mut applied) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while deployments_rx.changed().await.is_ok() {
            let Some(req) = deployments_rx.borrow_and_update().clone() else {
                continue;
            };
            let id = req.deployment_id.clone().unwrap_or_default();
            let outcome = if id == "bad-late" {
                ApplyOutcome::Refused {
                    seq: req.seq,
                    deployment_id: req.deployment_id.clone(),
                    message: "reconcilerd says no".into(),
                }
            } else {
                ApplyOutcome::Accepted { seq: req.seq }
            };
            let _ = applied_tx.send(id);
            let _ = outcomes_tx.send(outcome).await;
        }
    });
    let (config_tx, mut configs) = mpsc::channel(16);
    let (status_tx, status_rx) = watch::channel::<Option<DeploymentStatus>>(None);
    let (connection_tx, mut connection) = watch::channel(ConnectionState::Disconnected);
    let links = Links {
        deployments: deployments_tx,
        outcomes: outcomes_rx,
        configurations: config_tx,
        status: status_rx,
        connection: connection_tx,
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let session = tokio::spawn(core::run(cfg, options, store.clone(), None, links, async {
        let _ = stop_rx.await;
    }));

    // The first report goes out at once, before the GET is answered.
    let first = expect(&mut from_device, "the first report", is_report).await;
    assert_eq!(first["systemInfo"]["protocolVersion"], "EVP2-TB");
    assert_eq!(first["state/$agent/report-status-interval-min"], 0);
    expect(&mut from_device, "the initial GET", |t, v| {
        t == "v1/devices/me/attributes/request/10000" && *v == json!({})
    })
    .await;
    assert_eq!(*connection.borrow_and_update(), ConnectionState::Connected);

    // A PATCH before the GET answer is held, then applied after it: dep-patch wins.
    hub.publish(
        "v1/devices/me/attributes",
        QoS::AtMostOnce,
        false,
        json!({ "deployment": deployment("dep-patch"), "configuration/i/t": "hello" }).to_string(),
    )
    .await
    .unwrap();
    // The GET is resent every 5 s until answered; meanwhile the PATCH is only held.
    expect(&mut from_device, "the resent GET", |t, _| {
        t == "v1/devices/me/attributes/request/10000"
    })
    .await;
    assert!(
        applied.try_recv().is_err(),
        "nothing applied before the GET answer"
    );
    assert!(
        configs.try_recv().is_err(),
        "nothing delivered before the GET answer"
    );
    hub.publish(
        "v1/devices/me/attributes/response/10000",
        QoS::AtMostOnce,
        false,
        json!({ "shared": { "deployment": deployment("dep-get") }, "client": {} }).to_string(),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !seen.contains(&"dep-patch".to_string()) {
            seen.push(applied.recv().await.unwrap());
        }
    })
    .await
    .expect("dep-patch was never applied");
    assert_eq!(
        seen.last().map(String::as_str),
        Some("dep-patch"),
        "{seen:?}"
    );
    let delivered = tokio::time::timeout(WAIT, configs.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (delivered.instance.as_str(), delivered.topic.as_str()),
        ("i", "t")
    );
    assert_eq!(delivered.value, b"hello");

    // reconcilerd's status shows up in the next report at once (min interval 0).
    let mut status = DeploymentStatus {
        deployment_id: Some("dep-patch".into()),
        reconcile_status: Some(ReconcileStatus::Ok),
        ..Default::default()
    };
    status_tx.send_replace(Some(status.clone()));
    expect(&mut from_device, "a report with dep-patch ok", |t, v| {
        is_report(t, v)
            && v["deploymentStatus"]["deploymentId"] == "dep-patch"
            && v["deploymentStatus"]["reconcileStatus"] == "ok"
    })
    .await;

    // An invalid manifest: error with its message and id; the running status stays.
    hub.publish(
        "v1/devices/me/attributes",
        QoS::AtMostOnce,
        false,
        json!({ "deployment": { "deploymentId": "bad", "instanceSpecs": {} } }).to_string(),
    )
    .await
    .unwrap();
    let v = expect(&mut from_device, "a report with the refusal", |t, v| {
        is_report(t, v) && v["deploymentStatus"]["reconcileStatus"] == "error"
    })
    .await;
    assert_eq!(v["deploymentStatus"]["deploymentId"], "bad");
    let msg = v["deploymentStatus"]["failureMessage"].as_str().unwrap();
    assert!(msg.contains("deployment.modules"), "{msg}");

    // Refused by reconcilerd: same, with its message.
    hub.publish(
        "v1/devices/me/attributes",
        QoS::AtMostOnce,
        false,
        json!({ "deployment": deployment("bad-late") }).to_string(),
    )
    .await
    .unwrap();
    expect(
        &mut from_device,
        "a report with reconcilerd's refusal",
        |t, v| {
            is_report(t, v)
                && v["deploymentStatus"]["failureMessage"] == "reconcilerd says no"
                && v["deploymentStatus"]["deploymentId"] == "bad-late"
        },
    )
    .await;

    // An accepted deployment clears the refusal.
    hub.publish(
        "v1/devices/me/attributes",
        QoS::AtMostOnce,
        false,
        json!({ "deployment": deployment("dep-3") }).to_string(),
    )
    .await
    .unwrap();
    status.deployment_id = Some("dep-3".into());
    status_tx.send_replace(Some(status.clone()));
    expect(&mut from_device, "a report with dep-3 ok", |t, v| {
        is_report(t, v)
            && v["deploymentStatus"]["deploymentId"] == "dep-3"
            && v["deploymentStatus"]["reconcileStatus"] == "ok"
            && v["deploymentStatus"].get("failureMessage").is_none()
    })
    .await;

    // Device configuration: applied, echoed, stored single-wrapped.
    hub.publish(
        "v1/devices/me/attributes",
        QoS::AtMostOnce,
        false,
        json!({ "desiredDeviceConfig": { "desiredDeviceConfig": {
            "configuration/$agent/report-status-interval-min": 1,
            "configuration/$agent/report-status-interval-max": 4,
            "configuration/$agent/configuration-id": "cfg-42",
            "configuration/$agent/registry-auth": { "ghcr.io": "secret" } } } })
        .to_string(),
    )
    .await
    .unwrap();
    let v = expect(
        &mut from_device,
        "a report with the device config",
        |t, v| is_report(t, v) && v["state/$agent/configuration-id"] == "cfg-42",
    )
    .await;
    assert_eq!(v["state/$agent/report-status-interval-min"], 1);
    assert_eq!(v["state/$agent/report-status-interval-max"], 4);
    assert!(
        !v.to_string().contains("secret"),
        "credentials never echoed"
    );
    let stored = store.load().unwrap().unwrap();
    assert_eq!(stored.configuration_id.as_deref(), Some("cfg-42"));

    // Unchanged reports are forced again at the max interval (4 s).
    let start = std::time::Instant::now();
    expect(&mut from_device, "a forced report", |t, v| {
        is_report(t, v) && v["state/$agent/configuration-id"] == "cfg-42"
    })
    .await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited <= Duration::from_secs(8),
        "{waited:?}"
    );

    // A clean stop.
    stop_tx.send(()).unwrap();
    tokio::time::timeout(WAIT, session)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        *connection.borrow_and_update(),
        ConnectionState::Disconnected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_reports_again_after_broker_restart() {
    let Some(bin) = mosquitto() else {
        println!("mosquitto is not installed: skipping the reconnect test");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (broker, port) = start_broker(&bin, dir.path());
    let cfg = resolve(
        HubSection {
            mqtt_host: Some("127.0.0.1".into()),
            mqtt_port: Some(port),
            report_status_interval_min_ms: Some(0),
            ..Default::default()
        },
        |_| None,
    )
    .unwrap();
    let options = core::mqtt_options(&cfg, None);
    let (deployments_tx, _deployments_rx) = watch::channel(None);
    let (_outcomes_tx, outcomes_rx) = mpsc::channel(1);
    let (config_tx, _configs) = mpsc::channel(1);
    let (status_tx, status_rx) = watch::channel(None);
    let (connection_tx, mut connection) = watch::channel(ConnectionState::Disconnected);
    let links = Links {
        deployments: deployments_tx,
        outcomes: outcomes_rx,
        configurations: config_tx,
        status: status_rx,
        connection: connection_tx,
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let store = DeviceConfigStore::new(dir.path());
    let session = tokio::spawn(core::run(cfg, options, store, None, links, async {
        let _ = stop_rx.await;
    }));
    tokio::time::timeout(
        WAIT,
        connection.wait_for(|c| *c == ConnectionState::Connected),
    )
    .await
    .unwrap()
    .unwrap();
    drop(broker);
    tokio::time::timeout(
        WAIT,
        connection.wait_for(|c| *c != ConnectionState::Connected),
    )
    .await
    .unwrap()
    .unwrap();
    // Same port again; the first retry comes within about a second.
    let conf = dir.path().join("mosquitto.conf");
    let _broker = Broker(
        Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (_hub, mut from_device) = hub_client_retry(port).await;
    // The session starts again: the GET is (re)sent on the new connection ...
    expect(&mut from_device, "the GET after the reconnect", |t, _| {
        t == "v1/devices/me/attributes/request/10000"
    })
    .await;
    // ... and reports flow again.
    status_tx.send_replace(Some(DeploymentStatus {
        deployment_id: Some("after-restart".into()),
        ..Default::default()
    }));
    expect(&mut from_device, "a report after the reconnect", |t, v| {
        is_report(t, v) && v["deploymentStatus"]["deploymentId"] == "after-restart"
    })
    .await;
    assert_eq!(*connection.borrow(), ConnectionState::Connected);
    stop_tx.send(()).unwrap();
    tokio::time::timeout(WAIT, session)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

async fn hub_client_retry(port: u16) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Value)>) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return hub_client(port).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("mosquitto did not come back on {port}");
}
