//! ThingsBoard device provisioning: a device with a provisioning key and secret and no
//! credentials registers itself (`/provision/request` → `/provision/response`), keeps the
//! credentials the hub answers and connects with them from then on.
//!
//! This module decides; [`session`] runs one provisioning MQTT session and the retries, and
//! [`store`] keeps the credentials.
//!
//! - Configured credentials (user name, password, TLS client certificate) always win: such a
//!   device never provisions, and ignores stored credentials.
//! - Stored credentials are used as they are; provisioning runs once per device.
//! - A refusal (the hub's `FAILURE`, an answer this device cannot use) is retried on
//!   [`refused_backoff`]; a session that could not be had (no broker, no answer) on the
//!   reconnect schedule.

pub mod session;
pub mod store;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{HubConfig, ProvisionKey};
use crate::core::ConnectionState;

pub use evp_schemas::provision::{REQUEST_TOPIC, RESPONSE_TOPIC, USERNAME as PROVISION_USERNAME};
/// Longest refusal text kept from the hub's answer (it goes to the log).
const MAX_REASON: usize = 512;
/// Longest client id, user name or password MQTT can carry: its strings have a two-byte length.
const MAX_MQTT_STRING: usize = u16::MAX as usize;

/// First wait after a refusal. A refusal is a device profile (or key) to fix on the hub: an
/// operator who fixes it sees the device within seconds at first...
const REFUSED_RETRY_FIRST: Duration = Duration::from_secs(5);
/// ... and a fleet with a wrong key asks each device at most every 15 minutes, which keeps
/// the provisioning endpoint's load negligible while the operator sees a fix take effect
/// within a quarter of an hour.
const REFUSED_RETRY_MAX: Duration = Duration::from_secs(15 * 60);

/// The schedule after refusals: 5, 10, 20 s ... 15 min, each shortened by up to a quarter at
/// random so a fleet does not ask in lock-step.
pub fn refused_backoff() -> evp_daemon::Backoff {
    evp_daemon::Backoff::new(REFUSED_RETRY_FIRST, REFUSED_RETRY_MAX)
}

/// Credentials the hub gave, as kept in [`store`] and used for every connection after.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "credentialsType", deny_unknown_fields)]
pub enum Credentials {
    /// A ThingsBoard access token: the MQTT user name, no password.
    #[serde(rename = "ACCESS_TOKEN")]
    AccessToken {
        /// The token.
        token: String,
    },
    /// MQTT basic credentials; each part optional, as ThingsBoard has them.
    #[serde(rename = "MQTT_BASIC", rename_all = "camelCase")]
    MqttBasic {
        /// The client id the hub knows the device by.
        client_id: Option<String>,
        /// The user name.
        user_name: Option<String>,
        /// The password.
        password: Option<String>,
    },
}

impl std::fmt::Debug for Credentials {
    /// Names the kind only: credentials are never logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl Credentials {
    /// `ACCESS_TOKEN` or `MQTT_BASIC`.
    pub fn kind(&self) -> &'static str {
        match self {
            Credentials::AccessToken { .. } => "ACCESS_TOKEN",
            Credentials::MqttBasic { .. } => "MQTT_BASIC",
        }
    }

    /// `cfg` connecting with these credentials. A client id the hub gave replaces the
    /// configured one: the hub authenticates the device by it.
    pub fn apply(&self, cfg: &mut HubConfig) {
        match self {
            Credentials::AccessToken { token } => {
                cfg.username = Some(token.clone());
                cfg.password = None;
            }
            Credentials::MqttBasic {
                client_id,
                user_name,
                password,
            } => {
                if client_id.is_some() {
                    cfg.client_id.clone_from(client_id);
                }
                cfg.username.clone_from(user_name);
                cfg.password.clone_from(password);
            }
        }
    }
}

/// How hubd gets its MQTT credentials at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Credentials are configured (or none are needed): connect as configured.
    AsConfigured,
    /// Use the credentials provisioned at an earlier start.
    Stored(Credentials),
    /// Register the device first.
    Provision(ProvisionKey),
}

/// Whether `cfg` names credentials of its own: a user name, a password or a TLS client
/// certificate.
pub fn has_configured_credentials(cfg: &HubConfig) -> bool {
    cfg.username.is_some()
        || cfg.password.is_some()
        || cfg.tls.as_ref().is_some_and(|t| t.client.is_some())
}

/// The plan for `cfg` with `stored`, the credentials kept from an earlier provisioning.
pub fn plan(cfg: &HubConfig, stored: Option<Credentials>) -> Plan {
    if has_configured_credentials(cfg) {
        return Plan::AsConfigured;
    }
    match (stored, &cfg.provision) {
        (Some(credentials), _) => Plan::Stored(credentials),
        (None, Some(key)) => Plan::Provision(key.clone()),
        (None, None) => Plan::AsConfigured,
    }
}

/// The request: the device's name, the key and the secret; the hub generates the credentials.
pub fn request(device_name: &str, key: &ProvisionKey) -> Vec<u8> {
    let request = evp_schemas::provision::Request {
        device_name: device_name.to_owned(),
        provision_device_key: key.key.clone(),
        provision_device_secret: key.secret.clone(),
    };
    serde_json::to_vec(&request).unwrap_or_default()
}

