//! Direct commands from the hub (`decode_direct_command`) and the answers hubd makes of them,
//! in both dialects: EVP2's request id is in the payload, EVP1's is the topic's.
#![no_main]

use evp_fuzz::{bus_safe, check_validation_error};
use evp_schemas::{DirectCommand, DirectCommandResponse, HubCodec, Protocol, RpcStatus};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

/// The topic id the requests come on (EVP1's reqid).
const MQTT_ID: &str = "10042";

fuzz_target!(|data: &[u8]| {
    for protocol in [Protocol::Evp2, Protocol::Evp1] {
        let codec = protocol.codec();
        match codec.decode_direct_command(MQTT_ID, data) {
            Ok(Some(cmd)) => {
                // CallMethod carries these over D-Bus.
                bus_safe("the method", &cmd.method);
                bus_safe("the instance", &cmd.instance);
                bus_safe("the params", &cmd.params);
                // The command as the hub would send it decodes to the same command.
                let again = resent(protocol, &cmd).to_string();
                assert_eq!(
                    codec.decode_direct_command(MQTT_ID, again.as_bytes()),
                    Ok(Some(cmd.clone()))
                );
                answer(protocol, codec, &cmd.instance, cmd.reqid, None);
            }
            Ok(None) => {}
            Err(e) => {
                check_validation_error(&e.error);
                // A readable reqid is answered with the error, on the same request.
                if let Some(reqid) = e.reqid {
                    answer(protocol, codec, "", reqid, Some(e.to_string()));
                }
            }
        }
    }
});

/// `cmd` as a hub of `protocol` sends it.
fn resent(protocol: Protocol, cmd: &DirectCommand) -> Value {
    match protocol {
        Protocol::Evp2 => json!({"method": "evp-c2d", "params": {
        "direct-command-request": {
            "reqid": cmd.reqid.to_string(), "method": cmd.method,
            "instance": cmd.instance, "params": cmd.params,
        }}}),
        Protocol::Evp1 => {
            // EVP1's params are JSON, handed to the module as text.
            let params: Value = serde_json::from_str(&cmd.params).expect("EVP1 params are JSON");
            json!({"method": "ModuleMethodCall", "params": {
                "moduleInstance": cmd.instance, "moduleMethod": cmd.method, "params": params}})
        }
    }
}

/// The answer encodes to the dialect's shape and carries what says which request it answers.
fn answer(
    protocol: Protocol,
    codec: &dyn HubCodec,
    instance: &str,
    reqid: u64,
    error: Option<String>,
) {
    let response = DirectCommandResponse {
        reqid,
        status: if error.is_some() {
            RpcStatus::Error
        } else {
            RpcStatus::Ok
        },
        error_message: error.clone(),
        response: None,
    };
    let v: Value =
        serde_json::from_slice(&codec.encode_direct_command_response(instance, &response))
            .expect("an answer is JSON");
    let message = match protocol {
        Protocol::Evp2 => {
            let inner = &v["direct-command-response"];
            assert_eq!(inner["reqid"], reqid.to_string(), "{v}");
            inner["errorMessage"].clone()
        }
        // The topic id carries the reqid; the payload names the instance.
        Protocol::Evp1 => {
            assert_eq!(v["moduleInstance"], instance, "{v}");
            v["response"]["error"].clone()
        }
    };
    if let Some(expected) = error {
        assert_eq!(message, expected.as_str(), "{v}");
        assert!(expected.len() < 1024, "an unbounded error: {expected:?}");
    }
}
