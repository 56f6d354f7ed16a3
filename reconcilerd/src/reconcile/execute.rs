//! The acting half of a reconcile pass: runs the steps `plan.rs` decided, against the
//! runtimes and sdk-broker on the bus, and records what each did in the loop's state.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use evp_schemas::InstanceState;
use evp_schemas::dbus::{self, Runtime1Proxy, SdkBroker1Proxy};
use evp_schemas::instance::StartOptions;
use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Desired, Reconciler, Running};
use crate::plan::{ModuleSource, Placement, Runtime, Step};
use crate::restart::RestartState;

/// How many instance starts run at once. Each is mostly waiting (sdk-broker, the runtime, a
/// container engine's create and start): a few in flight keep those busy without flooding a
/// two-core gateway with hundreds of concurrent forks or engine calls.
const PARALLEL_STARTS: usize = 8;

impl Reconciler {
    /// Runs a plan's steps in order, checking before each one that talks to the bus whether a
    /// newer desired state arrived. Consecutive stops run in parallel: each may wait out an
    /// exit grace, and they do not depend on each other. Returns whether a step failed, or
    /// `None` when preempted (what was done so far is recorded; the next pass plans from it).
    pub(super) async fn execute(
        &mut self,
        steps: Vec<Step>,
        rx: &watch::Receiver<Desired>,
    ) -> Option<bool> {
        let preempted = || rx.has_changed().unwrap_or(false);
        let mut failures = false;
        let mut failed_loads = BTreeSet::new();
        let mut started_on = BTreeSet::new();
        let mut steps = steps.into_iter().peekable();
        while let Some(step) = steps.next() {
            if preempted() {
                return None;
            }
            match step {
                Step::Stop {
                    runtime,
                    instance,
                    purge,
                } => {
                    let mut batch = vec![(runtime, instance, purge)];
                    while let Some(Step::Stop { .. }) = steps.peek() {
                        if let Some(Step::Stop {
                            runtime,
                            instance,
                            purge,
                        }) = steps.next()
                        {
                            batch.push((runtime, instance, purge));
                        }
                    }
                    self.stop_all(&batch).await;
                }
                Step::Unload { runtime, module_id } => {
                    if let Some(rt) = runtime
                        && let Ok(proxy) = self.runtime(rt).await
                        && let Err(e) = proxy.unload_module(&module_id).await
                    {
                        warn!(module = %module_id, "unload failed: {}", dbus::error_message(&e));
                    }
                    self.loaded.remove(&module_id);
                }
                Step::CancelDownload { hash } => {
                    self.downloads.retain(|h| h != hash);
                    self.downloading.remove(&hash);
                }
                Step::Fetch { hash, url } => {
                    self.downloads.ensure(&hash, &url);
                    // A fetch from a new URL does not show the old URL's failure meanwhile.
                    self.downloading.insert(hash, Default::default());
                }
                Step::Load {
                    runtime,
                    module_id,
                    module,
                    source,
                    hash,
                } => {
                    let location = match source {
                        ModuleSource::Cached => self
                            .downloads
                            .cache()
                            .path_of(&hash)
                            .to_string_lossy()
                            .into_owned(),
                        ModuleSource::Image(image) => image,
                    };
                    let result = match self.runtime(runtime).await {
                        Ok(proxy) => proxy
                            .load_module(&module_id, module.module_impl.as_str(), &location, &hash)
                            .await
                            .map_err(|e| format!("Failed to load: {}", dbus::error_message(&e))),
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(()) => {
                            self.loaded.insert(module_id, module);
                        }
                        Err(msg) => {
                            warn!(module = %module_id, "{msg}");
                            failures = true;
                            self.module_errors.insert(module_id.clone(), msg);
                            failed_loads.insert(module_id);
                        }
                    }
                }
                Step::SetRouting { routing } => {
                    if let Err(e) = self.sdk.set_routing(&routing).await {
                        warn!("setting the messaging routes: {}", dbus::error_message(&e));
                        failures = true;
                    }
                }
                Step::Start {
                    instance,
                    placement,
                } => {
                    let mut batch = vec![(instance, placement)];
                    while let Some(Step::Start { .. }) = steps.peek() {
                        if let Some(Step::Start {
                            instance,
                            placement,
                        }) = steps.next()
                        {
                            batch.push((instance, placement));
                        }
                    }
                    batch.retain(|(_, p)| {
                        p.runtime().is_some() && !failed_loads.contains(&p.module_id)
                    });
                    let deployment_id = rx
                        .borrow()
                        .deployment
                        .as_ref()
                        .and_then(|d| d.deployment_id.clone());
                    for (rt, instance, placement, result) in self.start_all(batch).await {
                        match result {
                            Ok(()) => {
                                info!(
                                    instance = %instance,
                                    module = %placement.module_id,
                                    deployment_id = deployment_id.as_deref().unwrap_or("-"),
                                    runtime = rt.name(),
                                    "instance started"
                                );
                                started_on.insert(rt);
                                self.running.insert(
                                    instance,
                                    Running {
                                        placement,
                                        state: InstanceState::Starting,
                                        failure: None,
                                        restart: RestartState::new(Instant::now()),
                                    },
                                );
                            }
                            Err(msg) => {
                                warn!(%instance, "{msg}");
                                failures = true;
                                self.instance_errors.insert(instance, msg);
                            }
                        }
                    }
                }
            }
        }
        // A start of an instance that already runs changes nothing and so emits no signal:
        // take the state of what was just started from the runtime itself.
        for rt in started_on {
            self.refresh_started(rt).await;
        }
        Some(failures)
    }

