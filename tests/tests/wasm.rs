//! runtimed-wasm as a daemon, with modules written in WAT (runtimed-wasm/tests/modules) whose
//! linear memory is known to the page: killed and back, and its cost per idle instance. What
//! the C test modules show end to end is `wasm_modules.rs`'s.

use std::path::Path;
use std::time::Instant;

use evp_system_tests::system::{
    System, deploy_and_wait, echo_round_trip, instance_status, wait_state,
};
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
    echo_round_trip(&sys, "echo", "first", "1").await;
    sys.kill_and_start("evp-runtimed-wasm").await.unwrap();
    echo_round_trip(&sys, "echo", "second", "2").await;
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
