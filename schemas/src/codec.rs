//! The hub dialect as a trait: hubd speaks to the hub only through a [`HubCodec`], so EVP1 can
//! sit beside EVP2 without hubd's session logic knowing which one it speaks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::deployment::{Deployment, ValidationError};
use crate::evp2::storage::{StorageTokenRequest, StorageTokenResponse};
use crate::status::DeploymentStatus;

/// The hub dialects: agent.toml's `[hub] protocol`, or EVP's `EVP_IOT_PLATFORM`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// EVP2 over ThingsBoard (`EVP2-TB`), the default.
    #[default]
    Evp2,
    /// EVP1, the older dialect on the same topics.
    Evp1,
}

impl Protocol {
    /// The dialect `EVP_IOT_PLATFORM` selects: `EVP1` (any case) is EVP1, any other value
    /// EVP2 (EVP's rule since its default changed to EVP2).
    pub fn from_iot_platform(value: &str) -> Protocol {
        if value.trim().eq_ignore_ascii_case("EVP1") {
            Protocol::Evp1
        } else {
            Protocol::Evp2
        }
    }

    /// Its codec.
    pub fn codec(self) -> &'static dyn HubCodec {
        match self {
            Protocol::Evp2 => &crate::evp2::Evp2Codec,
            Protocol::Evp1 => &crate::evp1::Evp1Codec,
        }
    }

    /// The name it reports (`systemInfo.protocolVersion`, `Hub1.Protocol`).
    pub fn reported_name(self) -> &'static str {
        self.codec().protocol_name()
    }

    /// Its name in agent.toml and on `evp-devhub`'s command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Evp2 => "evp2",
            Protocol::Evp1 => "evp1",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Protocol, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "evp2" => Ok(Protocol::Evp2),
            "evp1" => Ok(Protocol::Evp1),
            _ => Err(format!("{s:?} is not a hub protocol (evp2 or evp1)")),
        }
    }
}

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
    /// An attribute this dialect does not have (EVP1's hubs send no `desiredDeviceConfig`):
    /// ignored, as the dialect's agent ignores it. Holds the attribute's key.
    NotInDialect(String),
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
    /// The device's id (`Hub1.DeviceId`), when known.
    pub device_id: Option<String>,
    /// `uname` nodename, release and version, which EVP1 reports (`systemInfo.utsname`).
    pub uname: Uname,
}

/// The parts of `uname` beyond sysname and machine ([`SystemInfo::os`], [`SystemInfo::arch`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uname {
    /// The host name.
    pub nodename: String,
    /// The kernel release, e.g. `6.1.0-18-amd64`.
    pub release: String,
    /// The kernel version string, e.g. `#1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1`.
    pub version: String,
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
    /// What the device could not keep or take, so the hub's operator sees every loss.
    pub losses: Losses,
}

/// Losses a status report counts (`state/$agent/telemetry-dropped`,
/// `state/$agent/incoming-dropped` in EVP2), each left out while nothing was lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Losses {
    /// Telemetry messages the spool dropped, per instance, since the device was installed.
    pub telemetry: BTreeMap<String, u64>,
    /// Hub messages dropped for their size since hubd started.
    pub incoming: Option<IncomingDropped>,
}

/// Hub messages dropped for their size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IncomingDropped {
    /// How many.
    pub count: u64,
    /// The last one's topic.
    pub last_topic: String,
    /// The last one's payload size.
    pub last_bytes: u64,
}

/// One telemetry entry as sdk-broker batches it: `(instance, key, JSON value text)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryEntry<'a> {
    /// The instance that sent it (or `$system`).
    pub instance: &'a str,
    /// Its key, as the module gave it.
    pub key: &'a str,
    /// Its value: JSON text.
    pub value: &'a str,
}

/// Why a telemetry entry was left out of a payload: its value is not JSON (sdk-broker refuses
/// such values at the SDK call, so this means a misbehaving sender on the bus).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("telemetry entry {instance}/{key} dropped: its value is not JSON ({message})")]
pub struct TelemetryError {
    /// The entry's instance.
    pub instance: String,
    /// The entry's key.
    pub key: String,
    /// What the JSON parser said.
    pub message: String,
}

/// A direct command (server-side RPC) from the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectCommand {
    /// The EVP request id the module sees and answers with.
    pub reqid: u64,
    /// The method name; `$agent/...` methods are the agent's own.
    pub method: String,
    /// The instance it is for.
    pub instance: String,
    /// Its parameters, JSON text passed to the module as it is.
    pub params: String,
}

