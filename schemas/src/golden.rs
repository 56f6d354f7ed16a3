//! Golden exchanges: for every message kind, what each dialect takes from the wire or puts on
//! it, one case a line. Inputs and expectations are JSON; decoded changes are written in a
//! short canonical form ([`changes`]), so a case reads as "this payload means this".

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::codec::{
    DesiredChange, DirectCommandResponse, HubCodec, RpcStatus, StatusReport, SystemInfo,
    TelemetryEntry, Uname,
};
use crate::evp1::Evp1Codec;
use crate::evp2::Evp2Codec;
use crate::evp2::storage::StorageTokenRequest;
use crate::status::DeploymentStatus;

/// One exchange.
enum Case<'a> {
    /// A PATCH from the hub → the changes it asks for.
    Update(&'a str),
    /// The answer to the initial attribute GET → the changes.
    GetAnswer(&'a str),
    /// A deployment status (canonical JSON) → the status report, of a fixed device.
    Status(&'a str),
    /// States `{"<instance>/<topic>": "<bytes as text>"}` → the instance-state report.
    States(&'a str),
    /// Telemetry entries `[[instance, key, JSON text]]` → the telemetry payload.
    Telemetry(&'a str),
    /// (topic id, RPC request) → the direct command.
    Command(&'a str, &'a str),
    /// (instance, `{reqid, status, response?, errorMessage?}`) → the answer's payload.
    Answer(&'a str, &'a str),
    /// `{reqid, filename, instance, key?}` → the storage-token request's payload.
    TokenRequest(&'a str),
    /// (topic id, RPC response) → the storage-token answer.
    TokenAnswer(&'a str, &'a str),
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON in a case ({e}): {text}"))
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

/// The short form of decoded changes.
fn changes(changes: Vec<DesiredChange>) -> Value {
    let one = |c: DesiredChange| match c {
        DesiredChange::Deployment(d) => json!({ "deployment": serde_json::to_value(d).unwrap() }),
        DesiredChange::RejectedDeployment {
            deployment_id,
            error,
        } => json!({"rejected": deployment_id, "at": error.path}),
        DesiredChange::DeploymentRemoved => json!("removed"),
        DesiredChange::DeviceConfig(c) => {
            json!({ "deviceConfig": serde_json::to_value(c).unwrap() })
        }
        DesiredChange::Configuration {
            instance,
            topic,
            value,
        } => json!({"config": [instance, topic, String::from_utf8_lossy(&value)]}),
        DesiredChange::ConfigurationDeleted { instance, topic } => {
            json!({"deleted": [instance, topic]})
        }
        DesiredChange::Invalid(e) => json!({"invalid": e.path}),
        DesiredChange::NotInDialect(key) => json!({ "notInDialect": key }),
    };
    Value::Array(changes.into_iter().map(one).collect())
}

fn report(status: DeploymentStatus) -> StatusReport {
    StatusReport {
        system_info: SystemInfo {
            os: "Linux".into(),
            arch: "aarch64".into(),
            agent_version: "v1.2.3".into(),
            commit_hash: None,
            device_id: Some("dev-1".into()),
            uname: Uname {
                nodename: "cam".into(),
                release: "6.1.0".into(),
                version: "1 SMP".into(),
            },
        },
        interval_min_s: 3,
        interval_max_s: 180,
        configuration_id: None,
        registries_with_auth: Vec::new(),
        deployment: Some(status),
        losses: Default::default(),
    }
}

fn run(codec: &dyn HubCodec, case: Case<'_>) -> Value {
    let wire = |bytes: Vec<u8>| parse(&String::from_utf8(bytes).expect("UTF-8 payload"));
    match case {
        Case::Update(p) => changes(codec.decode_attribute_update(p.as_bytes())),
        Case::GetAnswer(p) => changes(codec.decode_attribute_response(p.as_bytes())),
        Case::Status(s) => {
            let status = DeploymentStatus::from_json(s).expect("a canonical status");
            codec.encode_status_report(&report(status))
        }
        Case::States(s) => {
            let states: BTreeMap<(String, String), Vec<u8>> = parse(s)
                .as_object()
                .expect("an object")
                .iter()
                .map(|(k, v)| {
                    let (i, t) = k.split_once('/').expect("instance/topic");
                    let bytes = v.as_str().expect("a string").as_bytes().to_vec();
                    ((i.to_owned(), t.to_owned()), bytes)
                })
                .collect();
            codec.encode_instance_states(&states)
        }
        Case::Telemetry(s) => {
            let entries = parse(s);
            let entries: Vec<[&str; 3]> = entries
                .as_array()
                .expect("an array")
                .iter()
                .map(|e| [0, 1, 2].map(|n| e[n].as_str().expect("strings")))
                .collect();
            let entries: Vec<TelemetryEntry<'_>> = entries
                .iter()
                .map(|[instance, key, value]| TelemetryEntry {
                    instance,
                    key,
                    value,
                })
                .collect();
            wire(codec.encode_telemetry(&entries).0)
        }
        Case::Command(mqtt_id, p) => match codec.decode_direct_command(mqtt_id, p.as_bytes()) {
            Ok(Some(c)) => json!({"reqid": c.reqid, "method": c.method, "instance": c.instance,
                "params": c.params}),
            Ok(None) => Value::Null,
            Err(e) => json!({"error": e.error.path, "reqid": e.reqid}),
        },
        Case::Answer(instance, a) => {
            let a = parse(a);
            let answer = DirectCommandResponse {
                reqid: a["reqid"].as_u64().expect("a reqid"),
                status: RpcStatus::from_wire(a["status"].as_u64().unwrap_or(0) as u32),
                error_message: a["errorMessage"].as_str().map(str::to_owned),
                response: a["response"].as_str().map(str::to_owned),
            };
            wire(codec.encode_direct_command_response(instance, &answer))
        }
        Case::TokenRequest(r) => {
            let r = parse(r);
            let (filename, instance, key) = (
                text(&r, "filename"),
                text(&r, "instance"),
                r["key"].as_str(),
            );
            let request = StorageTokenRequest {
                reqid: r["reqid"].as_u64().expect("a reqid") as u32,
                filename: &filename,
                instance: &instance,
                key,
            };
            wire(codec.encode_storage_token_request(&request))
        }
        Case::TokenAnswer(mqtt_id, p) => {
            match codec.decode_storage_token_response(mqtt_id, p.as_bytes()) {
                None => Value::Null,
                Some(Ok(answer)) => serde_json::to_value(answer).unwrap(),
                Some(Err(e)) => json!({"error": e.path}),
            }
        }
    }
}

/// Runs `case` through `codec` and compares the outcome with `expect` (JSON).
fn check(codec: &dyn HubCodec, case: Case<'_>, expect: &str) {
    assert_eq!(run(codec, case), parse(expect), "expected {expect}");
}

const EVP2: &Evp2Codec = &Evp2Codec;
const EVP1: &Evp1Codec = &Evp1Codec;

/// The canonical deployment both dialects' manifests below decode to.
const CANONICAL: &str = r#"[{"deployment": {"deploymentId": "d1", "instanceSpecs": {"i1": {"moduleId": "m1", "publish": {"out": "p"}, "subscribe": {}}}, "modules": {"m1": {"moduleImpl": "wasm", "entryPoint": "main", "downloadUrl": "http://h/m.wasm", "hash": "00ff"}}, "publishTopics": {"p": {"type": "local", "topic": "t"}}, "subscribeTopics": {}}}]"#;

/// [`CANONICAL`] as an EVP1 manifest decodes: the instance keeps its `version`.
fn canonical_evp1(version: u64) -> String {
    CANONICAL.replace(
        r#""subscribe": {}}}"#,
        &format!(r#""subscribe": {{}}, "version": {version}}}}}"#),
    )
}

#[test]
#[rustfmt::skip]
fn attribute_updates() {
    check(EVP2, Case::Update(r#"{"deployment": {"deploymentId": "d1", "instanceSpecs": {"i1": {"moduleId": "m1", "publish": {"out": "p"}, "subscribe": {}}}, "modules": {"m1": {"moduleImpl": "wasm", "entryPoint": "main", "downloadUrl": "http://h/m.wasm", "hash": "00FF"}}, "publishTopics": {"p": {"type": "local", "topic": "t"}}}}"#), CANONICAL);
    check(EVP1, Case::Update(r#"{"deployment": "{\"deploymentId\": \"d1\", \"instanceSpecs\": {\"i1\": {\"moduleId\": \"m1\", \"entryPoint\": \"main\", \"version\": 1, \"publish\": {\"out\": \"p\"}, \"subscribe\": {}}}, \"modules\": {\"m1\": {\"moduleImpl\": \"wasm\", \"downloadUrl\": \"http://h/m.wasm\", \"hash\": \"00ff\"}}, \"publishTopics\": {\"p\": {\"type\": \"local\", \"topic\": \"t\"}}}"}"#), &canonical_evp1(1));
    check(EVP1, Case::Update(r#"{"deployment": "{\"deploymentId\": \"d1\", \"instanceSpecs\": {\"i1\": {\"moduleId\": \"m1\", \"entryPoint\": \"main\", \"version\": 3, \"publish\": {\"out\": \"p\"}, \"subscribe\": {}}}, \"modules\": {\"m1\": {\"downloadUrl\": \"http://h/m.wasm\", \"hash\": \"00ff\"}}, \"publishTopics\": {\"p\": {\"type\": \"local\", \"topic\": \"t\"}}}"}"#), &canonical_evp1(3));
    check(EVP2, Case::Update(r#"{"deployment": null}"#), r#"["removed"]"#);
    check(EVP1, Case::Update(r#"{"deployment": null}"#), r#"["removed"]"#);
    check(EVP2, Case::Update(r#"{"deployment": "{}"}"#), r#"[{"rejected": null, "at": "deployment"}]"#);
    check(EVP1, Case::Update(r#"{"deployment": {"instanceSpecs": {}, "modules": {}}}"#), r#"[{"rejected": null, "at": "deployment"}]"#);
    check(EVP1, Case::Update(r#"{"deployment": "{\"deploymentId\": \"d2\", \"instanceSpecs\": {\"i\": {\"moduleId\": \"m\", \"entryPoint\": \"main\", \"publish\": {}, \"subscribe\": {}}}, \"modules\": {\"m\": {}}}"}"#), r#"[{"rejected": "d2", "at": "deployment.instanceSpecs.i.version"}]"#);
    check(EVP1, Case::Update(r#"{"deployment": "{\"instanceSpecs\": {\"i\": {\"moduleId\": \"m\", \"version\": 1, \"publish\": {}, \"subscribe\": {}}}, \"modules\": {\"m\": {}}}"}"#), r#"[{"rejected": null, "at": "deployment.instanceSpecs.i.entryPoint"}]"#);
    check(EVP1, Case::Update(r#"{"deployment": "{\"instanceSpecs\": {\"a\": {\"moduleId\": \"m\", \"entryPoint\": \"x\", \"version\": 1, \"publish\": {}, \"subscribe\": {}}, \"b\": {\"moduleId\": \"m\", \"entryPoint\": \"y\", \"version\": 1, \"publish\": {}, \"subscribe\": {}}}, \"modules\": {\"m\": {}}}"}"#), r#"[{"rejected": null, "at": "deployment.instanceSpecs.b.entryPoint"}]"#);
    check(EVP2, Case::Update(r#"{"configuration/i1/a/b": "hi"}"#), r#"[{"config": ["i1", "a/b", "hi"]}]"#);
    check(EVP1, Case::Update(r#"{"configuration/i1/a/b": "aGk="}"#), r#"[{"config": ["i1", "a/b", "hi"]}]"#);
    check(EVP1, Case::Update(r#"{"configuration/i1/a": "not base64!", "configuration/i1/b": "aGk="}"#), r#"[{"invalid": "configuration/i1/a"}, {"config": ["i1", "b", "hi"]}]"#);
    check(EVP2, Case::Update(r#"{"deleted": ["configuration/i1/t"]}"#), r#"[{"deleted": ["i1", "t"]}]"#);
    check(EVP1, Case::Update(r#"{"deleted": ["configuration/i1/t"]}"#), r#"[{"deleted": ["i1", "t"]}]"#);
    check(EVP2, Case::Update(r#"{"desiredDeviceConfig": {"desiredDeviceConfig": {"configuration/$agent/report-status-interval-min": 2, "configuration/$agent/report-status-interval-max": null, "configuration/$agent/configuration-id": null, "configuration/$agent/registry-auth": null}}}"#), r#"[{"deviceConfig": {"reportStatusIntervalMin": 2, "reportStatusIntervalMax": null, "configurationId": null, "registryAuth": null}}]"#);
    check(EVP1, Case::Update(r#"{"desiredDeviceConfig": {"desiredDeviceConfig": {}}}"#), r#"[{"notInDialect": "desiredDeviceConfig"}]"#);
    check(EVP1, Case::Update(r#"{"systemInfo": {"protocolVersion": "EVP1"}, "deploymentStatus": "{}"}"#), "[]");
}

#[test]
#[rustfmt::skip]
fn attribute_responses() {
    check(EVP2, Case::GetAnswer(r#"{"shared": {"configuration/i1/t": "v"}, "client": {}}"#), r#"[{"config": ["i1", "t", "v"]}]"#);
    check(EVP1, Case::GetAnswer(r#"{"shared": {"configuration/i1/t": "dg=="}, "client": {}}"#), r#"[{"config": ["i1", "t", "v"]}]"#);
    check(EVP2, Case::GetAnswer("{}"), "[]");
    check(EVP1, Case::GetAnswer("{}"), "[]");
}

#[test]
#[rustfmt::skip]
fn status_reports() {
    let status = r#"{"deploymentId": "d1", "reconcileStatus": "ok", "instances": {"i1": {"status": "error", "moduleId": "m1", "failureMessage": "boom"}}, "modules": {"m1": {"status": "ok"}}}"#;
    check(EVP2, Case::Status(status), r#"{"systemInfo": {"os": "Linux", "arch": "aarch64", "evp_agent": "v1.2.3", "protocolVersion": "EVP2-TB", "deviceId": "dev-1"}, "state/$agent/report-status-interval-min": 3, "state/$agent/report-status-interval-max": 180, "deploymentStatus": {"deploymentId": "d1", "reconcileStatus": "ok", "instances": {"i1": {"status": "error", "moduleId": "m1", "failureMessage": "boom"}}, "modules": {"m1": {"status": "ok"}}}}"#);
    check(EVP1, Case::Status(status), r#"{"systemInfo": {"utsname": {"sysname": "Linux", "nodename": "cam", "release": "6.1.0", "version": "1 SMP", "machine": "aarch64"}, "protocolVersion": "EVP1"}, "deploymentStatus": "{\"deploymentId\":\"d1\",\"instances\":{\"i1\":{\"failureMessage\":\"boom\",\"status\":\"error\"}},\"modules\":{\"m1\":{\"status\":\"ok\"}},\"reconcileStatus\":\"ok\"}"}"#);
}

#[test]
#[rustfmt::skip]
fn instance_states() {
    check(EVP2, Case::States(r#"{"i1/t": "g_step = 1000", "i1/u": "x"}"#), r#"{"state/i1/t": "g_step = 1000", "state/i1/u": "x"}"#);
    check(EVP1, Case::States(r#"{"i1/t": "g_step = 1000", "i1/u": "x"}"#), r#"{"state/i1/t": "Z19zdGVwID0gMTAwMA==", "state/i1/u": "eA=="}"#);
}

#[test]
#[rustfmt::skip]
fn telemetry() {
    for codec in [EVP2 as &dyn HubCodec, EVP1] {
        check(codec, Case::Telemetry(r#"[["s1", "room", "{\"t\": 25}"], ["s1", "n", "17"]]"#), r#"{"s1/room": {"t": 25}, "s1/n": 17}"#);
    }
}

#[test]
#[rustfmt::skip]
fn direct_command_requests() {
    check(EVP2, Case::Command("7", r#"{"method": "evp-c2d", "params": {"direct-command-request": {"reqid": "10042", "method": "echo", "instance": "i1", "params": "{\"a\":1}"}}}"#), r#"{"reqid": 10042, "method": "echo", "instance": "i1", "params": "{\"a\":1}"}"#);
    check(EVP1, Case::Command("10042", r#"{"method": "ModuleMethodCall", "params": {"moduleInstance": "i1", "moduleMethod": "echo", "params": {"a": 1}}}"#), r#"{"reqid": 10042, "method": "echo", "instance": "i1", "params": "{\n    \"a\": 1\n}"}"#);
    check(EVP1, Case::Command("5", r#"{"method": "ModuleMethodCall", "params": {"moduleInstance": "i1", "moduleMethod": "echo", "params": "hi"}}"#), r#"{"reqid": 5, "method": "echo", "instance": "i1", "params": "\"hi\""}"#);
    check(EVP1, Case::Command("abc", r#"{"method": "ModuleMethodCall", "params": {}}"#), r#"{"error": "rpc request topic", "reqid": null}"#);
    check(EVP1, Case::Command("9", r#"{"method": "ModuleMethodCall", "params": {"moduleInstance": "i1", "params": {}}}"#), r#"{"error": "params.moduleMethod", "reqid": 9}"#);
    check(EVP1, Case::Command("9", r#"{"method": "Reboot", "params": {}}"#), r#"{"error": "method", "reqid": 9}"#);
    check(EVP2, Case::Command("3", r#"{"method": "evp-d2c", "params": {"storagetoken-request": {"reqid": "10001", "filename": "f", "moduleInstanceId": "i1"}}}"#), "null");
    check(EVP1, Case::Command("10001", r#"{"method": "StorageToken", "params": {"filename": "f", "moduleInstanceName": "i1"}}"#), "null");
}

#[test]
#[rustfmt::skip]
fn direct_command_responses() {
    check(EVP2, Case::Answer("i1", r#"{"reqid": 10042, "status": 0, "response": "{\"a\":1}"}"#), r#"{"direct-command-response": {"status": "ok", "reqid": "10042", "response": "{\"a\":1}"}}"#);
    check(EVP1, Case::Answer("i1", r#"{"reqid": 10042, "status": 0, "response": "{\"a\":1}"}"#), r#"{"moduleInstance": "i1", "response": {"a": 1}, "status": 0}"#);
    check(EVP2, Case::Answer("i1", r#"{"reqid": 1, "status": 1}"#), r#"{"direct-command-response": {"status": "error", "errorMessage": "Unknown method", "reqid": "1"}}"#);
    check(EVP1, Case::Answer("i1", r#"{"reqid": 1, "status": 1}"#), r#"{"moduleInstance": "i1", "response": "Unknown method", "status": 1}"#);
    check(EVP2, Case::Answer("", r#"{"reqid": 2, "status": 2, "errorMessage": "sdk-broker is not running", "response": "{\"error\":\"sdk-broker is not running\"}"}"#), r#"{"direct-command-response": {"status": "error", "errorMessage": "sdk-broker is not running", "reqid": "2", "response": "{\"error\":\"sdk-broker is not running\"}"}}"#);
    check(EVP1, Case::Answer("", r#"{"reqid": 2, "status": 2, "errorMessage": "sdk-broker is not running", "response": "{\"error\":\"sdk-broker is not running\"}"}"#), r#"{"moduleInstance": "", "response": {"error": "sdk-broker is not running"}, "status": 2}"#);
    check(EVP1, Case::Answer("i1", r#"{"reqid": 3, "status": 0, "response": "plain text"}"#), r#"{"moduleInstance": "i1", "response": "plain text", "status": 0}"#);
}

#[test]
#[rustfmt::skip]
fn storage_token_requests() {
    check(EVP2, Case::TokenRequest(r#"{"reqid": 10077, "filename": "a/b.jpg", "instance": "up-1", "key": "s"}"#), r#"{"method": "evp-d2c", "params": {"storagetoken-request": {"reqid": "10077", "filename": "a/b.jpg", "moduleInstanceId": "up-1", "key": "s"}}}"#);
    check(EVP1, Case::TokenRequest(r#"{"reqid": 10077, "filename": "a/b.jpg", "instance": "up-1", "key": "s"}"#), r#"{"method": "StorageToken", "params": {"filename": "a/b.jpg", "moduleInstanceName": "up-1", "storageName": "s"}}"#);
    check(EVP1, Case::TokenRequest(r#"{"reqid": 10078, "filename": "f", "instance": "up-1"}"#), r#"{"method": "StorageToken", "params": {"filename": "f", "moduleInstanceName": "up-1"}}"#);
}

#[test]
#[rustfmt::skip]
fn storage_token_responses() {
    check(EVP2, Case::TokenAnswer("1", r#"{"storagetoken-response": {"reqid": "10077", "status": "ok", "URL": "https://h/f?sig=1", "headers": {"x-ms-blob-type": "BlockBlob"}}}"#), r#"{"reqid": "10077", "status": "ok", "URL": "https://h/f?sig=1", "headers": {"x-ms-blob-type": "BlockBlob"}, "responseType": "singlefile"}"#);
    check(EVP1, Case::TokenAnswer("10077", r#"{"method": "StorageToken", "params": {"URL": "https://h/f?sig=1", "headers": {"x-ms-blob-type": "BlockBlob"}, "responseType": "multifile", "expiresAtMillis": "5"}}"#), r#"{"reqid": "10077", "URL": "https://h/f?sig=1", "headers": {"x-ms-blob-type": "BlockBlob"}, "responseType": "multifile", "expiresAtMillis": "5"}"#);
    check(EVP1, Case::TokenAnswer("10078", r#"{"error": "Tenant has no token provider"}"#), r#"{"reqid": "10078", "errorMessage": "Tenant has no token provider", "responseType": "singlefile"}"#);
    check(EVP1, Case::TokenAnswer("10079", r#"{"method": "StorageToken", "params": {"responseType": "many"}}"#), r#"{"error": "params"}"#);
    check(EVP2, Case::TokenAnswer("1", r#"{"direct-command-response": {"reqid": "1", "status": "ok"}}"#), "null");
    check(EVP1, Case::TokenAnswer("1", r#"{"moduleInstance": "i1", "response": {}, "status": 0}"#), "null");
}
