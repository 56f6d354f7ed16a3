//! The five daemons as child processes on one bus: start, readiness (each owns its bus
//! name), signals, supervision with backoff as systemd's `Restart=on-failure`, and a stop that
//! leaves nothing running.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use evp_schemas::Protocol;
use evp_schemas::dbus::{
    HUB_NAME, RECONCILER_NAME, RUNTIME_CONTAINER_NAME, RUNTIME_WASM_NAME, SDK_BROKER_NAME,
};
pub use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::watch;

mod children;
use children::{kill_and_wait, leftovers, spawn_slot, stop_slots, unique, wait_not_running};

/// One daemon of the agent: its binary and the bus name that says it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonSpec {
    /// The binary's file name, also the daemon's name in this API (`evp-hubd`).
    pub binary: &'static str,
    /// The bus name it owns once it serves.
    pub bus_name: &'static str,
}

/// The five daemons, in the order they are started.
pub const DAEMONS: [DaemonSpec; 5] = [
    DaemonSpec {
        binary: "evp-sdk-broker",
        bus_name: SDK_BROKER_NAME,
    },
    DaemonSpec {
        binary: "evp-runtimed-wasm",
        bus_name: RUNTIME_WASM_NAME,
    },
    DaemonSpec {
        binary: "evp-runtimed-container",
        bus_name: RUNTIME_CONTAINER_NAME,
    },
    DaemonSpec {
        binary: "evp-reconcilerd",
        bus_name: RECONCILER_NAME,
    },
    DaemonSpec {
        binary: "evp-hubd",
        bus_name: HUB_NAME,
    },
];

/// The first pause before a restart; doubled on each quick failure (as systemd's
/// `RestartSteps`), so a daemon that cannot start does not spin.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest pause between two restarts: a developer waits no longer than this for a
/// daemon that recovers.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A daemon that ran this long before failing starts again at [`FIRST_BACKOFF`].
const STABLE_RUN: Duration = Duration::from_secs(10);
/// How long a daemon gets between SIGTERM and SIGKILL (systemd gives 90 s; a dev loop wants
/// a quick stop, and the daemons persist before they answer, never at exit).
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for a process to be reaped after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// How often bus names and exits are polled while waiting.
const POLL: Duration = Duration::from_millis(50);
/// The environment variable that marks every process of one stack, so processes the
/// daemons leave behind (spawned modules) are found at stop.
pub const STACK_MARKER_ENV: &str = "EVP_DEVHUB_STACK";
/// Environment the daemons must not inherit from a devhub run by systemd: it would send
/// their logs to the journal and their sd_notify messages to the devhub's unit.
const SYSTEMD_ENV: [&str; 4] = [
    "JOURNAL_STREAM",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Where the daemons' output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DaemonOutput {
    /// Each line to this process's stdout or stderr, prefixed with the daemon's name.
    #[default]
    Forward,
    /// Appended to `<dir>/logs/<daemon>.log`, stdout and stderr together.
    LogFiles,
}

/// Why the stack failed.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A daemon's binary is not in the bin directory.
    #[error("{binary} not found in {dir} (build the workspace first: cargo build --workspace)")]
    MissingBinary {
        /// The binary.
        binary: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// The name is not one of the stack's daemons.
    #[error("no daemon named {0:?} in this stack (names: evp-hubd, evp-reconcilerd, ...)")]
    UnknownDaemon(String),
    /// The daemon is not running.
    #[error("{0} is not running")]
    NotRunning(String),
    /// Talking to the bus failed.
    #[error("D-Bus: {0}")]
    Bus(String),
    /// A signal could not be sent.
    #[error("sending {signal} to {name}: {source}")]
    Signal {
        /// The daemon.
        name: String,
        /// The signal.
        signal: Signal,
        /// What kill(2) said.
        #[source]
        source: nix::Error,
    },
    /// Daemons did not own their bus names in time.
    #[error("not ready within {timeout:?}: {pending}")]
    NotReady {
        /// How long it waited.
        timeout: Duration,
        /// Which daemons, and what was seen of them.
        pending: String,
    },
    /// A daemon exited before it owned its bus name.
    #[error("{name} exited while starting ({status}){hint}")]
    ExitedWhileStarting {
        /// The daemon.
        name: String,
        /// How it exited.
        status: String,
        /// Where its output is.
        hint: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}

/// Locks a mutex, also after a panic elsewhere: the state is plain values, never left half
/// updated by this module.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The folder of the daemons' binaries by default: the current executable's folder, or its
/// parent when that is cargo's `deps` (a test binary), since the daemons are built next to
/// `evp-devhub`.
pub fn default_bin_dir() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| std::io::Error::other("the current executable has no folder"))?;
    Ok(match (dir.file_name(), dir.parent()) {
        (Some(name), Some(parent)) if name == "deps" => parent.to_owned(),
        _ => dir.to_owned(),
    })
}

