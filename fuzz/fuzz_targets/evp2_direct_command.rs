//! Direct commands from the hub (`decode_direct_command`) and the answers hubd makes of them.
#![no_main]

use evp_fuzz::{bus_safe, check_validation_error};
use evp_schemas::evp2::Evp2Codec;
use evp_schemas::{DirectCommandResponse, HubCodec, RpcStatus};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let codec = Evp2Codec;
    match codec.decode_direct_command(data) {
        Ok(Some(cmd)) => {
            // CallMethod carries these over D-Bus.
            bus_safe("the method", &cmd.method);
            bus_safe("the instance", &cmd.instance);
            bus_safe("the params", &cmd.params);
            // The command as the hub would send it decodes to the same command.
            let again = json!({"method": "ModuleMethodCall", "params": {
            "direct-command-request": {
                "reqid": cmd.reqid.to_string(), "method": cmd.method,
                "instance": cmd.instance, "params": cmd.params,
            }}})
            .to_string();
            assert_eq!(
                codec.decode_direct_command(again.as_bytes()),
                Ok(Some(cmd.clone()))
            );
            answer(&codec, cmd.reqid, None);
        }
        Ok(None) => {}
        Err(e) => {
            check_validation_error(&e.error);
            // A readable reqid is answered with the error, on the same request.
            if let Some(reqid) = e.reqid {
                answer(&codec, reqid, Some(e.to_string()));
            }
        }
    }
});

/// The answer encodes to EVP2's shape and carries `reqid` back.
fn answer(codec: &Evp2Codec, reqid: u64, error: Option<String>) {
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
    let v: Value = serde_json::from_slice(&codec.encode_direct_command_response(&response))
        .expect("an answer is JSON");
    let inner = &v["direct-command-response"];
    assert_eq!(inner["reqid"], reqid.to_string(), "{v}");
    if let Some(message) = error {
        assert_eq!(inner["errorMessage"], message, "{v}");
        assert!(message.len() < 1024, "an unbounded error: {message:?}");
    }
}
