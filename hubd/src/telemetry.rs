//! Telemetry: sdk-broker's batches merged into hub messages (one per SDK call, or consecutive
//! entries together while no key repeats and the message fits the MQTT buffer), and the task
//! that publishes them at QoS 0 without waiting for anything but room in the request channel.
//! It knows nothing of the session loop ([`crate::core`] uses it, not the other way round): it
//! is told whether MQTT is connected by a function.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use evp_schemas::evp2::sizes::MAX_TELEMETRY_PAYLOAD;
use evp_schemas::evp2::{Evp2Codec, topics};
use evp_schemas::{HubCodec, TelemetryEntry};
use rumqttc::{AsyncClient, ClientError, QoS, Request};
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

/// How long a message may wait for room in the MQTT request channel before it is dropped. The
/// event loop drains the channel at network speed; a channel full this long means the
/// connection is stuck, and its flush timeout is about to drop it anyway.
const STALL_LIMIT: Duration = Duration::from_secs(5);
/// Dropped messages are counted and logged at most this often, not once each.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// One `Telemetry` signal's entries, read where they lie (the D-Bus message body) so a batch
/// costs no allocation per entry.
pub trait TelemetryBatch: Send + 'static {
    /// The entries; an error says why the batch cannot be read.
    fn entries(&self) -> Result<Vec<TelemetryEntry<'_>>, String>;
}

impl TelemetryBatch for Vec<(String, String, String)> {
    fn entries(&self) -> Result<Vec<TelemetryEntry<'_>>, String> {
        Ok(self
            .iter()
            .map(|(instance, key, value)| TelemetryEntry {
                instance,
                key,
                value,
            })
            .collect())
    }
}

