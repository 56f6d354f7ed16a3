//! The whole-system test harness: what a device has, really started. A private dbus-daemon
//! with the project's policy, mosquitto as a process, the five daemons as processes, and a hub
//! driver speaking EVP2 (or EVP1: [`both_protocols!`]) from the hub's side. Module files and an HTTP server to fetch them from
//! are made by the tests themselves; WASM modules are built from `sdk/c` and
//! `sdk/wasm-threads-module` by [`wasm`].

pub mod booted;
pub mod certs;
pub mod docker;
pub mod http;
pub mod mosquitto;
pub mod proxy;
pub mod python;
pub mod relay;
pub mod system;
pub mod telemetry;
pub mod wasm;

use std::time::{Duration, Instant};

pub use evp_schemas::Protocol;

/// One system test run against each hub dialect: `both_protocols! { async fn name(protocol)
/// { body } }` makes the tests `name::evp2` and `name::evp1`, whose body gets `protocol` (an
/// [`evp_schemas::Protocol`]) to start its [`system::System`] with. The hub driver takes and
/// gives EVP2's shapes with either, so the body is the same test for both.
#[macro_export]
macro_rules! both_protocols {
    ($(#[$attr:meta])* async fn $name:ident($protocol:ident) $body:block) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($protocol: $crate::Protocol) $body

            #[tokio::test(flavor = "multi_thread")]
            async fn evp2() {
                run($crate::Protocol::Evp2).await
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn evp1() {
                run($crate::Protocol::Evp1).await
            }
        }
    };
}

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

/// Ports handed to test servers: below Linux's ephemeral range (32768–60999), so no outgoing
/// connection ever takes one as its source port. A broker stopped and restarted on its port
/// could otherwise find the port taken, or a client reconnecting to it connected to itself.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free TCP port on 127.0.0.1 for a server the test starts (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Spread over the range by process, so parallel test binaries rarely try the same ports.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = TEST_PORTS.end - TEST_PORTS.start;
    let seed = (std::process::id() % u32::from(span)) as u16;
    for _ in 0..span {
        let offset = seed.wrapping_add(NEXT.fetch_add(7, Ordering::Relaxed)) % span;
        let port = TEST_PORTS.start + offset;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {TEST_PORTS:?} on 127.0.0.1")
}

/// The directory holding the workspace's binaries (`target/<profile>`), for test binaries in
/// `deps/` and for `evp-bench` alike.
pub fn bin_dir() -> std::path::PathBuf {
    evp_devhub::stack::default_bin_dir().expect("the current executable's directory")
}
