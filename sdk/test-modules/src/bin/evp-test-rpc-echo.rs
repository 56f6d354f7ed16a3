//! Answers the direct command `echo` with its params (see the crate's table).

use evp_sdk::RpcStatus;
use evp_sdk_test_modules::{TICK, connect, finish};

const NAME: &str = "rpc-echo";

fn main() {
    let mut client = connect(NAME);
    let registered = client.set_rpc_callback(|c, req| {
        eprintln!("{NAME}: command {} {}", req.id, req.method);
        let (status, response) = if req.method == "echo" {
            (RpcStatus::Ok, req.params)
        } else {
            let error = serde_json::json!({ "error": format!("unknown method {}", req.method) });
            (RpcStatus::MethodNotFound, error.to_string())
        };
        if let Err(e) = c.send_rpc_response(req.id, &response, status, |_| {}) {
            eprintln!("{NAME}: answer to {} refused: {e}", req.id);
        }
    });
    if let Err(e) = registered {
        eprintln!("{NAME}: {e}");
        std::process::exit(1);
    }
    finish(NAME, client.run_until_exit(TICK, |_| {}));
}
