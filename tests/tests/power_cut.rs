//! Power cuts and reboots. reconcilerd is aborted right after each step of writing a new
//! deployment and a new module (its test-only `EVP_TEST_CRASH_AT` hook, in debug builds): on
//! restart the desired deployment is the old or the new one, never a mix, the module cache
//! holds only whole verified files, and the device converges with unchanged instances
//! untouched. A cold start with the broker down runs the last deployment from disk.

use evp_schemas::dbus::Reconciler1Proxy;
use evp_system_tests::system::{System, deployment, instance_status};
use evp_system_tests::{DEADLINE, wait_for};
use serde_json::Value;
use sha2::{Digest, Sha256};

async fn converged_on_disk_and_bus(sys: &System, id: &str, instances: &[&str]) {
    let reconciler = Reconciler1Proxy::new(&sys.conn).await.unwrap();
    wait_for(
        &format!("reconcilerd to converge on {id}"),
        DEADLINE,
        async || {
            let v: Value =
                serde_json::from_str(&reconciler.deployment_status().await.ok()?).ok()?;
            (v["deploymentId"] == id
                && v["reconcileStatus"] == "ok"
                && instances.iter().all(|i| instance_status(&v, i) == "ok"))
            .then_some(())
        },
    )
    .await
    .unwrap();
}

async fn cut_power_at(point: &str) {
    let sys = System::start().await.unwrap();
    let (a_url, a_hash) = sys.module("a", "exec /bin/sleep 300").unwrap();
    let (b_url, b_hash) = sys.module("b", "exec /bin/sleep 301").unwrap();
    let old = deployment("dep-old", &[("one", "a")], &[("a", &a_url, &a_hash)]);
    let new = deployment(
        "dep-new",
        &[("one", "a"), ("two", "b")],
        &[("a", &a_url, &a_hash), ("b", &b_url, &b_hash)],
    );
    sys.deploy(&old).await.unwrap();
    sys.wait_status(|s| s["deploymentId"] == "dep-old" && instance_status(s, "one") == "ok")
        .await
        .unwrap();
    let one = sys.instance_pids("one");

    // The next reconcilerd dies right after `point` while applying the new deployment.
    let rd = "evp-reconcilerd";
    let exits = sys.arm_crash_at(rd, point).await.unwrap();
    sys.deploy(&new).await.unwrap();
    sys.wait_crashed_at(rd, point, exits).await.unwrap();

    // What a power cut at that step leaves on disk.
    let desired = std::fs::read_to_string(sys.data_dir().join("deployment/desired.json")).unwrap();
    let desired: Value = serde_json::from_str(&desired).expect("desired.json is whole JSON");
    let id = desired["deploymentId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        id == "dep-old" || id == "dep-new",
        "desired.json holds {id:?}"
    );
    for entry in std::fs::read_dir(sys.data_dir().join("modules")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.len() == 64 {
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(
                hex::encode(Sha256::digest(&bytes)),
                name,
                "a cached module is not whole"
            );
        }
    }

    // Power back: the device converges on the new deployment, `one` never restarted.
    sys.start_disarmed(rd).await.unwrap();
    converged_on_disk_and_bus(&sys, "dep-new", &["one", "two"]).await;
    assert_eq!(
        sys.instance_pids("one"),
        one,
        "an unchanged instance was restarted"
    );
    assert_eq!(sys.instance_pids("two").len(), 1);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn power_cut_after_the_temporary_deployment_file_is_written() {
    cut_power_at("desired-tmp-written").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn power_cut_after_the_temporary_deployment_file_is_synced() {
    cut_power_at("desired-tmp-synced").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn power_cut_after_the_deployment_file_is_renamed() {
    cut_power_at("desired-renamed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn power_cut_after_a_module_download_is_written() {
    cut_power_at("module-partial-written").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn power_cut_after_a_module_is_renamed_into_the_cache() {
    cut_power_at("module-renamed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cold_start_with_the_broker_down_runs_the_last_deployment_and_reports_later() {
    let mut sys = System::start().await.unwrap();
    let (url, hash) = sys.module("a", "exec /bin/sleep 300").unwrap();
    sys.deploy(&deployment(
        "dep-1",
        &[("one", "a"), ("two", "a")],
        &[("a", &url, &hash)],
    ))
    .await
    .unwrap();
    sys.wait_status(|s| s["deploymentId"] == "dep-1" && s["reconcileStatus"] == "ok")
        .await
        .unwrap();

    // A reboot with no network: everything stops, the broker stays down.
    sys.stack.stop_all().await;
    assert!(
        sys.instance_pids("one").is_empty(),
        "a module outlived the reboot"
    );
    sys.mosquitto.stop();
    sys.restart_stack().await.unwrap();
    converged_on_disk_and_bus(&sys, "dep-1", &["one", "two"]).await;
    assert_eq!(sys.instance_pids("one").len(), 1);
    let hub = evp_schemas::dbus::Hub1Proxy::new(&sys.conn).await.unwrap();
    assert_ne!(hub.connection().await.unwrap(), "connected");

    // The hub comes back: the device reports everything without being asked.
    let before = sys.hub.status_count();
    sys.mosquitto.restart().unwrap();
    let status = sys
        .hub
        .wait_for_status(
            |r| {
                sys.hub.status_count() > before
                    && r["deploymentStatus"]["deploymentId"] == "dep-1"
                    && instance_status(&r["deploymentStatus"], "one") == "ok"
                    && instance_status(&r["deploymentStatus"], "two") == "ok"
            },
            DEADLINE,
        )
        .await
        .unwrap();
    assert_eq!(status["deploymentStatus"]["reconcileStatus"], "ok");
    sys.stop().await;
}
