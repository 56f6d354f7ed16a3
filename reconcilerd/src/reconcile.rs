//! The reconcile loop: one task owns what reconcilerd believes runs (`running`), and changes it
//! only in response to its inputs, one at a time: a new desired deployment, a runtime's
//! `InstanceChanged`, a runtime appearing on or leaving the bus, a download task's report, and
//! its own timers (restarts, retries). A redeploy and a restart therefore never race. After
//! every input the status is rendered from this state, so its `deploymentId` always comes with
//! the instances and modules of that deployment.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evp_daemon::backoff::{self, Backoff};
use evp_schemas::dbus::{self, Runtime1Proxy, SdkBroker1Proxy};
use evp_schemas::{
    Deployment, DeploymentStatus, InstanceState, Module, ReconcileStatus, RestartPolicy,
    UnknownInstanceState,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use zbus::Connection;

use crate::download::{DownloadEvent, Downloads};
pub use crate::plan::Runtime;
use crate::plan::{self, Observed, Placement, cached_hash, placement};
use crate::restart::{self, Decision, Exit, RestartConfig, RestartState};
use crate::status::{self, DownloadView, InstanceView, StatusInputs};

mod execute;
mod follow;
use execute::start;
pub use follow::follow_runtimes;

/// What the loop is asked to do: the latest desired deployment and whether changes are held.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// The deployment to converge to; `None` until one was ever applied.
    pub deployment: Option<Deployment>,
    /// An operator paused deployment changes.
    pub paused: bool,
    /// A deployment that could not be taken (the one on disk, or one that could not be
    /// persisted); reported until the hub's next is taken.
    pub unusable: Option<crate::store::Unusable>,
}

/// The status shared between the loop and the D-Bus object.
pub type SharedStatus = Arc<Mutex<DeploymentStatus>>;

/// Called after every status change, to emit `PropertiesChanged`.
pub type StatusChanged = Arc<dyn Fn() + Send + Sync>;

/// The loop's settings, from `[reconciler]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Grace given to an instance that is stopped before it is killed.
    pub stop_grace_ms: u32,
    /// The whole time a WASM instance has to end (see [`crate::ReconcilerConfig`]).
    pub wasm_stop_grace_ms: u32,
    /// Restart policy defaults.
    pub restart: RestartConfig,
    /// First wait before retrying a pass that had failures (a runtime away, a refused load).
    pub retry_base: Duration,
    /// Longest wait between such retries.
    pub retry_max: Duration,
}

/// Grace given when an exited instance's record is dropped before a restart: it does not run,
/// so there is nothing to wait for.
const FORGET_GRACE_MS: u32 = 0;

/// A proxy to one runtime; properties are not cached because the loop reads them rarely.
async fn runtime_proxy(conn: &Connection, rt: Runtime) -> zbus::Result<Runtime1Proxy<'static>> {
    Runtime1Proxy::builder(conn)
        .destination(rt.name())
        .path(rt.path())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

/// An instance this loop placed (or adopted) and tracks.
#[derive(Debug, Clone)]
struct Running {
    placement: Placement,
    state: InstanceState,
    failure: Option<String>,
    restart: RestartState,
}

/// One input of the loop besides the desired deployment and its timers.
#[derive(Debug)]
pub enum Event {
    /// A download task reported.
    Download(DownloadEvent),
    /// A runtime's `InstanceChanged`.
    Instance {
        /// Which runtime sent it.
        runtime: Runtime,
        /// The instance.
        instance: String,
        /// Its state, or the word it sent when that is none this build knows.
        state: Result<InstanceState, UnknownInstanceState>,
        /// Why, for `error`.
        failure: String,
    },
    /// A runtime got an owner on the bus (`true`) or lost it (`false`).
    Owner {
        /// Which runtime.
        runtime: Runtime,
        /// Whether it is on the bus now.
        present: bool,
    },
    /// sdk-broker got a new owner on the bus (its unique name): a restart, when it is not the
    /// process the placed instances' sockets were opened with.
    SdkBrokerBack(String),
}

