//! EVP2 over ThingsBoard MQTT ("EVP2-TB"): the JSON a hub sends and expects, per
//! docs/hub-protocol.md §3-§13. The decoder walks the JSON by hand so that every refusal names the
//! path of the field at fault.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::codec::{
    DesiredChange, DeviceConfig, DirectCommand, DirectCommandError, DirectCommandResponse,
    HubCodec, RpcStatus, StatusReport, TelemetryEntry, TelemetryError,
};
use crate::deployment::{
    Deployment, InstanceSpec, Module, ModuleImpl, RestartPolicy, Topic, ValidationError,
};

pub mod sizes;
pub mod storage;

/// The name EVP2 reports as `protocolVersion`.
pub const PROTOCOL_NAME: &str = "EVP2-TB";

/// Longest interval a hub may set, seconds (EVP's bound: one day).
const MAX_INTERVAL_S: i64 = 86_400;

/// Where a direct command sits in an RPC request.
const DIRECT_COMMAND_PATH: &str = "params.direct-command-request";

/// The whitespace JSON allows around a value (RFC 8259 §2).
const JSON_WHITESPACE: &[char] = &[' ', '\t', '\n', '\r'];

/// A telemetry key, `<instance>/<key>`, serialized as a JSON string without building it first.
struct TelemetryKey<'a>(&'a str, &'a str);

