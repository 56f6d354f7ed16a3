//! runtimed-wasm: owns `org.evp.Runtime1.Wasm` and serves `org.evp.Runtime1` for the `wasm`
//! kind. This build has no WASM engine yet: it hosts no instance, refuses to load or start with
//! `org.evp.Error.NotSupported`, and answers the calls that undo something it does not host
//! with success, so reconcilerd's cleanup paths work against it.

use anyhow::Result;
use evp_daemon::{AgentConfig, DaemonArgs};
use evp_schemas::ModuleImpl;
use evp_schemas::dbus::{EvpError, RUNTIME_WASM_NAME, RUNTIME_WASM_PATH};
use evp_schemas::deployment::validate_instance_name;
use evp_schemas::instance::StartOptionsDict;
use tracing::info;
use zbus::interface;
use zbus::object_server::SignalEmitter;

/// The one module kind this runtime will run.
pub const KIND: &str = ModuleImpl::Wasm.as_str();
/// What LoadModule and StartInstance answer until the engine lands.
pub const NOT_SUPPORTED: &str = "WASM modules are not supported by this build yet";

/// The `org.evp.Runtime1` object of runtimed-wasm.
#[derive(Debug, Default)]
pub struct WasmRuntime;

#[interface(name = "org.evp.Runtime1")]
impl WasmRuntime {
    /// Module kinds this runtime runs.
    #[zbus(property)]
    async fn kinds(&self) -> Vec<String> {
        vec![KIND.to_owned()]
    }

    async fn load_module(
        &self,
        module_id: &str,
        kind: &str,
        path_or_image: &str,
        sha256: &str,
    ) -> Result<(), EvpError> {
        let _ = (path_or_image, sha256);
        Err(EvpError::NotSupported(format!(
            "{NOT_SUPPORTED} (module {module_id}, kind {kind})"
        )))
    }

    async fn unload_module(&self, module_id: &str) -> Result<(), EvpError> {
        // Nothing is ever loaded, so the module is already unloaded.
        let _ = module_id;
        Ok(())
    }

    #[zbus(out_args("pid", "uid"))]
    async fn start_instance(
        &self,
        instance: &str,
        module_id: &str,
        options: StartOptionsDict,
    ) -> Result<(u32, u32), EvpError> {
        let _ = options;
        Err(EvpError::NotSupported(format!(
            "{NOT_SUPPORTED} (instance {instance} of module {module_id})"
        )))
    }

    async fn stop_instance(&self, instance: &str, grace_ms: u32) -> Result<(), EvpError> {
        // Nothing runs here, so the instance is already stopped.
        let _ = (instance, grace_ms);
        Ok(())
    }

    async fn purge_instance(&self, instance: &str) -> Result<(), EvpError> {
        // No instance directory was ever made by this build; only the name is checked.
        validate_instance_name(instance)
            .map_err(|m| EvpError::InvalidArgument(format!("instance {instance:?}: {m}")))
    }

    /// `(instance, module_id, status, failure_message)`: always empty in this build.
    #[zbus(property)]
    async fn instances(&self) -> Vec<(String, String, String, String)> {
        Vec::new()
    }

    /// An instance changed state; never emitted by this build.
    #[zbus(signal)]
    async fn instance_changed(
        emitter: &SignalEmitter<'_>,
        instance: &str,
        status: &str,
        failure_message: &str,
    ) -> zbus::Result<()>;
}

/// Runs runtimed-wasm until SIGTERM.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let _config = AgentConfig::load(&args)?;
    let conn = evp_daemon::connect_named(
        evp_daemon::bus_builder(&args)?.serve_at(RUNTIME_WASM_PATH, WasmRuntime),
        RUNTIME_WASM_NAME,
        true,
    )
    .await?;
    info!("serving {RUNTIME_WASM_NAME} (no WASM engine in this build)");
    evp_daemon::notify_ready(&conn, RUNTIME_WASM_NAME);
    evp_daemon::wait_for_shutdown().await
}

#[cfg(test)]
mod tests {
    use evp_schemas::dbus::Runtime;

    use super::*;

    #[test]
    fn its_kind_is_routed_to_it() {
        let routed = ModuleImpl::parse(KIND).and_then(ModuleImpl::runtime);
        assert_eq!(routed, Some(Runtime::Wasm));
        assert_eq!(Runtime::Wasm.name(), RUNTIME_WASM_NAME);
        assert_eq!(Runtime::Wasm.path(), RUNTIME_WASM_PATH);
    }
}
