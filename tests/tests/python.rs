//! Python modules written only against the upstream `evp.app` API, run by runtimed-container
//! with Debian's `python3` and this project's pure-Python SDK (`sdk/python`) on their import
//! path, seen from the hub driver.

use evp_system_tests::python::test_module;
use evp_system_tests::system::{
    System, commands_are_answered, configuration_comes_back_as_state_and_telemetry,
    deploy_and_wait, deploy_until_module_error,
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

#[tokio::test(flavor = "multi_thread")]
async fn a_python_module_that_is_not_a_zip_with_main_is_a_module_error() {
    let sys = System::start().await.unwrap();
    let (url, hash) = sys.module("notzip", "echo this is a shell script").unwrap();
    let d = json!({
        "deploymentId": "dep-1",
        "instanceSpecs": {"py": {"moduleId": "m", "publish": {}, "subscribe": {}}},
        "modules": {"m": {"moduleImpl": "python", "entryPoint": "main",
                          "downloadUrl": url, "hash": hash}},
        "publishTopics": {}, "subscribeTopics": {}
    });
    let (status, message) = deploy_until_module_error(&sys, &d, "m").await;
    assert!(message.contains("is not a zip archive"), "{status}");
    assert_ne!(status["instances"]["py"]["status"], "ok");
    sys.stop().await;
}

/// The SDK's own unit tests (`sdk/python/tests`): a fake agent on a real socket, blobs against
/// an HTTP server on loopback, run with the interpreter python modules get.
#[test]
fn the_python_sdk_unit_tests_pass() {
    let out = std::process::Command::new("/usr/bin/python3")
        .args([
            "-W",
            "ignore::ResourceWarning",
            "-m",
            "unittest",
            "discover",
            "-v",
            "-s",
        ])
        .arg(evp_system_tests::python::sdk_dir().join("tests"))
        .output()
        .expect("running /usr/bin/python3 (apt-get install python3 python3-flatbuffers)");
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("\nOK"), "{report}");
}