/// Encodes `entries` into hub messages appended to `out`: consecutive entries share a message
/// while no `(instance, key)` repeats and it stays within `max_payload` bytes. Entries whose
/// value is not JSON, or that alone exceed `max_payload`, are dropped with a warning; returns
/// how many were.
pub fn encode_batch(
    codec: &impl HubCodec,
    entries: &[TelemetryEntry<'_>],
    max_payload: usize,
    out: &mut Vec<Vec<u8>>,
) -> usize {
    let mut dropped = 0;
    let mut keys: HashSet<(&str, &str)> = HashSet::new();
    let mut current: Vec<u8> = Vec::new();
    let mut close = |current: &mut Vec<u8>, keys: &mut HashSet<(&str, &str)>| {
        if !current.is_empty() {
            codec.finish_telemetry(current);
            out.push(std::mem::take(current));
        }
        keys.clear();
    };
    for entry in entries {
        if keys.contains(&(entry.instance, entry.key)) {
            close(&mut current, &mut keys);
        }
        let before = current.len();
        if let Err(e) = codec.push_telemetry_entry(&mut current, *entry) {
            warn!("{e}");
            dropped += 1;
            continue;
        }
        // The closing byte counts too.
        if current.len() + 1 > max_payload {
            current.truncate(before);
            if before > 0 {
                close(&mut current, &mut keys);
                if codec.push_telemetry_entry(&mut current, *entry).is_err() {
                    // Cannot happen: it was just accepted.
                    dropped += 1;
                    continue;
                }
            }
            if current.len() + 1 > max_payload {
                error!(
                    "telemetry entry {}/{} dropped: {} bytes do not fit one {max_payload}-byte \
                     MQTT message",
                    entry.instance,
                    entry.key,
                    entry.value.len()
                );
                current.clear();
                dropped += 1;
                continue;
            }
        }
        keys.insert((entry.instance, entry.key));
    }
    close(&mut current, &mut keys);
    dropped
}

/// Counts telemetry dropped because MQTT is down or stuck, and logs the count now and then.
#[derive(Debug, Default)]
struct DropLog {
    count: u64,
    last_log: Option<Instant>,
}

impl DropLog {
    fn dropped(&mut self, n: u64, why: &str) {
        self.count += n;
        if self
            .last_log
            .is_none_or(|at| at.elapsed() >= DROP_LOG_EVERY)
        {
            warn!(
                "{} telemetry messages dropped: {why} (telemetry is not queued while the hub \
                 is unreachable)",
                self.count
            );
            self.count = 0;
            self.last_log = Some(Instant::now());
        }
    }

    fn flush(&mut self) {
        if self.count > 0 {
            warn!(
                "{} more telemetry messages were dropped before MQTT came back",
                self.count
            );
            self.count = 0;
        }
    }
}

/// Publishes the batches from `batches` on the telemetry topic until the channel closes. While
/// `connected()` says MQTT is not connected they are dropped and counted (EVP's LOW queue
/// behaviour, without its queue: nothing grows while the hub is away).
pub async fn publish(
    client: AsyncClient,
    connected: impl Fn() -> bool,
    mut batches: mpsc::Receiver<Box<dyn TelemetryBatch>>,
) {
    let codec = Evp2Codec;
    let mut payloads = Vec::new();
    let mut drops = DropLog::default();
    let mut sent: u64 = 0;
    while let Some(batch) = batches.recv().await {
        if !connected() {
            let n = batch.entries().map_or(0, |e| e.len());
            drops.dropped(n as u64, "MQTT is not connected");
            continue;
        }
        match batch.entries() {
            Ok(entries) => {
                encode_batch(&codec, &entries, MAX_TELEMETRY_PAYLOAD, &mut payloads);
            }
            Err(e) => {
                warn!("a telemetry batch from sdk-broker cannot be read: {e}");
                continue;
            }
        }
        for payload in payloads.drain(..) {
            if !connected() {
                drops.dropped(1, "MQTT is not connected");
                continue;
            }
            let request =
                match client.try_publish(topics::TELEMETRY, QoS::AtMostOnce, false, payload) {
                    Ok(()) => {
                        sent += 1;
                        drops.flush();
                        continue;
                    }
                    Err(
                        ClientError::TryRequest(Request::Publish(p))
                        | ClientError::Request(Request::Publish(p)),
                    ) => p,
                    Err(e) => {
                        drops.dropped(1, &e.to_string());
                        continue;
                    }
                };
            // The channel is full: wait for room, a bounded time.
            let wait =
                client.publish_bytes(topics::TELEMETRY, QoS::AtMostOnce, false, request.payload);
            match tokio::time::timeout(STALL_LIMIT, wait).await {
                Ok(Ok(())) => sent += 1,
                Ok(Err(e)) => drops.dropped(1, &e.to_string()),
                Err(_) => drops.dropped(1, "the MQTT connection is stuck"),
            }
        }
    }
    debug!("telemetry publisher stopped after {sent} messages");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn e<'a>(instance: &'a str, key: &'a str, value: &'a str) -> TelemetryEntry<'a> {
        TelemetryEntry {
            instance,
            key,
            value,
        }
    }

    fn encode(entries: &[TelemetryEntry<'_>], max: usize) -> (Vec<Value>, usize) {
        let mut out = Vec::new();
        let dropped = encode_batch(&Evp2Codec, entries, max, &mut out);
        let values = out
            .iter()
            .map(|p| serde_json::from_slice(p).unwrap())
            .collect();
        (values, dropped)
    }

    #[test]
    fn entries_merge_until_a_key_repeats() {
        let (msgs, dropped) = encode(
            &[
                e("a", "x", "1"),
                e("a", "y", "2"),
                e("b", "x", "3"),
                e("a", "x", "4"),
                e("a", "x", "5"),
                e("a", "y", "6"),
            ],
            MAX_TELEMETRY_PAYLOAD,
        );
        assert_eq!(dropped, 0);
        assert_eq!(
            msgs,
            vec![
                json!({"a/x": 1, "a/y": 2, "b/x": 3}),
                json!({"a/x": 4}),
                json!({"a/x": 5, "a/y": 6}),
            ]
        );
    }

    #[test]
    fn bad_json_is_dropped_and_the_rest_sent() {
        let (msgs, dropped) = encode(
            &[e("a", "x", "{"), e("a", "y", "2"), e("a", "z", "nope")],
            MAX_TELEMETRY_PAYLOAD,
        );
        assert_eq!(dropped, 2);
        assert_eq!(msgs, vec![json!({"a/y": 2})]);
        let (msgs, dropped) = encode(&[e("a", "x", "nope")], MAX_TELEMETRY_PAYLOAD);
        assert_eq!((msgs.len(), dropped), (0, 1), "nothing left: nothing sent");
    }

    #[test]
    fn messages_stay_within_the_size_limit() {
        let big = format!("\"{}\"", "v".repeat(40));
        // {"a/k1":"vvv…"} is 50 bytes; two do not fit in 80.
        let (msgs, dropped) = encode(
            &[e("a", "k1", &big), e("a", "k2", &big), e("a", "k3", "1")],
            80,
        );
        assert_eq!(dropped, 0);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1], json!({"a/k2": "v".repeat(40), "a/k3": 1}));
        let huge = format!("\"{}\"", "v".repeat(100));
        let (msgs, dropped) = encode(
            &[e("a", "k", "1"), e("a", "h", &huge), e("a", "j", "2")],
            80,
        );
        assert_eq!(dropped, 1, "an entry alone too big is dropped");
        assert_eq!(msgs, vec![json!({"a/k": 1}), json!({"a/j": 2})]);
    }

    #[test]
    fn owned_batches_read_back() {
        let batch: Vec<(String, String, String)> = vec![("i".into(), "k".into(), "1".into())];
        assert_eq!(batch.entries().unwrap(), vec![e("i", "k", "1")]);
    }
}
