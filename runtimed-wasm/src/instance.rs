//! One running instance: a host thread with a small stack that instantiates the module in a
//! store of its own (WASI with the workspace pre-opened at its own path, no argv, no
//! environment, output logged line by line; the memory limit; an epoch check that ends it when
//! told) and runs `_start`. How it ended becomes its [`Outcome`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::{info, warn};
use wasmtime::{
    Engine, Extern, Instance, Linker, Memory, MemoryType, SharedMemory, Store, UpdateDeadline,
};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::abi::{FREE_EXPORT, IMPORT_MODULE, MALLOC_EXPORT, MEMORY, START_EXPORT};
use crate::host::{GuestExports, GuestMemory, HostState};
use crate::limits::{Limits, limit_message};
use crate::module::LoadedModule;
use crate::output::LineLog;
use crate::session::{Control, Interruption, Session};
use crate::threads::ThreadSpawner;

/// The message of the trap with which an interrupted instance's WASM ends.
pub const INTERRUPTED: &str = "interrupted: the instance was told to stop";

/// Where and how to run one instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// The instance name.
    pub instance: String,
    /// Its workspace, pre-opened at this same path.
    pub workspace: PathBuf,
    /// Its SDK socket.
    pub sdk_socket: PathBuf,
    /// Its linear memory limit.
    pub memory_limit: u64,
    /// The host stack of each of its threads.
    pub thread_stack: usize,
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `_start` returned, or the module called `proc_exit(0)`: `self-exiting`.
    SelfExited,
    /// A trap, a non-zero exit, the memory limit: `error` with this message.
    Failed(String),
    /// It was stopped.
    Stopped,
}

/// What every thread of one instance shares, and how each gets a store.
pub struct Shared {
    /// The instance name.
    pub instance: Arc<str>,
    /// Its workspace.
    pub workspace: PathBuf,
    /// Its SDK session.
    pub sdk: Arc<Mutex<Session>>,
    /// How a stop reaches it.
    pub control: Arc<Control>,
    stdout: LineLog,
    stderr: LineLog,
    /// Its memory limit.
    pub memory_limit: u64,
    /// The host stack of each of its threads.
    pub thread_stack: usize,
}

