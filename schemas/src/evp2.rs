//! EVP2 over ThingsBoard MQTT ("EVP2-TB"): the JSON a hub sends and expects, per
//! HUB-PROTOCOL.md §2. The decoder walks the JSON by hand so that every refusal names the
//! path of the field at fault.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::codec::{DesiredChange, DeviceConfig, HubCodec, StatusReport};
use crate::deployment::{
    Deployment, InstanceSpec, Module, ModuleImpl, RestartPolicy, Topic, ValidationError,
};

/// The name EVP2 reports as `protocolVersion`.
pub const PROTOCOL_NAME: &str = "EVP2-TB";

/// Longest interval a hub may set, seconds (EVP's bound: one day).
const MAX_INTERVAL_S: i64 = 86_400;

/// MQTT topics of the ThingsBoard device API that EVP2 uses.
pub mod topics {
    /// Shared-attribute updates from the hub; also where the device publishes its reports.
    pub const ATTRIBUTES: &str = "v1/devices/me/attributes";
    /// Answers to attribute requests; the last level is the request id.
    pub const ATTRIBUTES_RESPONSE_FILTER: &str = "v1/devices/me/attributes/response/+";
    /// Prefix of attribute requests; the request id follows.
    pub const ATTRIBUTES_REQUEST_PREFIX: &str = "v1/devices/me/attributes/request/";
    /// Prefix of attribute responses; the request id follows.
    pub const ATTRIBUTES_RESPONSE_PREFIX: &str = "v1/devices/me/attributes/response/";
    /// Server-side RPC requests (direct commands).
    pub const RPC_REQUEST_FILTER: &str = "v1/devices/me/rpc/request/+";
    /// Responses to device-side RPC (storage tokens).
    pub const RPC_RESPONSE_FILTER: &str = "v1/devices/me/rpc/response/+";
    /// Telemetry from modules and system apps.
    pub const TELEMETRY: &str = "v1/devices/me/telemetry";
    /// The fixed id of the initial attribute request.
    pub const INITIAL_GET_ID: u32 = 10_000;
}

/// The EVP2-TB codec.
#[derive(Debug, Default, Clone, Copy)]
pub struct Evp2Codec;

impl HubCodec for Evp2Codec {
    fn protocol_name(&self) -> &'static str {
        PROTOCOL_NAME
    }

    fn decode_attribute_update(&self, payload: &[u8]) -> Vec<DesiredChange> {
        match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(map)) => decode_attributes(&map),
            Ok(_) => vec![DesiredChange::Invalid(ValidationError::new(
                "attributes",
                "is not a JSON object",
            ))],
            Err(e) => vec![DesiredChange::Invalid(ValidationError::new(
                "attributes",
                format!("is not JSON: {e}"),
            ))],
        }
    }

    fn decode_attribute_response(&self, payload: &[u8]) -> Vec<DesiredChange> {
        match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(map)) => match map.get("shared") {
                Some(Value::Object(shared)) => decode_attributes(shared),
                // No `shared` key: the hub has no shared attributes for this device.
                None | Some(Value::Null) => Vec::new(),
                Some(_) => vec![DesiredChange::Invalid(ValidationError::new(
                    "shared",
                    "is not a JSON object",
                ))],
            },
            Ok(_) => vec![DesiredChange::Invalid(ValidationError::new(
                "attributes response",
                "is not a JSON object",
            ))],
            Err(e) => vec![DesiredChange::Invalid(ValidationError::new(
                "attributes response",
                format!("is not JSON: {e}"),
            ))],
        }
    }

    fn encode_status_report(&self, report: &StatusReport) -> Value {
        let info = &report.system_info;
        let mut system_info = json!({
            "os": info.os,
            "arch": info.arch,
            "evp_agent": info.agent_version,
            "protocolVersion": PROTOCOL_NAME,
        });
        if let Some(hash) = &info.commit_hash {
            system_info["evp_agent_commit_hash"] = json!(hash);
        }
        let mut out = Map::new();
        out.insert("systemInfo".into(), system_info);
        out.insert(
            "state/$agent/report-status-interval-min".into(),
            json!(report.interval_min_s),
        );
        out.insert(
            "state/$agent/report-status-interval-max".into(),
            json!(report.interval_max_s),
        );
        if let Some(id) = &report.configuration_id {
            out.insert("state/$agent/configuration-id".into(), json!(id));
        }
        if !report.registries_with_auth.is_empty() {
            // EVP echoed the credentials here; we only say which registries have some.
            let redacted: Map<String, Value> = report
                .registries_with_auth
                .iter()
                .map(|r| (r.clone(), json!("[redacted]")))
                .collect();
            out.insert("state/$agent/registry-auth".into(), Value::Object(redacted));
        }
        if let Some(status) = &report.deployment {
            out.insert("deploymentStatus".into(), encode_deployment_status(status));
        }
        Value::Object(out)
    }

    fn encode_instance_states(&self, states: &BTreeMap<(String, String), Vec<u8>>) -> Value {
        let mut out = Map::new();
        for ((instance, topic), bytes) in states {
            // EVP2 uses the bytes as a C string: cut at the first NUL, and leave out what is
            // not UTF-8 (EVP's JSON library refuses it).
            let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
            if let Ok(text) = std::str::from_utf8(&bytes[..end]) {
                out.insert(format!("state/{instance}/{topic}"), json!(text));
            }
        }
        Value::Object(out)
    }
}

