//! Nothing the hub or a module hands the device is silently not sent or dropped: big states,
//! big answers, big refusals, many configurations, many commands, telemetry that is not JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use evp_devhub::DeviceReport;
use evp_system_tests::system::{
    Options, System, deploy_and_wait, deployment, deployment_of, wait_state,
};
use evp_system_tests::{DEADLINE, wait_for};
use serde_json::{Map, Value, json};

/// A direct command as an EVP2 hub sends it, on MQTT request `mqtt_id`.
async fn send_command(sys: &System, mqtt_id: &str, instance: &str, reqid: u64, params: &str) {
    let request = json!({
        "method": "evp-c2d",
        "params": { "direct-command-request": {
            "reqid": reqid.to_string(), "method": "echo", "instance": instance, "params": params,
        }}
    });
    sys.hub
        .publish_raw(
            &format!("v1/devices/me/rpc/request/{mqtt_id}"),
            request.to_string().into_bytes(),
        )
        .await
        .unwrap();
}

/// Waits for the answer on MQTT request `mqtt_id` among `reports`.
async fn answer_on(
    reports: &mut tokio::sync::broadcast::Receiver<DeviceReport>,
    mqtt_id: &str,
) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, reports.recv()).await {
            Ok(Ok(DeviceReport::CommandResponse {
                mqtt_id: id,
                payload,
            })) if id == mqtt_id => return payload["direct-command-response"].clone(),
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            other => panic!("no answer on request {mqtt_id}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_instance_does_not_block_commands_to_the_others() {
    // The broker's own timeout must not answer the flood before the test is done with it.
    let sys = System::start_with(Options {
        extra_toml: "[sdk_broker]\nrpc_timeout_ms = 120000\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // `silent` never connects to its socket: commands to it wait until they expire.
    let (url, hash) = sys.module("silent", "exec /bin/sleep 300").unwrap();
    let mut d = deployment_of("dep-1", &[("rpc", "evp-test-rpc-echo")]);
    let silent = deployment("x", &[("silent", "silent")], &[("silent", &url, &hash)]);
    d["instanceSpecs"]["silent"] = silent["instanceSpecs"]["silent"].clone();
    d["modules"]["silent"] = silent["modules"]["silent"].clone();
    deploy_and_wait(&sys, &d).await;

    // More than the whole device-wide bound, all to the instance that never answers.
    const FLOOD: u64 = 1100;
    let mut reports = sys.hub.subscribe();
    for i in 0..FLOOD {
        send_command(&sys, &format!("{}", 900_000 + i), "silent", i, "{}").await;
    }
    let last = answer_on(&mut reports, &format!("{}", 900_000 + FLOOD - 1)).await;
    assert_eq!(last["status"], "error", "{last}");
    let refusal = last["errorMessage"].as_str().unwrap_or_default();
    assert!(refusal.contains("instance silent"), "{last}");

    let ok = sys
        .hub
        .call("rpc", "echo", r#"{"n":1}"#, 50_000, DEADLINE)
        .await
        .unwrap();
    assert_eq!(ok["status"], "ok", "the other instance is refused: {ok}");
    assert_eq!(ok["response"], r#"{"n":1}"#);
    sys.stop().await;
}
