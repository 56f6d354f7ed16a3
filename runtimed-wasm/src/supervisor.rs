//! The modules and instances of runtimed-wasm, their statuses and stops, independent of D-Bus.
//! Its lock is never held across an `.await` nor while WASM runs, so a slow start or a stop
//! that waits out its grace never holds up another call.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use evp_schemas::InstanceState;
use evp_schemas::dbus::EvpError;
use evp_schemas::deployment::validate_instance_name;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use wasmtime::Linker;

use crate::cache::ModuleCache;
use crate::config::WasmConfig;
use crate::engine::WasmEngine;
use crate::host::HostState;
use crate::instance::{self, InstanceSpec, Outcome};
use crate::module::{self, LoadedModule};
use crate::session::{Control, Interruption};

/// The one module kind this runtime runs.
pub const KIND: &str = evp_schemas::ModuleImpl::Wasm.as_str();
/// Folder inside the instance directory that the module may write to, as in EVP.
pub const DEFAULT_WORKSPACE_DIR: &str = "default_workspace";
/// The SDK socket inside the instance directory when `StartInstance` names none (EVP's layout).
pub const SDK_SOCKET_FILE: &str = "sdk.sock";
/// How long a forced stop waits for the instance thread after interrupting it. WASM code traps
/// within an epoch tick and SDK calls return at once; only a thread inside a blocking WASI call
/// (a long `sleep`) takes longer, and the stop does not wait for it.
pub const INTERRUPT_WAIT: Duration = Duration::from_secs(2);

/// One change of an instance, for `InstanceChanged` and `PropertiesChanged(Instances)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEvent {
    /// The instance name.
    pub instance: String,
    /// Its new state.
    pub state: InstanceState,
    /// Why, for `error`; empty otherwise.
    pub failure_message: String,
}

struct Entry {
    module_id: String,
    /// Tells this start apart from an earlier or later one of the same name.
    generation: u64,
    state: InstanceState,
    failure: String,
    stopping: bool,
    /// How to stop it, while its thread runs.
    control: Option<Arc<Control>>,
    /// True once its thread ended (or it never started).
    ended: watch::Sender<bool>,
}

impl Entry {
    fn is_active(&self) -> bool {
        !*self.ended.borrow()
    }
}

struct State {
    modules: HashMap<String, Arc<LoadedModule>>,
    instances: BTreeMap<String, Entry>,
    next_generation: u64,
    /// False once the daemon is shutting down.
    accepting: bool,
    /// `None` once the daemon stopped publishing changes.
    events: Option<mpsc::UnboundedSender<InstanceEvent>>,
}

impl State {
    /// Sets an instance's state and records the change for the bus, in order (the lock is
    /// held), unless a newer start replaced it.
    fn set(&mut self, instance: &str, generation: u64, state: InstanceState, failure: &str) {
        let Some(entry) = self
            .instances
            .get_mut(instance)
            .filter(|e| e.generation == generation)
        else {
            return;
        };
        entry.state = state;
        entry.failure = failure.to_owned();
        self.emit(instance, state, failure);
    }

    fn emit(&self, instance: &str, state: InstanceState, failure_message: &str) {
        info!(
            instance,
            status = state.as_str(),
            failure_message,
            "instance changed"
        );
        if let Some(tx) = &self.events {
            let _ = tx.send(InstanceEvent {
                instance: instance.to_owned(),
                state,
                failure_message: failure_message.to_owned(),
            });
        }
    }
}

/// Modules and instances of the daemon.
pub struct Supervisor {
    engine: WasmEngine,
    /// Compiled modules on disk; `None` when its directory cannot be used (modules are then
    /// compiled at every load).
    cache: Option<ModuleCache>,
    linker: Linker<HostState>,
    settings: WasmConfig,
    instances_dir: PathBuf,
    state: Mutex<State>,
    me: Weak<Supervisor>,
}

fn invalid_name(instance: &str, m: String) -> EvpError {
    EvpError::InvalidArgument(format!("instance {instance:?}: {m}"))
}

