//! The D-Bus contracts between the daemons: bus names, object paths, the `org.evp.Error.*`
//! errors and client proxies. The servers implement these interfaces in their own crates;
//! `schemas/dbus/*.xml` is what both must match, and a system test compares each running
//! daemon's introspection with it.

use zbus::proxy;

use crate::deployment::ModuleImpl;
use crate::instance::StartOptionsDict;

/// Bus name and object path of hubd.
pub const HUB_NAME: &str = "org.evp.Hub1";
/// Object path of hubd's interfaces.
pub const HUB_PATH: &str = "/org/evp/Hub1";
/// Bus name of hubd's telemetry connection: telemetry has a connection of its own (so a flood
/// never delays states, answers or calls on the main one), and sdk-broker sends its
/// `Telemetry` signals to this name only.
pub const HUB_TELEMETRY_NAME: &str = "org.evp.Hub1.Telemetry";
/// Bus name of reconcilerd.
pub const RECONCILER_NAME: &str = "org.evp.Reconciler1";
/// Object path of reconcilerd's interface.
pub const RECONCILER_PATH: &str = "/org/evp/Reconciler1";
/// Bus name of runtimed-wasm.
pub const RUNTIME_WASM_NAME: &str = "org.evp.Runtime1.Wasm";
/// Object path of runtimed-wasm's `org.evp.Runtime1`.
pub const RUNTIME_WASM_PATH: &str = "/org/evp/Runtime1/Wasm";
/// Bus name of runtimed-container.
pub const RUNTIME_CONTAINER_NAME: &str = "org.evp.Runtime1.Container";
/// Object path of runtimed-container's `org.evp.Runtime1`.
pub const RUNTIME_CONTAINER_PATH: &str = "/org/evp/Runtime1/Container";
/// Bus name of sdk-broker.
pub const SDK_BROKER_NAME: &str = "org.evp.SdkBroker1";
/// Object path of sdk-broker's interface.
pub const SDK_BROKER_PATH: &str = "/org/evp/SdkBroker1";

/// The interface names, as in the introspection XML.
pub mod interfaces {
    /// hubd's interface.
    pub const HUB: &str = "org.evp.Hub1";
    /// reconcilerd's interface.
    pub const RECONCILER: &str = "org.evp.Reconciler1";
    /// The interface both runtimes implement.
    pub const RUNTIME: &str = "org.evp.Runtime1";
    /// sdk-broker's interface.
    pub const SDK_BROKER: &str = "org.evp.SdkBroker1";
}

/// The errors every `org.evp.*` method may return, as `org.evp.Error.<Variant>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.evp.Error")]
pub enum EvpError {
    /// A D-Bus failure underneath the call.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// An argument is malformed (an unknown kind, a bad name).
    InvalidArgument(String),
    /// A deployment document was refused; the message names the field at fault.
    InvalidManifest(String),
    /// The named module or instance is not known to this daemon.
    NotFound(String),
    /// The object is in use (a module with running instances).
    Busy(String),
    /// The caller may not do this.
    Denied(String),
    /// A file or process operation failed on the device.
    Io(String),
    /// This daemon does not provide that capability in this build.
    NotSupported(String),
}

/// The error name of a failed call, when the peer returned one (`org.evp.Error.Busy`).
pub fn error_name(e: &zbus::Error) -> Option<&str> {
    match e {
        zbus::Error::MethodError(name, _, _) => Some(name.as_str()),
        _ => None,
    }
}

/// The human message of a failed call, without the D-Bus error name around it.
pub fn error_message(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(_, Some(msg), _) => msg.clone(),
        other => other.to_string(),
    }
}

/// The two runtime daemons, each serving `org.evp.Runtime1` under its own name for the module
/// kinds it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Runtime {
    /// runtimed-wasm.
    Wasm,
    /// runtimed-container.
    Container,
}

impl Runtime {
    /// Both runtimes.
    pub const ALL: [Runtime; 2] = [Runtime::Wasm, Runtime::Container];

