//! Echoes every configuration as a state of the same topic (see the crate's table).

use evp_sdk_test_modules::{TICK, connect, finish};

const NAME: &str = "config-echo";

fn main() {
    let mut client = connect(NAME);
    let registered = client.set_configuration_callback(|c, topic, value| {
        eprintln!("{NAME}: configuration {topic} ({} bytes)", value.len());
        if let Err(e) = c.send_state(topic, value, |_| {}) {
            eprintln!("{NAME}: state {topic} refused: {e}");
            // Said to the hub too, so a test sees what the module was told.
            let refused = format!("{topic}/refused");
            if let Err(e) = c.send_state(&refused, e.result().to_string().as_bytes(), |_| {}) {
                eprintln!("{NAME}: state {refused} refused: {e}");
            }
        }
    });
    if let Err(e) = registered {
        eprintln!("{NAME}: {e}");
        std::process::exit(1);
    }
    finish(NAME, client.run_until_exit(TICK, |_| {}));
}
