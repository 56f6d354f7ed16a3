//! The embedded broker and the hub side, against a plain MQTT client playing the device.

use std::time::Duration;

use evp_devhub::hub::{HubSide, HubSideOptions, fetch_status};
use evp_devhub::{DEVHUB_STATUS_TOPIC, DeviceReport, EmbeddedBroker};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

/// Generous bound for loopback round trips on a busy 2-core machine.
const WAIT: Duration = Duration::from_secs(10);

/// A plain client standing in for the agent.
async fn device(port: u16, id: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 16);
    client
        .subscribe("v1/devices/me/attributes/response/+", QoS::AtMostOnce)
        .await
        .expect("queueing the subscription");
    // Wait for the SUBACK, so the request below cannot overtake the subscription.
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("device connection: {e}"),
            }
        }
    })
    .await
    .expect("SUBACK in time");
    (client, events)
}

/// The next publish the device receives on `topic`.
async fn next_publish(events: &mut EventLoop, topic_prefix: &str) -> (String, Value) {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic.starts_with(topic_prefix) => {
                    let value = serde_json::from_slice(&p.payload).expect("a JSON answer");
                    return (p.topic.clone(), value);
                }
                Ok(_) => {}
                Err(e) => panic!("device connection: {e}"),
            }
        }
    })
    .await
    .expect("an answer in time")
}

#[tokio::test]
async fn the_hub_answers_attribute_requests_and_collects_reports() {
    let broker = EmbeddedBroker::start(0).expect("starting the embedded broker");
    assert_ne!(broker.port(), 0);
    let hub = HubSide::connect_with(
        &broker.url(),
        HubSideOptions {
            republish_status: Some(DEVHUB_STATUS_TOPIC.into()),
            ..HubSideOptions::default()
        },
    )
    .await
    .expect("hub side connects");

    let deployment = json!({"deploymentId": "d1", "instanceSpecs": {}, "modules": {}});
    hub.deploy(&deployment).await.expect("deploying");
    hub.set_configuration("inst-1", "a/b", "hello")
        .await
        .expect("configuring");

    // Another devhub process (a passive one, as `evp-devhub config` is) patches too; the
    // first one's store follows.
    let other = HubSide::connect_with(&broker.url(), HubSideOptions::passive())
        .await
        .expect("second hub side connects");
    other
        .set_configuration("inst-1", "c", "from-elsewhere")
        .await
        .expect("configuring from elsewhere");
    other
        .publish_raw("v1/devices/me/attributes", b"{not json".to_vec())
        .await
        .expect("publishing malformed bytes");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !hub.attributes().contains_key("configuration/inst-1/c") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            hub.attributes()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The device asks for its attributes as the agent does at session start.
    let (client, mut events) = device(broker.port(), "device-under-test").await;
    client
        .publish(
            "v1/devices/me/attributes/request/10000",
            QoS::AtMostOnce,
            false,
            "{}",
        )
        .await
        .expect("requesting attributes");
    let (topic, answer) = next_publish(&mut events, "v1/devices/me/attributes/response/").await;
    assert_eq!(topic, "v1/devices/me/attributes/response/10000");
    assert_eq!(answer["shared"]["deployment"], deployment);
    assert_eq!(answer["shared"]["configuration/inst-1/a/b"], "hello");
    assert_eq!(answer["shared"]["configuration/inst-1/c"], "from-elsewhere");

    // The device reports; the hub tells reports from PATCHes.
    let mut reports = hub.subscribe();
    let status = json!({
        "systemInfo": {"protocolVersion": "EVP2-TB"},
        "deploymentStatus": {"deploymentId": "d1", "reconcileStatus": "ok", "instances": {}, "modules": {}}
    });
    let states = json!({"state/inst-1/status": "fine"});
    for payload in [&states, &status] {
        client
            .publish(
                "v1/devices/me/attributes",
                QoS::AtLeastOnce,
                false,
                payload.to_string(),
            )
            .await
            .expect("reporting");
    }
    client
        .publish(
            "v1/devices/me/telemetry",
            QoS::AtMostOnce,
            false,
            r#"{"inst-1/t": 1}"#,
        )
        .await
        .expect("sending telemetry");
    // Keep the device's connection moving while the hub waits.
    let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });

    let got = hub
        .wait_for_status(|s| s["deploymentStatus"]["reconcileStatus"] == "ok", WAIT)
        .await
        .expect("the status report");
    assert_eq!(got, status);
    assert_eq!(hub.status_count(), 1);
    assert_eq!(hub.latest_status(), Some(status.clone()));
    // Reports are not shared attributes.
    assert!(!hub.attributes().contains_key("systemInfo"));

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let report = tokio::time::timeout(WAIT, reports.recv())
            .await
            .expect("a report in time")
            .expect("the report channel is open");
        seen.push(report);
    }
    assert!(
        seen.contains(&DeviceReport::InstanceState(states.clone())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&DeviceReport::Telemetry(json!({"inst-1/t": 1}))),
        "{seen:?}"
    );
    assert_eq!(
        hub.instance_states().get("state/inst-1/status"),
        Some(&json!("fine"))
    );

    // A condition never met times out with the last report in the message.
    let e = hub
        .wait_for_status(|_| false, Duration::from_millis(200))
        .await
        .expect_err("nothing satisfies false");
    assert!(e.to_string().contains("EVP2-TB"), "{e}");

    // The status was re-published, retained, for `evp-devhub status`.
    let fetched = fetch_status(&broker.url(), WAIT).await.expect("fetching");
    assert_eq!(fetched, Some(status));

    pump.abort();
    other.close().await;
    hub.close().await;
}

#[tokio::test]
async fn an_absent_broker_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there without root's deliberate setup.
    let e = HubSide::connect_with(
        "mqtt://127.0.0.1:1",
        HubSideOptions {
            connect_timeout: Duration::from_millis(500),
            ..HubSideOptions::default()
        },
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(e.to_string().contains("cannot connect"), "{e}");
}
