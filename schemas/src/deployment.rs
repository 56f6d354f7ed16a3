//! The canonical desired deployment: what hubd hands to reconcilerd, whatever the hub dialect.
//!
//! It crosses D-Bus as JSON (`Reconciler1.ApplyDeployment`). Field names follow EVP2's manifest,
//! but this is our own form: the hub codecs translate into it and every rule that makes a
//! manifest invalid lives in [`Deployment::validate`], so both ends of the bus agree.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest instance name accepted, in bytes. An instance name becomes a file name and part of
/// its SDK socket path, which must fit `sockaddr_un` (108 bytes) under `/run/evp/sdk/`.
pub const MAX_INSTANCE_NAME_LEN: usize = 80;

/// Most entries of each of a manifest's maps (instances, modules, publish and subscribe
/// topics). A gateway runs tens of instances; runtimed-wasm runs at most 1,000 (`[wasm]
/// max_instances`) and the status report of 1,000 instances already needs shortening to fit one
/// MQTT message, so a larger manifest is refused whole rather than half started.
pub const MAX_MANIFEST_ENTRIES: usize = 1_000;

/// A whole desired deployment: the module instances that should run and the modules they use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Deployment {
    /// The hub's id for this deployment, echoed in the status; absent when the hub sent none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    /// Instance name → what it runs.
    pub instance_specs: BTreeMap<String, InstanceSpec>,
    /// Module id → where to get it and how to run it.
    pub modules: BTreeMap<String, Module>,
    /// Publish topic name → topic, for messages between instances.
    #[serde(default)]
    pub publish_topics: BTreeMap<String, Topic>,
    /// Subscribe topic name → topic.
    #[serde(default)]
    pub subscribe_topics: BTreeMap<String, Topic>,
}

/// One module: the code that instances run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Module {
    /// Which runtime runs it.
    pub module_impl: ModuleImpl,
    /// The entry point; wasm, spawn, python and docker ignore it but EVP requires it.
    pub entry_point: String,
    /// `http://`, `https://` or `file://` URL of the module file, or a docker image reference.
    /// Absent for embedded (backdoor) modules, which are never downloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_url: Option<String>,
    /// Lower-case hex SHA-256 of the module file; required with a download URL (not for docker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// URL schemes a module file is downloaded from.
pub const DOWNLOAD_SCHEMES: [&str; 3] = ["http://", "https://", "file://"];

impl Module {
    /// Whether this is a docker module shipped as a `docker save` archive (beyond EVP): its
    /// `downloadUrl` is an http(s):// or file:// URL, downloaded and verified against `hash`
    /// like any module file, then loaded into the engine. A docker module's `downloadUrl` is
    /// otherwise an image reference, which the engine pulls (a reference has no scheme).
    pub fn is_docker_archive(&self) -> bool {
        self.module_impl == ModuleImpl::Docker
            && self
                .download_url
                .as_deref()
                .is_some_and(|url| DOWNLOAD_SCHEMES.iter().any(|s| url.starts_with(s)))
    }
}

/// The kinds of module EVP knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleImpl {
    /// A WASM module run by runtimed-wasm.
    Wasm,
    /// A native executable run as a process by runtimed-container.
    Spawn,
    /// A zip holding `__main__.py`, run with python3 by runtimed-container.
    Python,
    /// A container image run through the Docker engine by runtimed-container.
    Docker,
    /// A shared object loaded into the agent (NuttX only); accepted in manifests, never run here.
    Dlfcn,
}

impl ModuleImpl {
    /// The name used on the wire and in `Runtime1.Kinds`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ModuleImpl::Wasm => "wasm",
            ModuleImpl::Spawn => "spawn",
            ModuleImpl::Python => "python",
            ModuleImpl::Docker => "docker",
            ModuleImpl::Dlfcn => "dlfcn",
        }
    }

    /// Parses the wire name; `None` for anything EVP does not know.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "wasm" => ModuleImpl::Wasm,
            "spawn" => ModuleImpl::Spawn,
            "python" => ModuleImpl::Python,
            "docker" => ModuleImpl::Docker,
            "dlfcn" => ModuleImpl::Dlfcn,
            _ => return None,
        })
    }
}

