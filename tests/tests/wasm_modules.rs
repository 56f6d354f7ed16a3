//! The C test modules of `sdk/c/test-modules` (and the Rust threads module), built with the
//! C SDK header for `wasm32-wasi`, deployed from the hub's side and run unchanged by
//! runtimed-wasm; each checked as the hub sees it, over the real processes.

use std::time::{Duration, Instant};

use evp_system_tests::DEADLINE;
use evp_system_tests::system::{
    Options, System, commands_are_answered, configuration_comes_back_as_state_and_telemetry,
    deploy_and_wait, echo_round_trip, exchange_a_thousand_messages, instance_status, wait_state,
};
use evp_system_tests::wasm::{build_threads_module, c_module, wasm_module};
use serde_json::{Value, json};

/// One instance per `(instance, C module)`, no messaging routes.
fn c_deployment(id: &str, instances: &[(&str, &str)]) -> Value {
    let mut d = json!({
        "deploymentId": id, "instanceSpecs": {}, "modules": {},
        "publishTopics": {}, "subscribeTopics": {}
    });
    for (instance, module) in instances {
        d["modules"][*module] = c_module(module);
        d["instanceSpecs"][*instance] = json!({"moduleId": module, "publish": {}, "subscribe": {}});
    }
    d
}

/// The text of runtimed-wasm's log.
fn wasm_log(sys: &System) -> String {
    let log = sys.stack.config().log_dir().join("evp-runtimed-wasm.log");
    std::fs::read_to_string(log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn c_modules_echo_configuration_as_state_and_telemetry_and_answer_commands() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &c_deployment(
            "dep-1",
            &[
                ("echo", "echo-state"),
                ("tele", "config-telemetry"),
                ("rpc", "rpc"),
            ],
        ),
    )
    .await;
    configuration_comes_back_as_state_and_telemetry(&sys).await;
    commands_are_answered(&sys, "rpc", 30042).await;
    // Each module's first line reached the log, tagged with its instance.
    evp_system_tests::wait_for("the modules' start lines", DEADLINE, async || {
        let log = wasm_log(&sys);
        (log.contains("wasm:echo/stdout: echo-state: started")
            && log.contains("wasm:rpc/stdout: rpc: started"))
        .then_some(())
    })
    .await
    .unwrap();
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_c_modules_exchange_a_thousand_messages_through_manifest_topics() {
    let sys = System::start().await.unwrap();
    let d = c_deployment("dep-1", &[("tx", "msg-sender"), ("rx", "msg-receiver")]);
    exchange_a_thousand_messages(&sys, d).await;
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_c_module_that_returns_from_main_is_self_exiting_and_one_that_traps_is_error() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &c_deployment("dep-1", &[("bye", "self-exit"), ("t", "trap")]),
    )
    .await;
    sys.hub.set_configuration("bye", "go", "1").await.unwrap();
    sys.hub.set_configuration("t", "go", "1").await.unwrap();
    wait_state(&sys, "state/bye/leaving", |v| v == "bye").await;
    let status = sys
        .wait_status(|s| {
            instance_status(s, "bye") == "self-exiting" && instance_status(s, "t") == "error"
        })
        .await
        .unwrap();
    let message = status["instances"]["t"]["failureMessage"].as_str().unwrap();
    assert!(message.contains("unreachable"), "{message}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_c_module_allocating_without_end_fails_at_its_memory_limit() {
    let sys = System::start_with(Options {
        extra_toml: "[wasm]\nmemory_limit_bytes = 8388608\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    sys.deploy(&c_deployment("dep-1", &[("hog", "hog")]))
        .await
        .unwrap();
    let status = sys
        .wait_status(|s| instance_status(s, "hog") == "error")
        .await
        .unwrap();
    let message = status["instances"]["hog"]["failureMessage"]
        .as_str()
        .unwrap();
    assert!(message.contains("memory limit reached"), "{message}");
    assert!(message.contains("8388608"), "{message}");
    sys.stop().await;
}

/// Modules that ignore the exit request (or never call the SDK) are stopped after the WASM
/// stop grace, and meanwhile another instance's configuration comes back as state.
#[tokio::test(flavor = "multi_thread")]
async fn c_modules_that_ignore_the_exit_are_stopped_after_the_grace_while_others_answer() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &c_deployment(
            "dep-1",
            &[
                ("deaf", "ignore-exit"),
                ("spin", "spin"),
                ("echo", "echo-state"),
            ],
        ),
    )
    .await;
    // ignore-exit serves (and is connected) until asked to exit.
    echo_round_trip(&sys, "deaf", "t", "v").await;
    let started = Instant::now();
    sys.deploy(&c_deployment("dep-2", &[("echo", "echo-state")]))
        .await
        .unwrap();
    echo_round_trip(&sys, "echo", "during", "the stops").await;
    let answered = started.elapsed();
    sys.wait_status(|s| {
        s["deploymentId"] == "dep-2"
            && s["reconcileStatus"] == "ok"
            && s["instances"].get("deaf").is_none()
            && s["instances"].get("spin").is_none()
    })
    .await
    .unwrap();
    let stopped = started.elapsed();
    assert!(
        answered < Duration::from_secs(4),
        "echo answered after {answered:?}"
    );
    assert!(
        stopped >= Duration::from_secs(5),
        "the stops took {stopped:?}"
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_written_in_the_workspace_is_read_back_after_a_redeploy_under_the_same_name() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &c_deployment("dep-1", &[("notes", "workspace-write")]),
    )
    .await;
    sys.hub
        .set_configuration("notes", "note", "kept across deployments")
        .await
        .unwrap();
    wait_state(&sys, "state/notes/written", |v| {
        v == "kept across deployments"
    })
    .await;
    deploy_and_wait(&sys, &c_deployment("dep-2", &[("notes", "workspace-read")])).await;
    wait_state(&sys, "state/notes/read", |v| v == "kept across deployments").await;
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_threads_module_counts_on_a_shared_memory() {
    let sys = System::start().await.unwrap();
    let module = wasm_module(&build_threads_module());
    let d = json!({
        "deploymentId": "dep-1",
        "instanceSpecs": {"th": {"moduleId": "threads", "publish": {}, "subscribe": {}}},
        "modules": {"threads": module},
        "publishTopics": {}, "subscribeTopics": {}
    });
    deploy_and_wait(&sys, &d).await;
    sys.hub
        .set_configuration("th", "count", "1000")
        .await
        .unwrap();
    wait_state(&sys, "state/th/count", |v| v == "4000" || v == 4000).await;
    sys.stop().await;
}
