//! The canonical deployment JSON: what reconcilerd reads off the bus (`ApplyDeployment`) and
//! from `desired.json` at start (`Deployment::from_json`, which validates).
#![no_main]

use evp_fuzz::check_validation_error;
use evp_schemas::Deployment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Deployment::from_json(text) {
        Ok(d) => {
            let json = d.to_json();
            assert!(
                !json.contains("\\u0000"),
                "a NUL in an accepted manifest: {json}"
            );
            assert_eq!(Deployment::from_json(&json), Ok(d.clone()), "{json}");
        }
        Err(e) => check_validation_error(&e),
    }
});
