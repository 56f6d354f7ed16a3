//! Telemetry: sdk-broker's batches merged into hub messages (one per SDK call, or consecutive
//! entries of one instance together while no key repeats and the message fits the MQTT
//! buffer). Each message holds one instance's entries, so the spool ([`crate::spool`]) can
//! keep each instance's order and quota.

use evp_schemas::{HubCodec, TelemetryEntry};
use std::collections::HashSet;
use tracing::{error, warn};

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

/// Encodes `entries` into hub messages appended to `out` with their instance: consecutive
/// entries of one instance share a message while no key repeats and it stays within
/// `max_payload` bytes. Entries whose
/// value is not JSON, or that alone exceed `max_payload`, are dropped with a warning; returns
/// how many were.
pub fn encode_batch(
    codec: &dyn HubCodec,
    entries: &[TelemetryEntry<'_>],
    max_payload: usize,
    out: &mut Vec<(String, Vec<u8>)>,
) -> usize {
    let mut dropped = 0;
    let mut keys: HashSet<&str> = HashSet::new();
    let mut current: Vec<u8> = Vec::new();
    let mut instance = "";
    let mut close = |current: &mut Vec<u8>, keys: &mut HashSet<&str>, instance: &str| {
        if !current.is_empty() {
            codec.finish_telemetry(current);
            out.push((instance.to_owned(), std::mem::take(current)));
        }
        keys.clear();
    };
    for entry in entries {
        if keys.contains(entry.key) || entry.instance != instance {
            close(&mut current, &mut keys, instance);
        }
        instance = entry.instance;
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
                close(&mut current, &mut keys, instance);
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
        keys.insert(entry.key);
    }
    close(&mut current, &mut keys, instance);
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use evp_schemas::evp2::Evp2Codec;
    use evp_schemas::evp2::sizes::MAX_TELEMETRY_PAYLOAD;
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
            .map(|(_, p)| serde_json::from_slice(p).unwrap())
            .collect();
        (values, dropped)
    }

    #[test]
    fn entries_of_one_instance_merge_until_a_key_repeats() {
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
                json!({"a/x": 1, "a/y": 2}),
                json!({"b/x": 3}),
                json!({"a/x": 4}),
                json!({"a/x": 5, "a/y": 6}),
            ]
        );
        let mut out = Vec::new();
        encode_batch(
            &Evp2Codec,
            &[e("a", "x", "1"), e("b", "x", "2")],
            1000,
            &mut out,
        );
        let instances: Vec<&str> = out.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(instances, ["a", "b"], "each message names its instance");
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
