//! The `org.evp.Runtime1` object of runtimed-wasm: every call is the supervisor's; instance
//! changes go out as `InstanceChanged` and `PropertiesChanged(Instances)`, in order.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use evp_schemas::dbus::{EvpError, RUNTIME_WASM_PATH, StartOptions};
use tokio::sync::mpsc;
use tracing::warn;
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

/// The `sdk_socket` option, the only one a WASM instance uses (it gets no environment, and its
/// entry is always `_start`).
fn sdk_socket(mut options: StartOptions) -> Result<Option<PathBuf>, EvpError> {
    let Some(v) = options.remove("sdk_socket") else {
        return Ok(None);
    };
    let path = String::try_from(v)
        .map_err(|_| EvpError::InvalidArgument("option sdk_socket must be a string (s)".into()))?;
    if !path.starts_with('/') || path.contains('\0') {
        return Err(EvpError::InvalidArgument(format!(
            "option sdk_socket {path:?} must be an absolute path"
        )));
    }
    Ok(Some(path.into()))
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
        options: StartOptions,
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
