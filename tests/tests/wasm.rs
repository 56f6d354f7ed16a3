//! WASM modules end to end: written in WAT (runtimed-wasm/tests/modules), deployed from the
//! hub's side, run by runtimed-wasm in wasmtime, their SDK traffic through sdk-broker, and
//! checked as the hub sees them.

use std::path::Path;
use std::time::{Duration, Instant};

use evp_system_tests::system::{System, deploy_and_wait, instance_status, wait_state};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// `runtimed-wasm/tests/modules/<name>.wat` compiled, written among the test's module files;
/// its deployment entry.
fn wasm_module(sys: &System, name: &str) -> Value {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../runtimed-wasm/tests/modules")
        .join(format!("{name}.wat"));
    let bytes = wat::parse_file(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    let path = sys.modules_dir().join(format!("{name}.wasm"));
    std::fs::write(&path, &bytes).unwrap();
    json!({
        "moduleImpl": "wasm",
        "entryPoint": "main",
        "downloadUrl": format!("file://{}", path.display()),
        "hash": hex::encode(Sha256::digest(&bytes)),
    })
}

/// A deployment of one instance per `(instance, module)`, each module a WAT file's WASM.
fn wasm_deployment(sys: &System, id: &str, instances: &[(&str, &str)]) -> Value {
    let mut d = json!({
        "deploymentId": id, "instanceSpecs": {}, "modules": {},
        "publishTopics": {}, "subscribeTopics": {}
    });
    for (instance, module) in instances {
        d["modules"][*module] = wasm_module(sys, module);
        d["instanceSpecs"][*instance] = json!({"moduleId": module, "publish": {}, "subscribe": {}});
    }
    d
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasm_module_echoes_configuration_as_state_and_answers_commands() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &wasm_deployment(&sys, "dep-1", &[("echo", "config_echo")]),
    )
    .await;
    sys.hub
        .set_configuration("echo", "greeting", "hello")
        .await
        .unwrap();
    wait_state(&sys, "state/echo/greeting", |v| v == "hello").await;
    let wait = Duration::from_secs(20);
    let ok = sys
        .hub
        .call("echo", "echo", r#"{"text":"hi"}"#, 20042, wait)
        .await
        .unwrap();
    assert_eq!(ok["status"], "ok", "{ok}");
    assert_eq!(ok["response"], r#"{"text":"hi"}"#);
    let unknown = sys
        .hub
        .call("echo", "nope", "{}", 20043, wait)
        .await
        .unwrap();
    assert_eq!(unknown["status"], "error", "{unknown}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trapping_wasm_module_is_error_with_the_trap_message() {
    let sys = System::start().await.unwrap();
    sys.deploy(&wasm_deployment(&sys, "dep-1", &[("t", "trap")]))
        .await
        .unwrap();
    let status = sys
        .wait_status(|s| {
            instance_status(s, "t") == "error"
                && s["instances"]["t"]["failureMessage"]
                    .as_str()
                    .is_some_and(|m| m.contains("unreachable"))
        })
        .await
        .unwrap();
    let message = status["instances"]["t"]["failureMessage"].as_str().unwrap();
    assert!(message.contains("_start failed"), "{message}");
    sys.stop().await;
}

/// Removing a module that never returns to the SDK takes the WASM stop grace (5 s) and then
/// interrupts it; meanwhile another instance's configuration comes back as state.
#[tokio::test(flavor = "multi_thread")]
async fn a_spinning_wasm_module_is_stopped_after_the_grace_while_another_instance_answers() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &wasm_deployment(&sys, "dep-1", &[("spin", "spin"), ("echo", "config_echo")]),
    )
    .await;
    let started = Instant::now();
    sys.deploy(&wasm_deployment(&sys, "dep-2", &[("echo", "config_echo")]))
        .await
        .unwrap();
    // The stop is under way (the reconciler waits out the grace)...
    sys.hub
        .set_configuration("echo", "during", "the stop")
        .await
        .unwrap();
    wait_state(&sys, "state/echo/during", |v| v == "the stop").await;
    let answered = started.elapsed();
    // ...and ends once the grace is over and the instance was interrupted.
    sys.wait_status(|s| {
        s["deploymentId"] == "dep-2"
            && s["reconcileStatus"] == "ok"
            && s["instances"].get("spin").is_none()
    })
    .await
    .unwrap();
    let stopped = started.elapsed();
    assert!(
        answered < Duration::from_secs(4),
        "the other instance answered after {answered:?}"
    );
    assert!(
        stopped >= Duration::from_secs(5) && stopped < Duration::from_secs(15),
        "the stop took {stopped:?}"
    );
    assert_eq!(
        instance_status(&sys.wait_status(|_| true).await.unwrap(), "echo"),
        "ok"
    );
    sys.stop().await;
}