/// How to run a stack.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Where the daemons' binaries are.
    pub bin_dir: PathBuf,
    /// The stack's folder: `agent.toml`, `data/` (data_dir), `run/` (run_dir), `logs/`.
    pub dir: PathBuf,
    /// The bus address given to every daemon as `--bus`.
    pub bus_address: String,
    /// The MQTT broker's host, for hubd (`EVP_MQTT_HOST`).
    pub mqtt_host: String,
    /// The MQTT broker's port, for hubd (`EVP_MQTT_PORT`).
    pub mqtt_port: u16,
    /// Where the daemons' output goes.
    pub output: DaemonOutput,
    /// Restart a daemon that fails, as systemd's `Restart=on-failure`.
    pub supervise: bool,
    /// How long the daemons get to own their bus names.
    pub ready_timeout: Duration,
    /// hubd's `report_status_interval_min_ms`.
    pub report_status_interval_min_ms: u64,
    /// hubd's `report_status_interval_max_ms` (-1: never forced).
    pub report_status_interval_max_ms: i64,
    /// hubd's `provision_device_key` and `provision_device_secret`: the agent registers
    /// itself with them on its first start.
    pub provision: Option<(String, String)>,
    /// The whole agent.toml, written as it is, instead of [`StackConfig::render_agent_toml`].
    pub agent_toml: Option<String>,
    /// More environment for every daemon (`RUST_LOG` and the rest are inherited anyway).
    pub env: Vec<(String, String)>,
    /// The daemons to run; all five by default.
    pub daemons: Vec<DaemonSpec>,
    /// runtimed-container's `[container] instance_uid_min` and `instance_uid_max`, when not its
    /// default range: stacks that run side by side (parallel tests as root) must not give two
    /// instances one uid, since a stop signals every process of an instance's uid.
    pub instance_uids: Option<(u32, u32)>,
    /// runtimed-container's `[container] python_sdk_path`: by default the workspace's
    /// `sdk/python` when the binaries are a workspace build (`target/<profile>`).
    pub python_sdk_path: Option<PathBuf>,
    /// reconcilerd's `[reconciler] file_url_dirs`: `/` by default, since a development hub is
    /// the developer's own and deploys modules from anywhere on the machine (a device allows
    /// none unless configured).
    pub file_url_dirs: Vec<PathBuf>,
    /// hubd's `[hub] protocol`: the hub's dialect.
    pub protocol: Protocol,
}

/// Short report intervals for a responsive dev loop: a change shows within a fifth of a
/// second, and an unchanged status is re-sent every 10 s so a watcher sees the agent alive.
const DEV_INTERVAL_MIN_MS: u64 = 200;
/// See [`DEV_INTERVAL_MIN_MS`].
const DEV_INTERVAL_MAX_MS: i64 = 10_000;
/// The daemons start in well under a second; a cold debug build of the WASM runtime may
/// take longer to map, and a slow CI machine longer still.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

impl StackConfig {
    /// A configuration with the defaults: binaries from [`default_bin_dir`], output forwarded,
    /// no supervision, short report intervals, all five daemons.
    pub fn new(
        dir: impl Into<PathBuf>,
        bus_address: impl Into<String>,
        mqtt_host: impl Into<String>,
        mqtt_port: u16,
    ) -> Result<StackConfig, StackError> {
        let bin_dir = default_bin_dir().map_err(io("finding the current executable"))?;
        let python_sdk_path = bin_dir
            .ancestors()
            .nth(2)
            .map(|workspace| workspace.join("sdk").join("python"))
            .filter(|sdk| sdk.join("evp").join("app").is_dir());
        Ok(StackConfig {
            bin_dir,
            dir: dir.into(),
            bus_address: bus_address.into(),
            mqtt_host: mqtt_host.into(),
            mqtt_port,
            output: DaemonOutput::Forward,
            supervise: false,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            report_status_interval_min_ms: DEV_INTERVAL_MIN_MS,
            report_status_interval_max_ms: DEV_INTERVAL_MAX_MS,
            provision: None,
            agent_toml: None,
            env: Vec::new(),
            daemons: DAEMONS.to_vec(),
            instance_uids: None,
            python_sdk_path,
            file_url_dirs: vec![PathBuf::from("/")],
            protocol: Protocol::Evp2,
        })
    }