    /// Its bus name.
    pub const fn name(self) -> &'static str {
        match self {
            Runtime::Wasm => RUNTIME_WASM_NAME,
            Runtime::Container => RUNTIME_CONTAINER_NAME,
        }
    }

    /// How an operator calls it (`evpctl instances`): the part of its bus name after
    /// `org.evp.Runtime1.`, lower case.
    pub const fn label(self) -> &'static str {
        match self {
            Runtime::Wasm => "wasm",
            Runtime::Container => "container",
        }
    }

    /// Its object path.
    pub const fn path(self) -> &'static str {
        match self {
            Runtime::Wasm => RUNTIME_WASM_PATH,
            Runtime::Container => RUNTIME_CONTAINER_PATH,
        }
    }
}

impl ModuleImpl {
    /// The runtime that runs this kind (its bus name is [`Runtime::name`]); `None` for kinds
    /// this agent cannot run.
    pub const fn runtime(self) -> Option<Runtime> {
        match self {
            ModuleImpl::Wasm => Some(Runtime::Wasm),
            ModuleImpl::Spawn | ModuleImpl::Python | ModuleImpl::Docker => Some(Runtime::Container),
            ModuleImpl::Dlfcn => None,
        }
    }
}

/// hubd: the device's connection to its hub.
#[proxy(
    interface = "org.evp.Hub1",
    default_service = "org.evp.Hub1",
    default_path = "/org/evp/Hub1"
)]
pub trait Hub1 {
    /// `connected`, `connecting` or `disconnected`; `provisioning` or `provisioning-refused`
    /// while a device without credentials registers itself.
    #[zbus(property)]
    fn connection(&self) -> zbus::Result<String>;
    /// `EVP2-TB` or `EVP1`.
    #[zbus(property)]
    fn protocol(&self) -> zbus::Result<String>;
    /// The device's permanent id.
    #[zbus(property)]
    fn device_id(&self) -> zbus::Result<String>;
    /// Bytes waiting to be sent to the hub.
    #[zbus(property)]
    fn queued_bytes(&self) -> zbus::Result<u64>;
    /// The EVP storage-token round trip: where `instance` may upload `remote_name` to its
    /// storage `storage_name` ("" for the default one): `(url, headers, expires_at_ms)`, the
    /// expiry 0 when the hub gave none.
    fn request_storage_token(
        &self,
        instance: &str,
        storage_name: &str,
        remote_name: &str,
    ) -> zbus::Result<(String, std::collections::HashMap<String, String>, i64)>;
    /// Registry domain → `X-Registry-Auth` value, for image pulls.
    fn registry_auth(&self) -> zbus::Result<std::collections::HashMap<String, String>>;
}

/// reconcilerd: the desired deployment and the device's status against it.
#[proxy(
    interface = "org.evp.Reconciler1",
    default_service = "org.evp.Reconciler1",
    default_path = "/org/evp/Reconciler1"
)]
pub trait Reconciler1 {
    /// Validates and persists a canonical deployment, then reconciles in the background.
    fn apply_deployment(&self, deployment_json: &str) -> zbus::Result<()>;
    /// Holds deployment changes until resumed.
    fn pause_deployment(&self) -> zbus::Result<()>;
    /// Resumes deployment changes.
    fn resume_deployment(&self) -> zbus::Result<()>;
    /// The canonical `DeploymentStatus` JSON.
    #[zbus(property)]
    fn deployment_status(&self) -> zbus::Result<String>;
    /// `applying`, `ok`, `error` or `paused`.
    #[zbus(property)]
    fn reconcile_status(&self) -> zbus::Result<String>;
}

