//! The device's permanent identity: a random id made on first start, kept across restarts,
//! shown as `Hub1.DeviceId` and in the status report's `systemInfo`.

use evp_schemas::dbus::Hub1Proxy;
use evp_system_tests::system::System;
use evp_system_tests::{DEADLINE, wait_for};

async fn device_id(sys: &System) -> String {
    let hub = Hub1Proxy::builder(&sys.conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    hub.device_id().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_gets_one_permanent_id_and_keeps_it() {
    let mut sys = System::start().await.unwrap();
    let id = device_id(&sys).await;
    // A version 4 UUID.
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(id.as_bytes()[14], b'4', "{id}");
    let kept = std::fs::read_to_string(sys.data_dir().join("hub/device-id")).unwrap();
    assert_eq!(kept.trim(), id);
    let status = wait_for("a status report with the device id", DEADLINE, async || {
        sys.hub
            .latest_status()
            .filter(|s| s["systemInfo"]["deviceId"] == id.as_str())
    })
    .await;
    assert!(status.is_ok(), "{:?}", sys.hub.latest_status());

    // A reboot: the same id.
    sys.restart_stack().await.unwrap();
    assert_eq!(device_id(&sys).await, id);
    sys.stop().await;
}