    /// Starts a batch of instances, [`PARALLEL_STARTS`] at a time; each with its outcome.
    async fn start_all(
        &mut self,
        batch: Vec<(String, Placement)>,
    ) -> Vec<(Runtime, String, Placement, Result<(), String>)> {
        if self.sdk_owner.is_none() {
            // Before the sockets are opened: a restart after this reads as one (a spare
            // restart), never the other way round.
            self.sdk_owner = self.sdk_broker_owner().await;
        }
        let mut ready = Vec::new();
        for (instance, placement) in batch {
            let Some(rt) = placement.runtime() else {
                continue;
            };
            ready.push((rt, self.runtime(rt).await, instance, placement));
        }
        let sdk = &self.sdk;
        // A loop, not a closure: a closure over `sdk` makes the future's lifetime
        // higher-ranked, and tokio::spawn then cannot prove the loop's future is Send.
        let mut starts = Vec::new();
        for (rt, proxy, instance, placement) in ready {
            starts.push(async move {
                let result = match proxy {
                    Ok(proxy) => start(sdk, &proxy, &instance, &placement).await,
                    Err(e) => Err(e),
                };
                (rt, instance, placement, result)
            });
        }
        futures_util::stream::iter(starts)
            .buffer_unordered(PARALLEL_STARTS)
            .collect()
            .await
    }

    /// The unique bus name owning sdk-broker's name now, if any.
    async fn sdk_broker_owner(&self) -> Option<String> {
        let dbus = zbus::fdo::DBusProxy::new(&self.conn).await.ok()?;
        let name = zbus::names::BusName::try_from(dbus::SDK_BROKER_NAME).ok()?;
        dbus.get_name_owner(name).await.ok().map(|o| o.to_string())
    }

    /// Stops a batch of instances in parallel and forgets them.
    async fn stop_all(&mut self, batch: &[(Option<Runtime>, String, bool)]) {
        let mut stops = Vec::new();
        for (rt, name, purge) in batch {
            let target = match rt {
                Some(rt) => match self.runtime(*rt).await {
                    Ok(proxy) => Some((proxy, StopGrace::of(*rt, &self.settings))),
                    Err(_) => None,
                },
                None => None,
            };
            stops.push((name, target, *purge));
        }
        let sdk = &self.sdk;
        futures_util::future::join_all(stops.iter().map(|(name, target, purge)| async move {
            match target {
                Some((proxy, grace)) => stop_one(sdk, proxy, name, *grace, *purge).await,
                None => warn!(instance = %name, "cannot stop: its runtime is not reachable"),
            }
        }))
        .await;
        for (_, name, _) in batch {
            self.running.remove(name);
            self.foreign.retain(|(_, f)| f != name);
        }
    }
}

/// How long stopping an instance may take: first the SDK exit protocol (sdk-broker waits at
/// most `close` for the module to let go), then the runtime's stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StopGrace {
    /// The exit protocol's bound.
    close: Duration,
    /// Whether the runtime's stop gets only what the exit protocol left of `close`
    /// (WASM: EVP's 5 s are for everything), rather than a whole `stop` of its own
    /// (a process: the exit protocol, then SIGTERM and up to `stop` before SIGKILL).
    shared: bool,
    /// The runtime's own grace when not shared.
    stop: Duration,
}

