//! The agent on a booted device: systemd as PID 1 in a container, the agent installed as a
//! device gets it, each daemon started by its unit, as its own user, inside its sandbox, on
//! the device's system bus. What the process-level tests cannot see (a sandbox that forbids a
//! write, a missing folder, a policy line, a hardening line that breaks a daemon) fails here.

use std::time::Duration;

use evp_system_tests::booted::{
    BOOT_DEADLINE, DAEMONS, device_running_samples, device_with_agent, wait_instances_ok,
};
use evp_system_tests::wait_for;

#[tokio::test]
async fn the_agent_boots_under_systemd_with_each_daemon_as_its_own_user() {
    let device = device_with_agent().await;
    let mut daemon_pids = Vec::new();
    for (unit, name, path, interface, user) in DAEMONS {
        let report = || device.unit_report(unit);
        // Type=notify: active means it said READY=1, and every daemon says so with a status.
        assert_eq!(device.unit_property(unit, "Type").unwrap(), "notify");
        assert_eq!(
            device.unit_property(unit, "NRestarts").unwrap(),
            "0",
            "{unit} restarted:\n{}",
            report()
        );
        assert_eq!(
            device.unit_property(unit, "StatusText").unwrap(),
            format!("serving {name}"),
            "{unit}'s READY=1 came without its status:\n{}",
            report()
        );
        let pid: u32 = device
            .unit_property(unit, "MainPID")
            .unwrap()
            .parse()
            .unwrap();
        assert_ne!(pid, 0, "{unit} has no main process:\n{}", report());
        let uid = device.uid_of(pid).unwrap();
        assert_ne!(uid, 0, "{unit} runs as root");
        assert_eq!(
            uid,
            device.user_id(user).unwrap(),
            "{unit} (pid {pid}) does not run as {user}"
        );
        daemon_pids.push((unit, pid));
        let xml = device
            .exec_ok(&["busctl", "introspect", "--xml-interface", name, path])
            .unwrap_or_else(|e| panic!("introspecting {name}: {e:#}\n{}", report()));
        assert!(
            xml.contains(&format!("<interface name=\"{interface}\">")),
            "{name} {path} has no {interface}:\n{xml}"
        );
    }
    // Every daemon runs as a user of its own.
    let mut uids: Vec<u32> = daemon_pids
        .iter()
        .map(|(_, pid)| device.uid_of(*pid).unwrap())
        .collect();
    uids.sort_unstable();
    uids.dedup();
    assert_eq!(uids.len(), DAEMONS.len(), "{daemon_pids:?} share users");

    // No evp process listens on TCP or UDP (mosquitto's 1883 is the broker's). `ss -p` cannot
    // name other users' processes here (no CAP_SYS_PTRACE), so each socket is told by the
    // control group and the uid it shows.
    let sockets = device.exec_ok(&["ss", "-Hltnue"]).unwrap();
    let ours: Vec<&str> = sockets
        .lines()
        .filter(|l| {
            l.contains("cgroup:/system.slice/evp-")
                || uids.iter().any(|u| l.contains(&format!(" uid:{u} ")))
        })
        .collect();
    assert!(
        ours.is_empty(),
        "evp processes listen:\n{}\n(all:\n{sockets})",
        ours.join("\n")
    );
    assert!(
        sockets.contains("cgroup:/system.slice/mosquitto.service"),
        "ss shows no mosquitto socket, so its filter shows nothing:\n{sockets}"
    );

    // hubd logs to the journal, and it connected to the device's broker.
    let connected = wait_for("hubd connected", Duration::from_secs(30), async || {
        let state = device
            .exec_ok(&[
                "busctl",
                "get-property",
                "org.evp.Hub1",
                "/org/evp/Hub1",
                "org.evp.Hub1",
                "Connection",
            ])
            .ok()?;
        state.contains("\"connected\"").then_some(())
    })
    .await;
    assert!(
        connected.is_ok(),
        "hubd did not connect to 127.0.0.1:1883:\n{}",
        device.unit_report("evp-hubd")
    );
    let journal = device.journal("evp-hubd");
    assert!(
        journal.contains("evp-hubd"),
        "no hubd lines in its journal:\n{journal}"
    );
}

#[tokio::test]
async fn a_spawned_module_runs_as_its_own_uid_and_outlives_each_daemon_killed() {
    let id = "booted-1";
    let (device, hub) = device_running_samples(id, &["sample"]).await;

    // The sample runs under an instance uid: not root, not a daemon's user.
    let processes = device.instance_processes();
    assert_eq!(
        processes.len(),
        1,
        "one sample process under an instance uid in {:?}: {processes:?}\n{}",
        device.pids_of("evp-runtimed-container").unwrap(),
        device.unit_report("evp-runtimed-container")
    );
    let (pid, uid) = processes[0];
    for (.., user) in DAEMONS {
        assert_ne!(
            uid,
            device.user_id(user).unwrap(),
            "the sample runs as {user}"
        );
    }

    // Each daemon killed in turn is restarted by systemd; the sample keeps running, except
    // across sdk-broker, whose restart takes the SDK sockets: reconcilerd then starts every
    // instance again on new ones (ARCHITECTURE.md, Recovery).
    let mut sample_pid = pid;
    for (unit, name, ..) in DAEMONS {
        let restarts: u32 = device
            .unit_property(unit, "NRestarts")
            .unwrap()
            .parse()
            .unwrap();
        let old = device.unit_property(unit, "MainPID").unwrap();
        device.exec_ok(&["kill", "-9", &old]).unwrap();
        let restarted = wait_for(&format!("{unit} restarted"), BOOT_DEADLINE, async || {
            let n: u32 = device.unit_property(unit, "NRestarts").ok()?.parse().ok()?;
            let main = device.unit_property(unit, "MainPID").ok()?;
            let state = device.unit_property(unit, "ActiveState").ok()?;
            let owned = device
                .exec(&["busctl", "status", name])
                .ok()?
                .status
                .success();
            (n > restarts && state == "active" && main != old && main != "0" && owned).then_some(())
        })
        .await;
        assert!(
            restarted.is_ok(),
            "{unit} was not restarted after kill -9:\n{}",
            device.unit_report(unit)
        );
        let count = hub.status_count();
        let why = format!("after {unit} restarted");
        wait_instances_ok(&hub, &device, id, &["sample"], count, &why).await;
        let now = device.instance_processes();
        if unit == "evp-sdk-broker" {
            assert!(
                now.len() == 1 && now[0].0 != sample_pid,
                "the sample was not started again on a new socket after sdk-broker: {now:?}"
            );
        } else {
            assert_eq!(
                now,
                vec![(sample_pid, uid)],
                "the sample did not keep running across {unit}'s restart"
            );
        }
        sample_pid = now[0].0;
    }
}
