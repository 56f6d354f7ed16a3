//! runtimed-container: owns `org.evp.Runtime1.Container` and runs the modules that are not
//! WASM. One [`runtime::Runtime`] per module kind ([`spawn`], [`docker`], [`python`]) behind one [`runtime::Supervisor`], which the D-Bus object
//! delegates to. The daemon's own exit or crash does not disturb its instances: their output
//! goes to files ([`logs`]), what it started is recorded ([`record`]), and its next start
//! re-adopts what still runs ([`process`]).

pub mod docker;
pub mod identity;
pub mod logs;
pub mod process;
pub mod python;
pub mod reaper;
pub mod record;
pub mod registry;
pub mod relay;
pub mod runtime;
pub mod spawn;
pub mod tree;

#[cfg(test)]
mod recovery_tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use evp_daemon::{AgentConfig, DaemonArgs};
use evp_schemas::dbus::{EvpError, RUNTIME_CONTAINER_NAME, RUNTIME_CONTAINER_PATH};
use evp_schemas::instance::StartOptionsDict;
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use zbus::interface;
use zbus::object_server::SignalEmitter;

use crate::logs::LogPolicy;
use crate::runtime::{InstanceEvent, OnExit, Supervisor, read_start_options};

/// How long a stopping daemon waits for its last instance changes to reach the bus; they are
/// a few small signals, so a stuck bus is the only reason to hit it.
const EVENT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the package installs the `evp.app` SDK for python modules.
pub const DEFAULT_PYTHON_SDK_PATH: &str = "/usr/lib/evp/python";

/// `nobody`: never an instance's uid, nor anything above it (65535 is the 16-bit -1).
const NOBODY_UID: u32 = 65534;

/// The `[container]` section of `agent.toml`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerConfig {
    /// Grace each instance gets between SIGTERM and SIGKILL when the daemon itself stops them
    /// (with `stop_instances_on_exit`).
    pub stop_grace_ms: u64,
    /// Whether the daemon stops its instances when it exits. Off by default: they keep running
    /// and its next start re-adopts them, so updating or restarting the runtime does not
    /// restart the workloads (as Azure IoT Edge and Ankaios treat theirs).
    pub stop_instances_on_exit: bool,
    /// The most each output stream of an instance takes on disk: `logs/stdout.log` and its
    /// rotated `stdout.log.1` together (likewise stderr), each file at most half of it.
    pub log_max_bytes: u64,
    /// First uid of the range instances get a uid of their own from (gid = uid), when the
    /// runtime can change uids.
    pub instance_uid_min: u32,
    /// Last uid of that range: at most this many instances minus one can run at once.
    pub instance_uid_max: u32,
    /// The Docker engine's Unix socket; `EVP_DOCKER_UNIX_SOCKET` overrides it.
    pub docker_socket: PathBuf,
    /// The Docker engine's `http://` address, when it is not reached over its socket;
    /// `EVP_DOCKER_HOST` overrides it.
    pub docker_host: Option<String>,
    /// The Python interpreter of python modules, looked up on the modules' `PATH`
    /// (`/usr/local/bin:/usr/bin:/bin`) unless it is a path.
    pub python: String,
    /// Folders put on a python module's `PYTHONPATH`: where the `evp.app` SDK is installed.
    pub python_sdk_path: Vec<PathBuf>,
    /// Who reads instance output: not a setting (a relay process of this binary, always, on a
    /// device); the crate's tests, whose executable is not the daemon, read it in threads.
    #[serde(skip)]
    pub log_relay: logs::Relay,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        // EVP gives spawned modules 10 s (CONFIG_EVP_MODULE_INSTANCE_STOP_TIMEOUT) to exit.
        ContainerConfig {
            stop_grace_ms: 10_000,
            stop_instances_on_exit: false,
            log_max_bytes: logs::DEFAULT_LOG_MAX_BYTES,
            instance_uid_min: identity::DEFAULT_UID_MIN,
            instance_uid_max: identity::DEFAULT_UID_MAX,
            docker_socket: docker::DEFAULT_DOCKER_SOCKET.into(),
            docker_host: None,
            python: "python3".into(),
            python_sdk_path: vec![PathBuf::from(DEFAULT_PYTHON_SDK_PATH)],
            log_relay: LogPolicy::default().relay,
        }
    }
}

