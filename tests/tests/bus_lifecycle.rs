//! How a daemon lives with its bus connection: one whose connection dbus-daemon closes exits
//! non-zero (and the supervisor brings it back), and one that cannot own its name because
//! another connection holds it says who, waits, and takes the name once it is released.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use evp_schemas::dbus::RUNTIME_CONTAINER_NAME;
use evp_system_tests::system::{Options, System};
use evp_system_tests::{DEADLINE, wait_for};

/// The path of the bus socket in a `unix:path=...` address.
fn socket_path(address: &str) -> PathBuf {
    let rest = address
        .strip_prefix("unix:path=")
        .expect("a unix:path address");
    PathBuf::from(rest.split(',').next().unwrap_or(rest))
}

/// Shuts down every connection of process `pid` to the bus socket `bus`, as dbus-daemon does
/// when it disconnects a client: the socket is taken from the process with pidfd_getfd(2) and
/// shut down, which the process sees as the bus closing its connection. Returns how many.
fn cut_bus_connections(pid: u32, bus: &Path) -> usize {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: pidfd_open returned a descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut cut = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let is_socket = std::fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        let Some(target) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that process and flags;
        // it returns a new descriptor in this process or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
        if fd < 0 {
            continue;
        }
        // SAFETY: pidfd_getfd returned a descriptor that nothing else in this process owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        if peer_path(&fd).as_deref() == Some(bus) {
            // SAFETY: shutdown takes a descriptor this process owns and a constant.
            let r = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
            assert_eq!(r, 0, "shutdown: {}", std::io::Error::last_os_error());
            cut += 1;
        }
    }
    cut
}

