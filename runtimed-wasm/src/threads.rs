//! `wasi.thread-spawn` (the wasi-threads proposal) on wasmtime 48, whose `wasmtime-wasi-threads`
//! crate stops at 46: each spawned thread is a host thread that instantiates the module again
//! in a store of its own, on the instance's shared memory, and calls its
//! `wasi_thread_start(tid, start_arg)`. A trap or `proc_exit` in any thread ends the whole
//! instance, as wasi-threads says; the threads end with the instance.
//!
//! What a thread does not share with the instance's main thread: WASI file descriptors it
//! opened (each store has its own WASI context, with the same workspace, stdout and stderr).

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use tracing::{debug, warn};
use wasmtime::{Caller, Engine, Linker, SharedMemory};
use wasmtime_wasi::I32Exit;

use crate::host::{GuestMemory, HostState};
use crate::instance::{Shared, instantiate, trap_message};
use crate::module::LoadedModule;
use crate::session::Interruption;

/// The import module of `thread-spawn`.
pub const THREAD_SPAWN_MODULE: &str = "wasi";
/// The import name.
pub const THREAD_SPAWN: &str = "thread-spawn";
/// The export each new thread runs.
pub const THREAD_START: &str = "wasi_thread_start";
/// Thread ids are positive and below 2^29 (the wasi-threads ABI).
const MAX_TID: i32 = 0x1FFF_FFFF;

/// Starts the threads of one instance.
pub struct ThreadSpawner {
    engine: Engine,
    linker: Linker<HostState>,
    module: Arc<LoadedModule>,
    memory: SharedMemory,
    shared: Arc<Shared>,
    next_tid: AtomicI32,
}

impl ThreadSpawner {
    /// A spawner for the instance `shared`, whose module (with `env.memory` = `memory`
    /// defined in `linker`) is `module`.
    pub fn new(
        engine: Engine,
        linker: Linker<HostState>,
        module: Arc<LoadedModule>,
        memory: SharedMemory,
        shared: Arc<Shared>,
    ) -> ThreadSpawner {
        ThreadSpawner {
            engine,
            linker,
            module,
            memory,
            shared,
            next_tid: AtomicI32::new(1),
        }
    }

    /// Starts a thread running `wasi_thread_start(tid, start_arg)`; its tid, or a negative
    /// value when no thread could be made.
    fn spawn(self: &Arc<Self>, start_arg: i32) -> i32 {
        if self.shared.control.is_interrupted() {
            return -1;
        }
        let tid = self.next_tid.fetch_add(1, Ordering::Relaxed);
        if !(1..=MAX_TID).contains(&tid) {
            return -1;
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("wasm:{}#{tid}", self.shared.instance))
            .stack_size(self.shared.thread_stack)
            .spawn(move || me.run(tid, start_arg));
        match spawned {
            Ok(_) => tid,
            Err(e) => {
                warn!(instance = %self.shared.instance, "cannot start a WASM thread: {e}");
                -1
            }
        }
    }

    /// A thread's life: a store, the module instantiated on the shared memory, its start.
    fn run(self: Arc<Self>, tid: i32, start_arg: i32) {
        let result = (|| -> wasmtime::Result<()> {
            let mut store = self
                .shared
                .store(&self.engine, Some(Arc::clone(&self)))
                .map_err(wasmtime::Error::msg)?;
            let memory = GuestMemory::Shared(self.memory.clone());
            let instance = instantiate(&mut store, &self.linker, &self.module, Some(memory))?;
            let start = instance.get_typed_func::<(i32, i32), ()>(&mut store, THREAD_START)?;
            start.call(&mut store, (tid, start_arg))
        })();
        let control = &self.shared.control;
        match result {
            Ok(()) => debug!(instance = %self.shared.instance, tid, "WASM thread ended"),
            // Interrupted with the instance: nothing to add.
            Err(_) if control.is_interrupted() => {}
            Err(e) => {
                control.interrupt(match e.downcast_ref::<I32Exit>() {
                    Some(I32Exit(status)) => Interruption::Exited(*status),
                    None => Interruption::Failure(format!(
                        "thread {tid}: {}",
                        trap_message(THREAD_START, &e)
                    )),
                });
            }
        }
    }
}

/// Defines `wasi.thread-spawn`; in an instance without a shared memory it answers -1.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        THREAD_SPAWN_MODULE,
        THREAD_SPAWN,
        |caller: Caller<'_, HostState>, start_arg: i32| -> i32 {
            match caller.data().threads.clone() {
                Some(spawner) => spawner.spawn(start_arg),
                None => -1,
            }
        },
    )?;
    Ok(())
}
