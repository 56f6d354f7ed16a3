//! The daemon as a process on a private bus: its introspection matches the schema XML, its
//! errors carry the `org.evp.Error.*` names, it emits its changes, and SIGTERM stops its
//! instances before it exits.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evp_schemas::dbus::{
    RUNTIME_CONTAINER_NAME, RUNTIME_CONTAINER_PATH, Runtime1Proxy, error_name, start_options,
};
use futures_util::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

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

async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn daemon_serves_runtime1_and_stops_instances_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs(Vec::new());
    let Some(address) = private_bus(dir.path(), &mut procs) else {
        return;
    };
    let data = dir.path().join("data");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[container]\nstop_grace_ms = 300\n",
            data.display()
        ),
    )
    .unwrap();
    let daemon = Command::new(env!("CARGO_BIN_EXE_evp-runtimed-container"))
        .arg("--config")
        .arg(&config)
        .arg("--bus")
        .arg(&address)
        .env_remove("EVP_DATA_DIR")
        .spawn()
        .unwrap();
    let daemon_pid = Pid::from_raw(daemon.id() as i32);
    procs.0.push(daemon);

    let conn = zbus::connection::Builder::address(address.as_str())
        .build()
        .await
        .unwrap();
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
    wait_for("the daemon's bus name", async || {
        dbus.name_has_owner(RUNTIME_CONTAINER_NAME.try_into().unwrap())
            .await
            .unwrap()
    })
    .await;

    // Introspection matches the contract.
    let introspectable = zbus::fdo::IntrospectableProxy::builder(&conn)
        .destination(RUNTIME_CONTAINER_NAME)
        .path(RUNTIME_CONTAINER_PATH)
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
        .destination(RUNTIME_CONTAINER_NAME)
        .path(RUNTIME_CONTAINER_PATH)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    assert_eq!(proxy.kinds().await.unwrap(), ["spawn"]);
    assert!(proxy.instances().await.unwrap().is_empty());
    let mut changes = proxy.receive_instance_changed().await.unwrap();
    let props = zbus::fdo::PropertiesProxy::builder(&conn)
        .destination(RUNTIME_CONTAINER_NAME)
        .path(RUNTIME_CONTAINER_PATH)
        .build()
        .await
        .unwrap();
    let mut props_changed = props.receive_properties_changed().await.unwrap();

    // A module that records its pid and runs until stopped.
    let module: PathBuf = dir.path().join("module");
    std::fs::write(
        &module,
        "#!/bin/sh\necho $$ > \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/pid\"\nwhile :; do sleep 0.05; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sha = hex::encode(Sha256::digest(std::fs::read(&module).unwrap()));
    let path = module.to_str().unwrap();

    let e = proxy
        .load_module("m", "wasm", path, &sha)
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.InvalidArgument"), "{e}");
    let e = proxy
        .load_module("m", "spawn", path, &"0".repeat(64))
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.InvalidArgument"), "{e}");
    let no_options = start_options(&[], &Default::default()).unwrap();
    let e = proxy
        .start_instance("i", "m", no_options.clone())
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.NotFound"), "{e}");

    proxy.load_module("m", "spawn", path, &sha).await.unwrap();
    proxy
        .start_instance("i", "m", no_options.clone())
        .await
        .unwrap();
    for expected in ["starting", "ok"] {
        let signal = tokio::time::timeout(DEADLINE, changes.next())
            .await
            .unwrap()
            .unwrap();
        let args = signal.args().unwrap();
        assert_eq!((args.instance, args.status), ("i", expected));
    }
    let changed = tokio::time::timeout(DEADLINE, props_changed.next())
        .await
        .unwrap()
        .unwrap();
    let changed = changed.args().unwrap();
    assert!(changed.changed_properties.contains_key("Instances"));
    assert_eq!(
        proxy.instances().await.unwrap(),
        [("i".into(), "m".into(), "ok".into(), String::new())]
    );
    let e = proxy.unload_module("m").await.unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.Busy"), "{e}");
    let e = proxy.purge_instance("i").await.unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.Busy"), "{e}");

    // SIGTERM stops the instance, then the daemon exits cleanly.
    let pid_file = data.join("instances/i/default_workspace/pid");
    wait_for("the module's pid file", async || {
        std::fs::read_to_string(&pid_file).is_ok_and(|t| t.ends_with('\n'))
    })
    .await;
    let module_pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(daemon_pid, Signal::SIGTERM).unwrap();
    let signal = tokio::time::timeout(DEADLINE, changes.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(signal.args().unwrap().status, "stopped");
    let daemon = procs.0.last_mut().unwrap();
    wait_for("the daemon to exit", async || {
        daemon.try_wait().unwrap().is_some()
    })
    .await;
    assert!(daemon.wait().unwrap().success());
    assert_eq!(
        kill(Pid::from_raw(module_pid), None),
        Err(nix::errno::Errno::ESRCH),
        "the module outlived the daemon"
    );
}
