//! The tasks behind one [`super::HubSide`]: the MQTT event loop (subscriptions on every
//! CONNACK, PUBACKs matched to their waiters, incoming publishes handled) and the outbox.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use evp_schemas::Protocol;
use evp_schemas::evp2::topics::{
    ATTRIBUTES, ATTRIBUTES_REQUEST_PREFIX, ATTRIBUTES_RESPONSE_PREFIX, RPC_REQUEST_FILTER,
    RPC_REQUEST_PREFIX, RPC_RESPONSE_FILTER, RPC_RESPONSE_PREFIX, TELEMETRY,
};
use evp_schemas::provision;
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::{
    ATTRIBUTES_REQUEST_FILTER, AttributesKind, DeviceReport, HubError, OutboxItem, RECONNECT_DELAY,
    Shared, classify_attributes, dialect, lock, merge_shared,
};

/// Queues a QoS 1 publish and returns what resolves at its PUBACK. The waiter is queued
/// before the request, under `publish_order`, so waiters and packets match one to one.
pub(super) async fn publish_tracked(
    client: &AsyncClient,
    shared: &Shared,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
) -> Result<oneshot::Receiver<()>, HubError> {
    let (tx, rx) = oneshot::channel();
    let _order = shared.publish_order.lock().await;
    lock(&shared.unsent).push_back(tx);
    if client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .await
        .is_err()
    {
        lock(&shared.unsent).pop_back();
        return Err(HubError::Closed);
    }
    Ok(rx)
}

/// Publishes what the connection's task asks for (answers, re-published reports), in
/// order, without waiting for their PUBACKs.
pub(super) async fn run_outbox(
    mut items: mpsc::UnboundedReceiver<OutboxItem>,
    client: AsyncClient,
    shared: Arc<Shared>,
) {
    while let Some(item) = items.recv().await {
        let published =
            publish_tracked(&client, &shared, &item.topic, item.payload, item.retain).await;
        if published.is_err() {
            return;
        }
    }
}

