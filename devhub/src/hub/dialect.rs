//! The hub side of each dialect. Tests and the CLI speak EVP2's shapes (a deployment object,
//! configuration text, `direct-command-response` objects); for an EVP1 device these functions
//! turn them into EVP1 on the wire and turn EVP1's reports back into the same shapes, so one
//! test body runs against either dialect (docs/hub-protocol.md §18).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use evp_schemas::Protocol;
use evp_schemas::evp1::{DIRECT_COMMAND_METHOD, STORAGE_TOKEN_METHOD};
use evp_schemas::evp2::storage::REQUEST_KEY;
use serde_json::{Map, Value, json};

/// The version an instance gets in an EVP1 manifest made from an EVP2 one that gives none.
const EVP1_INSTANCE_VERSION: u64 = 1;

/// A PATCH in EVP2's shapes as `protocol` sends it.
pub fn patch_to_wire(protocol: Protocol, patch: Map<String, Value>) -> Map<String, Value> {
    if protocol == Protocol::Evp2 {
        return patch;
    }
    patch
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                Value::Object(manifest) if key == "deployment" => evp1_manifest(manifest),
                Value::String(text) if key.starts_with("configuration/") => {
                    Value::String(BASE64.encode(text))
                }
                // Anything else (a malformed value a test sends on purpose) goes as it is.
                other => other,
            };
            (key, value)
        })
        .collect()
}

/// An EVP2 manifest as EVP1's string: each module's `entryPoint` moves to its instances, each
/// instance gets a `version` (its own `version`, an EVP1 field, when the caller gave one).
fn evp1_manifest(mut manifest: Map<String, Value>) -> Value {
    let mut entry_points = Map::new();
    if let Some(Value::Object(modules)) = manifest.get_mut("modules") {
        for (id, module) in modules.iter_mut() {
            if let Some(entry_point) = module.as_object_mut().and_then(|m| m.remove("entryPoint")) {
                entry_points.insert(id.clone(), entry_point);
            }
        }
    }
    if let Some(Value::Object(specs)) = manifest.get_mut("instanceSpecs") {
        for spec in specs.values_mut().filter_map(Value::as_object_mut) {
            let module = spec.get("moduleId").and_then(Value::as_str).unwrap_or("");
            // An instance of a module the manifest lacks still gets one, as EVP1 hubs send
            // it, so the device refuses the manifest for the module it lacks.
            let entry_point = entry_points.get(module).cloned();
            spec.insert(
                "entryPoint".into(),
                entry_point.unwrap_or_else(|| json!("main")),
            );
            // A version the caller gave (to have the device restart the instance) is kept.
            spec.entry("version")
                .or_insert_with(|| json!(EVP1_INSTANCE_VERSION));
        }
    }
    Value::String(Value::Object(manifest).to_string())
}

/// The instance → module map of the deployment the hub holds (EVP1's status has no
/// `moduleId`s; the hub knows them from what it deployed).
fn modules_of(deployment: Option<&Value>) -> Map<String, Value> {
    let manifest = match deployment {
        Some(Value::String(text)) => serde_json::from_str(text).unwrap_or(Value::Null),
        Some(other) => other.clone(),
        None => Value::Null,
    };
    manifest
        .get("instanceSpecs")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(name, spec)| Some((name.clone(), spec.get("moduleId")?.clone())))
        .collect()
}

/// A status report from the wire in EVP2's shape: EVP1's `deploymentStatus` string parsed, its
/// instances given the `moduleId` of `deployment` (the attribute the hub holds).
pub fn status_from_wire(
    protocol: Protocol,
    mut report: Map<String, Value>,
    deployment: Option<&Value>,
) -> Map<String, Value> {
    if protocol == Protocol::Evp2 {
        return report;
    }
    if let Some(Value::String(text)) = report.get("deploymentStatus") {
        let mut status: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let modules = modules_of(deployment);
        if let Some(Value::Object(instances)) = status.get_mut("instances") {
            for (name, instance) in instances.iter_mut() {
                if let (Some(fields), Some(module)) = (instance.as_object_mut(), modules.get(name))
                {
                    fields.insert("moduleId".into(), module.clone());
                }
            }
        }
        report.insert("deploymentStatus".into(), status);
    }
    report
}

