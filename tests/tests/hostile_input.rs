//! A NUL byte from outside (the hub, a module, an old file on disk) never reaches D-Bus: it is
//! refused where it enters, with an error naming the field, and every daemon stays on the bus
//! serving the next good input. dbus-daemon disconnects a sender whose string holds a NUL, so
//! each of these used to take a daemon off the bus.

use evp_system_tests::DEADLINE;
use evp_system_tests::system::{
    System, deploy_and_wait, deployment, deployment_of, wait_state, workspace_module,
};
use serde_json::json;

/// No daemon of the stack exited since it started.
fn none_exited(sys: &System) {
    for name in sys.stack.names() {
        assert_eq!(sys.stack.exits(name).unwrap(), 0, "{name} exited");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nul_in_a_manifest_is_refused_and_the_next_deployment_runs() {
    let sys = System::start().await.unwrap();
    let (url, hash) = sys.module("a", "exec /bin/sleep 300").unwrap();
    let poisoned = [
        (
            "dep-nul-module",
            deployment("dep-nul-module", &[("i", "a\0b")], &[("a\0b", &url, &hash)]),
            "deployment.modules",
        ),
        (
            "dep-nul-entry",
            {
                let mut d = deployment("dep-nul-entry", &[("i", "a")], &[("a", &url, &hash)]);
                d["modules"]["a"]["entryPoint"] = json!("ma\0in");
                d
            },
            "deployment.modules.a.entryPoint",
        ),
    ];
    for (id, d, path) in poisoned {
        sys.deploy(&d).await.unwrap();
        let status = sys
            .wait_status(|s| s["deploymentId"] == id && s["reconcileStatus"] == "error")
            .await
            .unwrap();
        let message = status["failureMessage"].as_str().unwrap_or_default();
        assert!(
            message.contains(path) && message.contains("NUL"),
            "{status}"
        );
    }
    // reconcilerd and hubd are still on the bus and take the next deployment.
    sys.run_instances("dep-good", &["i"]).await.unwrap();
    none_exited(&sys);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nul_in_a_configuration_or_a_direct_command_leaves_hubd_on_the_bus() {
    let sys = System::start().await.unwrap();
    sys.hub
        .set_configuration("in\0st", "topic", "v")
        .await
        .unwrap();
    sys.hub
        .set_configuration("inst", "to\0pic", "v")
        .await
        .unwrap();
    let wait = DEADLINE;
    for (reqid, instance, method, params, field) in [
        (1, "inst", "me\0thod", "{}", "method"),
        (2, "in\0st", "echo", "{}", "instance"),
        (3, "inst", "echo", "{\"a\":\"\0\"}", "params"),
    ] {
        let answer = sys
            .hub
            .call(instance, method, params, reqid, wait)
            .await
            .unwrap();
        assert_eq!(answer["status"], "error", "{answer}");
        assert_eq!(answer["reqid"], reqid.to_string(), "{answer}");
        let message = answer["errorMessage"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("direct-command-request.{field}")) && message.contains("NUL"),
            "{answer}"
        );
    }
    // hubd still reaches sdk-broker over the bus: the answer comes from sdk-broker.
    let answer = sys.hub.call("ghost", "echo", "{}", 4, wait).await.unwrap();
    let response = answer["response"].as_str().unwrap_or_default();
    assert!(response.contains("not running on this device"), "{answer}");
    // The refused configurations are logged with the field at fault.
    let log = sys.stack.config().log_dir().join("evp-hubd.log");
    let text = std::fs::read_to_string(log).unwrap();
    for field in ["instance", "topic"] {
        assert!(
            text.contains(&format!("the configuration's {field} contains a NUL byte")),
            "{text}"
        );
    }
    none_exited(&sys);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_sending_nul_strings_gets_evp_inval_and_sdk_broker_serves_on() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &deployment_of(
            "dep-1",
            &[("nul", "evp-test-nul"), ("echo", "evp-test-config-echo")],
        ),
    )
    .await;
    let answer = sys
        .hub
        .call("nul", "probe", "{}", 7, DEADLINE)
        .await
        .unwrap();
    assert_eq!(answer["status"], "ok", "{answer}");
    let results: serde_json::Value =
        serde_json::from_str(answer["response"].as_str().unwrap_or_default()).unwrap();
    assert_eq!(
        results,
        json!({
            "state": "EVP_INVAL", "telemetryKey": "EVP_INVAL",
            "message": "EVP_INVAL", "rpcResponse": "EVP_INVAL",
        })
    );
    // The other instance is served as before.
    sys.hub.set_configuration("echo", "t", "v").await.unwrap();
    wait_state(&sys, "state/echo/t", |v| v == "v").await;
    let log = sys.stack.config().log_dir().join("evp-sdk-broker.log");
    let text = std::fs::read_to_string(log).unwrap();
    assert!(
        text.contains("the state topic contains a NUL byte"),
        "the refusal is logged"
    );
    none_exited(&sys);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_persisted_deployment_with_a_nul_does_not_wedge_a_restart() {
    let sys = System::start().await.unwrap();
    sys.stack.stop("reconcilerd").await.unwrap();
    // What an older build persisted: a valid manifest but for a NUL in the module id, with a
    // module that downloads fine, so applying it would reach the runtime's LoadModule.
    let module = workspace_module("evp-test-config-echo");
    let poisoned = json!({
        "deploymentId": "dep-old",
        "instanceSpecs": {"i": {"moduleId": "m\0x", "publish": {}, "subscribe": {}}},
        "modules": {"m\0x": module},
        "publishTopics": {}, "subscribeTopics": {}
    });
    let dir = sys.data_dir().join("deployment");
    std::fs::write(dir.join("desired.json"), poisoned.to_string()).unwrap();
    sys.stack.start("reconcilerd").await.unwrap();
    // It says so to the hub...
    let status = sys
        .wait_status(|s| s["deploymentId"] == "dep-old" && s["reconcileStatus"] == "error")
        .await
        .unwrap();
    let message = status["failureMessage"].as_str().unwrap_or_default();
    assert!(
        message.contains("cannot be applied") && message.contains("NUL"),
        "{status}"
    );
    // ...stays on the bus, and takes the hub's next deployment.
    sys.run_instances("dep-new", &["i"]).await.unwrap();
    assert!(
        dir.join("desired.json.invalid").exists(),
        "the unusable file is kept aside for inspection"
    );
    assert_eq!(sys.stack.exits("reconcilerd").unwrap(), 1, "only the stop");
    sys.stop().await;
}
