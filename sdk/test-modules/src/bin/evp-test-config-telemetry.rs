//! Sends every configuration as a telemetry entry (see the crate's table).

use evp_sdk_test_modules::{TICK, as_json, connect, finish};

const NAME: &str = "config-telemetry";

fn main() {
    let mut client = connect(NAME);
    let registered = client.set_configuration_callback(|c, topic, value| {
        let json = as_json(value);
        eprintln!("{NAME}: configuration {topic} -> telemetry {json}");
        if let Err(e) = c.send_telemetry(&[(topic, &json)], |_| {}) {
            eprintln!("{NAME}: telemetry {topic} refused: {e}");
        }
    });
    if let Err(e) = registered {
        eprintln!("{NAME}: {e}");
        std::process::exit(1);
    }
    finish(NAME, client.run_until_exit(TICK, |_| {}));
}