/// Drives the MQTT connection: (re)subscribes on every CONNACK, matches PUBACKs to their
/// waiters, and handles what arrives.
pub(super) async fn run_events(
    mut eventloop: EventLoop,
    client: AsyncClient,
    shared: Arc<Shared>,
    outbox: mpsc::UnboundedSender<OutboxItem>,
) {
    let mut filters = vec![
        ATTRIBUTES.to_owned(),
        TELEMETRY.to_owned(),
        RPC_RESPONSE_FILTER.to_owned(),
        // The device's own requests: storage tokens (the hub's direct commands come back too).
        RPC_REQUEST_FILTER.to_owned(),
    ];
    if shared.options.answer_requests {
        filters.push(ATTRIBUTES_REQUEST_FILTER.to_owned());
        filters.push(provision::REQUEST_TOPIC.to_owned());
    }
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // The session is clean: subscriptions are made again on every connection.
                // From a task, because the request queue may be full and only this loop
                // empties it.
                let client = client.clone();
                let filters = filters.clone();
                tokio::spawn(async move {
                    let subs = filters
                        .into_iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                    let _ = client.subscribe_many(subs).await;
                });
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                shared.connected.send_replace(true);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                handle_publish(&shared, &p.topic, &p.payload, &outbox);
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(waiter) = lock(&shared.unacked).remove(&ack.pkid) {
                    let _ = waiter.send(());
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let mut unacked = lock(&shared.unacked);
                // A packet id already waiting is a publish re-sent after a reconnection.
                if !unacked.contains_key(&pkid)
                    && let Some(waiter) = lock(&shared.unsent).pop_front()
                {
                    unacked.insert(pkid, waiter);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if shared.closing.load(Ordering::SeqCst) {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                shared.connected.send_replace(false);
                if shared.closing.load(Ordering::SeqCst) {
                    break;
                }
                tracing::debug!("MQTT connection: {e}");
                *lock(&shared.last_error) = e.to_string();
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        }
    }
    shared.connected.send_replace(false);
}

/// Handles one incoming publish.
pub(super) fn handle_publish(
    shared: &Shared,
    topic: &str,
    payload: &[u8],
    outbox: &mpsc::UnboundedSender<OutboxItem>,
) {
    if topic == ATTRIBUTES {
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(payload) else {
            // Malformed PATCHes are published on purpose by tests; the agent judges them.
            tracing::debug!("ignoring a non-object message on {ATTRIBUTES}");
            return;
        };
        let protocol = shared.options.protocol;
        match classify_attributes(&object) {
            AttributesKind::Status => {
                let deployment = lock(&shared.attributes).get("deployment").cloned();
                let object = dialect::status_from_wire(protocol, object, deployment.as_ref());
                let report = Value::Object(object);
                *lock(&shared.latest_status) = Some(report.clone());
                shared.status_count.fetch_add(1, Ordering::SeqCst);
                if let Some(topic) = &shared.options.republish_status {
                    // Re-published in EVP2's shape, which `evp-devhub status` prints.
                    let payload = match protocol {
                        Protocol::Evp2 => payload.to_vec(),
                        Protocol::Evp1 => report.to_string().into_bytes(),
                    };
                    let _ = outbox.send(OutboxItem {
                        topic: topic.clone(),
                        payload,
                        retain: true,
                    });
                }
                let _ = shared.reports.send(DeviceReport::Status(report));
            }
            AttributesKind::InstanceState => {
                let object = dialect::states_from_wire(protocol, object);
                lock(&shared.instance_states)
                    .extend(object.iter().map(|(k, v)| (k.clone(), v.clone())));
                let _ = shared
                    .reports
                    .send(DeviceReport::InstanceState(Value::Object(object)));
            }
            AttributesKind::HubPatch => {
                merge_shared(&mut lock(&shared.attributes), &object);
            }
        }
    } else if let Some(id) = topic.strip_prefix(ATTRIBUTES_REQUEST_PREFIX) {
        if shared.options.answer_requests {
            let shared_attributes = Value::Object(lock(&shared.attributes).clone());
            let answer = json!({ "shared": shared_attributes });
            tracing::debug!("answering attribute request {id}");
            let _ = outbox.send(OutboxItem {
                topic: format!("{ATTRIBUTES_RESPONSE_PREFIX}{id}"),
                payload: answer.to_string().into_bytes(),
                retain: false,
            });
        }
    } else if topic == provision::REQUEST_TOPIC {
        let Some(profile) = lock(&shared.provisioning).clone() else {
            return;
        };
        let (answer, seen) =
            super::provision::answer(&profile, &mut lock(&shared.provisioned), payload);
        match &seen.token {
            Some(_) => tracing::info!("provisioned device {:?}", seen.device_name),
            None => tracing::warn!("provisioning of {:?} refused: {answer}", seen.device_name),
        }
        // ThingsBoard answers on the session that asked; a plain broker hands the answer to
        // every client waiting on the topic, so a devhub provisions one device at a time.
        let _ = outbox.send(OutboxItem {
            topic: provision::RESPONSE_TOPIC.to_owned(),
            payload: answer.to_string().into_bytes(),
            retain: false,
        });
        lock(&shared.provision_requests).push(seen.clone());
        let _ = shared.reports.send(DeviceReport::ProvisionRequest(seen));
    } else if let Some(mqtt_id) = topic.strip_prefix(RPC_REQUEST_PREFIX) {
        let Ok(payload) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let protocol = shared.options.protocol;
        let Some(request) = dialect::token_request_from_wire(protocol, mqtt_id, &payload) else {
            return;
        };
        if let Some(how) = lock(&shared.storage).as_ref() {
            tracing::debug!("answering storage token request {mqtt_id}");
            let answer =
                dialect::token_answer_to_wire(protocol, super::storage::answer(how, &request));
            let _ = outbox.send(OutboxItem {
                topic: format!("{RPC_RESPONSE_PREFIX}{mqtt_id}"),
                payload: answer.to_string().into_bytes(),
                retain: false,
            });
        }
        let _ = shared
            .reports
            .send(DeviceReport::StorageTokenRequest(request));
    } else if let Some(mqtt_id) = topic.strip_prefix(RPC_RESPONSE_PREFIX) {
        match serde_json::from_slice::<Value>(payload) {
            Ok(payload) => {
                let payload =
                    dialect::command_response_from_wire(shared.options.protocol, mqtt_id, payload);
                let _ = shared.reports.send(DeviceReport::CommandResponse {
                    mqtt_id: mqtt_id.to_owned(),
                    payload,
                });
            }
            Err(e) => tracing::debug!("ignoring a command response that is not JSON: {e}"),
        }
    } else if topic == TELEMETRY {
        match serde_json::from_slice::<Value>(payload) {
            Ok(value) => {
                let _ = shared.reports.send(DeviceReport::Telemetry(value));
            }
            Err(e) => tracing::debug!("ignoring telemetry that is not JSON: {e}"),
        }
    }
}