impl Supervisor {
    /// A supervisor running instances with `engine`, their directories in `instances_dir`,
    /// and the stream of its instance changes.
    pub fn new(
        engine: WasmEngine,
        settings: WasmConfig,
        instances_dir: PathBuf,
        cache_dir: &Path,
    ) -> wasmtime::Result<(Arc<Supervisor>, mpsc::UnboundedReceiver<InstanceEvent>)> {
        let linker = crate::host::linker(&engine.engine)?;
        let cache = ModuleCache::new(cache_dir)
            .inspect(|c| info!(dir = %c.dir().display(), "compiled modules are cached"))
            .inspect_err(|e| warn!("compiled modules are not cached: {e}"))
            .ok();
        let (tx, rx) = mpsc::unbounded_channel();
        let supervisor = Arc::new_cyclic(|me| Supervisor {
            engine,
            cache,
            linker,
            settings,
            instances_dir,
            state: Mutex::new(State {
                modules: HashMap::new(),
                instances: BTreeMap::new(),
                next_generation: 1,
                accepting: true,
                events: Some(tx),
            }),
            me: me.clone(),
        });
        Ok((supervisor, rx))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a single insert or field store: the maps stay consistent after a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `(instance, module_id, status, failure_message)` of every instance hosted now.
    pub fn instances(&self) -> Vec<(String, String, String, String)> {
        self.lock()
            .instances
            .iter()
            .map(|(name, e)| {
                (
                    name.clone(),
                    e.module_id.clone(),
                    e.state.as_str().to_owned(),
                    e.failure.clone(),
                )
            })
            .collect()
    }

    /// Verifies and compiles a module (off the bus's threads) and remembers it; a known id is
    /// replaced, while instances started from the old code keep it.
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
        if kind != KIND {
            return Err(EvpError::InvalidArgument(format!(
                "module {module_id}: kind {kind:?} is not run here; this runtime runs [\"{KIND}\"]"
            )));
        }
        let (engine, linker) = (self.engine.engine.clone(), self.linker.clone());
        let cache = self.cache.clone();
        let (id, loc, sha) = (module_id.to_owned(), location.to_owned(), sha256.to_owned());
        let started = std::time::Instant::now();
        let (loaded, outcome) = tokio::task::spawn_blocking(move || {
            module::load(&engine, &linker, cache.as_ref(), &id, &loc, &sha)
        })
        .await
        .map_err(|e| EvpError::Io(format!("module {module_id}: loading failed: {e}")))?
        .inspect_err(|e| warn!(module_id, location, "module refused: {e}"))?;
        info!(
            module_id,
            location,
            ms = started.elapsed().as_millis(),
            cache = ?outcome,
            threads = loaded.spawns_threads,
            "module loaded"
        );
        self.lock()
            .modules
            .insert(module_id.to_owned(), Arc::new(loaded));
        Ok(())
    }

    /// Forgets a module; refused while an instance of it runs. Unknown ids are fine.
    pub fn unload_module(&self, module_id: &str) -> Result<(), EvpError> {
        let mut state = self.lock();
        let users: Vec<&str> = state
            .instances
            .iter()
            .filter(|(_, e)| e.module_id == module_id && e.is_active())
            .map(|(name, _)| name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(EvpError::Busy(format!(
                "module {module_id} is used by running instance(s) {}; stop them first",
                users.join(", ")
            )));
        }
        if state.modules.remove(module_id).is_some() {
            info!(module_id, "module unloaded");
        }
        Ok(())
    }

    /// What `StartInstance` answers: this daemon's process and user run every instance.
    fn identity() -> (u32, u32) {
        (std::process::id(), own_uid())
    }

