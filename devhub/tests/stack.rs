//! The stack with stand-in daemons (the `fake-daemon` example, which `cargo test` builds):
//! readiness by bus name, supervision after a SIGKILL, a clean SIGTERM, start, and a stop
//! that leaves nothing running. Needs `dbus-daemon`: without it this test fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use evp_devhub::stack::{DAEMONS, Signal, default_bin_dir};
use evp_devhub::{DaemonOutput, PrivateBus, Stack, StackConfig};

/// Generous bound for process starts and restarts (the first restart waits 1 s).
const WAIT: Duration = Duration::from_secs(15);

fn fake_daemon() -> PathBuf {
    let path = default_bin_dir()
        .expect("the test's folder")
        .join("examples/fake-daemon");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test -p evp-devhub`, which builds the examples",
        path.display()
    );
    path
}

/// Whether `pid` is gone (or only a zombie waiting for its parent).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test]
async fn daemons_start_restart_and_stop_leaving_nothing() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let bus = PrivateBus::start(&tmp.path().join("bus")).expect("starting dbus-daemon");
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).expect("creating bin");
    let fake = fake_daemon();
    for d in DAEMONS {
        std::os::unix::fs::symlink(&fake, bin.join(d.binary)).expect("linking a fake daemon");
    }
    let dir = tmp.path().join("stack");
    std::fs::create_dir_all(&dir).expect("creating the stack folder");

    // Port 1: nothing connects to MQTT here.
    let mut config = StackConfig::new(&dir, bus.address(), "127.0.0.1", 1).expect("config");
    config.bin_dir = bin;
    config.supervise = true;
    config.output = DaemonOutput::LogFiles;
    config.env = vec![("FAKE_DAEMON_CHILD".into(), "evp-runtimed-container".into())];
    let stack = Stack::launch(config).await.expect("launching the stack");
    assert!(dir.join("agent.toml").is_file());
    for name in stack.names() {
        assert!(stack.pid(name).is_some(), "{name} has no pid");
    }
    let child_file = dir.join("evp-runtimed-container.child");
    wait_until("the module stand-in's pid", || {
        read_pid(&child_file).is_some()
    })
    .await;
    let left_behind = read_pid(&child_file).expect("a pid");

    // SIGKILL is a failure: supervision restarts the daemon, and it owns its name again.
    let old = stack.pid("reconcilerd").expect("reconcilerd runs");
    stack
        .kill("evp-reconcilerd", Signal::SIGKILL)
        .expect("killing reconcilerd");
    assert!(
        stack
            .wait_exit("evp-reconcilerd", WAIT)
            .await
            .expect("known")
    );
    wait_until("reconcilerd restarted", || {
        stack.pid("evp-reconcilerd").is_some_and(|p| p != old)
    })
    .await;
    stack
        .wait_ready("evp-reconcilerd", WAIT)
        .await
        .expect("reconcilerd ready again");
    assert_eq!(stack.exits("evp-reconcilerd").expect("known"), 1);

    // SIGTERM is a clean stop; start brings the daemon back.
    stack
        .kill("evp-hubd", Signal::SIGTERM)
        .expect("terminating hubd");
    assert!(stack.wait_exit("evp-hubd", WAIT).await.expect("known"));
    let status = stack
        .last_exit("evp-hubd")
        .expect("known")
        .expect("an exit");
    assert_eq!(status.code(), Some(0), "{status:?}");
    stack.start("evp-hubd").await.expect("starting hubd again");
    assert!(stack.pid("evp-hubd").is_some());
    assert!(stack.kill("evp-nonesuch", Signal::SIGTERM).is_err());

    let pids: Vec<u32> = stack.names().iter().filter_map(|n| stack.pid(n)).collect();
    assert_eq!(pids.len(), 5);
    stack.stop_all().await;
    for name in stack.names() {
        assert_eq!(stack.pid(name), None, "{name} still runs");
    }
    for pid in pids {
        assert!(gone(pid), "daemon {pid} still runs");
    }
    // What a daemon left running was swept too.
    wait_until("the left-behind process is gone", || gone(left_behind)).await;
}