/// Errors in the `[container]` section.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Below 2, a stream's two files could not hold a byte each.
    #[error("[container] log_max_bytes must be at least 2")]
    LogMaxBytesTooSmall,
    /// A uid range that is empty, holds root, or reaches `nobody` (65534).
    #[error(
        "[container] instance_uid_min ({0}) and instance_uid_max ({1}) must satisfy 1 <= min <= max < 65534"
    )]
    UidRange(u32, u32),
}

impl ContainerConfig {
    /// Refuses values that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.log_max_bytes < 2 {
            return Err(ConfigError::LogMaxBytesTooSmall);
        }
        let (min, max) = (self.instance_uid_min, self.instance_uid_max);
        if min == 0 || min > max || max >= NOBODY_UID {
            return Err(ConfigError::UidRange(min, max));
        }
        Ok(())
    }

    /// What the daemon does with its instances when it exits.
    pub fn on_exit(&self) -> OnExit {
        if self.stop_instances_on_exit {
            OnExit::Stop {
                grace: Duration::from_millis(self.stop_grace_ms),
            }
        } else {
            OnExit::LeaveRunning
        }
    }

    /// Where the Docker engine is: `EVP_DOCKER_UNIX_SOCKET`, else `EVP_DOCKER_HOST`, else
    /// `docker_host` when set, else `docker_socket`.
    pub fn docker_engine(&self) -> docker::Engine {
        let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        match (env("EVP_DOCKER_UNIX_SOCKET"), env("EVP_DOCKER_HOST")) {
            (None, None) => docker::Engine::from_env(
                Some(self.docker_socket.to_string_lossy().into_owned())
                    .filter(|_| self.docker_host.is_none()),
                self.docker_host.clone(),
            ),
            (socket, host) => docker::Engine::from_env(socket, host),
        }
    }

    /// How instance output files are kept.
    pub fn log_policy(&self) -> LogPolicy {
        LogPolicy {
            max_bytes: self.log_max_bytes,
            relay: self.log_relay.clone(),
        }
    }
}

/// The `org.evp.Runtime1` object; every call is delegated to the supervisor.
pub struct ContainerRuntime {
    supervisor: Arc<Supervisor>,
}

impl ContainerRuntime {
    /// The object serving this supervisor.
    pub fn new(supervisor: Arc<Supervisor>) -> ContainerRuntime {
        ContainerRuntime { supervisor }
    }
}

#[interface(name = "org.evp.Runtime1")]
impl ContainerRuntime {
    /// Module kinds this runtime runs.
    #[zbus(property)]
    async fn kinds(&self) -> Vec<String> {
        self.supervisor.kinds()
    }

    async fn load_module(
        &self,
        module_id: &str,
        kind: &str,
        path_or_image: &str,
        sha256: &str,
    ) -> Result<(), EvpError> {
        self.supervisor
            .load_module(module_id, kind, path_or_image, sha256)
            .await
    }

    async fn unload_module(&self, module_id: &str) -> Result<(), EvpError> {
        self.supervisor.unload_module(module_id).await
    }

    /// Answers the instance's process and the uid it runs as, for `SdkBroker1.BindInstance`.
    #[zbus(out_args("pid", "uid"))]
    async fn start_instance(
        &self,
        instance: &str,
        module_id: &str,
        options: StartOptionsDict,
    ) -> Result<(u32, u32), EvpError> {
        let options = read_start_options(options)?;
        self.supervisor
            .start_instance(instance, module_id, options)
            .await
    }

    async fn stop_instance(&self, instance: &str, grace_ms: u32) -> Result<(), EvpError> {
        self.supervisor
            .stop_instance(instance, Duration::from_millis(grace_ms.into()))
            .await
    }

