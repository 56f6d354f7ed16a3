//! The hub's storage-token answers (`decode_storage_token_response`, EVP2's and EVP1's),
//! resolved for a file as hubd does before answering `Hub1.RequestStorageToken`, and kept on
//! disk for `multifile`.
#![no_main]

use evp_fuzz::{bus_safe, check_validation_error};
use evp_schemas::Protocol;
use evp_schemas::evp2::storage::StorageTokenResponse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for protocol in [Protocol::Evp2, Protocol::Evp1] {
        check(protocol, data);
    }
});

fn check(protocol: Protocol, data: &[u8]) {
    // EVP1 matches the answer by the topic's id, which it becomes the reqid of.
    let Some(answer) = protocol
        .codec()
        .decode_storage_token_response("10001", data)
    else {
        return;
    };
    let r = match answer {
        Ok(r) => r,
        Err(e) => return check_validation_error(&e),
    };
    // hubd keeps multifile answers in storage-tokens.json and reads them back after a restart.
    let kept = serde_json::to_vec(&r).expect("an answer serializes");
    let back: StorageTokenResponse =
        serde_json::from_slice(&kept).expect("a kept answer reads back");
    assert_eq!(back, r);
    let _ = r.expired(i64::MIN);
    let _ = r.expired(i64::MAX);
    for name in ["f", "images/cam1/0001.jpg", "a b?c#d%"] {
        // Both go back over D-Bus: the token as RequestStorageToken's answer, the refusal as
        // its error's message.
        match r.token_for(name) {
            Ok(token) => {
                bus_safe("the token's URL", &token.url);
                for (k, v) in &token.headers {
                    bus_safe("a token header's name", k);
                    bus_safe("a token header's value", v);
                }
                assert_eq!(token.expires_at_ms, r.expires_at_ms());
            }
            Err(why) => bus_safe("a token refusal", &why),
        }
    }
}
