//! Building the status report: system info, the settings in effect, and reconcilerd's
//! deployment status with a refused deployment laid over it.

use evp_schemas::codec::SystemInfo;
use evp_schemas::{DeploymentStatus, ReconcileStatus, StatusReport};

use crate::device_config::AgentSettings;

/// The device's description of itself, from `uname`.
pub fn system_info() -> SystemInfo {
    let (os, arch) = match nix::sys::utsname::uname() {
        Ok(u) => (
            u.sysname().to_string_lossy().into_owned(),
            u.machine().to_string_lossy().into_owned(),
        ),
        // uname(2) does not fail on Linux; the compile-time names are a fair fallback.
        Err(_) => (std::env::consts::OS.into(), std::env::consts::ARCH.into()),
    };
    SystemInfo {
        os,
        arch,
        agent_version: format!("v{}", env!("CARGO_PKG_VERSION")),
        commit_hash: option_env!("EVP_COMMIT_HASH").map(str::to_owned),
    }
}

/// A deployment the hub sent that was refused; the previous deployment keeps running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Order of the change that carried it, so an older acceptance does not clear it.
    pub seq: u64,
    /// Its `deploymentId`, when known.
    pub deployment_id: Option<String>,
    /// Why it was refused.
    pub message: String,
}

/// The report from its parts. A rejection shows `reconcileStatus: error`, its message and its
/// deployment id, over what reconcilerd reports for the deployment that keeps running.
pub fn build(
    system_info: &SystemInfo,
    settings: &AgentSettings,
    status: Option<&DeploymentStatus>,
    rejection: Option<&Rejection>,
) -> StatusReport {
    let deployment = match rejection {
        Some(r) => {
            let mut s = status.cloned().unwrap_or_default();
            s.reconcile_status = Some(ReconcileStatus::Error);
            s.failure_message = Some(r.message.clone());
            if let Some(id) = &r.deployment_id {
                s.deployment_id = Some(id.clone());
            }
            Some(s)
        }
        None => status.cloned(),
    };
    StatusReport {
        system_info: system_info.clone(),
        interval_min_s: settings.min_s(),
        interval_max_s: settings.max_s(),
        configuration_id: settings.configuration_id.clone(),
        registries_with_auth: settings.registry_auth.keys().cloned().collect(),
        deployment,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Intervals;
    use evp_schemas::evp2::Evp2Codec;
    use evp_schemas::{HubCodec, InstanceState, InstanceStatus};
    use std::time::Duration;

    #[test]
    fn rejection_overlays_the_running_deployment() {
        let settings = AgentSettings {
            intervals: Intervals {
                min: Duration::from_secs(3),
                max: Some(Duration::from_secs(180)),
            },
            configuration_id: None,
            registry_auth: Default::default(),
        };
        let mut running = DeploymentStatus {
            deployment_id: Some("dep-1".into()),
            reconcile_status: Some(ReconcileStatus::Ok),
            ..Default::default()
        };
        running.instances.insert(
            "i".into(),
            InstanceStatus {
                status: InstanceState::Ok,
                module_id: "m".into(),
                failure_message: None,
            },
        );
        let rejection = Rejection {
            seq: 1,
            deployment_id: Some("dep-2".into()),
            message: "deployment.modules: is required".into(),
        };
        let info = system_info();
        assert!(info.agent_version.starts_with('v'));
        let r = build(&info, &settings, Some(&running), Some(&rejection));
        let v = Evp2Codec.encode_status_report(&r);
        let d = &v["deploymentStatus"];
        assert_eq!(d["reconcileStatus"], "error");
        assert_eq!(d["deploymentId"], "dep-2");
        assert_eq!(d["failureMessage"], "deployment.modules: is required");
        assert_eq!(d["instances"]["i"]["status"], "ok");
        let r = build(&info, &settings, Some(&running), None);
        let v = Evp2Codec.encode_status_report(&r);
        assert_eq!(v["deploymentStatus"]["reconcileStatus"], "ok");
        assert_eq!(v["state/$agent/report-status-interval-min"], 3);
        let r = build(&info, &settings, None, None);
        assert!(
            Evp2Codec
                .encode_status_report(&r)
                .get("deploymentStatus")
                .is_none()
        );
    }
}
