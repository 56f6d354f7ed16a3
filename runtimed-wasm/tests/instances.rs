//! runtimed-wasm's supervisor and instances against a stand-in for sdk-broker, without D-Bus:
//! modules written in WAT (`tests/modules/`) loaded, started, driven through the SDK, failing
//! and stopped as the daemon does it.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evp_runtimed_wasm::WasmConfig;
use evp_runtimed_wasm::engine::WasmEngine;
use evp_runtimed_wasm::supervisor::{InstanceEvent, Supervisor};
use evp_schemas::InstanceState;
use evp_schemas::dbus::EvpError;
use sha2::{Digest, Sha256};
use support::broker::FakeBroker;
use tokio::sync::mpsc::UnboundedReceiver;

struct Rig {
    dir: tempfile::TempDir,
    supervisor: Arc<Supervisor>,
    events: UnboundedReceiver<InstanceEvent>,
}

fn rig_with(settings: WasmConfig) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let engine = WasmEngine::on_demand(&settings).unwrap();
    let (supervisor, events) = Supervisor::new(
        engine,
        settings,
        dir.path().join("instances"),
        &dir.path().join("cache"),
    )
    .unwrap();
    Rig {
        dir,
        supervisor,
        events,
    }
}

fn rig() -> Rig {
    rig_with(WasmConfig::default())
}

