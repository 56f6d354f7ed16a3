//! How big EVP2's messages are, known before they are built: sdk-broker refuses at the SDK call
//! what could never fit one MQTT message (`EVP_TOOBIG`, as EVP checks against its send
//! buffer), and hubd splits or shrinks what would not fit. JSON escaping is counted exactly:
//! a control character grows six-fold (`\u0001`), so raw sizes say little.

use crate::codec::{DirectCommandResponse, RpcStatus};

use super::topics;

/// Largest MQTT packet the device sends: EVP's 128 KiB send buffer, which hubs are sized for.
pub const MAX_PACKET: usize = 131_072;
/// Bytes of an MQTT PUBLISH besides topic and payload: fixed header (up to 5), topic length (2)
/// and packet id (2), rounded up.
pub const PUBLISH_OVERHEAD: usize = 16;
/// Longest MQTT request id assumed when a direct command's answer is sized before its request
/// id is known (sdk-broker does not see it). ThingsBoard numbers its requests (a handful of
/// digits); hubd checks the real size again before it publishes.
pub const MAX_MQTT_ID_LEN: usize = 32;

/// The largest payload of a message on a topic of `topic_len` bytes.
pub const fn max_payload(topic_len: usize) -> usize {
    MAX_PACKET - topic_len - PUBLISH_OVERHEAD
}

/// The largest payload of a report (status or instance states) on the attributes topic.
pub const MAX_ATTRIBUTES_PAYLOAD: usize = max_payload(topics::ATTRIBUTES.len());
/// The largest telemetry payload.
pub const MAX_TELEMETRY_PAYLOAD: usize = max_payload(topics::TELEMETRY.len());
/// The largest payload of a direct command's answer whose request id is at most
/// [`MAX_MQTT_ID_LEN`] long.
pub const MAX_RPC_RESPONSE_PAYLOAD: usize =
    max_payload(topics::RPC_RESPONSE_PREFIX.len() + MAX_MQTT_ID_LEN);

/// Bytes of `s` as a JSON string, quotes included, escaped as serde_json escapes.
pub fn json_string_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Bytes of the instance-state entry `"state/<instance>/<topic>":"<value>"` (without the comma
/// or brace around it), as `encode_instance_states` writes it; 0 for a value it leaves out
/// (not UTF-8 up to the first NUL).
pub fn state_entry_len(instance: &str, topic: &str, value: &[u8]) -> usize {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    let Ok(text) = std::str::from_utf8(&value[..end]) else {
        return 0;
    };
    // `"state/` + instance + `/` + topic + `"`, then `:`, then the value.
    let key = json_string_len(instance) + json_string_len(topic) - 4 + "state/".len() + 1 + 2;
    key + 1 + json_string_len(text)
}

/// Bytes of the telemetry entry `"<instance>/<key>":<json>` (without comma or brace), where
/// `json` is the JSON text sent as it is.
pub fn telemetry_entry_len(instance: &str, key: &str, json: &str) -> usize {
    json_string_len(instance) + json_string_len(key) - 4 + 1 + 2 + 1 + json.len()
}

/// Bytes of the answer `{"direct-command-response":{...}}` carrying `response` for `reqid`.
pub fn rpc_response_len(reqid: u64, status: RpcStatus, response: &str) -> usize {
    let empty = DirectCommandResponse {
        reqid,
        status,
        error_message: None,
        response: Some(String::new()),
    };
    super::encode_direct_command_response(&empty).len() - 2 + json_string_len(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{HubCodec, TelemetryEntry};
    use crate::evp2::Evp2Codec;
    use std::collections::BTreeMap;

    #[test]
    fn string_lengths_match_serde_json() {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("é€😀");
        for s in ["", "plain", "\"q\"", "a\\b", &all, &"\u{1}".repeat(25_000)] {
            assert_eq!(
                json_string_len(s),
                serde_json::to_string(s).unwrap().len(),
                "{s:?}"
            );
        }
        assert_eq!(
            json_string_len(&"\u{1}".repeat(25_000)),
            150_002,
            "six-fold"
        );
    }

    #[test]
    fn entry_lengths_match_the_encoders() {
        let codec = Evp2Codec;
        for (i, t, v) in [
            ("inst", "topic", b"value".as_slice()),
            ("a\"b", "t/x", b"\x01\x02 ctl \n"),
            ("i", "t", b"cut\0after"),
        ] {
            let map = BTreeMap::from([((i.to_owned(), t.to_owned()), v.to_vec())]);
            let encoded = codec.encode_instance_states(&map).to_string();
            assert_eq!(state_entry_len(i, t, v) + 2, encoded.len(), "{encoded}");
        }
        assert_eq!(state_entry_len("i", "t", b"\xff"), 0, "left out");
        let mut payload = Vec::new();
        let entry = TelemetryEntry {
            instance: "in\u{1}st",
            key: "k\"ey",
            value: "{\"a\":[1,2]}",
        };
        codec.push_telemetry_entry(&mut payload, entry).unwrap();
        codec.finish_telemetry(&mut payload);
        assert_eq!(
            telemetry_entry_len(entry.instance, entry.key, entry.value) + 2,
            payload.len()
        );
        for status in [RpcStatus::Ok, RpcStatus::Error, RpcStatus::MethodNotFound] {
            let r = DirectCommandResponse {
                reqid: 12345,
                status,
                error_message: None,
                response: Some("\u{1}x\"".into()),
            };
            assert_eq!(
                rpc_response_len(12345, status, "\u{1}x\""),
                codec.encode_direct_command_response("i", &r).len()
            );
        }
    }
}
