//! Python modules written only against the upstream `evp.app` API, run by runtimed-container
//! with Debian's `python3` and this project's pure-Python SDK (`sdk/python`) on their import
//! path, seen from the hub driver.

use evp_system_tests::python::test_module;
use evp_system_tests::system::{
    System, commands_are_answered, configuration_comes_back_as_state_and_telemetry, deploy_and_wait,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_python_module_echoes_configuration_as_state_and_telemetry_and_answers_commands() {
    let sys = System::start().await.unwrap();
    let module = test_module("echo", sys.dir.path()).unwrap();
    let mut d = json!({
        "deploymentId": "dep-1", "instanceSpecs": {}, "modules": {"echo": module},
        "publishTopics": {}, "subscribeTopics": {}
    });
    for name in ["echo", "tele", "rpc"] {
        d["instanceSpecs"][name] = json!({"moduleId": "echo", "publish": {}, "subscribe": {}});
    }
    deploy_and_wait(&sys, &d).await;
    configuration_comes_back_as_state_and_telemetry(&sys).await;
    commands_are_answered(&sys, "rpc", 7000).await;
    // Its output reached the instance's log, line by line.
    let log = sys.instance_dir("echo").join("logs").join("stdout.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("py-echo: started in "), "{text}");
    sys.stop().await;
}
