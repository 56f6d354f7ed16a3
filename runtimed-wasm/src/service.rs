//! The `org.evp.Runtime1` object of runtimed-wasm: every call is the supervisor's; instance
//! changes go out as `InstanceChanged` and `PropertiesChanged(Instances)`, in order.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use evp_schemas::dbus::{EvpError, RUNTIME_WASM_PATH};
use evp_schemas::instance::{StartOptions, StartOptionsDict};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use zbus::interface;
use zbus::object_server::SignalEmitter;

use crate::supervisor::{InstanceEvent, KIND, Supervisor};

/// The `org.evp.Runtime1` object.
pub struct WasmRuntime {
    supervisor: Arc<Supervisor>,
}

impl WasmRuntime {
    /// The object serving this supervisor.
    pub fn new(supervisor: Arc<Supervisor>) -> WasmRuntime {
        WasmRuntime { supervisor }
    }
}

/// The `sdk_socket` option, the only one a WASM instance uses: it gets no environment, and
/// its entry is always `_start`.
fn sdk_socket(options: StartOptionsDict) -> Result<Option<PathBuf>, EvpError> {
    let unknown = StartOptions::unknown_keys(&options).join(", ");
    if !unknown.is_empty() {
        warn!("StartInstance: ignoring options this build does not apply: {unknown}");
    }
    let options = StartOptions::from_dbus(options)?;
    if !options.env.is_empty() {
        debug!("StartInstance: the env option does not apply to WASM instances (no environment)");
    }
    Ok(options.sdk_socket)
}

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
        self.supervisor
            .load_module(module_id, kind, path_or_image, sha256)
            .await
    }

    async fn unload_module(&self, module_id: &str) -> Result<(), EvpError> {
        self.supervisor.unload_module(module_id)
    }

    /// Answers this daemon's pid and uid: every instance runs inside it.
    #[zbus(out_args("pid", "uid"))]
    async fn start_instance(
        &self,
        instance: &str,
        module_id: &str,
        options: StartOptionsDict,
    ) -> Result<(u32, u32), EvpError> {
        let socket = sdk_socket(options)?;
        self.supervisor
            .start_instance(instance, module_id, socket)
            .await
    }

    async fn stop_instance(&self, instance: &str, grace_ms: u32) -> Result<(), EvpError> {
        self.supervisor
            .stop_instance(instance, Duration::from_millis(grace_ms.into()))
            .await
    }

    async fn purge_instance(&self, instance: &str) -> Result<(), EvpError> {
        self.supervisor.purge_instance(instance).await
    }

    /// `(instance, module_id, status, failure_message)` for what this runtime hosts now.
    #[zbus(property)]
    async fn instances(&self) -> Vec<(String, String, String, String)> {
        self.supervisor.instances()
    }

    /// An instance changed state: `starting`, `ok`, `self-exiting`, `error` or `stopped`.
    #[zbus(signal)]
    async fn instance_changed(
        emitter: &SignalEmitter<'_>,
        instance: &str,
        status: &str,
        failure_message: &str,
    ) -> zbus::Result<()>;
}

/// Emits every instance change, in order, until the supervisor ends its stream.
pub async fn publish(conn: zbus::Connection, mut events: mpsc::UnboundedReceiver<InstanceEvent>) {
    let object = match conn
        .object_server()
        .interface::<_, WasmRuntime>(RUNTIME_WASM_PATH)
        .await
    {
        Ok(object) => object,
        Err(e) => {
            warn!("instance changes will not be published: {e}");
            return;
        }
    };
    while let Some(change) = events.recv().await {
        let emitter = object.signal_emitter();
        let status = change.state.as_str();
        if let Err(e) = WasmRuntime::instance_changed(
            emitter,
            &change.instance,
            status,
            &change.failure_message,
        )
        .await
        {
            warn!(instance = %change.instance, "emitting InstanceChanged failed: {e}");
        }
        if let Err(e) = object.get().await.instances_changed(emitter).await {
            warn!(instance = %change.instance, "emitting PropertiesChanged(Instances) failed: {e}");
        }
    }
}