fn encode_deployment_status(status: &crate::status::DeploymentStatus) -> Value {
    let instances: Map<String, Value> = status
        .instances
        .iter()
        .map(|(name, i)| {
            let mut v = json!({ "status": i.status.as_str(), "moduleId": i.module_id });
            if let Some(m) = &i.failure_message {
                v["failureMessage"] = json!(m);
            }
            (name.clone(), v)
        })
        .collect();
    let modules: Map<String, Value> = status
        .modules
        .iter()
        .map(|(id, m)| {
            let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
            if let Value::Object(o) = &mut v {
                o.retain(|_, x| !x.is_null());
            }
            (id.clone(), v)
        })
        .collect();
    let mut out = json!({ "instances": instances, "modules": modules });
    if let Some(id) = &status.deployment_id {
        out["deploymentId"] = json!(id);
    }
    if let Some(rs) = status.reconcile_status {
        out["reconcileStatus"] = json!(rs.as_str());
    }
    if let Some(m) = &status.failure_message {
        out["failureMessage"] = json!(m);
    }
    out
}

fn decode_attributes(map: &Map<String, Value>) -> Vec<DesiredChange> {
    let mut changes = Vec::new();
    let mut configs = Vec::new();
    let mut config_error = None;
    for (key, value) in map {
        if key == "deployment" {
            changes.push(match value {
                Value::Null => DesiredChange::DeploymentRemoved,
                v => match decode_deployment(v) {
                    Ok(d) => DesiredChange::Deployment(d),
                    Err(error) => DesiredChange::RejectedDeployment {
                        deployment_id: v
                            .get("deploymentId")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        error,
                    },
                },
            });
        } else if key == "desiredDeviceConfig" {
            changes.push(match decode_device_config(value) {
                Ok(c) => DesiredChange::DeviceConfig(c),
                Err(e) => DesiredChange::Invalid(e),
            });
        } else if let Some(rest) = key.strip_prefix("configuration/") {
            match (split_instance_topic(rest), value) {
                (Some((instance, topic)), Value::String(s)) => {
                    configs.push(DesiredChange::Configuration {
                        instance,
                        topic,
                        value: s.clone().into_bytes(),
                    })
                }
                (None, _) => {
                    changes.push(DesiredChange::Invalid(ValidationError::new(
                        key.clone(),
                        "is not of the form configuration/<instance>/<topic>",
                    )));
                }
                (Some(_), _) => {
                    // EVP fails the whole configuration batch on one non-string value.
                    config_error.get_or_insert_with(|| {
                        ValidationError::new(
                            key.clone(),
                            "configuration values must be strings; no configuration of this update was applied",
                        )
                    });
                }
            }
        } else if key == "deleted" {
            match value.as_array() {
                Some(items) => {
                    for item in items {
                        // TB deletes other attributes too; only configurations concern us.
                        if let Some((instance, topic)) = item
                            .as_str()
                            .and_then(|s| s.strip_prefix("configuration/"))
                            .and_then(split_instance_topic)
                        {
                            changes.push(DesiredChange::ConfigurationDeleted { instance, topic });
                        }
                    }
                }
                None => changes.push(DesiredChange::Invalid(ValidationError::new(
                    "deleted",
                    "is not an array",
                ))),
            }
        }
        // Every other key is ignored, as EVP does: this includes the device's own reports,
        // which a plain broker echoes back on the same topic.
    }
    match config_error {
        Some(e) => changes.push(DesiredChange::Invalid(e)),
        None => changes.extend(configs),
    }
    changes
}

