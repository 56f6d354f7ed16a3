//! ThingsBoard's MQTT device provisioning, as hubd asks and a hub (the devhub) answers:
//! connect with user name [`USERNAME`] and no password, subscribe to [`RESPONSE_TOPIC`],
//! publish a [`Request`] to [`REQUEST_TOPIC`]; the answer is `{"status": "SUCCESS",
//! "credentialsType": "ACCESS_TOKEN", "credentialsValue": "<token>"}` (or `MQTT_BASIC` with an
//! object of `clientId`, `userName`, `password`), or `{"status": "FAILURE", "errorMsg": ...}`.

use serde::{Deserialize, Serialize};

/// The MQTT user name of a provisioning session.
pub const USERNAME: &str = "provision";
/// Where the device asks.
pub const REQUEST_TOPIC: &str = "/provision/request";
/// Where the hub answers.
pub const RESPONSE_TOPIC: &str = "/provision/response";

/// A provisioning request: the hub generates the credentials (ThingsBoard's strategy
/// "without pre-provisioned credentials").
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// The name the device is registered under.
    pub device_name: String,
    /// The device profile's provisioning key.
    pub provision_device_key: String,
    /// The device profile's provisioning secret.
    pub provision_device_secret: String,
}

impl std::fmt::Debug for Request {
    /// Without the secret, so a request is never logged with it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("device_name", &self.device_name)
            .field("provision_device_key", &self.provision_device_key)
            .finish_non_exhaustive()
    }
}

/// A granted access token, as ThingsBoard answers it.
pub fn access_token_answer(token: &str) -> serde_json::Value {
    serde_json::json!({
        "status": "SUCCESS",
        "credentialsType": "ACCESS_TOKEN",
        "credentialsValue": token,
    })
}

/// A refusal, as ThingsBoard answers it.
pub fn failure_answer(message: &str) -> serde_json::Value {
    serde_json::json!({ "status": "FAILURE", "errorMsg": message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_thingsboards_and_hides_the_secret_when_shown() {
        let r = Request {
            device_name: "d".into(),
            provision_device_key: "k".into(),
            provision_device_secret: "s3cret".into(),
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"deviceName": "d", "provisionDeviceKey": "k", "provisionDeviceSecret": "s3cret"})
        );
        assert!(!format!("{r:?}").contains("s3cret"));
    }
}
