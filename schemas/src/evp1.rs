//! EVP1 over ThingsBoard MQTT: the older dialect (`EVP_IOT_PLATFORM=EVP1`), on the same
//! topics as EVP2 (docs/hub-protocol.md §15). What differs: the manifest is a JSON string
//! whose instances carry `entryPoint` and a numeric `version`, configurations and states are
//! base64, `deploymentStatus` is a JSON string without `moduleId`s, `systemInfo` is `utsname`,
//! a direct command's request id is its MQTT topic id, and storage tokens are `StorageToken`
//! RPCs matched by topic id. There is no `desiredDeviceConfig` and no `state/$agent/*`.
//!
//! Decoding translates into EVP2's shapes where they are the same thing and lets the EVP2
//! decoder judge them, so both dialects refuse the same manifests with the same paths.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::codec::{
    DesiredChange, DirectCommand, DirectCommandError, DirectCommandResponse, HubCodec, RpcStatus,
    StatusReport, TelemetryEntry, TelemetryError,
};
use crate::deployment::{Deployment, ValidationError};
use crate::evp2::storage::{StorageTokenRequest, StorageTokenResponse};
use crate::evp2::{self, AttributeRules, kind, object, required, string};

/// The name EVP1 reports as `protocolVersion`.
pub const PROTOCOL_NAME: &str = "EVP1";
/// The RPC method of a direct command from the hub.
pub const DIRECT_COMMAND_METHOD: &str = "ModuleMethodCall";
/// The RPC method of the device's storage-token request.
pub const STORAGE_TOKEN_METHOD: &str = "StorageToken";
/// The runtime of a module whose `moduleImpl` is absent (EVP1 makes it optional): EVP takes
/// the first one it was built with, which is `wasm` in every build that has WASM.
pub const DEFAULT_MODULE_IMPL: &str = "wasm";
/// EVP serializes a command's parameters for the module with parson's pretty printer, which
/// indents by four spaces.
const PARAMS_INDENT: &[u8] = b"    ";

/// EVP1's rules: the manifest is a JSON string, configurations are base64, and there is no
/// device configuration.
const EVP1_ATTRIBUTES: AttributeRules = AttributeRules {
    deployment: deployment_change,
    config_value: decode_base64,
    device_config: false,
};

/// The EVP1 codec.
#[derive(Debug, Default, Clone, Copy)]
pub struct Evp1Codec;

impl HubCodec for Evp1Codec {
    fn protocol_name(&self) -> &'static str {
        PROTOCOL_NAME
    }

    fn decode_attribute_update(&self, payload: &[u8]) -> Vec<DesiredChange> {
        evp2::decode_update_as(payload, &EVP1_ATTRIBUTES)
    }

    fn decode_attribute_response(&self, payload: &[u8]) -> Vec<DesiredChange> {
        evp2::decode_get_answer_as(payload, &EVP1_ATTRIBUTES)
    }

    fn encode_status_report(&self, report: &StatusReport) -> Value {
        let info = &report.system_info;
        let mut out = Map::new();
        out.insert(
            "systemInfo".into(),
            json!({
                "utsname": {
                    "sysname": info.os,
                    "nodename": info.uname.nodename,
                    "release": info.uname.release,
                    "version": info.uname.version,
                    "machine": info.arch,
                },
                "protocolVersion": PROTOCOL_NAME,
            }),
        );
        // EVP1 has no `state/$agent/*`: intervals, configuration id, registries and losses
        // are not reported (hubd logs the losses).
        if let Some(status) = &report.deployment {
            let mut status = evp2::encode_deployment_status(status);
            if let Some(Value::Object(instances)) = status.get_mut("instances") {
                for instance in instances.values_mut() {
                    if let Value::Object(fields) = instance {
                        fields.remove("moduleId");
                    }
                }
            }
            out.insert("deploymentStatus".into(), json!(status.to_string()));
        }
        Value::Object(out)
    }

    fn encode_instance_states(&self, states: &BTreeMap<(String, String), Vec<u8>>) -> Value {
        // The bytes as they are, in base64: no NUL cut and no UTF-8 needed, unlike EVP2.
        let out: Map<String, Value> = states
            .iter()
            .map(|((instance, topic), bytes)| {
                (
                    format!("state/{instance}/{topic}"),
                    json!(BASE64.encode(bytes)),
                )
            })
            .collect();
        Value::Object(out)
    }

    fn decode_direct_command(
        &self,
        mqtt_id: &str,
        payload: &[u8],
    ) -> Result<Option<DirectCommand>, DirectCommandError> {
        decode_direct_command(mqtt_id, payload)
    }

    fn encode_direct_command_response(
        &self,
        instance: &str,
        response: &DirectCommandResponse,
    ) -> Vec<u8> {
        encode_direct_command_response(instance, response)
    }

    fn push_telemetry_entry(
        &self,
        payload: &mut Vec<u8>,
        entry: TelemetryEntry<'_>,
    ) -> Result<(), TelemetryError> {
        // Telemetry is the same in both dialects.
        evp2::Evp2Codec.push_telemetry_entry(payload, entry)
    }

    fn finish_telemetry(&self, payload: &mut Vec<u8>) {
        evp2::Evp2Codec.finish_telemetry(payload)
    }

    fn encode_storage_token_request(&self, request: &StorageTokenRequest<'_>) -> Vec<u8> {
        // The request id is the topic's only.
        let mut params = json!({
            "filename": request.filename,
            "moduleInstanceName": request.instance,
        });
        if let Some(key) = request.key {
            params["storageName"] = json!(key);
        }
        json!({"method": STORAGE_TOKEN_METHOD, "params": params})
            .to_string()
            .into_bytes()
    }

    fn decode_storage_token_response(
        &self,
        mqtt_id: &str,
        payload: &[u8],
    ) -> Option<Result<StorageTokenResponse, ValidationError>> {
        decode_storage_token_response(mqtt_id, payload)
    }
}

fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    BASE64
        .decode(text)
        .map_err(|e| format!("is not base64 (EVP1 configurations are): {e}"))
}

/// The `deployment` attribute: a string holding the manifest's JSON.
fn deployment_change(v: &Value) -> DesiredChange {
    let manifest = match v {
        Value::String(text) => serde_json::from_str::<Value>(text).map_err(|e| {
            ValidationError::new(
                "deployment",
                format!("holds a string that is not JSON: {e}"),
            )
        }),
        other => Err(ValidationError::new(
            "deployment",
            format!(
                "must be a string holding the manifest's JSON (EVP1), found {}",
                kind(other)
            ),
        )),
    };
    match manifest {
        Err(error) => DesiredChange::RejectedDeployment {
            deployment_id: None,
            error,
        },
        Ok(manifest) => match decode_deployment(&manifest) {
            Ok(d) => DesiredChange::Deployment(d),
            Err(error) => DesiredChange::RejectedDeployment {
                deployment_id: manifest
                    .get("deploymentId")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                error,
            },
        },
    }
}

/// Decodes an EVP1 manifest (already parsed from its string) into the canonical form and
/// validates it. Each instance's `entryPoint` becomes its module's, so the instances of one
/// module must agree on it; `version` must be a number, kept on the instance so that a new
/// one restarts it, as in EVP.
pub fn decode_deployment(manifest: &Value) -> Result<Deployment, ValidationError> {
    let mut evp2_form = object(manifest, "deployment")?.clone();
    let mut entry_points: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut versions: BTreeMap<String, serde_json::Number> = BTreeMap::new();
    if let Some(Value::Object(specs)) = evp2_form.get_mut("instanceSpecs") {
        for (name, spec) in specs.iter_mut() {
            // A spec that is not an object is refused by the EVP2 decoder, path and all.
            let Value::Object(fields) = spec else {
                continue;
            };
            let at = format!("deployment.instanceSpecs.{name}");
            let entry_point = string(
                required(fields, "entryPoint", &at)?,
                &format!("{at}.entryPoint"),
            )?;
            let version = required(fields, "version", &at)?;
            let Value::Number(number) = version else {
                return Err(ValidationError::new(
                    format!("{at}.version"),
                    format!("must be a number, found {}", kind(version)),
                ));
            };
            versions.insert(name.clone(), number.clone());
            fields.remove("entryPoint");
            fields.remove("version");
            let Some(module_id) = fields.get("moduleId").and_then(Value::as_str) else {
                continue;
            };
            match entry_points.get(module_id) {
                Some((other, theirs)) if *theirs != entry_point => {
                    return Err(ValidationError::new(
                        format!("{at}.entryPoint"),
                        format!(
                            "{entry_point:?} differs from {theirs:?}, the entryPoint of \
                             instance {other:?} of the same module: this agent runs each \
                             module with one entry point"
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    entry_points.insert(module_id.to_owned(), (name.clone(), entry_point));
                }
            }
        }
    }
    if let Some(Value::Object(modules)) = evp2_form.get_mut("modules") {
        for (id, module) in modules.iter_mut() {
            let Value::Object(fields) = module else {
                continue;
            };
            if fields.get("moduleImpl").is_none_or(Value::is_null) {
                fields.insert("moduleImpl".into(), json!(DEFAULT_MODULE_IMPL));
            }
            // A module no instance uses needs no entry point.
            let entry_point = entry_points.remove(id).map(|(_, e)| e).unwrap_or_default();
            fields.insert("entryPoint".into(), json!(entry_point));
        }
    }
    let mut deployment = evp2::decode_deployment(&Value::Object(evp2_form))?;
    for (name, spec) in deployment.instance_specs.iter_mut() {
        spec.version = versions.remove(name);
    }
    Ok(deployment)
}

fn decode_direct_command(
    mqtt_id: &str,
    payload: &[u8],
) -> Result<Option<DirectCommand>, DirectCommandError> {
    let error = |reqid, path: &str, message: String| DirectCommandError {
        reqid,
        error: ValidationError::new(path, message),
    };
    let reqid = mqtt_id.parse::<u64>().map_err(|_| {
        error(
            None,
            "rpc request topic",
            format!("id {mqtt_id:?} is not a decimal number from 0 to 2^64-1 (EVP1's reqid)"),
        )
    })?;
    let v: Value = serde_json::from_slice(payload)
        .map_err(|e| error(Some(reqid), "rpc request", format!("is not JSON: {e}")))?;
    let root = v.as_object().ok_or_else(|| {
        error(
            Some(reqid),
            "rpc request",
            format!("must be an object, found {}", kind(&v)),
        )
    })?;
    match root.get("method").and_then(Value::as_str) {
        Some(DIRECT_COMMAND_METHOD) => {}
        // The device's own storage-token request, echoed by a plain broker: not for us.
        Some(STORAGE_TOKEN_METHOD) => return Ok(None),
        _ => {
            return Err(error(
                Some(reqid),
                "method",
                format!("must be {DIRECT_COMMAND_METHOD:?}"),
            ));
        }
    }
    let params = match root.get("params") {
        Some(Value::Object(p)) => p,
        Some(other) => {
            return Err(error(
                Some(reqid),
                "params",
                format!("must be an object, found {}", kind(other)),
            ));
        }
        None => return Err(error(Some(reqid), "params", "is required".into())),
    };
    let field = |key: &str| -> Result<String, DirectCommandError> {
        let path = format!("params.{key}");
        let text = string(
            params
                .get(key)
                .ok_or_else(|| error(Some(reqid), &path, "is required".into()))?,
            &path,
        )
        .map_err(|e| DirectCommandError {
            reqid: Some(reqid),
            error: e,
        })?;
        crate::bus_string::check_bus_string(key, &text)
            .map_err(|e| error(Some(reqid), &path, e.to_string()))?;
        Ok(text)
    };
    let instance = field("moduleInstance")?;
    let method = field("moduleMethod")?;
    let Some(module_params) = params.get("params") else {
        return Err(error(Some(reqid), "params.params", "is required".into()));
    };
    Ok(Some(DirectCommand {
        reqid,
        method,
        instance,
        // JSON text never holds a NUL byte: serde_json writes it as \u0000.
        params: pretty(module_params),
    }))
}

/// `v` as EVP hands a command's parameters to the module: pretty-printed, four-space indent.
fn pretty(v: &Value) -> String {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(PARAMS_INDENT);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    // Writing a Value to memory does not fail.
    let _ = v.serialize(&mut serializer);
    String::from_utf8(out).unwrap_or_default()
}

fn encode_direct_command_response(instance: &str, r: &DirectCommandResponse) -> Vec<u8> {
    let response = match (r.status, r.response.as_deref()) {
        // What EVP1 hubs look for (EVP's comment: they should read `status`, and do not).
        (RpcStatus::MethodNotFound, _) => json!("Unknown method"),
        // EVP sends the module's text parsed as JSON (and sends nothing when it is not JSON);
        // text that is not JSON goes as a JSON string instead.
        (_, Some(text)) => serde_json::from_str(text).unwrap_or_else(|_| json!(text)),
        (RpcStatus::Error, None) => {
            json!({"error": r.error_message.as_deref().unwrap_or("Unknown error")})
        }
        (RpcStatus::Ok, None) => Value::Null,
    };
    json!({"moduleInstance": instance, "response": response, "status": r.status.to_wire()})
        .to_string()
        .into_bytes()
}

/// A payload on `v1/devices/me/rpc/response/<mqtt_id>`: `{"method":..., "params": {answer}}`,
/// for the request sent with id `mqtt_id`; `{"error": "..."}`, which EVP1 hubs send when they
/// have no token to give (EVP ignores it and times out; here it is the refusal it means).
fn decode_storage_token_response(
    mqtt_id: &str,
    payload: &[u8],
) -> Option<Result<StorageTokenResponse, ValidationError>> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let root = v.as_object()?;
    if let (Some(Value::String(_)), Some(Value::Object(params))) =
        (root.get("method"), root.get("params"))
    {
        let mut answer = params.clone();
        answer.insert("reqid".into(), json!(mqtt_id));
        return Some(
            serde_json::from_value(Value::Object(answer))
                .map_err(|e| ValidationError::new("params", e.to_string())),
        );
    }
    let message = root.get("error")?.as_str()?;
    Some(Ok(StorageTokenResponse {
        reqid: mqtt_id.to_owned(),
        error_message: Some(message.to_owned()),
        ..Default::default()
    }))
}
