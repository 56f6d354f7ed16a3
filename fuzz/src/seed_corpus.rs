//! Writes the seed corpora, `fuzz/corpus/<target>/<name>`, from the payloads the tests send:
//! the hub's JSON as the devhub and the system tests shape it (the documented example, the
//! hostile inputs of tests/tests/hostile_input.rs, device configuration, storage tokens) and
//! the SDK's records made of the payloads schemas' round-trip tests saved in
//! `fuzz/corpus/sdk_request/`. Run from the repository root after those tests (fuzz/README.md).

use std::path::Path;

use evp_schemas::sdk::{Header, MAX_PAYLOAD, encode_frame};
use serde_json::{Value, json};

const HASH: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn main() -> std::io::Result<()> {
    let root = Path::new("fuzz/corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)
    };
    for (name, v) in attributes() {
        write("evp2_attributes", name, v.to_string().as_bytes())?;
    }
    write("evp2_attributes", "not-json", b"{\"deployment\": ")?;
    for (name, v) in direct_commands() {
        write("evp2_direct_command", name, v.to_string().as_bytes())?;
    }
    for (name, v) in storage_tokens() {
        write("evp2_storage_token", name, v.to_string().as_bytes())?;
    }
    // The same targets decode EVP1 too (docs/hub-protocol.md §18).
    for (target, name, v) in evp1() {
        write(target, name, v.to_string().as_bytes())?;
    }
    for (name, v) in canonical_deployments() {
        write("deployment_json", name, v.to_string().as_bytes())?;
    }
    // The SDK payloads come from schemas' round-trip tests (fuzz/README.md); each is also a
    // record on the socket, and a stream of two.
    let mut payloads = Vec::new();
    for entry in std::fs::read_dir(root.join("sdk_request"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        payloads.push((name, std::fs::read(&path)?));
    }
    payloads.sort();
    for (i, (name, payload)) in payloads.iter().enumerate() {
        let frame = encode_frame(1000 + i as u64, payload).expect("a small payload");
        write("sdk_frame", name, &frame)?;
    }
    if let [(_, first), (_, second), ..] = payloads.as_slice() {
        let two = [encode_frame(1000, first), encode_frame(1001, second)];
        let two: Vec<u8> = two.into_iter().flatten().flatten().collect();
        write("sdk_frame", "two-records", &two)?;
    }
    // The headers EVP refuses.
    write("sdk_frame", "zero-size", &Header::new(0, 1).to_bytes())?;
    let reserved = Header {
        size: 8,
        zero: 1,
        xid: 2,
    };
    write("sdk_frame", "non-zero-reserved", &reserved.to_bytes())?;
    let big = Header::new(MAX_PAYLOAD as u32 + 1, 3);
    write("sdk_frame", "too-big", &big.to_bytes())?;
    for (name, text) in agent_tomls() {
        write("agent_toml", name, text.as_bytes())?;
    }
    for (i, v) in [
        "bytes 100-199/200",
        "bytes 0-0/*",
        "bytes 5-9/ 10 ",
        " bytes 18446744073709551615-0/1",
        "bytes -5/10",
        "items 0-1/2",
    ]
    .iter()
    .enumerate()
    {
        write("download_headers", &format!("{i:02}"), v.as_bytes())?;
    }
    for (i, v) in [
        "/var/lib/evp/instances/inst-1/default_workspace/frame.bin\nX-A: 1\nB: two",
        "/evp/default_workspace/cam1/0001.jpg\nx-ms-blob-type: BlockBlob",
        "frame.bin",
        "./a/./b.txt\nAuthorization: Bearer x",
        "../../etc/passwd",
        "/etc/passwd\nno colon",
        "/var/lib/evp/instances/inst-1/default_workspace\n: empty name",
        "f\nX-Bad\u{1}: v\nOk: \u{e9}",
    ]
    .iter()
    .enumerate()
    {
        write("blob_request", &format!("{i:02}"), v.as_bytes())?;
    }
    Ok(())
}

/// The EVP2 manifest of schemas' documented example (docs/hub-protocol.md), its hash in
/// upper case as the hub may send it.
fn example_deployment() -> Value {
    let text = r#"{"deploymentId": "dep-0001",
        "instanceSpecs": {"sender-1": {"moduleId": "mod-msg", "publish": {"out": "pub-salute"},
        "subscribe": {}}, "receiver-1": {"moduleId": "mod-msg", "publish": {}, "subscribe":
        {"in": "sub-salute"}}}, "modules": {"mod-msg": {"moduleImpl": "wasm", "entryPoint":
        "main", "downloadUrl": "https://example.invalid/modules/messaging.wasm", "hash": "HASH"}},
        "publishTopics": {"pub-salute": {"type": "local", "topic": "salute"}},
        "subscribeTopics": {"sub-salute": {"type": "local", "topic": "salute"}}}"#;
    let text = text.replace("\"HASH\"", &format!("{:?}", HASH.to_ascii_uppercase()));
    serde_json::from_str(&text).expect("the example is JSON")
}

