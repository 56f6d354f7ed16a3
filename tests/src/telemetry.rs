//! Telemetry as the hub sees it: a subscriber of its own that records every `<instance>/seq`
//! value of `evp-test-ticker` instances, and the ticker's start.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evp_schemas::dbus::SdkBroker1Proxy;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

use crate::system::System;
use crate::wait_for;

/// The telemetry topic (EVP2-TB).
pub const TELEMETRY_TOPIC: &str = "v1/devices/me/telemetry";

/// Every `<instance>/seq` value the hub received, per instance, in arrival order.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<BTreeMap<String, Vec<u64>>>>);

impl Received {
    /// A telemetry subscriber of its own on the broker (the hub driver's report queue is
    /// bounded, and a draining spool outruns it), ready when this returns.
    pub async fn follow(sys: &System) -> Received {
        let received = Received::default();
        let seen = received.clone();
        let mut o = MqttOptions::new("telemetry-test-hub", "127.0.0.1", sys.mosquitto.port);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        client
            .subscribe(TELEMETRY_TOPIC, QoS::AtLeastOnce)
            .await
            .unwrap();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        tokio::spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Ok(Value::Object(map)) = serde_json::from_slice(&p.payload) else {
                            continue;
                        };
                        let mut all = seen.0.lock().unwrap();
                        for (key, value) in map {
                            if let (Some(instance), Some(n)) =
                                (key.strip_suffix("/seq"), value.as_u64())
                            {
                                all.entry(instance.to_owned()).or_default().push(n);
                            }
                        }
                    }
                    Ok(_) => {}
                    // The broker goes with the system at the end; a loss mid-test fails the waits.
                    Err(e) => {
                        eprintln!("the test's subscriber lost the broker: {e}");
                        return;
                    }
                }
            }
        });
        ready.await.unwrap();
        received
    }

    /// Every value of `instance` received, in arrival order.
    pub fn of(&self, instance: &str) -> Vec<u64> {
        self.0
            .lock()
            .unwrap()
            .get(instance)
            .cloned()
            .unwrap_or_default()
    }

    /// Distinct values of `instance` received.
    pub fn distinct(&self, instance: &str) -> usize {
        let mut v = self.of(instance);
        v.sort_unstable();
        v.dedup();
        v.len()
    }

    /// Waits until `n` distinct values of `instance` arrived; panics naming the first missing.
    pub async fn wait_distinct(&self, instance: &str, n: usize, timeout: Duration) {
        let waited = wait_for(&format!("{n} values of {instance}"), timeout, async || {
            (self.distinct(instance) >= n).then_some(())
        })
        .await;
        if let Err(e) = waited {
            let got: std::collections::BTreeSet<u64> = self.of(instance).into_iter().collect();
            let missing: Vec<u64> = (0..n as u64)
                .filter(|v| !got.contains(v))
                .take(20)
                .collect();
            panic!("{e}: {} received, the first missing {missing:?}", got.len());
        }
    }
}

/// The values in the order of their first arrival: at-least-once allows a value again after a
/// reconnect or a crash, never a new one before an older one.
pub fn first_arrivals(values: &[u64]) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    values.iter().copied().filter(|v| seen.insert(*v)).collect()
}

/// Starts `instance` ticking `count` values every `period_ms`, through sdk-broker as hubd
/// would deliver the hub's configuration (so it works with the hub away too).
pub async fn tick(sys: &System, instance: &str, count: u64, period_ms: u64) {
    let broker = SdkBroker1Proxy::new(&sys.conn).await.unwrap();
    for (topic, value) in [("period_ms", period_ms), ("count", count)] {
        broker
            .deliver_configuration(instance, topic, value.to_string().as_bytes())
            .await
            .unwrap();
    }
}
