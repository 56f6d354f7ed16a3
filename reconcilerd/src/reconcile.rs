//! The reconcile loop: brings what runs on the device to the desired deployment, one diff at a
//! time, and keeps the deployment status up to date.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evp_schemas::dbus::{self, Runtime1Proxy};
use evp_schemas::{
    Deployment, DeploymentStatus, InstanceState, InstanceStatus, Module, ModuleImpl, ModuleState,
    ModuleStatus, ReconcileStatus,
};
use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use zbus::Connection;

use crate::store::ModuleCache;

/// What the loop is asked to do: the latest desired deployment and whether changes are held.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// The deployment to converge to; `None` until one was ever applied.
    pub deployment: Option<Deployment>,
    /// An operator paused deployment changes.
    pub paused: bool,
}

/// The status shared between the loop, the runtime-event listener and the D-Bus object.
pub type SharedStatus = Arc<Mutex<DeploymentStatus>>;

/// Called after every status change, to emit `PropertiesChanged`.
pub type StatusChanged = Arc<dyn Fn() + Send + Sync>;

/// First wait before retrying a deployment that had failures (a download, a runtime away).
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between retries: failures on a gateway are mostly links and peers coming back,
/// and a minute keeps the device responsive without hammering a server.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Which runtime daemon runs a module kind; `None` for kinds this agent cannot run.
fn runtime_of(kind: ModuleImpl) -> Option<(&'static str, &'static str)> {
    match kind {
        ModuleImpl::Wasm => Some((dbus::RUNTIME_WASM_NAME, dbus::RUNTIME_WASM_PATH)),
        ModuleImpl::Spawn | ModuleImpl::Python | ModuleImpl::Docker => {
            Some((dbus::RUNTIME_CONTAINER_NAME, dbus::RUNTIME_CONTAINER_PATH))
        }
        ModuleImpl::Dlfcn => None,
    }
}

/// A proxy to one runtime; properties are not cached because the loop reads them rarely.
async fn runtime_proxy(
    conn: &Connection,
    name: &'static str,
    path: &'static str,
) -> zbus::Result<Runtime1Proxy<'static>> {
    Runtime1Proxy::builder(conn)
        .destination(name)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

/// What an instance was started from: when any of it changes, the instance is restarted.
/// Messaging routes are left out on purpose: changing them must not restart anything.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement {
    module_id: String,
    module: Module,
}

fn placement(deployment: &Deployment, instance: &str) -> Option<Placement> {
    let spec = deployment.instance_specs.get(instance)?;
    let module = deployment.modules.get(&spec.module_id)?;
    Some(Placement {
        module_id: spec.module_id.clone(),
        module: module.clone(),
    })
}

/// The loop's own view of the device: what it placed.
pub struct Reconciler {
    conn: Connection,
    cache: ModuleCache,
    status: SharedStatus,
    changed: StatusChanged,
    stop_grace_ms: u32,
    /// Instances started by this loop, and from what.
    running: BTreeMap<String, Placement>,
    /// Modules loaded into a runtime, and from what definition.
    loaded: BTreeMap<String, Module>,
}

/// How one pass ended.
enum Pass {
    /// Everything was attempted; `failures` says whether something must be retried.
    Done { failures: bool },
    /// A newer desired state arrived mid-way.
    Preempted,
}