    /// The persistent data root of the daemons (`data_dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The runtime files root of the daemons (`run_dir`).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Where [`DaemonOutput::LogFiles`] writes.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// The agent.toml this configuration generates.
    pub fn render_agent_toml(&self) -> String {
        let path = |p: PathBuf| toml::Value::String(p.to_string_lossy().into_owned());
        let mut hub = toml::Table::new();
        hub.insert("mqtt_host".into(), self.mqtt_host.clone().into());
        hub.insert("mqtt_port".into(), i64::from(self.mqtt_port).into());
        hub.insert(
            "report_status_interval_min_ms".into(),
            i64::try_from(self.report_status_interval_min_ms)
                .unwrap_or(i64::MAX)
                .into(),
        );
        hub.insert(
            "report_status_interval_max_ms".into(),
            self.report_status_interval_max_ms.into(),
        );
        if let Some((key, secret)) = &self.provision {
            hub.insert("provision_device_key".into(), key.clone().into());
            hub.insert("provision_device_secret".into(), secret.clone().into());
        }
        if self.protocol != Protocol::Evp2 {
            hub.insert("protocol".into(), self.protocol.as_str().into());
        }
        let mut top = toml::Table::new();
        top.insert("data_dir".into(), path(self.data_dir()));
        top.insert("run_dir".into(), path(self.run_dir()));
        top.insert("hub".into(), toml::Value::Table(hub));
        // On a device the runtime leaves instances running when it stops, to re-adopt them;
        // a development stack stops as a whole and leaves nothing behind.
        let mut container = toml::Table::new();
        container.insert("stop_instances_on_exit".into(), true.into());
        if let Some((min, max)) = self.instance_uids {
            container.insert("instance_uid_min".into(), i64::from(min).into());
            container.insert("instance_uid_max".into(), i64::from(max).into());
        }
        if let Some(sdk) = &self.python_sdk_path {
            container.insert(
                "python_sdk_path".into(),
                toml::Value::Array(vec![path(sdk.clone())]),
            );
        }
        top.insert("container".into(), toml::Value::Table(container));
        let mut reconciler = toml::Table::new();
        reconciler.insert(
            "file_url_dirs".into(),
            toml::Value::Array(self.file_url_dirs.iter().cloned().map(path).collect()),
        );
        top.insert("reconciler".into(), toml::Value::Table(reconciler));
        format!(
            "# Written by evp-devhub for a development stack.\n{}",
            toml::to_string(&top).unwrap_or_default()
        )
    }
}

/// What is known of one daemon.
#[derive(Debug, Default)]
struct SlotState {
    pid: Option<u32>,
    /// Whether it should be running: set by a start, cleared by a stop or a clean exit.
    wanted: bool,
    exits: u64,
    last_exit: Option<ExitStatus>,
    backoff: Option<Duration>,
    /// Environment for this daemon only, from its next start on (see [`Stack::set_env`]).
    extra_env: Vec<(String, String)>,
}

#[derive(Debug)]
struct Slot {
    spec: DaemonSpec,
    state: Mutex<SlotState>,
    running: watch::Sender<bool>,
}

#[derive(Debug)]
struct Inner {
    config: StackConfig,
    agent_toml: PathBuf,
    marker: String,
    slots: Vec<Slot>,
    stopping: AtomicBool,
    stopped: watch::Sender<bool>,
}

/// The daemons of one agent, running as child processes.
///
/// Dropping it kills whatever still runs (SIGKILL); [`Stack::stop_all`] stops them gently.
#[derive(Debug)]
pub struct Stack {
    inner: Arc<Inner>,
}

/// How a process ended, as a person reads it: `exit code 1`, `signal 9`.
pub fn describe_exit(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "unknown status".into(),
    }
}

/// Whether systemd's `Restart=on-failure` would restart after this exit: a non-zero code,
/// or a signal other than the clean ones (SIGHUP, SIGINT, SIGTERM, SIGPIPE).
pub fn is_failure(status: &ExitStatus) -> bool {
    match (status.code(), status.signal()) {
        (Some(code), _) => code != 0,
        (None, Some(sig)) => ![
            Signal::SIGHUP as i32,
            Signal::SIGINT as i32,
            Signal::SIGTERM as i32,
            Signal::SIGPIPE as i32,
        ]
        .contains(&sig),
        _ => true,
    }
}

