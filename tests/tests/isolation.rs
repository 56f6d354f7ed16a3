//! Instances are isolated from each other and from the agent: each runs under a uid of its own
//! (the tests run as root, so real uids are used), with no supplementary groups and a workspace
//! of its own; an instance's SDK socket serves only that instance's process; a module cannot
//! take a daemon's bus name; and nothing a module starts outlives its undeploy.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use evp_system_tests::system::{System, deployment, instance_status, wait_gone};
use evp_system_tests::{DEADLINE, bin_dir, wait_for};
use serde_json::json;

/// systemd's range for dynamic users, the runtime's default `[container]` uid range.
const UID_RANGE: std::ops::RangeInclusive<u32> = 61184..=65519;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The values of a `/proc/<pid>/status` line (`Uid:`, `Gid:`, `Groups:`).
fn status_field(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

/// Waits for a file a module writes (by a rename, so it is whole) and returns its text.
async fn read_when_there(path: &Path) -> String {
    wait_for(&path.display().to_string(), DEADLINE, async || {
        std::fs::read_to_string(path).ok()
    })
    .await
    .unwrap()
}

/// Shell lines that write `text` to `$ws/name` whole (temp file, then rename).
fn write_whole(name: &str, text: &str) -> String {
    format!(
        "{text} > \"$ws/{name}.tmp\" 2>&1; echo \"rc=$?\" >> \"$ws/{name}.tmp\"; \
         mv \"$ws/{name}.tmp\" \"$ws/{name}\""
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn each_instance_runs_under_a_uid_of_its_own_without_groups_owning_its_workspace() {
    let sys = System::start().await.unwrap();
    let pids = sys.run_instances("dep-1", &["one", "two"]).await.unwrap();
    let mut uids = Vec::new();
    for (name, pid) in ["one", "two"].iter().zip(&pids) {
        let uid = status_field(*pid, "Uid:");
        let gid = status_field(*pid, "Gid:");
        if !is_root() {
            // An ordinary user cannot change uids: instances run as that user.
            assert_eq!(uid[0], nix::unistd::getuid().as_raw());
            continue;
        }
        // Real, effective, saved and filesystem ids are all the instance's own.
        assert!(uid.iter().all(|u| *u == uid[0]), "{name}: Uid {uid:?}");
        assert!(
            UID_RANGE.contains(&uid[0]),
            "{name}: uid {} not in the range",
            uid[0]
        );
        assert_eq!(gid, vec![uid[0]; 4], "{name}: the gid is not the uid");
        assert_eq!(
            status_field(*pid, "Groups:"),
            Vec::<u32>::new(),
            "{name} kept supplementary groups"
        );
        // No capability survives into the module (a runtime that is not root keeps its own
        // across setuid between two non-zero uids; it drops them before the exec).
        for set in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let value = status.lines().find_map(|l| l.strip_prefix(set)).unwrap();
            assert_eq!(value.trim(), "0000000000000000", "{name}: {set}");
        }
        let ws = std::fs::metadata(sys.instance_dir(name).join("default_workspace")).unwrap();
        assert_eq!(
            (ws.uid(), ws.gid()),
            (uid[0], uid[0]),
            "{name}: workspace owner"
        );
        assert_eq!(
            ws.permissions().mode() & 0o7777,
            0o700,
            "{name}: workspace mode"
        );
        uids.push(uid[0]);
    }
    if is_root() {
        assert_ne!(uids[0], uids[1], "two instances share a uid");
    }
    sys.stop().await;
}

/// A module that connects to another instance's socket (before the real module does) is
/// refused and gets none of its configuration; the real module then works.
#[tokio::test(flavor = "multi_thread")]
async fn a_squatter_on_another_instances_socket_is_refused_and_the_real_one_works() {
    let sys = System::start().await.unwrap();
    let echo = bin_dir().join("evp-test-config-echo");
    let socket = sys.stack.config().run_dir().join("sdk/victim.sock");
    // The real module waits for the test's go before it connects.
    let (victim_url, victim_hash) = sys
        .module(
            "victim",
            &format!(
                "ws=\"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH\"\n\
                 while [ ! -e \"$ws/go\" ]; do sleep 0.05; done\nexec {}",
                echo.display()
            ),
        )
        .unwrap();
    let (squatter_url, squatter_hash) = sys
        .module(
            "squatter",
            &format!(
                "ws=\"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH\"\n\
                 while [ ! -S {sock} ]; do sleep 0.05; done\n{}\nexec sleep 300",
                write_whole(
                    "ran",
                    &format!(
                        "EVP_MODULE_SDK_SOCKET_PATH={} {}",
                        socket.display(),
                        echo.display()
                    )
                ),
                sock = socket.display(),
            ),
        )
        .unwrap();
    sys.deploy(&deployment(
        "dep-1",
        &[("victim", "victim"), ("squatter", "squatter")],
        &[
            ("victim", &victim_url, &victim_hash),
            ("squatter", &squatter_url, &squatter_hash),
        ],
    ))
    .await
    .unwrap();
    sys.hub
        .set_configuration("victim", "greeting", "hello")
        .await
        .unwrap();
    sys.wait_status(|s| {
        s["reconcileStatus"] == "ok"
            && instance_status(s, "victim") == "ok"
            && instance_status(s, "squatter") == "ok"
    })
    .await
    .unwrap();

    // The squatter's SDK client ends: its connection was refused, never served.
    let ran = read_when_there(&sys.instance_dir("squatter").join("default_workspace/ran")).await;
    assert!(
        !ran.contains("configuration greeting"),
        "the squatter got the victim's configuration:\n{ran}"
    );
    assert!(
        !sys.hub
            .instance_states()
            .contains_key("state/victim/greeting"),
        "a state was reported in the victim's name before it connected"
    );

    std::fs::write(sys.instance_dir("victim").join("default_workspace/go"), "").unwrap();
    wait_for("the victim's echoed state", DEADLINE, async || {
        (sys.hub.instance_states().get("state/victim/greeting") == Some(&json!("hello")))
            .then_some(())
    })
    .await
    .unwrap();
    sys.stop().await;
}

/// A module (under its own uid) asking for runtimed-container's bus name is refused by the
/// bus, and the runtime keeps the name.
#[tokio::test(flavor = "multi_thread")]
async fn a_module_cannot_queue_for_the_runtime_bus_name() {
    if !is_root() {
        eprintln!("skipped: without root, modules share the runtime's uid, which may own it");
        return;
    }
    let sys = System::start().await.unwrap();
    let name = evp_schemas::dbus::RUNTIME_CONTAINER_NAME;
    let request = format!(
        "busctl --address={} call org.freedesktop.DBus /org/freedesktop/DBus \
         org.freedesktop.DBus RequestName su {name} 4",
        sys.bus.address()
    );
    let (url, hash) = sys
        .module(
            "squat",
            &format!(
                "ws=\"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH\"\n{}\nexec sleep 300",
                write_whole("out", &request)
            ),
        )
        .unwrap();
    sys.deploy(&deployment(
        "dep-1",
        &[("squat", "squat")],
        &[("squat", &url, &hash)],
    ))
    .await
    .unwrap();
    let out = read_when_there(&sys.instance_dir("squat").join("default_workspace/out")).await;
    // The bus refuses a uid that no user database names at connect time (dbus-daemon resolves
    // every peer's groups); one it knew would meet the policy, which lets only evp-container
    // own the name. Either way no reply of RequestName (1 owner, 2 queued) comes back.
    assert!(
        !out.contains("rc=0") && !out.contains("u 1") && !out.contains("u 2"),
        "the module got or queued for {name}:\n{out}"
    );
    let dbus = zbus::fdo::DBusProxy::new(&sys.conn).await.unwrap();
    let owner_pid = dbus
        .get_connection_unix_process_id(name.try_into().unwrap())
        .await
        .unwrap();
    assert_eq!(Some(owner_pid), sys.stack.pid("runtimed-container"));
    sys.stop().await;
}

/// A grandchild that calls setsid (out of the module's process group, its parent gone) is
/// stopped with the instance when it is undeployed.
#[tokio::test(flavor = "multi_thread")]
async fn a_grandchild_that_called_setsid_is_stopped_with_its_instance() {
    let sys = System::start().await.unwrap();
    let (url, hash) = sys
        .module(
            "forker",
            "ws=\"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH\"\n\
             ( setsid /bin/sh -c 'echo $$ > \"$0/gc.tmp\"; mv \"$0/gc.tmp\" \"$0/gc\"; \
             exec sleep 300' \"$ws\" & )\nexec sleep 300",
        )
        .unwrap();
    sys.deploy(&deployment(
        "dep-1",
        &[("f", "forker")],
        &[("forker", &url, &hash)],
    ))
    .await
    .unwrap();
    let gc: u32 = read_when_there(&sys.instance_dir("f").join("default_workspace/gc"))
        .await
        .trim()
        .parse()
        .unwrap();
    let module = sys.instance_pids("f");
    assert!(module.contains(&gc), "{gc} is not among {module:?}");
    let sid = |pid: u32| nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32)));
    assert_ne!(
        sid(gc).unwrap(),
        sid(*module.iter().find(|p| **p != gc).unwrap()).unwrap(),
        "the grandchild did not leave the module's session"
    );

    sys.deploy(&deployment("dep-2", &[], &[])).await.unwrap();
    sys.wait_status(|s| s["deploymentId"] == "dep-2" && s["reconcileStatus"] == "ok")
        .await
        .unwrap();
    wait_gone(&module).await.unwrap();
    sys.stop().await;
}