impl Reconciler {
    /// A loop that publishes its status into `status` and calls `changed` after each change.
    pub fn new(
        conn: Connection,
        cache: ModuleCache,
        status: SharedStatus,
        changed: StatusChanged,
        stop_grace_ms: u32,
    ) -> Self {
        Reconciler {
            conn,
            cache,
            status,
            changed,
            stop_grace_ms,
            running: BTreeMap::new(),
            loaded: BTreeMap::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut DeploymentStatus)) {
        {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s);
        }
        (self.changed)();
    }

    async fn runtime(&self, kind: ModuleImpl) -> Result<Runtime1Proxy<'static>, String> {
        let (name, path) = runtime_of(kind)
            .ok_or_else(|| format!("{kind} modules are not supported on this device"))?;
        runtime_proxy(&self.conn, name, path)
            .await
            .map_err(|e| format!("runtime {name} unavailable: {e}"))
    }

    /// Runs forever: converges to each new desired state, retrying failures with backoff.
    pub async fn run(mut self, mut desired_rx: watch::Receiver<Desired>) {
        let mut retry = RETRY_FIRST;
        loop {
            let desired = desired_rx.borrow_and_update().clone();
            let pass = match (&desired.deployment, desired.paused) {
                (_, true) => {
                    self.update(|s| s.reconcile_status = Some(ReconcileStatus::Paused));
                    Pass::Done { failures: false }
                }
                (None, false) => Pass::Done { failures: false },
                (Some(d), false) => self.reconcile(d, &desired_rx).await,
            };
            let failures = match pass {
                Pass::Preempted => continue,
                Pass::Done { failures } => failures,
            };
            if failures {
                debug!(?retry, "deployment had failures; retrying later");
                tokio::select! {
                    r = desired_rx.changed() => { if r.is_err() { return; } retry = RETRY_FIRST; }
                    _ = tokio::time::sleep(retry) => { retry = (retry * 2).min(RETRY_MAX); }
                }
            } else {
                retry = RETRY_FIRST;
                if desired_rx.changed().await.is_err() {
                    return;
                }
            }
        }
    }

    async fn reconcile(&mut self, desired: &Deployment, rx: &watch::Receiver<Desired>) -> Pass {
        let preempted = || rx.has_changed().unwrap_or(false);
        self.update(|s| {
            s.deployment_id = desired.deployment_id.clone();
            s.reconcile_status = Some(ReconcileStatus::Applying);
            s.failure_message = None;
            s.modules.retain(|id, _| desired.modules.contains_key(id));
        });

        // 1. Stop what is not wanted any more, or wanted from something else.
        let placed: Vec<(String, Placement)> = self
            .running
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, was) in placed {
            let want = placement(desired, &name);
            if want.as_ref() == Some(&was) {
                continue;
            }
            self.stop_instance(&name, &was).await;
            if want.is_none() {
                self.purge_instance(&name, &was).await;
            }
        }

        // 2. Unload modules whose definition is gone or changed.
        let loaded: Vec<(String, Module)> = self
            .loaded
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, module) in loaded {
            if desired.modules.get(&id) == Some(&module) {
                continue;
            }
            if let Ok(rt) = self.runtime(module.module_impl).await
                && let Err(e) = rt.unload_module(&id).await
            {
                warn!(module = %id, "unload failed: {}", dbus::error_message(&e));
            }
            self.loaded.remove(&id);
        }

        // 3. Fetch and load every module of the deployment.
        let mut failures = false;
        for (id, module) in &desired.modules {
            if self.loaded.get(id) == Some(module) {
                continue;
            }
            if preempted() {
                return Pass::Preempted;
            }
            self.set_module(id, ModuleState::Downloading, None);
            match self.load_module(id, module).await {
                Ok(()) => {
                    self.loaded.insert(id.clone(), module.clone());
                    self.set_module(id, ModuleState::Ok, None);
                }
                Err(msg) => {
                    warn!(module = %id, "{msg}");
                    failures = true;
                    self.set_module(id, ModuleState::Error, Some(msg));
                }
            }
        }

        // 4. Start the instances that do not run yet.
        for (name, spec) in &desired.instance_specs {
            if self.running.contains_key(name) {
                continue;
            }
            if preempted() {
                return Pass::Preempted;
            }
            let Some(want) = placement(desired, name) else {
                continue;
            };
            if !self.loaded.contains_key(&spec.module_id) {
                failures = true;
                self.set_instance(
                    name,
                    &spec.module_id,
                    InstanceState::Error,
                    Some(format!("Module {} is not ready", spec.module_id)),
                );
                continue;
            }
            self.set_instance(name, &spec.module_id, InstanceState::Starting, None);
            match self.start_instance(name, &want).await {
                Ok(()) => {
                    self.running.insert(name.clone(), want);
                }
                Err(msg) => {
                    warn!(instance = %name, "{msg}");
                    failures = true;
                    self.set_instance(name, &spec.module_id, InstanceState::Error, Some(msg));
                }
            }
        }
        let status = if failures {
            ReconcileStatus::Error
        } else {
            ReconcileStatus::Ok
        };
        info!(
            deployment = desired.deployment_id.as_deref().unwrap_or("-"),
            "reconciled: {status}"
        );
        self.update(|s| {
            s.reconcile_status = Some(status);
            s.instances
                .retain(|name, _| desired.instance_specs.contains_key(name));
        });
        Pass::Done { failures }
    }

    fn set_module(&self, id: &str, state: ModuleState, failure: Option<String>) {
        self.update(|s| {
            s.modules.insert(
                id.to_owned(),
                ModuleStatus {
                    status: state,
                    failure_message: failure,
                    bytes_done: None,
                    bytes_total: None,
                },
            );
        });
    }

    fn set_instance(&self, name: &str, module_id: &str, state: InstanceState, msg: Option<String>) {
        self.update(|s| {
            s.instances.insert(
                name.to_owned(),
                InstanceStatus {
                    status: state,
                    module_id: module_id.to_owned(),
                    failure_message: msg,
                },
            );
        });
    }

    async fn load_module(&self, id: &str, module: &Module) -> Result<(), String> {
        let runtime = self.runtime(module.module_impl).await?;
        let (path, hash) = match (&module.download_url, module.module_impl) {
            (Some(url), ModuleImpl::Docker) => {
                (url.clone(), module.hash.clone().unwrap_or_default())
            }
            (Some(url), _) => {
                let hash = module.hash.clone().unwrap_or_default();
                let path = self
                    .cache
                    .fetch(url, &hash)
                    .await
                    .map_err(|e| e.to_string())?;
                (path.to_string_lossy().into_owned(), hash)
            }
            (None, _) => {
                return Err(format!(
                    "module {id} has no downloadUrl; embedded modules are not supported"
                ));
            }
        };
        runtime
            .load_module(id, module.module_impl.as_str(), &path, &hash)
            .await
            .map_err(|e| format!("Failed to load: {}", dbus::error_message(&e)))
    }

    async fn start_instance(&self, name: &str, want: &Placement) -> Result<(), String> {
        let runtime = self.runtime(want.module.module_impl).await?;
        let options = dbus::start_options(
            &[("entry_point", &want.module.entry_point)],
            &Default::default(),
        )
        .map_err(|e| e.to_string())?;
        runtime
            .start_instance(name, &want.module_id, options)
            .await
            .map_err(|e| format!("Failed to start: {}", dbus::error_message(&e)))?;
        // A start of an instance that already runs (after reconcilerd restarted) changes
        // nothing and so emits no signal: take its state from the runtime itself.
        match runtime.instances().await {
            Ok(hosted) => {
                if let Some((_, module_id, status, failure)) =
                    hosted.into_iter().find(|(instance, ..)| instance == name)
                    && let Some(state) = InstanceState::parse(&status)
                {
                    self.set_instance(
                        name,
                        &module_id,
                        state,
                        (!failure.is_empty()).then_some(failure),
                    );
                }
            }
            Err(e) => warn!(instance = %name, "reading the runtime's instances: {e}"),
        }
        Ok(())
    }

    async fn stop_instance(&mut self, name: &str, was: &Placement) {
        match self.runtime(was.module.module_impl).await {
            Ok(rt) => {
                if let Err(e) = rt.stop_instance(name, self.stop_grace_ms).await {
                    warn!(instance = %name, "stop failed: {}", dbus::error_message(&e));
                }
            }
            Err(e) => warn!(instance = %name, "cannot stop: {e}"),
        }
        self.running.remove(name);
        self.update(|s| {
            s.instances.remove(name);
        });
    }

    async fn purge_instance(&self, name: &str, was: &Placement) {
        if let Ok(rt) = self.runtime(was.module.module_impl).await
            && let Err(e) = rt.purge_instance(name).await
        {
            warn!(instance = %name, "removing its directory failed: {}", dbus::error_message(&e));
        }
    }
}

