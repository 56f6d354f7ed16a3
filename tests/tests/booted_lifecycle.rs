//! The agent's package on a booted device, through its life: systemd's watchdog restarts a
//! daemon that stops answering, the daemons log an instance's lines with fields an operator
//! filters on, callers the policy does not name (an ordinary user, a module instance) get
//! nothing they should not, and the package upgrades in place, then removes and purges.

use std::time::Duration;

use evp_system_tests::booted::{
    BOOT_DEADLINE, BootedDevice, DAEMONS, WORKSPACE_VERSION, device_running_samples,
    device_with_agent, package, wait_instances_ok,
};
use evp_system_tests::system::{DAEMON_INTERFACES, schema_xml};
use evp_system_tests::{DEADLINE, wait_for};
use serde_json::Value;

/// The drop-in that makes reconcilerd's watchdog pinger hang a second after READY, with a
/// watchdog short enough for a test.
const HANG_DROP_IN: &str = "/etc/systemd/system/evp-reconcilerd.service.d/hang.conf";
const HANG: &str = "[Service]\nEnvironment=EVP_DEBUG_HANG_AFTER_MS=1000\nWatchdogSec=3s\n";

#[tokio::test]
async fn systemd_restarts_a_daemon_whose_watchdog_pings_stop() {
    let device = device_with_agent().await;
    let (unit, name) = ("evp-reconcilerd", "org.evp.Reconciler1");
    device
        .write_file(HANG_DROP_IN, HANG.as_bytes(), 0o644)
        .unwrap();
    device.exec_ok(&["systemctl", "daemon-reload"]).unwrap();
    device.exec_ok(&["systemctl", "restart", unit]).unwrap();
    assert_eq!(device.unit_property(unit, "WatchdogUSec").unwrap(), "3s");
    let restarts: u32 = device
        .unit_property(unit, "NRestarts")
        .unwrap()
        .parse()
        .unwrap();
    let hung = device.main_pid(unit).unwrap();
    assert_ne!(
        hung,
        0,
        "{unit} has no main process:\n{}",
        device.unit_report(unit)
    );

    // systemd notices the missing pings, kills it and starts it again, and the new process
    // owns the name (until its own pings stop in turn).
    let restarted = wait_for("a watchdog restart", Duration::from_secs(30), async || {
        let journal = device.journal(unit);
        let n: u32 = device.unit_property(unit, "NRestarts").ok()?.parse().ok()?;
        let main = device.main_pid(unit).ok()?;
        let active = device.unit_property(unit, "ActiveState").ok()? == "active";
        (journal.contains("Watchdog timeout")
            && n > restarts
            && main != hung
            && main != 0
            && active
            && device.owns(name))
        .then_some(main)
    })
    .await;
    assert!(
        restarted.is_ok(),
        "{unit} was not restarted by its watchdog ({restarted:?}):\n{}",
        device.unit_report(unit)
    );

    // Without the hang, it serves and stays up.
    device.exec_ok(&["rm", HANG_DROP_IN]).unwrap();
    device.exec_ok(&["systemctl", "daemon-reload"]).unwrap();
    device.exec_ok(&["systemctl", "restart", unit]).unwrap();
    device.wait_serving().await;
    assert_eq!(device.unit_property(unit, "WatchdogUSec").unwrap(), "30s");
}

/// A journal entry's field `key` as text (journald gives a repeated field as an array).
fn field<'a>(entry: &'a Value, key: &str) -> Option<&'a str> {
    entry[key].as_str()
}

/// Whether `entries` hold one with every `(field, value)` of `fields`.
fn has_entry(entries: &[Value], fields: &[(&str, &str)]) -> bool {
    entries
        .iter()
        .any(|e| fields.iter().all(|(k, v)| field(e, k) == Some(v)))
}