    async fn purge_instance(&self, instance: &str) -> Result<(), EvpError> {
        self.supervisor.purge_instance(instance).await
    }

    /// `(instance, module_id, status, failure_message)` for what this runtime hosts now.
    #[zbus(property)]
    async fn instances(&self) -> Vec<(String, String, String, String)> {
        self.supervisor.instances()
    }

    /// An instance changed state: `starting`, `ok`, `self-exiting`, `error` or `stopped`.
    #[zbus(signal)]
    async fn instance_changed(
        emitter: &SignalEmitter<'_>,
        instance: &str,
        status: &str,
        failure_message: &str,
    ) -> zbus::Result<()>;
}

/// Emits every instance change as `InstanceChanged` and `PropertiesChanged(Instances)`, in
/// order, until the supervisor closes its event stream.
async fn publish_events(
    conn: zbus::Connection,
    mut events: mpsc::UnboundedReceiver<InstanceEvent>,
) {
    let iface = match conn
        .object_server()
        .interface::<_, ContainerRuntime>(RUNTIME_CONTAINER_PATH)
        .await
    {
        Ok(iface) => iface,
        Err(e) => {
            warn!("instance changes will not be published: {e}");
            return;
        }
    };
    while let Some(ev) = events.recv().await {
        let emitter = iface.signal_emitter();
        if let Err(e) = ContainerRuntime::instance_changed(
            emitter,
            &ev.instance,
            ev.status.as_str(),
            &ev.failure_message,
        )
        .await
        {
            warn!(instance = %ev.instance, "emitting InstanceChanged failed: {e}");
        }
        if let Err(e) = iface.get().await.instances_changed(emitter).await {
            warn!(instance = %ev.instance, "emitting PropertiesChanged(Instances) failed: {e}");
        }
    }
}

/// Runs runtimed-container until SIGTERM, then exits, leaving its instances running for its
/// next start (or stopping them, with `[container] stop_instances_on_exit = true`).
pub async fn run(args: DaemonArgs) -> Result<()> {
    let config = AgentConfig::load(&args)?;
    let section: ContainerConfig = config.section("container")?;
    let bus = evp_daemon::bus_builder(&args)?;
    let served = serve(
        &section,
        config.common.data_dir.join("instances"),
        bus,
        async {
            let _ = evp_daemon::wait_for_shutdown().await;
        },
    )
    .await;
    evp_daemon::exit_if_bus_lost(served)
}

/// `EVP_REGISTRY_AUTH`: registry domain → `X-Registry-Auth` value, as JSON; unset or
/// unreadable is none (said in the log). hubd's map (`Hub1.RegistryAuth`) comes first.
fn registry_auth_from_env() -> std::collections::HashMap<String, String> {
    let Ok(text) = std::env::var("EVP_REGISTRY_AUTH") else {
        return Default::default();
    };
    serde_json::from_str(&text).unwrap_or_else(|e| {
        warn!("EVP_REGISTRY_AUTH is not a JSON object of strings, ignored: {e}");
        Default::default()
    })
}