impl fmt::Display for ModuleImpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One module instance: a running copy of a module with its messaging aliases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceSpec {
    /// The module it runs; a key of [`Deployment::modules`].
    pub module_id: String,
    /// Alias used by `EVP_sendMessage` → publish topic name.
    #[serde(default)]
    pub publish: BTreeMap<String, String>,
    /// Alias delivered with received messages → subscribe topic name.
    #[serde(default)]
    pub subscribe: BTreeMap<String, String>,
    /// What to do when the instance exits; the agent's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,
    /// Beyond EVP, for docker modules only: what the container may have beyond the locked-down
    /// default (no network, no capability, no limit but the device's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerOptions>,
    /// EVP1's per-instance `version`: a hub bumps it to have the instance started again, so a
    /// change restarts the instance. EVP2 has none (`None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<serde_json::Number>,
}

/// What a docker instance's container gets beyond the default (`instanceSpecs.<name>.container`
/// in the manifest, and the `StartInstance` options `network`, `memory_bytes`, `nano_cpus`,
/// `cap_add`). Absent fields keep the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerOptions {
    /// The engine network to join: `bridge`, `host` or a network's name; `none` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Memory limit in bytes (the engine's `Memory`); at least [`MIN_CONTAINER_MEMORY`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU limit in billionths of a CPU (the engine's `NanoCpus`: 500000000 is half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nano_cpus: Option<u64>,
    /// Capabilities to keep (`NET_BIND_SERVICE`); every other one is dropped. Never `ALL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
}

/// The engine's own lower bound for a memory limit (Docker refuses less than 6 MiB).
pub const MIN_CONTAINER_MEMORY: u64 = 6 * 1024 * 1024;
/// Most capabilities one instance may ask for: Linux has about 41, so more is a mistake.
const MAX_CAP_ADD: usize = 64;

impl ContainerOptions {
    /// Why these options cannot be applied, naming the field under `at`.
    pub fn validate(&self, at: &str) -> Result<(), ValidationError> {
        let field = |f: &str| format!("{at}.{f}");
        if let Some(net) = &self.network {
            // A name only: `container:<id>` would join another container's namespaces.
            let name_ok = net
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
                && net
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !name_ok {
                return Err(ValidationError::new(
                    field("network"),
                    format!("{net:?} is not a network name (none, bridge, host or a name)"),
                ));
            }
        }
        if self.memory_bytes.is_some_and(|m| m < MIN_CONTAINER_MEMORY) {
            return Err(ValidationError::new(
                field("memoryBytes"),
                format!("must be at least {MIN_CONTAINER_MEMORY} (6 MiB)"),
            ));
        }
        if self.nano_cpus == Some(0) {
            return Err(ValidationError::new(
                field("nanoCpus"),
                "must be positive (leave it out for no limit)",
            ));
        }
        if self.cap_add.len() > MAX_CAP_ADD {
            return Err(ValidationError::new(
                field("capAdd"),
                format!("names more than {MAX_CAP_ADD} capabilities"),
            ));
        }
        for cap in &self.cap_add {
            let bare = cap.strip_prefix("CAP_").unwrap_or(cap);
            let ok = !bare.is_empty() && bare.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
            if !ok || bare == "ALL" {
                return Err(ValidationError::new(
                    field("capAdd"),
                    format!("{cap:?} is not a capability name (ALL is refused)"),
                ));
            }
        }
        Ok(())
    }
}

/// When an exited instance is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whenever it exits, even with status 0.
    Always,
    /// Restart when it crashes (non-zero exit, signal, trap).
    OnFailure,
    /// Never restart.
    Never,
}

/// A messaging topic of the deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topic {
    /// Only `local` (between instances on this device) is routed.
    #[serde(rename = "type")]
    pub kind: String,
    /// The topic string that joins publishers and subscribers.
    pub topic: String,
}

/// Longest JSON path a [`ValidationError`] keeps: room for a few ids of a typical length.
pub const MAX_ERROR_PATH: usize = 256;
/// Longest message a [`ValidationError`] keeps: a sentence quoting a value of a few hundred
/// bytes, far below what one MQTT report can carry.
pub const MAX_ERROR_MESSAGE: usize = 512;

