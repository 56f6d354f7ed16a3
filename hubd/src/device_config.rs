//! The hub's device configuration (`desiredDeviceConfig`): its effect on the agent settings,
//! and its persistence, single-wrapped, in `<data_dir>/hub/device-config.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use evp_schemas::codec::DeviceConfig;
use serde_json::{Map, Value, json};

use crate::config::{HubConfig, Intervals, effective_intervals};

/// Name of the file, under hubd's data folder.
pub const FILE_NAME: &str = "device-config.json";

/// Why the device configuration could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading, writing or syncing the file (or its folder) failed.
    #[error("{action} {}: {error}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The I/O error (in the message, so it is not repeated as a cause).
        error: std::io::Error,
    },
    /// The file does not hold a device configuration.
    #[error("{} is not a valid device configuration: {message}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The wire form, single-wrapped: `{"desiredDeviceConfig": {"configuration/$agent/...": ..}}`,
/// which is what EVP keeps in its desired DB and what [`evp_schemas::evp2::decode_device_config`]
/// reads back.
pub fn to_single_wrapped(c: &DeviceConfig) -> Value {
    let mut inner = Map::new();
    let key = |k: &str| format!("configuration/$agent/{k}");
    inner.insert(
        key("report-status-interval-min"),
        json!(c.report_status_interval_min),
    );
    inner.insert(
        key("report-status-interval-max"),
        json!(c.report_status_interval_max),
    );
    inner.insert(key("configuration-id"), json!(c.configuration_id));
    inner.insert(key("registry-auth"), json!(c.registry_auth));
    json!({ "desiredDeviceConfig": inner })
}

/// Where the device configuration is kept.
#[derive(Debug, Clone)]
pub struct DeviceConfigStore {
    dir: PathBuf,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |error| StoreError::Io {
        action,
        path,
        error,
    }
}

impl DeviceConfigStore {
    /// A store in `dir` (hubd's data folder, which must exist).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DeviceConfigStore { dir: dir.into() }
    }

    /// The folder it is in (hubd's data folder).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The stored configuration; `None` when none was ever stored.
    pub fn load(&self) -> Result<Option<DeviceConfig>, StoreError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let value: Value = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        evp_schemas::evp2::decode_device_config(&value)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path,
                message: e.to_string(),
            })
    }

    /// Stores `config` atomically: a temporary file, fsync, rename over the old one, fsync of
    /// the folder, so a power cut leaves either the old or the new file.
    pub fn save(&self, config: &DeviceConfig) -> Result<(), StoreError> {
        let text = to_single_wrapped(config).to_string();
        // 0600: the registry credentials are in it.
        evp_daemon::write_atomic(&self.path(), text.as_bytes(), 0o600, None).map_err(|e| {
            StoreError::Io {
                action: e.action,
                path: e.path,
                error: e.error,
            }
        })
    }
}

/// The agent settings in effect: the local configuration with the hub's device configuration
/// on top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// Report intervals.
    pub intervals: Intervals,
    /// Echoed as `state/$agent/configuration-id`.
    pub configuration_id: Option<String>,
    /// Registry → credentials (only the names are reported).
    pub registry_auth: BTreeMap<String, String>,
}

impl AgentSettings {
    /// The settings from `local` and, when the hub sent one, `hub`. Hub values are seconds;
    /// a maximum below the minimum becomes the minimum.
    pub fn new(local: &HubConfig, hub: Option<&DeviceConfig>) -> Self {
        let min = hub
            .and_then(|h| h.report_status_interval_min)
            .map(Duration::from_secs)
            .unwrap_or(local.intervals.min);
        let max_ms = match hub.and_then(|h| h.report_status_interval_max) {
            Some(-1) => -1,
            Some(s) => s.saturating_mul(1000),
            None => local
                .intervals
                .max
                .map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        };
        AgentSettings {
            intervals: effective_intervals(min, max_ms),
            configuration_id: hub
                .and_then(|h| h.configuration_id.clone())
                .or_else(|| local.configuration_id.clone()),
            registry_auth: hub
                .and_then(|h| h.registry_auth.clone())
                .or_else(|| local.registry_auth.clone())
                .unwrap_or_default(),
        }
    }

    /// Minimum interval in whole seconds, as reported.
    pub fn min_s(&self) -> u64 {
        self.intervals.min.as_secs()
    }

    /// Maximum interval in whole seconds, as reported (-1: never).
    pub fn max_s(&self) -> i64 {
        self.intervals
            .max
            .map_or(-1, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HubSection, resolve};

    fn sample() -> DeviceConfig {
        DeviceConfig {
            report_status_interval_min: Some(2),
            report_status_interval_max: Some(-1),
            configuration_id: Some("cfg-42".into()),
            registry_auth: Some([("ghcr.io".to_string(), "secret".to_string())].into()),
        }
    }

    #[test]
    fn round_trip_single_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeviceConfigStore::new(dir.path());
        assert_eq!(store.load().unwrap(), None);
        store.save(&sample()).unwrap();
        assert_eq!(store.load().unwrap(), Some(sample()));
        let on_disk: Value =
            serde_json::from_str(&std::fs::read_to_string(store.path()).unwrap()).unwrap();
        assert_eq!(
            on_disk["desiredDeviceConfig"]["configuration/$agent/configuration-id"],
            "cfg-42"
        );
        assert!(
            on_disk["desiredDeviceConfig"]
                .get("desiredDeviceConfig")
                .is_none()
        );
        let all_null = DeviceConfig::default();
        store.save(&all_null).unwrap();
        assert_eq!(store.load().unwrap(), Some(all_null));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeviceConfigStore::new(dir.path());
        std::fs::write(store.path(), "{").unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains(FILE_NAME), "{e}");
    }

    #[test]
    fn hub_values_override_local_ones() {
        let local = resolve(
            HubSection {
                mqtt_host: Some("h".into()),
                mqtt_port: Some(1),
                ..Default::default()
            },
            |k| (k == "EVP_CONFIGURATION_ID").then(|| "local".to_string()),
        )
        .unwrap();
        let s = AgentSettings::new(&local, None);
        assert_eq!((s.min_s(), s.max_s()), (3, 180));
        assert_eq!(s.configuration_id.as_deref(), Some("local"));
        let s = AgentSettings::new(&local, Some(&sample()));
        assert_eq!((s.min_s(), s.max_s()), (2, -1));
        assert_eq!(s.configuration_id.as_deref(), Some("cfg-42"));
        assert_eq!(s.registry_auth.keys().collect::<Vec<_>>(), vec!["ghcr.io"]);
        let min_above_max = DeviceConfig {
            report_status_interval_min: Some(10),
            report_status_interval_max: Some(4),
            ..Default::default()
        };
        let s = AgentSettings::new(&local, Some(&min_above_max));
        assert_eq!((s.min_s(), s.max_s()), (10, 10));
    }
}