/// The pause before the next restart, and the one after it: doubling from [`FIRST_BACKOFF`]
/// up to [`MAX_BACKOFF`], back to the first after a run of [`STABLE_RUN`].
fn next_backoff(previous: Option<Duration>, ran_for: Duration) -> (Duration, Duration) {
    let now = match previous {
        Some(p) if ran_for < STABLE_RUN => p,
        _ => FIRST_BACKOFF,
    };
    (now, (now * 2).min(MAX_BACKOFF))
}

/// Makes the child get SIGTERM when the thread that spawned it ends, so a devhub that
/// crashes or is killed leaves no daemon behind.
pub(crate) fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; it makes one prctl(2) call and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
}

fn send_signal(pid: u32, signal: Signal) -> nix::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| nix::Error::ESRCH)?;
    nix::sys::signal::kill(Pid::from_raw(pid), signal)
}

impl Stack {
    /// Writes agent.toml, starts every daemon, and returns once each owns its bus name.
    /// On failure, what was started is stopped again.
    pub async fn launch(config: StackConfig) -> Result<Stack, StackError> {
        for spec in &config.daemons {
            if !config.bin_dir.join(spec.binary).is_file() {
                return Err(StackError::MissingBinary {
                    binary: spec.binary.into(),
                    dir: config.bin_dir.clone(),
                });
            }
        }
        for dir in [config.data_dir(), config.run_dir()] {
            std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        if config.output == DaemonOutput::LogFiles {
            let dir = config.log_dir();
            std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let agent_toml = config.dir.join("agent.toml");
        let text = config
            .agent_toml
            .clone()
            .unwrap_or_else(|| config.render_agent_toml());
        std::fs::write(&agent_toml, text)
            .map_err(io(format!("writing {}", agent_toml.display())))?;

        let slots = config
            .daemons
            .iter()
            .map(|spec| Slot {
                spec: *spec,
                state: Mutex::default(),
                running: watch::channel(false).0,
            })
            .collect();
        let stack = Stack {
            inner: Arc::new(Inner {
                marker: format!("{}-{}", std::process::id(), unique()),
                config,
                agent_toml,
                slots,
                stopping: AtomicBool::new(false),
                stopped: watch::channel(false).0,
            }),
        };
        let started = async {
            for index in 0..stack.inner.slots.len() {
                spawn_slot(&stack.inner, index)?;
            }
            let all: Vec<usize> = (0..stack.inner.slots.len()).collect();
            stack
                .wait_ready_indices(&all, stack.inner.config.ready_timeout, true)
                .await
        };
        match started.await {
            Ok(()) => Ok(stack),
            Err(e) => {
                stack.stop_all().await;
                Err(e)
            }
        }
    }

    /// The names of the daemons of this stack (their binaries' names).
    pub fn names(&self) -> Vec<&'static str> {
        self.inner.slots.iter().map(|s| s.spec.binary).collect()
    }

    /// The configuration the stack runs with.
    pub fn config(&self) -> &StackConfig {
        &self.inner.config
    }

    /// The agent.toml the daemons read.
    pub fn agent_toml_path(&self) -> &Path {
        &self.inner.agent_toml
    }

    fn index(&self, name: &str) -> Result<usize, StackError> {
        let full = if name.starts_with("evp-") {
            name.to_owned()
        } else {
            format!("evp-{name}")
        };
        self.inner
            .slots
            .iter()
            .position(|s| s.spec.binary == full)
            .ok_or_else(|| StackError::UnknownDaemon(name.to_owned()))
    }

    /// The process id of a daemon (by binary name, `evp-hubd`, or without `evp-`), while it
    /// runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        let index = self.index(name).ok()?;
        lock(&self.inner.slots[index].state).pid
    }

    /// How many times the daemon exited, for whatever reason, since the stack started.
    pub fn exits(&self, name: &str) -> Result<u64, StackError> {
        let index = self.index(name)?;
        Ok(lock(&self.inner.slots[index].state).exits)
    }

    /// How the daemon last exited.
    pub fn last_exit(&self, name: &str) -> Result<Option<ExitStatus>, StackError> {
        let index = self.index(name)?;
        Ok(lock(&self.inner.slots[index].state).last_exit)
    }