/// What the hub answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Provisioned.
    Granted(Credentials),
    /// Refused, or an answer this device cannot use: why, in words.
    Refused(String),
}

/// Reads the hub's answer. ThingsBoard says `status` (older versions
/// `provisionDeviceStatus`), and on success `credentialsType` with `credentialsValue` (older:
/// `accessToken`).
pub fn decode_answer(payload: &[u8]) -> Answer {
    let refused = |why: String| Answer::Refused(evp_schemas::text::shorten_owned(why, MAX_REASON));
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(payload) else {
        return refused(format!(
            "the answer is not a JSON object: {:?}",
            evp_schemas::text::shorten(&String::from_utf8_lossy(payload), 64)
        ));
    };
    let text = |key: &str| answer.get(key).and_then(Value::as_str);
    let status = text("status").or_else(|| text("provisionDeviceStatus"));
    if status != Some("SUCCESS") {
        let why = text("errorMsg").unwrap_or("no errorMsg given");
        return refused(format!(
            "the hub answered {}: {why}",
            status.unwrap_or("no status")
        ));
    }
    let value = answer.get("credentialsValue");
    let decoded = match text("credentialsType") {
        Some("ACCESS_TOKEN") => {
            match value
                .and_then(Value::as_str)
                .or_else(|| text("accessToken"))
            {
                Some(token) if !token.is_empty() => Answer::Granted(Credentials::AccessToken {
                    token: token.to_owned(),
                }),
                _ => refused("the hub's ACCESS_TOKEN answer holds no token".into()),
            }
        }
        Some("MQTT_BASIC") => {
            let part = |key: &str| {
                value
                    .and_then(|v| v.get(key))
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
            };
            let credentials = Credentials::MqttBasic {
                client_id: part("clientId"),
                user_name: part("userName"),
                password: part("password"),
            };
            match &credentials {
                Credentials::MqttBasic {
                    client_id: None,
                    user_name: None,
                    ..
                } => refused(
                    "the hub's MQTT_BASIC answer holds neither clientId nor userName".into(),
                ),
                _ => Answer::Granted(credentials),
            }
        }
        Some("X509_CERTIFICATE") => refused(
            "the hub answered X509_CERTIFICATE, which needs a certificate the device made and \
             sent; configure tls_client_cert and tls_client_key instead of provisioning"
                .into(),
        ),
        other => refused(format!(
            "the hub answered credentials of type {other:?}, which this device cannot use"
        )),
    };
    match &decoded {
        Answer::Granted(c) => match unfit_for_mqtt(c) {
            Some(why) => refused(format!("the hub's {} answer {why}", c.kind())),
            None => decoded,
        },
        Answer::Refused(_) => decoded,
    }
}

/// Why `credentials` cannot go in an MQTT CONNECT, if they cannot: a string over MQTT's
/// length, or with a NUL, which MQTT strings may not hold.
fn unfit_for_mqtt(credentials: &Credentials) -> Option<String> {
    let parts: Vec<(&str, &String)> = match credentials {
        Credentials::AccessToken { token } => vec![("token", token)],
        Credentials::MqttBasic {
            client_id,
            user_name,
            password,
        } => [
            ("clientId", client_id),
            ("userName", user_name),
            ("password", password),
        ]
        .into_iter()
        .filter_map(|(name, part)| part.as_ref().map(|p| (name, p)))
        .collect(),
    };
    parts.into_iter().find_map(|(name, part)| {
        if part.len() > MAX_MQTT_STRING {
            Some(format!(
                "has a {name} of {} bytes, over MQTT's {MAX_MQTT_STRING}",
                part.len()
            ))
        } else if part.contains('\0') {
            Some(format!("has a {name} with a NUL, which MQTT cannot carry"))
        } else {
            None
        }
    })
}

/// How one provisioning attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The hub answered.
    Answered(Answer),
    /// No answer was had: the broker could not be reached, or said nothing in time.
    NoAnswer(String),
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Keep these credentials and connect with them.
    Keep(Credentials),
    /// Try again after `delay`, showing `state` meanwhile.
    Retry {
        /// How long to wait.
        delay: Duration,
        /// `Hub1.Connection` until then.
        state: ConnectionState,
        /// Why, for the log.
        reason: String,
    },
}

/// The retry schedules of provisioning: refusals wait long ([`refused_backoff`]), a missing
/// broker as any reconnect does.
#[derive(Debug)]
pub struct Retries {
    refused: evp_daemon::Backoff,
    unanswered: evp_daemon::Backoff,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            refused: refused_backoff(),
            unanswered: crate::timing::reconnect_backoff(),
        }
    }
}

impl Retries {
    /// What to do after `outcome`.
    pub fn next(&mut self, outcome: Outcome) -> Next {
        match outcome {
            Outcome::Answered(Answer::Granted(credentials)) => Next::Keep(credentials),
            Outcome::Answered(Answer::Refused(reason)) => Next::Retry {
                delay: self.refused.next_delay(),
                state: ConnectionState::ProvisioningRefused,
                reason,
            },
            Outcome::NoAnswer(reason) => Next::Retry {
                delay: self.unanswered.next_delay(),
                state: ConnectionState::Disconnected,
                reason,
            },
        }
    }
}

#[cfg(test)]
mod tests;
