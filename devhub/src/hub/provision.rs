//! The hub's answers to ThingsBoard device provisioning (`/provision/request`), as a test or
//! `evp-devhub up --provision` configures them with [`super::HubSide::set_provisioning`]: a
//! request with the expected key and secret gets an access token (the same one each time for
//! one device name), any other a `FAILURE`.

use std::collections::BTreeMap;

use evp_schemas::provision::{Request, access_token_answer, failure_answer};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The device profile's provisioning key and secret the hub accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionProfile {
    /// `provisionDeviceKey`.
    pub key: String,
    /// `provisionDeviceSecret`.
    pub secret: String,
}

impl ProvisionProfile {
    /// A key and secret of the devhub's own making, unique to this moment and process.
    pub fn generated() -> ProvisionProfile {
        let seed = format!("{:?}-{}", std::time::SystemTime::now(), std::process::id());
        let digest = hex::encode(Sha256::digest(seed.as_bytes()));
        ProvisionProfile {
            key: format!("devhub-key-{}", &digest[..12]),
            secret: format!("devhub-secret-{}", &digest[12..32]),
        }
    }
}

/// A provisioning request the hub side saw, as [`super::DeviceReport::ProvisionRequest`]
/// hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionSeen {
    /// The device name asked for (empty when the request named none).
    pub device_name: String,
    /// The token granted; `None`: refused.
    pub token: Option<String>,
    /// When the hub side read the request.
    pub received_at: std::time::Instant,
}

/// The answer to `payload` under `profile`, with `issued` the tokens granted so far (device
/// name → token; a new device's is added).
pub fn answer(
    profile: &ProvisionProfile,
    issued: &mut BTreeMap<String, String>,
    payload: &[u8],
) -> (Value, ProvisionSeen) {
    let request: Request = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => {
            let seen = ProvisionSeen {
                device_name: String::new(),
                token: None,
                received_at: std::time::Instant::now(),
            };
            return (
                failure_answer(&format!("not a provisioning request: {e}")),
                seen,
            );
        }
    };
    let mut seen = ProvisionSeen {
        device_name: request.device_name.clone(),
        token: None,
        received_at: std::time::Instant::now(),
    };
    if request.provision_device_key != profile.key
        || request.provision_device_secret != profile.secret
    {
        let message = format!(
            "no device profile has the provisioning key {:?} with that secret",
            request.provision_device_key
        );
        return (failure_answer(&message), seen);
    }
    let token = issued
        .entry(request.device_name.clone())
        .or_insert_with(|| {
            let digest = Sha256::digest(format!("{}/{}", profile.secret, request.device_name));
            hex::encode(&digest[..10])
        })
        .clone();
    seen.token = Some(token.clone());
    (access_token_answer(&token), seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(key: &str, secret: &str, name: &str) -> Vec<u8> {
        serde_json::json!({"deviceName": name, "provisionDeviceKey": key, "provisionDeviceSecret": secret})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn the_right_key_gets_one_token_per_device_and_others_a_failure() {
        let profile = ProvisionProfile::generated();
        let mut issued = BTreeMap::new();
        let (first, seen) = answer(
            &profile,
            &mut issued,
            &request(&profile.key, &profile.secret, "d1"),
        );
        assert_eq!(first["status"], "SUCCESS");
        assert_eq!(first["credentialsType"], "ACCESS_TOKEN");
        let token = first["credentialsValue"].as_str().unwrap().to_owned();
        assert_eq!(seen.token.as_deref(), Some(token.as_str()));
        let (again, _) = answer(
            &profile,
            &mut issued,
            &request(&profile.key, &profile.secret, "d1"),
        );
        assert_eq!(again["credentialsValue"], token.as_str());
        let (other, _) = answer(
            &profile,
            &mut issued,
            &request(&profile.key, &profile.secret, "d2"),
        );
        assert_ne!(other["credentialsValue"], token.as_str());

        let (refused, seen) = answer(&profile, &mut issued, &request(&profile.key, "wrong", "d3"));
        assert_eq!(refused["status"], "FAILURE");
        assert!(!refused.to_string().contains("wrong"), "{refused}");
        assert_eq!((seen.device_name.as_str(), seen.token), ("d3", None));
        let (bad, _) = answer(&profile, &mut issued, b"{}");
        assert_eq!(bad["status"], "FAILURE");
        assert_eq!(issued.len(), 2);
    }
}
