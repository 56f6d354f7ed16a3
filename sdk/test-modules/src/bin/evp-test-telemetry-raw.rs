//! Sends every configuration's text as a telemetry value as it is, JSON or not, and reports
//! what the agent did with it as a state (see the crate's table).

use std::sync::{Arc, Mutex};

use evp_sdk_test_modules::{TICK, connect, finish};

const NAME: &str = "telemetry-raw";

fn main() {
    let mut client = connect(NAME);
    // (topic, what to report) waiting to be sent as states, outside the callbacks.
    let outcomes: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let out = Arc::clone(&outcomes);
    let registered = client.set_configuration_callback(move |c, topic, value| {
        let text = String::from_utf8_lossy(value).into_owned();
        eprintln!("{NAME}: configuration {topic} -> telemetry {text:?}");
        let (t, done) = (topic.to_owned(), Arc::clone(&out));
        let sent = c.send_telemetry(&[(topic, &text)], move |reason| {
            let reason = format!("{reason:?}").to_uppercase();
            lock(&done).push((t, format!("EVP_OK {reason}")));
        });
        if let Err(e) = sent {
            eprintln!("{NAME}: telemetry {topic} refused: {e}");
            lock(&out).push((topic.to_owned(), e.result().to_string()));
        }
    });
    if let Err(e) = registered {
        eprintln!("{NAME}: {e}");
        std::process::exit(1);
    }
    let end = client.run_until_exit(TICK, |c| {
        for (topic, outcome) in std::mem::take(&mut *lock(&outcomes)) {
            if let Err(e) = c.send_state(&topic, outcome.as_bytes(), |_| {}) {
                eprintln!("{NAME}: state {topic} refused: {e}");
            }
        }
    });
    finish(NAME, end);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
