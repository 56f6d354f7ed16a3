//! Building the status report: system info, the settings in effect, and reconcilerd's
//! deployment status with a refused deployment laid over it.

use evp_schemas::codec::{Losses, SystemInfo, Uname};
use evp_schemas::text::shorten;
use evp_schemas::{DeploymentStatus, HubCodec, ReconcileStatus, StatusReport};

use crate::device_config::AgentSettings;

/// The device's description of itself, from `uname`, with its id.
pub fn system_info(device_id: Option<&str>) -> SystemInfo {
    let text = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
    let (os, arch, uname) = match nix::sys::utsname::uname() {
        Ok(u) => (
            text(u.sysname()),
            text(u.machine()),
            Uname {
                nodename: text(u.nodename()),
                release: text(u.release()),
                version: text(u.version()),
            },
        ),
        // uname(2) does not fail on Linux; the compile-time names are a fair fallback.
        Err(_) => (
            std::env::consts::OS.into(),
            std::env::consts::ARCH.into(),
            Uname::default(),
        ),
    };
    SystemInfo {
        os,
        arch,
        agent_version: format!("v{}", env!("CARGO_PKG_VERSION")),
        commit_hash: option_env!("EVP_COMMIT_HASH").map(str::to_owned),
        device_id: device_id.map(str::to_owned),
        uname,
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
    losses: &Losses,
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
        losses: losses.clone(),
    }
}

/// Longest failure message kept in a report too big for one MQTT message.
const SHORT_FAILURE_MESSAGE: usize = 128;
/// Longest id (deployment, configuration) kept in a report that must leave its lists out.
const SHORT_ID: usize = 256;

/// The report as one payload of at most `max_payload` bytes: as it is when it fits; else with
/// every failure message shortened; else, as a last resort, without its instance and module
/// lists, its failure message saying why. Never nothing: the hub always learns the deployment
/// id and its reconcile status. The second value says what was left out, for the log.
pub fn fit(
    codec: &dyn HubCodec,
    report: &StatusReport,
    max_payload: usize,
) -> (String, Option<String>) {
    let full = codec.encode_status_report(report).to_string();
    if full.len() <= max_payload {
        return (full, None);
    }
    let mut smaller = report.clone();
    if let Some(d) = &mut smaller.deployment {
        let short = |m: &mut Option<String>| {
            if let Some(text) = m {
                *text = shorten(text, SHORT_FAILURE_MESSAGE).into_owned();
            }
        };
        short(&mut d.failure_message);
        d.instances
            .values_mut()
            .for_each(|i| short(&mut i.failure_message));
        d.modules
            .values_mut()
            .for_each(|m| short(&mut m.failure_message));
    }
    let shortened = codec.encode_status_report(&smaller).to_string();
    if shortened.len() <= max_payload {
        let why = format!(
            "the status report of {} bytes exceeds the {max_payload}-byte MQTT limit: failure \
             messages shortened to {SHORT_FAILURE_MESSAGE} bytes",
            full.len()
        );
        return (shortened, Some(why));
    }
    let why = match &mut smaller.deployment {
        Some(d) => {
            let why = format!(
                "status report of {} bytes exceeds the {max_payload}-byte MQTT limit: the \
                 status of {} instances and {} modules is left out",
                full.len(),
                d.instances.len(),
                d.modules.len()
            );
            d.instances.clear();
            d.modules.clear();
            d.failure_message = Some(match &d.failure_message {
                Some(m) => format!("{why}; {m}"),
                None => why.clone(),
            });
            if let Some(id) = &mut d.deployment_id {
                *id = shorten(id, SHORT_ID).into_owned();
            }
            why
        }
        None => format!(
            "status report of {} bytes exceeds the {max_payload}-byte MQTT limit",
            full.len()
        ),
    };
    if let Some(id) = &mut smaller.configuration_id {
        *id = shorten(id, SHORT_ID).into_owned();
    }
    (codec.encode_status_report(&smaller).to_string(), Some(why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Intervals;
    use evp_schemas::evp2::Evp2Codec;
    use evp_schemas::{HubCodec, InstanceState, InstanceStatus};
    use std::time::Duration;

    fn report_of(instances: usize, message_len: usize) -> StatusReport {
        let mut status = DeploymentStatus {
            deployment_id: Some("dep-1".into()),
            reconcile_status: Some(ReconcileStatus::Error),
            ..Default::default()
        };
        for i in 0..instances {
            status.instances.insert(
                format!("instance-{i}"),
                InstanceStatus {
                    status: InstanceState::Error,
                    module_id: "m".into(),
                    failure_message: Some("x".repeat(message_len)),
                },
            );
        }
        StatusReport {
            system_info: system_info(None),
            interval_min_s: 3,
            interval_max_s: 180,
            configuration_id: None,
            registries_with_auth: Vec::new(),
            deployment: Some(status),
            losses: Default::default(),
        }
    }

    #[test]
    fn a_report_too_big_still_goes_out_as_small_as_it_must_be() {
        const MAX: usize = 131_000;
        let small = report_of(3, 10);
        let (payload, why) = fit(&Evp2Codec, &small, MAX);
        assert_eq!(why, None);
        assert_eq!(payload, Evp2Codec.encode_status_report(&small).to_string());

        // A few instances with huge messages: the messages shrink, the list stays.
        let (payload, why) = fit(&Evp2Codec, &report_of(3, 100_000), MAX);
        assert!(payload.len() <= MAX && why.is_some());
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        let message = v["deploymentStatus"]["instances"]["instance-2"]["failureMessage"]
            .as_str()
            .unwrap();
        assert!(message.len() <= SHORT_FAILURE_MESSAGE && message.contains('…'));

        // 10,000 instances: the lists go, the report says why.
        let (payload, why) = fit(&Evp2Codec, &report_of(10_000, 10), MAX);
        assert!(payload.len() <= MAX, "{}", payload.len());
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        let d = &v["deploymentStatus"];
        assert_eq!(d["deploymentId"], "dep-1");
        assert_eq!(d["reconcileStatus"], "error");
        let message = d["failureMessage"].as_str().unwrap();
        assert!(message.contains("10000 instances"), "{message}");
        assert_eq!(why.as_deref(), message.split("; ").next());
    }

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
        let info = system_info(None);
        assert!(info.agent_version.starts_with('v'));
        let r = build(
            &info,
            &settings,
            Some(&running),
            Some(&rejection),
            &Losses::default(),
        );
        let v = Evp2Codec.encode_status_report(&r);
        let d = &v["deploymentStatus"];
        assert_eq!(d["reconcileStatus"], "error");
        assert_eq!(d["deploymentId"], "dep-2");
        assert_eq!(d["failureMessage"], "deployment.modules: is required");
        assert_eq!(d["instances"]["i"]["status"], "ok");
        let r = build(&info, &settings, Some(&running), None, &Losses::default());
        let v = Evp2Codec.encode_status_report(&r);
        assert_eq!(v["deploymentStatus"]["reconcileStatus"], "ok");
        assert_eq!(v["state/$agent/report-status-interval-min"], 3);
        let r = build(&info, &settings, None, None, &Losses::default());
        assert!(
            Evp2Codec
                .encode_status_report(&r)
                .get("deploymentStatus")
                .is_none()
        );
    }
}
