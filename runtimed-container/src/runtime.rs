//! The `Runtime` trait every module kind implements, and the supervisor that keeps modules and
//! instances, their statuses, their records on disk (to re-adopt them after a restart) and the
//! stop policy, whatever the kind.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use evp_schemas::InstanceState;
use evp_schemas::dbus::EvpError;
use evp_schemas::deployment::validate_instance_name;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::identity::{self, Identities};
use crate::record::{self, InstanceRecord, ProcessHandle, RECORD_VERSION};
use crate::tree::{self, Scope};

mod dirs;
mod options;
mod recover;

pub use options::{InstanceOptions, Status, read_start_options};

pub(crate) use dirs::own_uid;

pub use evp_schemas::instance::{ENV_DEFAULT_WORKSPACE, ENV_SDK_SOCKET};
/// File name of the SDK socket inside the instance directory when the caller names none, as in
/// EVP's on-disk layout.
pub const SDK_SOCKET_FILE: &str = "sdk.sock";
/// Folder inside the instance directory that the module may write to, as in EVP.
pub const DEFAULT_WORKSPACE_DIR: &str = "default_workspace";
/// How long a stop waits for the kernel to reap an instance after SIGKILL. SIGKILL cannot be
/// ignored, so only a process stuck in the kernel (uninterruptible I/O) outlives this; the
/// caller then gets an error instead of a call that never answers.
pub const KILL_REAP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stop waits for an instance to exit by itself before SIGTERM. Long enough for a
/// module that just got the SDK's exit event and closed its socket to return from `main`,
/// short enough that stopping a module that ignores the SDK is not noticeably slower.
pub const VOLUNTARY_EXIT_WINDOW: Duration = Duration::from_millis(200);
/// How often a stop looks whether what an instance left behind has exited.
const LEFTOVER_POLL: Duration = Duration::from_millis(20);
/// Failure message of a recorded instance whose process was gone when the runtime started.
pub const DIED_WHILE_AWAY: &str = "exited while runtimed-container was not running";
/// Failure message of a re-adopted instance that exited: it is not this runtime's child, so its
/// exit status is unknowable. `error`, not `self-exiting`, because a crash is the safe
/// assumption: reconcilerd's restart policy starts it again.
pub const EXIT_STATUS_UNKNOWN: &str = "exited (status unknown: not a child of this runtime)";

/// One kind of module (`spawn`; `docker` and `python` later): how to verify a module and how to
/// start an instance of it. Starting, stopping and status are the supervisor's, the same for
/// every kind.
pub trait Runtime: Send + Sync {
    /// The module kind as named in `LoadModule` and in the `Kinds` property.
    fn kind(&self) -> &'static str;

    /// Verifies a module (a file in the module cache, an image) before it is remembered.
    fn load<'a>(
        &'a self,
        module_id: &'a str,
        location: &'a str,
        sha256: &'a str,
    ) -> BoxFuture<'a, Result<(), EvpError>>;

    /// Starts an instance; the error is the message its `error` status carries.
    fn start(&self, spec: StartSpec) -> BoxFuture<'_, Result<Started, String>>;

    /// Takes back an instance an earlier run of the daemon started, if its process still runs.
    /// The error is why it could not be checked.
    fn adopt(&self, spec: AdoptSpec) -> BoxFuture<'_, Result<Adoption, String>>;

    /// Cleans up after an instance that stopped and left `Instances` (its container, for the
    /// docker kind). Processes leave nothing.
    fn stopped<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, ()> {
        let _ = instance;
        Box::pin(std::future::ready(()))
    }

    /// Releases what a loaded module held, once no module of this location is loaded (an image
    /// this runtime brought to the device, for the docker kind). Module files are reconcilerd's.
    fn unloaded<'a>(&'a self, location: &'a str) -> BoxFuture<'a, ()> {
        let _ = location;
        Box::pin(std::future::ready(()))
    }

    /// Once re-adoption is done: removes what earlier runs left that no instance in `keep`
    /// owns (containers of ours). Processes leave nothing: a process not re-adopted is gone.
    fn sweep<'a>(&'a self, keep: &'a [String]) -> BoxFuture<'a, ()> {
        let _ = keep;
        Box::pin(std::future::ready(()))
    }
}

