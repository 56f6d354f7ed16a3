//! Answers the direct command `echo` with its params (see the crate's table).

use evp_sdk::RpcStatus;
use evp_sdk_test_modules::serve_rpc;

fn main() {
    serve_rpc("rpc-echo", |_, req| {
        if req.method == "echo" {
            (RpcStatus::Ok, req.params.clone())
        } else {
            let error = serde_json::json!({ "error": format!("unknown method {}", req.method) });
            (RpcStatus::MethodNotFound, error.to_string())
        }
    });
}
