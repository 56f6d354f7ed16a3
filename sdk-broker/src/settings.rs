//! The `[sdk_broker]` table of `agent.toml`.

use serde::Deserialize;

/// sdk-broker's settings; every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Ignored, kept so that existing files still parse: the sockets are mode 0666 in a 0711
    /// directory, and each is served only to the process `BindInstance` names.
    pub instance_group: Option<String>,
    /// Ignored (logged when set), kept so that existing files still parse: a socket's peer
    /// must have the uid and be the process (or a descendant) `BindInstance` names.
    pub allowed_uids: Option<Vec<u32>>,
    /// How long an exiting module may stay connected after `CloseInstance` before its socket is
    /// closed: EVP's `CONFIG_EVP_MODULE_INSTANCE_STOP_TIMEOUT` for spawned modules.
    pub exit_grace_ms: u64,
    /// Bound of one instance's event queue, in bytes (events waiting for getEvent plus the
    /// callbacks of accepted requests); a request that does not fit gets `EVP_AGAIN`.
    pub event_queue_bytes: usize,
    /// Bound of one instance's telemetry not yet emitted, in bytes.
    pub telemetry_queue_bytes: usize,
    /// Bound of one instance's share of the instance-state report, in bytes as encoded for
    /// the hub, escaping included (`EVP_TOOBIG` beyond).
    pub state_bytes: usize,
    /// How long states and telemetry wait to be batched before they are emitted.
    pub telemetry_flush_ms: u64,
    /// How long a direct command waits for the module's answer before the broker answers
    /// `status: error` itself.
    pub rpc_timeout_ms: u64,
    /// How long the configuration of an instance that is not deployed is kept (counted from
    /// the later of its leaving the deployment and its last value): a hub may send an
    /// instance's configuration before its deployment.
    pub orphan_config_grace_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            instance_group: None,
            allowed_uids: None,
            exit_grace_ms: 10_000,
            // 1 MiB: thousands of small events, and a few of the largest (128 KiB) ones.
            event_queue_bytes: 1024 * 1024,
            // 1 MiB: about 30 ms of telemetry at the target rate of 30k 100-byte values/s.
            telemetry_queue_bytes: 1024 * 1024,
            // 256 KiB: what one instance-state report may reasonably carry.
            state_bytes: 256 * 1024,
            // A few ms: batches form under load, yet a lone value goes out at once.
            telemetry_flush_ms: 5,
            rpc_timeout_ms: 15_000,
            // An hour: far longer than a deployment takes to follow its configuration.
            orphan_config_grace_ms: 3_600_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_agent_toml_shows_every_sdk_broker_setting_with_its_default() {
        use evp_daemon::conffile::{PACKAGED, fields_of, shown_keys, uncommented};
        // Two keys are read only so that old files still parse: not shown.
        let ignored = ["allowed_uids", "instance_group"];
        let fields: Vec<&str> = fields_of::<Settings>()
            .into_iter()
            .filter(|f| !ignored.contains(f))
            .collect();
        assert_eq!(shown_keys(PACKAGED, crate::SECTION), fields);
        let all = evp_daemon::AgentConfig::parse(&uncommented(PACKAGED)).unwrap();
        let section: Settings = all.section(crate::SECTION).unwrap();
        let default = Settings::default();
        let key = |s: &Settings| {
            (
                (
                    s.exit_grace_ms,
                    s.event_queue_bytes,
                    s.telemetry_queue_bytes,
                ),
                (s.state_bytes, s.telemetry_flush_ms, s.rpc_timeout_ms),
                s.orphan_config_grace_ms,
            )
        };
        assert_eq!(key(&section), key(&default));
    }
}
