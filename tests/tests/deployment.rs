//! A deployment from the hub, end to end: hub driver → mosquitto → hubd → reconcilerd →
//! runtimed-container → spawned processes, and the status back to the hub.

use std::os::unix::fs::PermissionsExt;

use evp_system_tests::http::FileServer;
use evp_system_tests::system::{System, deployment, instance_status, wait_gone};
use evp_system_tests::{DEADLINE, Protocol, both_protocols, wait_for};
use serde_json::{Value, json};

/// A module that stays up until stopped.
const STAYS_UP: &str = "exec /bin/sleep 300";

fn all_ok(status: &Value, id: &str, instances: &[&str]) -> bool {
    status["deploymentId"] == id
        && status["reconcileStatus"] == "ok"
        && instances.iter().all(|i| instance_status(status, i) == "ok")
}

fn one_pid(sys: &System, instance: &str) -> u32 {
    let pids = sys.instance_pids(instance);
    assert_eq!(
        pids.len(),
        1,
        "{instance} should run as one process: {pids:?}"
    );
    pids[0]
}

both_protocols! {
    async fn deployment_is_started_and_reported_ok_to_the_hub(protocol) {
        let sys = System::start_speaking(protocol).await.unwrap();
        let (file_url, file_hash) = sys.module("local", STAYS_UP).unwrap();
        let (_, served_hash) = sys.module("served", "exec /bin/sleep 301").unwrap();
        let server = FileServer::start(sys.modules_dir()).unwrap();
        let d = deployment(
            "dep-1",
            &[("one", "local"), ("two", "served")],
            &[
                ("local", &file_url, &file_hash),
                ("served", &server.url("served"), &served_hash),
            ],
        );
        sys.deploy(&d).await.unwrap();
        let status = sys
            .wait_status(|s| all_ok(s, "dep-1", &["one", "two"]))
            .await
            .unwrap();
        assert_eq!(status["modules"]["local"]["status"], "ok");
        assert_eq!(status["modules"]["served"]["status"], "ok");
        assert_eq!(status["instances"]["two"]["moduleId"], "served");
        assert!(
            server.request_count() >= 1,
            "the module was fetched over HTTP"
        );
        one_pid(&sys, "one");
        one_pid(&sys, "two");
        let report = sys.hub.latest_status().unwrap();
        assert_eq!(report["systemInfo"]["protocolVersion"], protocol.reported_name());
        let workspace = sys.instance_dir("one").join("default_workspace");
        let mode = std::fs::metadata(&workspace).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o700,
            "workspace {} is private",
            workspace.display()
        );
        sys.stop().await;
    }
}

both_protocols! {
    async fn redeploy_with_one_instance_changed_leaves_the_others_running(protocol) {
        let sys = System::start_speaking(protocol).await.unwrap();
        let (a_url, a_hash) = sys.module("a", STAYS_UP).unwrap();
        let (b_url, b_hash) = sys.module("b", "exec /bin/sleep 302").unwrap();
        let first = deployment(
            "dep-1",
            &[("one", "a"), ("two", "a"), ("three", "a")],
            &[("a", &a_url, &a_hash)],
        );
        sys.deploy(&first).await.unwrap();
        sys.wait_status(|s| all_ok(s, "dep-1", &["one", "two", "three"]))
            .await
            .unwrap();
        let before: Vec<u32> = ["one", "two", "three"]
            .iter()
            .map(|i| one_pid(&sys, i))
            .collect();

        let second = deployment(
            "dep-2",
            &[("one", "a"), ("two", "a"), ("three", "b")],
            &[("a", &a_url, &a_hash), ("b", &b_url, &b_hash)],
        );
        sys.deploy(&second).await.unwrap();
        let status = sys
            .wait_status(|s| {
                all_ok(s, "dep-2", &["one", "two", "three"])
                    && s["instances"]["three"]["moduleId"] == "b"
            })
            .await
            .unwrap();
        assert_eq!(status["modules"]["b"]["status"], "ok");
        assert_eq!(one_pid(&sys, "one"), before[0], "one was restarted");
        assert_eq!(one_pid(&sys, "two"), before[1], "two was restarted");
        assert_ne!(
            one_pid(&sys, "three"),
            before[2],
            "three still runs its old module"
        );
        wait_gone(&before[2..]).await.unwrap();
        sys.stop().await;
    }
}

/// EVP1 hubs restart an instance by sending its spec again with a new `version`.
#[tokio::test]
async fn a_new_evp1_version_restarts_that_instance_alone() {
    let sys = System::start_speaking(Protocol::Evp1).await.unwrap();
    let (url, hash) = sys.module("a", STAYS_UP).unwrap();
    let mut d = deployment(
        "dep-1",
        &[("one", "a"), ("two", "a")],
        &[("a", &url, &hash)],
    );
    sys.deploy(&d).await.unwrap();
    sys.wait_status(|s| all_ok(s, "dep-1", &["one", "two"]))
        .await
        .unwrap();
    let (one, two) = (one_pid(&sys, "one"), one_pid(&sys, "two"));

    d["deploymentId"] = json!("dep-2");
    d["instanceSpecs"]["one"]["version"] = json!(2);
    sys.deploy(&d).await.unwrap();
    sys.wait_status(|s| all_ok(s, "dep-2", &["one", "two"]))
        .await
        .unwrap();
    wait_for("one to run again as a new process", DEADLINE, async || {
        let pids = sys.instance_pids("one");
        (pids.len() == 1 && pids[0] != one).then_some(())
    })
    .await
    .unwrap();
    wait_gone(&[one]).await.unwrap();
    assert_eq!(one_pid(&sys, "two"), two, "two was restarted");
    sys.stop().await;
}