/// Why a direct-command request could not be used, found when decoding it. `reqid` is set when
/// it could be read, so the hub can be answered with an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed direct command{}: {error}", reqid.map(|r| format!(" (reqid {r})")).unwrap_or_default())]
pub struct DirectCommandError {
    /// The request id, when it could be read.
    pub reqid: Option<u64>,
    /// The field at fault and what is wrong with it.
    pub error: ValidationError,
}

/// `EVP_RPC_RESPONSE_STATUS` (docs/sdk-wire.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcStatus {
    /// `EVP_RPC_RESPONSE_STATUS_OK` (0).
    Ok,
    /// `EVP_RPC_RESPONSE_STATUS_METHOD_NOT_FOUND` (1).
    MethodNotFound,
    /// `EVP_RPC_RESPONSE_STATUS_ERROR` (2).
    Error,
}

impl RpcStatus {
    /// The status of its SDK (and D-Bus) number; a number outside the enum is an error.
    pub fn from_wire(n: u32) -> RpcStatus {
        match n {
            0 => RpcStatus::Ok,
            1 => RpcStatus::MethodNotFound,
            _ => RpcStatus::Error,
        }
    }

    /// Its SDK (and D-Bus) number.
    pub fn to_wire(self) -> u32 {
        match self {
            RpcStatus::Ok => 0,
            RpcStatus::MethodNotFound => 1,
            RpcStatus::Error => 2,
        }
    }
}

/// The answer to a [`DirectCommand`], before a dialect encodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectCommandResponse {
    /// The request id it answers.
    pub reqid: u64,
    /// Its status.
    pub status: RpcStatus,
    /// Why it failed, when the agent knows better than the status alone (an absent
    /// sdk-broker, a duplicate request id); `None` uses the dialect's word for the status.
    pub error_message: Option<String>,
    /// The module's (or agent's) response text; `None` leaves it out.
    pub response: Option<String>,
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

    /// Decodes a server-side RPC request that came on `v1/devices/me/rpc/request/<mqtt_id>`
    /// (EVP1's request id is `mqtt_id`; EVP2's is in the payload). `Ok(None)` is a request
    /// that is not a direct command (such as the device's own storage-token request, echoed
    /// by a plain broker), which must never be answered.
    fn decode_direct_command(
        &self,
        mqtt_id: &str,
        payload: &[u8],
    ) -> Result<Option<DirectCommand>, DirectCommandError>;

    /// Encodes the answer of `instance` (empty when the agent answers for none) to a direct
    /// command.
    fn encode_direct_command_response(
        &self,
        instance: &str,
        response: &DirectCommandResponse,
    ) -> Vec<u8>;

    /// Encodes the device's storage-token request, sent on
    /// `v1/devices/me/rpc/request/<reqid>`.
    fn encode_storage_token_request(&self, request: &StorageTokenRequest<'_>) -> Vec<u8>;

    /// Decodes a payload from `v1/devices/me/rpc/response/<mqtt_id>`: `None` when it is not a
    /// storage-token answer (the device's own direct-command answers, echoed by a plain
    /// broker). The answer's `reqid` says which request it answers, whichever way the dialect
    /// carries it.
    fn decode_storage_token_response(
        &self,
        mqtt_id: &str,
        payload: &[u8],
    ) -> Option<Result<StorageTokenResponse, ValidationError>>;

    /// Appends `entry` to the telemetry payload being built in `payload` (empty: none yet).
    /// A value that is not JSON is refused and leaves `payload` as it was.
    fn push_telemetry_entry(
        &self,
        payload: &mut Vec<u8>,
        entry: TelemetryEntry<'_>,
    ) -> Result<(), TelemetryError>;

    /// Completes a telemetry payload built with [`HubCodec::push_telemetry_entry`].
    fn finish_telemetry(&self, payload: &mut Vec<u8>);

    /// One telemetry payload holding `entries`, and the entries left out of it.
    fn encode_telemetry(&self, entries: &[TelemetryEntry<'_>]) -> (Vec<u8>, Vec<TelemetryError>) {
        let mut payload = Vec::new();
        let mut dropped = Vec::new();
        for entry in entries {
            if let Err(e) = self.push_telemetry_entry(&mut payload, *entry) {
                dropped.push(e);
            }
        }
        self.finish_telemetry(&mut payload);
        (payload, dropped)
    }
}
