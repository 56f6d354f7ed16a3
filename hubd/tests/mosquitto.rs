//! The MQTT session against a real mosquitto, with the hub played by a test client and
//! reconcilerd and sdk-broker played by channels. Fails when mosquitto is not installed.

mod common;

use std::time::Duration;

use common::{Ends, WAIT, local_config, wait_connection};
use evp_hubd::config::HubSection;
use evp_hubd::core::{self, ApplyOutcome, ConnectionState};
use evp_hubd::device_config::DeviceConfigStore;
use evp_schemas::{DeploymentStatus, ReconcileStatus};
use evp_system_tests::mosquitto::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

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

/// Publishes `attributes` as the hub's attribute PATCH to the device.
async fn patch(hub: &AsyncClient, attributes: Value) {
    hub.publish(
        "v1/devices/me/attributes",
        QoS::AtMostOnce,
        false,
        attributes.to_string(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_against_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), None).unwrap();
    let (hub, mut from_device) = hub_client(broker.port).await;

    let cfg = local_config(
        broker.port,
        HubSection {
            client_id: Some("device-1".into()),
            report_status_interval_min_ms: Some(0),
            ..Default::default()
        },
    );
    let options = core::mqtt_options(&cfg, None);
    let store = DeviceConfigStore::new(dir.path());
    let (session, ends) = common::start(cfg, options, store.clone());
    let Ends {
        deployments: mut deployments_rx,
        outcomes: outcomes_tx,
        configurations: mut configs,
        status: status_tx,
        mut connection,
    } = ends;

    // reconcilerd: accepts everything but the deployment "bad-late", which it refuses.
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
    patch(
        &hub,
        json!({ "deployment": deployment("dep-patch"), "configuration/i/t": "hello" }),
    )
    .await;
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
    patch(
        &hub,
        json!({ "deployment": { "deploymentId": "bad", "instanceSpecs": {} } }),
    )
    .await;
    let v = expect(&mut from_device, "a report with the refusal", |t, v| {
        is_report(t, v) && v["deploymentStatus"]["reconcileStatus"] == "error"
    })
    .await;
    assert_eq!(v["deploymentStatus"]["deploymentId"], "bad");
    let msg = v["deploymentStatus"]["failureMessage"].as_str().unwrap();
    assert!(msg.contains("deployment.modules"), "{msg}");

    // Refused by reconcilerd: same, with its message.
    patch(&hub, json!({ "deployment": deployment("bad-late") })).await;
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
    patch(&hub, json!({ "deployment": deployment("dep-3") })).await;
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
    patch(
        &hub,
        json!({ "desiredDeviceConfig": { "desiredDeviceConfig": {
            "configuration/$agent/report-status-interval-min": 1,
            "configuration/$agent/report-status-interval-max": 4,
            "configuration/$agent/configuration-id": "cfg-42",
            "configuration/$agent/registry-auth": { "ghcr.io": "secret" } } } }),
    )
    .await;
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

    // Unchanged reports are forced again at the max interval (4 s): one comes, identical,
    // well after the last change. (A QoS 1 report may be delivered twice at once; the
    // interval rules themselves are unit-tested in timing.rs.)
    let changed_at = std::time::Instant::now();
    let forced = expect(&mut from_device, "a forced report", |t, w| {
        is_report(t, w)
            && w["state/$agent/configuration-id"] == "cfg-42"
            && changed_at.elapsed() >= Duration::from_secs(2)
    })
    .await;
    assert_eq!(forced, v, "the forced report is the unchanged one");

    // A clean stop.
    session.stop().await;
    assert_eq!(
        *connection.borrow_and_update(),
        ConnectionState::Disconnected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_reports_again_after_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), None).unwrap();
    let cfg = local_config(
        broker.port,
        HubSection {
            report_status_interval_min_ms: Some(0),
            ..Default::default()
        },
    );
    let options = core::mqtt_options(&cfg, None);
    let store = DeviceConfigStore::new(dir.path());
    let (session, mut ends) = common::start(cfg, options, store);
    assert!(
        wait_connection(&mut ends.connection, WAIT, |c| *c
            == ConnectionState::Connected)
        .await,
        "never connected"
    );
    broker.stop();
    assert!(
        wait_connection(&mut ends.connection, WAIT, |c| *c
            != ConnectionState::Connected)
        .await,
        "the broker's end went unnoticed"
    );
    // Same port again; the first retry comes within about a second.
    broker.restart().unwrap();
    let (_hub, mut from_device) = hub_client(broker.port).await;
    // The session starts again: the GET is (re)sent on the new connection ...
    expect(&mut from_device, "the GET after the reconnect", |t, _| {
        t == "v1/devices/me/attributes/request/10000"
    })
    .await;
    // ... and reports flow again.
    ends.status.send_replace(Some(DeploymentStatus {
        deployment_id: Some("after-restart".into()),
        ..Default::default()
    }));
    expect(&mut from_device, "a report after the reconnect", |t, v| {
        is_report(t, v) && v["deploymentStatus"]["deploymentId"] == "after-restart"
    })
    .await;
    assert_eq!(*ends.connection.borrow(), ConnectionState::Connected);
    session.stop().await;
}
