//! The deployment status as the loop's view of the device renders it. Pure: the loop builds a
//! [`StatusInputs`] of references to what it knows and publishes what [`render`] returns when
//! it changed.
//!
//! Rules: every instance and module of the deployment being applied is in the status (so
//! `deploymentId` always comes with its own instances); `reconcileStatus` is `paused` while
//! held, `error` once a pass ran to its end with a failure, `applying` while anything is still
//! on its way, and `ok` otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use evp_schemas::{
    Deployment, DeploymentStatus, InstanceState, InstanceStatus, Module, ModuleState, ModuleStatus,
    ReconcileStatus,
};

use crate::download::Progress;
use crate::plan::{Placement, Runtime, cached_hash, placement};
use crate::store::Unusable;

/// What the loop knows about one download task.
#[derive(Debug, Clone, Default)]
pub struct DownloadView {
    /// Bytes received so far, from its last report.
    pub progress: Option<Progress>,
    /// Why its last attempt failed (it may be retrying).
    pub failed: Option<String>,
}

/// An instance the loop placed, as the status needs it.
#[derive(Debug, Clone, Copy)]
pub struct InstanceView<'a> {
    /// What it was started from.
    pub placement: &'a Placement,
    /// Its state, as its runtime last reported it (or the restart policy decided).
    pub state: InstanceState,
    /// Why it is in `error`.
    pub failure: Option<&'a str>,
}

/// Everything the status depends on.
#[derive(Debug, Clone)]
pub struct StatusInputs<'a> {
    /// The deployment being applied.
    pub target: Option<&'a Deployment>,
    /// The deployment that could not be taken: the one on disk at start, or one from the hub
    /// that could not be persisted; until the hub's next is taken.
    pub unusable: Option<&'a Unusable>,
    /// Changes are held.
    pub paused: bool,
    /// A pass over `target` ran to its end.
    pub applied: bool,
    /// The instances the loop placed or adopted.
    pub running: BTreeMap<&'a str, InstanceView<'a>>,
    /// Modules loaded into their runtime.
    pub loaded: &'a BTreeMap<String, Module>,
    /// Download tasks by hash.
    pub downloading: &'a HashMap<String, DownloadView>,
    /// Modules the last pass could not load or cannot run here.
    pub module_errors: &'a BTreeMap<String, String>,
    /// Instances the last pass could not start.
    pub instance_errors: &'a BTreeMap<String, String>,
    /// Runtimes that answered since they last appeared on the bus.
    pub synced: &'a BTreeSet<Runtime>,
}

/// How a module stands, as the status shows it.
enum ModuleView {
    Ok,
    Downloading(Option<Progress>),
    Failed(String),
    /// Fetched, waiting for its runtime to be on the bus: shown as `error` with the reason,
    /// while the deployment stays `applying`.
    Waiting(String),
}

fn module_view(s: &StatusInputs<'_>, id: &str, module: &Module) -> ModuleView {
    if s.loaded.get(id) == Some(module) {
        return ModuleView::Ok;
    }
    if let Some(e) = s.module_errors.get(id) {
        return ModuleView::Failed(e.clone());
    }
    if let Some(hash) = cached_hash(module)
        && let Some(d) = s.downloading.get(&hash)
    {
        return match &d.failed {
            Some(e) => ModuleView::Failed(e.clone()),
            None => ModuleView::Downloading(d.progress),
        };
    }
    match module.module_impl.runtime() {
        Some(rt) if !s.synced.contains(&rt) => ModuleView::Waiting(format!(
            "waiting for runtime {} to be on the bus",
            rt.name()
        )),
        _ => ModuleView::Downloading(None),
    }
}

/// Longest failure message in the status: they quote what the hub and the runtimes said (ids,
/// URLs, errors), which may be of any size, and every one of them shares one MQTT report.
const MAX_FAILURE_MESSAGE: usize = 512;

/// `msg` within [`MAX_FAILURE_MESSAGE`], its middle elided.
fn bounded(msg: String) -> String {
    evp_schemas::text::shorten_owned(msg, MAX_FAILURE_MESSAGE)
}