    /// Sends `signal` to the daemon; returns once it is sent. With supervision, a failure
    /// exit (SIGKILL, SIGSEGV...) is restarted after the backoff and a clean one (SIGTERM)
    /// is not; see [`Stack::wait_exit`] and [`Stack::wait_ready`].
    pub fn kill(&self, name: &str, signal: Signal) -> Result<(), StackError> {
        let index = self.index(name)?;
        let slot = &self.inner.slots[index];
        let state = lock(&slot.state);
        let pid = state
            .pid
            .ok_or_else(|| StackError::NotRunning(slot.spec.binary.into()))?;
        send_signal(pid, signal).map_err(|source| StackError::Signal {
            name: slot.spec.binary.into(),
            signal,
            source,
        })
    }

    /// Starts the daemon if it does not run, and waits until it owns its bus name.
    pub async fn start(&self, name: &str) -> Result<(), StackError> {
        let index = self.index(name)?;
        spawn_slot(&self.inner, index)?;
        self.wait_ready_indices(&[index], self.inner.config.ready_timeout, false)
            .await
    }

    /// Sets environment for one daemon only, used from its next start on (a test-only fault
    /// switch, for example); an empty list removes it.
    pub fn set_env(&self, name: &str, env: Vec<(String, String)>) -> Result<(), StackError> {
        let index = self.index(name)?;
        lock(&self.inner.slots[index].state).extra_env = env;
        Ok(())
    }

