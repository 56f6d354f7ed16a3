//! What can never reach the hub is refused at the SDK call (`EVP_TOOBIG`), before anything is
//! accepted, as EVP checks against its MQTT send buffer: sizes are those of the EVP2 message,
//! escaping included (a control character is six bytes once in JSON). And telemetry values
//! that are not JSON are carried as JSON strings, as EVP accepts them (docs/hub-protocol.md §17).

use evp_schemas::evp2::sizes::{self, MAX_ATTRIBUTES_PAYLOAD, MAX_RPC_RESPONSE_PAYLOAD};

/// Bytes an instance's state counts for in its share of the instance-state report: its
/// encoded entry and the comma that separates it.
pub fn state_cost(instance: &str, topic: &str, value: &[u8]) -> usize {
    sizes::state_entry_len(instance, topic, value) + 1
}

/// Whether a state can be sent at all: its entry alone fits one report message.
pub fn state_fits(instance: &str, topic: &str, value: &[u8]) -> bool {
    // `{` and `}` around it.
    sizes::state_entry_len(instance, topic, value) + 2 <= MAX_ATTRIBUTES_PAYLOAD
}

/// `value` as the JSON text sent to the hub: `None` when it is JSON already (sent as it is),
/// else the JSON string of its text.
pub fn telemetry_json(value: &str) -> Option<String> {
    match serde_json::from_str::<serde::de::IgnoredAny>(value) {
        Ok(_) => None,
        Err(_) => Some(serde_json::Value::String(value.to_owned()).to_string()),
    }
}

/// Whether one `sendTelemetry` call's entries (keys and JSON values) fit one telemetry message.
pub fn telemetry_fits(instance: &str, entries: &[(String, String)]) -> bool {
    let entries: usize = entries
        .iter()
        .map(|(key, json)| sizes::telemetry_entry_len(instance, key, json.trim()) + 1)
        .sum();
    // Plus `{` and `}`, less the comma the last entry does not have: one byte more.
    entries < sizes::MAX_TELEMETRY_PAYLOAD
}

/// Whether the answer `response` to command `reqid` fits one MQTT message; the status (its
/// SDK number) decides the fields around it.
pub fn rpc_response_fits(reqid: u64, status: u32, response: &str) -> bool {
    let status = evp_schemas::RpcStatus::from_wire(status);
    sizes::rpc_response_len(reqid, status, response) <= MAX_RPC_RESPONSE_PAYLOAD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_measured_escaped() {
        assert!(state_fits("i", "t", &vec![b'a'; 100_000]));
        // 25 KB of control characters are 150 KB in JSON.
        assert!(!state_fits("i", "t", &vec![1u8; 25_000]));
        assert!(state_cost("i", "t", &[1u8; 100]) > 600);
        assert_eq!(
            state_cost("i", "t", b"\xff"),
            1,
            "left out of the report: costs nothing"
        );
    }

    #[test]
    fn non_json_telemetry_becomes_a_json_string() {
        assert_eq!(telemetry_json("21.5"), None);
        assert_eq!(telemetry_json(" {\"a\":1} "), None);
        assert_eq!(telemetry_json("not json").as_deref(), Some("\"not json\""));
        assert_eq!(telemetry_json("").as_deref(), Some("\"\""));
        let entries = |v: &str| vec![("k".to_owned(), v.to_owned())];
        assert!(telemetry_fits("i", &entries(&"1".repeat(100_000))));
        let ctl = telemetry_json(&"\u{1}".repeat(25_000)).unwrap();
        assert!(!telemetry_fits("i", &entries(&ctl)));
    }

    #[test]
    fn rpc_answers_are_measured_escaped() {
        assert!(rpc_response_fits(1, 0, &"a".repeat(100_000)));
        assert!(!rpc_response_fits(1, 0, &"\u{1}".repeat(25_000)));
    }
}