/// What a runtime needs to re-adopt one instance.
#[derive(Debug, Clone)]
pub struct AdoptSpec {
    /// The instance name.
    pub instance: String,
    /// `<data_dir>/instances/<instance>`.
    pub instance_dir: PathBuf,
    /// The process as recorded when it started.
    pub process: ProcessHandle,
    /// The uid of its own it runs as, if any.
    pub uid: Option<u32>,
    /// Its container, as recorded, for the docker kind.
    pub container: Option<String>,
}

/// The outcome of [`Runtime::adopt`].
pub enum Adoption {
    /// The process still runs and is watched again.
    Running(Started),
    /// The process is gone (or its PID belongs to another process now); why, for the log.
    Gone(String),
}

/// A running instance as its runtime controls it.
pub trait Workload: Send + Sync {
    /// Asks the instance to exit (SIGTERM to its process group).
    fn terminate(&self) -> Result<(), String>;
    /// Forces the instance and everything it started to exit (SIGKILL to its process group).
    fn kill(&self) -> Result<(), String>;
}

/// What a runtime hands back once an instance runs.
pub struct Started {
    /// How to stop it.
    pub workload: Arc<dyn Workload>,
    /// Resolves when the instance has exited (and, for a child, been reaped).
    pub exited: BoxFuture<'static, Exit>,
    /// The process to record for re-adoption; `None` when it cannot be identified.
    pub process: Option<ProcessHandle>,
    /// The instance's process id, as `StartInstance` answers it.
    pub pid: u32,
    /// Every process of the instance (not only its group), for stops; `None` for kinds whose
    /// workload is not a process tree.
    pub scope: Option<Scope>,
    /// The engine's id of its container, for the docker kind, to record.
    pub container: Option<String>,
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It returned from `main` or called `exit` with this status.
    Code(i32),
    /// A signal killed it; the signal's name (`SIGSEGV`).
    Signal(String),
    /// Its end could not be observed; why.
    Lost(String),
    /// It exited, but it is not this runtime's child (it was re-adopted), so how is unknown.
    Unknown,
}

/// Everything a runtime needs to start one instance.
#[derive(Debug, Clone)]
pub struct StartSpec {
    /// The instance name.
    pub instance: String,
    /// The module's file path or image, as given to `LoadModule`.
    pub module_location: String,
    /// `<data_dir>/instances/<instance>`, already created.
    pub instance_dir: PathBuf,
    /// `<instance_dir>/default_workspace`, already created.
    pub workspace: PathBuf,
    /// Where the module finds its SDK socket.
    pub sdk_socket: PathBuf,
    /// Extra environment entries from the `env` option.
    pub env: BTreeMap<String, String>,
    /// The `entry_point` option, for kinds that use one.
    pub entry_point: Option<String>,
    /// What a container gets beyond the default, for the docker kind.
    pub container: evp_schemas::ContainerOptions,
    /// The uid (and gid) of its own to run it as, with no supplementary groups; `None` to run
    /// it as the runtime's user.
    pub uid: Option<u32>,
}

/// A module location no loaded module uses any more, and the runtime that loaded it.
type Released = (Arc<dyn Runtime>, String);

/// What the daemon does with its instances when it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// Stops each (SIGTERM, this grace, SIGKILL), as `StopInstance` does.
    Stop {
        /// Time between SIGTERM and SIGKILL.
        grace: Duration,
    },
    /// Leaves them running, recorded, for the next start of the daemon to re-adopt.
    LeaveRunning,
}

/// Which recorded instances [`Supervisor::recover`] found in which state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Still running, and watched again.
    pub adopted: Vec<String>,
    /// Gone while the daemon was away (or not re-adoptable): now `error`.
    pub died: Vec<String>,
    /// Had already ended before the daemon stopped; they keep that status.
    pub ended: Vec<String>,
}

/// One change of an instance, to be emitted as `InstanceChanged` plus `PropertiesChanged`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEvent {
    /// The instance name.
    pub instance: String,
    /// `starting`, `ok`, `self-exiting`, `error` or `stopped` (after it left `Instances`).
    pub status: InstanceState,
    /// Why, for `error`; empty otherwise.
    pub failure_message: String,
}

