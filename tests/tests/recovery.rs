//! Instances and daemons that die: the restart policy, a runtime or reconcilerd killed with
//! SIGKILL in steady state and mid-deployment. Whatever dies, the device converges, and an
//! instance that did not change keeps its PID.

use evp_devhub::stack::Signal;
use evp_schemas::dbus::{
    RUNTIME_CONTAINER_NAME, RUNTIME_CONTAINER_PATH, Reconciler1Proxy, Runtime1Proxy,
};
use evp_system_tests::http::{Behaviour, FileServer};
use evp_system_tests::system::{Options, System, deployment, instance_status};
use evp_system_tests::{DEADLINE, wait_for};
use serde_json::{Value, json};
use std::time::Duration;

/// Fast restarts, so a test sees several within seconds.
const QUICK_RESTARTS: &str =
    "[reconciler]\nrestart_backoff_base_ms = 50\nrestart_backoff_max_ms = 200\n";

/// A module that counts its runs in its workspace and exits with `code` until run `stay_at`,
/// from which on it stays up.
fn counting(code: u8, stay_at: u32) -> String {
    format!(
        r#"f="$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/runs"
n=$(/bin/cat "$f" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$f"
[ $n -ge {stay_at} ] && exec /bin/sleep 300
exit {code}"#
    )
}

fn runs(sys: &System, instance: &str) -> u32 {
    std::fs::read_to_string(sys.instance_dir(instance).join("default_workspace/runs"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn with_policy(mut d: Value, instance: &str, policy: &str) -> Value {
    d["instanceSpecs"][instance]["restartPolicy"] = json!(policy);
    d
}

async fn quick_system() -> System {
    System::start_with(Options {
        extra_toml: QUICK_RESTARTS.into(),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn crashing_instance_is_restarted_until_it_stays_up() {
    let sys = quick_system().await;
    let (url, hash) = sys.module("flaky", &counting(1, 4)).unwrap();
    sys.deploy(&deployment(
        "dep-1",
        &[("flaky", "flaky")],
        &[("flaky", &url, &hash)],
    ))
    .await
    .unwrap();
    wait_for("the fourth run to stay up", DEADLINE, async || {
        (runs(&sys, "flaky") == 4 && sys.instance_pids("flaky").len() == 1).then_some(())
    })
    .await
    .unwrap();
    let status = sys
        .wait_status(|s| s["reconcileStatus"] == "ok" && instance_status(s, "flaky") == "ok")
        .await
        .unwrap();
    assert_eq!(status["instances"]["flaky"]["moduleId"], "flaky");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_policies_decide_what_comes_back() {
    let sys = quick_system().await;
    let (done_url, done_hash) = sys.module("done", "exit 0").unwrap();
    let (crash_url, crash_hash) = sys.module("crash", "exit 3").unwrap();
    let (again_url, again_hash) = sys.module("again", &counting(0, 1000)).unwrap();
    let d = deployment(
        "dep-1",
        &[("done", "done"), ("crash", "crash"), ("again", "again")],
        &[
            ("done", &done_url, &done_hash),
            ("crash", &crash_url, &crash_hash),
            ("again", &again_url, &again_hash),
        ],
    );
    let d = with_policy(with_policy(d, "crash", "never"), "again", "always");
    sys.deploy(&d).await.unwrap();
    // `always` restarts even a clean exit: wait for a few of those...
    wait_for(
        "`always` to restart a clean exit three times",
        DEADLINE,
        async || (runs(&sys, "again") >= 3).then_some(()),
    )
    .await
    .unwrap();
    // ...in that time the default policy left the clean exit alone and `never` the crash.
    let status = sys
        .wait_status(|s| {
            instance_status(s, "done") == "self-exiting" && instance_status(s, "crash") == "error"
        })
        .await
        .unwrap();
    assert!(
        status["instances"]["crash"]["failureMessage"]
            .as_str()
            .is_some_and(|m| m.contains("status 3")),
        "{status}"
    );
    assert!(sys.instance_pids("done").is_empty());
    assert!(sys.instance_pids("crash").is_empty());
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_limit_leaves_the_instance_in_error_with_the_reason() {
    let sys = System::start_with(Options {
        extra_toml: format!("{QUICK_RESTARTS}restart_limit = 2\n"),
        ..Default::default()
    })
    .await
    .unwrap();
    let (url, hash) = sys.module("broken", &counting(1, 1000)).unwrap();
    sys.deploy(&deployment(
        "dep-1",
        &[("broken", "broken")],
        &[("broken", &url, &hash)],
    ))
    .await
    .unwrap();
    let status = sys
        .wait_status(|s| {
            instance_status(s, "broken") == "error"
                && s["instances"]["broken"]["failureMessage"]
                    .as_str()
                    .is_some_and(|m| m.contains("gave up"))
        })
        .await
        .unwrap();
    assert!(
        status["instances"]["broken"]["failureMessage"]
            .as_str()
            .unwrap()
            .contains("status 1"),
        "{status}"
    );
    assert_eq!(runs(&sys, "broken"), 3, "one run and two restarts");
    sys.stop().await;
}

async fn restart(sys: &System, daemon: &str) {
    sys.stack.kill(daemon, Signal::SIGKILL).unwrap();
    sys.stack.wait_exit(daemon, DEADLINE).await.unwrap();
    sys.stack.start(daemon).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_killed_in_steady_state_readopts_its_instances() {
    let sys = System::start().await.unwrap();
    let pids = sys.run_instances("dep-1", &["one", "two"]).await.unwrap();
    restart(&sys, "evp-runtimed-container").await;
    let runtime = Runtime1Proxy::builder(&sys.conn)
        .destination(RUNTIME_CONTAINER_NAME)
        .path(RUNTIME_CONTAINER_PATH)
        .build()
        .await
        .unwrap();
    let hosted = wait_for(
        "the runtime to re-adopt both instances",
        DEADLINE,
        async || {
            let list = runtime.instances().await.ok()?;
            (list
                .iter()
                .filter(|(_, _, status, _)| status == "ok")
                .count()
                == 2)
                .then_some(list)
        },
    )
    .await
    .unwrap();
    assert!(
        hosted.iter().all(|(_, module, _, _)| module == "a"),
        "{hosted:?}"
    );
    // While reconcilerd re-reads the runtime the status may say `applying`; it settles.
    let status = sys
        .wait_status(|s| {
            s["reconcileStatus"] == "ok"
                && instance_status(s, "one") == "ok"
                && instance_status(s, "two") == "ok"
        })
        .await
        .unwrap();
    assert_eq!(status["deploymentId"], "dep-1");
    assert_eq!(sys.instance_pids("one"), vec![pids[0]]);
    assert_eq!(sys.instance_pids("two"), vec![pids[1]]);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_killed_mid_deployment_still_converges_with_one_process_each() {
    let sys = System::start().await.unwrap();
    let (url, hash) = sys.module("a", "exec /bin/sleep 300").unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("i{i}")).collect();
    let specs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "a")).collect();
    sys.deploy(&deployment("dep-1", &specs, &[("a", &url, &hash)]))
        .await
        .unwrap();
    // As soon as the first instance runs, the runtime dies under the deployment.
    sys.wait_status(|s| instance_status(s, "i0") == "ok")
        .await
        .unwrap();
    restart(&sys, "evp-runtimed-container").await;
    sys.wait_status(|s| {
        s["reconcileStatus"] == "ok" && names.iter().all(|n| instance_status(s, n) == "ok")
    })
    .await
    .unwrap();
    for n in &names {
        assert_eq!(
            sys.instance_pids(n).len(),
            1,
            "{n} does not run exactly once"
        );
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcilerd_killed_mid_download_resumes_it_after_restart() {
    let sys = System::start().await.unwrap();
    let padding = format!("# {}\n", "x".repeat(62)).repeat(256 * 1024 / 65);
    let (_, hash) = sys
        .module("slow", &format!("exec /bin/sleep 300\n{padding}"))
        .unwrap();
    let server = FileServer::start_with(
        sys.modules_dir(),
        Behaviour {
            pace: Some(Duration::from_millis(50)),
            ..Default::default()
        },
    )
    .unwrap();
    let d = deployment(
        "dep-1",
        &[("one", "slow")],
        &[("slow", &server.url("slow"), &hash)],
    );
    sys.deploy(&d).await.unwrap();
    sys.wait_status(|s| s["modules"]["slow"]["bytesDone"].as_u64().unwrap_or(0) >= 32 * 1024)
        .await
        .unwrap();
    restart(&sys, "evp-reconcilerd").await;
    let reconciler = Reconciler1Proxy::new(&sys.conn).await.unwrap();
    wait_for(
        "reconcilerd to finish the deployment",
        DEADLINE,
        async || {
            let v: Value =
                serde_json::from_str(&reconciler.deployment_status().await.ok()?).ok()?;
            (v["reconcileStatus"] == "ok" && instance_status(&v, "one") == "ok").then_some(())
        },
    )
    .await
    .unwrap();
    let resumed = server
        .requests()
        .iter()
        .any(|r| r.range.as_deref().is_some_and(|r| r != "bytes=0-"));
    assert!(
        resumed,
        "the download started over: {:?}",
        server.requests()
    );
    sys.stop().await;
}