/// A runtime (runtimed-wasm or runtimed-container); pick the service and path at build time.
#[proxy(interface = "org.evp.Runtime1")]
pub trait Runtime1 {
    /// Module kinds this runtime runs ([`ModuleImpl::as_str`]).
    #[zbus(property)]
    fn kinds(&self) -> zbus::Result<Vec<String>>;
    /// Verifies and prepares a module file (or image).
    fn load_module(
        &self,
        module_id: &str,
        kind: &str,
        path_or_image: &str,
        sha256: &str,
    ) -> zbus::Result<()>;
    /// Forgets a module; refused with `Busy` while an instance uses it.
    fn unload_module(&self, module_id: &str) -> zbus::Result<()>;
    /// Starts an instance of a loaded module; answers the started process's `(pid, uid)` (of
    /// the running one when it already runs), for [`SdkBroker1Proxy::bind_instance`].
    fn start_instance(
        &self,
        instance: &str,
        module_id: &str,
        options: StartOptionsDict,
    ) -> zbus::Result<(u32, u32)>;
    /// Stops an instance: asks it to exit, then forces it after `grace_ms`.
    fn stop_instance(&self, instance: &str, grace_ms: u32) -> zbus::Result<()>;
    /// Removes the instance's directory once it has left the deployment.
    fn purge_instance(&self, instance: &str) -> zbus::Result<()>;
    /// `(instance, module_id, status, failure_message)` for what the runtime hosts now.
    #[zbus(property)]
    fn instances(&self) -> zbus::Result<Vec<(String, String, String, String)>>;
    /// An instance changed state; `status` is an [`InstanceState`](crate::InstanceState) word.
    #[zbus(signal)]
    fn instance_changed(
        &self,
        instance: &str,
        status: &str,
        failure_message: &str,
    ) -> zbus::Result<()>;
}

/// sdk-broker: the per-instance SDK sockets.
#[proxy(
    interface = "org.evp.SdkBroker1",
    default_service = "org.evp.SdkBroker1",
    default_path = "/org/evp/SdkBroker1"
)]
pub trait SdkBroker1 {
    /// Creates the instance's socket before it starts.
    fn open_instance(&self, instance: &str) -> zbus::Result<String>;
    /// Serves the instance's socket only to process `pid` (or a descendant) running as `uid`,
    /// replacing an earlier binding; connections made before it are held until it comes.
    fn bind_instance(&self, instance: &str, pid: u32, uid: u32) -> zbus::Result<()>;
    /// Delivers the exit event, then removes the socket once the module let go, or after
    /// `grace_ms` (bounded by sdk-broker's own `exit_grace_ms`).
    fn close_instance(&self, instance: &str, grace_ms: u32) -> zbus::Result<()>;
    /// Publish aliases and subscriptions of every instance.
    fn set_routing(&self, routing_json: &str) -> zbus::Result<()>;
    /// A configuration value from the hub.
    fn deliver_configuration(&self, instance: &str, topic: &str, value: &[u8]) -> zbus::Result<()>;
    /// A direct command from the hub.
    fn call_method(
        &self,
        instance: &str,
        reqid: u64,
        method: &str,
        params: &str,
    ) -> zbus::Result<()>;
    /// The latest state of a topic.
    #[zbus(signal)]
    fn state_reported(&self, instance: &str, topic: &str, value: Vec<u8>) -> zbus::Result<()>;
    /// Batched telemetry entries `(instance, key, JSON value)`.
    #[zbus(signal)]
    fn telemetry(&self, entries: Vec<(String, String, String)>) -> zbus::Result<()>;
    /// A module's answer to a direct command.
    #[zbus(signal)]
    fn rpc_response(
        &self,
        reqid: u64,
        instance: &str,
        status: u32,
        response: &str,
    ) -> zbus::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_module_kind_has_its_runtime() {
        fn check(kind: ModuleImpl, expect: Option<(&str, &str)>) {
            let got = kind.runtime().map(|rt| (rt.name(), rt.path()));
            assert_eq!(got, expect, "{kind}");
        }
        let wasm = Some(("org.evp.Runtime1.Wasm", "/org/evp/Runtime1/Wasm"));
        let container = Some(("org.evp.Runtime1.Container", "/org/evp/Runtime1/Container"));
        check(ModuleImpl::Wasm, wasm);
        check(ModuleImpl::Spawn, container);
        check(ModuleImpl::Python, container);
        check(ModuleImpl::Docker, container);
        check(ModuleImpl::Dlfcn, None);
    }

    #[test]
    fn a_runtime_label_is_its_bus_name_suffix() {
        for runtime in Runtime::ALL {
            let suffix = runtime
                .name()
                .strip_prefix("org.evp.Runtime1.")
                .map(str::to_lowercase);
            assert_eq!(
                suffix.as_deref(),
                Some(runtime.label()),
                "{}",
                runtime.name()
            );
        }
    }
}
