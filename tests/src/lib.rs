//! The whole-system test harness: what a device has, really started. A private dbus-daemon
//! with the project's policy, mosquitto as a process, the five daemons as processes, and a hub
//! driver speaking EVP2 from the hub's side. Module files and an HTTP server to fetch them from
//! are made by the tests themselves.
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod certs;
pub mod http;
pub mod mosquitto;
pub mod system;

use std::time::{Duration, Instant};

/// How long a system test waits for a condition before failing. Generous: CI machines are
/// shared and slow, and the wait ends as soon as the condition holds.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `check` until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= end {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound then released; the OS does not hand it out again soon).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The directory holding the workspace's binaries (`target/<profile>`), for test binaries in
/// `deps/` and for `evp-bench` alike.
pub fn bin_dir() -> std::path::PathBuf {
    evp_devhub::stack::default_bin_dir().expect("the current executable's directory")
}
