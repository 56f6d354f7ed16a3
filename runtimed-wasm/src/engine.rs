//! The wasmtime engine every module and instance of the daemon shares: cranelift, the threads
//! proposal with shared memories, epoch interruption (ticked by one thread of its own), and
//! the pooling allocator when the address space for it can be reserved.

use std::time::Duration;

use tracing::{info, warn};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::config::WasmConfig;

/// How often the epoch advances. An instance executing WASM checks whether it must stop at
/// each tick, so a forced stop takes effect within about this long; idle instances (in a host
/// call) are not woken by it.
pub const EPOCH_TICK: Duration = Duration::from_millis(20);

/// Pool slots per instance for what instances hold besides their memory: threads of a
/// `wasm32-wasi-threads` module are instances (with tables) of their own, on the shared memory.
const CORE_INSTANCES_PER_INSTANCE: u32 = 4;

/// How linear memories and instances are allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Slots reserved once at start (fast instantiation, memory returned to the OS on exit).
    Pooling,
    /// A mapping per memory when needed: the address space for the pool was not available.
    OnDemand,
}

/// The shared engine and how it allocates.
#[derive(Clone)]
pub struct WasmEngine {
    /// The engine.
    pub engine: Engine,
    /// How it allocates.
    pub allocation: Allocation,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine")
            .field("allocation", &self.allocation)
            .finish_non_exhaustive()
    }
}

/// The engine settings common to both allocation strategies.
fn base_config(settings: &WasmConfig) -> Config {
    let mut config = Config::new();
    config
        .wasm_threads(true)
        .shared_memory(true)
        .wasm_bulk_memory(true)
        .epoch_interruption(true)
        .max_wasm_stack(settings.wasm_stack_bytes)
        .parallel_compilation(true);
    config
}

/// The pooling allocator's limits for `settings`.
fn pooling(settings: &WasmConfig) -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::default();
    let instances = settings.max_instances;
    pool.total_memories(instances)
        .total_core_instances(instances.saturating_mul(CORE_INSTANCES_PER_INSTANCE))
        .total_tables(instances.saturating_mul(CORE_INSTANCES_PER_INSTANCE))
        .max_memory_size(settings.memory_limit_bytes as usize);
    pool
}

impl WasmEngine {
    /// Builds the engine: pooling when the pool's address space can be reserved (the probe is
    /// building the engine with it), on-demand otherwise; says which in the log. Starts the
    /// epoch ticker.
    pub fn new(settings: &WasmConfig) -> wasmtime::Result<WasmEngine> {
        let mut config = base_config(settings);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(settings)));
        let (engine, allocation) = match Engine::new(&config) {
            Ok(engine) => {
                info!(
                    slots = settings.max_instances,
                    memory_limit_bytes = settings.memory_limit_bytes,
                    "WASM engine: pooling allocator"
                );
                (engine, Allocation::Pooling)
            }
            Err(e) => {
                warn!(
                    "WASM engine: on-demand allocation (the pooling allocator's address space \
                     could not be reserved: {e:#})"
                );
                let mut config = base_config(settings);
                config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
                (Engine::new(&config)?, Allocation::OnDemand)
            }
        };
        start_ticker(&engine)?;
        Ok(WasmEngine { engine, allocation })
    }

    /// The same engine with on-demand allocation forced, for tests that run many engines.
    pub fn on_demand(settings: &WasmConfig) -> wasmtime::Result<WasmEngine> {
        let mut config = base_config(settings);
        config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
        let engine = Engine::new(&config)?;
        start_ticker(&engine)?;
        Ok(WasmEngine {
            engine,
            allocation: Allocation::OnDemand,
        })
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
fn start_ticker(engine: &Engine) -> wasmtime::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .map_err(|e| wasmtime::format_err!("starting the epoch thread: {e}"))?;
    Ok(())
}