/// The WASM binary of `tests/modules/<name>.wat`.
fn wasm(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/modules/{name}.wat"));
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

impl Rig {
    /// Writes `bytes` as a module file; its path and SHA-256.
    fn module_file(&self, name: &str, bytes: &[u8]) -> (String, String) {
        let path = self.dir.path().join(format!("{name}.wasm"));
        std::fs::write(&path, bytes).unwrap();
        (
            path.to_str().unwrap().to_owned(),
            hex::encode(Sha256::digest(bytes)),
        )
    }

    async fn load(&self, id: &str, module: &str) {
        let (path, sha) = self.module_file(id, &wasm(module));
        self.supervisor
            .load_module(id, "wasm", &path, &sha)
            .await
            .unwrap();
    }

    async fn start(&self, instance: &str, module_id: &str, broker: &FakeBroker) {
        let (pid, uid) = self
            .supervisor
            .start_instance(instance, module_id, Some(broker.socket.clone()))
            .await
            .unwrap();
        assert_eq!(pid, std::process::id());
        // SAFETY: geteuid has no preconditions.
        assert_eq!(uid, unsafe { libc::geteuid() });
    }

    /// Waits for `instance` to reach `state` and returns the change.
    async fn wait(&mut self, instance: &str, state: InstanceState) -> InstanceEvent {
        let wait = async {
            loop {
                let e = self.events.recv().await.expect("the event stream ended");
                if e.instance == instance && e.state == state {
                    return e;
                }
                assert!(
                    e.instance != instance || e.state != InstanceState::Error,
                    "{instance} failed: {}",
                    e.failure_message
                );
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("{instance} never became {}", state.as_str()))
    }

    fn broker(&self, name: &str) -> FakeBroker {
        FakeBroker::start(self.dir.path(), name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_comes_back_as_state_and_commands_are_answered() {
    let mut rig = rig();
    rig.load("echo", "config_echo").await;
    let broker = rig.broker("echo");
    rig.start("echo", "echo", &broker).await;
    rig.wait("echo", InstanceState::Ok).await;
    broker.configure("greeting", b"hello");
    assert_eq!(broker.wait_state("greeting"), b"hello");
    broker.call(7, "echo", r#"{"a":1}"#);
    assert_eq!(broker.wait_rpc_answer(7), (r#"{"a":1}"#.to_owned(), 0));
    broker.call(8, "nope", "{}");
    assert_eq!(broker.wait_rpc_answer(8), (String::new(), 1));
    // The exit protocol: the module sees SHOULDEXIT and returns from main.
    broker.exit();
    rig.wait("echo", InstanceState::SelfExiting).await;
    assert_eq!(broker.connections(), 1);
    // A second start of the same name is a new instance on the same module.
    let again = rig.broker("echo-again");
    rig.start("echo", "echo", &again).await;
    again.configure("t", b"2");
    assert_eq!(again.wait_state("t"), b"2");
}

/// While an instance restarts, sdk-broker refuses its connection until the socket is bound to
/// the new start: the instance connects again instead of taking the refusal as the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_first_connection_is_made_again() {
    let mut rig = rig();
    rig.load("echo", "config_echo").await;
    let broker = rig.broker("echo");
    broker.refuse(2);
    rig.start("echo", "echo", &broker).await;
    broker.configure("t", b"v");
    assert_eq!(broker.wait_state("t"), b"v");
    assert_eq!(broker.connections(), 3);
    rig.wait("echo", InstanceState::Ok).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_is_an_error_with_wasmtimes_message() {
    let mut rig = rig();
    rig.load("trap", "trap").await;
    rig.start("t", "trap", &rig.broker("t")).await;
    let e = rig.wait("t", InstanceState::Error).await;
    assert!(
        e.failure_message.starts_with("_start failed: "),
        "{}",
        e.failure_message
    );
    assert!(
        e.failure_message.contains("unreachable"),
        "{}",
        e.failure_message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_from_start_is_self_exiting() {
    let mut rig = rig();
    rig.load("r", "returns").await;
    rig.start("r", "r", &rig.broker("r")).await;
    let e = rig.wait("r", InstanceState::SelfExiting).await;
    assert_eq!(e.failure_message, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_past_the_memory_limit_is_the_instance_failure() {
    let mut rig = rig_with(WasmConfig {
        memory_limit_bytes: 1 << 20,
        ..WasmConfig::default()
    });
    rig.load("g", "grow").await;
    rig.start("g", "g", &rig.broker("g")).await;
    let e = rig.wait("g", InstanceState::Error).await;
    assert!(
        e.failure_message.contains("memory limit reached"),
        "{}",
        e.failure_message
    );
    assert!(
        e.failure_message.contains("1048576"),
        "{}",
        e.failure_message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_instance_is_interrupted_after_the_grace_without_holding_up_another() {
    let mut rig = rig_with(WasmConfig {
        stop_grace_ms: 500,
        ..WasmConfig::default()
    });
    rig.load("spin", "spin").await;
    rig.load("echo", "config_echo").await;
    let echo = rig.broker("echo");
    rig.start("spin", "spin", &rig.broker("spin")).await;
    rig.start("echo", "echo", &echo).await;
    rig.wait("echo", InstanceState::Ok).await;
    let supervisor = Arc::clone(&rig.supervisor);
    let started = Instant::now();
    let stop = tokio::spawn(async move {
        supervisor
            .stop_instance("spin", Duration::from_secs(10))
            .await
    });
    // While the stop waits out the grace, the other instance answers.
    echo.configure("during", b"stop");
    assert_eq!(echo.wait_state("during"), b"stop");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    stop.await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_secs(2), "the interrupt took {took:?}");
    rig.wait("spin", InstanceState::Stopped).await;
    assert_eq!(
        rig.supervisor
            .instances()
            .iter()
            .map(|i| i.0.as_str())
            .collect::<Vec<_>>(),
        ["echo"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_blocked_in_process_event_is_released_by_a_stop() {
    let mut rig = rig_with(WasmConfig {
        stop_grace_ms: 200,
        ..WasmConfig::default()
    });
    rig.load("echo", "config_echo").await;
    let broker = rig.broker("echo");
    rig.start("echo", "echo", &broker).await;
    broker.configure("t", b"v");
    broker.wait_state("t");
    let started = Instant::now();
    rig.supervisor
        .stop_instance("echo", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    rig.wait("echo", InstanceState::Stopped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workspace_is_preopened_at_its_own_path() {
    let mut rig = rig();
    rig.load("w", "workspace").await;
    rig.start("w", "w", &rig.broker("w")).await;
    rig.wait("w", InstanceState::Ok).await;
    let note = rig.dir.path().join("instances/w/default_workspace/note");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read(&note).ok().as_deref() != Some(b"hello") {
        assert!(
            Instant::now() < deadline,
            "{} was not written",
            note.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The staging files of memory blob operations in `workspace`.
fn staging_files(workspace: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(workspace)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| evp_runtimed_wasm::memory_blob::is_staging_name(n))
        .collect()
}

/// An exit ends a memory PUT still being produced and a memory GET under way with EXIT
/// before the module is told to exit, and removes their staging files; a leftover of an
/// earlier run is removed at the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_ends_memory_blob_operations_and_removes_their_staging_files() {
    let mut rig = rig();
    rig.load("m", "memory_blob").await;
    let workspace = rig.dir.path().join("instances/m/default_workspace");
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::write(workspace.join(".evp-memory-blob-9"), b"old").unwrap();
    let broker = rig.broker("m");
    rig.start("m", "m", &broker).await;
    // Configured once its callback is registered, so no configuration comes twice.
    broker.wait_state("ready");
    assert_eq!(staging_files(&workspace), Vec::<String>::new());
    broker.configure("get", b"");
    let blobs = broker.wait_blobs(1);
    assert_eq!(blobs[0].0, 0, "{blobs:?}");
    assert!(
        std::path::Path::new(&blobs[0].1).starts_with(&workspace),
        "{blobs:?}"
    );
    broker.configure("put", b"");
    assert_eq!(broker.wait_state("producing"), b"h");
    // The first chunk is written once the io callback returned.
    let deadline = Instant::now() + Duration::from_secs(20);
    while staging_files(&workspace).len() < 2 {
        assert!(Instant::now() < deadline, "{:?}", staging_files(&workspace));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker.exit();
    // EXIT is reason 1.
    assert_eq!(broker.wait_state("done"), b"1");
    assert_eq!(broker.wait_state("getdone"), b"1");
    rig.wait("m", InstanceState::SelfExiting).await;
    assert_eq!(staging_files(&workspace), Vec::<String>::new());
    // The PUT never reached the broker.
    let blobs = broker.wait_blobs(1);
    assert_eq!(blobs.len(), 1, "{blobs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_on_a_shared_memory_run_and_join() {
    let mut rig = rig();
    rig.load("th", "threads").await;
    let broker = rig.broker("th");
    rig.start("th", "th", &broker).await;
    assert_eq!(broker.wait_state("threads"), b"60");
    // Sent by a thread while the main thread waits in EVP_processEvent.
    assert_eq!(broker.wait_state("late"), b"ok");
    broker.exit();
    rig.wait("th", InstanceState::SelfExiting).await;
}

/// A trap in any thread ends the instance, even while its main thread waits in the SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_in_a_thread_is_the_instance_failure() {
    let mut rig = rig();
    let module = wat::parse_str(
        r#"(module
          (import "env" "memory" (memory 1 1 shared))
          (import "wasi" "thread-spawn" (func $spawn (param i32) (result i32)))
          (import "env" "EVP_processEvent" (func $process (param i32 i32) (result i32)))
          (func (export "wasi_thread_start") (param i32 i32) unreachable)
          (func (export "malloc") (param i32) (result i32) (i32.const 0)) (func (export "free") (param i32))
          (func (export "_start")
            (drop (call $spawn (i32.const 1)))
            (loop $events (br_if $events (i32.ne (call $process (i32.const 0x1234) (i32.const -1)) (i32.const 1))))))"#,
    )
    .unwrap();
    let (path, sha) = rig.module_file("tt", &module);
    rig.supervisor
        .load_module("tt", "wasm", &path, &sha)
        .await
        .unwrap();
    rig.start("tt", "tt", &rig.broker("tt")).await;
    let e = rig.wait("tt", InstanceState::Error).await;
    assert!(
        e.failure_message
            .starts_with("thread 1: wasi_thread_start failed: ")
            && e.failure_message.contains("unreachable"),
        "{}",
        e.failure_message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_that_cannot_run_are_refused_at_load_with_the_reason() {
    let rig = rig();
    let refused = async |name: &str, bytes: &[u8], sha: Option<&str>| -> String {
        let (path, actual) = rig.module_file(name, bytes);
        match rig
            .supervisor
            .load_module(name, "wasm", &path, sha.unwrap_or(&actual))
            .await
        {
            Err(EvpError::InvalidArgument(m)) => m,
            other => panic!("{name}: {other:?}"),
        }
    };
    let m = refused("garbage", b"\0asm\x01\0\0\0\x7f", None).await;
    assert!(m.contains("does not validate"), "{m}");
    let m = refused("hash", &wasm("returns"), Some(&"0".repeat(64))).await;
    assert!(m.starts_with("Module hash mismatch"), "{m}");
    let unknown = wat::parse_str(
        r#"(module (import "env" "EVP_nope" (func)) (memory (export "memory") 1) (func (export "_start"))
          (func (export "malloc") (param i32) (result i32) (i32.const 0)) (func (export "free") (param i32)))"#,
    )
    .unwrap();
    let m = refused("unknown", &unknown, None).await;
    assert!(m.contains("EVP_nope"), "{m}");
    let wrong_type = wat::parse_str(
        r#"(module (import "env" "EVP_initialize" (func (result i64))) (memory (export "memory") 1) (func (export "_start"))
          (func (export "malloc") (param i32) (result i32) (i32.const 0)) (func (export "free") (param i32)))"#,
    )
    .unwrap();
    let m = refused("wrong", &wrong_type, None).await;
    assert!(m.contains("EVP_initialize"), "{m}");
    let no_start = wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap();
    let m = refused("nostart", &no_start, None).await;
    assert!(m.contains("_start"), "{m}");
    let e = rig
        .supervisor
        .load_module("k", "spawn", "/x", &"0".repeat(64))
        .await
        .unwrap_err();
    assert!(matches!(e, EvpError::InvalidArgument(_)), "{e:?}");
}

/// `(RSS, PSS)` of this process in KiB.
fn memory_kib() -> (u64, u64) {
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    (field(&rollup, "Rss:"), field(&rollup, "Pss:"))
}

/// An idle instance (blocked in `EVP_processEvent`) costs well under 0.5 MiB of host memory
/// beyond its linear memory (this module touches 2 pages of it). The figure is printed
/// (`--nocapture`) for ARCHITECTURE.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instances_cost_little_host_memory() {
    const N: usize = 100;
    let mut rig = rig();
    rig.load("echo", "config_echo").await;
    // One instance first, so what every instance shares (code, runtime) is counted before.
    let first = rig.broker("warm");
    rig.start("warm", "echo", &first).await;
    first.configure("t", b"v");
    first.wait_state("t");
    let (rss0, pss0) = memory_kib();
    let mut brokers = Vec::new();
    let started = Instant::now();
    for i in 0..N {
        let name = format!("i{i}");
        let broker = rig.broker(&name);
        rig.start(&name, "echo", &broker).await;
        broker.configure("t", b"v");
        brokers.push(broker);
    }
    let starts = started.elapsed();
    for b in &brokers {
        b.wait_state("t");
    }
    let (rss1, pss1) = memory_kib();
    let per_rss = (rss1 - rss0) as f64 / N as f64;
    let per_pss = (pss1.saturating_sub(pss0)) as f64 / N as f64;
    println!(
        "idle instance: {per_rss:.1} KiB RSS, {per_pss:.1} KiB PSS each ({N} instances, \
         fake broker threads included); {N} starts took {starts:?}"
    );
    assert!(per_rss < 512.0, "{per_rss} KiB per idle instance");
    for b in &brokers {
        b.exit();
    }
    let mut left = N;
    while left > 0 {
        let e = tokio::time::timeout(Duration::from_secs(20), rig.events.recv())
            .await
            .unwrap()
            .unwrap();
        if e.state == InstanceState::SelfExiting && e.instance.starts_with('i') {
            left -= 1;
        }
    }
}
