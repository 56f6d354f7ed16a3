//! The README's "run the whole agent locally" command as a process: `evp-devhub up` brings the
//! sample deployment to `ok`, and Ctrl-C leaves nothing running.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use evp_system_tests::system::processes_with_env;
use evp_system_tests::{DEADLINE, bin_dir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn devhub_up_runs_the_sample_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("devhub");
    let mut child = Command::new(bin_dir().join("evp-devhub"))
        .args(["up", "--port", "0", "--data-dir"])
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
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(
        converged,
        "the sample never converged; output:\n{}",
        seen.join("\n")
    );
    assert!(
        running.len() >= 7,
        "five daemons and two modules expected: {running:?}"
    );
    assert!(status.success(), "evp-devhub exited with {status}");
    let left = ours();
    assert!(left.is_empty(), "still running after Ctrl-C: {left:?}");
}