/// tests/src/system.rs `deployment`: spawn modules from the test's file server.
fn spawn_deployment(id: &str) -> Value {
    json!({
        "deploymentId": id,
        "instanceSpecs": {"i": {"moduleId": "a", "publish": {}, "subscribe": {}}},
        "modules": {"a": {"moduleImpl": "spawn", "entryPoint": "main",
            "downloadUrl": "http://127.0.0.1:8000/a", "hash": HASH}},
        "publishTopics": {}, "subscribeTopics": {}
    })
}

fn docker_deployment() -> Value {
    json!({
        "deploymentId": "dep-docker",
        "instanceSpecs": {"web": {"moduleId": "img", "publish": {}, "subscribe": {},
            "restartPolicy": "always",
            "container": {"network": "bridge", "memoryBytes": 67108864, "nanoCpus": 500000000,
                "capAdd": ["NET_BIND_SERVICE"]}}},
        "modules": {"img": {"moduleImpl": "docker", "entryPoint": "main",
            "downloadUrl": "docker.io/library/busybox:1.36"}},
    })
}

fn attributes() -> Vec<(&'static str, Value)> {
    let mut nul_entry = spawn_deployment("dep-nul-entry");
    nul_entry["modules"]["a"]["entryPoint"] = json!("ma\0in");
    let mut nul_module = spawn_deployment("dep-nul-module");
    nul_module["instanceSpecs"]["i"]["moduleId"] = json!("a\0b");
    nul_module["modules"] = json!({"a\0b": nul_module["modules"]["a"].clone()});
    let device_config = json!({
        "configuration/$agent/report-status-interval-min": 1,
        "configuration/$agent/report-status-interval-max": 4,
        "configuration/$agent/configuration-id": "cfg-42",
        "configuration/$agent/registry-auth": { "ghcr.io": "c2VjcmV0LXRva2Vu" }
    });
    vec![
        ("example", json!({ "deployment": example_deployment() })),
        ("spawn", json!({ "deployment": spawn_deployment("dep-1") })),
        ("docker", json!({ "deployment": docker_deployment() })),
        ("nul-entry-point", json!({ "deployment": nul_entry })),
        ("nul-module-id", json!({ "deployment": nul_module })),
        ("removed", json!({ "deployment": null })),
        (
            "configuration",
            json!({ "configuration/echo/t": "v", "configuration/echo/a/b": "{}" }),
        ),
        (
            "configuration-nul",
            json!({ "configuration/in\0st/topic": "v", "configuration/inst/to\0pic": "v" }),
        ),
        (
            "configuration-not-string",
            json!({ "configuration/echo/t": 7, "configuration/echo/u": "v" }),
        ),
        (
            "deleted",
            json!({ "deleted": ["configuration/a/t1", "configuration/x/y", 7] }),
        ),
        (
            "device-config",
            json!({ "desiredDeviceConfig": { "desiredDeviceConfig": device_config } }),
        ),
        (
            "device-config-null",
            json!({ "desiredDeviceConfig": { "desiredDeviceConfig": {
            "configuration/$agent/report-status-interval-min": null,
            "configuration/$agent/report-status-interval-max": -1,
            "configuration/$agent/configuration-id": null,
            "configuration/$agent/registry-auth": null } } }),
        ),
        (
            "response",
            json!({ "shared": { "deployment": spawn_deployment("dep-2"),
            "configuration/i/t": "x" } }),
        ),
        ("response-empty", json!({ "shared": null })),
        (
            "echoed-report",
            json!({ "systemInfo": {"os": "Linux"}, "deploymentStatus": {} }),
        ),
        ("array", json!([1, 2])),
    ]
}

fn direct_commands() -> Vec<(&'static str, Value)> {
    let call = |reqid: &str, instance: &str, method: &str, params: &str| {
        json!({"method": "evp-c2d", "params": {"direct-command-request": {
            "reqid": reqid, "method": method, "instance": instance, "params": params}}})
    };
    vec![
        ("echo", call("1", "inst", "echo", "{}")),
        (
            "agent",
            call(
                "18446744073709551615",
                "$agent",
                "$agent/reboot",
                "{\"a\":[1]}",
            ),
        ),
        ("nul-method", call("2", "inst", "me\0thod", "{}")),
        ("nul-instance", call("3", "in\0st", "echo", "{}")),
        ("nul-params", call("4", "inst", "echo", "{\"a\":\"\0\"}")),
        (
            "reqid-number",
            json!({"params": {"direct-command-request": {"reqid": 5,
            "method": "m", "instance": "i", "params": "{}"}}}),
        ),
        ("reqid-bad", call("-1", "inst", "echo", "{}")),
        (
            "storage-echo",
            json!({"method": "evp-d2c", "params": {"storagetoken-request": {
            "reqid": "10001", "filename": "f", "moduleInstanceId": "i"}}}),
        ),
        ("no-params", json!({"method": "x"})),
    ]
}