/// Where an instance's process is in its life; stops wait on it.
#[derive(Clone)]
enum Phase {
    /// The runtime is starting it.
    Starting,
    /// It runs.
    Running(Arc<dyn Workload>),
    /// It never started, or it exited and was reaped.
    Gone,
}

struct Module {
    kind: &'static str,
    location: String,
}

struct Instance {
    module_id: String,
    /// Tells this start apart from an earlier or later one of the same name.
    generation: u64,
    status: Status,
    /// A stop is under way: the exit it causes is not a failure.
    stopping: bool,
    phase: watch::Sender<Phase>,
    /// What is on disk for it; `None` until its module was resolved.
    record: Option<InstanceRecord>,
    /// Its process id once started, for the answer of a repeated `StartInstance`.
    pid: Option<u32>,
    /// Every process of it, once started: a stop ends them all, also those left behind by a
    /// process that exited.
    scope: Option<Scope>,
}

impl Instance {
    fn is_active(&self) -> bool {
        !matches!(*self.phase.borrow(), Phase::Gone)
    }
}

struct State {
    modules: HashMap<String, Module>,
    instances: BTreeMap<String, Instance>,
    next_generation: u64,
    /// False once the daemon is shutting down: no new instance may start.
    accepting: bool,
    /// False once the daemon left its instances running for its next start: exits seen after
    /// that are not written to the records, which belong to the next run.
    owns_records: bool,
    /// `None` once the daemon stopped publishing changes.
    events: Option<mpsc::UnboundedSender<InstanceEvent>>,
}

impl State {
    /// Records a change for the bus. Called with the state locked, so events leave in the
    /// order the state changed.
    fn emit(&self, instance: &str, status: InstanceState, failure_message: &str) {
        info!(
            instance,
            status = status.as_str(),
            failure_message,
            "instance changed"
        );
        if let Some(tx) = &self.events {
            let _ = tx.send(InstanceEvent {
                instance: instance.to_owned(),
                status,
                failure_message: failure_message.to_owned(),
            });
        }
    }

    fn set_status(&mut self, instance: &str, generation: u64, status: Status) {
        let Some(inst) = self.instances.get_mut(instance) else {
            return;
        };
        if inst.generation != generation {
            return;
        }
        inst.status = status.clone();
        self.emit(instance, status.state(), status.message());
    }
}

/// Modules and instances of every kind this daemon runs. Its lock is never held across an
/// `.await`, so a slow stop never holds up other calls.
pub struct Supervisor {
    instances_dir: PathBuf,
    identities: Identities,
    runtimes: BTreeMap<&'static str, Arc<dyn Runtime>>,
    state: Mutex<State>,
}

impl Supervisor {
    /// A supervisor with these runtimes, keeping instance directories in `instances_dir`, and
    /// the stream of its instance changes; instances run as the runtime's user.
    pub fn new(
        instances_dir: PathBuf,
        runtimes: Vec<Arc<dyn Runtime>>,
    ) -> (Arc<Supervisor>, mpsc::UnboundedReceiver<InstanceEvent>) {
        Self::with_identities(instances_dir, runtimes, Identities::Shared)
    }

