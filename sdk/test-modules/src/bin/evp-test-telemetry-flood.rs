//! Floods telemetry when configured with `flood` = N and reports how often the agent pushed
//! back (see the crate's table).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// How long to wait for an event while a run waits for room or callbacks: short, since the
/// room may come from another instance draining its queue.
const PUMP_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

use evp_sdk::{Client, EvpResult, TelemetryReason};
use evp_sdk_test_modules::serve_count_runs;

const NAME: &str = "telemetry-flood";

/// Callbacks of the current run.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    denied: AtomicU64,
    done: AtomicU64,
}

fn main() {
    serve_count_runs(NAME, "flood", run);
}

fn run(client: &mut Client, n: u64) -> Result<(), EvpResult> {
    // 100 bytes of JSON: a string of 98 characters and its quotes.
    let value = format!("\"{}\"", "x".repeat(98));
    let tally = Arc::new(Tally::default());
    let (mut accepted, mut again) = (0u64, 0u64);
    eprintln!("{NAME}: flooding {n} telemetry calls");
    while accepted < n {
        let t = Arc::clone(&tally);
        let r = client.send_telemetry(&[("v", value.as_str())], move |reason| {
            match reason {
                TelemetryReason::Sent => t.sent.fetch_add(1, Ordering::SeqCst),
                _ => t.denied.fetch_add(1, Ordering::SeqCst),
            };
            t.done.fetch_add(1, Ordering::SeqCst);
        });
        match r {
            Ok(()) => accepted += 1,
            Err(e) if e.result() == EvpResult::Again => {
                again += 1;
                pump(client)?;
            }
            Err(e) => {
                eprintln!("{NAME}: telemetry refused: {e}");
                return Err(e.result());
            }
        }
    }
    while tally.done.load(Ordering::SeqCst) < accepted {
        pump(client)?;
    }
    let report = serde_json::json!({
        "accepted": accepted,
        "again": again,
        "sent": tally.sent.load(Ordering::SeqCst),
        "denied": tally.denied.load(Ordering::SeqCst),
    });
    eprintln!("{NAME}: done: {report}");
    client
        .send_state("flood", report.to_string().as_bytes(), |_| {})
        .map_err(|e| e.result())
}

fn pump(client: &mut Client) -> Result<(), EvpResult> {
    match client.process_event(Some(PUMP_WAIT)) {
        EvpResult::Ok | EvpResult::TimedOut => Ok(()),
        other => Err(other),
    }
}
