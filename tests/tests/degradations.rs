//! Slow degradations of a long-lived device: configurations for instances that are not
//! deployed, and the descriptors each instance costs the daemons (the open-file limit is the
//! ceiling of the instances a device runs).

use evp_system_tests::system::{Options, System, deploy_and_wait, deployment_of, wait_state};
use evp_system_tests::{DEADLINE, wait_for};

/// Open descriptors of `daemon`'s process.
fn fds(sys: &System, daemon: &str) -> usize {
    let pid = sys.stack.pid(daemon).expect("the daemon runs");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("reading {daemon}'s descriptors: {e}"))
}

/// What `daemon`'s descriptors are, by kind (`socket`, `anon_inode:[pidfd]`, a file's folder).
fn fd_kinds(sys: &System, daemon: &str) -> std::collections::BTreeMap<String, usize> {
    let pid = sys.stack.pid(daemon).expect("the daemon runs");
    let mut kinds = std::collections::BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        let kind = match target.split_once(':') {
            _ if target.starts_with("anon_inode") => target.into_owned(),
            Some((k, _)) if !target.starts_with('/') => k.to_owned(),
            _ => std::path::Path::new(&*target)
                .parent()
                .map_or_else(String::new, |p| p.display().to_string()),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

/// `n` instances of the configuration echo module (an SDK client that stays up).
fn echoes(id: &str, n: usize) -> serde_json::Value {
    let names: Vec<String> = (0..n).map(|i| format!("echo-{i}")).collect();
    let specs: Vec<(&str, &str)> = names
        .iter()
        .map(|n| (n.as_str(), "evp-test-config-echo"))
        .collect();
    deployment_of(id, &specs)
}

/// The measurement behind the instance count README.md gives: descriptors that
/// runtimed-container and sdk-broker hold per spawned SDK instance. Not run in CI (tens of
/// instances); `cargo test -p evp-system-tests --test degradations -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: run by hand"]
async fn descriptors_per_spawned_instance() {
    const MORE: usize = 40;
    let sys = System::start().await.unwrap();
    deploy_and_wait(&sys, &echoes("one", 1)).await;
    let base = ["evp-runtimed-container", "evp-sdk-broker"].map(|d| fds(&sys, d));
    deploy_and_wait(&sys, &echoes("many", 1 + MORE)).await;
    let after = ["evp-runtimed-container", "evp-sdk-broker"].map(|d| fds(&sys, d));
    for (i, daemon) in ["runtimed-container", "sdk-broker"].iter().enumerate() {
        let per = (after[i] - base[i]) as f64 / MORE as f64;
        println!(
            "{daemon}: {} descriptors with 1 instance, {} with {}: {per:.2} per instance; \
             ceiling at a soft limit of 1024: about {} instances",
            base[i],
            after[i],
            1 + MORE,
            ((1024 - base[i]) as f64 / per) as usize
        );
    }
    for daemon in ["evp-runtimed-container", "evp-sdk-broker"] {
        println!(
            "{daemon} with {} instances: {:?}",
            1 + MORE,
            fd_kinds(&sys, daemon)
        );
    }
    sys.stop().await;
}

/// The configuration file sdk-broker keeps for `instance`.
fn config_file(sys: &System, instance: &str) -> std::path::PathBuf {
    sys.data_dir()
        .join("sdk/config")
        .join(format!("{instance}.json"))
}

async fn wait_gone(sys: &System, instance: &str) {
    let file = config_file(sys, instance);
    wait_for(
        &format!("{} to be collected", file.display()),
        DEADLINE,
        async || (!file.exists()).then_some(()),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn configurations_of_instances_not_deployed_are_collected_after_the_grace() {
    let sys = System::start_with(Options {
        extra_toml: "[sdk_broker]\norphan_config_grace_ms = 300\n".into(),
        ..Options::default()
    })
    .await
    .unwrap();
    // As EVP hubs do, the configuration comes before the deployment of its instance; another
    // is for an instance the hub never deploys.
    sys.hub
        .set_configuration("echo", "greeting", "hi")
        .await
        .unwrap();
    sys.hub
        .set_configuration("ghost", "greeting", "boo")
        .await
        .unwrap();
    let (echo, ghost) = (config_file(&sys, "echo"), config_file(&sys, "ghost"));
    wait_for("both configurations on disk", DEADLINE, async || {
        (echo.exists() && ghost.exists()).then_some(())
    })
    .await
    .unwrap();
    deploy_and_wait(
        &sys,
        &deployment_of("d1", &[("echo", "evp-test-config-echo")]),
    )
    .await;
    wait_state(&sys, "state/echo/greeting", |v| v == "hi").await;
    // The deployment's routing starts the grace of every instance it leaves out.
    wait_gone(&sys, "ghost").await;
    assert!(echo.exists(), "a deployed instance's configuration stays");
    // Past the grace, the deployed instance still gets new values.
    sys.hub
        .set_configuration("echo", "other", "there")
        .await
        .unwrap();
    wait_state(&sys, "state/echo/other", |v| v == "there").await;
    // Once the instance leaves the deployment, its configuration goes too.
    deploy_and_wait(&sys, &deployment_of("d2", &[])).await;
    wait_gone(&sys, "echo").await;
    sys.stop().await;
}