/// An instance-state report from the wire in EVP2's shape: EVP1's base64 values as text.
pub fn states_from_wire(protocol: Protocol, states: Map<String, Value>) -> Map<String, Value> {
    if protocol == Protocol::Evp2 {
        return states;
    }
    states
        .into_iter()
        .map(|(key, value)| {
            let text = value
                .as_str()
                .and_then(|b| BASE64.decode(b).ok())
                .map(|bytes| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            (key, text.unwrap_or(value))
        })
        .collect()
}

/// A direct command as `protocol` sends it: the request topic's id and the payload. EVP2's
/// topic id is `mqtt_id`; EVP1's is the reqid, and its `params` are JSON (text that is not
/// JSON goes as a JSON string).
pub fn command_to_wire(
    protocol: Protocol,
    mqtt_id: String,
    reqid: u64,
    instance: &str,
    method: &str,
    params: &str,
) -> (String, Value) {
    match protocol {
        Protocol::Evp2 => (
            mqtt_id,
            json!({"method": "evp-c2d", "params": {"direct-command-request": {
                "reqid": reqid.to_string(), "method": method, "instance": instance,
                "params": params}}}),
        ),
        Protocol::Evp1 => {
            let params = serde_json::from_str(params).unwrap_or_else(|_| json!(params));
            let request = json!({"method": DIRECT_COMMAND_METHOD, "params": {
                "moduleInstance": instance, "moduleMethod": method, "params": params}});
            (reqid.to_string(), request)
        }
    }
}

/// The answer to a direct command in EVP2's shape, `{"direct-command-response": {...}}`. EVP1's
/// `{"moduleInstance", "response", "status"}` becomes `status` ok/error, `reqid` (its topic
/// id), `response` as text (a JSON string as its content) and `errorMessage`.
pub fn command_response_from_wire(protocol: Protocol, mqtt_id: &str, payload: Value) -> Value {
    // Anything else on the topic (the hub's own storage-token answers) stays as it is.
    if protocol == Protocol::Evp2 || payload.get("moduleInstance").is_none() {
        return payload;
    }
    let status = payload.get("status").and_then(Value::as_u64).unwrap_or(2);
    let response = payload.get("response").cloned().unwrap_or(Value::Null);
    let text = match &response {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut answer = json!({"status": if status == 0 { "ok" } else { "error" }, "reqid": mqtt_id});
    match status {
        0 => {}
        1 => answer["errorMessage"] = json!(text),
        _ => {
            let why = response.get("error").and_then(Value::as_str);
            answer["errorMessage"] = json!(why.unwrap_or("Unknown error"));
        }
    }
    if status != 1 && !response.is_null() {
        answer["response"] = json!(text);
    }
    json!({ "direct-command-response": answer })
}

/// The device's storage-token request in an RPC request payload, in EVP2's shape (the object
/// under `storagetoken-request`; EVP1's gets its topic id as `reqid`), if it is one.
pub fn token_request_from_wire(
    protocol: Protocol,
    mqtt_id: &str,
    payload: &Value,
) -> Option<Value> {
    match protocol {
        Protocol::Evp2 => payload.get("params")?.get(REQUEST_KEY).cloned(),
        Protocol::Evp1 => {
            if payload.get("method")?.as_str()? != STORAGE_TOKEN_METHOD {
                return None;
            }
            let params = payload.get("params")?;
            let mut request = json!({"reqid": mqtt_id, "filename": params.get("filename"),
                "moduleInstanceId": params.get("moduleInstanceName")});
            if let Some(key) = params.get("storageName") {
                request["key"] = key.clone();
            }
            Some(request)
        }
    }
}

/// A storage-token answer in EVP2's shape (`{"storagetoken-response": {...}}`) as `protocol`
/// sends it: EVP1 answers `{"method": "StorageToken", "params": {...}}`, matched by topic id.
pub fn token_answer_to_wire(protocol: Protocol, answer: Value) -> Value {
    match (protocol, answer) {
        (Protocol::Evp1, Value::Object(mut outer)) => {
            let mut body = outer
                .remove(evp_schemas::evp2::storage::RESPONSE_KEY)
                .unwrap_or_default();
            if let Some(fields) = body.as_object_mut() {
                fields.remove("reqid");
            }
            json!({"method": STORAGE_TOKEN_METHOD, "params": body})
        }
        (_, answer) => answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evp_schemas::DesiredChange;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("an object")
    }

    /// What the device's codec makes of a PATCH the hub side translated.
    fn decoded(protocol: Protocol, patch: Value) -> Vec<DesiredChange> {
        let wire = Value::Object(patch_to_wire(protocol, obj(patch))).to_string();
        protocol.codec().decode_attribute_update(wire.as_bytes())
    }

    #[test]
    fn an_evp2_patch_means_the_same_to_an_evp1_device() {
        let patch = json!({"deployment": {"deploymentId": "d", "instanceSpecs": {"i": {
            "moduleId": "m", "publish": {}, "subscribe": {}}}, "modules": {"m": {
            "moduleImpl": "spawn", "entryPoint": "main", "downloadUrl": "file:///m",
            "hash": "00"}}}, "configuration/i/t": "v\u{1}é"});
        let mut evp1 = decoded(Protocol::Evp1, patch.clone());
        // The one difference: EVP1 instances carry a version, EVP2 ones none.
        for change in &mut evp1 {
            if let DesiredChange::Deployment(d) = change {
                for spec in d.instance_specs.values_mut() {
                    assert_eq!(spec.version, Some(EVP1_INSTANCE_VERSION.into()));
                    spec.version = None;
                }
            }
        }
        assert_eq!(evp1, decoded(Protocol::Evp2, patch));
    }

    #[test]
    fn evp1_reports_come_back_in_evp2_shapes() {
        let deployment =
            Value::String(json!({"instanceSpecs": {"i": {"moduleId": "m"}}}).to_string());
        let report = obj(json!({"deploymentStatus":
            "{\"instances\":{\"i\":{\"status\":\"ok\"}},\"modules\":{}}"}));
        let status = status_from_wire(Protocol::Evp1, report, Some(&deployment));
        assert_eq!(
            status["deploymentStatus"]["instances"]["i"],
            json!({"status": "ok", "moduleId": "m"})
        );
        let states = states_from_wire(Protocol::Evp1, obj(json!({"state/i/t": "aGk="})));
        assert_eq!(states["state/i/t"], "hi");
        let ok = command_response_from_wire(
            Protocol::Evp1,
            "7",
            json!({"moduleInstance": "i", "response": {"a": 1}, "status": 0}),
        );
        assert_eq!(
            ok,
            json!({"direct-command-response": {"status": "ok", "reqid": "7", "response": "{\"a\":1}"}})
        );
        let unknown = command_response_from_wire(
            Protocol::Evp1,
            "8",
            json!({"moduleInstance": "i", "response": "Unknown method", "status": 1}),
        );
        assert_eq!(
            unknown["direct-command-response"],
            json!({"status": "error", "reqid": "8", "errorMessage": "Unknown method"})
        );
        let failed = command_response_from_wire(
            Protocol::Evp1,
            "9",
            json!({"moduleInstance": "", "response": {"error": "no such instance"}, "status": 2}),
        );
        assert_eq!(
            failed["direct-command-response"]["errorMessage"],
            "no such instance"
        );
    }

    #[test]
    fn storage_tokens_round_trip_through_evp1() {
        let request = json!({"method": "StorageToken", "params": {"filename": "f",
            "moduleInstanceName": "i", "storageName": "s"}});
        assert_eq!(
            token_request_from_wire(Protocol::Evp1, "10001", &request),
            Some(json!({"reqid": "10001", "filename": "f", "moduleInstanceId": "i", "key": "s"}))
        );
        let answer = token_answer_to_wire(
            Protocol::Evp1,
            json!({"storagetoken-response": {"reqid": "10001", "status": "ok", "URL": "u"}}),
        );
        let decoded = Protocol::Evp1
            .codec()
            .decode_storage_token_response("10001", answer.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(
            (decoded.reqid.as_str(), decoded.url.as_deref()),
            ("10001", Some("u"))
        );
    }
}