/// The path a connected UNIX socket's peer is bound to, if any.
fn peer_path(fd: &OwnedFd) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero sockaddr_un is a valid value of the type.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr and len describe a writable sockaddr_un of the size given.
    let r = unsafe {
        libc::getpeername(
            fd.as_raw_fd(),
            (&raw mut addr).cast::<libc::sockaddr>(),
            &mut len,
        )
    };
    if r != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return None;
    }
    let path: Vec<u8> = addr
        .sun_path
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    (!path.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&path)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_cut_off_the_bus_exits_non_zero_and_comes_back() {
    let sys = System::start_with(Options {
        supervise: true,
        ..Options::default()
    })
    .await
    .unwrap();
    let bus = socket_path(sys.bus.address());
    for name in sys.stack.names() {
        let pid = sys.stack.pid(name).unwrap();
        assert!(
            cut_bus_connections(pid, &bus) >= 1,
            "{name} has no bus connection"
        );
        let exited = wait_for(&format!("{name} to exit"), DEADLINE, async || {
            (sys.stack.exits(name).unwrap() == 1).then_some(())
        })
        .await;
        let log = sys.stack.config().log_dir().join(format!("{name}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        exited.unwrap_or_else(|e| panic!("{e}; {name} stayed up off the bus:\n{text}"));
        let status = sys.stack.last_exit(name).unwrap().unwrap();
        assert_eq!(status.code(), Some(69), "{name}: {status:?}");
        assert!(
            text.contains("D-Bus connection") && text.contains("was closed"),
            "{name} says why it exits:\n{text}"
        );
        // The supervisor restarts it, and it owns its name again.
        sys.stack.wait_ready(name, DEADLINE).await.unwrap();
    }
    // The device works again: a deployment runs.
    sys.run_instances("dep-after", &["i"]).await.unwrap();
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_whose_name_is_held_waits_for_it_and_then_serves() {
    let sys = System::start().await.unwrap();
    let name = "runtimed-container";
    sys.stack.stop(name).await.unwrap();
    let squatter = zbus::connection::Builder::address(sys.bus.address())
        .build()
        .await
        .unwrap();
    // As a squatter would: not letting anyone replace it.
    squatter
        .request_name_with_flags(
            RUNTIME_CONTAINER_NAME,
            zbus::fdo::RequestNameFlags::DO_NOT_QUEUE,
        )
        .await
        .unwrap();
    let log = sys
        .stack
        .config()
        .log_dir()
        .join("evp-runtimed-container.log");
    let logged_before = std::fs::read_to_string(&log).unwrap_or_default().len();
    let me = format!("pid {}", std::process::id());
    let pid = {
        let start = sys.stack.start(name);
        tokio::pin!(start);
        let waiting = async {
            wait_for(
                "runtimed-container to say who holds its name",
                DEADLINE,
                async || {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let new = text.get(logged_before..).unwrap_or_default();
                    new.lines()
                        .find(|l| l.contains(RUNTIME_CONTAINER_NAME) && l.contains(&me))
                        .map(str::to_owned)
                },
            )
            .await
        };
        let line = tokio::select! {
            line = waiting => line.unwrap(),
            r = &mut start => panic!("ready while the name is held: {r:?}"),
        };
        assert!(line.contains("cannot own"), "{line}");
        let pid = sys.stack.pid(name).unwrap();
        squatter.release_name(RUNTIME_CONTAINER_NAME).await.unwrap();
        start.await.unwrap();
        pid
    };
    // The same process took the name: it waited rather than exiting in a loop.
    assert_eq!(sys.stack.pid(name), Some(pid));
    assert_eq!(sys.stack.exits(name).unwrap(), 1, "only the stop");
    let dbus = zbus::fdo::DBusProxy::new(&sys.conn).await.unwrap();
    let owner = dbus
        .get_connection_unix_process_id(RUNTIME_CONTAINER_NAME.try_into().unwrap())
        .await
        .unwrap();
    assert_eq!(owner, pid);
    // And it serves its interface.
    let runtime = evp_schemas::dbus::Runtime1Proxy::builder(&sys.conn)
        .destination(RUNTIME_CONTAINER_NAME)
        .path(evp_schemas::dbus::RUNTIME_CONTAINER_PATH)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    assert_eq!(
        runtime.kinds().await.unwrap(),
        ["docker", "python", "spawn"]
    );
    sys.stop().await;
}

/// The sd_notify messages a daemon sends to `socket` within `window`.
async fn notifications(socket: &tokio::net::UnixDatagram, window: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + window;
    let mut buf = vec![0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(end, socket.recv(&mut buf)).await {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

fn pings(messages: &[String]) -> usize {
    messages
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watchdog_is_pinged_only_while_the_bus_answers() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let sys = System::start().await.unwrap();
    let name = "runtimed-wasm";
    let path = sys.dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
    sys.stack.stop(name).await.unwrap();
    // A ping every PERIOD / 2 = 100 ms.
    const PERIOD: Duration = Duration::from_millis(200);
    sys.stack
        .set_env(
            name,
            vec![
                ("NOTIFY_SOCKET".into(), path.display().to_string()),
                ("WATCHDOG_USEC".into(), PERIOD.as_micros().to_string()),
            ],
        )
        .unwrap();
    sys.stack.start(name).await.unwrap();
    let first = notifications(&socket, PERIOD * 5).await;
    assert!(first.iter().any(|m| m.contains("READY=1")), "{first:?}");
    assert!(pings(&first) >= 2, "pings while the bus answers: {first:?}");

    // The bus stops answering (its process is stopped): the daemon may not vouch for itself.
    let bus = Pid::from_raw(sys.bus.pid().unwrap() as i32);
    kill(bus, Signal::SIGSTOP).unwrap();
    // A round trip already answered before the stop may still ping once or twice.
    let _settling = notifications(&socket, PERIOD * 2).await;
    let stopped = notifications(&socket, PERIOD * 5).await;
    kill(bus, Signal::SIGCONT).unwrap();
    assert_eq!(
        pings(&stopped),
        0,
        "pings while the bus is stopped: {stopped:?}"
    );

    // Once the bus answers again, so does the watchdog.
    let again = notifications(&socket, PERIOD * 5).await;
    assert!(pings(&again) >= 1, "pings once the bus is back: {again:?}");
    sys.stop().await;
}