impl Shared {
    /// A store for one thread of the instance: WASI, limits, the epoch check.
    pub fn store(
        &self,
        engine: &Engine,
        threads: Option<Arc<ThreadSpawner>>,
    ) -> Result<Store<HostState>, String> {
        let workspace = self.workspace.to_string_lossy().into_owned();
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(self.stdout.clone())
            .stderr(self.stderr.clone())
            // Each instance has a thread of its own: file I/O may block it.
            .allow_blocking_current_thread(true)
            .preopened_dir(&self.workspace, &workspace, FsPerms::ReadWrite)
            .map_err(|e| format!("opening the workspace {workspace}: {e:#}"))?;
        let state = HostState {
            wasi: wasi.build_p1(),
            limits: Limits::new(self.memory_limit),
            sdk: Arc::clone(&self.sdk),
            control: Arc::clone(&self.control),
            workspace,
            guest: None,
            threads,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        let control = Arc::clone(&self.control);
        store.epoch_deadline_callback(move |_| {
            if control.is_interrupted() {
                Err(wasmtime::Error::msg(INTERRUPTED))
            } else {
                Ok(UpdateDeadline::Continue(1))
            }
        });
        store.set_epoch_deadline(1);
        Ok(store)
    }

    /// Logs what is left of the output streams.
    fn finish_output(&self) {
        self.stdout.finish();
        self.stderr.finish();
    }
}

/// Instantiates the module in `store`, its memory (if imported) being `memory`, and gives the
/// host the exports it calls.
pub fn instantiate(
    store: &mut Store<HostState>,
    linker: &Linker<HostState>,
    module: &LoadedModule,
    memory: Option<GuestMemory>,
) -> wasmtime::Result<Instance> {
    let instance = linker.instantiate(&mut *store, &module.module)?;
    let memory = match (memory, instance.get_export(&mut *store, MEMORY)) {
        (Some(m), _) => m,
        (None, Some(Extern::Memory(m))) => GuestMemory::Plain(m),
        (None, Some(Extern::SharedMemory(m))) => GuestMemory::Shared(m),
        _ => wasmtime::bail!("the module has no `{MEMORY}` export"),
    };
    let guest = GuestExports {
        memory,
        malloc: instance.get_typed_func(&mut *store, MALLOC_EXPORT).ok(),
        free: instance.get_typed_func(&mut *store, FREE_EXPORT).ok(),
        table: module
            .table_export
            .as_deref()
            .and_then(|name| instance.get_table(&mut *store, name)),
    };
    store.data_mut().guest = Some(guest);
    Ok(instance)
}

/// Makes the memory a module imports, its maximum capped at the limit (a shared memory grows
/// without the store's limiter, so the cap is its limit).
fn imported_memory(
    store: &mut Store<HostState>,
    ty: &MemoryType,
    limit: u64,
) -> Result<GuestMemory, String> {
    const PAGE: u64 = 65536;
    let limit_pages = limit / PAGE;
    if ty.minimum() > limit_pages {
        return Err(limit_message(ty.minimum() * PAGE, limit));
    }
    let max = ty.maximum().unwrap_or(limit_pages).min(limit_pages);
    let (min, max) = (ty.minimum() as u32, max as u32);
    let engine = store.engine().clone();
    let memory = if ty.is_shared() {
        GuestMemory::Shared(
            SharedMemory::new(&engine, MemoryType::shared(min, max))
                .map_err(|e| format!("{e:#}"))?,
        )
    } else {
        GuestMemory::Plain(
            Memory::new(&mut *store, MemoryType::new(min, Some(max)))
                .map_err(|e| format!("{e:#}"))?,
        )
    };
    Ok(memory)
}

/// Resolves once the instance is instantiated (`Ok`) or could not be (why).
pub type Ready = oneshot::Receiver<Result<(), String>>;

/// Starts an instance on a thread of its own. The receiver says whether it was instantiated
/// (the start's answer); `on_end` runs once it ended, after its SDK connection closed and its
/// memory was released, so a restart finds everything free.
pub fn start(
    engine: &Engine,
    linker: &Linker<HostState>,
    module: Arc<LoadedModule>,
    spec: &InstanceSpec,
    on_end: impl FnOnce(Outcome) + Send + 'static,
) -> Result<(Arc<Control>, Ready), String> {
    let control = Arc::new(Control::default());
    let shared = Arc::new(Shared {
        instance: spec.instance.as_str().into(),
        workspace: spec.workspace.clone(),
        sdk: Arc::new(Mutex::new(Session::new(
            spec.sdk_socket.clone(),
            Arc::clone(&control),
        ))),
        control: Arc::clone(&control),
        stdout: LineLog::new(&spec.instance, "stdout"),
        stderr: LineLog::new(&spec.instance, "stderr"),
        memory_limit: spec.memory_limit,
        thread_stack: spec.thread_stack,
    });
    let (ready_tx, ready_rx) = oneshot::channel();
    let engine = engine.clone();
    let linker = linker.clone();
    std::thread::Builder::new()
        .name(format!("wasm:{}", spec.instance))
        .stack_size(spec.thread_stack)
        .spawn(move || {
            // A run that ended with memory blob operations under way left staging files.
            remove_staging_files(&shared);
            let outcome = run(&engine, linker, &module, &shared, ready_tx);
            shared.finish_output();
            // The SDK connection closes before the end is reported: sdk-broker sees the module
            // let go, and a restart's connection takes the instance's slot.
            crate::host::lock(&shared.sdk).close();
            remove_staging_files(&shared);
            if let Some(outcome) = outcome {
                on_end(outcome);
            }
        })
        .map_err(|e| format!("starting the instance thread: {e}"))?;
    Ok((control, ready_rx))
}

/// Removes the staging files of memory blob operations from the instance's workspace.
fn remove_staging_files(shared: &Shared) {
    match crate::host::remove_staging_files(&shared.workspace) {
        Ok(0) => {}
        Ok(n) => info!(instance = %shared.instance, "removed {n} memory blob staging files"),
        Err(e) => warn!(instance = %shared.instance, "{e}"),
    }
}

/// The instance thread: instantiate, say so, run `_start`. `None` when it never ran (the
/// failure went to `ready`).
fn run(
    engine: &Engine,
    mut linker: Linker<HostState>,
    module: &Arc<LoadedModule>,
    shared: &Arc<Shared>,
    ready: oneshot::Sender<Result<(), String>>,
) -> Option<Outcome> {
    let mut setup = || -> Result<(Store<HostState>, Instance, Option<SharedMemory>), String> {
        let mut store = shared.store(engine, None)?;
        let memory = match &module.memory_import {
            Some(ty) => Some(imported_memory(&mut store, ty, shared.memory_limit)?),
            None => None,
        };
        let shared_memory = match &memory {
            Some(GuestMemory::Shared(m)) => Some(m.clone()),
            _ => None,
        };
        if let Some(m) = &memory {
            let ext: Extern = match m {
                GuestMemory::Plain(m) => (*m).into(),
                GuestMemory::Shared(m) => m.clone().into(),
            };
            linker
                .define(&store, IMPORT_MODULE, MEMORY, ext)
                .map_err(|e| format!("{e:#}"))?;
        }
        if module.spawns_threads
            && let Some(memory) = &shared_memory
        {
            store.data_mut().threads = Some(Arc::new(ThreadSpawner::new(
                engine.clone(),
                linker.clone(),
                Arc::clone(module),
                memory.clone(),
                Arc::clone(shared),
            )));
        }
        let instance = instantiate(&mut store, &linker, module, memory)
            .map_err(|e| failure_message(&store, &e))?;
        Ok((store, instance, shared_memory))
    };
    let (mut store, instance, shared_memory) = match setup() {
        Ok(ready) => ready,
        Err(message) => {
            let _ = ready.send(Err(message));
            return None;
        }
    };
    let _ = ready.send(Ok(()));
    info!(instance = %shared.instance, module = %module.id, "instance running");
    let result = instance
        .get_typed_func::<(), ()>(&mut store, START_EXPORT)
        .and_then(|start| start.call(&mut store, ()));
    // Threads of the instance end with it.
    let interruption = shared.control.interruption();
    shared.control.interrupt(Interruption::Stop);
    let mut outcome = outcome(&result, interruption, store.data().limits.hit.clone());
    if let (Outcome::Failed(message), Some(memory)) = (&mut outcome, &shared_memory)
        && memory.data_size() as u64 >= shared.memory_limit
    {
        message.push_str(&format!(
            " (its shared memory is at the instance's limit of {} bytes, [wasm] memory_limit_bytes)",
            shared.memory_limit
        ));
    }
    if let Outcome::Failed(message) = &outcome {
        warn!(instance = %shared.instance, "instance failed: {message}");
    }
    Some(outcome)
}

/// The failure message for an error out of instantiation: the limit when it was hit.
fn failure_message(store: &Store<HostState>, e: &wasmtime::Error) -> String {
    match &store.data().limits.hit {
        Some(hit) => hit.clone(),
        None => format!("{e:#}"),
    }
}

/// How an instance ended, from what `_start` returned, why it was interrupted (if it was) and
/// whether it hit its memory limit.
pub fn outcome(
    result: &wasmtime::Result<()>,
    interruption: Option<Interruption>,
    limit_hit: Option<String>,
) -> Outcome {
    let exited = |status| match status {
        0 => Outcome::SelfExited,
        n => Outcome::Failed(format!("exited with status {n}")),
    };
    match (interruption, limit_hit) {
        (Some(Interruption::Stop), _) => return Outcome::Stopped,
        (Some(Interruption::Exited(status)), _) => return exited(status),
        (Some(Interruption::Failure(m)), _) | (None, Some(m)) => return Outcome::Failed(m),
        (None, None) => {}
    }
    let Err(e) = result else {
        return Outcome::SelfExited;
    };
    match e.downcast_ref::<I32Exit>() {
        Some(I32Exit(status)) => exited(*status),
        None => Outcome::Failed(trap_message(START_EXPORT, e)),
    }
}

/// `<entry> failed: <wasmtime's message>`, the trap and what led to it on one line.
pub fn trap_message(entry: &str, e: &wasmtime::Error) -> String {
    let chain: Vec<String> = e
        .chain()
        .map(|c| {
            c.to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .filter(|l| !l.is_empty() && !l.starts_with("error while executing at wasm backtrace"))
        .collect();
    format!("{entry} failed: {}", chain.join(": "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn how_start_ended_becomes_the_outcome() {
        fn check(
            result: wasmtime::Result<()>,
            interruption: Option<Interruption>,
            hit: Option<&str>,
            expect: Outcome,
        ) {
            let got = outcome(&result, interruption.clone(), hit.map(str::to_owned));
            assert_eq!(got, expect, "{result:?} {interruption:?} {hit:?}");
        }
        let trap = || Err(wasmtime::Error::msg("boom"));
        let failed = |m: &str| Outcome::Failed(m.to_owned());
        check(Ok(()), None, None, Outcome::SelfExited);
        check(Err(I32Exit(0).into()), None, None, Outcome::SelfExited);
        check(
            Err(I32Exit(3).into()),
            None,
            None,
            failed("exited with status 3"),
        );
        check(trap(), None, None, failed("_start failed: boom"));
        check(trap(), Some(Interruption::Stop), None, Outcome::Stopped);
        check(Ok(()), Some(Interruption::Stop), None, Outcome::Stopped);
        check(trap(), None, Some("limit"), failed("limit"));
        check(
            Ok(()),
            Some(Interruption::Failure("thread 2 trapped".into())),
            None,
            failed("thread 2 trapped"),
        );
        check(
            trap(),
            Some(Interruption::Exited(0)),
            None,
            Outcome::SelfExited,
        );
        check(
            trap(),
            Some(Interruption::Exited(4)),
            None,
            failed("exited with status 4"),
        );
    }

    #[test]
    fn a_trap_message_keeps_its_context_on_one_line() {
        let e = wasmtime::Error::msg("wasm trap: wasm `unreachable` instruction executed")
            .context("in SDK callback 3");
        assert_eq!(
            trap_message(START_EXPORT, &e),
            "_start failed: in SDK callback 3: wasm trap: wasm `unreachable` instruction executed"
        );
    }
}
