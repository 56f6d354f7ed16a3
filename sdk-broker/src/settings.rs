//! The `[sdk_broker]` table of `agent.toml`.

use serde::Deserialize;

/// sdk-broker's settings; every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Group that may connect to the sockets (mode 0660, this group). Unset: mode 0600, so
    /// only sdk-broker's own user can connect (development and tests, where the runtime runs
    /// as the same user). sdk-broker's user must be a member of this group to set it.
    pub instance_group: Option<String>,
    /// Peer uids allowed to connect (checked with SO_PEERCRED); sdk-broker's own uid is always
    /// allowed. Unset: the uid that owns `org.evp.Runtime1.Container` on the bus.
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
        }
    }
}
