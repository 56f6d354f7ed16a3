//! `desiredDeviceConfig` from the hub, double-wrapped as EVP2 hubs send it: applied to the
//! report intervals, echoed as `state/$agent/*`, credentials never echoed, kept across a
//! restart of hubd.

use evp_devhub::stack::Signal;
use evp_system_tests::DEADLINE;
use evp_system_tests::system::System;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn device_config_is_applied_echoed_and_kept() {
    let sys = System::start().await.unwrap();
    sys.hub
        .set_device_config(&json!({
            "configuration/$agent/report-status-interval-min": 1,
            "configuration/$agent/report-status-interval-max": 4,
            "configuration/$agent/configuration-id": "cfg-42",
            "configuration/$agent/registry-auth": { "ghcr.io": "c2VjcmV0LXRva2Vu" }
        }))
        .await
        .unwrap();
    let applied = |r: &serde_json::Value| {
        r["state/$agent/configuration-id"] == "cfg-42"
            && r["state/$agent/report-status-interval-max"] == 4
            && r["state/$agent/report-status-interval-min"] == 1
    };
    let report = sys.hub.wait_for_status(applied, DEADLINE).await.unwrap();
    assert_eq!(
        report["state/$agent/registry-auth"],
        json!({"ghcr.io": "[redacted]"})
    );
    assert!(
        !report.to_string().contains("c2VjcmV0LXRva2Vu"),
        "registry credentials were echoed to the hub: {report}"
    );

    // hubd keeps it on disk, readable by itself only (it holds registry credentials)...
    let file = sys.data_dir().join("hub/device-config.json");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("cfg-42"), "{text}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{} is readable by others", file.display());

    // ...and a restarted hubd reports with it again.
    let before = sys.hub.status_count();
    sys.stack.kill("evp-hubd", Signal::SIGTERM).unwrap();
    sys.stack.wait_exit("evp-hubd", DEADLINE).await.unwrap();
    sys.stack.start("evp-hubd").await.unwrap();
    let report = sys
        .hub
        .wait_for_status(|r| applied(r) && sys.hub.status_count() > before, DEADLINE)
        .await
        .unwrap();
    assert_eq!(report["systemInfo"]["protocolVersion"], "EVP2-TB");
    sys.stop().await;
}