    /// Waits until the daemon owns its bus name.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<(), StackError> {
        let index = self.index(name)?;
        self.wait_ready_indices(&[index], timeout, false).await
    }

    /// Waits until the daemon's process has exited and been reaped; `true` if it did within
    /// `timeout`.
    pub async fn wait_exit(&self, name: &str, timeout: Duration) -> Result<bool, StackError> {
        let index = self.index(name)?;
        Ok(wait_not_running(&self.inner.slots[index], timeout).await)
    }

    /// Stops one daemon: SIGTERM, SIGKILL after a grace, reaped. It is not restarted.
    pub async fn stop(&self, name: &str) -> Result<(), StackError> {
        let index = self.index(name)?;
        stop_slots(&self.inner, &[index]).await;
        Ok(())
    }

    /// Stops every daemon (SIGTERM, up to a few seconds, then SIGKILL, all reaped), then
    /// kills what they left behind (spawned modules carrying the stack's marker or in a
    /// daemon's process group). Nothing of the stack runs afterwards.
    pub async fn stop_all(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.stopped.send_replace(true);
        let all: Vec<usize> = (0..self.inner.slots.len()).collect();
        let groups: Vec<u32> = self
            .inner
            .slots
            .iter()
            .filter_map(|s| lock(&s.state).pid)
            .collect();
        stop_slots(&self.inner, &all).await;
        let left = leftovers(&self.inner.marker, &groups);
        if !left.is_empty() {
            eprintln!(
                "evp-devhub: stopping {} process(es) the daemons left running",
                left.len()
            );
            kill_and_wait(&left).await;
        }
    }

    async fn wait_ready_indices(
        &self,
        indices: &[usize],
        timeout: Duration,
        fail_on_exit: bool,
    ) -> Result<(), StackError> {
        let deadline = Instant::now() + timeout;
        let conn = zbus::connection::Builder::address(self.inner.config.bus_address.as_str())
            .build()
            .await
            .map_err(|e| StackError::Bus(format!("connecting to the bus: {e}")))?;
        let dbus = zbus::fdo::DBusProxy::new(&conn)
            .await
            .map_err(|e| StackError::Bus(e.to_string()))?;
        let exits_before: Vec<u64> = indices
            .iter()
            .map(|i| lock(&self.inner.slots[*i].state).exits)
            .collect();
        let mut pending: Vec<usize> = indices.to_vec();
        loop {
            let mut still = Vec::new();
            for &index in &pending {
                let slot = &self.inner.slots[index];
                let name = zbus::names::BusName::try_from(slot.spec.bus_name)
                    .map_err(|e| StackError::Bus(e.to_string()))?;
                // Owned by this daemon's process, not by whoever else may hold the name.
                let owner_pid = dbus.get_connection_unix_process_id(name).await.ok();
                let owned = owner_pid.is_some() && owner_pid == lock(&slot.state).pid;
                if !owned {
                    still.push(index);
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok(());
            }
            if fail_on_exit {
                for (&index, before) in indices.iter().zip(&exits_before) {
                    let slot = &self.inner.slots[index];
                    let state = lock(&slot.state);
                    if state.exits > *before && pending.contains(&index) {
                        return Err(StackError::ExitedWhileStarting {
                            name: slot.spec.binary.into(),
                            status: state
                                .last_exit
                                .as_ref()
                                .map_or("unknown status".into(), describe_exit),
                            hint: self.output_hint(slot.spec.binary),
                        });
                    }
                }
            }
            if Instant::now() >= deadline {
                let pending = pending
                    .iter()
                    .map(|&i| {
                        let slot = &self.inner.slots[i];
                        let state = lock(&slot.state);
                        let seen = match (state.pid, &state.last_exit) {
                            (Some(pid), _) => format!("running as pid {pid}"),
                            (None, Some(s)) => format!("exited, {}", describe_exit(s)),
                            (None, None) => "not started".into(),
                        };
                        format!(
                            "{} has no {} ({seen})",
                            slot.spec.binary, slot.spec.bus_name
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(StackError::NotReady { timeout, pending });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn output_hint(&self, binary: &str) -> String {
        match self.inner.config.output {
            DaemonOutput::Forward => "; its output is above".into(),
            DaemonOutput::LogFiles => format!(
                "; see {}",
                self.inner
                    .config
                    .log_dir()
                    .join(format!("{binary}.log"))
                    .display()
            ),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.stopped.send_replace(true);
        for slot in &self.inner.slots {
            let mut state = lock(&slot.state);
            state.wanted = false;
            if let Some(pid) = state.pid {
                let _ = send_signal(pid, Signal::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::children::process_group_of;
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets_after_a_stable_run() {
        let quick = Duration::from_millis(100);
        let (now, next) = next_backoff(None, quick);
        assert_eq!((now, next), (FIRST_BACKOFF, FIRST_BACKOFF * 2));
        let (now, next) = next_backoff(Some(next), quick);
        assert_eq!((now, next), (FIRST_BACKOFF * 2, FIRST_BACKOFF * 4));
        let (now, _) = next_backoff(Some(MAX_BACKOFF), quick);
        assert_eq!(now, MAX_BACKOFF);
        assert_eq!(next_backoff(Some(MAX_BACKOFF), quick).1, MAX_BACKOFF);
        assert_eq!(next_backoff(Some(MAX_BACKOFF), STABLE_RUN).0, FIRST_BACKOFF);
    }

    #[test]
    fn failures_are_what_systemd_restarts_on() {
        let code = |c: i32| ExitStatus::from_raw(c << 8);
        let signal = |s: Signal| ExitStatus::from_raw(s as i32);
        assert!(!is_failure(&code(0)));
        assert!(is_failure(&code(1)));
        assert!(is_failure(&signal(Signal::SIGKILL)));
        assert!(is_failure(&signal(Signal::SIGSEGV)));
        assert!(!is_failure(&signal(Signal::SIGTERM)));
        assert!(!is_failure(&signal(Signal::SIGINT)));
        assert_eq!(describe_exit(&signal(Signal::SIGKILL)), "signal 9");
        assert_eq!(describe_exit(&code(3)), "exit code 3");
    }

    #[test]
    fn the_process_group_is_read_past_the_command() {
        let stat = "1234 (evp (odd) name) S 1 4321 4321 0 -1 4194560";
        assert_eq!(process_group_of(stat), Some(4321));
        assert_eq!(process_group_of("garbage"), None);
    }

    #[test]
    fn the_agent_toml_sets_the_dirs_and_the_hub() {
        let mut config =
            StackConfig::new("/tmp/devhub x", "unix:path=/tmp/b", "127.0.0.1", 1999).unwrap();
        config.report_status_interval_min_ms = 200;
        let text = config.render_agent_toml();
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed["data_dir"].as_str(), Some("/tmp/devhub x/data"));
        assert_eq!(parsed["run_dir"].as_str(), Some("/tmp/devhub x/run"));
        assert_eq!(parsed["hub"]["mqtt_port"].as_integer(), Some(1999));
        assert_eq!(
            parsed["hub"]["report_status_interval_min_ms"].as_integer(),
            Some(200)
        );
    }

    #[test]
    fn the_bin_dir_of_a_test_binary_is_above_deps() {
        let dir = default_bin_dir().unwrap();
        assert_ne!(dir.file_name().and_then(|n| n.to_str()), Some("deps"));
    }
}
