//! The private bus runs the project's real policy, with the daemon users mapped to this user.
//! Needs `dbus-daemon` (apt-get install dbus): without it this test fails, it never skips.

use std::time::{Duration, Instant};

use evp_devhub::PrivateBus;
use zbus::fdo::{DBusProxy, RequestNameFlags, RequestNameReply};
use zbus::names::WellKnownName;

async fn connect(bus: &PrivateBus) -> zbus::Connection {
    zbus::connection::Builder::address(bus.address())
        .build()
        .await
        .expect("connecting to the private bus")
}

async fn request(conn: &zbus::Connection, name: &str) -> zbus::fdo::Result<RequestNameReply> {
    let proxy = DBusProxy::new(conn)
        .await
        .expect("org.freedesktop.DBus proxy");
    let name = WellKnownName::try_from(name).expect("a valid bus name");
    proxy
        .request_name(name, RequestNameFlags::DO_NOT_QUEUE)
        .await
}

#[tokio::test]
async fn the_project_policy_is_in_force() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut bus =
        PrivateBus::start(dir.path()).expect("starting dbus-daemon (apt-get install dbus)");
    assert!(bus.address().starts_with("unix:path="), "{}", bus.address());

    let conn = connect(&bus).await;
    // Every daemon's name may be owned by this user: the substituted policy allows it.
    for name in [
        "org.evp.SdkBroker1",
        "org.evp.Hub1",
        "org.evp.Reconciler1",
        "org.evp.Runtime1.Wasm",
        "org.evp.Runtime1.Container",
    ] {
        let reply = request(&conn, name).await;
        assert!(
            matches!(reply, Ok(RequestNameReply::PrimaryOwner)),
            "{name}: {reply:?}"
        );
    }
    // A name no policy file allows is refused: the default policy denies owning.
    let refused = request(&conn, "org.evp.NotInAnyPolicy1").await;
    assert!(
        matches!(refused, Err(zbus::fdo::Error::AccessDenied(_))),
        "{refused:?}"
    );

    // busctl sees the bus and the names this connection owns.
    let out = std::process::Command::new("busctl")
        .arg(format!("--address={}", bus.address()))
        .args(["list", "--no-pager", "--no-legend"])
        .output()
        .expect("running busctl");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "busctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(listing.contains("org.evp.SdkBroker1"), "{listing}");

    // Stopping the bus kills dbus-daemon and closes the socket.
    let pid = bus.pid().expect("dbus-daemon runs");
    drop(conn);
    bus.stop();
    assert_eq!(bus.pid(), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "dbus-daemon {pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