/// The loop's own view of the device.
pub struct Reconciler {
    conn: Connection,
    /// sdk-broker: instances get their SDK socket before they start and the exit event
    /// before they are stopped.
    sdk: SdkBroker1Proxy<'static>,
    status: SharedStatus,
    changed: StatusChanged,
    settings: Settings,
    downloads: Downloads,
    events: mpsc::UnboundedReceiver<Event>,
    /// The deployment being applied, which the status describes.
    target: Option<Deployment>,
    paused: bool,
    /// Why the deployment on disk was not resumed, until the hub sends one.
    unusable: Option<crate::store::Unusable>,
    /// A pass over `target` ran to its end.
    applied: bool,
    /// A pass is due.
    dirty: bool,
    running: BTreeMap<String, Running>,
    /// Modules loaded into a runtime, and from what definition.
    loaded: BTreeMap<String, Module>,
    downloading: HashMap<String, DownloadView>,
    module_errors: BTreeMap<String, String>,
    instance_errors: BTreeMap<String, String>,
    /// Runtimes whose `Instances` were read since they last appeared on the bus.
    synced: BTreeSet<Runtime>,
    /// Instances a runtime hosts that the deployment does not want (or wants from another
    /// module): stopped by the next pass.
    foreign: Vec<(Runtime, String)>,
    /// The unique bus name of the sdk-broker the instances' sockets were opened with, once
    /// known: its appearing is no restart (at boot it may be seen after the first starts).
    sdk_owner: Option<String>,
    retry: Backoff,
    retry_at: Option<Instant>,
    published: Option<DeploymentStatus>,
}

impl Reconciler {
    /// A loop that publishes its status into `status` and calls `changed` after each change.
    /// `events` carries download reports (their sink sends [`Event::Download`] into it) and
    /// runtime events (see [`follow_runtimes`]).
    pub fn new(
        conn: Connection,
        sdk: SdkBroker1Proxy<'static>,
        downloads: Downloads,
        events: mpsc::UnboundedReceiver<Event>,
        status: SharedStatus,
        changed: StatusChanged,
        settings: Settings,
    ) -> Self {
        let retry = Backoff::new(settings.retry_base, settings.retry_max);
        Reconciler {
            conn,
            sdk,
            status,
            changed,
            settings,
            downloads,
            events,
            target: None,
            paused: false,
            unusable: None,
            applied: false,
            dirty: false,
            running: BTreeMap::new(),
            loaded: BTreeMap::new(),
            downloading: HashMap::new(),
            module_errors: BTreeMap::new(),
            instance_errors: BTreeMap::new(),
            synced: BTreeSet::new(),
            foreign: Vec::new(),
            sdk_owner: None,
            retry,
            retry_at: None,
            published: None,
        }
    }