fn storage_tokens() -> Vec<(&'static str, Value)> {
    let answer = |v: Value| json!({ "storagetoken-response": v });
    vec![
        (
            "single",
            answer(json!({"reqid": "10001", "status": "ok",
            "URL": "https://acct.blob.core.windows.net/c/images%2Fcam1%2F0001.jpg?sv=1&sig=x",
            "headers": {"x-ms-blob-type": "BlockBlob"}, "expiresAtMillis": "1700000000000"})),
        ),
        (
            "multi",
            answer(
                json!({"reqid": "10002", "status": "ok", "responseType": "multifile",
            "URL": "https://acct.blob.core.windows.net/c?sv=1&sig=x"}),
            ),
        ),
        (
            "refused",
            answer(json!({"reqid": "10003", "status": "error", "errorMessage": "quota exceeded"})),
        ),
        ("no-url", answer(json!({"reqid": "10004", "status": "ok"}))),
        ("reqid-number", answer(json!({"reqid": 5}))),
        (
            "bad-type",
            answer(json!({"reqid": "6", "URL": "u", "responseType": "many"})),
        ),
        (
            "command-echo",
            json!({"direct-command-response": {"reqid": "1", "status": "ok"}}),
        ),
    ]
}

/// The canonical form reconcilerd reads: EVP2's manifest is its form too, but for EVP's
/// markers, and the one tests/tests/hostile_input.rs persists with a NUL.
/// EVP1's payloads: a manifest as a string with per-instance entry points and versions, a
/// base64 configuration, a `ModuleMethodCall`, `StorageToken` answers.
fn evp1() -> Vec<(&'static str, &'static str, Value)> {
    let manifest = json!({"deploymentId": "dep-evp1",
        "instanceSpecs": {"i": {"moduleId": "m", "entryPoint": "main", "version": 1,
            "publish": {}, "subscribe": {}}},
        "modules": {"m": {"downloadUrl": "https://example.invalid/m.wasm", "hash": HASH}}});
    vec![
        (
            "evp2_attributes",
            "evp1-deployment",
            json!({"deployment": manifest.to_string(),
            "configuration/i/t": "aGVsbG8="}),
        ),
        (
            "evp2_attributes",
            "evp1-get-answer",
            json!({"shared": {"deployment": manifest.to_string()}}),
        ),
        (
            "evp2_direct_command",
            "evp1-call",
            json!({"method": "ModuleMethodCall", "params": {
            "moduleInstance": "i", "moduleMethod": "echo", "params": {"text": "hi", "n": [1, 2.5]}}}),
        ),
        (
            "evp2_storage_token",
            "evp1-answer",
            json!({"method": "StorageToken", "params": {
            "URL": "https://h/c?sig=1", "headers": {"x-ms-blob-type": "BlockBlob"},
            "responseType": "multifile", "expiresAtMillis": "1700000000000"}}),
        ),
        (
            "evp2_storage_token",
            "evp1-refusal",
            json!({"error": "Tenant has no token provider"}),
        ),
    ]
}

fn canonical_deployments() -> Vec<(&'static str, Value)> {
    let mut example = example_deployment();
    example["modules"]["mod-msg"]["hash"] = json!(HASH);
    vec![
        ("example", example),
        ("spawn", spawn_deployment("dep-1")),
        ("docker", docker_deployment()),
        ("empty", json!({"instanceSpecs": {}, "modules": {}})),
        (
            "persisted-nul",
            json!({
                "deploymentId": "dep-old",
                "instanceSpecs": {"i": {"moduleId": "m\0x", "publish": {}, "subscribe": {}}},
                "modules": {"m\0x": {"moduleImpl": "spawn", "entryPoint": "main",
                    "downloadUrl": "file:///opt/evp/modules/evp-test-config-echo", "hash": HASH}},
                "publishTopics": {}, "subscribeTopics": {}
            }),
        ),
        (
            "unknown-field",
            json!({"instanceSpecs": {}, "modules": {}, "extra": 1}),
        ),
    ]
}

fn agent_tomls() -> Vec<(&'static str, String)> {
    use evp_daemon::conffile::{PACKAGED, uncommented};
    vec![
        ("packaged", PACKAGED.to_owned()),
        ("packaged-uncommented", uncommented(PACKAGED)),
        ("hub", "data_dir = \"/d\"\n[hub]\nmqtt_port = 1883\n".into()),
        ("typo", "data_dri = \"/d\"\n".into()),
        (
            "broker",
            "[sdk_broker]\nstate_bytes = 65536\nevent_queue_bytes = 1048576\n".into(),
        ),
        (
            "reconciler",
            "[reconciler]\nstop_grace_ms = 10000\nmax_concurrent_downloads = 4\n".into(),
        ),
        (
            "nul",
            "run_dir = \"/r\\u0000x\"\n[wasm]\nmemory = 1\n".into(),
        ),
    ]
}
