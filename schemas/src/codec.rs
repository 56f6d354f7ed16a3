//! The hub dialect as a trait: hubd speaks to the hub only through a [`HubCodec`], so EVP1 can
//! sit beside EVP2 without hubd's session logic knowing which one it speaks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::deployment::{Deployment, ValidationError};
use crate::status::DeploymentStatus;

/// One thing the hub wants changed, decoded from an attribute update.
#[derive(Debug, Clone, PartialEq)]
pub enum DesiredChange {
    /// A new desired deployment, already validated.
    Deployment(Deployment),
    /// A deployment the hub sent that is not valid; nothing on the device may change.
    RejectedDeployment {
        /// Its `deploymentId`, when it could be read, so the hub sees which one was refused.
        deployment_id: Option<String>,
        /// What is wrong with it.
        error: ValidationError,
    },
    /// The hub deleted its `deployment` attribute: nothing should run.
    DeploymentRemoved,
    /// Agent settings (`desiredDeviceConfig`).
    DeviceConfig(DeviceConfig),
    /// A configuration value for one instance (or `$system`).
    Configuration {
        /// The instance it is for.
        instance: String,
        /// The topic, which may itself contain `/`.
        topic: String,
        /// The value, decoded from the dialect's encoding.
        value: Vec<u8>,
    },
    /// The hub deleted a configuration attribute.
    ConfigurationDeleted {
        /// The instance it was for.
        instance: String,
        /// Its topic.
        topic: String,
    },
    /// Part of the update could not be used; the message says which part and why.
    Invalid(ValidationError),
}

/// The agent settings a hub may push (`desiredDeviceConfig`); `None` means "use the local
/// configuration".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceConfig {
    /// Minimum seconds between two status reports (1..=86400).
    pub report_status_interval_min: Option<u64>,
    /// Seconds after which a report is sent even if nothing changed (1..=86400), or -1 for never.
    pub report_status_interval_max: Option<i64>,
    /// Echoed back as `state/$agent/configuration-id`.
    pub configuration_id: Option<String>,
    /// Registry domain → `X-Registry-Auth` value, for docker pulls. Never echoed to the hub.
    pub registry_auth: Option<BTreeMap<String, String>>,
}

/// What the device says about itself in a status report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// `uname` sysname, e.g. `Linux`.
    pub os: String,
    /// `uname` machine, e.g. `aarch64`.
    pub arch: String,
    /// The agent's version, `v<semver>`.
    pub agent_version: String,
    /// The commit the agent was built from, when known.
    pub commit_hash: Option<String>,
}

/// Everything a status report carries, before a dialect encodes it.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    /// The device's description of itself.
    pub system_info: SystemInfo,
    /// Effective minimum report interval, seconds.
    pub interval_min_s: u64,
    /// Effective maximum report interval, seconds (-1: never forced).
    pub interval_max_s: i64,
    /// The hub's configuration id, echoed.
    pub configuration_id: Option<String>,
    /// The registries that have credentials (never the credentials themselves).
    pub registries_with_auth: Vec<String>,
    /// The deployment status; `None` before reconcilerd ever answered.
    pub deployment: Option<DeploymentStatus>,
}

/// One dialect of the hub protocol.
pub trait HubCodec: Send + Sync {
    /// The name reported as `systemInfo.protocolVersion` and on `Hub1.Protocol`.
    fn protocol_name(&self) -> &'static str;

    /// Decodes an attribute update (a PATCH) into the changes it asks for, in order.
    /// A payload that is not a JSON object gives a single [`DesiredChange::Invalid`].
    fn decode_attribute_update(&self, payload: &[u8]) -> Vec<DesiredChange>;

    /// Decodes the answer to the initial attribute request, which carries the same attributes
    /// under `shared`.
    fn decode_attribute_response(&self, payload: &[u8]) -> Vec<DesiredChange>;

    /// Encodes the periodic status report.
    fn encode_status_report(&self, report: &StatusReport) -> serde_json::Value;

    /// Encodes the instance-state report: `(instance, topic)` → latest state bytes.
    fn encode_instance_states(
        &self,
        states: &BTreeMap<(String, String), Vec<u8>>,
    ) -> serde_json::Value;
}
