//! Tests of the runtime's own restart: instances outlive it, their records and output files
//! let the next run re-adopt them or say that they died.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::logs::{self, LogPolicy};
use crate::process;
use crate::record::{self, InstanceRecord, ProcessHandle, RECORD_VERSION};
use crate::relay;
use crate::runtime::{
    DIED_WHILE_AWAY, EXIT_STATUS_UNKNOWN, InstanceEvent, InstanceOptions, OnExit, Runtime,
    Supervisor,
};
use crate::spawn::SpawnRuntime;

/// Upper bound for any awaited condition; generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(20);
/// Pause between two checks of a polled condition.
const POLL: Duration = Duration::from_millis(10);

/// A module that writes its PID to `ready` in its workspace and runs until stopped.
const RUNS: &str = "echo $$ > \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/ready.tmp\"\nmv \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/ready.tmp\" \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/ready\"\nwhile :; do sleep 0.05; done";

/// One data directory that successive supervisors (runs of the daemon) share.
struct Device {
    dir: TempDir,
}

impl Device {
    fn new() -> Device {
        Device {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn instances(&self) -> PathBuf {
        self.dir.path().join("instances")
    }

    fn instance_dir(&self, name: &str) -> PathBuf {
        self.instances().join(name)
    }

    /// A supervisor over this device's instances: one run of the daemon.
    fn supervisor(
        &self,
        logs: LogPolicy,
    ) -> (Arc<Supervisor>, mpsc::UnboundedReceiver<InstanceEvent>) {
        Supervisor::new(
            self.instances(),
            vec![Arc::new(SpawnRuntime::new(logs)) as Arc<dyn Runtime>],
        )
    }

    /// Writes an executable /bin/sh module and returns its path and SHA-256.
    fn module_file(&self, name: &str, script: &str) -> (String, String) {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sha = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
        (path.to_str().unwrap().to_owned(), sha)
    }

    /// Records `process` as instance `name` of module `m`, as a previous run would have.
    fn record(&self, name: &str, process: ProcessHandle) {
        let dir = self.instance_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        logs::create_dir(&dir).unwrap();
        record::save(
            &dir,
            &InstanceRecord {
                version: RECORD_VERSION,
                module_id: "m".into(),
                kind: "spawn".into(),
                module_location: "/bin/sleep".into(),
                process: Some(process),
                ended: None,
                uid: None,
                container: None,
            },
        )
        .unwrap();
    }

    fn load_record(&self, name: &str) -> Option<InstanceRecord> {
        record::load(&self.instance_dir(name)).unwrap()
    }

    /// The PID the `RUNS` module wrote once it runs.
    async fn ready_pid(&self, name: &str) -> i32 {
        let path = self.instance_dir(name).join("default_workspace/ready");
        wait_until(&format!("{} to appear", path.display()), || path.exists()).await;
        std::fs::read_to_string(&path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

fn status(sup: &Supervisor, instance: &str) -> Option<(String, String, String)> {
    sup.instances()
        .into_iter()
        .find(|i| i.0 == instance)
        .map(|i| (i.1, i.2, i.3))
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `instance` has `want` as status and returns its failure message.
async fn wait_status(sup: &Supervisor, instance: &str, want: &str) -> String {
    wait_until(&format!("{instance} to be {want}"), || {
        status(sup, instance).is_some_and(|s| s.1 == want)
    })
    .await;
    status(sup, instance).map(|s| s.2).unwrap_or_default()
}

fn drain(events: &mut mpsc::UnboundedReceiver<InstanceEvent>) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    while let Ok(ev) = events.try_recv() {
        out.push((
            ev.instance,
            ev.status.as_str().to_owned(),
            ev.failure_message,
        ));
    }
    out
}

fn ev(instance: &str, status: &str, message: &str) -> (String, String, String) {
    (instance.into(), status.into(), message.into())
}

fn alive(pid: i32) -> bool {
    process::stat(pid).unwrap().is_some_and(|s| !s.exited)
}

fn handle_of(pid: i32) -> ProcessHandle {
    let stat = process::stat(pid).unwrap().expect("the process exists");
    ProcessHandle {
        pid,
        start_time: stat.start_time,
    }
}

/// Starts `sleep 60` as a process that is not this one's child (its parent shell exits at once)
/// and leads its own session and process group, as a module left by an earlier run would be.
fn orphan_sleep() -> i32 {
    let out = std::process::Command::new("/bin/sh")
        .args(["-c", "setsid sleep 60 </dev/null >/dev/null 2>&1 & echo $!"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Kills a test process that may outlive a failed test.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A runtime restart, simulated by dropping the first run's whole tokio runtime (its tasks,
/// and with them the child handle, go away without stopping anything) and starting a second
/// supervisor over the same directory: the module keeps its PID, is `ok` again, a StartInstance
/// of the same module is a no-op without any LoadModule, and it stops as before.
#[test]
fn a_live_instance_is_readopted_after_a_restart_and_stops_as_before() {
    let device = Device::new();
    let (module, sha) = device.module_file("m", RUNS);
    let first = current_thread_runtime();
    let pid = first.block_on(async {
        let (sup, _events) = device.supervisor(LogPolicy::in_process(logs::DEFAULT_LOG_MAX_BYTES));
        sup.load_module("m", "spawn", &module, &sha).await.unwrap();
        sup.start_instance("i", "m", InstanceOptions::default())
            .await
            .unwrap();
        device.ready_pid("i").await
    });
    let _guard = KillOnDrop(pid);
    let recorded = device.load_record("i").unwrap();
    assert_eq!(recorded.process.map(|p| p.pid), Some(pid));
    assert_eq!(recorded.ended, None);
    drop(first);
    assert!(alive(pid), "the module died with the runtime");

    current_thread_runtime().block_on(async {
        let (sup, mut events) =
            device.supervisor(LogPolicy::in_process(logs::DEFAULT_LOG_MAX_BYTES));
        let recovery = sup.recover().await;
        assert_eq!(recovery.adopted, ["i"]);
        assert_eq!(
            status(&sup, "i"),
            Some(("m".into(), "ok".into(), String::new()))
        );
        sup.start_instance("i", "m", InstanceOptions::default())
            .await
            .unwrap();
        assert!(matches!(
            sup.unload_module("m").await,
            Err(evp_schemas::dbus::EvpError::Busy(_))
        ));
        assert_eq!(drain(&mut events), [ev("i", "ok", "")]);
        assert!(alive(pid));

        sup.stop_instance("i", DEADLINE).await.unwrap();
        assert!(!alive(pid), "the re-adopted module survived its stop");
        assert!(sup.instances().is_empty());
        assert_eq!(drain(&mut events), [ev("i", "stopped", "")]);
        assert_eq!(device.load_record("i"), None);
    });
}

/// A process that is not the runtime's child (the pidfd path): re-adopted as `ok`, and its
/// exit, whose status cannot be known, is an `error` saying so, kept in the record.
#[tokio::test]
async fn a_readopted_process_that_exits_is_an_error_with_unknown_status() {
    let device = Device::new();
    let pid = orphan_sleep();
    let _guard = KillOnDrop(pid);
    device.record("ext", handle_of(pid));
    let (sup, mut events) = device.supervisor(LogPolicy::in_process(logs::DEFAULT_LOG_MAX_BYTES));
    assert_eq!(sup.recover().await.adopted, ["ext"]);
    assert_eq!(wait_status(&sup, "ext", "ok").await, "");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(wait_status(&sup, "ext", "error").await, EXIT_STATUS_UNKNOWN);
    assert_eq!(
        drain(&mut events),
        [ev("ext", "ok", ""), ev("ext", "error", EXIT_STATUS_UNKNOWN)]
    );
    let ended = device.load_record("ext").unwrap().ended.unwrap();
    assert_eq!(
        (ended.status.as_str(), ended.failure_message.as_str()),
        ("error", EXIT_STATUS_UNKNOWN)
    );

    // The next run reports the same, not "exited while ... not running".
    let (next, _) = device.supervisor(LogPolicy::in_process(logs::DEFAULT_LOG_MAX_BYTES));
    assert_eq!(next.recover().await.ended, ["ext"]);
    assert_eq!(
        status(&next, "ext"),
        Some(("m".into(), "error".into(), EXIT_STATUS_UNKNOWN.into()))
    );
}

/// Stopping a re-adopted process that is not a child: SIGTERM to its group, the pidfd says
/// when it is gone, and it leaves `Instances` and its record.
#[tokio::test]
async fn a_readopted_process_that_is_not_a_child_can_be_stopped() {
    let device = Device::new();
    let pid = orphan_sleep();
    let _guard = KillOnDrop(pid);
    device.record("ext", handle_of(pid));
    let (sup, mut events) = device.supervisor(LogPolicy::in_process(logs::DEFAULT_LOG_MAX_BYTES));
    sup.recover().await;
    let t = Instant::now();
    sup.stop_instance("ext", DEADLINE).await.unwrap();
    assert!(
        t.elapsed() < DEADLINE / 2,
        "SIGTERM did not end it: {:?}",
        t.elapsed()
    );
    wait_until("the stopped process to be reaped by its parent", || {
        !alive(pid)
    })
    .await;
    assert!(sup.instances().is_empty());
    assert_eq!(
        drain(&mut events),
        [ev("ext", "ok", ""), ev("ext", "stopped", "")]
    );
    assert_eq!(device.load_record("ext"), None);
}

/// A recorded process that died while the runtime was away is `error`, stays in `Instances`
/// until stopped, and a later run says the same.
#[tokio::test]
async fn a_recorded_process_that_is_gone_is_an_error() {
    let device = Device::new();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    // Read before it is reaped, while its /proc entry is still there.
    let handle = handle_of(pid);
    child.wait().unwrap();
    device.record("gone", handle);

    let (sup, mut events) = device.supervisor(LogPolicy::in_process(logs::DEFAULT_LOG_MAX_BYTES));
    let recovery = sup.recover().await;
    assert_eq!(recovery.died, ["gone"]);
    assert_eq!(
        status(&sup, "gone"),
        Some(("m".into(), "error".into(), DIED_WHILE_AWAY.into()))
    );
    assert_eq!(drain(&mut events), [ev("gone", "error", DIED_WHILE_AWAY)]);
    // Nothing runs, so nothing holds the module.
    sup.unload_module("m").await.unwrap();

    let (next, _) = device.supervisor(LogPolicy::in_process(logs::DEFAULT_LOG_MAX_BYTES));
    next.recover().await;
    assert_eq!(
        status(&next, "gone"),
        Some(("m".into(), "error".into(), DIED_WHILE_AWAY.into()))
    );
    next.stop_instance("gone", Duration::ZERO).await.unwrap();
    assert!(next.instances().is_empty());
    assert_eq!(device.load_record("gone"), None);
}

/// A record whose PID is alive but started at another time names a process that reused the
/// PID: it is not adopted (and never signalled), the instance is `error`.
#[tokio::test]
async fn a_reused_pid_is_not_taken_for_the_recorded_process() {
    let device = Device::new();
    let pid = orphan_sleep();
    let _guard = KillOnDrop(pid);
    let mut handle = handle_of(pid);
    handle.start_time += 1;
    device.record("reused", handle);

    let (sup, _) = device.supervisor(LogPolicy::in_process(logs::DEFAULT_LOG_MAX_BYTES));
    assert_eq!(sup.recover().await.died, ["reused"]);
    assert_eq!(
        status(&sup, "reused"),
        Some(("m".into(), "error".into(), DIED_WHILE_AWAY.into()))
    );
    sup.stop_instance("reused", Duration::ZERO).await.unwrap();
    assert!(alive(pid), "the process that reused the PID was signalled");
}

/// Captures what `tracing` logs on this thread.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
}

fn logged_lines(text: &str, instance: &str, stream: &str, prefix: &str) -> Vec<String> {
    let mark = format!("instance={instance}");
    let stream = format!("stream=\"{stream}\"");
    text.lines()
        .filter(|l| l.contains(&mark) && l.contains(&stream))
        .filter_map(|l| l.split(' ').find(|w| w.starts_with(prefix)))
        .map(str::to_owned)
        .collect()
}

/// Output goes to `logs/stdout.log` and `logs/stderr.log`, rotated so that neither passes half
/// of `log_max_bytes`; every line is logged once with the instance name, also after the
/// runtime restarted and re-adopted the instance.
#[test]
fn output_is_relayed_bounded_and_logged_once_across_a_restart() {
    let capture = Capture::default();
    // Both runs use current-thread runtimes on this thread, so their tasks log here.
    let _guard = capture.install();
    let device = Device::new();
    let small = LogPolicy::in_process(256);
    // 300 lines (~3 KB) in bursts, so the file passes the limit many times; then it waits for
    // `more` to print one line to stdout and one to stderr.
    let script = "i=0\nwhile [ $i -lt 300 ]; do echo line-$i; i=$((i+1)); [ $((i % 20)) = 0 ] && sleep 0.05; done\n\
                  echo err-early >&2\n\
                  : > \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/ready\"\n\
                  while [ ! -e \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/more\" ]; do sleep 0.02; done\n\
                  echo line-after-restart\necho err-after-restart >&2\nwhile :; do sleep 0.05; done";
    let (module, sha) = device.module_file("m", script);
    let stdout_log = logs::log_path(&device.instance_dir("printer"), logs::STDOUT_FILE);

    let first = current_thread_runtime();
    let pid = first.block_on(async {
        let (sup, _events) = device.supervisor(small.clone());
        sup.load_module("m", "spawn", &module, &sha).await.unwrap();
        sup.start_instance("printer", "m", InstanceOptions::default())
            .await
            .unwrap();
        let expected: Vec<String> = (0..300).map(|i| format!("line-{i}")).collect();
        wait_until("all 300 lines to be logged", || {
            logged_lines(&capture.text(), "printer", "stdout", "line-") == expected
        })
        .await;
        wait_until("stderr to be logged", || {
            logged_lines(&capture.text(), "printer", "stderr", "err-") == ["err-early"]
        })
        .await;
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&stdout_log) <= small.max_bytes / 2);
        assert!(size(&relay::previous_path(&stdout_log)) <= small.max_bytes / 2);
        let kept = [
            std::fs::read(relay::previous_path(&stdout_log)).unwrap(),
            std::fs::read(&stdout_log).unwrap(),
        ]
        .concat();
        assert!(
            kept.ends_with(b"line-298\nline-299\n"),
            "the latest output is kept"
        );
        wait_until("the module to be ready", || {
            device
                .instance_dir("printer")
                .join("default_workspace/ready")
                .exists()
        })
        .await;
        status(&sup, "printer").map(|_| ()).unwrap();
        device
            .load_record("printer")
            .and_then(|r| r.process)
            .unwrap()
            .pid
    });
    let _kill = KillOnDrop(pid);
    drop(first);

    current_thread_runtime().block_on(async {
        let (sup, _events) = device.supervisor(small);
        assert_eq!(sup.recover().await.adopted, ["printer"]);
        std::fs::write(
            device
                .instance_dir("printer")
                .join("default_workspace/more"),
            "",
        )
        .unwrap();
        wait_until("the lines after the restart to be logged", || {
            let text = capture.text();
            logged_lines(&text, "printer", "stdout", "line-after").len() == 1
                && logged_lines(&text, "printer", "stderr", "err-after").len() == 1
        })
        .await;
        sup.stop_instance("printer", DEADLINE).await.unwrap();
    });
    let text = capture.text();
    assert_eq!(logged_lines(&text, "printer", "stdout", "line-").len(), 301);
    assert_eq!(
        logged_lines(&text, "printer", "stderr", "err-early").len(),
        1
    );
}

/// The daemon's exit leaves its instances running (the default), and the next run re-adopts
/// them; with `stop_instances_on_exit` they are stopped.
#[tokio::test]
async fn leaving_instances_running_on_exit_and_readopting_them() {
    let device = Device::new();
    let (module, sha) = device.module_file("m", RUNS);
    let (sup, mut events) = device.supervisor(LogPolicy::in_process(logs::DEFAULT_LOG_MAX_BYTES));
    sup.load_module("m", "spawn", &module, &sha).await.unwrap();
    sup.start_instance("i", "m", InstanceOptions::default())
        .await
        .unwrap();
    let pid = device.ready_pid("i").await;
    let _guard = KillOnDrop(pid);
    sup.shutdown(OnExit::LeaveRunning).await;
    assert!(alive(pid), "the daemon's exit stopped the instance");
    assert_eq!(
        drain(&mut events),
        [ev("i", "starting", ""), ev("i", "ok", "")]
    );
    assert!(device.load_record("i").is_some_and(|r| r.ended.is_none()));

    let (next, _) = device.supervisor(LogPolicy::in_process(logs::DEFAULT_LOG_MAX_BYTES));
    assert_eq!(next.recover().await.adopted, ["i"]);
    next.shutdown(OnExit::Stop { grace: DEADLINE }).await;
    assert!(!alive(pid), "stop_instances_on_exit did not stop it");
    assert!(next.instances().is_empty());
    assert_eq!(device.load_record("i"), None);
}

/// Paths in these tests stay under the device's directory.
#[test]
fn record_and_logs_live_in_the_instance_directory() {
    let d = Path::new("/var/lib/evp/instances/i");
    assert_eq!(
        logs::log_path(d, logs::STDOUT_FILE),
        Path::new("/var/lib/evp/instances/i/logs/stdout.log")
    );
    assert_eq!(record::RECORD_FILE, "runtime.json");
}