fn split_instance_topic(rest: &str) -> Option<(String, String)> {
    let (instance, topic) = rest.split_once('/')?;
    if instance.is_empty() || topic.is_empty() {
        return None;
    }
    Some((instance.to_owned(), topic.to_owned()))
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ValidationError> {
    v.as_object()
        .ok_or_else(|| ValidationError::new(path, format!("must be an object, found {}", kind(v))))
}

fn required<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a Value, ValidationError> {
    map.get(key)
        .ok_or_else(|| ValidationError::new(format!("{path}.{key}"), "is required"))
}

fn string(v: &Value, path: &str) -> Result<String, ValidationError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| ValidationError::new(path, format!("must be a string, found {}", kind(v))))
}

fn string_map(v: &Value, path: &str) -> Result<BTreeMap<String, String>, ValidationError> {
    object(v, path)?
        .iter()
        .map(|(k, x)| Ok((k.clone(), string(x, &format!("{path}.{k}"))?)))
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Decodes an EVP2 `deployment` object into the canonical form and validates it.
pub fn decode_deployment(v: &Value) -> Result<Deployment, ValidationError> {
    let root = "deployment";
    let m = object(v, root)?;
    let deployment_id = match m.get("deploymentId") {
        None | Some(Value::Null) => None,
        Some(x) => Some(string(x, "deployment.deploymentId")?),
    };
    let mut modules = BTreeMap::new();
    let modules_path = "deployment.modules";
    for (id, mv) in object(required(m, "modules", root)?, modules_path)? {
        let at = format!("{modules_path}.{id}");
        let mm = object(mv, &at)?;
        let impl_name = string(
            required(mm, "moduleImpl", &at)?,
            &format!("{at}.moduleImpl"),
        )?;
        let module_impl = ModuleImpl::parse(&impl_name).ok_or_else(|| {
            ValidationError::new(
                format!("{at}.moduleImpl"),
                format!("{impl_name:?} is not one of wasm, spawn, python, docker, dlfcn"),
            )
        })?;
        let entry_point = string(
            required(mm, "entryPoint", &at)?,
            &format!("{at}.entryPoint"),
        )?;
        let download_url = match mm.get("downloadUrl") {
            None | Some(Value::Null) => None,
            Some(x) => {
                let url = string(x, &format!("{at}.downloadUrl"))?;
                // EVP's markers for an embedded module that is never downloaded.
                (!url.is_empty() && url != "EVP-BACKDOOR").then_some(url)
            }
        };
        let hash = match mm.get("hash") {
            None | Some(Value::Null) => None,
            Some(x) => Some(string(x, &format!("{at}.hash"))?.to_ascii_lowercase()),
        };
        modules.insert(
            id.clone(),
            Module {
                module_impl,
                entry_point,
                download_url,
                hash,
            },
        );
    }
    let mut instance_specs = BTreeMap::new();
    let specs_path = "deployment.instanceSpecs";
    for (name, sv) in object(required(m, "instanceSpecs", root)?, specs_path)? {
        let at = format!("{specs_path}.{name}");
        let sm = object(sv, &at)?;
        let module_id = string(required(sm, "moduleId", &at)?, &format!("{at}.moduleId"))?;
        let publish = string_map(required(sm, "publish", &at)?, &format!("{at}.publish"))?;
        let subscribe = string_map(required(sm, "subscribe", &at)?, &format!("{at}.subscribe"))?;
        let restart_policy = match sm.get("restartPolicy") {
            None | Some(Value::Null) => None,
            Some(x) => Some(
                serde_json::from_value::<RestartPolicy>(x.clone()).map_err(|_| {
                    ValidationError::new(
                        format!("{at}.restartPolicy"),
                        "must be one of \"always\", \"on-failure\", \"never\"",
                    )
                })?,
            ),
        };
        instance_specs.insert(
            name.clone(),
            InstanceSpec {
                module_id,
                publish,
                subscribe,
                restart_policy,
            },
        );
    }
    let topics = |key: &str| -> Result<BTreeMap<String, Topic>, ValidationError> {
        let path = format!("deployment.{key}");
        match m.get(key) {
            None | Some(Value::Null) => Ok(BTreeMap::new()),
            Some(x) => object(x, &path)?
                .iter()
                .map(|(name, tv)| {
                    let at = format!("{path}.{name}");
                    let tm = object(tv, &at)?;
                    Ok((
                        name.clone(),
                        Topic {
                            kind: string(required(tm, "type", &at)?, &format!("{at}.type"))?,
                            topic: string(required(tm, "topic", &at)?, &format!("{at}.topic"))?,
                        },
                    ))
                })
                .collect(),
        }
    };
    let deployment = Deployment {
        deployment_id,
        instance_specs,
        modules,
        publish_topics: topics("publishTopics")?,
        subscribe_topics: topics("subscribeTopics")?,
    };
    deployment.validate()?;
    Ok(deployment)
}

/// Decodes the double-wrapped `desiredDeviceConfig` (HUB-PROTOCOL.md §2.10).
pub fn decode_device_config(v: &Value) -> Result<DeviceConfig, ValidationError> {
    let outer = object(v, "desiredDeviceConfig")?;
    let path = "desiredDeviceConfig.desiredDeviceConfig";
    let inner = object(
        required(outer, "desiredDeviceConfig", "desiredDeviceConfig")?,
        path,
    )?;
    let key = |k: &str| format!("configuration/$agent/{k}");
    let get = |k: &str| required(inner, &key(k), path);
    let interval = |k: &str| -> Result<Option<i64>, ValidationError> {
        match get(k)? {
            Value::Null => Ok(None),
            Value::Number(n) => Ok(n.as_i64()),
            other => Err(ValidationError::new(
                format!("{path}.{}", key(k)),
                format!("must be a number or null, found {}", kind(other)),
            )),
        }
    };
    // Out-of-range values mean "use the local setting", as in EVP.
    let min = interval("report-status-interval-min")?
        .filter(|s| (1..=MAX_INTERVAL_S).contains(s))
        .map(|s| s as u64);
    let max = interval("report-status-interval-max")?
        .filter(|s| *s == -1 || (1..=MAX_INTERVAL_S).contains(s));
    let configuration_id = match get("configuration-id")? {
        Value::Null => None,
        x => Some(string(x, &format!("{path}.{}", key("configuration-id")))?),
    };
    let registry_auth = match get("registry-auth")? {
        Value::Null => None,
        x => Some(string_map(x, &format!("{path}.{}", key("registry-auth")))?),
    };
    Ok(DeviceConfig {
        report_status_interval_min: min,
        report_status_interval_max: max,
        configuration_id,
        registry_auth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{DeploymentStatus, InstanceState, InstanceStatus, ReconcileStatus};

    const EXAMPLE: &str = r#"{
      "deployment": {
        "deploymentId": "dep-0001",
        "instanceSpecs": {
          "sender-1":   { "moduleId": "mod-msg", "publish": { "out": "pub-salute" }, "subscribe": {} },
          "receiver-1": { "moduleId": "mod-msg", "publish": {}, "subscribe": { "in": "sub-salute" } }
        },
        "modules": {
          "mod-msg": {
            "moduleImpl": "wasm",
            "entryPoint": "main",
            "downloadUrl": "https://example.invalid/modules/messaging.wasm",
            "hash": "0F1E2D3C4B5A69788796A5B4C3D2E1F00F1E2D3C4B5A69788796A5B4C3D2E1F0"
          }
        },
        "publishTopics":   { "pub-salute": { "type": "local", "topic": "salute" } },
        "subscribeTopics": { "sub-salute": { "type": "local", "topic": "salute" } }
      }
    }"#;

    #[test]
    fn decodes_the_documented_example() {
        let changes = Evp2Codec.decode_attribute_update(EXAMPLE.as_bytes());
        let [DesiredChange::Deployment(d)] = changes.as_slice() else {
            panic!("{changes:?}");
        };
        assert_eq!(d.deployment_id.as_deref(), Some("dep-0001"));
        assert_eq!(d.instance_specs["sender-1"].publish["out"], "pub-salute");
        // Hashes are case-insensitive on the wire and lower-case in the canonical form.
        assert!(
            d.modules["mod-msg"]
                .hash
                .as_ref()
                .unwrap()
                .starts_with("0f1e")
        );
        assert_eq!(d.subscribe_topics["sub-salute"].topic, "salute");
    }

    #[test]
    fn missing_instance_specs_is_refused_with_its_path() {
        let p = br#"{"deployment":{"deploymentId":"x","modules":{}}}"#;
        let changes = Evp2Codec.decode_attribute_update(p);
        let [
            DesiredChange::RejectedDeployment {
                deployment_id,
                error,
            },
        ] = changes.as_slice()
        else {
            panic!("{changes:?}");
        };
        assert_eq!(deployment_id.as_deref(), Some("x"));
        assert_eq!(error.path, "deployment.instanceSpecs");
    }

    #[test]
    fn unknown_module_impl_is_refused() {
        let p = br#"{"deployment":{"instanceSpecs":{},"modules":{"m":{"moduleImpl":"exe","entryPoint":"main"}}}}"#;
        let changes = Evp2Codec.decode_attribute_update(p);
        let [DesiredChange::RejectedDeployment { error, .. }] = changes.as_slice() else {
            panic!("{changes:?}");
        };
        assert_eq!(error.path, "deployment.modules.m.moduleImpl");
    }

    #[test]
    fn backdoor_url_means_no_download() {
        let p = br#"{"deployment":{"instanceSpecs":{},"modules":{"m":{"moduleImpl":"spawn","entryPoint":"backdoor-x","downloadUrl":"EVP-BACKDOOR"}}}}"#;
        let changes = Evp2Codec.decode_attribute_update(p);
        let [DesiredChange::Deployment(d)] = changes.as_slice() else {
            panic!("{changes:?}");
        };
        assert_eq!(d.modules["m"].download_url, None);
    }

    #[test]
    fn device_config_is_double_wrapped_and_bounded() {
        let p = br#"{ "desiredDeviceConfig": { "desiredDeviceConfig": {
            "configuration/$agent/report-status-interval-min": 2,
            "configuration/$agent/report-status-interval-max": 90000,
            "configuration/$agent/configuration-id": "cfg-42",
            "configuration/$agent/registry-auth": { "ghcr.io": "base64-auth" } } } }"#;
        let changes = Evp2Codec.decode_attribute_update(p);
        let [DesiredChange::DeviceConfig(c)] = changes.as_slice() else {
            panic!("{changes:?}");
        };
        assert_eq!(c.report_status_interval_min, Some(2));
        assert_eq!(
            c.report_status_interval_max, None,
            "above one day means unset"
        );
        assert_eq!(c.configuration_id.as_deref(), Some("cfg-42"));
        assert_eq!(c.registry_auth.as_ref().unwrap()["ghcr.io"], "base64-auth");
    }

    #[test]
    fn device_config_without_all_four_keys_is_invalid() {
        let p = br#"{"desiredDeviceConfig":{"desiredDeviceConfig":{"configuration/$agent/report-status-interval-min":2}}}"#;
        let changes = Evp2Codec.decode_attribute_update(p);
        assert!(
            matches!(changes.as_slice(), [DesiredChange::Invalid(_)]),
            "{changes:?}"
        );
    }

    #[test]
    fn configuration_topics_keep_their_slashes_and_a_bad_value_fails_the_batch() {
        let p = br#"{"configuration/rx/a/b":"v","configuration/rx/c":"w"}"#;
        let changes = Evp2Codec.decode_attribute_update(p);
        assert!(changes.contains(&DesiredChange::Configuration {
            instance: "rx".into(),
            topic: "a/b".into(),
            value: b"v".to_vec()
        }));
        let p = br#"{"configuration/rx/a":"v","configuration/rx/c":7}"#;
        let changes = Evp2Codec.decode_attribute_update(p);
        assert!(
            matches!(changes.as_slice(), [DesiredChange::Invalid(_)]),
            "{changes:?}"
        );
    }

    #[test]
    fn deleted_configurations_are_decoded() {
        let p = br#"{"deleted":["configuration/rx/t","other"]}"#;
        assert_eq!(
            Evp2Codec.decode_attribute_update(p),
            vec![DesiredChange::ConfigurationDeleted {
                instance: "rx".into(),
                topic: "t".into()
            }]
        );
    }

    #[test]
    fn the_device_own_report_decodes_to_nothing() {
        let report = StatusReport {
            system_info: crate::codec::SystemInfo {
                os: "Linux".into(),
                arch: "x86_64".into(),
                agent_version: "v0.1.0".into(),
                commit_hash: None,
            },
            interval_min_s: 3,
            interval_max_s: 180,
            configuration_id: Some("c".into()),
            registries_with_auth: vec![],
            deployment: Some(DeploymentStatus::default()),
        };
        let encoded = Evp2Codec.encode_status_report(&report).to_string();
        assert!(
            Evp2Codec
                .decode_attribute_update(encoded.as_bytes())
                .is_empty()
        );
    }

    #[test]
    fn status_report_has_evp2_shape_and_hides_registry_credentials() {
        let mut status = DeploymentStatus {
            deployment_id: Some("d".into()),
            reconcile_status: Some(ReconcileStatus::Ok),
            ..Default::default()
        };
        status.instances.insert(
            "i".into(),
            InstanceStatus {
                status: InstanceState::SelfExiting,
                module_id: "m".into(),
                failure_message: None,
            },
        );
        let report = StatusReport {
            system_info: crate::codec::SystemInfo {
                os: "Linux".into(),
                arch: "x86_64".into(),
                agent_version: "v0.1.0".into(),
                commit_hash: Some("abc".into()),
            },
            interval_min_s: 3,
            interval_max_s: 180,
            configuration_id: None,
            registries_with_auth: vec!["ghcr.io".into()],
            deployment: Some(status),
        };
        let v = Evp2Codec.encode_status_report(&report);
        assert_eq!(v["systemInfo"]["protocolVersion"], "EVP2-TB");
        assert_eq!(v["state/$agent/report-status-interval-max"], 180);
        assert_eq!(
            v["deploymentStatus"]["instances"]["i"]["status"],
            "self-exiting"
        );
        assert_eq!(v["deploymentStatus"]["reconcileStatus"], "ok");
        assert_eq!(v["state/$agent/registry-auth"]["ghcr.io"], "[redacted]");
    }

    #[test]
    fn instance_states_are_cut_at_nul_and_skip_non_utf8() {
        let mut states = BTreeMap::new();
        states.insert(("a".into(), "t".into()), b"hello\0junk".to_vec());
        states.insert(("a".into(), "bad".into()), vec![0xff, 0xfe]);
        let v = Evp2Codec.encode_instance_states(&states);
        assert_eq!(v, json!({"state/a/t": "hello"}));
    }
}