both_protocols! {
    async fn empty_deployment_stops_everything_and_removes_instance_directories(protocol) {
        let sys = System::start_speaking(protocol).await.unwrap();
        let pids = sys.run_instances("dep-1", &["one", "two"]).await.unwrap();
        assert!(sys.instance_dir("one").is_dir());

        sys.deploy(&deployment("dep-empty", &[], &[]))
            .await
            .unwrap();
        let status = sys
            .wait_status(|s| {
                s["deploymentId"] == "dep-empty"
                    && s["reconcileStatus"] == "ok"
                    && s["instances"].as_object().is_some_and(|o| o.is_empty())
            })
            .await
            .unwrap();
        assert_eq!(status["modules"], json!({}));
        wait_gone(&pids).await.unwrap();
        assert!(!sys.instance_dir("one").exists(), "one's directory is left");
        assert!(!sys.instance_dir("two").exists(), "two's directory is left");
        sys.stop().await;
    }
}

both_protocols! {
    async fn malformed_manifest_is_reported_as_error_and_the_previous_deployment_keeps_running(protocol) {
        let sys = System::start_speaking(protocol).await.unwrap();
        let pid = sys.run_instances("dep-1", &["one"]).await.unwrap()[0];
        let (url, hash) = sys.module("a", STAYS_UP).unwrap();

        // No instanceSpecs: the whole manifest is invalid.
        let bad = json!({"deploymentId": "dep-bad", "modules": {}});
        sys.deploy(&bad).await.unwrap();
        let status = sys
            .wait_status(|s| s["deploymentId"] == "dep-bad" && s["reconcileStatus"] == "error")
            .await
            .unwrap();
        let message = status["failureMessage"].as_str().unwrap_or_default();
        assert!(
            message.contains("instanceSpecs"),
            "unhelpful message {message:?}"
        );
        assert_eq!(instance_status(&status, "one"), "ok");
        assert_eq!(
            one_pid(&sys, "one"),
            pid,
            "the running instance was disturbed"
        );

        // A manifest that refers to a module it does not define is refused the same way.
        let dangling = deployment("dep-dangling", &[("one", "nope")], &[("a", &url, &hash)]);
        sys.deploy(&dangling).await.unwrap();
        let status = sys
            .wait_status(|s| s["deploymentId"] == "dep-dangling" && s["reconcileStatus"] == "error")
            .await
            .unwrap();
        assert!(
            status["failureMessage"]
                .as_str()
                .is_some_and(|m| m.contains("deployment.instanceSpecs.one.moduleId")),
            "{status}"
        );
        assert_eq!(one_pid(&sys, "one"), pid);

        // The persisted desired deployment is still the good one.
        let desired = std::fs::read_to_string(sys.data_dir().join("deployment/desired.json")).unwrap();
        assert!(desired.contains("dep-1"), "{desired}");
        sys.stop().await;
    }
}

both_protocols! {
    async fn wrong_hash_fails_the_module_and_its_instances_never_start(protocol) {
        let sys = System::start_speaking(protocol).await.unwrap();
        sys.module("a", STAYS_UP).unwrap();
        let server = FileServer::start(sys.modules_dir()).unwrap();
        let (_, other_hash) = sys.module("other", "exec /bin/sleep 303").unwrap();
        let d = deployment(
            "dep-1",
            &[("one", "a")],
            &[("a", &server.url("a"), &other_hash)],
        );
        sys.deploy(&d).await.unwrap();
        let status = sys
            .wait_status(|s| {
                s["deploymentId"] == "dep-1"
                    && s["modules"]["a"]["failureMessage"] == "Module hash mismatch"
            })
            .await
            .unwrap();
        assert_eq!(status["modules"]["a"]["status"], "error");
        assert_eq!(status["reconcileStatus"], "error");
        assert_ne!(instance_status(&status, "one"), "ok");
        assert!(
            sys.instance_pids("one").is_empty(),
            "the instance runs anyway"
        );
        let cache = std::fs::read_dir(sys.data_dir().join("modules"))
            .unwrap()
            .count();
        assert_eq!(
            cache, 0,
            "a file that failed its hash was kept in the cache"
        );
        sys.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcilerd_restart_carries_on_without_restarting_instances() {
    use evp_devhub::stack::Signal;
    let sys = System::start().await.unwrap();
    let pids = sys.run_instances("dep-1", &["one", "two"]).await.unwrap();

    sys.stack.kill("evp-reconcilerd", Signal::SIGKILL).unwrap();
    sys.stack
        .wait_exit("evp-reconcilerd", DEADLINE)
        .await
        .unwrap();
    sys.stack.start("evp-reconcilerd").await.unwrap();
    let reconciler = evp_schemas::dbus::Reconciler1Proxy::new(&sys.conn)
        .await
        .unwrap();
    let status = wait_for("reconcilerd to converge again", DEADLINE, async || {
        let json = reconciler.deployment_status().await.ok()?;
        let v: Value = serde_json::from_str(&json).ok()?;
        all_ok(&v, "dep-1", &["one", "two"]).then_some(v)
    })
    .await
    .unwrap();
    assert_eq!(status["instances"]["one"]["moduleId"], "a");
    assert_eq!(vec![one_pid(&sys, "one"), one_pid(&sys, "two")], pids);
    sys.stop().await;
}
