//! Each runtime daemon alone on a private bus with the project's policy, called as reconcilerd
//! calls it (on a private bus every daemon user is the current user, so the test may): its
//! errors carry the `org.evp.Error.*` names, it emits its changes, runtimed-container's SIGTERM
//! stops its instances before a clean exit (with `stop_instances_on_exit`), and runtimed-wasm
//! refuses a module it cannot run with the reason. WASM instances run in `wasm.rs`.
//! Introspection against `schemas/dbus` is `introspection.rs`'s.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use evp_devhub::PrivateBus;
use evp_schemas::dbus::{
    RUNTIME_CONTAINER_NAME, RUNTIME_CONTAINER_PATH, RUNTIME_WASM_NAME, RUNTIME_WASM_PATH,
    Runtime1Proxy, error_message, error_name,
};
use evp_schemas::instance::StartOptions;
use evp_system_tests::{DEADLINE, bin_dir, wait_for};
use futures_util::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

/// One daemon as a process, with its output in a log file; killed on drop, and its log
/// printed when the test failed.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `binary` on `bus` with an `agent.toml` of `config` in `dir`.
    fn start(binary: &str, bus: &PrivateBus, dir: &Path, config: &str) -> Daemon {
        let path = bin_dir().join(binary);
        assert!(
            path.exists(),
            "{} is not built: run `cargo build --workspace` before the tests",
            path.display()
        );
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join(format!("{binary}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(path)
            .arg("--config")
            .arg(&config_path)
            .arg("--bus")
            .arg(bus.address())
            .env_remove("EVP_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("{}:\n{log}", self.log.display());
        }
    }
}

/// A connection to `bus` once `name` is owned there.
async fn connect_when_owned(bus: &PrivateBus, name: &str) -> zbus::Connection {
    let conn = zbus::connection::Builder::address(bus.address())
        .build()
        .await
        .unwrap();
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
    wait_for(&format!("{name} on the bus"), DEADLINE, async || {
        dbus.name_has_owner(name.try_into().unwrap())
            .await
            .unwrap()
            .then_some(())
    })
    .await
    .unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread")]
async fn runtimed_container_serves_runtime1_and_stops_instances_on_sigterm() {
    let dir = tempfile::Builder::new()
        .prefix("evp-runtime-")
        .tempdir()
        .unwrap();
    evp_system_tests::system::traversable(dir.path()).unwrap();
    let bus = PrivateBus::start(&dir.path().join("bus")).unwrap();
    let data = dir.path().join("data");
    let mut daemon = Daemon::start(
        "evp-runtimed-container",
        &bus,
        dir.path(),
        &format!(
            "data_dir = \"{}\"\n[container]\nstop_grace_ms = 300\nstop_instances_on_exit = true\n",
            data.display()
        ),
    );
    let conn = connect_when_owned(&bus, RUNTIME_CONTAINER_NAME).await;

    let proxy = Runtime1Proxy::builder(&conn)
        .destination(RUNTIME_CONTAINER_NAME)
        .path(RUNTIME_CONTAINER_PATH)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    assert_eq!(proxy.kinds().await.unwrap(), ["docker", "python", "spawn"]);
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
    let module = dir.path().join("module");
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
    let no_options = StartOptions::default().to_dbus().unwrap();
    let e = proxy
        .start_instance("i", "m", no_options.clone())
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.NotFound"), "{e}");

    proxy.load_module("m", "spawn", path, &sha).await.unwrap();
    let (started_pid, uid) = proxy
        .start_instance("i", "m", no_options.clone())
        .await
        .unwrap();
    // Root may give instances uids of their own, an ordinary user runs them as itself.
    if nix::unistd::geteuid().is_root() {
        assert!((61184..=65519).contains(&uid), "uid {uid}");
    } else {
        assert_eq!(uid, nix::unistd::geteuid().as_raw());
    }
    // Repeated, the start is a no-op answering the same process.
    assert_eq!(
        proxy
            .start_instance("i", "m", no_options.clone())
            .await
            .unwrap(),
        (started_pid, uid)
    );
    for expected in ["starting", "ok"] {
        let signal = tokio::time::timeout(DEADLINE, changes.next())
            .await
            .unwrap_or_else(|_| panic!("no InstanceChanged {expected}"))
            .unwrap();
        let args = signal.args().unwrap();
        assert_eq!((args.instance, args.status), ("i", expected));
    }
    let changed = tokio::time::timeout(DEADLINE, props_changed.next())
        .await
        .expect("no PropertiesChanged")
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
    let module_pid: i32 = wait_for("the module's pid file", DEADLINE, async || {
        let text = std::fs::read_to_string(&pid_file).ok()?;
        if text.ends_with('\n') {
            text.trim().parse().ok()
        } else {
            None
        }
    })
    .await
    .unwrap();
    assert_eq!(module_pid.unsigned_abs(), started_pid);
    kill(daemon.pid(), Signal::SIGTERM).unwrap();
    let signal = tokio::time::timeout(DEADLINE, changes.next())
        .await
        .expect("no InstanceChanged stopped")
        .unwrap();
    assert_eq!(signal.args().unwrap().status, "stopped");
    let status = wait_for("the daemon to exit", DEADLINE, async || {
        daemon.child.try_wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "runtimed-container exited with {status}");
    assert_eq!(
        kill(Pid::from_raw(module_pid), None),
        Err(nix::errno::Errno::ESRCH),
        "the module outlived the daemon"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn runtimed_wasm_serves_runtime1_and_refuses_what_it_cannot_run() {
    let dir = tempfile::Builder::new()
        .prefix("evp-runtime-")
        .tempdir()
        .unwrap();
    evp_system_tests::system::traversable(dir.path()).unwrap();
    let bus = PrivateBus::start(&dir.path().join("bus")).unwrap();
    let _daemon = Daemon::start(
        "evp-runtimed-wasm",
        &bus,
        dir.path(),
        &format!("data_dir = \"{}\"\n", dir.path().join("data").display()),
    );
    let conn = connect_when_owned(&bus, RUNTIME_WASM_NAME).await;

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
    assert_eq!(error_name(&e), Some("org.evp.Error.InvalidArgument"), "{e}");
    assert!(error_message(&e).contains("does not exist"), "{e}");
    let not_wasm = dir.path().join("not-wasm");
    std::fs::write(&not_wasm, b"#!/bin/sh\n").unwrap();
    let sha = hex::encode(Sha256::digest(b"#!/bin/sh\n"));
    let e = proxy
        .load_module("m", "wasm", not_wasm.to_str().unwrap(), &sha)
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.InvalidArgument"), "{e}");
    assert!(error_message(&e).contains("does not validate"), "{e}");
    let options = StartOptions::default().to_dbus().unwrap();
    let e = proxy.start_instance("i", "m", options).await.unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.NotFound"), "{e}");

    proxy.stop_instance("i", 1000).await.unwrap();
    proxy.unload_module("m").await.unwrap();
    proxy.purge_instance("i").await.unwrap();
    let e = proxy.purge_instance("..").await.unwrap_err();
    assert_eq!(error_name(&e), Some("org.evp.Error.InvalidArgument"), "{e}");
}