/// Re-adopts what the previous run left, serves the bus until `shutdown` resolves, then does
/// what `section` says with the instances.
pub async fn serve(
    section: &ContainerConfig,
    instances_dir: PathBuf,
    bus: zbus::connection::Builder<'static>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    section.validate()?;
    let identities =
        identity::Identities::detect(section.instance_uid_min, section.instance_uid_max);
    // Before any instance starts, so every orphan of a module is re-parented here.
    reaper::start();
    let registry_auth = Arc::new(registry::RegistryAuth::new(registry_auth_from_env()));
    let (supervisor, events) = Supervisor::with_identities(
        instances_dir.clone(),
        vec![
            Arc::new(spawn::SpawnRuntime::new(section.log_policy())) as Arc<dyn runtime::Runtime>,
            Arc::new(docker::DockerRuntime::new(
                section.docker_engine(),
                section.log_policy(),
                Arc::clone(&registry_auth),
                instances_dir
                    .parent()
                    .map(|data| data.join("docker").join("images.json")),
            )),
            Arc::new(python::PythonRuntime::new(
                section.log_policy(),
                python::find_program(
                    &section.python,
                    Some(std::ffi::OsStr::new(python::MODULE_PATH)),
                ),
                section.python_sdk_path.clone(),
            )),
        ],
        identities,
    );
    // Before the name is owned, so a StartInstance of a re-adopted instance is already the
    // no-op it is for any running one.
    supervisor.recover().await;
    let conn = evp_daemon::connect_named(
        bus.serve_at(
            RUNTIME_CONTAINER_PATH,
            ContainerRuntime::new(supervisor.clone()),
        ),
        RUNTIME_CONTAINER_NAME,
        // A library: `serve` returns BusLost rather than exiting the process (tests embed it).
        false,
    )
    .await?;
    registry_auth.ask_hubd_on(conn.clone());
    let publisher = tokio::spawn(publish_events(conn.clone(), events));
    info!(
        kinds = ?supervisor.kinds(),
        instances_dir = %instances_dir.display(),
        "serving {RUNTIME_CONTAINER_NAME}"
    );
    evp_daemon::notify_ready(&conn, RUNTIME_CONTAINER_NAME);
    let lost = tokio::select! {
        () = shutdown => false,
        () = conn.closed() => true,
    };
    if lost {
        error!("{}; stopping", evp_daemon::BusLost(RUNTIME_CONTAINER_NAME));
    }

    registry_auth.stop_asking_hubd();
    let on_exit = section.on_exit();
    supervisor.shutdown(on_exit).await;
    if tokio::time::timeout(EVENT_FLUSH_TIMEOUT, publisher)
        .await
        .is_err()
    {
        warn!("the last instance changes did not reach the bus in time");
    }
    match on_exit {
        OnExit::Stop { .. } => info!("all instances stopped"),
        OnExit::LeaveRunning => info!("exiting; instances left running"),
    }
    if lost {
        return Err(evp_daemon::BusLost(RUNTIME_CONTAINER_NAME).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    #[test]
    fn the_packaged_agent_toml_shows_every_container_setting_and_they_parse() {
        use evp_daemon::conffile::{PACKAGED, fields_of, shown_keys, uncommented};
        assert_eq!(
            shown_keys(PACKAGED, "container"),
            fields_of::<super::ContainerConfig>()
        );
        let all = evp_daemon::AgentConfig::parse(&uncommented(PACKAGED)).unwrap();
        let section: super::ContainerConfig = all.section("container").unwrap();
        section.validate().unwrap();
        assert_eq!(
            section.python_sdk_path,
            [std::path::PathBuf::from(super::DEFAULT_PYTHON_SDK_PATH)]
        );
    }
    use std::time::Instant;

    use evp_schemas::dbus::Runtime1Proxy;
    use sha2::{Digest, Sha256};
    use zbus::proxy::CacheProperties;

    use super::*;

    /// Upper bound for any awaited condition; generous for a loaded 2-core machine.
    const DEADLINE: Duration = Duration::from_secs(20);

    /// A private dbus-daemon, killed on drop.
    struct Bus(std::process::Child);

    impl Drop for Bus {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Starts a private bus; `None` when dbus-daemon cannot run here.
    fn private_bus(dir: &std::path::Path) -> Option<(Bus, String)> {
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .arg(format!("--address=unix:path={}", dir.join("bus").display()))
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| eprintln!("skipping: dbus-daemon cannot run here: {e}"))
            .ok()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take()?)
            .read_line(&mut line)
            .ok()?;
        Some((Bus(child), line.trim().to_owned()))
    }

    async fn until<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One run of the daemon: `serve` until the returned sender fires (as SIGTERM does).
    fn run_daemon(
        address: &str,
        instances: PathBuf,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<()>>,
    ) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let bus = zbus::connection::Builder::address(address);
        let task = tokio::spawn(async move {
            let config = ContainerConfig {
                log_relay: logs::Relay::InProcess,
                ..ContainerConfig::default()
            };
            serve(&config, instances, bus, async {
                let _ = stopped.await;
            })
            .await
        });
        (stop, task)
    }

    /// The daemon's exit (SIGTERM, here the shutdown future) leaves a running module alone; the
    /// next run serves it as `ok` in `Instances`, StartInstance of it is a no-op without any
    /// LoadModule, and StopInstance stops it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_daemon_exit_leaves_instances_running_for_its_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let Some((_bus, address)) = private_bus(dir.path()) else {
            return;
        };
        let module = dir.path().join("m");
        std::fs::write(
            &module,
            "#!/bin/sh\necho $$ > \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/pid.tmp\"\n\
             mv \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/pid.tmp\" \"$EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH/pid\"\n\
             while :; do echo tick; sleep 0.05; done\n",
        )
        .unwrap();
        std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sha = hex::encode(Sha256::digest(std::fs::read(&module).unwrap()));
        let instances = dir.path().join("instances");
        let client = zbus::connection::Builder::address(address.as_str())
            .build()
            .await
            .unwrap();
        let proxy = || async {
            Runtime1Proxy::builder(&client)
                .destination(RUNTIME_CONTAINER_NAME)
                .path(RUNTIME_CONTAINER_PATH)
                .cache_properties(CacheProperties::No)
                .build()
                .await
                .unwrap()
        };
        let dbus = zbus::fdo::DBusProxy::new(&client).await.unwrap();
        let owned = |want: bool| {
            let dbus = dbus.clone();
            async move || {
                let name = RUNTIME_CONTAINER_NAME.try_into().ok()?;
                (dbus.name_has_owner(name).await.ok()? == want).then_some(())
            }
        };

        let (stop, first) = run_daemon(&address, instances.clone());
        until("the first run to own its name", owned(true)).await;
        let rt = proxy().await;
        rt.load_module("m", "spawn", module.to_str().unwrap(), &sha)
            .await
            .unwrap();
        rt.start_instance("i", "m", Default::default())
            .await
            .unwrap();
        let pid_file = instances.join("i/default_workspace/pid");
        let pid: i32 = until("the module's pid file", async || {
            std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
        })
        .await;
        let alive =
            || process::is_same_live_process(pid, process::stat(pid).ok()??.start_time).ok();
        stop.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(alive(), Some(true), "the daemon's exit stopped the module");
        until("the first run to release its name", owned(false)).await;

        let (stop, second) = run_daemon(&address, instances.clone());
        until("the second run to own its name", owned(true)).await;
        let rt = proxy().await;
        assert_eq!(
            rt.instances().await.unwrap(),
            [("i".into(), "m".into(), "ok".into(), String::new())]
        );
        rt.start_instance("i", "m", Default::default())
            .await
            .unwrap();
        assert_eq!(alive(), Some(true));
        rt.stop_instance("i", 10_000).await.unwrap();
        assert_ne!(
            alive(),
            Some(true),
            "StopInstance left the re-adopted module"
        );
        assert_eq!(rt.instances().await.unwrap(), []);
        stop.send(()).unwrap();
        second.await.unwrap().unwrap();
    }

    #[test]
    fn instances_outlive_the_daemon_unless_configured_otherwise() {
        let parse = |text: &str| -> ContainerConfig {
            let config = AgentConfig::parse(text).unwrap();
            config.section("container").unwrap()
        };
        let default = parse("");
        assert_eq!(default.on_exit(), OnExit::LeaveRunning);
        assert_eq!(default.log_policy().max_bytes, 1024 * 1024);
        default.validate().unwrap();

        let set = parse(
            "[container]\nstop_instances_on_exit = true\nstop_grace_ms = 300\nlog_max_bytes = 4096\n",
        );
        assert_eq!(
            set.on_exit(),
            OnExit::Stop {
                grace: Duration::from_millis(300)
            }
        );
        assert_eq!(set.log_policy().max_bytes, 4096);
        assert!(matches!(
            parse("[container]\nlog_max_bytes = 1\n").validate(),
            Err(ConfigError::LogMaxBytesTooSmall)
        ));
    }
}
