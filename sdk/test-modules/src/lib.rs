//! Small EVP modules written with `evp-sdk`, built by `cargo build --workspace` into
//! `target/<profile>/`, for the system tests that drive them from the hub. Each connects to
//! `$EVP_MODULE_SDK_SOCKET_PATH`, logs one line per notable step on stderr, and returns from
//! `main` (exit status 0) when the agent's exit event arrives (`EVP_SHOULDEXIT`). Exit status 1
//! means the SDK socket could not be reached.
//!
//! | binary | behaviour |
//! | --- | --- |
//! | `evp-test-config-echo` | every configuration `(topic, value)` is sent back as the state `(topic, value)`; when the agent refuses that state, the state `<topic>/refused` is the code it answered (`EVP_TOOBIG`) |
//! | `evp-test-telemetry-raw` | every configuration `(topic, value)` is sent as one telemetry entry with key `topic` and the value's text as it is, JSON or not; the state `<topic>` then says what the agent did: the call's code and, once it comes, the callback's reason (`EVP_OK SENT`) |
//! | `evp-test-config-telemetry` | every configuration `(topic, value)` is sent as one telemetry entry with key `topic`; the value as it is when it is JSON, else as a JSON string |
//! | `evp-test-rpc-echo` | direct command `echo` is answered OK with its params as the response; any other method gets `METHOD_NOT_FOUND` with `{"error":"unknown method <m>"}` |
//! | `evp-test-msg-sender` | configuration `count` = N (decimal text) sends N messages `"0"`..`"N-1"` on the publish alias `out` (retrying on `EVP_AGAIN`), then reports the state `sent` = `{"sent":S,"errors":E}` where S and E count the SENT and ERROR callbacks of that run |
//! | `evp-test-msg-receiver` | counts the messages received on any subscribe alias and reports the state `received` = the count (a JSON number), at most every 100 ms and only when it changed |
//! | `evp-test-nul` | direct command `probe` makes it call `send_state`, `send_telemetry` (in the key), `send_message` (in the alias) and `send_rpc_response` (for the probe itself) with a string holding a NUL byte, then answer the probe OK with `{"state":R,"telemetryKey":R,"message":R,"rpcResponse":R}`, each R the call's result (`"EVP_INVAL"`) |
//! | `evp-test-output-flood` | writes 1000-byte lines `flood <offset> xxx…` to stdout as fast as it can, 64 at a time, where `offset` (12 digits) counts the bytes written to stdout before the line, and one line to stderr every 16 writes, until the agent asks it to exit |
//! | `evp-test-blob` | configuration `<topic>` = `{"op":"get"\|"put","type":T,"url":U,"file":F,"headers":[...]}` starts a blob operation of `EVP_BLOB_TYPE` T (default HTTP) on workspace file F (a name without `/` is joined to the workspace); the state `<topic>` is then `{"reason":"DONE"\|"EXIT","result":N,"http_status":S,"error":E}`, or `{"refused":"EVP_…"}` when the request was refused at once; EVP storage (T = 3) takes `"remote_name"` and `"storage"` instead of the URL |
//! | `evp-test-hostile` | breaks the wire format, one connection per misdeed (a payload over the limit then a good request; a header with a non-zero second word; one of size 0; garbage under a good header; a record cut short then a good one on a new connection; requests written without reading answers until the socket stays full; 300 connections at once; a header of 0xFFFFFFFF bytes followed by 64 MiB), then connects with evp-sdk, reports the state `report` = what each misdeed was answered, and echoes configurations as states |
//! | `evp-test-ticker` | configurations `count` = N and `period_ms` = P send the telemetry entries `seq` = 0, 1, … N-1, one every P ms (an `EVP_AGAIN` retries the same number); the state `ticks` = `{"sent":S,"errors":E}` counts the SENT and other callbacks, sent at most every 200 ms when it changed; once every callback came back it writes `ticker: all N done: S SENT, E other` to stderr |
//! | `evp-test-telemetry-flood` | configuration `flood` = N sends N telemetry calls, each one entry `v` with a 100-byte JSON string, as fast as it can without processing events until the agent answers `EVP_AGAIN` (then it processes events and retries); when every callback came back it reports the state `flood` = `{"accepted":N,"again":A,"sent":S,"denied":D}` |
//!
//! With sdk-broker's default limits (`event_queue_bytes` 1 MiB, that is 16384 callbacks
//! waiting) the flooder meets `EVP_AGAIN` only when N is above about 16000, or when the
//! broker's queue limits are set lower in `[sdk_broker]`.
//!
//! Every module also answers no direct command except `evp-test-rpc-echo`; evp-sdk answers
//! those with status ERROR.

