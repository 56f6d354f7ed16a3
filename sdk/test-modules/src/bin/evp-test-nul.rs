//! Sends strings holding a NUL byte through every SDK call that passes a string on, when the
//! direct command `probe` arrives, and answers the command with what each call returned (see
//! the crate's table).

use evp_sdk::{Client, EvpResult, RpcStatus};
use evp_sdk_test_modules::serve_rpc;

const NAME: &str = "nul";

/// What a call returned, as the C SDK names it.
fn code(r: Result<(), evp_sdk::Error>) -> String {
    r.map_or_else(|e| e.result(), |()| EvpResult::Ok)
        .to_string()
}

fn probe(c: &mut Client, id: u64) -> serde_json::Value {
    let state = code(c.send_state("bad\0topic", b"1", |_| {}));
    let key = code(c.send_telemetry(&[("bad\0key", "1")], |_| {}));
    let message = code(c.send_message("o\0ut", b"1", |_| {}));
    let rpc = code(c.send_rpc_response(id, "bad\0answer", RpcStatus::Ok, |_| {}));
    serde_json::json!({
        "state": state, "telemetryKey": key, "message": message, "rpcResponse": rpc,
    })
}

fn main() {
    serve_rpc(NAME, |c, req| {
        if req.method == "probe" {
            (RpcStatus::Ok, probe(c, req.id).to_string())
        } else {
            (RpcStatus::MethodNotFound, "{}".to_owned())
        }
    });
}
