//! evp-devhub: a local hub for development and tests, and the whole agent on a private bus.
//!
//! The pieces are reusable, so the whole-system tests use the same ones as the `evp-devhub`
//! command:
//!
//! - [`bus::PrivateBus`]: a private `dbus-daemon` of the system type that enforces the
//!   project's own D-Bus policy, with every daemon user mapped to the current user.
//! - [`broker::EmbeddedBroker`]: an MQTT broker (rumqttd) on loopback, in its own thread.
//! - [`hub::HubSide`]: the hub's side of EVP2-TB: shared attributes, answers to the device's
//!   attribute requests, PATCHes, and what the device reports.
//! - [`stack::Stack`]: the five daemons as child processes on a bus, with readiness, signals,
//!   and optional supervision.
//! - [`lock::DataDirLock`]: one `evp-devhub up` per data directory.
//! - [`manifest`]: deployment documents: filling in module hashes, the bundled sample.

pub mod broker;
pub mod bus;
pub mod hub;
pub mod lock;
pub mod manifest;
pub mod stack;

pub use broker::EmbeddedBroker;
pub use bus::PrivateBus;
pub use hub::{DeviceReport, HubSide, HubSideOptions, StorageAnswer};
pub use stack::{DaemonOutput, Stack, StackConfig};

/// Where the `evp-devhub` subcommands look for a broker unless told otherwise: the embedded
/// broker of `evp-devhub up` on its default port.
pub const DEFAULT_BROKER_URL: &str = "mqtt://127.0.0.1:1883";

/// The topic on which `evp-devhub up` re-publishes, retained, each status report it receives,
/// so that a separate `evp-devhub status` reads the latest at once. It lies outside the
/// ThingsBoard device API (`v1/...`), so the agent never sees it.
pub const DEVHUB_STATUS_TOPIC: &str = "evp-devhub/status";