/// `args` run inside as `uid`/`gid` with no supplementary groups.
fn as_user(device: &BootedDevice, uid: u32, gid: u32, args: &[&str]) -> std::process::Output {
    let (uid, gid) = (format!("--reuid={uid}"), format!("--regid={gid}"));
    let mut command = vec!["setpriv", &uid, &gid, "--clear-groups"];
    command.extend(args);
    device.exec(&command).unwrap()
}

/// What `args` wrote to standard error, run as `uid`/`gid`; fails if it succeeded.
fn refused(device: &BootedDevice, uid: u32, gid: u32, args: &[&str]) -> String {
    let out = as_user(device, uid, gid, args);
    assert!(
        !out.status.success(),
        "uid {uid} was allowed {args:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// How the system bus treats a caller.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bus {
    /// It connects; the policy refuses every `org.evp.*` method and allows the properties.
    Policy,
    /// dbus-daemon drops the connection of a uid the user database does not know (an
    /// instance's): every call fails, denied or not connected.
    Dropped,
}

/// What an outsider must not get: any `org.evp.*` method, hubd's state and TLS key, another
/// instance's workspace, another instance's SDK; what it may (on `Bus::Policy`): the
/// properties.
async fn outsider_is_denied(device: &BootedDevice, who: &str, uid: u32, gid: u32, bus: Bus) {
    let mut methods = 0;
    for (service, path, iface) in DAEMON_INTERFACES {
        let node = zbus_xml::Node::from_reader(schema_xml(iface).as_bytes()).unwrap();
        let interface = node.interfaces().iter().find(|i| i.name() == iface);
        for method in interface.unwrap().methods() {
            let member = method.name().to_string();
            let call = [
                "busctl",
                "--timeout=5",
                "call",
                service,
                path,
                iface,
                &member,
            ];
            let error = refused(device, uid, gid, &call);
            let dropped = bus == Bus::Dropped && error.contains("not connected");
            assert!(
                error.contains("Access denied") || error.contains("AccessDenied") || dropped,
                "{who} called {service} {iface}.{member}: {error}"
            );
            methods += 1;
        }
        let props = ["busctl", "--timeout=5", "call", service, path];
        let get_all = ["org.freedesktop.DBus.Properties", "GetAll", "s", iface];
        let out = as_user(device, uid, gid, &[&props[..], &get_all[..]].concat());
        assert!(
            out.status.success() || bus == Bus::Dropped,
            "{who} cannot read {service}'s properties: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(methods >= 21, "only {methods} methods checked");

    for secret in [
        "/var/lib/evp/hub/device-config.json",
        "/etc/evp/device.key",
        "/var/lib/evp/instances/b/default_workspace/secret",
    ] {
        let error = refused(device, uid, gid, &["cat", secret]);
        assert!(
            error.contains("Permission denied"),
            "{who} reading {secret}: {error}"
        );
    }
    let listing = refused(
        device,
        uid,
        gid,
        &["ls", "/var/lib/evp/instances/b/default_workspace"],
    );
    assert!(listing.contains("Permission denied"), "{who}: {listing}");

    // b's SDK socket: connecting is allowed (0666), but sdk-broker serves it only to b's
    // process and closes anyone else's connection at once.
    let nc = ["timeout", "10", "nc", "-U", "/run/evp/sdk/b.sock"];
    let out = as_user(device, uid, gid, &nc);
    let (stdout, stderr) = (out.stdout, String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.code() != Some(124) && stdout.is_empty(),
        "{who}'s connection to b's SDK socket was held or served: {:?} {stderr}",
        out.status
    );
    let uid_text = uid.to_string();
    let logged = wait_for("sdk-broker's refusal", DEADLINE, async || {
        let entries = device.journal_json("evp-sdk-broker").ok()?;
        has_entry(
            &entries,
            &[
                ("INSTANCE", "b"),
                ("UID", uid_text.as_str()),
                ("SYSLOG_IDENTIFIER", "evp-sdk-broker"),
            ],
        )
        .then_some(())
    })
    .await;
    assert!(
        logged.is_ok() || stderr.contains("denied") || stderr.contains("refused"),
        "sdk-broker did not refuse {who} on b's socket ({stderr}):\n{}",
        device.unit_report("evp-sdk-broker")
    );
}

#[tokio::test]
async fn instances_are_logged_by_field_and_outsiders_get_nothing_of_theirs() {
    let id = "booted-fields";
    let (device, _hub) = device_running_samples(id, &["a", "b"]).await;

    // reconcilerd's start of each instance names the instance, its module and the
    // deployment; runtimed-container's the instance and its module.
    for (unit, with_deployment) in [("evp-reconcilerd", true), ("evp-runtimed-container", false)] {
        let found = wait_for(&format!("{unit}'s fields"), DEADLINE, async || {
            let entries = device.journal_json(unit).ok()?;
            ["a", "b"]
                .iter()
                .all(|i| {
                    let mut fields = vec![("INSTANCE", *i), ("MODULE", "sample")];
                    if with_deployment {
                        fields.push(("DEPLOYMENT_ID", id));
                    }
                    has_entry(&entries, &fields)
                })
                .then_some(())
        })
        .await;
        assert!(
            found.is_ok(),
            "no {unit} entry with INSTANCE, MODULE{} for a and b:\n{}",
            if with_deployment {
                ", DEPLOYMENT_ID"
            } else {
                ""
            },
            device
                .exec_ok(&["journalctl", "-u", unit, "-o", "verbose", "--no-pager"])
                .unwrap()
        );
    }

    // What the outsiders try to get: a TLS key as the README says to keep it, a file in b's
    // workspace that b could have made readable.
    device
        .write_file("/etc/evp/device.key", b"not a real key\n", 0o400)
        .unwrap();
    device
        .exec_ok(&["chown", "evp-hub:evp-hub", "/etc/evp/device.key"])
        .unwrap();
    let (a_pid, a_uid) = device.instance_process("a").expect("a runs");
    let (_, b_uid) = device.instance_process("b").expect("b runs");
    assert_ne!(a_uid, b_uid, "a and b share a uid");
    let secret = "/var/lib/evp/instances/b/default_workspace/secret";
    device.write_file(secret, b"b's\n", 0o644).unwrap();
    device
        .exec_ok(&["chown", &format!("{b_uid}:{b_uid}"), secret])
        .unwrap();

    // An ordinary user of the device.
    device
        .exec_ok(&["useradd", "--system", "--no-create-home", "eve"])
        .unwrap();
    let eve = device.user_id("eve").unwrap();
    let eve_gid: u32 = device
        .exec_ok(&["id", "-g", "eve"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    outsider_is_denied(&device, "eve", eve, eve_gid, Bus::Policy).await;

    // Instance a, as its own uid: its own workspace is its, b's is not.
    let own = as_user(
        &device,
        a_uid,
        a_uid,
        &["ls", "/var/lib/evp/instances/a/default_workspace"],
    );
    assert!(
        own.status.success(),
        "a (pid {a_pid}, uid {a_uid}) cannot list its own workspace: {}",
        String::from_utf8_lossy(&own.stderr)
    );
    outsider_is_denied(&device, "instance a", a_uid, a_uid, Bus::Dropped).await;
}

/// The version the upgrade goes to: newer than the workspace's for dpkg.
fn newer_version() -> String {
    format!("{WORKSPACE_VERSION}+booted1")
}

/// The installed evp-agent's version, empty when none.
fn installed_version(device: &BootedDevice) -> String {
    let out = device.exec(&[
        "dpkg-query",
        "-W",
        "-f",
        "${Status} ${Version}",
        "evp-agent",
    ]);
    let text = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
    text.strip_prefix("install ok installed ")
        .unwrap_or_default()
        .to_owned()
}

const DESIRED: &str = "/var/lib/evp/deployment/desired.json";

#[tokio::test]
async fn the_package_upgrades_in_place_then_removes_and_purges() {
    let id = "booted-upgrade";
    let (device, hub) = device_running_samples(id, &["sample"]).await;
    assert_eq!(installed_version(&device), WORKSPACE_VERSION);
    let before: Vec<u32> = DAEMONS
        .iter()
        .map(|d| device.main_pid(d.0).unwrap())
        .collect();
    let instance = device.instance_process("sample").expect("the sample runs");
    let desired = device.exec_ok(&["cat", DESIRED]).unwrap();

    // Upgrade: the daemons restarted on the new binaries, but sdk-broker (its restart would
    // close the SDK sockets, and an EVP module does not reconnect: packaging/debian/postinst);
    // the instance runs on, the same process, and the deployment is kept and reported ok.
    let newer = package(&newer_version()).unwrap();
    let count = hub.status_count();
    device.install_package(&newer).unwrap();
    assert_eq!(installed_version(&device), newer_version());
    device.wait_serving().await;
    for ((unit, ..), old) in DAEMONS.iter().zip(&before) {
        let now = device.main_pid(unit).unwrap();
        let restarted = now != *old && now != 0;
        let expected = *unit != "evp-sdk-broker";
        assert!(
            restarted == expected,
            "{unit}: pid {old} before the upgrade, {now} after (restart expected: {expected}):\n{}",
            device.unit_report(unit)
        );
    }
    wait_instances_ok(&hub, &device, id, &["sample"], count, "after the upgrade").await;
    let count = hub.status_count();
    wait_instances_ok(&hub, &device, id, &["sample"], count, "a report later").await;
    assert_eq!(
        device.instance_process("sample"),
        Some(instance),
        "the upgrade restarted the instance:\n{}",
        device.unit_report("evp-reconcilerd")
    );
    assert_eq!(device.exec_ok(&["cat", DESIRED]).unwrap(), desired);

    // Remove: the agent and its instances stopped; the data, the configuration and the users
    // stay.
    device
        .sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y -q evp-agent")
        .unwrap();
    for (unit, ..) in DAEMONS {
        let state = device.unit_property(unit, "ActiveState").unwrap();
        let left = device.pids_of(unit).unwrap();
        assert!(
            state == "inactive" && left.is_empty(),
            "{unit} is {state} with processes {left:?} after apt-get remove:\n{}",
            device.unit_report(unit)
        );
    }
    let gone = wait_for("the instance gone", BOOT_DEADLINE, async || {
        (!device
            .exec(&["test", "-d", &format!("/proc/{}", instance.0)])
            .ok()?
            .status
            .success())
        .then_some(())
    })
    .await;
    assert!(
        gone.is_ok(),
        "the sample (pid {}) survived apt-get remove",
        instance.0
    );
    assert_eq!(device.exec_ok(&["cat", DESIRED]).unwrap(), desired);
    device
        .exec_ok(&["test", "-f", "/etc/evp/agent.toml"])
        .unwrap();
    device.exec_ok(&["getent", "passwd", "evp-hub"]).unwrap();

    // Purge: the data, the configuration, the users and groups go.
    device
        .sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q evp-agent")
        .unwrap();
    assert_eq!(installed_version(&device), "");
    // /var/lib/evp is a mount point on this device (a tmpfs): emptied, not removed.
    let left = device.sh("ls -A /var/lib/evp 2>/dev/null || true").unwrap();
    assert!(left.trim().is_empty(), "purge left in /var/lib/evp: {left}");
    for path in ["/etc/evp/agent.toml", "/var/cache/evp", "/run/evp"] {
        let out = device.exec(&["test", "-e", path]).unwrap();
        assert!(!out.status.success(), "purge left {path}");
    }
    for (.., user) in DAEMONS {
        let out = device.exec(&["getent", "passwd", user]).unwrap();
        assert!(!out.status.success(), "purge left the user {user}");
    }
    for group in ["evp-modules", "evp-sysapp"] {
        let out = device.exec(&["getent", "group", group]).unwrap();
        assert!(!out.status.success(), "purge left the group {group}");
    }
}
