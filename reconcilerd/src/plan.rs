//! The deciding half of a reconcile pass: from the desired deployment and what the loop
//! observed (what it placed, what the runtimes host that it did not want, loaded modules,
//! cached hashes, downloads in flight, which runtimes answered), the typed steps that make the
//! device match it. Pure: no bus, no file, no clock. `reconcile.rs` executes the steps, one at
//! a time, checking between steps whether a newer deployment preempts the pass.
//!
//! The order of a plan is the order the loop has always acted in: stop what is not wanted (or
//! wanted from another module definition), unload modules whose definition went away, cancel
//! downloads nothing wants, fetch what is missing, load what is cached, set the messaging
//! routes, and start what does not run yet. Instances whose definition did not change get no
//! step at all.

use std::collections::{BTreeMap, BTreeSet};

use evp_schemas::routing::Routing;
use evp_schemas::{ContainerOptions, Deployment, Module, ModuleImpl};

/// The two runtime daemons, and which module kinds each runs.
pub use evp_schemas::dbus::Runtime;

/// What an instance was started from: when any of it changes, the instance is restarted.
/// Messaging routes and the restart policy are left out on purpose: changing them must not
/// restart anything. An EVP1 `version` is in: a new one is how an EVP1 hub restarts an
/// instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The module's id in the deployment.
    pub module_id: String,
    /// Its definition.
    pub module: Module,
    /// What its container gets, for a docker instance: a change restarts it too.
    pub container: Option<ContainerOptions>,
    /// Its EVP1 `version`: an EVP1 hub bumps it to restart the instance.
    pub version: Option<serde_json::Number>,
}

impl Placement {
    /// The runtime that runs it.
    pub fn runtime(&self) -> Option<Runtime> {
        self.module.module_impl.runtime()
    }
}

/// Where `instance` is placed by `deployment`, if it is there and its module is defined.
pub fn placement(deployment: &Deployment, instance: &str) -> Option<Placement> {
    let spec = deployment.instance_specs.get(instance)?;
    let module = deployment.modules.get(&spec.module_id)?;
    Some(Placement {
        module_id: spec.module_id.clone(),
        module: module.clone(),
        container: spec.container.clone(),
        version: spec.version.clone(),
    })
}

/// The hash a module is cached under, when it is fetched into the cache at all (not a docker
/// image reference, which the engine pulls).
pub fn cached_hash(module: &Module) -> Option<String> {
    match (module.module_impl, &module.download_url, &module.hash) {
        (ModuleImpl::Docker, ..) if !module.is_docker_archive() => None,
        (_, Some(_), Some(h)) => Some(h.to_ascii_lowercase()),
        _ => None,
    }
}

/// What the loop knows of the device when it plans a pass.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The instances the loop placed (or adopted), with what they were started from.
    pub placed: &'a BTreeMap<String, Placement>,
    /// Instances a runtime hosts that the deployment does not want, or wants from another
    /// module.
    pub foreign: &'a [(Runtime, String)],
    /// Modules loaded into their runtime, with the definition they were loaded from.
    pub loaded: &'a BTreeMap<String, Module>,
    /// Hashes whose verified file is in the module cache.
    pub cached: &'a BTreeSet<String>,
    /// Hashes a download task is fetching (or waiting to retry, or gave up on), with the URL
    /// it fetches from.
    pub downloading: &'a BTreeMap<String, String>,
    /// Runtimes whose instances were read since they last appeared on the bus; nothing is
    /// loaded on or started on another.
    pub synced: &'a BTreeSet<Runtime>,
}