fn module_error(msg: String) -> ModuleStatus {
    ModuleStatus {
        status: ModuleState::Error,
        failure_message: Some(bounded(msg)),
        bytes_done: None,
        bytes_total: None,
    }
}

/// The status of `s.target` as things stand.
pub fn render(s: &StatusInputs<'_>) -> DeploymentStatus {
    if s.target.is_none()
        && let Some(u) = s.unusable
    {
        return DeploymentStatus {
            deployment_id: u.deployment_id.clone(),
            reconcile_status: Some(ReconcileStatus::Error),
            failure_message: Some(bounded(u.message.clone())),
            ..Default::default()
        };
    }
    let Some(d) = s.target else {
        return DeploymentStatus {
            reconcile_status: s.paused.then_some(ReconcileStatus::Paused),
            ..Default::default()
        };
    };
    let mut pending = !s.applied;
    let mut failed = false;
    let mut modules = BTreeMap::new();
    let mut module_ok = BTreeMap::new();
    for (id, m) in &d.modules {
        let status = match module_view(s, id, m) {
            ModuleView::Ok => ModuleStatus {
                status: ModuleState::Ok,
                failure_message: None,
                bytes_done: None,
                bytes_total: None,
            },
            ModuleView::Downloading(p) => {
                pending = true;
                ModuleStatus {
                    status: ModuleState::Downloading,
                    failure_message: None,
                    bytes_done: p.map(|p| p.done),
                    bytes_total: p.and_then(|p| p.total),
                }
            }
            ModuleView::Failed(msg) => {
                failed = true;
                module_error(msg)
            }
            ModuleView::Waiting(msg) => {
                pending = true;
                module_error(msg)
            }
        };
        module_ok.insert(id.clone(), status.status);
        modules.insert(id.clone(), status);
    }
    let mut instances = BTreeMap::new();
    for (name, spec) in &d.instance_specs {
        let running = s
            .running
            .get(name.as_str())
            .filter(|r| Some(r.placement) == placement(d, name).as_ref());
        let (state, failure) = if let Some(r) = running {
            (r.state, r.failure.map(str::to_owned))
        } else if let Some(e) = s.instance_errors.get(name) {
            failed = true;
            (InstanceState::Error, Some(e.clone()))
        } else {
            pending = true;
            match module_ok.get(&spec.module_id) {
                Some(ModuleState::Error) => (
                    InstanceState::Error,
                    Some(format!("Module {} is not ready", spec.module_id)),
                ),
                _ => (InstanceState::Starting, None),
            }
        };
        instances.insert(
            name.clone(),
            InstanceStatus {
                status: state,
                module_id: spec.module_id.clone(),
                failure_message: failure.map(bounded),
            },
        );
    }
    let reconcile_status = if s.paused {
        ReconcileStatus::Paused
    } else if failed && s.applied {
        ReconcileStatus::Error
    } else if pending {
        ReconcileStatus::Applying
    } else {
        ReconcileStatus::Ok
    };
    let status = DeploymentStatus {
        deployment_id: d.deployment_id.clone(),
        reconcile_status: Some(reconcile_status),
        failure_message: None,
        instances,
        modules,
    };
    match s.unusable {
        // A deployment the hub sent that could not be taken (not persisted): reported with its
        // id, as hubd reports a refused one, next to what still runs.
        Some(u) => DeploymentStatus {
            deployment_id: u.deployment_id.clone(),
            reconcile_status: Some(ReconcileStatus::Error),
            failure_message: Some(bounded(u.message.clone())),
            ..status
        },
        None => status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// The world a status is rendered from; fields are set by each test.
    struct World {
        target: Option<Deployment>,
        unusable: Option<Unusable>,
        paused: bool,
        applied: bool,
        running: BTreeMap<String, (Placement, InstanceState, Option<String>)>,
        loaded: BTreeMap<String, Module>,
        downloading: HashMap<String, DownloadView>,
        module_errors: BTreeMap<String, String>,
        instance_errors: BTreeMap<String, String>,
        synced: BTreeSet<Runtime>,
    }

    fn world(d: Value) -> World {
        World {
            target: Some(serde_json::from_value(d).expect("test deployment")),
            unusable: None,
            paused: false,
            applied: true,
            running: BTreeMap::new(),
            loaded: BTreeMap::new(),
            downloading: HashMap::new(),
            module_errors: BTreeMap::new(),
            instance_errors: BTreeMap::new(),
            synced: Runtime::ALL.into_iter().collect(),
        }
    }

    /// One spawn module `m` (hash `aa`) with instance `a`.
    fn one() -> World {
        world(json!({
            "deploymentId": "d1",
            "modules": { "m": { "moduleImpl": "spawn", "entryPoint": "main",
                                "downloadUrl": "http://hub/m", "hash": "aa" } },
            "instanceSpecs": { "a": { "moduleId": "m" } }
        }))
    }

    impl World {
        /// `m` loaded, `a` placed in `state`.
        fn running(mut self, state: InstanceState, failure: Option<&str>) -> World {
            let d = self.target.clone().expect("target");
            self.loaded = d.modules.clone();
            let p = placement(&d, "a").expect("a");
            self.running
                .insert("a".into(), (p, state, failure.map(str::to_owned)));
            self
        }

        fn render(&self) -> Value {
            let inputs = StatusInputs {
                target: self.target.as_ref(),
                unusable: self.unusable.as_ref(),
                paused: self.paused,
                applied: self.applied,
                running: self
                    .running
                    .iter()
                    .map(|(n, (p, s, f))| {
                        (
                            n.as_str(),
                            InstanceView {
                                placement: p,
                                state: *s,
                                failure: f.as_deref(),
                            },
                        )
                    })
                    .collect(),
                loaded: &self.loaded,
                downloading: &self.downloading,
                module_errors: &self.module_errors,
                instance_errors: &self.instance_errors,
                synced: &self.synced,
            };
            serde_json::to_value(render(&inputs)).expect("status serializes")
        }
    }

    /// Compares the rendered status's reconcileStatus, instances and modules with `expect`
    /// (a compact `{"reconcileStatus":..,"instances":..,"modules":..}` form).
    fn check(w: World, expect: Value) {
        let got = w.render();
        let pick = |v: &Value, k: &str| v.get(k).cloned().unwrap_or(Value::Null);
        let got = json!({
            "reconcileStatus": pick(&got, "reconcileStatus"),
            "instances": pick(&got, "instances"),
            "modules": pick(&got, "modules"),
        });
        assert_eq!(got, expect, "\n--- got ---\n{got:#}\n");
    }

    #[test]
    fn running_instance_is_ok() {
        check(
            one().running(InstanceState::Ok, None),
            json!({"reconcileStatus": "ok",
                   "instances": {"a": {"status": "ok", "moduleId": "m"}},
                   "modules": {"m": {"status": "ok"}}}),
        );
    }

    #[test]
    fn downloading_module_shows_progress_and_keeps_applying() {
        let mut w = one();
        w.downloading.insert(
            "aa".into(),
            DownloadView {
                progress: Some(Progress {
                    done: 10,
                    total: Some(100),
                }),
                failed: None,
            },
        );
        check(
            w,
            json!({"reconcileStatus": "applying",
                   "instances": {"a": {"status": "starting", "moduleId": "m"}},
                   "modules": {"m": {"status": "downloading", "bytesDone": 10, "bytesTotal": 100}}}),
        );
    }

    #[test]
    fn failed_download_makes_module_and_instance_errors() {
        let mut w = one();
        w.downloading.insert(
            "aa".into(),
            DownloadView {
                progress: None,
                failed: Some("Module hash mismatch".into()),
            },
        );
        check(
            w,
            json!({"reconcileStatus": "error",
                   "instances": {"a": {"status": "error", "moduleId": "m",
                                       "failureMessage": "Module m is not ready"}},
                   "modules": {"m": {"status": "error", "failureMessage": "Module hash mismatch"}}}),
        );
    }

    #[test]
    fn failure_before_the_pass_ends_is_still_applying() {
        let mut w = one();
        w.applied = false;
        w.instance_errors
            .insert("a".into(), "Failed to start: no".into());
        w.loaded = w.target.clone().expect("target").modules;
        check(
            w,
            json!({"reconcileStatus": "applying",
                   "instances": {"a": {"status": "error", "moduleId": "m",
                                       "failureMessage": "Failed to start: no"}},
                   "modules": {"m": {"status": "ok"}}}),
        );
    }

    #[test]
    fn crashed_instance_is_error_with_its_reason() {
        check(
            one().running(InstanceState::Error, Some("gave up after 3 restarts")),
            json!({"reconcileStatus": "ok",
                   "instances": {"a": {"status": "error", "moduleId": "m",
                                       "failureMessage": "gave up after 3 restarts"}},
                   "modules": {"m": {"status": "ok"}}}),
        );
    }

    #[test]
    fn module_waiting_for_its_runtime_is_error_with_why_while_applying() {
        let mut w = one();
        w.synced.clear();
        check(
            w,
            json!({"reconcileStatus": "applying",
                   "instances": {"a": {"status": "error", "moduleId": "m",
                                       "failureMessage": "Module m is not ready"}},
                   "modules": {"m": {"status": "error", "failureMessage":
                       "waiting for runtime org.evp.Runtime1.Container to be on the bus"}}}),
        );
    }

    #[test]
    fn instance_placed_from_an_older_definition_is_starting() {
        let mut w = one().running(InstanceState::Ok, None);
        if let Some((p, _, _)) = w.running.get_mut("a") {
            p.module_id = "old".into();
        }
        check(
            w,
            json!({"reconcileStatus": "applying",
                   "instances": {"a": {"status": "starting", "moduleId": "m"}},
                   "modules": {"m": {"status": "ok"}}}),
        );
    }

    #[test]
    fn failure_messages_are_bounded_with_their_middle_cut() {
        let long = format!("start {} end", "x".repeat(10_000));
        let got = one().running(InstanceState::Error, Some(&long)).render();
        let msg = got["instances"]["a"]["failureMessage"]
            .as_str()
            .expect("a failure message");
        assert!(msg.len() <= MAX_FAILURE_MESSAGE, "{} bytes", msg.len());
        assert!(
            msg.starts_with("start x") && msg.ends_with("x end"),
            "{msg}"
        );
    }

    #[test]
    fn paused_says_so_whatever_else_stands() {
        let mut w = one().running(InstanceState::Ok, None);
        w.paused = true;
        check(
            w,
            json!({"reconcileStatus": "paused",
                   "instances": {"a": {"status": "ok", "moduleId": "m"}},
                   "modules": {"m": {"status": "ok"}}}),
        );
    }

    #[test]
    fn unusable_persisted_deployment_is_an_error_with_its_id_until_another_comes() {
        let mut w = one().running(InstanceState::Ok, None);
        w.unusable = Some(Unusable {
            deployment_id: Some("d2".into()),
            message: "deployment d2 not applied: ENOSPC".into(),
        });
        // One the hub sent that could not be persisted: its id and error, next to what runs.
        let got = w.render();
        assert_eq!(got["deploymentId"], "d2");
        assert_eq!(got["reconcileStatus"], "error");
        assert_eq!(got["failureMessage"], "deployment d2 not applied: ENOSPC");
        assert_eq!(got["instances"]["a"]["status"], "ok", "{got}");
        w.unusable = Some(Unusable {
            deployment_id: Some("old".into()),
            message: "deployment.modules.m\\0: NUL".into(),
        });
        w.target = None;
        let got = w.render();
        assert_eq!(got["deploymentId"], "old");
        assert_eq!(got["reconcileStatus"], "error");
        assert_eq!(got["failureMessage"], "deployment.modules.m\\0: NUL");
    }

    #[test]
    fn no_deployment_yet_is_an_empty_status() {
        let mut w = one();
        w.target = None;
        assert_eq!(w.render(), json!({"instances": {}, "modules": {}}));
    }
}
