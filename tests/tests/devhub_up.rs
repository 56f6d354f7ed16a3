//! The README's "run the whole agent locally" command as a process: `evp-devhub up` (in EVP2,
//! and with `--protocol evp1`) brings the sample deployment to `ok`, and Ctrl-C leaves nothing
//! running.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use evp_system_tests::system::processes_with_env;
use evp_system_tests::{DEADLINE, bin_dir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn devhub_up_runs_the_sample_and_stops_cleanly() {
    up_runs_the_sample_and_stops_cleanly("evp2");
}

#[test]
fn devhub_up_in_evp1_runs_the_sample_and_stops_cleanly() {
    up_runs_the_sample_and_stops_cleanly("evp1");
}

/// `evp-devhub up --protocol <protocol>`: the agent and the hub both speak it.
fn up_runs_the_sample_and_stops_cleanly(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("devhub");
    let mut child = Command::new(bin_dir().join("evp-devhub"))
        .args(["up", "--protocol", protocol, "--port", "0", "--data-dir"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("evp-devhub is built by `cargo build --workspace`");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let end = std::time::Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    let converged = loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains(": ok,")
                    && line.contains("instance sample-1 ok")
                    && line.contains("instance sample-2 ok");
                seen.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    // Every process of this run carries the data directory in its environment.
    let ours = || {
        let marker = data.to_string_lossy().into_owned();
        processes_with_env(|env| {
            env.split(|b| *b == 0)
                .any(|v| v.windows(marker.len()).any(|w| w == marker.as_bytes()))
        })
    };
    let running = ours();
    let agent_toml = std::fs::read_to_string(data.join("agent.toml")).unwrap_or_default();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(
        converged,
        "the sample never converged; output:\n{}",
        seen.join("\n")
    );
    // The agent registered itself with the devhub's provisioning key before connecting.
    assert!(
        seen.iter()
            .any(|l| l.contains("provisioned itself: access token")),
        "no provisioning; output:\n{}",
        seen.join("\n")
    );
    assert!(
        running.len() >= 7,
        "five daemons and two modules expected: {running:?}"
    );
    assert!(status.success(), "evp-devhub exited with {status}");
    // EVP2 is the default and goes unsaid; another dialect is hubd's setting.
    assert_eq!(
        agent_toml.contains(&format!("protocol = \"{protocol}\"")),
        protocol != "evp2",
        "{agent_toml}"
    );
    let left = ours();
    assert!(left.is_empty(), "still running after Ctrl-C: {left:?}");
}

#[test]
fn a_second_devhub_up_on_the_same_data_dir_stops_at_once_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("devhub");
    let up = || {
        let mut c = Command::new(bin_dir().join("evp-devhub"));
        c.args(["up", "--no-sample", "--port", "0", "--data-dir"])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    };
    let mut first = up()
        .stderr(Stdio::null())
        .spawn()
        .expect("evp-devhub is built by `cargo build --workspace`");
    let pid = first.id().to_string();
    // The lock is taken, and the pid written, before anything else starts.
    let lock = data.join("devhub.lock");
    let end = std::time::Instant::now() + DEADLINE;
    while std::fs::read_to_string(&lock).map_or(true, |s| s.trim() != pid) {
        assert!(
            std::time::Instant::now() < end,
            "the first evp-devhub never wrote its lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let started = std::time::Instant::now();
    let second = up().stderr(Stdio::piped()).output().unwrap();
    let took = started.elapsed();
    let still_running = first.try_wait().unwrap().is_none();
    kill(Pid::from_raw(first.id() as i32), Signal::SIGINT).unwrap();
    let status = first.wait().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second one ran: {stderr}");
    assert!(
        stderr.contains(&format!("pid {pid}")) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    assert!(still_running, "the first one must be left alone");
    assert!(
        status.success(),
        "the first evp-devhub exited with {status}"
    );
}
