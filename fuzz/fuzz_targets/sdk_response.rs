//! What a module's SDK (evp-sdk, and runtimed-wasm through it) decodes from sdk-broker: a
//! response payload, and the events in it.
#![no_main]

use evp_schemas::sdk::Response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(response) = Response::decode(data) {
        assert_eq!(Response::decode(&response.encode()).as_ref(), Ok(&response));
        if let Response::GetEvent(event) = &response {
            let _ = event.wire_size();
        }
    }
});