impl serde::Serialize for TelemetryKey<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}/{}", self.0, self.1))
    }
}

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
    /// Prefix of server-side RPC requests; the hub's request id follows.
    pub const RPC_REQUEST_PREFIX: &str = "v1/devices/me/rpc/request/";
    /// Prefix of RPC responses; the id of the request answered follows.
    pub const RPC_RESPONSE_PREFIX: &str = "v1/devices/me/rpc/response/";
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
        decode_update_as(payload, &EVP2_ATTRIBUTES)
    }

    fn decode_attribute_response(&self, payload: &[u8]) -> Vec<DesiredChange> {
        decode_get_answer_as(payload, &EVP2_ATTRIBUTES)
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
        if let Some(id) = &info.device_id {
            system_info["deviceId"] = json!(id);
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
        if !report.losses.telemetry.is_empty() {
            out.insert(
                "state/$agent/telemetry-dropped".into(),
                json!(report.losses.telemetry),
            );
        }
        if let Some(d) = &report.losses.incoming {
            out.insert(
                "state/$agent/incoming-dropped".into(),
                json!({"count": d.count, "lastTopic": d.last_topic, "lastBytes": d.last_bytes}),
            );
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

    fn decode_direct_command(
        &self,
        _mqtt_id: &str,
        payload: &[u8],
    ) -> Result<Option<DirectCommand>, DirectCommandError> {
        decode_direct_command(payload)
    }

    fn encode_direct_command_response(
        &self,
        _instance: &str,
        response: &DirectCommandResponse,
    ) -> Vec<u8> {
        encode_direct_command_response(response)
    }

    fn encode_storage_token_request(&self, request: &storage::StorageTokenRequest<'_>) -> Vec<u8> {
        request.encode()
    }

    fn decode_storage_token_response(
        &self,
        _mqtt_id: &str,
        payload: &[u8],
    ) -> Option<Result<storage::StorageTokenResponse, ValidationError>> {
        // EVP2 matches the answer by its payload's `reqid`, whatever the topic's id.
        storage::decode_response(payload)
    }

    fn push_telemetry_entry(
        &self,
        payload: &mut Vec<u8>,
        entry: TelemetryEntry<'_>,
    ) -> Result<(), TelemetryError> {
        push_telemetry_entry(payload, entry)
    }

    fn finish_telemetry(&self, payload: &mut Vec<u8>) {
        if payload.is_empty() {
            payload.push(b'{');
        }
        payload.push(b'}');
    }
}

fn direct_command_error(
    reqid: Option<u64>,
    path: impl Into<String>,
    message: impl Into<String>,
) -> DirectCommandError {
    DirectCommandError {
        reqid,
        error: ValidationError::new(path, message),
    }
}

fn decode_direct_command(payload: &[u8]) -> Result<Option<DirectCommand>, DirectCommandError> {
    let v: Value = serde_json::from_slice(payload)
        .map_err(|e| direct_command_error(None, "rpc request", format!("is not JSON: {e}")))?;
    let root = v.as_object().ok_or_else(|| {
        direct_command_error(
            None,
            "rpc request",
            format!("must be an object, found {}", kind(&v)),
        )
    })?;
    let params = match root.get("params") {
        Some(Value::Object(p)) => p,
        Some(other) => {
            return Err(direct_command_error(
                None,
                "params",
                format!("must be an object, found {}", kind(other)),
            ));
        }
        None => return Err(direct_command_error(None, "params", "is required")),
    };
    let Some(request) = params.get("direct-command-request") else {
        // The device's own storage-token request, echoed by a plain broker: not for us.
        if params.contains_key(storage::REQUEST_KEY) {
            return Ok(None);
        }
        return Err(direct_command_error(
            None,
            DIRECT_COMMAND_PATH,
            "is required",
        ));
    };
    let request = request.as_object().ok_or_else(|| {
        direct_command_error(
            None,
            DIRECT_COMMAND_PATH,
            format!("must be an object, found {}", kind(request)),
        )
    })?;
    let reqid_path = format!("{DIRECT_COMMAND_PATH}.reqid");
    let reqid = match request.get("reqid") {
        Some(Value::String(s)) => s.parse::<u64>().map_err(|_| {
            direct_command_error(
                None,
                &reqid_path,
                format!("{s:?} is not a decimal number from 0 to 2^64-1"),
            )
        })?,
        // EVP2 wants a string; a number is refused, but it can still be answered.
        Some(Value::Number(n)) => {
            return Err(direct_command_error(
                n.as_u64(),
                reqid_path,
                "must be a string holding a decimal number, found a number",
            ));
        }
        Some(other) => {
            return Err(direct_command_error(
                None,
                reqid_path,
                format!("must be a string, found {}", kind(other)),
            ));
        }
        None => return Err(direct_command_error(None, reqid_path, "is required")),
    };
    let field = |key: &str| -> Result<String, DirectCommandError> {
        let path = format!("{DIRECT_COMMAND_PATH}.{key}");
        match request.get(key) {
            Some(Value::String(s)) => match crate::bus_string::check_bus_string(key, s) {
                Ok(()) => Ok(s.clone()),
                Err(e) => Err(direct_command_error(Some(reqid), path, e.to_string())),
            },
            Some(other) => Err(direct_command_error(
                Some(reqid),
                path,
                format!("must be a string, found {}", kind(other)),
            )),
            None => Err(direct_command_error(Some(reqid), path, "is required")),
        }
    };
    Ok(Some(DirectCommand {
        reqid,
        method: field("method")?,
        instance: field("instance")?,
        params: field("params")?,
    }))
}

fn encode_direct_command_response(r: &DirectCommandResponse) -> Vec<u8> {
    let mut inner = Map::new();
    let status = match r.status {
        RpcStatus::Ok => "ok",
        RpcStatus::MethodNotFound | RpcStatus::Error => "error",
    };
    inner.insert("status".into(), json!(status));
    if r.status != RpcStatus::Ok {
        let message = r.error_message.as_deref().unwrap_or(match r.status {
            RpcStatus::MethodNotFound => "Unknown method",
            _ => "Unknown error",
        });
        inner.insert("errorMessage".into(), json!(message));
    }
    inner.insert("reqid".into(), json!(r.reqid.to_string()));
    if let Some(response) = &r.response {
        inner.insert("response".into(), json!(response));
    }
    json!({ "direct-command-response": inner })
        .to_string()
        .into_bytes()
}

fn push_telemetry_entry(
    payload: &mut Vec<u8>,
    entry: TelemetryEntry<'_>,
) -> Result<(), TelemetryError> {
    let refuse = |message: String| TelemetryError {
        instance: entry.instance.to_owned(),
        key: entry.key.to_owned(),
        message,
    };
    let value = entry.value.trim_matches(JSON_WHITESPACE);
    // Validate without building the value: it is copied as it is, which the hub parses the
    // same as EVP's re-serialized form.
    serde_json::from_str::<serde::de::IgnoredAny>(value).map_err(|e| refuse(e.to_string()))?;
    let start = payload.len();
    payload.push(if start == 0 { b'{' } else { b',' });
    if let Err(e) = serde_json::to_writer(&mut *payload, &TelemetryKey(entry.instance, entry.key)) {
        payload.truncate(start);
        return Err(refuse(format!("its key cannot be encoded: {e}")));
    }
    payload.push(b':');
    payload.extend_from_slice(value.as_bytes());
    Ok(())
}

pub(crate) fn encode_deployment_status(status: &crate::status::DeploymentStatus) -> Value {
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

/// `payload` as a JSON object, or the one change saying why it is not (`what` names it).
fn payload_object(payload: &[u8], what: &str) -> Result<Map<String, Value>, Vec<DesiredChange>> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(vec![DesiredChange::Invalid(ValidationError::new(
            what,
            "is not a JSON object",
        ))]),
        Err(e) => Err(vec![DesiredChange::Invalid(ValidationError::new(
            what,
            format!("is not JSON: {e}"),
        ))]),
    }
}

/// Decodes an attribute update (a PATCH) under `rules`.
pub(crate) fn decode_update_as(payload: &[u8], rules: &AttributeRules) -> Vec<DesiredChange> {
    payload_object(payload, "attributes")
        .map_or_else(|e| e, |map| decode_attributes_as(&map, rules))
}

/// Decodes the answer to the initial attribute request (its `shared` object) under `rules`.
pub(crate) fn decode_get_answer_as(payload: &[u8], rules: &AttributeRules) -> Vec<DesiredChange> {
    let map = match payload_object(payload, "attributes response") {
        Ok(map) => map,
        Err(e) => return e,
    };
    match map.get("shared") {
        Some(Value::Object(shared)) => decode_attributes_as(shared, rules),
        // No `shared` key: the hub has no shared attributes for this device.
        None | Some(Value::Null) => Vec::new(),
        Some(_) => vec![DesiredChange::Invalid(ValidationError::new(
            "shared",
            "is not a JSON object",
        ))],
    }
}

/// How a dialect reads the shared attributes whose names both dialects use.
pub(crate) struct AttributeRules {
    /// The `deployment` attribute's value (not null) as a change.
    pub deployment: fn(&Value) -> DesiredChange,
    /// A configuration's string as the bytes the module gets, or why it cannot be.
    pub config_value: fn(&str) -> Result<Vec<u8>, String>,
    /// Whether the dialect has `desiredDeviceConfig`.
    pub device_config: bool,
}

/// EVP2's rules: the manifest is an object, configurations are raw text.
const EVP2_ATTRIBUTES: AttributeRules = AttributeRules {
    deployment: deployment_change,
    config_value: |s| Ok(s.as_bytes().to_vec()),
    device_config: true,
};

fn deployment_change(v: &Value) -> DesiredChange {
    match decode_deployment(v) {
        Ok(d) => DesiredChange::Deployment(d),
        Err(error) => DesiredChange::RejectedDeployment {
            deployment_id: v
                .get("deploymentId")
                .and_then(Value::as_str)
                .map(str::to_owned),
            error,
        },
    }
}

/// Decodes a PATCH (or the `shared` object of the GET answer) under `rules`.
fn decode_attributes_as(map: &Map<String, Value>, rules: &AttributeRules) -> Vec<DesiredChange> {
    let mut changes = Vec::new();
    let mut configs = Vec::new();
    let mut config_error = None;
    for (key, value) in map {
        if key == "deployment" {
            changes.push(match value {
                Value::Null => DesiredChange::DeploymentRemoved,
                v => (rules.deployment)(v),
            });
        } else if key == "desiredDeviceConfig" && !rules.device_config {
            changes.push(DesiredChange::NotInDialect(key.clone()));
        } else if key == "desiredDeviceConfig" {
            changes.push(match decode_device_config(value) {
                Ok(c) => DesiredChange::DeviceConfig(c),
                Err(e) => DesiredChange::Invalid(e),
            });
        } else if let Some(rest) = key.strip_prefix("configuration/") {
            match (split_instance_topic(rest), value) {
                (Some((instance, topic)), _) if let Err(e) = bus_safe(&instance, &topic) => {
                    changes.push(DesiredChange::Invalid(ValidationError::new(key.clone(), e)));
                }
                (Some((instance, topic)), Value::String(s)) => match (rules.config_value)(s) {
                    Ok(value) => configs.push(DesiredChange::Configuration {
                        instance,
                        topic,
                        value,
                    }),
                    Err(e) => {
                        changes.push(DesiredChange::Invalid(ValidationError::new(key.clone(), e)))
                    }
                },
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
                            match bus_safe(&instance, &topic) {
                                Ok(()) => changes
                                    .push(DesiredChange::ConfigurationDeleted { instance, topic }),
                                Err(e) => changes.push(DesiredChange::Invalid(
                                    ValidationError::new("deleted", e),
                                )),
                            }
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

/// A configuration's instance and topic become D-Bus strings (`DeliverConfiguration`).
fn bus_safe(instance: &str, topic: &str) -> Result<(), String> {
    crate::bus_string::check_bus_string("the configuration's instance", instance)
        .and_then(|()| crate::bus_string::check_bus_string("the configuration's topic", topic))
        .map_err(|e| e.to_string())
}

fn split_instance_topic(rest: &str) -> Option<(String, String)> {
    let (instance, topic) = rest.split_once('/')?;
    if instance.is_empty() || topic.is_empty() {
        return None;
    }
    Some((instance.to_owned(), topic.to_owned()))
}

pub(crate) fn object<'a>(
    v: &'a Value,
    path: &str,
) -> Result<&'a Map<String, Value>, ValidationError> {
    v.as_object()
        .ok_or_else(|| ValidationError::new(path, format!("must be an object, found {}", kind(v))))
}

pub(crate) fn required<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a Value, ValidationError> {
    map.get(key)
        .ok_or_else(|| ValidationError::new(format!("{path}.{key}"), "is required"))
}

pub(crate) fn string(v: &Value, path: &str) -> Result<String, ValidationError> {
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

pub(crate) fn kind(v: &Value) -> &'static str {
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
        // Beyond EVP: passed on as it is; `Deployment::validate` judges it.
        let container = match sm.get("container") {
            None | Some(Value::Null) => None,
            Some(x) => Some(serde_json::from_value(x.clone()).map_err(|e| {
                ValidationError::new(format!("{at}.container"), format!("is not valid: {e}"))
            })?),
        };
        instance_specs.insert(
            name.clone(),
            InstanceSpec {
                module_id,
                publish,
                subscribe,
                restart_policy,
                container,
                version: None,
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

/// Decodes the double-wrapped `desiredDeviceConfig` (docs/hub-protocol.md §12).
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
        x => {
            let at = format!("{path}.{}", key("registry-auth"));
            let auth = string_map(x, &at)?;
            // Hub1.RegistryAuth hands them to runtimed-container as D-Bus strings.
            for (registry, credentials) in &auth {
                crate::bus_string::check_bus_string("the registry name", registry)
                    .and_then(|()| {
                        crate::bus_string::check_bus_string("its credentials", credentials)
                    })
                    .map_err(|e| ValidationError::new(format!("{at}.{registry}"), e.to_string()))?;
            }
            Some(auth)
        }
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

    /// Found by fuzz/fuzz_targets/evp2_attributes.rs: credentials with a NUL were taken, and
    /// `Hub1.RegistryAuth` would have carried them (dbus-daemon disconnects hubd).
    #[test]
    fn registry_auth_with_a_nul_is_refused() {
        let p = br#"{"desiredDeviceConfig":{"desiredDeviceConfig":{"configuration/$agent/report-status-interval-min":1,"configuration/$agent/report-status-interval-max":4,"configuration/$agent/configuration-id":"c","configuration/$agent/registry-auth":{"ghcr.io":"se\u0000cret"}}}}"#;
        let changes = Evp2Codec.decode_attribute_update(p);
        let [DesiredChange::Invalid(e)] = changes.as_slice() else {
            panic!("{changes:?}");
        };
        assert_eq!(
            e.path,
            "desiredDeviceConfig.desiredDeviceConfig.configuration/$agent/registry-auth.ghcr.io"
        );
        assert!(e.message.contains("credentials contains a NUL"), "{e}");
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
                device_id: None,
                uname: Default::default(),
            },
            interval_min_s: 3,
            interval_max_s: 180,
            configuration_id: Some("c".into()),
            registries_with_auth: vec![],
            deployment: Some(DeploymentStatus::default()),
            losses: Default::default(),
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
                device_id: Some("d-1".into()),
                uname: Default::default(),
            },
            interval_min_s: 3,
            interval_max_s: 180,
            configuration_id: None,
            registries_with_auth: vec!["ghcr.io".into()],
            deployment: Some(status),
            losses: crate::codec::Losses {
                telemetry: [("noisy".to_owned(), 7)].into(),
                incoming: Some(crate::codec::IncomingDropped {
                    count: 1,
                    last_topic: "v1/devices/me/attributes".into(),
                    last_bytes: 2_000_000,
                }),
            },
        };
        let v = Evp2Codec.encode_status_report(&report);
        assert_eq!(v["systemInfo"]["protocolVersion"], "EVP2-TB");
        assert_eq!(v["systemInfo"]["deviceId"], "d-1");
        assert_eq!(v["state/$agent/report-status-interval-max"], 180);
        assert_eq!(
            v["deploymentStatus"]["instances"]["i"]["status"],
            "self-exiting"
        );
        assert_eq!(v["deploymentStatus"]["reconcileStatus"], "ok");
        assert_eq!(v["state/$agent/registry-auth"]["ghcr.io"], "[redacted]");
        assert_eq!(v["state/$agent/telemetry-dropped"], json!({"noisy": 7}));
        assert_eq!(v["state/$agent/incoming-dropped"]["lastBytes"], 2_000_000);
    }

    #[test]
    fn instance_states_are_cut_at_nul_and_skip_non_utf8() {
        let mut states = BTreeMap::new();
        states.insert(("a".into(), "t".into()), b"hello\0junk".to_vec());
        states.insert(("a".into(), "bad".into()), vec![0xff, 0xfe]);
        let v = Evp2Codec.encode_instance_states(&states);
        assert_eq!(v, json!({"state/a/t": "hello"}));
    }

    fn command(reqid: &str, params: Value) -> Vec<u8> {
        json!({ "method": "evp-c2d", "params": { "direct-command-request": {
            "reqid": reqid, "method": "echo", "instance": "rpc-1", "params": params } } })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn direct_command_request_is_decoded() {
        let c = Evp2Codec
            .decode_direct_command("1", &command("10042", json!("{\"text\":\"hi\"}")))
            .unwrap()
            .unwrap();
        assert_eq!(
            c,
            DirectCommand {
                reqid: 10042,
                method: "echo".into(),
                instance: "rpc-1".into(),
                params: "{\"text\":\"hi\"}".into(),
            }
        );
        let zero = Evp2Codec.decode_direct_command("1", &command("0", json!("")));
        assert_eq!(zero.unwrap().unwrap().reqid, 0, "reqid 0 is valid");
    }

    #[test]
    fn direct_command_with_object_params_is_refused_with_its_reqid() {
        let e = Evp2Codec
            .decode_direct_command("1", &command("7", json!({"text": "hi"})))
            .unwrap_err();
        assert_eq!(e.reqid, Some(7));
        assert_eq!(e.error.path, "params.direct-command-request.params");
        assert!(
            e.to_string().contains("must be a string, found an object"),
            "{e}"
        );
    }

    #[test]
    fn a_nul_in_a_direct_command_is_refused_with_its_reqid_and_field() {
        let e = Evp2Codec
            .decode_direct_command("1", &command("8", json!("a\0b")))
            .unwrap_err();
        assert_eq!(e.reqid, Some(8));
        assert_eq!(e.error.path, "params.direct-command-request.params");
        assert!(e.to_string().contains("NUL"), "{e}");
        let p = br#"{"method":"evp-c2d","params":{"direct-command-request":{"reqid":"9","method":"e\u0000","instance":"i","params":"{}"}}}"#;
        let e = Evp2Codec.decode_direct_command("1", p).unwrap_err();
        assert_eq!(e.error.path, "params.direct-command-request.method");
    }

    #[test]
    fn a_nul_in_a_configuration_key_refuses_that_key_only() {
        let p = br#"{"configuration/rx/a\u0000":"v","configuration/r\u0000x/b":"v","configuration/rx/c":"w","deleted":["configuration/rx/\u0000"]}"#;
        let changes = Evp2Codec.decode_attribute_update(p);
        let invalid: Vec<&ValidationError> = changes
            .iter()
            .filter_map(|c| match c {
                DesiredChange::Invalid(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(invalid.len(), 3, "{changes:?}");
        assert!(invalid.iter().all(|e| !e.to_string().contains('\0')));
        assert!(changes.contains(&DesiredChange::Configuration {
            instance: "rx".into(),
            topic: "c".into(),
            value: b"w".to_vec()
        }));
    }

    #[test]
    fn direct_command_without_a_readable_reqid_has_none() {
        for bad in [json!("x"), json!("-1"), json!(null)] {
            let p = json!({"params": {"direct-command-request": {
                "reqid": bad, "method": "m", "instance": "i", "params": "{}"}}});
            let e = Evp2Codec
                .decode_direct_command("1", p.to_string().as_bytes())
                .unwrap_err();
            assert_eq!(e.reqid, None, "{e}");
        }
        let p = json!({"params": {"direct-command-request": {
            "reqid": 5, "method": "m", "instance": "i", "params": "{}"}}});
        let e = Evp2Codec
            .decode_direct_command("1", p.to_string().as_bytes())
            .unwrap_err();
        assert_eq!(e.reqid, Some(5), "a numeric reqid is refused but answered");
        assert!(Evp2Codec.decode_direct_command("1", b"not json").is_err());
        assert!(Evp2Codec.decode_direct_command("1", b"[]").is_err());
        assert!(
            Evp2Codec
                .decode_direct_command("1", br#"{"method":"x"}"#)
                .is_err()
        );
    }

    #[test]
    fn own_storage_token_request_is_not_a_command() {
        let p = br#"{"method":"evp-d2c","params":{"storagetoken-request":{"reqid":"10077","filename":"f","moduleInstanceId":"u","key":"default"}}}"#;
        assert_eq!(Evp2Codec.decode_direct_command("1", p), Ok(None));
    }

    #[test]
    fn direct_command_responses_have_evp2_shape() {
        let parse = |r: &DirectCommandResponse| -> Value {
            serde_json::from_slice(&Evp2Codec.encode_direct_command_response("rpc-1", r)).unwrap()
        };
        let ok = DirectCommandResponse {
            reqid: 10042,
            status: RpcStatus::from_wire(0),
            error_message: None,
            response: Some("{\"text\":\"hi\"}".into()),
        };
        assert_eq!(
            parse(&ok),
            json!({"direct-command-response": {"status": "ok", "reqid": "10042", "response": "{\"text\":\"hi\"}"}})
        );
        let not_found = DirectCommandResponse {
            status: RpcStatus::from_wire(1),
            response: None,
            ..ok.clone()
        };
        assert_eq!(
            parse(&not_found),
            json!({"direct-command-response": {"status": "error", "errorMessage": "Unknown method", "reqid": "10042"}})
        );
        let error = DirectCommandResponse {
            status: RpcStatus::from_wire(2),
            ..not_found.clone()
        };
        assert_eq!(
            parse(&error)["direct-command-response"]["errorMessage"],
            "Unknown error"
        );
        let broker = DirectCommandResponse {
            status: RpcStatus::from_wire(99),
            error_message: Some("sdk-broker is not running".into()),
            ..not_found
        };
        assert_eq!(broker.status, RpcStatus::Error);
        assert_eq!(
            parse(&broker)["direct-command-response"]["errorMessage"],
            "sdk-broker is not running"
        );
        assert_eq!(RpcStatus::MethodNotFound.to_wire(), 1);
    }

    fn entry<'a>(instance: &'a str, key: &'a str, value: &'a str) -> TelemetryEntry<'a> {
        TelemetryEntry {
            instance,
            key,
            value,
        }
    }

    #[test]
    fn telemetry_payload_has_instance_keys_and_parsed_values() {
        let (payload, dropped) = Evp2Codec.encode_telemetry(&[
            entry(
                "sensor-1",
                "room1",
                r#" {"temperature": 25, "humidity": 53}
"#,
            ),
            entry("sensor-1", "count", "17"),
            entry("sensor-1", "bad", "not json"),
            entry("sensor-1", "two", "1 2"),
            entry("q\"uote", "k", "\"s\""),
        ]);
        let v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            v,
            json!({"sensor-1/room1": {"temperature": 25, "humidity": 53}, "sensor-1/count": 17, "q\"uote/k": "s"})
        );
        assert_eq!(dropped.len(), 2);
        assert_eq!(dropped[0].key, "bad");
        assert!(
            dropped[0].to_string().contains("sensor-1/bad"),
            "{}",
            dropped[0]
        );
        let (empty, _) = Evp2Codec.encode_telemetry(&[entry("i", "k", "")]);
        assert_eq!(empty, b"{}");
    }
}