    /// Starts an instance of a loaded module on a thread of its own; a no-op when it already
    /// runs that module. Answers `(pid, uid)` for `SdkBroker1.BindInstance`: the daemon's own.
    pub async fn start_instance(
        &self,
        instance: &str,
        module_id: &str,
        sdk_socket: Option<PathBuf>,
    ) -> Result<(u32, u32), EvpError> {
        validate_instance_name(instance).map_err(|m| invalid_name(instance, m))?;
        let (module, generation) = {
            let mut state = self.lock();
            if !state.accepting {
                return Err(EvpError::Busy(format!(
                    "the runtime is shutting down; instance {instance} was not started"
                )));
            }
            let Some(module) = state.modules.get(module_id).cloned() else {
                return Err(EvpError::NotFound(format!(
                    "module {module_id} is not loaded; call LoadModule before starting instance {instance}"
                )));
            };
            if let Some(e) = state.instances.get(instance).filter(|e| e.is_active()) {
                return match (e.stopping, e.module_id == module_id, e.state) {
                    (true, _, _) => Err(EvpError::Busy(format!(
                        "instance {instance} is being stopped; start it once StopInstance returned"
                    ))),
                    (false, true, InstanceState::Starting) => Err(EvpError::Busy(format!(
                        "instance {instance} is starting; ask again once it runs"
                    ))),
                    (false, true, _) => Ok(Self::identity()),
                    (false, false, _) => Err(EvpError::Busy(format!(
                        "instance {instance} runs module {}; stop it before starting module {module_id}",
                        e.module_id
                    ))),
                };
            }
            let generation = state.next_generation;
            state.next_generation += 1;
            state.instances.insert(
                instance.to_owned(),
                Entry {
                    module_id: module_id.to_owned(),
                    generation,
                    state: InstanceState::Starting,
                    failure: String::new(),
                    stopping: false,
                    control: None,
                    ended: watch::Sender::new(false),
                },
            );
            state.emit(instance, InstanceState::Starting, "");
            (module, generation)
        };
        match self.run(instance, module, generation, sdk_socket).await {
            Ok(()) => {
                let mut state = self.lock();
                // Unless it already ended (or is being stopped): that outcome stands.
                if state.instances.get(instance).is_some_and(|e| {
                    e.generation == generation && e.state == InstanceState::Starting && !e.stopping
                }) {
                    state.set(instance, generation, InstanceState::Ok, "");
                }
                Ok(Self::identity())
            }
            Err(message) => {
                let mut state = self.lock();
                if let Some(e) = state
                    .instances
                    .get(instance)
                    .filter(|e| e.generation == generation)
                {
                    e.ended.send_replace(true);
                    if !e.stopping {
                        state.set(instance, generation, InstanceState::Error, &message);
                    }
                }
                Err(EvpError::Io(format!(
                    "instance {instance} did not start: {message}"
                )))
            }
        }
    }

    /// Makes the instance's directories and starts its thread; returns once it is instantiated.
    async fn run(
        &self,
        instance: &str,
        module: Arc<LoadedModule>,
        generation: u64,
        sdk_socket: Option<PathBuf>,
    ) -> Result<(), String> {
        let instance_dir = self.instances_dir.join(instance);
        let workspace = instance_dir.join(DEFAULT_WORKSPACE_DIR);
        for dir in [&self.instances_dir, &instance_dir, &workspace] {
            private_dir(dir)?;
        }
        let spec = InstanceSpec {
            instance: instance.to_owned(),
            workspace,
            sdk_socket: sdk_socket.unwrap_or_else(|| instance_dir.join(SDK_SOCKET_FILE)),
            memory_limit: self.settings.memory_limit_bytes,
            thread_stack: self.settings.thread_stack_bytes,
        };
        let me = self.me.clone();
        let name = instance.to_owned();
        let (control, ready) = instance::start(
            &self.engine.engine,
            &self.linker,
            module,
            &spec,
            move |outcome| {
                if let Some(me) = me.upgrade() {
                    me.on_end(&name, generation, outcome);
                }
            },
        )?;
        if let Some(e) = self
            .lock()
            .instances
            .get_mut(instance)
            .filter(|e| e.generation == generation)
        {
            e.control = Some(control);
        }
        ready
            .await
            .map_err(|_| "the instance thread ended before it was set up".to_owned())?
    }

    /// The instance thread ended.
    fn on_end(&self, instance: &str, generation: u64, outcome: Outcome) {
        let mut state = self.lock();
        let Some(e) = state
            .instances
            .get_mut(instance)
            .filter(|e| e.generation == generation)
        else {
            return;
        };
        e.ended.send_replace(true);
        e.control = None;
        if e.stopping {
            info!(instance, ?outcome, "instance ended as asked");
            return;
        }
        match outcome {
            Outcome::SelfExited => state.set(instance, generation, InstanceState::SelfExiting, ""),
            Outcome::Failed(message) => {
                state.set(instance, generation, InstanceState::Error, &message)
            }
            // Only a stop interrupts an instance, and a stop is handled by the stopper.
            Outcome::Stopped => info!(instance, "instance interrupted"),
        }
    }