    /// As [`Supervisor::new`], with instances run as `identities` says.
    pub fn with_identities(
        instances_dir: PathBuf,
        runtimes: Vec<Arc<dyn Runtime>>,
        identities: Identities,
    ) -> (Arc<Supervisor>, mpsc::UnboundedReceiver<InstanceEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let supervisor = Supervisor {
            instances_dir,
            identities,
            runtimes: runtimes.into_iter().map(|r| (r.kind(), r)).collect(),
            state: Mutex::new(State {
                modules: HashMap::new(),
                instances: BTreeMap::new(),
                next_generation: 1,
                accepting: true,
                owns_records: true,
                events: Some(tx),
            }),
        };
        (Arc::new(supervisor), rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while locked leaves maps that are still consistent (every update is a single
        // insert or field store), so carry on rather than fail every later call.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The module kinds this daemon runs, sorted.
    pub fn kinds(&self) -> Vec<String> {
        self.runtimes.keys().map(|k| (*k).to_owned()).collect()
    }

    /// `(instance, module_id, status, failure_message)` of every instance hosted now.
    pub fn instances(&self) -> Vec<(String, String, String, String)> {
        self.lock()
            .instances
            .iter()
            .map(|(name, i)| {
                (
                    name.clone(),
                    i.module_id.clone(),
                    i.status.state().as_str().to_owned(),
                    i.status.message().to_owned(),
                )
            })
            .collect()
    }

    /// Refuses new starts, stops every instance or leaves them running as `on_exit` says, then
    /// ends the event stream.
    pub async fn shutdown(&self, on_exit: OnExit) {
        self.lock().accepting = false;
        match on_exit {
            OnExit::Stop { grace } => self.stop_all(grace).await,
            OnExit::LeaveRunning => {
                let mut state = self.lock();
                state.owns_records = false;
                let running: Vec<&str> = state
                    .instances
                    .iter()
                    .filter(|(_, i)| i.is_active())
                    .map(|(n, _)| n.as_str())
                    .collect();
                info!(
                    ?running,
                    "leaving instances running; the next start of the runtime re-adopts them"
                );
            }
        }
        self.lock().events = None;
    }

    /// `<instances dir>/<instance>`.
    fn instance_dir(&self, instance: &str) -> PathBuf {
        self.instances_dir.join(instance)
    }

    /// Writes an instance's record; a failure is logged, since the instance itself is fine and
    /// only its re-adoption after a restart is lost.
    fn save_record(&self, instance: &str, rec: &InstanceRecord) {
        if let Err(e) = record::save(&self.instance_dir(instance), rec) {
            warn!(
                instance,
                "the instance will not be re-adopted after a restart: {e}"
            );
        }
    }

    fn remove_record(&self, instance: &str) {
        if let Err(e) = record::remove(&self.instance_dir(instance)) {
            warn!(instance, "{e}");
        }
    }

    /// Waits for the instance's exit in the background and records it.
    fn watch_exit(
        self: &Arc<Self>,
        instance: &str,
        generation: u64,
        exited: BoxFuture<'static, Exit>,
    ) {
        let this = Arc::clone(self);
        let name = instance.to_owned();
        tokio::spawn(async move {
            let exit = exited.await;
            this.on_exit(&name, generation, exit);
        });
    }

    /// Verifies a module with its kind's runtime and remembers it; a known id is replaced.
    pub async fn load_module(
        &self,
        module_id: &str,
        kind: &str,
        location: &str,
        sha256: &str,
    ) -> Result<(), EvpError> {
        if module_id.is_empty() {
            return Err(EvpError::InvalidArgument("module_id is empty".into()));
        }
        let Some(runtime) = self.runtimes.get(kind) else {
            return Err(EvpError::InvalidArgument(format!(
                "module {module_id}: kind {kind:?} is not run here; this runtime runs {:?}",
                self.kinds()
            )));
        };
        runtime.load(module_id, location, sha256).await?;
        let previous = self.lock().modules.insert(
            module_id.to_owned(),
            Module {
                kind: runtime.kind(),
                location: location.to_owned(),
            },
        );
        match previous {
            Some(p) => info!(module_id, kind, location, was = %p.location, "module reloaded"),
            None => info!(module_id, kind, location, "module loaded"),
        }
        Ok(())
    }

    /// Forgets a module; refused while an instance of it starts or runs. Unknown ids are fine.
    /// What the module's runtime keeps for it (an image) goes once no module uses it.
    pub async fn unload_module(&self, module_id: &str) -> Result<(), EvpError> {
        let released = self.forget_module(module_id)?;
        if let Some((runtime, location)) = released {
            runtime.unloaded(&location).await;
        }
        Ok(())
    }

    /// The bookkeeping of [`Supervisor::unload_module`]: the runtime and location to release
    /// when no other module has that location.
    fn forget_module(&self, module_id: &str) -> Result<Option<Released>, EvpError> {
        let mut state = self.lock();
        let users: Vec<&str> = state
            .instances
            .iter()
            .filter(|(_, i)| i.module_id == module_id && i.is_active())
            .map(|(name, _)| name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(EvpError::Busy(format!(
                "module {module_id} is used by running instance(s) {}; stop them first",
                users.join(", ")
            )));
        }
        let Some(module) = state.modules.remove(module_id) else {
            return Ok(None);
        };
        info!(module_id, "module unloaded");
        let shared = state
            .modules
            .values()
            .any(|m| m.location == module.location);
        let runtime = self.runtimes.get(module.kind).cloned();
        Ok(runtime.filter(|_| !shared).map(|r| (r, module.location)))
    }

    /// Starts an instance of a loaded module; a no-op when it already runs that module.
    /// Answers the instance's `(pid, uid)`.
    pub async fn start_instance(
        self: &Arc<Self>,
        instance: &str,
        module_id: &str,
        options: InstanceOptions,
    ) -> Result<(u32, u32), EvpError> {
        validate_instance_name(instance)
            .map_err(|m| EvpError::InvalidArgument(format!("instance {instance:?}: {m}")))?;
        // Read before the lock: what holds uids outside this runtime's own bookkeeping.
        let outside = match self.identities {
            Identities::PerInstance { min, max } => {
                Some(self.uids_in_use_outside(instance, min, max))
            }
            Identities::Shared => None,
        };
        let on_disk = identity::owner(&self.instance_dir(instance).join(DEFAULT_WORKSPACE_DIR));
        let (runtime, location, generation, uid) = {
            let mut state = self.lock();
            if !state.accepting {
                return Err(EvpError::Busy(format!(
                    "the runtime is shutting down; instance {instance} was not started"
                )));
            }
            let Some(module) = state.modules.get(module_id) else {
                return Err(EvpError::NotFound(format!(
                    "module {module_id} is not loaded; call LoadModule before starting instance {instance}"
                )));
            };
            let Some(runtime) = self.runtimes.get(module.kind).cloned() else {
                return Err(EvpError::NotFound(format!(
                    "module {module_id} has kind {}, which this runtime no longer runs",
                    module.kind
                )));
            };
            let location = module.location.clone();
            let mut base_record = InstanceRecord {
                version: RECORD_VERSION,
                module_id: module_id.to_owned(),
                kind: module.kind.to_owned(),
                module_location: location.clone(),
                process: None,
                ended: None,
                uid: None,
                container: None,
            };
            let previous_uid = state
                .instances
                .get(instance)
                .and_then(|i| i.record.as_ref()?.uid);
            if let Some(existing) = state.instances.get(instance)
                && existing.is_active()
            {
                if existing.stopping {
                    return Err(EvpError::Busy(format!(
                        "instance {instance} is being stopped; start it once StopInstance returned"
                    )));
                }
                if existing.module_id == module_id {
                    return match existing.pid {
                        Some(pid) => Ok((pid, previous_uid.unwrap_or_else(own_uid))),
                        None => Err(EvpError::Busy(format!(
                            "instance {instance} is starting; ask again once it runs"
                        ))),
                    };
                }
                return Err(EvpError::Busy(format!(
                    "instance {instance} runs module {}; stop it before starting module {module_id}",
                    existing.module_id
                )));
            }
            if let (Identities::PerInstance { min, max }, Some(outside)) =
                (self.identities, &outside)
            {
                let held: std::collections::HashSet<u32> = state
                    .instances
                    .iter()
                    .filter(|(name, _)| name.as_str() != instance)
                    .filter_map(|(_, i)| i.record.as_ref()?.uid)
                    .collect();
                let uid = identity::pick(min, max, previous_uid.or(on_disk), |u| {
                    held.contains(&u) || outside.contains(&u) || identity::in_user_database(u)
                })
                .ok_or_else(|| {
                    EvpError::Busy(format!(
                        "no free uid left in [container] instance uids {min}-{max} for instance {instance}"
                    ))
                })?;
                base_record.uid = Some(uid);
            }
            let uid = base_record.uid;
            let generation = state.next_generation;
            state.next_generation += 1;
            state.instances.insert(
                instance.to_owned(),
                Instance {
                    module_id: module_id.to_owned(),
                    generation,
                    status: Status::Starting,
                    stopping: false,
                    phase: watch::Sender::new(Phase::Starting),
                    record: Some(base_record),
                    pid: None,
                    scope: None,
                },
            );
            state.emit(instance, Status::Starting.state(), "");
            (runtime, location, generation, uid)
        };

        let spec = match self.prepare(instance, location, options, uid) {
            Ok(spec) => spec,
            Err(message) => return Err(self.start_failed(instance, generation, message)),
        };
        let started = match runtime.start(spec).await {
            Ok(started) => started,
            Err(message) => return Err(self.start_failed(instance, generation, message)),
        };
        let pid = started.pid;
        info!(instance, module = module_id, pid, uid = ?uid, "instance started");

        let mut state = self.lock();
        let stopping = match state.instances.get_mut(instance) {
            Some(inst) if inst.generation == generation => {
                // Recorded before the phase changes, under the lock, so a stop (which removes
                // the record once the instance is gone) always comes after this write.
                if let Some(rec) = &mut inst.record {
                    rec.process = started.process;
                    rec.container = started.container.clone();
                    rec.ended = None;
                    self.save_record(instance, rec);
                }
                inst.pid = Some(pid);
                inst.scope = started.scope.clone();
                inst.phase
                    .send_replace(Phase::Running(started.workload.clone()));
                Some(inst.stopping)
            }
            _ => None,
        };
        match stopping {
            Some(false) => state.set_status(instance, generation, Status::Ok),
            Some(true) => {}
            // Nothing removes a record in the Starting phase; kill rather than leak a process.
            None => {
                warn!(
                    instance,
                    "instance record vanished while starting; killing it"
                );
                let _ = started.workload.kill();
            }
        }
        drop(state);
        self.watch_exit(instance, generation, started.exited);
        Ok((pid, uid.unwrap_or_else(own_uid)))
    }

    /// Records a failed start as the instance's `error` status and turns it into the answer.
    fn start_failed(&self, instance: &str, generation: u64, message: String) -> EvpError {
        let mut state = self.lock();
        let stopping = match state.instances.get(instance) {
            Some(inst) if inst.generation == generation => {
                inst.phase.send_replace(Phase::Gone);
                inst.stopping
            }
            _ => true,
        };
        if !stopping {
            let status = Status::Error(message.clone());
            self.record_end(&mut state, instance, &status);
            state.set_status(instance, generation, status);
        }
        EvpError::Io(format!("instance {instance} did not start: {message}"))
    }

    /// The runtime saw the instance exit.
    fn on_exit(&self, instance: &str, generation: u64, exit: Exit) {
        let mut state = self.lock();
        let stopping = match state.instances.get(instance) {
            Some(inst) if inst.generation == generation => {
                inst.phase.send_replace(Phase::Gone);
                inst.stopping
            }
            _ => return,
        };
        if stopping {
            info!(instance, ?exit, "instance exited as asked");
        } else {
            let status = Status::from_exit(&exit);
            if state.owns_records {
                self.record_end(&mut state, instance, &status);
            }
            state.set_status(instance, generation, status);
        }
    }

    /// Writes how an instance ended into its record, so a restart reports that rather than
    /// [`DIED_WHILE_AWAY`].
    fn record_end(&self, state: &mut State, instance: &str, status: &Status) {
        if let Some(rec) = state
            .instances
            .get_mut(instance)
            .and_then(|i| i.record.as_mut())
        {
            rec.ended = Some(status.to_ended());
            self.save_record(instance, rec);
        }
    }

    /// Stops an instance: SIGTERM, up to `grace` to exit, then SIGKILL; returns once it is
    /// reaped and has left `Instances`. Unknown or already exited instances are fine.
    pub async fn stop_instance(&self, instance: &str, grace: Duration) -> Result<(), EvpError> {
        let runtime = self.runtime_of(instance);
        let stopped = self.stop_process(instance, grace).await;
        if stopped.is_ok()
            && let Some(runtime) = runtime
        {
            runtime.stopped(instance).await;
        }
        stopped
    }

    /// The runtime of an instance's kind, as its record says.
    fn runtime_of(&self, instance: &str) -> Option<Arc<dyn Runtime>> {
        let state = self.lock();
        let kind = state.instances.get(instance)?.record.as_ref()?.kind.clone();
        self.runtimes.get(kind.as_str()).cloned()
    }

    /// [`Supervisor::stop_instance`] without the runtime's clean-up.
    async fn stop_process(&self, instance: &str, grace: Duration) -> Result<(), EvpError> {
        let (generation, mut phase, scope) = {
            let mut state = self.lock();
            let Some(inst) = state.instances.get_mut(instance) else {
                return Ok(());
            };
            if !inst.is_active() {
                // Its process exited; what it started and left running goes with it now.
                if let Some(scope) = &inst.scope {
                    end_leftovers(instance, scope);
                }
                state.instances.remove(instance);
                self.remove_record(instance);
                state.emit(instance, InstanceState::Stopped, "");
                return Ok(());
            }
            inst.stopping = true;
            (inst.generation, inst.phase.subscribe(), inst.scope.clone())
        };
        info!(instance, grace_ms = grace.as_millis(), "stopping instance");

        // A sender dropped means another stop already removed the record: the process is gone.
        let current = match phase.wait_for(|p| !matches!(p, Phase::Starting)).await {
            Ok(p) => p.clone(),
            Err(_) => Phase::Gone,
        };
        if let Phase::Running(workload) = current {
            // An SDK module told to exit (sdk-broker's CloseInstance comes first) is usually
            // on its way out: a moment to finish by itself, so EVP modules, which never
            // expect SIGTERM, end with their own status.
            let window = grace.min(VOLUNTARY_EXIT_WINDOW);
            if tokio::time::timeout(window, wait_gone(&mut phase))
                .await
                .is_ok()
            {
                // What it started (a daemon that called setsid, say) is stopped as it would
                // have been: SIGTERM, the grace, SIGKILL.
                if let Some(scope) = scope.filter(tree::any_alive) {
                    if let Err(e) = workload.terminate() {
                        warn!(
                            instance,
                            "asking what the instance left to exit failed: {e}"
                        );
                    }
                    let _ = tokio::time::timeout(grace, async {
                        while tree::any_alive(&scope) {
                            tokio::time::sleep(LEFTOVER_POLL).await;
                        }
                    })
                    .await;
                    if let Err(e) = workload.kill() {
                        warn!(instance, "killing what the instance left failed: {e}");
                    }
                }
                self.forget_stopped(instance, generation);
                return Ok(());
            }
            if let Err(e) = workload.terminate() {
                warn!(instance, "asking the instance to exit failed: {e}");
            }
            let gone = tokio::time::timeout(grace, wait_gone(&mut phase)).await;
            if gone.is_err() {
                warn!(
                    instance,
                    grace_ms = grace.as_millis(),
                    "instance did not exit within its grace period; killing it"
                );
            }
            // Also after a timely exit: whatever the instance left behind in its group goes.
            if let Err(e) = workload.kill() {
                warn!(instance, "killing the instance failed: {e}");
            }
            if gone.is_err()
                && tokio::time::timeout(KILL_REAP_TIMEOUT, wait_gone(&mut phase))
                    .await
                    .is_err()
            {
                return Err(EvpError::Io(format!(
                    "instance {instance} did not exit {} s after SIGKILL; it is stuck in the kernel",
                    KILL_REAP_TIMEOUT.as_secs()
                )));
            }
        }

        self.forget_stopped(instance, generation);
        Ok(())
    }

    /// Takes a stopped instance out of `Instances`, unless a newer start replaced it.
    fn forget_stopped(&self, instance: &str, generation: u64) {
        let mut state = self.lock();
        if state
            .instances
            .get(instance)
            .is_some_and(|i| i.generation == generation)
        {
            state.instances.remove(instance);
            self.remove_record(instance);
            state.emit(instance, InstanceState::Stopped, "");
        }
    }

    /// Stops every instance in parallel, each with `grace`.
    pub async fn stop_all(&self, grace: Duration) {
        let names: Vec<String> = self.lock().instances.keys().cloned().collect();
        let stops = names.iter().map(|name| async move {
            if let Err(e) = self.stop_instance(name, grace).await {
                warn!(instance = %name, "{e}");
            }
        });
        futures_util::future::join_all(stops).await;
    }
}

/// Kills what an exited instance left running.
fn end_leftovers(instance: &str, scope: &Scope) {
    let killed = tree::signal_all(scope, nix::sys::signal::Signal::SIGKILL, true);
    if killed > 0 {
        info!(
            instance,
            killed, "killed processes the instance left running"
        );
    }
}

async fn wait_gone(phase: &mut watch::Receiver<Phase>) {
    // An error means the record (and its sender) is gone, which only happens once it exited.
    let _ = phase.wait_for(|p| matches!(p, Phase::Gone)).await;
}