/// Why a deployment was refused, with the JSON path of the offending field
/// (`deployment.modules.cam.hash`), so an operator can find it in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ValidationError {
    /// Dotted path of the bad field, starting at `deployment`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    /// A validation error at `path`. Both quote the hub's names and values, so a NUL in them is
    /// written `\\0` (the error travels over D-Bus, which cannot carry one) and both are bounded
    /// ([`MAX_ERROR_PATH`], [`MAX_ERROR_MESSAGE`]), since those may be of any size.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        use crate::bus_string::escape_nul;
        use crate::text::shorten_owned;
        let (path, message) = (path.into(), message.into());
        ValidationError {
            path: shorten_owned(escape_nul(&path).into_owned(), MAX_ERROR_PATH),
            message: shorten_owned(escape_nul(&message).into_owned(), MAX_ERROR_MESSAGE),
        }
    }
}

/// Checks that `name` can be used as an instance name: it becomes a directory name and part of
/// a socket path, and `$`-names are reserved for the agent and system apps.
pub fn validate_instance_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("instance name is empty".into());
    }
    if name.starts_with('$') {
        return Err("instance names starting with '$' are reserved".into());
    }
    if name == "." || name == ".." {
        return Err("instance name cannot be '.' or '..'".into());
    }
    if name.len() > MAX_INSTANCE_NAME_LEN {
        return Err(format!(
            "instance name is {} bytes long; the limit is {MAX_INSTANCE_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| *c == '/' || c.is_control()) {
        return Err(format!(
            "instance name contains the forbidden character {c:?}"
        ));
    }
    Ok(())
}

/// Checks the form of a SHA-256 given in hex: EVP refuses the whole manifest for odd length or
/// non-hex digits, while a wrong (even) length only fails the module later as a hash mismatch.
pub fn validate_hash_hex(hash: &str) -> Result<(), String> {
    if !hash.len().is_multiple_of(2) {
        return Err(format!(
            "hash has an odd number of hex digits ({})",
            hash.len()
        ));
    }
    if let Some(c) = hash.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("hash contains the non-hex character {c:?}"));
    }
    Ok(())
}

impl Deployment {
    /// Parses the canonical JSON form and validates it.
    pub fn from_json(text: &str) -> Result<Deployment, ValidationError> {
        let deployment: Deployment = serde_json::from_str(text)
            .map_err(|e| ValidationError::new("deployment", e.to_string()))?;
        deployment.validate()?;
        Ok(deployment)
    }