/// Follows `InstanceChanged` from both runtimes and folds it into the status of the instances
/// the current deployment has. `stopped` is the loop's own doing and is left to it.
pub async fn follow_runtime_events(conn: Connection, status: SharedStatus, changed: StatusChanged) {
    let mut streams = Vec::new();
    for (name, path) in [
        (dbus::RUNTIME_WASM_NAME, dbus::RUNTIME_WASM_PATH),
        (dbus::RUNTIME_CONTAINER_NAME, dbus::RUNTIME_CONTAINER_PATH),
    ] {
        match runtime_proxy(&conn, name, path).await {
            Ok(p) => match p.receive_instance_changed().await {
                Ok(s) => streams.push(s),
                Err(e) => warn!("cannot follow {name}: {e}"),
            },
            Err(e) => warn!("cannot follow {name}: {e}"),
        }
    }
    let mut events = futures_util::stream::select_all(streams);
    while let Some(signal) = events.next().await {
        let Ok(args) = signal.args() else { continue };
        let (instance, failure) = (*args.instance(), *args.failure_message());
        let Some(state) = InstanceState::parse(args.status()) else {
            warn!(%instance, "unknown instance status {:?}", args.status());
            continue;
        };
        if state == InstanceState::Stopped {
            continue;
        }
        let updated = {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            match s.instances.get_mut(instance) {
                Some(i) => {
                    i.status = state;
                    i.failure_message = (!failure.is_empty()).then(|| failure.to_owned());
                    true
                }
                None => false,
            }
        };
        if updated {
            info!(%instance, "now {state}");
            changed();
        }
    }
}