    async fn runtime(&self, rt: Runtime) -> Result<Runtime1Proxy<'static>, String> {
        runtime_proxy(&self.conn, rt)
            .await
            .map_err(|e| format!("runtime {} unavailable: {e}", rt.name()))
    }

    /// Runs until the desired-state sender is dropped.
    pub async fn run(mut self, mut desired_rx: watch::Receiver<Desired>) {
        // `changed()` below marks the value seen, so a flag carries the news to the top.
        let mut desired_changed = true;
        loop {
            if std::mem::take(&mut desired_changed) || desired_rx.has_changed().unwrap_or(false) {
                let desired = desired_rx.borrow_and_update().clone();
                self.paused = desired.paused;
                self.unusable = desired.unusable;
                if !self.paused && desired.deployment != self.target {
                    self.target = desired.deployment;
                    self.applied = false;
                    self.retry.reset();
                    self.retry_at = None;
                }
                self.dirty = true;
            }
            if self.dirty && !self.paused && self.target.is_some() {
                self.dirty = false;
                if self.pass(&desired_rx).await {
                    // Preempted: take the newer deployment first.
                    self.dirty = true;
                    continue;
                }
            }
            self.publish();
            let deadline = self.next_deadline();
            tokio::select! {
                r = desired_rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                    desired_changed = true;
                }
                ev = self.events.recv() => match ev {
                    Some(ev) => self.handle(ev).await,
                    None => return,
                },
                _ = sleep_until(deadline) => self.on_timers().await,
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.running
            .values()
            .filter_map(|r| r.restart.pending())
            .chain(self.retry_at)
            .min()
    }

    async fn handle(&mut self, ev: Event) {
        match ev {
            Event::Download(d) => self.on_download(d),
            Event::Instance {
                runtime,
                instance,
                state,
                failure,
            } => self.on_instance(runtime, &instance, state, &failure),
            Event::Owner { runtime, present } => {
                if present {
                    info!(
                        runtime = runtime.name(),
                        "runtime is on the bus; reading its instances"
                    );
                    self.synced.remove(&runtime);
                    self.sync_runtime(runtime).await;
                } else {
                    self.runtime_lost(runtime);
                }
                self.dirty = true;
            }
            Event::SdkBrokerBack(owner) => {
                if self.sdk_owner.as_deref() == Some(owner.as_str()) {
                    return;
                }
                self.sdk_owner = Some(owner);
                self.reattach_sdk().await;
            }
        }
    }

    /// After sdk-broker restarted, every placed instance gets a new SDK socket and is started
    /// again on it: EVP modules do not reconnect (their SDK ends them when the connection
    /// drops), so without this they would stay exited until the next deployment.
    async fn reattach_sdk(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        if names.is_empty() {
            return;
        }
        warn!(
            instances = names.len(),
            "sdk-broker restarted; starting the instances again on new SDK sockets"
        );
        for name in names {
            let Some(want) = self.running.get(&name).map(|r| r.placement.clone()) else {
                continue;
            };
            let Some(rt) = want.runtime().filter(|rt| self.synced.contains(rt)) else {
                continue;
            };
            let result = match self.runtime(rt).await {
                Ok(proxy) => {
                    // Its SDK connection is dead: stop what is left of it at once.
                    if let Err(e) = proxy.stop_instance(&name, FORGET_GRACE_MS).await {
                        debug!(instance = %name, "stopping before reattaching: {}", dbus::error_message(&e));
                    }
                    start(&self.sdk, &proxy, &name, &want).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    if let Some(r) = self.running.get_mut(&name) {
                        r.state = InstanceState::Starting;
                        r.failure = None;
                    }
                }
                Err(msg) => self.on_exit(&name, Exit::Failure(format!("Failed to restart: {msg}"))),
            }
        }
        self.dirty = true;
    }

    fn on_download(&mut self, ev: DownloadEvent) {
        match ev {
            DownloadEvent::Started { hash, task } if self.downloads.is_current(&hash, task) => {
                let v = self.downloading.entry(hash).or_default();
                v.failed = None;
            }
            DownloadEvent::Progress {
                hash,
                task,
                progress,
            } if self.downloads.is_current(&hash, task) => {
                self.downloading.entry(hash).or_default().progress = Some(progress);
            }
            DownloadEvent::Failed {
                hash,
                task,
                message,
                ..
            } if self.downloads.is_current(&hash, task) => {
                let v = self.downloading.entry(hash).or_default();
                v.failed = Some(message);
                v.progress = None;
            }
            DownloadEvent::Done { hash, task } if self.downloads.is_current(&hash, task) => {
                self.downloads.finished(&hash);
                self.downloading.remove(&hash);
                self.dirty = true;
            }
            stale => debug!(?stale, "report of a cancelled download"),
        }
    }

    fn on_instance(
        &mut self,
        rt: Runtime,
        instance: &str,
        state: Result<InstanceState, UnknownInstanceState>,
        failure: &str,
    ) {
        let Some(r) = self.running.get_mut(instance) else {
            return;
        };
        if r.placement.runtime() != Some(rt) {
            return;
        }
        let state = match state {
            Ok(state) => state,
            Err(unknown) => {
                warn!(%instance, "{unknown}");
                return;
            }
        };
        match state {
            // Stops are the loop's own doing (or part of a restart).
            InstanceState::Stopped => {}
            InstanceState::Error => {
                let reason = if failure.is_empty() {
                    "failed".to_owned()
                } else {
                    failure.to_owned()
                };
                self.on_exit(instance, Exit::Failure(reason));
            }
            InstanceState::SelfExiting => self.on_exit(instance, Exit::Clean),
            other => {
                if r.restart.pending().is_none() {
                    info!(%instance, "now {other}");
                    r.state = other;
                    r.failure = None;
                }
            }
        }
    }

    /// Applies the restart policy to an instance that exited by itself.
    fn on_exit(&mut self, instance: &str, exit: Exit) {
        let policy = self
            .target
            .as_ref()
            .and_then(|d| d.instance_specs.get(instance))
            .and_then(|s| s.restart_policy)
            .unwrap_or(RestartPolicy::OnFailure);
        let config = self.settings.restart;
        let Some(r) = self.running.get_mut(instance) else {
            return;
        };
        if r.restart.pending().is_some() {
            // Already waiting to restart: this is the same exit, reported again.
            return;
        }
        let now = Instant::now();
        let decision = r
            .restart
            .on_exit(policy, &config, &exit, now, backoff::random_jitter());
        let (state, reason) = match &exit {
            Exit::Clean => (
                InstanceState::SelfExiting,
                "exited with status 0".to_owned(),
            ),
            Exit::Failure(m) => (InstanceState::Error, m.clone()),
        };
        let message = restart::describe(&reason, &decision, config.limit, now);
        match &decision {
            Decision::Restart { attempt, delay, .. } => {
                info!(%instance, attempt, limit = config.limit, ?delay, "{reason}; restarting it after the backoff")
            }
            Decision::Stay => info!(%instance, "{message}"),
            Decision::GiveUp { .. } => warn!(%instance, "{message}"),
        }
        r.state = state;
        r.failure = (state == InstanceState::Error).then_some(message);
    }

    async fn on_timers(&mut self) {
        let now = Instant::now();
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.dirty = true;
        }
        let due: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.restart.pending().is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.restart(&name).await;
        }
    }

    /// Starts an exited instance again, as its restart policy scheduled.
    async fn restart(&mut self, name: &str) {
        let Some(r) = self.running.get(name) else {
            return;
        };
        let want = r.placement.clone();
        let attempt = r.restart.restarts();
        let Some(rt) = want.runtime().filter(|rt| self.synced.contains(rt)) else {
            // Its runtime is away; what it reports when it is back decides.
            if let Some(r) = self.running.get_mut(name) {
                r.restart.cancel();
            }
            return;
        };
        info!(instance = %name, attempt, limit = self.settings.restart.limit, "restarting instance");
        let result = match self.runtime(rt).await {
            Ok(proxy) => {
                // The runtime keeps an exited instance's record; StopInstance drops it, so the
                // start below is a fresh one rather than a no-op.
                if let Err(e) = proxy.stop_instance(name, FORGET_GRACE_MS).await {
                    debug!(instance = %name, "forgetting the exited instance: {}", dbus::error_message(&e));
                }
                start(&self.sdk, &proxy, name, &want).await
            }
            Err(e) => Err(e),
        };
        let now = Instant::now();
        let Some(r) = self.running.get_mut(name) else {
            return;
        };
        r.restart.on_restarted(now);
        match result {
            Ok(()) => {
                r.state = InstanceState::Starting;
                r.failure = None;
            }
            Err(msg) => self.on_exit(name, Exit::Failure(format!("Failed to restart: {msg}"))),
        }
    }

    /// A runtime left the bus: its instances' states are unknown until it is back.
    fn runtime_lost(&mut self, rt: Runtime) {
        warn!(
            runtime = rt.name(),
            "runtime left the bus; its instances are unknown until it is back"
        );
        self.synced.remove(&rt);
        self.loaded
            .retain(|_, m| m.module_impl.runtime() != Some(rt));
        for r in self.running.values_mut() {
            if r.placement.runtime() == Some(rt) {
                r.state = InstanceState::Unknown;
                r.failure = Some(format!("runtime {} is not on the bus", rt.name()));
                r.restart.cancel();
            }
        }
    }

    /// Reads what a runtime hosts and folds it into `running`: instances it hosts with the
    /// module the deployment wants are adopted without a start; ones it no longer hosts are
    /// started again by the next pass; the others are stopped. Returns whether it answered.
    async fn sync_runtime(&mut self, rt: Runtime) -> bool {
        let hosted = match self.runtime(rt).await {
            Ok(p) => p.instances().await.map_err(|e| dbus::error_message(&e)),
            Err(e) => Err(e),
        };
        let hosted = match hosted {
            Ok(h) => h,
            Err(e) => {
                debug!(runtime = rt.name(), "cannot read its instances: {e}");
                return false;
            }
        };
        let now = Instant::now();
        // A runtime that (re)appeared may not know our modules; loading again is harmless.
        self.loaded
            .retain(|_, m| m.module_impl.runtime() != Some(rt));
        let mut hosted: BTreeMap<String, (String, InstanceState, String)> = hosted
            .into_iter()
            .map(|(name, module, status, failure)| {
                let state = hosted_state(rt, &name, &status);
                (name, (module, state, failure))
            })
            .collect();
        let ours: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.placement.runtime() == Some(rt))
            .map(|(n, _)| n.clone())
            .collect();
        for name in ours {
            let Some(r) = self.running.get_mut(&name) else {
                continue;
            };
            match hosted.remove(&name) {
                Some((module_id, state, failure)) if module_id == r.placement.module_id => {
                    r.restart.cancel();
                    self.take_state(&name, state, &failure);
                }
                Some(_) => {
                    self.running.remove(&name);
                    self.foreign.push((rt, name));
                }
                None => {
                    info!(instance = %name, runtime = rt.name(), "instance is gone from its runtime; it will be started again");
                    self.running.remove(&name);
                }
            }
        }
        for (name, (module_id, state, failure)) in hosted {
            let want = self
                .target
                .as_ref()
                .and_then(|d| placement(d, &name))
                .filter(|p| p.module_id == module_id && p.runtime() == Some(rt));
            match want {
                Some(placement) => {
                    info!(instance = %name, module = %module_id, status = %state, "adopting instance the runtime already hosts");
                    self.running.insert(
                        name.clone(),
                        Running {
                            placement,
                            state: InstanceState::Unknown,
                            failure: None,
                            restart: RestartState::new(now),
                        },
                    );
                    self.take_state(&name, state, &failure);
                }
                None => {
                    info!(instance = %name, module = %module_id, runtime = rt.name(), "the runtime hosts an instance the deployment does not want; stopping it");
                    self.foreign.push((rt, name));
                }
            }
        }
        self.synced.insert(rt);
        self.dirty = true;
        true
    }

    /// Takes an instance's state as its runtime reports it; exits go through the policy.
    fn take_state(&mut self, name: &str, state: InstanceState, failure: &str) {
        match state {
            InstanceState::Error => {
                let reason = if failure.is_empty() {
                    "failed"
                } else {
                    failure
                };
                self.on_exit(name, Exit::Failure(reason.to_owned()));
            }
            InstanceState::SelfExiting => self.on_exit(name, Exit::Clean),
            state => {
                if let Some(r) = self.running.get_mut(name) {
                    r.state = state;
                    r.failure = None;
                }
            }
        }
    }

    /// One pass towards `target`: learn what the runtimes host, plan, execute. Returns `true`
    /// when a newer desired state preempted it.
    async fn pass(&mut self, rx: &watch::Receiver<Desired>) -> bool {
        let Some(desired) = self.target.clone() else {
            return false;
        };
        self.applied = false;
        self.module_errors.clear();
        self.instance_errors.clear();
        let mut failures = false;

        // Learn what runtimes host before placing anything on them (and before the status
        // says anything about them).
        for rt in Runtime::ALL {
            if !self.synced.contains(&rt) && !self.sync_runtime(rt).await && needs(&desired, rt) {
                debug!(
                    runtime = rt.name(),
                    "runtime not on the bus yet; retrying later"
                );
                failures = true;
            }
        }
        self.publish();

        let placed: BTreeMap<String, Placement> = self
            .running
            .iter()
            .map(|(k, v)| (k.clone(), v.placement.clone()))
            .collect();
        let cached: BTreeSet<String> = desired
            .modules
            .values()
            .filter_map(cached_hash)
            .filter(|h| self.downloads.cache().contains(h))
            .collect();
        let downloading: BTreeMap<String, String> = self
            .downloads
            .urls()
            .map(|(h, u)| (h.to_owned(), u.to_owned()))
            .collect();
        let plan = plan::plan(
            &desired,
            Observed {
                placed: &placed,
                foreign: &self.foreign,
                loaded: &self.loaded,
                cached: &cached,
                downloading: &downloading,
                synced: &self.synced,
            },
        );
        self.module_errors.extend(plan.module_errors);
        match self.execute(plan.steps, rx).await {
            Some(step_failures) => failures |= step_failures,
            None => return true,
        }

        if failures {
            let delay = self.retry.next_delay();
            debug!(?delay, "the pass had failures; retrying later");
            self.retry_at = Some(Instant::now() + delay);
        } else {
            self.retry.reset();
            self.retry_at = None;
        }
        self.applied = true;
        let status = self.render().reconcile_status;
        info!(
            deployment_id = desired.deployment_id.as_deref().unwrap_or("-"),
            status = status.map(ReconcileStatus::as_str).unwrap_or("-"),
            "reconcile pass done"
        );
        false
    }

    async fn refresh_started(&mut self, rt: Runtime) {
        let hosted = match self.runtime(rt).await {
            Ok(p) => p.instances().await.map_err(|e| dbus::error_message(&e)),
            Err(e) => Err(e),
        };
        match hosted {
            Ok(hosted) => {
                for (name, module_id, status, failure) in hosted {
                    let starting = self.running.get(&name).is_some_and(|r| {
                        r.state == InstanceState::Starting && r.placement.module_id == module_id
                    });
                    let state = hosted_state(rt, &name, &status);
                    if starting && state != InstanceState::Starting {
                        self.take_state(&name, state, &failure);
                    }
                }
            }
            Err(e) => warn!(runtime = rt.name(), "reading the runtime's instances: {e}"),
        }
    }

    /// The status of `target` as things stand.
    fn render(&self) -> DeploymentStatus {
        status::render(&StatusInputs {
            target: self.target.as_ref(),
            unusable: self.unusable.as_ref(),
            paused: self.paused,
            applied: self.applied,
            running: self
                .running
                .iter()
                .map(|(name, r)| {
                    (
                        name.as_str(),
                        InstanceView {
                            placement: &r.placement,
                            state: r.state,
                            failure: r.failure.as_deref(),
                        },
                    )
                })
                .collect(),
            loaded: &self.loaded,
            downloading: &self.downloading,
            module_errors: &self.module_errors,
            instance_errors: &self.instance_errors,
            synced: &self.synced,
        })
    }

    /// Renders the status and publishes it when it changed.
    fn publish(&mut self) {
        let status = self.render();
        if self.published.as_ref() == Some(&status) {
            return;
        }
        {
            let mut shared = self.status.lock().unwrap_or_else(|p| p.into_inner());
            *shared = status.clone();
        }
        self.published = Some(status);
        (self.changed)();
    }
}

/// An instance's state as its runtime's `Instances` gives it; a word this build does not know
/// is taken as `unknown` (logged), so the instance is still adopted or stopped by its module.
fn hosted_state(rt: Runtime, instance: &str, word: &str) -> InstanceState {
    InstanceState::parse(word).unwrap_or_else(|unknown| {
        warn!(runtime = rt.name(), %instance, "{unknown}; taking it as unknown");
        InstanceState::Unknown
    })
}

/// Whether the deployment has modules that `rt` runs.
fn needs(d: &Deployment, rt: Runtime) -> bool {
    d.modules
        .values()
        .any(|m| m.module_impl.runtime() == Some(rt))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosted_status_words_this_build_does_not_know_are_unknown() {
        fn check(word: &str, expect: InstanceState) {
            assert_eq!(
                hosted_state(Runtime::Container, "i", word),
                expect,
                "{word:?}"
            );
        }
        check("starting", InstanceState::Starting);
        check("ok", InstanceState::Ok);
        check("self-exiting", InstanceState::SelfExiting);
        check("error", InstanceState::Error);
        check("unknown", InstanceState::Unknown);
        check("running", InstanceState::Unknown);
        check("", InstanceState::Unknown);
    }
}
