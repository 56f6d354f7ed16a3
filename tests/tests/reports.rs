//! Nothing the hub or a module hands the device is silently not sent or dropped: big states,
//! big answers, big refusals, many configurations, many commands, telemetry that is not JSON.

use std::collections::BTreeMap;

use evp_devhub::DeviceReport;
use evp_system_tests::system::{
    Options, System, deploy_and_wait, deployment, deployment_of, wait_state,
};
use evp_system_tests::{DEADLINE, both_protocols, wait_for};
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

    let ok = sys
        .hub
        .call("rpc", "echo", r#"{"n":1}"#, 50_000, DEADLINE)
        .await
        .unwrap();
    assert_eq!(ok["status"], "ok", "the other instance is refused: {ok}");
    assert_eq!(ok["response"], r#"{"n":1}"#);
    // The flood itself is refused past the silent instance's share, saying so.
    assert_eq!(last["status"], "error", "{last}");
    let refusal = last["errorMessage"].as_str().unwrap_or_default();
    assert!(refusal.contains("instance silent"), "{last}");
    sys.stop().await;
}

/// The hub's value of the instance state `key`, if it has one.
fn state(sys: &System, key: &str) -> Option<Value> {
    sys.hub.instance_states().get(key).cloned()
}

#[tokio::test(flavor = "multi_thread")]
async fn big_states_are_split_and_what_never_fits_is_refused_at_the_call() {
    let sys = System::start().await.unwrap();
    let d = deployment_of(
        "dep-1",
        &[
            ("big", "evp-test-config-echo"),
            ("small", "evp-test-config-echo"),
        ],
    );
    deploy_and_wait(&sys, &d).await;
    sys.hub.set_configuration("small", "x", "1").await.unwrap();
    wait_state(&sys, "state/small/x", |v| v == "1").await;

    // Each fits one MQTT message; together they do not.
    let a = "a".repeat(70_000);
    let b = "b".repeat(70_000);
    sys.hub.set_configuration("big", "a", &a).await.unwrap();
    sys.hub.set_configuration("big", "b", &b).await.unwrap();
    sys.hub.set_configuration("small", "x", "2").await.unwrap();
    wait_state(&sys, "state/small/x", |v| v == "2").await;
    wait_state(&sys, "state/big/b", |v| v.as_str() == Some(b.as_str())).await;
    assert_eq!(state(&sys, "state/big/a"), Some(Value::String(a)));

    // 25 KB of control characters are 150 KB once escaped: refused at the call, and the
    // others' states keep being reported.
    let control = "\u{1}".repeat(25_000);
    sys.hub
        .set_configuration("big", "ctl", &control)
        .await
        .unwrap();
    wait_state(&sys, "state/big/ctl/refused", |v| v == "EVP_TOOBIG").await;
    sys.hub.set_configuration("small", "x", "3").await.unwrap();
    wait_state(&sys, "state/small/x", |v| v == "3").await;
    assert_eq!(state(&sys, "state/big/ctl"), None);
    sys.stop().await;
}

both_protocols! {
    async fn a_refusal_quoting_a_huge_name_is_reported_shortened(protocol) {
        let sys = System::start_speaking(protocol).await.unwrap();
        let long = "m".repeat(140_000);
        let d = json!({
            "deploymentId": "dep-long",
            "instanceSpecs": {"i": {"moduleId": long, "publish": {}, "subscribe": {}}},
            "modules": {}, "publishTopics": {}, "subscribeTopics": {}
        });
        sys.deploy(&d).await.unwrap();
        let status = sys
            .wait_status(|s| s["deploymentId"] == "dep-long" && s["reconcileStatus"] == "error")
            .await
            .unwrap();
        let message = status["failureMessage"].as_str().unwrap();
        assert!(message.len() < 1024, "{} bytes", message.len());
        assert!(message.contains("refers to module \"mmm"), "{message}");
        assert!(message.contains('…'), "{message}");
        sys.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_whose_answer_cannot_be_sent_gets_an_error_answer() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &deployment_of("dep-1", &[("rpc", "evp-test-rpc-echo")]),
    )
    .await;
    // Echoed back, 25 KB of control characters are 150 KB in the answer's JSON.
    let params = "\u{1}".repeat(25_000);
    let answer = sys
        .hub
        .call("rpc", "echo", &params, 7, DEADLINE)
        .await
        .unwrap();
    assert_eq!(answer["status"], "error", "{answer}");
    assert_eq!(answer["reqid"], "7");
    // As sdk-broker's other refusals: EVP's "Unknown error", the reason in the response.
    let response: Value = serde_json::from_str(answer["response"].as_str().unwrap()).unwrap();
    let message = response["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("does not fit one MQTT message"),
        "{answer}"
    );
    // The instance still answers what fits.
    let ok = sys
        .hub
        .call("rpc", "echo", "{}", 8, DEADLINE)
        .await
        .unwrap();
    assert_eq!(ok["status"], "ok", "{ok}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_thousand_configurations_in_one_patch_all_arrive() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &deployment_of("dep-1", &[("echo", "evp-test-config-echo")]),
    )
    .await;
    const N: usize = 3000;
    let patch: Map<String, Value> = (0..N)
        .map(|i| {
            (
                format!("configuration/echo/k{i:04}"),
                json!(format!("v{i}")),
            )
        })
        .collect();
    sys.hub.patch(patch).await.unwrap();
    // Each is persisted by sdk-broker and echoed by the module: allow for a slow disk.
    let states = wait_for("every configuration echoed", 4 * DEADLINE, async || {
        let states = sys.hub.instance_states();
        let n = (0..N)
            .filter(|i| states.get(&format!("state/echo/k{i:04}")) == Some(&json!(format!("v{i}"))))
            .count();
        (n == N).then_some(n)
    })
    .await;
    let seen = sys.hub.instance_states().len();
    assert!(states.is_ok(), "{} of {N} arrived: {states:?}", seen);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn telemetry_that_is_not_json_is_accepted_and_sent_as_a_string() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &deployment_of("dep-1", &[("raw", "evp-test-telemetry-raw")]),
    )
    .await;
    let mut reports = sys.hub.subscribe();
    let mut seen: BTreeMap<String, Value> = BTreeMap::new();
    for value in ["not json", "still not json"] {
        sys.hub.set_configuration("raw", "k", value).await.unwrap();
        let got = wait_for("the telemetry at the hub", DEADLINE, async || {
            while let Ok(report) = reports.try_recv() {
                if let DeviceReport::Telemetry(v) = report
                    && let Some(k) = v.get("raw/k")
                {
                    seen.insert(k.to_string(), k.clone());
                }
            }
            seen.get(&Value::String(value.into()).to_string()).cloned()
        })
        .await;
        assert_eq!(got.unwrap(), json!(value));
    }
    // What an unchanged EVP module asserts: EVP_OK, then the SENT callback.
    wait_state(&sys, "state/raw/k", |v| v == "EVP_OK SENT").await;
    let log = sys.stack.config().log_dir().join("evp-sdk-broker.log");
    let text = std::fs::read_to_string(log).unwrap();
    let warnings = text.lines().filter(|l| l.contains("is not JSON")).count();
    assert_eq!(warnings, 1, "one warning per instance and key:\n{text}");
    sys.stop().await;
}
