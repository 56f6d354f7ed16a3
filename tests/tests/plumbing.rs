//! The daemon plumbing as systemd sees it: READY=1 once the bus name is owned, WATCHDOG=1 when
//! asked for, STOPPING=1 on SIGTERM, and a clean exit.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

use evp_devhub::PrivateBus;
use evp_system_tests::{DEADLINE, bin_dir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn next_message(socket: &UnixDatagram, daemon: &str, log: &std::path::Path) -> String {
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "{daemon} sent no notification before the deadline ({e}); its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

#[test]
fn every_daemon_notifies_systemd_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let bus = PrivateBus::start(&dir.path().join("bus")).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{0}/data\"\nrun_dir = \"{0}/run\"\n[hub]\nmqtt_host = \"127.0.0.1\"\nmqtt_port = 1\n",
            dir.path().display()
        ),
    )
    .unwrap();
    for daemon in [
        "evp-hubd",
        "evp-reconcilerd",
        "evp-runtimed-wasm",
        "evp-runtimed-container",
        "evp-sdk-broker",
    ] {
        let socket_path = dir.path().join(format!("{daemon}.notify"));
        let log = dir.path().join(format!("{daemon}.log"));
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        socket.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut child = Command::new(bin_dir().join(daemon))
            .arg("--bus")
            .arg(bus.address())
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", &socket_path)
            // 200 ms: pings every 100 ms, so the test sees one at once.
            .env("WATCHDOG_USEC", "200000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // READY=1 and the status `systemctl status` shows, in one message.
        let ready = next_message(&socket, daemon, &log);
        let lines: Vec<&str> = ready.trim().lines().collect();
        assert_eq!(lines.first(), Some(&"READY=1"), "{daemon}: {ready:?}");
        assert!(
            lines
                .get(1)
                .is_some_and(|l| l.starts_with("STATUS=serving org.evp.")),
            "{daemon}: {ready:?}"
        );
        assert_eq!(
            next_message(&socket, daemon, &log).trim(),
            "WATCHDOG=1",
            "{daemon}"
        );
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let stopping = (0..100)
            .map(|_| next_message(&socket, daemon, &log))
            .find(|m| m.trim() != "WATCHDOG=1")
            .unwrap();
        assert_eq!(stopping.trim(), "STOPPING=1", "{daemon}");
        let status = child.wait().unwrap();
        assert!(status.success(), "{daemon} exited with {status}");
    }
}
