//! `agent.toml` as each daemon reads it: the top level (`AgentConfig::parse`), then its own
//! table, with the settings types of the daemons this workspace builds (hubd's, runtimed-wasm's
//! and runtimed-container's are not linked here).
#![no_main]

use evp_daemon::AgentConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match AgentConfig::parse(text) {
        Ok(c) => c,
        Err(e) => {
            // The daemon exits with this message: it names the file.
            assert!(format!("{e:#}").contains("agent.toml"), "{e:#}");
            return;
        }
    };
    let _ = config.section::<evp_sdk_broker::Settings>(evp_sdk_broker::SECTION);
    let _ = config.section::<evp_reconcilerd::ReconcilerConfig>("reconciler");
    // A section that is absent reads as all defaults.
    let absent = config.section::<evp_sdk_broker::Settings>("no-such-section");
    if !text.contains("no-such-section") {
        assert!(absent.is_ok(), "{absent:?}");
    }
});
