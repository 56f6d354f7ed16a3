//! Sends numbered telemetry at a steady rate (see the crate's table).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use evp_sdk::{EvpResult, TelemetryReason};
use evp_sdk_test_modules::{connect, finish, parse_count};

const NAME: &str = "ticker";
/// The state `ticks` is sent at most this often, and only when it changed.
const REPORT_EVERY: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    errors: AtomicU64,
}

fn main() {
    let mut client = connect(NAME);
    let count = Arc::new(AtomicU64::new(0));
    let period = Arc::new(AtomicU64::new(0));
    let (c, p) = (Arc::clone(&count), Arc::clone(&period));
    let registered = client.set_configuration_callback(move |_, topic, value| {
        match (topic, parse_count(value)) {
            ("count", Some(n)) => c.store(n, Ordering::SeqCst),
            ("period_ms", Some(n)) => p.store(n, Ordering::SeqCst),
            _ => eprintln!("{NAME}: ignoring configuration {topic}"),
        }
    });
    if let Err(e) = registered {
        eprintln!("{NAME}: {e}");
        std::process::exit(1);
    }
    let tally = Arc::new(Tally::default());
    let mut next_seq = 0u64;
    let mut next_at = Instant::now();
    let mut reported = (u64::MAX, u64::MAX);
    let mut last_report = Instant::now();
    let mut told_done = false;
    loop {
        let wait = next_at
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(50));
        match client.process_event(Some(wait)) {
            EvpResult::Ok | EvpResult::TimedOut => {}
            other => return finish(NAME, other),
        }
        let period_ms = period.load(Ordering::SeqCst);
        if next_seq < count.load(Ordering::SeqCst) && period_ms > 0 && Instant::now() >= next_at {
            let value = next_seq.to_string();
            let t = Arc::clone(&tally);
            let r = client.send_telemetry(&[("seq", value.as_str())], move |reason| {
                match reason {
                    TelemetryReason::Sent => t.sent.fetch_add(1, Ordering::SeqCst),
                    _ => t.errors.fetch_add(1, Ordering::SeqCst),
                };
            });
            match r {
                Ok(()) => {
                    next_seq += 1;
                    next_at += Duration::from_millis(period_ms);
                }
                // Back-pressure: the same number again at the next turn.
                Err(e) if e.result() == EvpResult::Again => {}
                Err(e) => {
                    eprintln!("{NAME}: telemetry {next_seq} refused: {e}");
                    next_seq += 1;
                }
            }
        }
        let now = (
            tally.sent.load(Ordering::SeqCst),
            tally.errors.load(Ordering::SeqCst),
        );
        let wanted = count.load(Ordering::SeqCst);
        if !told_done && wanted > 0 && now.0 + now.1 >= wanted {
            // A line the tests wait for while the hub is away (no state reaches it then).
            eprintln!("{NAME}: all {wanted} done: {} SENT, {} other", now.0, now.1);
            told_done = true;
        }
        if now != reported && last_report.elapsed() >= REPORT_EVERY {
            let state = format!("{{\"sent\":{},\"errors\":{}}}", now.0, now.1);
            if client.send_state("ticks", state.as_bytes(), |_| {}).is_ok() {
                reported = now;
                last_report = Instant::now();
            }
        }
    }
}
