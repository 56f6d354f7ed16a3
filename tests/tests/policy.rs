//! The project's D-Bus policy, live on the bus with all five daemons: a user the policy does
//! not name may read the public properties but gets `AccessDenied` from the bus for every
//! `org.evp.*` method; the users it names get through to the daemon.
//!
//! Module data (sdk-broker's `StateReported`, `Telemetry` and `RpcResponse`, and the
//! configurations and commands hubd sends it) reaches its one consumer and nobody else, however
//! an outsider asks for it.
//!
//! The unprivileged caller is uid/gid 65534 (nobody), reached with `setpriv`, so the test
//! needs root, as CI runs; without root it says so and checks nothing.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use evp_system_tests::system::{
    DAEMON_INTERFACES, System, deploy_and_wait, deployment_of, schema_xml, wait_state,
    wait_telemetry,
};
use evp_system_tests::{DEADLINE, wait_for};
use serde_json::json;

/// The unprivileged user the outsiders run as.
const NOBODY: u32 = 65534;

/// Calls `member` with no arguments as `uid` (0: as this process) and returns busctl's error
/// output; empty when the call succeeded.
fn call_as(
    uid: u32,
    address: &str,
    service: &str,
    path: &str,
    iface: &str,
    member: &str,
) -> String {
    let out = command_as(uid, "busctl")
        .arg(format!("--address={address}"))
        .args(["--timeout=5", "call", service, path, iface, member])
        .output()
        .expect("busctl (apt-get install systemd) and setpriv (util-linux)");
    if out.status.success() {
        String::new()
    } else {
        String::from_utf8_lossy(&out.stderr).trim().to_owned()
    }
}

/// `program` to be run as `uid` (0: as this process), without supplementary groups.
fn command_as(uid: u32, program: &str) -> Command {
    if uid == 0 {
        return Command::new(program);
    }
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(program);
    c
}

/// A device whose bus an unprivileged user may reach, or `None` (said on stderr) without the
/// root needed to be that user.
async fn start_with_outsiders() -> Option<System> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching to an unprivileged user needs root");
        return None;
    }
    let sys = System::start().await.unwrap();
    // Let the unprivileged caller reach the bus socket (the test directory is private).
    for dir in [sys.dir.path().to_owned(), sys.bus.dir().to_owned()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    Some(sys)
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_named_callers_reach_the_daemons() {
    let Some(sys) = start_with_outsiders().await else {
        return;
    };
    let address = sys.bus.address().to_owned();
    let mut methods_checked = 0;
    for (service, path, iface) in DAEMON_INTERFACES {
        let xml = schema_xml(iface);
        let node = zbus_xml::Node::from_reader(xml.as_bytes()).unwrap();
        let interface = node
            .interfaces()
            .iter()
            .find(|i| i.name() == iface)
            .unwrap();
        for method in interface.methods() {
            let member = method.name().to_string();
            let denied = call_as(NOBODY, &address, service, path, iface, &member);
            assert!(
                denied.contains("Access denied") || denied.contains("AccessDenied"),
                "nobody called {service} {iface}.{member}: {denied:?}"
            );
            // Root is named by the policy: the bus lets the call through, and the daemon
            // itself judges it (here: no arguments, so most refuse them).
            let through = call_as(0, &address, service, path, iface, &member);
            assert!(
                !through.contains("Access denied") && !through.contains("AccessDenied"),
                "root was refused {service} {iface}.{member}: {through}"
            );
            methods_checked += 1;
        }
        // Public: the properties.
        let props = call_as(
            NOBODY,
            &address,
            service,
            path,
            "org.freedesktop.DBus.Properties",
            "GetAll",
        );
        assert!(
            !props.contains("Access denied") && !props.contains("AccessDenied"),
            "nobody could not read the properties of {service}: {props}"
        );
    }
    assert!(
        methods_checked >= 13,
        "only {methods_checked} methods checked"
    );
    sys.stop().await;
}

/// `evp-test-eavesdropper` running as an outsider; its output lines, as they come.
struct Eavesdropper {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Eavesdropper {
    /// Starts it as `uid` on the bus at `address` and waits until its match rules are in.
    async fn start(uid: u32, address: &str) -> Eavesdropper {
        let mut child = command_as(uid, env!("CARGO_BIN_EXE_evp-test-eavesdropper"))
            .arg(address)
            .stdout(Stdio::piped())
            .spawn()
            .expect("setpriv (util-linux) and the eavesdropper");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let spy = Eavesdropper { child, lines };
        spy.wait_line("its match rules", |l| l == "ready").await;
        spy
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    async fn wait_line(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let found = wait_for(
            &format!("the eavesdropper to print {what}"),
            DEADLINE,
            async || self.lines().into_iter().find(|l| check(l)),
        )
        .await;
        found.unwrap_or_else(|e| panic!("{e}; it printed {:#?}", self.lines()))
    }
}

impl Drop for Eavesdropper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn module_data_reaches_hubd_and_no_outsider() {
    let Some(sys) = start_with_outsiders().await else {
        return;
    };
    let spy = Eavesdropper::start(NOBODY, sys.bus.address()).await;
    let monitor = spy
        .wait_line("its BecomeMonitor outcome", |l| l.starts_with("monitor: "))
        .await;
    assert!(
        monitor.contains("refused") && monitor.contains("ccess"),
        "an outsider became a monitor: {monitor}"
    );

    // States, telemetry and a command answer, each seen by the hub (so hubd received it).
    let mut telemetry = sys.hub.subscribe();
    deploy_and_wait(
        &sys,
        &deployment_of(
            "dep-1",
            &[
                ("echo", "evp-test-config-echo"),
                ("tele", "evp-test-config-telemetry"),
                ("rpc", "evp-test-rpc-echo"),
            ],
        ),
    )
    .await;
    sys.hub
        .set_configuration("echo", "secret", "state-value")
        .await
        .unwrap();
    sys.hub
        .set_configuration("tele", "room/temp", "21.5")
        .await
        .unwrap();
    wait_state(&sys, "state/echo/secret", |v| v == "state-value").await;
    let seen = wait_telemetry(&mut telemetry, "tele/room/temp").await;
    assert_eq!(seen["tele/room/temp"], json!(21.5), "{seen}");
    let answer = sys
        .hub
        .call("rpc", "echo", r#"{"text":"secret answer"}"#, 7001, DEADLINE)
        .await
        .unwrap();
    assert_eq!(answer["status"], "ok", "{answer}");

    // dbus-daemon queues a signal for every recipient at once, so once the outsider has a
    // marker sent after hubd got all three, it has whatever of theirs it was given.
    sys.conn
        .emit_signal(None::<()>, "/org/evp/Test", "org.evp.Test", "Marker", &())
        .await
        .unwrap();
    spy.wait_line("the marker", |l| l.ends_with(" org.evp.Test.Marker"))
        .await;
    let leaked: Vec<String> = spy
        .lines()
        .into_iter()
        .filter(|l| l.contains("org.evp.SdkBroker1."))
        .collect();
    assert!(
        leaked.is_empty(),
        "an outsider received module data: {leaked:#?}"
    );
    drop(spy);
    sys.stop().await;
}
