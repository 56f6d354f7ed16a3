//! The remote SDK end to end: modules built with evp-sdk, spawned by the agent, talking to
//! sdk-broker over their sockets, driven from the hub's side through mosquitto and hubd.

use std::time::Duration;

use evp_system_tests::both_protocols;
use evp_system_tests::system::{
    Options, System, configuration_comes_back_as_state_and_telemetry, deploy_and_wait,
    deployment_of, echo_round_trip, exchange_a_thousand_messages, instance_status, wait_state,
};
use serde_json::Value;

both_protocols! {
    async fn configuration_comes_back_as_state_and_as_telemetry(protocol) {
        let sys = System::start_speaking(protocol).await.unwrap();
        deploy_and_wait(
            &sys,
            &deployment_of(
                "dep-1",
                &[
                    ("echo", "evp-test-config-echo"),
                    ("tele", "evp-test-config-telemetry"),
                ],
            ),
        )
        .await;
        configuration_comes_back_as_state_and_telemetry(&sys).await;
        sys.stop().await;
    }
}

both_protocols! {
    async fn direct_commands_are_answered_on_the_right_request(protocol) {
        let sys = System::start_speaking(protocol).await.unwrap();
        deploy_and_wait(
            &sys,
            &deployment_of("dep-1", &[("rpc", "evp-test-rpc-echo")]),
        )
        .await;
        let wait = Duration::from_secs(20);
        let ok = sys
            .hub
            .call("rpc", "echo", r#"{"text":"hi"}"#, 10042, wait)
            .await
            .unwrap();
        assert_eq!(ok["status"], "ok", "{ok}");
        assert_eq!(ok["reqid"], "10042");
        assert_eq!(ok["response"], r#"{"text":"hi"}"#);
        let unknown = sys
            .hub
            .call("rpc", "nope", "{}", 10043, wait)
            .await
            .unwrap();
        assert_eq!(unknown["status"], "error", "{unknown}");
        assert_eq!(unknown["errorMessage"], "Unknown method");
        let absent = sys
            .hub
            .call("ghost", "echo", "{}", 10044, wait)
            .await
            .unwrap();
        assert_eq!(absent["status"], "error", "{absent}");
        assert_eq!(absent["reqid"], "10044");
        sys.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_messages_reach_the_subscriber_by_its_alias() {
    let sys = System::start().await.unwrap();
    let d = deployment_of(
        "dep-1",
        &[
            ("tx", "evp-test-msg-sender"),
            ("rx", "evp-test-msg-receiver"),
        ],
    );
    exchange_a_thousand_messages(&sys, d).await;
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn undeploy_runs_the_exit_protocol_and_modules_exit_by_themselves() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &deployment_of("dep-1", &[("echo", "evp-test-config-echo")]),
    )
    .await;
    sys.hub.set_configuration("echo", "t", "v").await.unwrap();
    wait_state(&sys, "state/echo/t", |v| v == "v").await;
    let pids = sys.instance_pids("echo");
    assert_eq!(pids.len(), 1);
    sys.deploy(&deployment_of("dep-empty", &[])).await.unwrap();
    sys.wait_status(|s| s["deploymentId"] == "dep-empty" && s["reconcileStatus"] == "ok")
        .await
        .unwrap();
    evp_system_tests::system::wait_gone(&pids).await.unwrap();
    // The runtime logs how the process ended: by itself with status 0, not by a signal.
    let log = sys
        .stack
        .config()
        .log_dir()
        .join("evp-runtimed-container.log");
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .rfind(|l| l.contains("echo") && l.contains("exit"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        !line.contains("SIG"),
        "the module did not exit by itself: {line}"
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_telemetry_flood_gets_back_pressure_and_the_broker_stays_small() {
    // Small queues, so back-pressure comes early and the bound is easy to see.
    let sys = System::start_with(Options {
        extra_toml: "[sdk_broker]\nevent_queue_bytes = 65536\ntelemetry_queue_bytes = 65536\n"
            .into(),
        ..Default::default()
    })
    .await
    .unwrap();
    deploy_and_wait(
        &sys,
        &deployment_of("dep-1", &[("flood", "evp-test-telemetry-flood")]),
    )
    .await;
    sys.hub
        .set_configuration("flood", "flood", "20000")
        .await
        .unwrap();
    let report = wait_state(&sys, "state/flood/flood", |_| true).await;
    let report: Value = serde_json::from_str(report.as_str().unwrap()).unwrap();
    assert_eq!(report["accepted"], 20000, "{report}");
    assert!(
        report["again"].as_u64().unwrap() > 0,
        "no back-pressure: {report}"
    );
    assert_eq!(
        report["sent"].as_u64().unwrap() + report["denied"].as_u64().unwrap(),
        20000,
        "a callback was lost: {report}"
    );
    let broker = sys.stack.pid("evp-sdk-broker").unwrap();
    let status = std::fs::read_to_string(format!("/proc/{broker}/status")).unwrap();
    let high_water_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        high_water_kib < 64 * 1024,
        "sdk-broker grew to {high_water_kib} KiB under a flood"
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_get_new_sockets_when_sdk_broker_restarts() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &deployment_of("dep-1", &[("echo", "evp-test-config-echo")]),
    )
    .await;
    echo_round_trip(&sys, "echo", "first", "1").await;
    sys.kill_and_start("evp-sdk-broker").await.unwrap();
    // The instance runs again on a new socket and gets what the hub sets next.
    echo_round_trip(&sys, "echo", "second", "2").await;
    let status = sys
        .wait_status(|s| s["reconcileStatus"] == "ok" && instance_status(s, "echo") == "ok")
        .await
        .unwrap();
    assert_eq!(status["deploymentId"], "dep-1");
    assert_eq!(sys.instance_pids("echo").len(), 1);
    sys.stop().await;
}
