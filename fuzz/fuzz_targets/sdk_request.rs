//! A module's request payload (`Request::decode`, the FlatBuffers verifier first), then what
//! sdk-broker's rules do with it before anything is accepted: the D-Bus string check, the
//! size of the hub message it would become, and a blob operation's file and headers.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use evp_fuzz::bus_safe;
use evp_schemas::evp2::Evp2Codec;
use evp_schemas::evp2::sizes;
use evp_schemas::sdk::{BlobRequest, Request};
use evp_schemas::{DirectCommandResponse, HubCodec, RpcStatus, TelemetryEntry};
use evp_sdk_broker::{blob, limits};
use libfuzzer_sys::fuzz_target;

/// Instance names as sdk-broker has them: a plain one, and one that JSON must escape.
const INSTANCES: [&str; 2] = ["inst-1", "a\"b\\c\u{1}"];

fuzz_target!(|data: &[u8]| {
    let Ok(request) = Request::decode(data) else {
        return;
    };
    let _ = request.name();
    assert_eq!(Request::decode(&request.encode()).as_ref(), Ok(&request));
    if request.check_bus_strings().is_err() {
        // Refused with EVP_INVAL before anything else.
        return;
    }
    let codec = Evp2Codec;
    match &request {
        Request::SendState { topic, blob, .. } => {
            bus_safe("a state topic", topic);
            for instance in INSTANCES {
                let states = BTreeMap::from([((instance.to_owned(), topic.clone()), blob.clone())]);
                let report = codec.encode_instance_states(&states).to_string();
                // sdk-broker's EVP_TOOBIG and share accounting measure exactly what hubd sends.
                assert_eq!(
                    sizes::state_entry_len(instance, topic, blob) + 2,
                    report.len()
                );
            }
        }
        Request::SendTelemetry { entries, .. } => {
            for instance in INSTANCES {
                let mut sent = Vec::new();
                for e in entries {
                    bus_safe("a telemetry key", &e.key);
                    // A value that is not JSON goes as a JSON string (as EVP accepts it).
                    let json = limits::telemetry_json(&e.value).unwrap_or_else(|| e.value.clone());
                    let mut payload = Vec::new();
                    let entry = TelemetryEntry {
                        instance,
                        key: &e.key,
                        value: &json,
                    };
                    codec
                        .push_telemetry_entry(&mut payload, entry)
                        .expect("JSON by now");
                    codec.finish_telemetry(&mut payload);
                    let measured = sizes::telemetry_entry_len(instance, &e.key, json.trim());
                    assert_eq!(measured + 2, payload.len(), "{json:?}");
                    serde_json::from_slice::<serde_json::Value>(&payload).expect("a JSON payload");
                    sent.push((e.key.clone(), json));
                }
                let _ = limits::telemetry_fits(instance, &sent);
            }
        }
        Request::SendRpcResponse {
            id,
            response: Some(response),
            status,
            ..
        } => {
            let answer = DirectCommandResponse {
                reqid: *id,
                status: RpcStatus::from_wire(*status),
                error_message: None,
                response: Some(response.clone()),
            };
            // EVP2 (whose sizes sdk-broker measures) leaves the instance out of the answer.
            let encoded = codec.encode_direct_command_response("", &answer);
            let measured = sizes::rpc_response_len(*id, answer.status, response);
            assert_eq!(measured, encoded.len());
            let _ = limits::rpc_response_fits(*id, *status, response);
        }
        Request::BlobOperation {
            op,
            request: blob_request,
            filename,
            ..
        } => {
            if let BlobRequest::Evp {
                remote_name,
                storage_name,
            } = blob_request
            {
                // Hub1.RequestStorageToken's arguments.
                bus_safe("a remote name", remote_name);
                bus_safe(
                    "a storage name",
                    storage_name.as_deref().unwrap_or_default(),
                );
            }
            let workspace = Path::new("/var/lib/evp/instances/inst-1/default_workspace");
            if let Ok(file) = blob::confine(filename, workspace) {
                evp_fuzz::confined(&file, workspace);
            }
            if let Some(direction) = blob::Direction::from_code(*op) {
                let _ = blob::parse_headers(blob_request, direction);
            }
        }
        Request::SendMessage { topic, .. } => bus_safe("a message topic", topic),
        _ => {}
    }
});
