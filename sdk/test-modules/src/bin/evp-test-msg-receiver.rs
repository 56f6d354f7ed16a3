//! Counts received messages and reports the count as the state `received` (see the crate's
//! table).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use evp_sdk::EvpResult;
use evp_sdk_test_modules::{TICK, connect, finish};

const NAME: &str = "msg-receiver";
/// Least time between two reports of the count, so a burst does not become a burst of states.
const REPORT_EVERY: Duration = Duration::from_millis(100);

fn main() {
    let mut client = connect(NAME);
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    if let Err(e) = client.set_message_callback(move |_, _topic, _payload| {
        c.fetch_add(1, Ordering::SeqCst);
    }) {
        eprintln!("{NAME}: {e}");
        std::process::exit(1);
    }
    let mut reported = 0;
    let mut last = Instant::now();
    loop {
        match client.process_event(Some(TICK)) {
            EvpResult::Ok | EvpResult::TimedOut => {}
            other => return finish(NAME, other),
        }
        let now = count.load(Ordering::SeqCst);
        if now != reported && last.elapsed() >= REPORT_EVERY {
            match client.send_state("received", now.to_string().as_bytes(), |_| {}) {
                Ok(()) => {
                    reported = now;
                    last = Instant::now();
                }
                Err(e) => eprintln!("{NAME}: state refused: {e}"),
            }
        }
    }
}
