//! Floods telemetry when configured with `flood` = N and reports how often the agent pushed
//! back (see the crate's table).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// How long to wait for an event while a run waits for room or callbacks: short, since the
/// room may come from another instance draining its queue.
const PUMP_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

use evp_sdk::{Client, EvpResult, TelemetryReason};
use evp_sdk_test_modules::{TICK, connect, finish, parse_count};

const NAME: &str = "telemetry-flood";

/// Callbacks of the current run.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    denied: AtomicU64,
    done: AtomicU64,
}

fn main() {
    let mut client = connect(NAME);
    let wanted = Arc::new(AtomicU64::new(0));
    let w = Arc::clone(&wanted);
    let registered = client.set_configuration_callback(move |_, topic, value| {
        if topic == "flood" {
            match parse_count(value) {
                Some(n) => w.store(n, Ordering::SeqCst),
                None => eprintln!("{NAME}: flood is not a number"),
            }
        }
    });
    if let Err(e) = registered {
        eprintln!("{NAME}: {e}");
        std::process::exit(1);
    }
    loop {
        match client.process_event(Some(TICK)) {
            EvpResult::Ok | EvpResult::TimedOut => {}
            other => return finish(NAME, other),
        }
        let n = wanted.swap(0, Ordering::SeqCst);
        if n > 0
            && let Err(end) = run(&mut client, n)
        {
            return finish(NAME, end);
        }
    }
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