    /// Stops an instance: the SDK's exit (sdk-broker's CloseInstance came first) has until the
    /// grace (at most `[wasm] stop_grace_ms`) to end it; then its WASM is interrupted and its
    /// blocked SDK call released. Returns once it left `Instances`; unknown or ended ones are fine.
    pub async fn stop_instance(&self, instance: &str, grace: Duration) -> Result<(), EvpError> {
        let (generation, mut ended, control) = {
            let mut state = self.lock();
            let Some(e) = state.instances.get_mut(instance) else {
                return Ok(());
            };
            e.stopping = true;
            (e.generation, e.ended.subscribe(), e.control.clone())
        };
        let grace = grace.min(self.settings.stop_grace());
        if tokio::time::timeout(grace, ended.wait_for(|e| *e))
            .await
            .is_err()
        {
            warn!(
                instance,
                grace_ms = grace.as_millis(),
                "instance did not end within its grace; interrupting it"
            );
            // Set once the thread runs; a start still setting up ends at its first epoch tick.
            let control = control.or_else(|| self.lock().instances.get(instance)?.control.clone());
            if let Some(control) = control {
                control.interrupt(Interruption::Stop);
            }
            if tokio::time::timeout(INTERRUPT_WAIT, ended.wait_for(|e| *e))
                .await
                .is_err()
            {
                warn!(
                    instance,
                    "the instance thread is inside a blocking host call; it ends when that call returns"
                );
            }
        }
        let mut state = self.lock();
        if state
            .instances
            .get(instance)
            .is_some_and(|e| e.generation == generation)
        {
            state.instances.remove(instance);
            state.emit(instance, InstanceState::Stopped, "");
        }
        Ok(())
    }

    /// Removes `<instances dir>/<instance>`; refused while the instance runs, fine if absent.
    pub async fn purge_instance(&self, instance: &str) -> Result<(), EvpError> {
        validate_instance_name(instance).map_err(|m| invalid_name(instance, m))?;
        if self
            .lock()
            .instances
            .get(instance)
            .is_some_and(Entry::is_active)
        {
            return Err(EvpError::Busy(format!(
                "instance {instance} is running; stop it before purging its directory"
            )));
        }
        // The name is one path component, so this stays inside the instances directory.
        let dir = self.instances_dir.join(instance);
        let removed = match tokio::fs::symlink_metadata(&dir).await {
            Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(&dir).await,
            // A symlink or file in its place goes itself; nothing it points to is touched.
            Ok(_) => tokio::fs::remove_file(&dir).await,
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => {
                info!(instance, dir = %dir.display(), "instance directory purged");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EvpError::Io(format!("removing {}: {e}", dir.display()))),
        }
    }

    /// Refuses new starts and ends every instance: WASM instances cannot outlive the daemon
    /// (reconcilerd starts them again when it is back). Then ends the event stream.
    pub async fn shutdown(&self) {
        let waits: Vec<watch::Receiver<bool>> = {
            let mut state = self.lock();
            state.accepting = false;
            for e in state.instances.values_mut() {
                e.stopping = true;
                if let Some(c) = &e.control {
                    c.interrupt(Interruption::Stop);
                }
            }
            state
                .instances
                .values()
                .map(|e| e.ended.subscribe())
                .collect()
        };
        let all = futures_util::future::join_all(waits.into_iter().map(|mut w| async move {
            let _ = w.wait_for(|e| *e).await;
        }));
        if tokio::time::timeout(INTERRUPT_WAIT, all).await.is_err() {
            warn!("some instance threads are inside blocking host calls at exit");
        }
        self.lock().events = None;
    }
}

/// The effective uid of this process.
fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `dir` (0700) if missing, refusing a symlink or a file in its place, so an instance
/// never writes outside the instances directory. An existing directory keeps its mode: the
/// instances directory is shared with runtimed-container.
fn private_dir(dir: &Path) -> Result<(), String> {
    match evp_daemon::fs::refuse_non_dir(dir) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => evp_daemon::create_private_dir(dir, 0o700).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}