/// One thing a pass does. The executor runs them in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The SDK exit protocol, then the runtime's stop; with `purge`, the instance left the
    /// deployment and its directory goes too. `runtime` is `None` when nothing can reach it.
    Stop {
        /// The runtime hosting it.
        runtime: Option<Runtime>,
        /// The instance.
        instance: String,
        /// Its directory is removed after the stop.
        purge: bool,
    },
    /// A module whose definition left the deployment or changed.
    Unload {
        /// The runtime it is loaded in.
        runtime: Option<Runtime>,
        /// The module.
        module_id: String,
    },
    /// A download nothing wants any more; what it received stays, to resume.
    CancelDownload {
        /// The module's hash.
        hash: String,
    },
    /// A download task for a module the cache does not have (runs in the background).
    Fetch {
        /// The module's hash.
        hash: String,
        /// Where from.
        url: String,
    },
    /// `Runtime1.LoadModule`.
    Load {
        /// The module's runtime.
        runtime: Runtime,
        /// The module.
        module_id: String,
        /// Its definition, remembered as loaded once the runtime took it.
        module: Module,
        /// Where the runtime takes it from.
        source: ModuleSource,
        /// Its hash (lower case for cached modules), empty where the manifest gives none.
        hash: String,
    },
    /// sdk-broker's messaging routes, before any instance starts sending.
    SetRouting {
        /// The `SetRouting` document.
        routing: String,
    },
    /// Opens the instance's SDK socket and starts it on it. Skipped by the executor when the
    /// load of its module failed in the same pass.
    Start {
        /// The instance.
        instance: String,
        /// What it is started from.
        placement: Placement,
    },
}

/// Where a runtime loads a module from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// The verified file of this hash in the module cache (the executor knows its path).
    Cached,
    /// As the manifest gives it: a docker image reference.
    Image(String),
}

/// The steps of a pass, and what is wrong with modules that no step can fix.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// In order.
    pub steps: Vec<Step>,
    /// Modules that cannot be run here, with the reason the status shows.
    pub module_errors: BTreeMap<String, String>,
}

