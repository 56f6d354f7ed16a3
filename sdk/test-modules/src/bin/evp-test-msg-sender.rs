//! Sends N messages on the publish alias `out` when configured with `count` = N (see the
//! crate's table).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// How long to wait for an event while a run waits for room or callbacks: short, since the
/// room may come from another instance draining its queue.
const PUMP_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

use evp_sdk::{Client, EvpResult, MessageSentReason};
use evp_sdk_test_modules::serve_count_runs;

const NAME: &str = "msg-sender";
/// The publish alias the messages go to.
const ALIAS: &str = "out";

/// Callbacks of the current run.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    errors: AtomicU64,
    done: AtomicU64,
}

fn main() {
    serve_count_runs(NAME, "count", run);
}

/// Sends `n` messages, waits for their callbacks, reports the tally.
fn run(client: &mut Client, n: u64) -> Result<(), EvpResult> {
    eprintln!("{NAME}: sending {n} messages on {ALIAS}");
    let tally = Arc::new(Tally::default());
    let mut i = 0;
    while i < n {
        let t = Arc::clone(&tally);
        let r = client.send_message(ALIAS, i.to_string().as_bytes(), move |reason| {
            match reason {
                MessageSentReason::Sent => t.sent.fetch_add(1, Ordering::SeqCst),
                _ => t.errors.fetch_add(1, Ordering::SeqCst),
            };
            t.done.fetch_add(1, Ordering::SeqCst);
        });
        match r {
            Ok(()) => i += 1,
            Err(e) if e.result() == EvpResult::Again => pump(client)?,
            Err(e) => {
                eprintln!("{NAME}: message {i} refused: {e}");
                return Err(e.result());
            }
        }
    }
    while tally.done.load(Ordering::SeqCst) < n {
        pump(client)?;
    }
    let report = serde_json::json!({
        "sent": tally.sent.load(Ordering::SeqCst),
        "errors": tally.errors.load(Ordering::SeqCst),
    });
    eprintln!("{NAME}: done: {report}");
    client
        .send_state("sent", report.to_string().as_bytes(), |_| {})
        .map_err(|e| e.result())
}

/// Processes one event; an exit request ends the run.
fn pump(client: &mut Client) -> Result<(), EvpResult> {
    match client.process_event(Some(PUMP_WAIT)) {
        EvpResult::Ok | EvpResult::TimedOut => Ok(()),
        other => Err(other),
    }
}