use std::time::Duration;

use evp_sdk::Client;

/// How long each module waits for an event before doing its idle work.
pub const TICK: Duration = Duration::from_millis(100);

/// Connects to the agent, or exits with status 1 saying why.
pub fn connect(name: &str) -> Client {
    match Client::initialize() {
        Ok(c) => {
            eprintln!("{name}: connected");
            c
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::exit(1);
        }
    }
}

/// `value` as JSON text: itself when it already is JSON, else a JSON string of its text.
pub fn as_json(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    if serde_json::from_str::<serde_json::Value>(&text).is_ok() {
        text.into_owned()
    } else {
        serde_json::Value::String(text.into_owned()).to_string()
    }
}

/// A decimal count from a configuration value (surrounding spaces and quotes allowed).
pub fn parse_count(value: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(value)
        .trim()
        .trim_matches('"')
        .parse()
        .ok()
}

/// Logs how the module ends.
pub fn finish(name: &str, end: evp_sdk::EvpResult) {
    eprintln!("{name}: leaving ({end})");
}

/// The main loop of a module that does a run of `n` operations each time the configuration
/// `topic` is set to a count `n`: connects, waits for the configuration while processing
/// events, calls `run` with it, and returns when the agent asks it to exit.
pub fn serve_count_runs(
    name: &'static str,
    topic: &'static str,
    mut run: impl FnMut(&mut Client, u64) -> Result<(), evp_sdk::EvpResult>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut client = connect(name);
    // The run to do: how many operations; 0 when idle.
    let wanted = Arc::new(AtomicU64::new(0));
    let w = Arc::clone(&wanted);
    let registered = client.set_configuration_callback(move |_, t, value| {
        if t == topic {
            match parse_count(value) {
                Some(n) => w.store(n, Ordering::SeqCst),
                None => eprintln!("{name}: {topic} is not a number"),
            }
        }
    });
    if let Err(e) = registered {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
    loop {
        match client.process_event(Some(TICK)) {
            evp_sdk::EvpResult::Ok | evp_sdk::EvpResult::TimedOut => {}
            other => return finish(name, other),
        }
        let n = wanted.swap(0, Ordering::SeqCst);
        if n > 0
            && let Err(end) = run(&mut client, n)
        {
            return finish(name, end);
        }
    }
}

/// The main loop of a module that only answers direct commands: connects, answers each one
/// with what `answer` returns for it (logging a refused answer), and returns when the agent
/// asks it to exit.
pub fn serve_rpc(
    name: &'static str,
    mut answer: impl FnMut(&mut Client, &evp_sdk::RpcRequest) -> (evp_sdk::RpcStatus, String)
    + Send
    + 'static,
) {
    let mut client = connect(name);
    let registered = client.set_rpc_callback(move |c, req| {
        let (status, response) = answer(c, &req);
        eprintln!("{name}: command {} {}: {status:?}", req.id, req.method);
        if let Err(e) = c.send_rpc_response(req.id, &response, status, |_| {}) {
            eprintln!("{name}: answer to {} refused: {e}", req.id);
        }
    });
    if let Err(e) = registered {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
    finish(name, client.run_until_exit(TICK, |_| {}));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_become_json() {
        assert_eq!(as_json(b"42"), "42");
        assert_eq!(as_json(b"{\"a\":1}"), "{\"a\":1}");
        assert_eq!(as_json(b"hello"), "\"hello\"");
        assert_eq!(parse_count(b" \"1000\" "), Some(1000));
        assert_eq!(parse_count(b"x"), None);
    }
}