/// The steps that take the device from `observed` to `desired`.
pub fn plan(desired: &Deployment, observed: Observed<'_>) -> Plan {
    let mut steps = Vec::new();
    let mut module_errors = BTreeMap::new();

    // Stops: foreign instances, then placed ones that are not wanted, or wanted from
    // another definition.
    for (rt, name) in observed.foreign.iter().rev() {
        steps.push(Step::Stop {
            runtime: Some(*rt),
            instance: name.clone(),
            purge: !desired.instance_specs.contains_key(name),
        });
    }
    let mut kept = BTreeSet::new();
    for (name, was) in observed.placed {
        let want = placement(desired, name);
        if want.as_ref() == Some(was) {
            kept.insert(name.as_str());
            continue;
        }
        steps.push(Step::Stop {
            runtime: was.runtime(),
            instance: name.clone(),
            purge: want.is_none(),
        });
    }

    // Unloads: the runtime keeps a module until told; a changed definition is loaded again.
    for (id, module) in observed.loaded {
        if desired.modules.get(id) != Some(module) {
            steps.push(Step::Unload {
                runtime: module.module_impl.runtime(),
                module_id: id.clone(),
            });
        }
    }

    // Downloads nothing wants any more; the others carry on untouched.
    let wanted: BTreeSet<String> = desired.modules.values().filter_map(cached_hash).collect();
    for hash in observed.downloading.keys() {
        if !wanted.contains(hash) {
            steps.push(Step::CancelDownload { hash: hash.clone() });
        }
    }

    // Fetches and loads.
    let mut ready = BTreeSet::new();
    // By hash: two module ids of one content download once.
    let mut fetches: BTreeMap<String, String> = BTreeMap::new();
    let mut loads = Vec::new();
    for (id, module) in &desired.modules {
        if observed.loaded.get(id) == Some(module) {
            ready.insert(id.as_str());
            continue;
        }
        let Some(rt) = module.module_impl.runtime() else {
            module_errors.insert(
                id.clone(),
                format!(
                    "{} modules are not supported on this device",
                    module.module_impl
                ),
            );
            continue;
        };
        let (source, hash) = match (&module.download_url, module.module_impl) {
            (None, _) => {
                module_errors.insert(
                    id.clone(),
                    format!("module {id} has no downloadUrl; embedded modules are not supported"),
                );
                continue;
            }
            (Some(url), ModuleImpl::Docker) if !module.is_docker_archive() => (
                ModuleSource::Image(url.clone()),
                module.hash.clone().unwrap_or_default(),
            ),
            (Some(url), _) => {
                let hash = module.hash.clone().unwrap_or_default().to_ascii_lowercase();
                if !observed.cached.contains(&hash) {
                    // The first module id's URL, so two ids of one hash never take turns.
                    fetches.entry(hash).or_insert_with(|| url.clone());
                    continue;
                }
                (ModuleSource::Cached, hash)
            }
        };
        if !observed.synced.contains(&rt) {
            continue;
        }
        ready.insert(id.as_str());
        loads.push(Step::Load {
            runtime: rt,
            module_id: id.clone(),
            module: module.clone(),
            source,
            hash,
        });
    }
    // A task from another URL is replaced: the hub may have corrected it.
    steps.extend(
        fetches
            .into_iter()
            .filter(|(hash, url)| observed.downloading.get(hash) != Some(url))
            .map(|(hash, url)| Step::Fetch { hash, url }),
    );
    steps.extend(loads);

    steps.push(Step::SetRouting {
        routing: Routing::from_deployment(desired).to_json(),
    });

    // Starts: what the deployment wants and does not run after the stops above.
    for name in desired.instance_specs.keys() {
        if kept.contains(name.as_str()) {
            continue;
        }
        let Some(want) = placement(desired, name) else {
            continue;
        };
        if !ready.contains(want.module_id.as_str()) {
            continue;
        }
        if !want
            .runtime()
            .is_some_and(|rt| observed.synced.contains(&rt))
        {
            continue;
        }
        steps.push(Step::Start {
            instance: name.clone(),
            placement: want,
        });
    }

    Plan {
        steps,
        module_errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A deployment from compact JSON: `modules` maps an id to `"kind hash"` (a hash of `-`
    /// means none; every module has a downloadUrl unless the kind ends in `!`),
    /// `instances` maps a name to its module id.
    fn deployment(modules: &[(&str, &str)], instances: &[(&str, &str)]) -> Deployment {
        let mut m = serde_json::Map::new();
        for (id, spec) in modules {
            let (kind, hash) = spec.split_once(' ').unwrap_or((spec, "-"));
            let (kind, embedded) = match kind.strip_suffix('!') {
                Some(k) => (k, true),
                None => (kind, false),
            };
            let mut module = json!({ "moduleImpl": kind, "entryPoint": "main" });
            if !embedded && kind == "docker" && hash == "-" {
                module["downloadUrl"] = json!(format!("registry.local/{id}:1"));
            } else if !embedded {
                module["downloadUrl"] = json!(format!("http://hub/{id}"));
            }
            if hash != "-" {
                module["hash"] = json!(hash);
            }
            m.insert((*id).to_owned(), module);
        }
        let mut specs = serde_json::Map::new();
        for (name, module) in instances {
            specs.insert((*name).to_owned(), json!({ "moduleId": module }));
        }
        serde_json::from_value(json!({
            "deploymentId": "d",
            "modules": m,
            "instanceSpecs": specs,
        }))
        .expect("test deployment")
    }

    /// What the loop observed, built from a previous deployment that ran to its end: its
    /// instances placed, its modules loaded and cached.
    struct World {
        placed: BTreeMap<String, Placement>,
        foreign: Vec<(Runtime, String)>,
        loaded: BTreeMap<String, Module>,
        cached: BTreeSet<String>,
        downloading: BTreeMap<String, String>,
        synced: BTreeSet<Runtime>,
    }

    impl World {
        fn empty() -> World {
            World {
                placed: BTreeMap::new(),
                foreign: Vec::new(),
                loaded: BTreeMap::new(),
                cached: BTreeSet::new(),
                downloading: BTreeMap::new(),
                synced: Runtime::ALL.into_iter().collect(),
            }
        }

        fn running(d: &Deployment) -> World {
            let mut w = World::empty();
            for name in d.instance_specs.keys() {
                if let Some(p) = placement(d, name) {
                    w.placed.insert(name.clone(), p);
                }
            }
            w.loaded = d.modules.clone();
            w.cached = d.modules.values().filter_map(cached_hash).collect();
            w
        }

        fn observed(&self) -> Observed<'_> {
            Observed {
                placed: &self.placed,
                foreign: &self.foreign,
                loaded: &self.loaded,
                cached: &self.cached,
                downloading: &self.downloading,
                synced: &self.synced,
            }
        }
    }

    /// One line per step, routing left out (every plan sets it), then the module errors.
    fn render(plan: &Plan) -> String {
        let mut lines: Vec<String> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Stop {
                    runtime,
                    instance,
                    purge,
                } => Some(format!(
                    "stop {instance}{}{}",
                    if *purge { " purge" } else { "" },
                    if runtime.is_none() {
                        " unreachable"
                    } else {
                        ""
                    }
                )),
                Step::Unload { module_id, .. } => Some(format!("unload {module_id}")),
                Step::CancelDownload { hash } => Some(format!("cancel {hash}")),
                Step::Fetch { hash, .. } => Some(format!("fetch {hash}")),
                Step::Load {
                    module_id,
                    source: ModuleSource::Cached,
                    hash,
                    ..
                } => Some(format!("load {module_id} cache:{hash}")),
                Step::Load {
                    module_id,
                    source: ModuleSource::Image(image),
                    ..
                } => Some(format!("load {module_id} image:{image}")),
                Step::SetRouting { .. } => None,
                Step::Start {
                    instance,
                    placement,
                } => Some(format!("start {instance} {}", placement.module_id)),
            })
            .collect();
        for (id, e) in &plan.module_errors {
            lines.push(format!("error {id}: {e}"));
        }
        lines.join("\n")
    }

    fn check(desired: &Deployment, world: &World, expect: &str) {
        let plan = plan(desired, world.observed());
        assert!(
            plan.steps
                .iter()
                .any(|s| matches!(s, Step::SetRouting { .. })),
            "every plan sets the routes"
        );
        let got = render(&plan);
        assert_eq!(got, expect.trim(), "\n--- got ---\n{got}\n");
    }

    #[test]
    fn first_deployment_fetches_what_is_not_cached() {
        let d = deployment(&[("m", "spawn aa")], &[("a", "m")]);
        check(&d, &World::empty(), "fetch aa");
    }

    #[test]
    fn cached_module_is_loaded_and_its_instances_started() {
        let d = deployment(&[("m", "spawn aa")], &[("a", "m"), ("b", "m")]);
        let mut w = World::empty();
        w.cached.insert("aa".into());
        check(&d, &w, "load m cache:aa\nstart a m\nstart b m");
    }

    #[test]
    fn unchanged_deployment_touches_nothing() {
        let d = deployment(&[("m", "spawn aa")], &[("a", "m"), ("b", "m")]);
        check(&d, &World::running(&d), "");
    }

    #[test]
    fn redeploy_with_one_module_changed_stops_and_starts_only_its_instance() {
        let old = deployment(
            &[("m", "spawn aa"), ("n", "spawn bb")],
            &[("a", "m"), ("b", "n")],
        );
        let new = deployment(
            &[("m", "spawn aa"), ("n", "spawn cc")],
            &[("a", "m"), ("b", "n")],
        );
        let mut w = World::running(&old);
        w.cached.insert("cc".into());
        check(&new, &w, "stop b\nunload n\nload n cache:cc\nstart b n");
    }

    #[test]
    fn a_new_evp1_version_restarts_only_its_instance() {
        let old = deployment(&[("m", "spawn aa")], &[("a", "m"), ("b", "m")]);
        let mut new = old.clone();
        if let Some(spec) = new.instance_specs.get_mut("a") {
            spec.version = Some(2.into());
        }
        check(&new, &World::running(&old), "stop a\nstart a m");
    }

    #[test]
    fn changed_module_not_cached_yet_is_fetched_and_its_instance_waits() {
        let old = deployment(&[("m", "spawn aa")], &[("a", "m")]);
        let new = deployment(&[("m", "spawn cc")], &[("a", "m")]);
        check(&new, &World::running(&old), "stop a\nunload m\nfetch cc");
    }

    #[test]
    fn instance_moved_to_another_module_is_restarted_but_keeps_its_directory() {
        let old = deployment(&[("m", "spawn aa"), ("n", "spawn bb")], &[("a", "m")]);
        let new = deployment(&[("m", "spawn aa"), ("n", "spawn bb")], &[("a", "n")]);
        check(&new, &World::running(&old), "stop a\nstart a n");
    }

    #[test]
    fn module_shared_by_two_instances_is_loaded_once_and_kept_while_one_stays() {
        let old = deployment(&[("m", "spawn aa")], &[("a", "m"), ("b", "m")]);
        let new = deployment(&[("m", "spawn aa")], &[("a", "m")]);
        check(&new, &World::running(&old), "stop b purge");
    }

    #[test]
    fn download_in_flight_and_no_longer_wanted_is_cancelled() {
        let new = deployment(&[("n", "spawn bb")], &[("b", "n")]);
        let mut w = World::empty();
        w.downloading.insert("aa".into(), "http://hub/m".into());
        check(&new, &w, "cancel aa\nfetch bb");
    }

    #[test]
    fn download_in_flight_and_still_wanted_carries_on() {
        let d = deployment(&[("m", "spawn aa")], &[("a", "m")]);
        let mut w = World::empty();
        w.downloading.insert("aa".into(), "http://hub/m".into());
        check(&d, &w, "");
    }

    #[test]
    fn download_from_another_url_is_fetched_again_from_the_wanted_one() {
        let d = deployment(&[("m", "spawn aa")], &[("a", "m")]);
        let mut w = World::empty();
        w.downloading
            .insert("aa".into(), "file:///etc/shadow".into());
        check(&d, &w, "fetch aa");
        // Two module ids of one hash: the first id's URL, and no fetch while it is fetched.
        let two = deployment(
            &[("m", "spawn aa"), ("n", "spawn aa")],
            &[("a", "m"), ("b", "n")],
        );
        w.downloading.insert("aa".into(), "http://hub/m".into());
        check(&two, &w, "");
    }

    #[test]
    fn two_modules_of_one_hash_download_once() {
        let d = deployment(
            &[("m", "spawn aa"), ("n", "spawn AA")],
            &[("a", "m"), ("b", "n")],
        );
        check(&d, &World::empty(), "fetch aa");
    }

    #[test]
    fn adoption_after_a_restart_keeps_hosted_instances_and_stops_foreign_ones() {
        // reconcilerd restarted: the runtime hosts `a` (adopted into `placed`) and `x`, which
        // the deployment does not want (in `foreign`); nothing is loaded in this process yet.
        let d = deployment(&[("m", "spawn aa")], &[("a", "m"), ("b", "m")]);
        let mut w = World::running(&d);
        w.placed.remove("b");
        w.loaded.clear();
        w.foreign.push((Runtime::Container, "x".into()));
        check(&d, &w, "stop x purge\nload m cache:aa\nstart b m");
    }

    #[test]
    fn empty_deployment_stops_and_purges_everything() {
        let old = deployment(&[("m", "spawn aa")], &[("a", "m"), ("b", "m")]);
        let new = deployment(&[], &[]);
        check(
            &new,
            &World::running(&old),
            "stop a purge\nstop b purge\nunload m",
        );
    }

    #[test]
    fn instance_whose_module_is_missing_is_not_started() {
        let d = deployment(&[("m", "spawn aa")], &[("a", "m"), ("b", "gone")]);
        let mut w = World::empty();
        w.cached.insert("aa".into());
        check(&d, &w, "load m cache:aa\nstart a m");
    }

    #[test]
    fn modules_this_device_cannot_run_are_errors_not_steps() {
        let d = deployment(
            &[("m", "dlfcn aa"), ("e", "spawn! bb")],
            &[("a", "m"), ("b", "e")],
        );
        check(
            &d,
            &World::empty(),
            "error e: module e has no downloadUrl; embedded modules are not supported\n\
             error m: dlfcn modules are not supported on this device",
        );
    }

    #[test]
    fn nothing_is_loaded_on_a_runtime_that_has_not_answered() {
        let d = deployment(
            &[("m", "spawn aa"), ("w", "wasm bb")],
            &[("a", "m"), ("b", "w")],
        );
        let mut w = World::empty();
        w.cached.extend(["aa".to_owned(), "bb".to_owned()]);
        w.synced.remove(&Runtime::Wasm);
        check(&d, &w, "load m cache:aa\nstart a m");
    }

    #[test]
    fn docker_modules_are_loaded_from_their_image_without_a_download() {
        let d = deployment(&[("m", "docker -")], &[("a", "m")]);
        check(
            &d,
            &World::empty(),
            "load m image:registry.local/m:1\nstart a m",
        );
    }

    #[test]
    fn docker_archives_are_downloaded_and_loaded_from_the_cache() {
        let d = deployment(&[("m", "docker aa")], &[("a", "m")]);
        check(&d, &World::empty(), "fetch aa");
        let mut w = World::empty();
        w.cached.insert("aa".to_owned());
        check(&d, &w, "load m cache:aa\nstart a m");
    }
}
