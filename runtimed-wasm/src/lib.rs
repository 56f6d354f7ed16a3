//! runtimed-wasm: owns `org.evp.Runtime1.Wasm` and runs EVP WASM modules, unchanged, in
//! wasmtime. Each instance is a host thread of this daemon ([`instance`]) whose SDK imports
//! ([`host`], the ABI in [`abi`], guest memory in [`guest`], memory blobs staged through the
//! workspace in [`memory_blob`]) speak to sdk-broker over the instance's socket
//! ([`session`]), like a remote module; its output goes to the log
//! ([`output`]), its memory is limited ([`limits`]) and a stop interrupts it through the
//! engine's epochs ([`engine`]). [`supervisor`] keeps modules ([`module`]: checked and
//! rewritten by [`loader`], compiled once into [`cache`]) and instances; [`service`] is the
//! D-Bus object.

pub mod abi;
pub mod cache;
pub mod config;
pub mod engine;
pub mod guest;
pub mod host;
pub mod instance;
pub mod limits;
pub mod loader;
pub mod memory_blob;
pub mod module;
pub mod output;
pub mod service;
pub mod session;
pub mod supervisor;
pub mod threads;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use evp_daemon::{AgentConfig, DaemonArgs};
use evp_schemas::dbus::{RUNTIME_WASM_NAME, RUNTIME_WASM_PATH};
use tracing::{error, info, warn};

pub use config::WasmConfig;
pub use supervisor::KIND;

/// How long a stopping daemon waits for its last instance changes to reach the bus.
const EVENT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs runtimed-wasm until SIGTERM; its instances end with it.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let config = AgentConfig::load(&args)?;
    let section: WasmConfig = config.section("wasm")?;
    let cache_dir = section.cache_dir(
        std::env::var("CACHE_DIRECTORY").ok().as_deref(),
        &config.common.data_dir,
    );
    let served = serve(
        &section,
        config.common.data_dir.join("instances"),
        &cache_dir,
        evp_daemon::bus_builder(&args)?,
        async {
            let _ = evp_daemon::wait_for_shutdown().await;
        },
    )
    .await;
    evp_daemon::exit_if_bus_lost(served)
}

/// Serves the bus until `shutdown` resolves (or the bus is lost), then ends every instance.
pub async fn serve(
    section: &WasmConfig,
    instances_dir: PathBuf,
    cache_dir: &Path,
    bus: zbus::connection::Builder<'static>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    section.validate()?;
    let engine = engine::WasmEngine::new(section)
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .context("creating the WASM engine")?;
    let (supervisor, events) =
        supervisor::Supervisor::new(engine, section.clone(), instances_dir, cache_dir)
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .context("setting up the host functions")?;
    let conn = evp_daemon::connect_named(
        bus.serve_at(
            RUNTIME_WASM_PATH,
            service::WasmRuntime::new(supervisor.clone()),
        ),
        RUNTIME_WASM_NAME,
        // A library: `serve` returns BusLost rather than exiting the process.
        false,
    )
    .await?;
    let publisher = tokio::spawn(service::publish(conn.clone(), events));
    info!(
        memory_limit_bytes = section.memory_limit_bytes,
        stop_grace_ms = section.stop_grace_ms,
        "serving {RUNTIME_WASM_NAME}"
    );
    evp_daemon::notify_ready(&conn, RUNTIME_WASM_NAME);
    let lost = tokio::select! {
        () = shutdown => false,
        () = conn.closed() => true,
    };
    if lost {
        error!("{}; stopping", evp_daemon::BusLost(RUNTIME_WASM_NAME));
    }
    supervisor.shutdown().await;
    if tokio::time::timeout(EVENT_FLUSH_TIMEOUT, publisher)
        .await
        .is_err()
    {
        warn!("the last instance changes did not reach the bus in time");
    }
    if lost {
        return Err(evp_daemon::BusLost(RUNTIME_WASM_NAME).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use evp_schemas::ModuleImpl;
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
