//! The canonical deployment status: reconcilerd's `DeploymentStatus` property, which hubd turns
//! into the hub's `deploymentStatus` and evpctl prints.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Where the device stands against its desired deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    /// The id of the deployment this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    /// Absent before the first deployment was ever applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_status: Option<ReconcileStatus>,
    /// Why the reconcile status is `error`, when the whole deployment failed (a refused manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_message: Option<String>,
    /// Instance name → its status.
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceStatus>,
    /// Module id → its status.
    #[serde(default)]
    pub modules: BTreeMap<String, ModuleStatus>,
}

impl DeploymentStatus {
    /// The canonical JSON form, as carried by the D-Bus property.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses the canonical JSON form.
    pub fn from_json(text: &str) -> Result<DeploymentStatus, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// The overall state of reconciliation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconcileStatus {
    /// Work is still under way (stopping, downloading, starting).
    Applying,
    /// Every instance of the deployment was started (or failed for its own reasons).
    Ok,
    /// The deployment as a whole failed (for example it was refused as invalid).
    Error,
    /// An operator paused deployment changes.
    Paused,
}

impl ReconcileStatus {
    /// The wire name (`applying`, `ok`, `error`, `paused`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReconcileStatus::Applying => "applying",
            ReconcileStatus::Ok => "ok",
            ReconcileStatus::Error => "error",
            ReconcileStatus::Paused => "paused",
        }
    }
}

impl fmt::Display for ReconcileStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One instance's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Its state.
    pub status: InstanceState,
    /// The module it runs.
    pub module_id: String,
    /// Why it is in `error` (or how it exited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_message: Option<String>,
}

/// The states an instance goes through; the names are EVP's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Asked to start, not running yet.
    Starting,
    /// Running.
    Ok,
    /// Exited by itself with status 0.
    SelfExiting,
    /// Failed to start, crashed, or was killed.
    Error,
    /// Stopped by the agent.
    Stopped,
    /// Not known (its runtime is not reachable).
    Unknown,
}

impl InstanceState {
    /// The wire name (`ok`, `self-exiting`, ...), as in `Runtime1.InstanceChanged` and
    /// `Runtime1.Instances`; the same as its JSON name in [`InstanceStatus`].
    pub const fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Ok => "ok",
            InstanceState::SelfExiting => "self-exiting",
            InstanceState::Error => "error",
            InstanceState::Stopped => "stopped",
            InstanceState::Unknown => "unknown",
        }
    }

    /// Parses the wire name; a word this build does not know is an error the receiver decides
    /// about (ignore the report, or take the state as `unknown`).
    pub fn parse(name: &str) -> Result<Self, UnknownInstanceState> {
        Ok(match name {
            "starting" => InstanceState::Starting,
            "ok" => InstanceState::Ok,
            "self-exiting" => InstanceState::SelfExiting,
            "error" => InstanceState::Error,
            "stopped" => InstanceState::Stopped,
            "unknown" => InstanceState::Unknown,
            _ => {
                return Err(UnknownInstanceState(crate::text::shorten_owned(
                    name.to_owned(),
                    UNKNOWN_WORD_BYTES,
                )));
            }
        })
    }
}

/// How much of an unknown status word [`UnknownInstanceState`] keeps: the word comes from
/// another process and ends up in a log line.
const UNKNOWN_WORD_BYTES: usize = 64;

/// A status word that is not one of [`InstanceState`]'s; it holds the word, its middle cut
/// when long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown instance status {0:?}")]
pub struct UnknownInstanceState(pub String);

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One module's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleStatus {
    /// Its state.
    pub status: ModuleState,
    /// Why it is in `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_message: Option<String>,
    /// Bytes downloaded so far, while `downloading`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    /// Size of the module file, while `downloading`, when the server said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
}

/// The states of a module; the names are EVP's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleState {
    /// Being fetched.
    Downloading,
    /// Fetched, verified and loaded into its runtime.
    Ok,
    /// Could not be fetched, verified or loaded.
    Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every state with its wire word: the bus word, the JSON name and the parse agree.
    const WORDS: [(InstanceState, &str); 6] = [
        (InstanceState::Starting, "starting"),
        (InstanceState::Ok, "ok"),
        (InstanceState::SelfExiting, "self-exiting"),
        (InstanceState::Error, "error"),
        (InstanceState::Stopped, "stopped"),
        (InstanceState::Unknown, "unknown"),
    ];

    #[test]
    fn instance_state_words_round_trip() {
        for (state, word) in WORDS {
            assert_eq!(state.as_str(), word);
            assert_eq!(state.to_string(), word);
            assert_eq!(InstanceState::parse(word), Ok(state));
            assert_eq!(serde_json::to_value(state).unwrap(), word);
            assert_eq!(
                serde_json::from_value::<InstanceState>(word.into()).unwrap(),
                state
            );
        }
    }

    #[test]
    fn unknown_instance_state_words_are_named_in_the_error() {
        fn check(word: &str, expect: &str) {
            let e = InstanceState::parse(word).unwrap_err();
            assert_eq!(e.to_string(), expect, "{word:?}");
        }
        check("running", r#"unknown instance status "running""#);
        check("OK", r#"unknown instance status "OK""#);
        check("", r#"unknown instance status """#);
        check("ok\0", r#"unknown instance status "ok\0""#);
        let long = InstanceState::parse(&"x".repeat(10_000)).unwrap_err();
        assert!(long.0.len() <= UNKNOWN_WORD_BYTES, "{}", long.0.len());
    }
}
