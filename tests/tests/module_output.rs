//! A module's output under a fast writer: its log files stay within `log_max_bytes` per stream
//! at every moment, the runtime's own log gets a bounded share of the lines with the count of
//! the others, and the instance still survives a runtime restart and stops cleanly.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use evp_system_tests::system::{
    System, deploy_and_wait, deployment_of, instance_status, wait_gone,
};
use evp_system_tests::{DEADLINE, wait_for};
use nix::sys::signal::Signal;

/// `[container] log_max_bytes` by default: the most one stream may take on disk.
const STREAM_BOUND: u64 = 1024 * 1024;
/// What the module writes before the runtime is restarted, and again after: a few hundred MB,
/// hundreds of times the bound.
const FLOOD_BEFORE_RESTART: u64 = 200 * 1024 * 1024;
const FLOOD_AFTER_RESTART: u64 = 100 * 1024 * 1024;
/// The longest the flood may take (debug builds on a shared CI machine); the relay moves
/// several hundred MB a second in a release build.
const FLOOD_DEADLINE: Duration = Duration::from_secs(120);
/// The relay's re-logging budget (`relay.rs`): a burst of 500 lines, then 50 a second.
const RELOG_BURST: u64 = 500;
const RELOG_PER_SECOND: u64 = 50;

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The stream's file and its rotated predecessor.
fn stream_files(logs: &Path, stream: &str) -> [PathBuf; 2] {
    [
        logs.join(format!("{stream}.log")),
        logs.join(format!("{stream}.log.1")),
    ]
}

/// Fails unless each stream, both files together, is within the bound right now.
fn assert_bounded(logs: &Path) {
    for stream in ["stdout", "stderr"] {
        let files = stream_files(logs, stream);
        let total: u64 = files.iter().map(|f| size(f)).sum();
        assert!(
            total <= STREAM_BOUND,
            "{stream} takes {total} bytes on disk, over its bound of {STREAM_BOUND}: {:?}",
            files.iter().map(|f| (f, size(f))).collect::<Vec<_>>()
        );
    }
}

/// How many bytes the module had written to stdout, from the last complete line on disk.
fn written(logs: &Path) -> u64 {
    let mut tail = Vec::new();
    for path in stream_files(logs, "stdout").iter().rev() {
        let Ok(mut f) = std::fs::File::open(path) else {
            continue;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let mut part = Vec::new();
        let _ = f.read_to_end(&mut part);
        tail.extend_from_slice(&part);
    }
    let text = String::from_utf8_lossy(&tail);
    text.split('\n')
        .rev()
        .skip(1) // what follows the last newline is not a complete line
        .find_map(|l| l.strip_prefix("flood ")?.get(..12)?.parse().ok())
        .unwrap_or(0)
}

/// Polls the bound while the module writes, until it wrote `until` bytes in all.
async fn flood_until(logs: &Path, until: u64, started: Instant) {
    loop {
        assert_bounded(logs);
        let w = written(logs);
        if w >= until {
            return;
        }
        assert!(
            started.elapsed() < FLOOD_DEADLINE,
            "the module wrote only {w} bytes in {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// PIDs of the log relays of the instance whose logs are in `logs`.
fn relays(logs: &Path) -> Vec<u32> {
    let logs = logs.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.contains(&b"log-relay".as_slice()) && args.contains(&logs.as_bytes())
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_module_stays_within_its_log_bound_across_a_runtime_restart() {
    let sys = System::start().await.unwrap();
    let started = Instant::now();
    deploy_and_wait(
        &sys,
        &deployment_of("dep-1", &[("flood", "evp-test-output-flood")]),
    )
    .await;
    let logs = sys.instance_dir("flood").join("logs");
    let [module] = sys.instance_pids("flood")[..] else {
        panic!("flood should run as one process");
    };
    flood_until(&logs, FLOOD_BEFORE_RESTART, started).await;
    let [relay] = relays(&logs)[..] else {
        panic!("flood should have one log relay: {:?}", relays(&logs));
    };

    // The runtime's log: a bounded share of the lines, and the count of the others.
    let runtime_log = sys
        .stack
        .config()
        .log_dir()
        .join("evp-runtimed-container.log");
    let text = std::fs::read_to_string(&runtime_log).unwrap();
    let relogged = text.lines().filter(|l| l.contains(" flood 0")).count() as u64;
    let budget = RELOG_BURST + RELOG_PER_SECOND * (started.elapsed().as_secs() + 1);
    assert!(
        relogged <= budget,
        "{relogged} lines of output re-logged, over the budget of {budget}"
    );
    assert!(relogged > 0, "no line of the module's output was logged");
    wait_for("the count of lines not logged", DEADLINE, async || {
        std::fs::read_to_string(&runtime_log)
            .ok()?
            .lines()
            .any(|l| l.contains("instance=flood") && l.contains("dropped") && l.contains("lines"))
            .then_some(())
    })
    .await
    .unwrap();
    // Each re-logged line is about 1,100 bytes with its prefix; the rest of the log is small.
    let log_bound = budget * 1200 + STREAM_BOUND;
    assert!(
        size(&runtime_log) < log_bound,
        "the runtime's log grew to {} bytes, over {log_bound}",
        size(&runtime_log)
    );

    // A runtime restart: the module and its relay go on, and the bound holds.
    sys.stack
        .kill("evp-runtimed-container", Signal::SIGKILL)
        .unwrap();
    sys.stack
        .wait_exit("evp-runtimed-container", DEADLINE)
        .await
        .unwrap();
    sys.stack.start("evp-runtimed-container").await.unwrap();
    sys.wait_status(|s| s["reconcileStatus"] == "ok" && instance_status(s, "flood") == "ok")
        .await
        .unwrap();
    assert_eq!(sys.instance_pids("flood"), [module]);
    assert_eq!(relays(&logs), [relay]);
    let resumed = Instant::now();
    flood_until(&logs, written(&logs) + FLOOD_AFTER_RESTART, resumed).await;

    // Undeployed: the module stops, its relay ends with it.
    sys.deploy(&deployment_of("dep-2", &[])).await.unwrap();
    sys.wait_status(|s| {
        s["deploymentId"] == "dep-2"
            && s["reconcileStatus"] == "ok"
            && s["instances"].as_object().is_some_and(|i| i.is_empty())
    })
    .await
    .unwrap();
    wait_gone(&[module, relay]).await.unwrap();
    sys.stop().await;
}