impl StopGrace {
    fn of(runtime: Runtime, settings: &super::Settings) -> StopGrace {
        let ms = |v: u32| Duration::from_millis(u64::from(v));
        match runtime {
            Runtime::Wasm => StopGrace {
                close: ms(settings.wasm_stop_grace_ms),
                shared: true,
                stop: ms(settings.wasm_stop_grace_ms),
            },
            Runtime::Container => StopGrace {
                close: ms(settings.stop_grace_ms),
                shared: false,
                stop: ms(settings.stop_grace_ms),
            },
        }
    }

    /// The grace for the runtime's stop once the exit protocol took `elapsed`.
    fn after_close(self, elapsed: Duration) -> Duration {
        if self.shared {
            self.close.saturating_sub(elapsed)
        } else {
            self.stop
        }
    }
}

/// Opens the instance's SDK socket in sdk-broker, starts it with that socket, then binds the
/// socket to the process the runtime answered (only it, or a descendant, may use the socket;
/// a connection it made meanwhile is held until then). Opening is idempotent, so a restart or
/// a reconcilerd restart reuses the socket that is there.
pub(super) async fn start(
    sdk: &SdkBroker1Proxy<'static>,
    proxy: &Runtime1Proxy<'static>,
    name: &str,
    want: &Placement,
) -> Result<(), String> {
    let socket = sdk
        .open_instance(name)
        .await
        .map_err(|e| format!("Failed to create SDK socket: {}", dbus::error_message(&e)))?;
    let options = StartOptions {
        sdk_socket: Some(socket.into()),
        entry_point: Some(want.module.entry_point.clone()),
        container: want.container.clone().unwrap_or_default(),
        ..Default::default()
    }
    .to_dbus()
    .map_err(|e| e.to_string())?;
    let (pid, uid) = proxy
        .start_instance(name, &want.module_id, options)
        .await
        .map_err(|e| format!("Failed to start: {}", dbus::error_message(&e)))?;
    sdk.bind_instance(name, pid, uid).await.map_err(|e| {
        format!(
            "Failed to bind the SDK socket to process {pid} (uid {uid}): {}",
            dbus::error_message(&e)
        )
    })
}

/// Stops one instance: the SDK exit protocol first (sdk-broker answers once the module let go,
/// or after its grace), then the runtime's stop, then its directory when it left the
/// deployment.
async fn stop_one(
    sdk: &SdkBroker1Proxy<'static>,
    proxy: &Runtime1Proxy<'static>,
    name: &str,
    grace: StopGrace,
    purge: bool,
) {
    let asked = Instant::now();
    if let Err(e) = sdk.close_instance(name, millis(grace.close)).await {
        debug!(instance = %name, "closing its SDK socket: {}", dbus::error_message(&e));
    }
    let stop = millis(grace.after_close(asked.elapsed()));
    if let Err(e) = proxy.stop_instance(name, stop).await {
        warn!(instance = %name, "stop failed: {}", dbus::error_message(&e));
    }
    if purge && let Err(e) = proxy.purge_instance(name).await {
        warn!(instance = %name, "removing its directory failed: {}", dbus::error_message(&e));
    }
}

/// A grace as the bus carries it (`u` milliseconds), saturating.
fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(stop_grace_ms: u32, wasm_stop_grace_ms: u32) -> super::super::Settings {
        let mut settings = crate::ReconcilerConfig::default().settings();
        settings.stop_grace_ms = stop_grace_ms;
        settings.wasm_stop_grace_ms = wasm_stop_grace_ms;
        settings
    }

    #[test]
    fn a_wasm_stop_shares_one_grace_and_a_process_gets_two() {
        // (runtime, time the exit protocol took in ms) -> (close bound, runtime stop) in ms
        fn check(rt: Runtime, elapsed_ms: u64, expect: (u32, u32)) {
            let grace = StopGrace::of(rt, &settings(10_000, 5_000));
            let got = (
                millis(grace.close),
                millis(grace.after_close(Duration::from_millis(elapsed_ms))),
            );
            assert_eq!(got, expect, "{rt:?} after {elapsed_ms} ms");
        }
        check(Runtime::Wasm, 0, (5_000, 5_000));
        check(Runtime::Wasm, 1_200, (5_000, 3_800));
        check(Runtime::Wasm, 5_000, (5_000, 0));
        check(Runtime::Wasm, 7_000, (5_000, 0));
        check(Runtime::Container, 0, (10_000, 10_000));
        check(Runtime::Container, 10_000, (10_000, 10_000));
    }
}
