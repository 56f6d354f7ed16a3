//! WASM modules end to end: written in WAT (runtimed-wasm/tests/modules), deployed from the
//! hub's side, run by runtimed-wasm in wasmtime, their SDK traffic through sdk-broker, and
//! checked as the hub sees them.

use std::path::Path;
use std::time::{Duration, Instant};

use evp_devhub::stack::Signal;
use evp_system_tests::DEADLINE;
use evp_system_tests::system::{Options, System, deploy_and_wait, instance_status, wait_state};
use evp_system_tests::wasm::wasm_module;
use serde_json::{Value, json};

/// `runtimed-wasm/tests/modules/<name>.wat` compiled, written among the test's module files;
/// its deployment entry.
fn wat_module(sys: &System, name: &str) -> Value {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../runtimed-wasm/tests/modules")
        .join(format!("{name}.wat"));
    let bytes = wat::parse_file(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    let path = sys.modules_dir().join(format!("{name}.wasm"));
    std::fs::write(&path, &bytes).unwrap();
    wasm_module(&path)
}

/// A deployment of one instance per `(instance, module)`, each module a WAT file's WASM.
fn wasm_deployment(sys: &System, id: &str, instances: &[(&str, &str)]) -> Value {
    let mut d = json!({
        "deploymentId": id, "instanceSpecs": {}, "modules": {},
        "publishTopics": {}, "subscribeTopics": {}
    });
    for (instance, module) in instances {
        d["modules"][*module] = wat_module(sys, module);
        d["instanceSpecs"][*instance] = json!({"moduleId": module, "publish": {}, "subscribe": {}});
    }
    d
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasm_module_echoes_configuration_as_state_and_answers_commands() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &wasm_deployment(&sys, "dep-1", &[("echo", "config_echo")]),
    )
    .await;
    sys.hub
        .set_configuration("echo", "greeting", "hello")
        .await
        .unwrap();
    wait_state(&sys, "state/echo/greeting", |v| v == "hello").await;
    let wait = Duration::from_secs(20);
    let ok = sys
        .hub
        .call("echo", "echo", r#"{"text":"hi"}"#, 20042, wait)
        .await
        .unwrap();
    assert_eq!(ok["status"], "ok", "{ok}");
    assert_eq!(ok["response"], r#"{"text":"hi"}"#);
    let unknown = sys
        .hub
        .call("echo", "nope", "{}", 20043, wait)
        .await
        .unwrap();
    assert_eq!(unknown["status"], "error", "{unknown}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trapping_wasm_module_is_error_with_the_trap_message() {
    let sys = System::start().await.unwrap();
    sys.deploy(&wasm_deployment(&sys, "dep-1", &[("t", "trap")]))
        .await
        .unwrap();
    let status = sys
        .wait_status(|s| {
            instance_status(s, "t") == "error"
                && s["instances"]["t"]["failureMessage"]
                    .as_str()
                    .is_some_and(|m| m.contains("unreachable"))
        })
        .await
        .unwrap();
    let message = status["instances"]["t"]["failureMessage"].as_str().unwrap();
    assert!(message.contains("_start failed"), "{message}");
    sys.stop().await;
}

/// Removing a module that never returns to the SDK takes the WASM stop grace (5 s) and then
/// interrupts it; meanwhile another instance's configuration comes back as state.
#[tokio::test(flavor = "multi_thread")]
async fn a_spinning_wasm_module_is_stopped_after_the_grace_while_another_instance_answers() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &wasm_deployment(&sys, "dep-1", &[("spin", "spin"), ("echo", "config_echo")]),
    )
    .await;
    let started = Instant::now();
    sys.deploy(&wasm_deployment(&sys, "dep-2", &[("echo", "config_echo")]))
        .await
        .unwrap();
    // The stop is under way (the reconciler waits out the grace)...
    sys.hub
        .set_configuration("echo", "during", "the stop")
        .await
        .unwrap();
    wait_state(&sys, "state/echo/during", |v| v == "the stop").await;
    let answered = started.elapsed();
    // ...and ends once the grace is over and the instance was interrupted.
    sys.wait_status(|s| {
        s["deploymentId"] == "dep-2"
            && s["reconcileStatus"] == "ok"
            && s["instances"].get("spin").is_none()
    })
    .await
    .unwrap();
    let stopped = started.elapsed();
    assert!(
        answered < Duration::from_secs(4),
        "the other instance answered after {answered:?}"
    );
    assert!(
        stopped >= Duration::from_secs(5) && stopped < Duration::from_secs(15),
        "the stop took {stopped:?}"
    );
    assert_eq!(
        instance_status(&sys.wait_status(|_| true).await.unwrap(), "echo"),
        "ok"
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasm_module_writes_its_workspace_and_its_output_is_logged_by_line() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(&sys, &wasm_deployment(&sys, "dep-1", &[("w", "workspace")])).await;
    let note = sys.instance_dir("w").join("default_workspace/note");
    let log = sys.stack.config().log_dir().join("evp-runtimed-wasm.log");
    evp_system_tests::wait_for("the note and its log line", DEADLINE, async || {
        let logged = std::fs::read_to_string(&log).ok()?;
        (std::fs::read(&note).ok()? == b"hello" && logged.contains("wasm:w/stdout: wrote note"))
            .then_some(())
    })
    .await
    .unwrap();
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn threads_share_memory_and_the_memory_limit_is_the_instance_failure() {
    let sys = System::start_with(Options {
        extra_toml: "[wasm]\nmemory_limit_bytes = 1048576\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    sys.deploy(&wasm_deployment(
        &sys,
        "dep-1",
        &[("th", "threads"), ("g", "grow")],
    ))
    .await
    .unwrap();
    wait_state(&sys, "state/th/threads", |v| v == "60").await;
    let status = sys
        .wait_status(|s| instance_status(s, "g") == "error")
        .await
        .unwrap();
    let message = status["instances"]["g"]["failureMessage"].as_str().unwrap();
    assert!(message.contains("memory limit reached"), "{message}");
    assert!(message.contains("1048576"), "{message}");
    sys.stop().await;
}

/// WASM instances are threads of runtimed-wasm: killed with it, they are started again by
/// reconcilerd when it is back, and the device reconverges by itself.
#[tokio::test(flavor = "multi_thread")]
async fn wasm_instances_run_again_after_runtimed_wasm_is_killed() {
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &wasm_deployment(&sys, "dep-1", &[("echo", "config_echo")]),
    )
    .await;
    sys.hub
        .set_configuration("echo", "first", "1")
        .await
        .unwrap();
    wait_state(&sys, "state/echo/first", |v| v == "1").await;
    sys.stack
        .kill("evp-runtimed-wasm", Signal::SIGKILL)
        .unwrap();
    sys.stack
        .wait_exit("evp-runtimed-wasm", DEADLINE)
        .await
        .unwrap();
    sys.stack.start("evp-runtimed-wasm").await.unwrap();
    sys.hub
        .set_configuration("echo", "second", "2")
        .await
        .unwrap();
    wait_state(&sys, "state/echo/second", |v| v == "2").await;
    let status = sys
        .wait_status(|s| s["reconcileStatus"] == "ok" && instance_status(s, "echo") == "ok")
        .await
        .unwrap();
    assert_eq!(status["deploymentId"], "dep-1");
    sys.stop().await;
}

/// `(RSS, PSS)` of a process in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let field = |name: &str| -> u64 {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    (field("Rss:"), field("Pss:"))
}

/// 100 idle WASM instances (blocked in `EVP_processEvent`) cost runtimed-wasm well under
/// 0.5 MiB each beyond their linear memory (the module touches 2 pages of it); the figures are
/// printed (`--nocapture`).
#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_idle_wasm_instances_cost_little_host_memory() {
    const N: usize = 100;
    let sys = System::start().await.unwrap();
    deploy_and_wait(
        &sys,
        &wasm_deployment(&sys, "dep-1", &[("warm", "config_echo")]),
    )
    .await;
    sys.hub.set_configuration("warm", "t", "v").await.unwrap();
    wait_state(&sys, "state/warm/t", |v| v == "v").await;
    let pid = sys.stack.pid("evp-runtimed-wasm").unwrap();
    let (rss0, pss0) = memory_kib(pid);
    let names: Vec<String> = (0..N).map(|i| format!("i{i}")).collect();
    let mut specs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "config_echo")).collect();
    specs.push(("warm", "config_echo"));
    let started = Instant::now();
    deploy_and_wait(&sys, &wasm_deployment(&sys, "dep-2", &specs)).await;
    let all_ok = started.elapsed();
    for n in &names {
        sys.hub.set_configuration(n, "t", "v").await.unwrap();
    }
    for n in &names {
        wait_state(&sys, &format!("state/{n}/t"), |v| v == "v").await;
    }
    let (rss1, pss1) = memory_kib(pid);
    let per_rss = (rss1.saturating_sub(rss0)) as f64 / N as f64;
    let per_pss = (pss1.saturating_sub(pss0)) as f64 / N as f64;
    println!(
        "runtimed-wasm: {rss0} KiB RSS / {pss0} KiB PSS with 1 instance, {rss1} / {pss1} with {}; \
         {per_rss:.1} KiB RSS, {per_pss:.1} KiB PSS per idle instance; {N} instances ok at the hub \
         {all_ok:?} after the deployment",
        N + 1
    );
    assert!(per_pss < 512.0, "{per_pss} KiB per idle instance");
    sys.stop().await;
}
