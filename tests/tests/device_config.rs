//! `desiredDeviceConfig` from the hub, double-wrapped as EVP2 hubs send it: applied to the
//! report intervals, echoed as `state/$agent/*`, credentials never echoed, kept across a
//! restart of hubd. EVP1 has none: its report carries no `state/$agent/*`.

use evp_devhub::stack::Signal;
use evp_schemas::dbus::Hub1Proxy;
use evp_system_tests::system::{System, deployment};
use evp_system_tests::{DEADLINE, Protocol, wait_for};
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

/// EVP1 has no device configuration: what an EVP1 hub sends anyway changes nothing and is
/// logged once, and the report is EVP1's: `utsname`, no `state/$agent/*`, `Hub1.Protocol` EVP1.
#[tokio::test(flavor = "multi_thread")]
async fn an_evp1_device_ignores_device_config_and_reports_as_evp1() {
    let sys = System::start_speaking(Protocol::Evp1).await.unwrap();
    let config = json!({
        "configuration/$agent/report-status-interval-min": 1,
        "configuration/$agent/report-status-interval-max": 4,
        "configuration/$agent/configuration-id": "cfg-evp1",
        "configuration/$agent/registry-auth": null
    });
    sys.hub.set_device_config(&config).await.unwrap();
    sys.hub.set_device_config(&config).await.unwrap();
    // hubd takes the hub's messages in order: once this deployment is reported, the device
    // configurations before it were taken too.
    sys.deploy(&deployment("dep-after", &[], &[]))
        .await
        .unwrap();
    let report = sys
        .hub
        .wait_for_status(
            |r| r["deploymentStatus"]["deploymentId"] == "dep-after",
            DEADLINE,
        )
        .await
        .unwrap();
    let agent_keys: Vec<&String> = report
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("state/$agent/"))
        .collect();
    assert!(
        agent_keys.is_empty(),
        "EVP1 has no {agent_keys:?}: {report}"
    );
    let info = &report["systemInfo"];
    assert_eq!(info["protocolVersion"], "EVP1");
    let uname = nix::sys::utsname::uname().unwrap();
    let node = uname.nodename().to_string_lossy().into_owned();
    assert_eq!(info["utsname"]["nodename"], node.as_str());
    assert_eq!(info["utsname"]["sysname"], "Linux");
    assert!(info.get("os").is_none(), "{info}");
    assert!(!sys.data_dir().join("hub/device-config.json").exists());
    let hub = Hub1Proxy::new(&sys.conn).await.unwrap();
    assert_eq!(hub.protocol().await.unwrap(), "EVP1");
    let log = sys.stack.config().log_dir().join("evp-hubd.log");
    let ignored = "desiredDeviceConfig, which EVP1 does not have: ignored (logged once)";
    let text = wait_for(
        "hubd to log the device configuration",
        DEADLINE,
        async || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| t.contains(ignored))
        },
    )
    .await
    .unwrap();
    assert_eq!(text.matches(ignored).count(), 1, "logged more than once");
    sys.stop().await;
}
