//! The hub's shared attributes: a PATCH (`decode_attribute_update`) and the answer to the
//! initial GET (`decode_attribute_response`), with the deployment, device configuration and
//! configuration decoders under them, in both dialects (EVP2 and EVP1). What they let through
//! is what hubd hands on over D-Bus.
#![no_main]

use evp_fuzz::{bus_safe, check_validation_error};
use evp_schemas::{Deployment, DesiredChange, Protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for codec in [Protocol::Evp2.codec(), Protocol::Evp1.codec()] {
        for change in codec
            .decode_attribute_update(data)
            .iter()
            .chain(codec.decode_attribute_response(data).iter())
        {
            check(change);
        }
    }
});

fn check(change: &DesiredChange) {
    match change {
        DesiredChange::Deployment(d) => {
            // hubd sends it as JSON and reconcilerd validates again: both must agree.
            assert_eq!(d.validate(), Ok(()), "{d:?}");
            let json = d.to_json();
            assert!(
                !json.contains("\\u0000"),
                "a NUL in an accepted manifest: {json}"
            );
            assert_eq!(Deployment::from_json(&json).as_ref(), Ok(d), "{json}");
        }
        DesiredChange::RejectedDeployment { error, .. } | DesiredChange::Invalid(error) => {
            check_validation_error(error)
        }
        DesiredChange::DeploymentRemoved => {}
        // Only EVP1 says so, and only of the device configuration it does not have.
        DesiredChange::NotInDialect(key) => assert_eq!(key, "desiredDeviceConfig"),
        DesiredChange::DeviceConfig(c) => {
            if let Some(min) = c.report_status_interval_min {
                assert!((1..=86_400).contains(&min), "{c:?}");
            }
            if let Some(max) = c.report_status_interval_max {
                assert!(max == -1 || (1..=86_400).contains(&max), "{c:?}");
            }
            // Hub1.RegistryAuth hands these to runtimed-container as a{ss}.
            for (registry, auth) in c.registry_auth.iter().flatten() {
                bus_safe("a registry name", registry);
                bus_safe("a registry's credentials", auth);
            }
        }
        DesiredChange::Configuration {
            instance, topic, ..
        }
        | DesiredChange::ConfigurationDeleted { instance, topic } => {
            assert!(!instance.is_empty() && !topic.is_empty(), "{change:?}");
            bus_safe("a configuration's instance", instance);
            bus_safe("a configuration's topic", topic);
        }
    }
}
