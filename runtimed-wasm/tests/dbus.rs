//! The daemon as a process on a private bus: its introspection matches the schema XML, it
//! hosts nothing, refuses loads and starts with `NotSupported`, and accepts cleanup calls.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evp_schemas::dbus::{
    RUNTIME_WASM_NAME, RUNTIME_WASM_PATH, Runtime1Proxy, error_message, error_name, start_options,
};

/// Upper bound for any awaited condition; generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(20);

/// Child processes killed when the test ends, whatever happens.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts a private dbus-daemon and returns its address, or `None` when it is not installed.
fn private_bus(dir: &Path, procs: &mut Procs) -> Option<String> {
    let mut child = match Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--print-address=1"])
        .arg(format!("--address=unix:path={}", dir.join("bus").display()))
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipping: dbus-daemon cannot run here: {e}");
            return None;
        }
    };
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    procs.0.push(child);
    Some(line.trim().to_owned())
}

/// Every member of `org.evp.Runtime1` in an introspection document, one line each, sorted.
fn members(xml: &str) -> Vec<String> {
    let node = zbus_xml::Node::from_reader(xml.as_bytes()).unwrap();
    let iface = node
        .interfaces()
        .iter()
        .find(|i| i.name() == "org.evp.Runtime1")
        .expect("no org.evp.Runtime1 interface");
    let args = |args: &[zbus_xml::Arg]| {
        args.iter()
            .map(|a| format!("{:?} {} {:?}", a.direction(), a.ty(), a.name()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out: Vec<String> = iface
        .methods()
        .map(|m| format!("method {}({})", m.name(), args(m.args())))
        .chain(
            iface
                .signals()
                .map(|s| format!("signal {}({})", s.name(), args(s.args()))),
        )
        .chain(
            iface
                .properties()
                .map(|p| format!("property {} {} {:?}", p.name(), p.ty(), p.access())),
        )
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn daemon_serves_runtime1_without_an_engine() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs(Vec::new());
    let Some(address) = private_bus(dir.path(), &mut procs) else {
        return;
    };
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("data_dir = \"{}\"\n", dir.path().join("data").display()),
    )
    .unwrap();
    procs.0.push(
        Command::new(env!("CARGO_BIN_EXE_evp-runtimed-wasm"))
            .arg("--config")
            .arg(&config)
            .arg("--bus")
            .arg(&address)
            .env_remove("EVP_DATA_DIR")
            .spawn()
            .unwrap(),
    );

    let conn = zbus::connection::Builder::address(address.as_str())
        .build()
        .await
        .unwrap();
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
    let start = Instant::now();
    while !dbus
        .name_has_owner(RUNTIME_WASM_NAME.try_into().unwrap())
        .await
        .unwrap()
    {
        assert!(
            start.elapsed() < DEADLINE,
            "the daemon never owned its name"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let introspectable = zbus::fdo::IntrospectableProxy::builder(&conn)
        .destination(RUNTIME_WASM_NAME)
        .path(RUNTIME_WASM_PATH)
        .build()
        .await
        .unwrap();
    let served = introspectable.introspect().await.unwrap();
    let schema = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/dbus/org.evp.Runtime1.xml"),
    )
    .unwrap();
    let expected = members(&schema);
    assert_eq!(expected.len(), 8, "{expected:#?}");
    assert_eq!(members(&served), expected);

    let proxy = Runtime1Proxy::builder(&conn)
        .destination(RUNTIME_WASM_NAME)
        .path(RUNTIME_WASM_PATH)
        .build()
        .await
        .unwrap();
    assert_eq!(proxy.kinds().await.unwrap(), ["wasm"]);
    assert!(proxy.instances().await.unwrap().is_empty());

    let e = proxy
        .load_module("m", "wasm", "/var/lib/evp/modules/m", &"0".repeat(64))
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.NotSupported"), "{e}");
    assert!(
        error_message(&e).starts_with("WASM modules are not supported by this build yet"),
        "{e}"
    );
    let options = start_options(&[], &Default::default()).unwrap();
    let e = proxy.start_instance("i", "m", options).await.unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.NotSupported"), "{e}");

    proxy.stop_instance("i", 1000).await.unwrap();
    proxy.unload_module("m").await.unwrap();
    proxy.purge_instance("i").await.unwrap();
    let e = proxy.purge_instance("..").await.unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.InvalidArgument"), "{e}");
}