    /// The canonical JSON form.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Every rule that makes a manifest invalid as a whole. A module or instance that cannot be
    /// run for other reasons (a runtime missing, a download failing) is not invalid: it gets an
    /// error status and the rest of the deployment goes on.
    pub fn validate(&self) -> Result<(), ValidationError> {
        for (field, len) in [
            ("instanceSpecs", self.instance_specs.len()),
            ("modules", self.modules.len()),
            ("publishTopics", self.publish_topics.len()),
            ("subscribeTopics", self.subscribe_topics.len()),
        ] {
            if len > MAX_MANIFEST_ENTRIES {
                return Err(ValidationError::new(
                    format!("deployment.{field}"),
                    format!("has {len} entries; the limit is {MAX_MANIFEST_ENTRIES}"),
                ));
            }
        }
        self.validate_strings()?;
        for (id, module) in &self.modules {
            let at = |field: &str| format!("deployment.modules.{id}.{field}");
            if id.is_empty() {
                return Err(ValidationError::new(
                    "deployment.modules",
                    "module id is empty",
                ));
            }
            if let Some(url) = &module.download_url {
                if url.is_empty() {
                    return Err(ValidationError::new(
                        at("downloadUrl"),
                        "is empty; leave it out for a module without download",
                    ));
                }
                if module.module_impl != ModuleImpl::Docker || module.is_docker_archive() {
                    let Some(hash) = &module.hash else {
                        let why = if module.is_docker_archive() {
                            "is required when a docker module's downloadUrl is an archive URL \
                             (an image reference has no scheme)"
                        } else {
                            "is required when downloadUrl is set"
                        };
                        return Err(ValidationError::new(at("hash"), why));
                    };
                    validate_hash_hex(hash).map_err(|m| ValidationError::new(at("hash"), m))?;
                    let scheme_ok = DOWNLOAD_SCHEMES.iter().any(|s| url.starts_with(s));
                    if !scheme_ok {
                        return Err(ValidationError::new(
                            at("downloadUrl"),
                            format!("{url:?} is not an http://, https:// or file:// URL"),
                        ));
                    }
                }
            }
            if let Some(hash) = &module.hash {
                validate_hash_hex(hash).map_err(|m| ValidationError::new(at("hash"), m))?;
            }
        }
        for (name, spec) in &self.instance_specs {
            validate_instance_name(name)
                .map_err(|m| ValidationError::new(format!("deployment.instanceSpecs.{name}"), m))?;
            let at = |field: &str| format!("deployment.instanceSpecs.{name}.{field}");
            let Some(module) = self.modules.get(&spec.module_id) else {
                return Err(ValidationError::new(
                    at("moduleId"),
                    format!(
                        "refers to module {:?}, which is not in modules",
                        spec.module_id
                    ),
                ));
            };
            if module.entry_point.is_empty() {
                return Err(ValidationError::new(
                    format!("deployment.modules.{}.entryPoint", spec.module_id),
                    format!("is empty, but instance {name:?} uses this module"),
                ));
            }
            if let Some(container) = &spec.container {
                if module.module_impl != ModuleImpl::Docker {
                    return Err(ValidationError::new(
                        at("container"),
                        format!(
                            "applies to docker modules only; module {:?} is {}",
                            spec.module_id, module.module_impl
                        ),
                    ));
                }
                container.validate(&at("container"))?;
            }
        }
        for (kind, topics) in [
            ("publishTopics", &self.publish_topics),
            ("subscribeTopics", &self.subscribe_topics),
        ] {
            for (name, topic) in topics {
                if topic.topic.is_empty() {
                    return Err(ValidationError::new(
                        format!("deployment.{kind}.{name}.topic"),
                        "is empty",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Deployment {
    /// Every string of the manifest can cross D-Bus: module ids, instance names and entry
    /// points become arguments of the runtimes' and sdk-broker's methods, and dbus-daemon
    /// disconnects a daemon that sends a NUL.
    fn validate_strings(&self) -> Result<(), ValidationError> {
        let check = |path: String, what: &str, value: &str| {
            crate::bus_string::check_bus_string(what, value)
                .map_err(|e| ValidationError::new(path, e.to_string()))
        };
        if let Some(id) = &self.deployment_id {
            check("deployment.deploymentId".into(), "the deployment id", id)?;
        }
        for (id, module) in &self.modules {
            check(
                "deployment.modules".into(),
                &format!("module id {id:?}"),
                id,
            )?;
            let at = |field: &str| format!("deployment.modules.{id}.{field}");
            check(at("entryPoint"), "entryPoint", &module.entry_point)?;
            if let Some(url) = &module.download_url {
                check(at("downloadUrl"), "downloadUrl", url)?;
            }
            if let Some(hash) = &module.hash {
                check(at("hash"), "hash", hash)?;
            }
        }
        for (name, spec) in &self.instance_specs {
            let base = format!("deployment.instanceSpecs.{name}");
            check(
                "deployment.instanceSpecs".into(),
                &format!("instance name {name:?}"),
                name,
            )?;
            check(format!("{base}.moduleId"), "moduleId", &spec.module_id)?;
            for (kind, aliases) in [("publish", &spec.publish), ("subscribe", &spec.subscribe)] {
                for (alias, topic) in aliases {
                    check(format!("{base}.{kind}"), &format!("alias {alias:?}"), alias)?;
                    check(format!("{base}.{kind}.{alias}"), "topic name", topic)?;
                }
            }
        }
        for (kind, topics) in [
            ("publishTopics", &self.publish_topics),
            ("subscribeTopics", &self.subscribe_topics),
        ] {
            for (name, topic) in topics {
                check(
                    format!("deployment.{kind}"),
                    &format!("topic name {name:?}"),
                    name,
                )?;
                check(
                    format!("deployment.{kind}.{name}.type"),
                    "type",
                    &topic.kind,
                )?;
                check(
                    format!("deployment.{kind}.{name}.topic"),
                    "topic",
                    &topic.topic,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn_module() -> Module {
        Module {
            module_impl: ModuleImpl::Spawn,
            entry_point: "main".into(),
            download_url: Some("file:///tmp/m".into()),
            hash: Some("ab".repeat(32)),
        }
    }

    fn one_instance() -> Deployment {
        let mut d = Deployment::default();
        d.modules.insert("m".into(), spawn_module());
        d.instance_specs.insert(
            "i".into(),
            InstanceSpec {
                module_id: "m".into(),
                publish: Default::default(),
                subscribe: Default::default(),
                restart_policy: None,
                container: None,
                version: None,
            },
        );
        d
    }

    #[test]
    fn module_kind_words_round_trip() {
        fn check(kind: ModuleImpl, word: &str) {
            assert_eq!(kind.as_str(), word);
            assert_eq!(kind.to_string(), word);
            assert_eq!(ModuleImpl::parse(word), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), word);
        }
        check(ModuleImpl::Wasm, "wasm");
        check(ModuleImpl::Spawn, "spawn");
        check(ModuleImpl::Python, "python");
        check(ModuleImpl::Docker, "docker");
        check(ModuleImpl::Dlfcn, "dlfcn");
        for unknown in ["", "Spawn", "container", "native"] {
            assert_eq!(ModuleImpl::parse(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn canonical_json_round_trips() {
        let d = one_instance();
        assert_eq!(Deployment::from_json(&d.to_json()).unwrap(), d);
    }

    #[test]
    fn dangling_module_reference_names_the_field() {
        let mut d = one_instance();
        d.instance_specs.get_mut("i").unwrap().module_id = "nope".into();
        let e = d.validate().unwrap_err();
        assert_eq!(e.path, "deployment.instanceSpecs.i.moduleId");
    }

    #[test]
    fn a_huge_quoted_name_gives_a_bounded_message() {
        let mut d = one_instance();
        let long = "n".repeat(140_000);
        d.instance_specs.get_mut("i").unwrap().module_id = long.clone();
        let e = d.validate().unwrap_err();
        assert!(e.message.len() <= MAX_ERROR_MESSAGE, "{}", e.message.len());
        assert!(
            e.message.starts_with("refers to module \"nnn"),
            "{}",
            e.message
        );
        assert!(
            e.message.ends_with("\", which is not in modules"),
            "{}",
            e.message
        );
        let spec = d.instance_specs.remove("i").unwrap();
        d.instance_specs.insert(long, spec);
        let e = d.validate().unwrap_err();
        assert!(e.path.len() <= MAX_ERROR_PATH, "{}", e.path.len());
        assert!(
            e.path.starts_with("deployment.instanceSpecs.nnn"),
            "{}",
            e.path
        );
    }

    #[test]
    fn odd_hash_is_invalid_but_short_even_hash_is_not() {
        let mut d = one_instance();
        d.modules.get_mut("m").unwrap().hash = Some("abc".into());
        assert_eq!(d.validate().unwrap_err().path, "deployment.modules.m.hash");
        d.modules.get_mut("m").unwrap().hash = Some("abcd".into());
        assert!(d.validate().is_ok());
    }

    #[test]
    fn a_docker_module_is_an_image_reference_or_an_archive_with_its_hash() {
        fn check(url: &str, hash: Option<&str>, expect: Result<bool, &str>) {
            let mut d = one_instance();
            let m = d.modules.get_mut("m").unwrap();
            m.module_impl = ModuleImpl::Docker;
            m.download_url = Some(url.into());
            m.hash = hash.map(str::to_owned);
            let archive = m.is_docker_archive();
            let got = d.validate().map(|()| archive).map_err(|e| e.path);
            assert_eq!(got, expect.map_err(str::to_owned), "{url} {hash:?}");
        }
        let hash = "ab".repeat(32);
        check("ghcr.io/acme/cam:1.2", None, Ok(false));
        check("localhost:5000/cam@sha256:00", None, Ok(false));
        check("https://hub/cam.tar", Some(&hash), Ok(true));
        check("file:///media/usb/cam.tar", Some(&hash), Ok(true));
        check(
            "https://hub/cam.tar",
            None,
            Err("deployment.modules.m.hash"),
        );
    }

    #[test]
    fn container_options_are_checked_and_only_for_docker_instances() {
        fn check(kind: ModuleImpl, options: serde_json::Value, expect: Result<(), &str>) {
            let mut d = one_instance();
            if kind == ModuleImpl::Docker {
                let m = d.modules.get_mut("m").unwrap();
                m.module_impl = kind;
                m.download_url = Some("registry.local/m:1".into());
                m.hash = None;
            }
            let parsed = serde_json::from_value(options.clone()).unwrap();
            d.instance_specs.get_mut("i").unwrap().container = Some(parsed);
            let got = d.validate().map_err(|e| e.path);
            assert_eq!(got, expect.map_err(str::to_owned), "{kind} {options}");
        }
        use serde_json::json;
        let docker = ModuleImpl::Docker;
        let at = |f: &str| -> String { format!("deployment.instanceSpecs.i.container{f}") };
        check(docker, json!({}), Ok(()));
        check(
            docker,
            json!({"network": "bridge", "memoryBytes": 67108864, "nanoCpus": 500000000,
                   "capAdd": ["NET_BIND_SERVICE", "CAP_CHOWN"]}),
            Ok(()),
        );
        check(docker, json!({"network": "my-net_1.x"}), Ok(()));
        for (bad, field) in [
            (json!({"network": "container:db"}), ".network"),
            (json!({"network": ""}), ".network"),
            (json!({"memoryBytes": 1024}), ".memoryBytes"),
            (json!({"nanoCpus": 0}), ".nanoCpus"),
            (json!({"capAdd": ["ALL"]}), ".capAdd"),
            (json!({"capAdd": ["net_admin"]}), ".capAdd"),
        ] {
            let path = at(field);
            check(docker, bad, Err(&path));
        }
        let path = at("");
        check(ModuleImpl::Spawn, json!({}), Err(&path));
    }

    #[test]
    fn reserved_and_unsafe_instance_names_are_refused() {
        for bad in ["$agent", "..", "a/b", "", &"x".repeat(81)] {
            assert!(validate_instance_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_instance_name("sender-1").is_ok());
    }

    #[test]
    fn a_manifest_over_the_entry_bound_is_refused_naming_the_map() {
        let at_limit = |n: usize| {
            let mut d = one_instance();
            d.instance_specs = (0..n)
                .map(|i| (format!("i{i}"), d.instance_specs["i"].clone()))
                .collect();
            d
        };
        assert!(at_limit(MAX_MANIFEST_ENTRIES).validate().is_ok());
        let e = at_limit(10_000).validate().unwrap_err();
        assert_eq!(e.path, "deployment.instanceSpecs");
        assert_eq!(e.message, "has 10000 entries; the limit is 1000");
    }

    #[test]
    fn unknown_field_in_canonical_form_is_refused() {
        let e =
            Deployment::from_json(r#"{"instanceSpecs":{},"modules":{},"extra":1}"#).unwrap_err();
        assert!(e.message.contains("extra"), "{e}");
    }

    #[test]
    fn a_nul_in_any_string_is_refused_and_the_error_carries_none() {
        type Poison = fn(&mut Deployment);
        let cases: [(&str, Poison); 6] = [
            ("deployment.modules.m.entryPoint", |d| {
                d.modules.get_mut("m").unwrap().entry_point = "ma\0in".into()
            }),
            ("deployment.instanceSpecs.i.moduleId", |d| {
                d.instance_specs.get_mut("i").unwrap().module_id = "m\0".into()
            }),
            ("deployment.modules", |d| {
                let m = d.modules.remove("m").unwrap();
                d.modules.insert("m\0x".into(), m);
            }),
            ("deployment.instanceSpecs", |d| {
                let i = d.instance_specs.remove("i").unwrap();
                d.instance_specs.insert("i\0".into(), i);
            }),
            ("deployment.deploymentId", |d| {
                d.deployment_id = Some("\0".into())
            }),
            ("deployment.instanceSpecs.i.publish.out", |d| {
                d.instance_specs
                    .get_mut("i")
                    .unwrap()
                    .publish
                    .insert("out".into(), "t\0".into());
            }),
        ];
        for (path, poison) in cases {
            let mut d = one_instance();
            poison(&mut d);
            let e = d.validate().unwrap_err();
            assert_eq!(e.path, path, "{e}");
            assert!(e.message.contains("NUL"), "{e}");
            assert!(!e.to_string().contains('\0'), "{e:?}");
        }
    }
}
