//! ThingsBoard device provisioning over the real processes: a device with a provisioning key
//! and no credentials registers itself with the hub (the devhub's hub side on mosquitto),
//! keeps the token for hubd alone, connects with it, and never asks again; a refused key is
//! shown on `Hub1.Connection`, logged with the hub's reason, and asked again after a backoff.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use evp_devhub::hub::ProvisionProfile;
use evp_system_tests::system::{Options, System, hub1};
use evp_system_tests::{DEADLINE, wait_for};

fn profile() -> ProvisionProfile {
    ProvisionProfile {
        key: "fleet-profile-key".into(),
        secret: "fleet-profile-secret-2718".into(),
    }
}

fn hubd_log(sys: &System) -> String {
    std::fs::read_to_string(sys.stack.config().log_dir().join("evp-hubd.log")).unwrap_or_default()
}

/// How many connections mosquitto accepted with user name `user`.
fn connections_as(sys: &System, user: &str) -> usize {
    sys.mosquitto
        .log_text()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&format!("u'{user}'")))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_without_credentials_registers_itself_once_and_connects_with_its_token() {
    let p = profile();
    let mut sys = System::start_with(Options {
        provision_key: Some((p.key.clone(), p.secret.clone())),
        hub_provisioning: Some(p.clone()),
        ..Options::default()
    })
    .await
    .unwrap();
    let hub1 = hub1(&sys).await;
    let device_id = hub1.device_id().await.unwrap();

    // Status reports arrive: the device is on the hub.
    let reported = wait_for("a status report after provisioning", DEADLINE, async || {
        sys.hub
            .latest_status()
            .filter(|s| s["systemInfo"]["deviceId"] == device_id.as_str())
    })
    .await;
    assert!(reported.is_ok(), "{reported:?}\nhubd:\n{}", hubd_log(&sys));
    let issued = sys.hub.provisioned();
    assert_eq!(
        issued.keys().collect::<Vec<_>>(),
        [&device_id],
        "registered under its id"
    );
    let token = issued[&device_id].clone();
    assert_eq!(hub1.connection().await.unwrap(), "connected");

    // The session after provisioning used the token.
    assert_eq!(
        connections_as(&sys, "provision"),
        1,
        "{}",
        sys.mosquitto.log_text()
    );
    assert_eq!(
        connections_as(&sys, &token),
        1,
        "{}",
        sys.mosquitto.log_text()
    );

    // Kept for hubd's user alone; the secret is in no log.
    let kept = sys.data_dir().join("hub/credentials.json");
    let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    assert!(std::fs::read_to_string(&kept).unwrap().contains(&token));
    assert!(!hubd_log(&sys).contains(&p.secret));

    // A reboot: the kept token, no second registration.
    sys.restart_stack().await.unwrap();
    wait_for("a connection with the kept token", DEADLINE, async || {
        (connections_as(&sys, &token) == 2).then_some(())
    })
    .await
    .unwrap();
    let before = sys.hub.status_count();
    wait_for("a status report after the reboot", DEADLINE, async || {
        (sys.hub.status_count() > before).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(sys.hub.provision_requests().len(), 1);
    assert_eq!(connections_as(&sys, "provision"), 1);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_provisioning_is_shown_and_asked_again_after_a_backoff() {
    let p = profile();
    let sys = System::start_with(Options {
        provision_key: Some((p.key.clone(), "not-the-profile-secret".into())),
        hub_provisioning: Some(p),
        ..Options::default()
    })
    .await
    .unwrap();
    let hub1 = hub1(&sys).await;
    let refused = wait_for(
        "Hub1.Connection provisioning-refused",
        DEADLINE,
        async || (hub1.connection().await.ok()? == "provisioning-refused").then_some(()),
    )
    .await;
    assert!(refused.is_ok(), "{refused:?}\nhubd:\n{}", hubd_log(&sys));
    assert_eq!(sys.hub.provision_requests().len(), 1);
    assert!(sys.hub.provision_requests()[0].token.is_none());
    let log = hubd_log(&sys);
    assert!(
        log.contains("device provisioning refused: the hub answered FAILURE: no device profile"),
        "{log}"
    );
    assert!(!log.contains("not-the-profile-secret"), "{log}");

    wait_for("a second provisioning request", DEADLINE, async || {
        (sys.hub.provision_requests().len() >= 2).then_some(())
    })
    .await
    .unwrap();
    // The first retry waits 5 s less up to a quarter of jitter, counted from the refusal (both
    // requests timed as the hub read them).
    let requests = sys.hub.provision_requests();
    let waited = requests[1].received_at - requests[0].received_at;
    assert!(waited >= Duration::from_millis(3_500), "{waited:?}");
    assert!(!sys.data_dir().join("hub/credentials.json").exists());
    assert!(sys.hub.latest_status().is_none(), "never on the hub");
    sys.stop().await;
}

/// A power cut at each step of keeping the credentials: the device comes back on the hub with
/// the token, never stopped by half a file. Cut before the rename, it asks again (the hub
/// answers one device name with the same token); after it, it never asks again.
async fn power_cut_while_keeping_the_credentials(point: &str, asks_again: bool) {
    let p = profile();
    // The hub refuses at first, so the device waits while the test arms the crash.
    let sys = System::start_with(Options {
        provision_key: Some((p.key.clone(), p.secret.clone())),
        hub_provisioning: Some(ProvisionProfile {
            secret: "another-profile-secret".into(),
            ..p.clone()
        }),
        ..Options::default()
    })
    .await
    .unwrap();
    let hub1 = hub1(&sys).await;
    wait_for("a first refusal", DEADLINE, async || {
        (hub1.connection().await.ok()? == "provisioning-refused").then_some(())
    })
    .await
    .unwrap();
    sys.hub.set_provisioning(Some(p));
    let exits = sys.arm_crash_at(HUBD, point).await.unwrap();
    sys.wait_crashed_at(HUBD, point, exits).await.unwrap();

    // Power back.
    sys.start_disarmed(HUBD).await.unwrap();
    let device_id = hub1.device_id().await.unwrap();
    let reported = wait_for(
        "a status report after the power cut",
        DEADLINE,
        async || {
            sys.hub
                .latest_status()
                .filter(|s| s["systemInfo"]["deviceId"] == device_id.as_str())
        },
    )
    .await;
    assert!(
        reported.is_ok(),
        "{point}: {reported:?}\nhubd:\n{}",
        hubd_log(&sys)
    );
    let token = sys.hub.provisioned()[&device_id].clone();
    let kept = std::fs::read_to_string(sys.data_dir().join("hub/credentials.json")).unwrap();
    assert!(kept.contains(&token), "{point}");
    assert!(connections_as(&sys, &token) >= 1, "{point}");
    let granted = sys
        .hub
        .provision_requests()
        .iter()
        .filter(|r| r.token.is_some())
        .count();
    assert_eq!(granted, if asks_again { 2 } else { 1 }, "{point}");
    sys.stop().await;
}

const HUBD: &str = "evp-hubd";

#[tokio::test(flavor = "multi_thread")]
async fn a_power_cut_before_the_credentials_are_synced_provisions_again() {
    power_cut_while_keeping_the_credentials("credentials-tmp-written", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_power_cut_before_the_rename_provisions_again() {
    power_cut_while_keeping_the_credentials("credentials-tmp-synced", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_power_cut_after_the_rename_keeps_the_credentials() {
    power_cut_while_keeping_the_credentials("credentials-renamed", false).await;
}
