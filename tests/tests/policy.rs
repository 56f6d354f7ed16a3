//! The project's D-Bus policy, live on the bus with all five daemons: a user the policy does
//! not name may read the public properties but gets `AccessDenied` from the bus for every
//! `org.evp.*` method; the users it names get through to the daemon.
//!
//! The unprivileged caller is uid/gid 65534 (nobody), reached with `setpriv`, so the test
//! needs root, as CI runs; without root it says so and checks nothing.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use evp_system_tests::system::{DAEMON_INTERFACES, System, schema_xml};

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
    let mut command = if uid == 0 {
        Command::new("busctl")
    } else {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg("busctl");
        c
    };
    let out = command
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

#[tokio::test(flavor = "multi_thread")]
async fn only_the_named_callers_reach_the_daemons() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching to an unprivileged user needs root");
        return;
    }
    let sys = System::start().await.unwrap();
    // Let the unprivileged caller reach the bus socket (the test directory is private).
    for dir in [sys.dir.path().to_owned(), sys.bus.dir().to_owned()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
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
            let denied = call_as(65534, &address, service, path, iface, &member);
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
            65534,
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
