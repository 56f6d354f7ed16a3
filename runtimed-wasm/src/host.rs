//! The host side of an instance: its store data, the linker with WASI preview 1 and the
//! `env.EVP_*` functions of SDK.md §3.6, and access to the guest's memory, allocator and
//! function table. Every SDK request goes to sdk-broker over the instance's socket
//! ([`Session`]); the guest's memory is read with the checks of [`crate::guest`].

mod blob;
mod events;
mod memory_blob;

pub use memory_blob::remove_staging_files;

use std::cell::UnsafeCell;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use evp_schemas::sdk::{self as wire, EvpResult, Request, TelemetryEntry};
use wasmtime::{Caller, Linker, Memory, Ref, SharedMemory, Table, TypedFunc, Val};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::abi::{self, HANDLE, IMPORT_MODULE};

use crate::guest::{self, GuestError, LinearMemory};
use crate::limits::Limits;
use crate::session::{Control, Registered, Session, wire_callback};
use crate::threads::ThreadSpawner;

/// What the store of one instance (or one of its threads) holds.
pub struct HostState {
    /// WASI preview 1.
    pub wasi: WasiP1Ctx,
    /// The memory limit.
    pub limits: Limits,
    /// The SDK session, shared by the instance's threads.
    pub sdk: Arc<Mutex<Session>>,
    /// How a stop reaches this instance.
    pub control: Arc<Control>,
    /// The workspace path, as `EVP_getWorkspaceDirectory` answers it.
    pub workspace: String,
    /// The guest's exports the host uses, once instantiated.
    pub guest: Option<GuestExports>,
    /// Starts threads, for modules that import `wasi.thread-spawn`.
    pub threads: Option<Arc<ThreadSpawner>>,
}

impl HostState {
    /// A state for checking a module against the linker; it never runs code.
    pub fn detached() -> HostState {
        let control = Arc::new(Control::default());
        HostState {
            wasi: wasmtime_wasi::WasiCtxBuilder::new().build_p1(),
            limits: Limits::new(u64::MAX),
            sdk: Arc::new(Mutex::new(Session::new(
                std::path::PathBuf::new(),
                Arc::clone(&control),
            ))),
            control,
            workspace: String::new(),
            guest: None,
            threads: None,
        }
    }

    /// The SDK session, locked.
    pub fn sdk(&self) -> MutexGuard<'_, Session> {
        lock(&self.sdk)
    }
}

/// Locks an SDK session; a panic in a host call leaves it usable (it holds no invariant that a
/// half-done call breaks).
pub fn lock(sdk: &Mutex<Session>) -> MutexGuard<'_, Session> {
    sdk.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The guest's linear memory.
#[derive(Clone)]
pub enum GuestMemory {
    /// An ordinary memory, owned by the store.
    Plain(Memory),
    /// A shared memory (threads builds), possibly used by other threads at the same time.
    Shared(SharedMemory),
}

/// The exports the host calls or reads.
#[derive(Clone)]
pub struct GuestExports {
    /// `memory`.
    pub memory: GuestMemory,
    /// `malloc`, to hand data in.
    pub malloc: Option<TypedFunc<i32, i32>>,
    /// `free`, to release it after the callback.
    pub free: Option<TypedFunc<i32, ()>>,
    /// Table 0, through which callbacks are called.
    pub table: Option<Table>,
}

/// An ordinary memory seen as bytes.
struct PlainView<'a>(&'a mut [u8]);

impl LinearMemory for PlainView<'_> {
    fn size(&self) -> usize {
        self.0.len()
    }

    fn read_into(&self, at: usize, out: &mut [u8]) {
        self.0.read_into(at, out);
    }

    fn write_from(&mut self, at: usize, bytes: &[u8]) {
        self.0.write_from(at, bytes);
    }
}

/// A shared memory seen as bytes. Other threads of the guest may write it meanwhile; WASM
/// allows such races on shared memory, and the host only copies bytes in and out.
struct SharedView<'a>(&'a [UnsafeCell<u8>]);

impl LinearMemory for SharedView<'_> {
    fn size(&self) -> usize {
        self.0.len()
    }

    fn read_into(&self, at: usize, out: &mut [u8]) {
        let src = &self.0[at..at + out.len()];
        // SAFETY: `src` is inside the memory (sliced above); `UnsafeCell<u8>` has the layout
        // of `u8`; `out` is a distinct host buffer. Concurrent guest writes make the copied
        // bytes racy, which shared-memory WASM semantics allow.
        unsafe {
            std::ptr::copy_nonoverlapping(
                UnsafeCell::raw_get(src.as_ptr()),
                out.as_mut_ptr(),
                out.len(),
            );
        }
    }

    fn write_from(&mut self, at: usize, bytes: &[u8]) {
        let dst = &self.0[at..at + bytes.len()];
        // SAFETY: as in `read_into`; writing through `UnsafeCell` is how shared memory is
        // written from the host.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                UnsafeCell::raw_get(dst.as_ptr()),
                bytes.len(),
            );
        }
    }
}

/// The guest's exports; they are set before `_start` runs, so host calls always find them.
fn exports(caller: &Caller<'_, HostState>) -> wasmtime::Result<GuestExports> {
    caller.data().guest.clone().ok_or_else(|| {
        wasmtime::format_err!("an SDK function was called before the instance was set up")
    })
}

/// Runs `f` on the guest's memory as it is now.
fn with_memory<R>(
    caller: &mut Caller<'_, HostState>,
    f: impl FnOnce(&mut dyn LinearMemory) -> R,
) -> wasmtime::Result<R> {
    Ok(match exports(caller)?.memory {
        GuestMemory::Plain(m) => f(&mut PlainView(m.data_mut(&mut *caller))),
        GuestMemory::Shared(m) => f(&mut SharedView(m.data())),
    })
}

/// The code the guest gets for unusable memory: `EVP_FAULT` for a bad address, `EVP_INVAL`
/// for a string no SDK message can carry.
fn guest_code(e: &GuestError) -> i32 {
    match e {
        GuestError::Fault { .. } | GuestError::Unterminated(_) => code(EvpResult::Fault),
        GuestError::NotUtf8(_) => code(EvpResult::Inval),
    }
}

/// An `EVP_RESULT` as the i32 the guest receives.
pub(crate) fn code(r: EvpResult) -> i32 {
    r.code() as i32
}

/// Reads arguments out of guest memory; the inner error is the code to answer the guest.
fn read<T>(
    caller: &mut Caller<'_, HostState>,
    f: impl FnOnce(&dyn LinearMemory) -> Result<T, GuestError>,
) -> wasmtime::Result<Result<T, i32>> {
    with_memory(caller, |m| f(m).map_err(|e| guest_code(&e)))
}

/// Unwraps a [`read`], answering the guest its code on a bad argument.
macro_rules! args {
    ($caller:expr, $f:expr) => {
        match read($caller, $f)? {
            Ok(v) => v,
            Err(code) => return Ok(code),
        }
    };
}
use args;

/// Answers `EVP_INVAL` unless `h` is the handle `EVP_initialize` gave.
macro_rules! check_handle {
    ($h:expr) => {
        if $h != $crate::abi::HANDLE {
            return Ok($crate::host::code(evp_schemas::sdk::EvpResult::Inval));
        }
    };
}
use check_handle;

/// A block of `len` bytes (at least 1) from the guest's `malloc`, its contents as `malloc`
/// left them; `None` when it returned NULL.
fn allocate(caller: &mut Caller<'_, HostState>, len: usize) -> wasmtime::Result<Option<i32>> {
    let malloc = exports(caller)?.malloc.ok_or_else(|| {
        wasmtime::format_err!(
            "the module does not export `{}`, which the SDK needs to hand it data",
            abi::MALLOC_EXPORT
        )
    })?;
    let size = i32::try_from(len.max(1))
        .map_err(|_| wasmtime::format_err!("{len} bytes do not fit guest memory"))?;
    let ptr = malloc.call(&mut *caller, size)?;
    Ok((ptr != 0).then_some(ptr))
}

/// Copies `bytes` into a block from the guest's `malloc`; `None` when it returned NULL.
fn hand_in(caller: &mut Caller<'_, HostState>, bytes: &[u8]) -> wasmtime::Result<Option<i32>> {
    let Some(ptr) = allocate(caller, bytes.len())? else {
        return Ok(None);
    };
    with_memory(caller, |m| guest::write(m, ptr as u32, bytes))?.map_err(|e| {
        wasmtime::format_err!("the module's malloc returned an unusable block: {e}")
    })?;
    Ok(Some(ptr))
}

/// Gives a block back to the guest's `free`.
fn release(caller: &mut Caller<'_, HostState>, ptr: i32) -> wasmtime::Result<()> {
    if ptr == 0 {
        return Ok(());
    }
    if let Some(free) = exports(caller)?.free {
        free.call(&mut *caller, ptr)?;
    }
    Ok(())
}

/// Calls the guest function at `index` of table 0 with `args`; a trap in it is the instance's.
fn call_table(
    caller: &mut Caller<'_, HostState>,
    index: u32,
    args: &[Val],
) -> wasmtime::Result<()> {
    let table = exports(caller)?.table.ok_or_else(|| {
        wasmtime::format_err!(
            "the module has no function table, so its SDK callbacks cannot be called"
        )
    })?;
    let Some(Ref::Func(Some(func))) = table.get(&mut *caller, u64::from(index)) else {
        wasmtime::bail!("SDK callback {index} is not a function of the module's table");
    };
    func.call(&mut *caller, args, &mut [])
        .map_err(|e| e.context(format!("in SDK callback {index}")))
}

/// Calls the guest function at `index` of table 0 as a blob io callback, `(i32 buf, i32 len,
/// i32 user) -> i32`, and gives its result; `None` when the index holds no function of that
/// type (EVP's `call_indirect` fails then, and with it the operation). A trap in it is the
/// instance's.
fn call_io_callback(
    caller: &mut Caller<'_, HostState>,
    index: u32,
    args: (i32, i32, i32),
) -> wasmtime::Result<Option<i32>> {
    let Some(table) = exports(caller)?.table else {
        return Ok(None);
    };
    let Some(Ref::Func(Some(func))) = table.get(&mut *caller, u64::from(index)) else {
        return Ok(None);
    };
    let Ok(typed) = func.typed::<(i32, i32, i32), i32>(&*caller) else {
        return Ok(None);
    };
    typed
        .call(&mut *caller, args)
        .map(Some)
        .map_err(|e| e.context(format!("in SDK blob io callback {index}")))
}

/// The linker every instance uses: WASI preview 1 and the `env` SDK functions.
pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut HostState| &mut s.wasi)?;
    crate::threads::add_to_linker(&mut linker)?;
    let m = IMPORT_MODULE;
    linker.func_wrap(m, "EVP_initialize", || HANDLE)?;
    linker.func_wrap(m, "EVP_getWorkspaceDirectory", get_workspace_directory)?;
    for (name, how) in [
        ("EVP_setConfigurationCallback", &CONFIGURATION),
        ("EVP_setMessageCallback", &MESSAGE),
        ("EVP_setRpcCallback", &RPC),
    ] {
        linker.func_wrap(
            m,
            name,
            move |caller: Caller<'_, HostState>, h, cb, user| register(caller, [h, cb, user], how),
        )?;
    }
    type Build = fn(String, Vec<u8>, wire::Callback) -> Request;
    let state: Build = |topic, blob, cb| Request::SendState { topic, blob, cb };
    let message: Build = |topic, blob, cb| Request::SendMessage { topic, blob, cb };
    for (name, build) in [("EVP_sendState", state), ("EVP_sendMessage", message)] {
        linker.func_wrap(
            m,
            name,
            move |caller: Caller<'_, HostState>, h, topic, data, len, cb, user| {
                send_topic_data(caller, [h, topic, data, len, cb, user], build)
            },
        )?;
    }
    linker.func_wrap(m, "EVP_sendTelemetry", send_telemetry)?;
    linker.func_wrap(m, "EVP_sendRpcResponse", send_rpc_response)?;
    linker.func_wrap(m, "EVP_processEvent", events::process_event)?;
    blob::add_to_linker(&mut linker)?;
    Ok(linker)
}

fn get_workspace_directory(
    mut caller: Caller<'_, HostState>,
    h: i32,
    kind: i32,
) -> wasmtime::Result<i32> {
    // On error the answer is a small code the guest cannot tell from a pointer (as in EVP).
    check_handle!(h);
    if kind != 0 {
        return Ok(code(EvpResult::Inval));
    }
    if let Some(ptr) = caller.data().sdk().workspace_ptr {
        return Ok(ptr as i32);
    }
    let path = guest::nul_terminated(&caller.data().workspace);
    let Some(ptr) = hand_in(&mut caller, &path)? else {
        return Ok(code(EvpResult::NoMem));
    };
    caller.data().sdk().workspace_ptr = Some(ptr as u32);
    Ok(ptr)
}

/// One `EVP_set*Callback`: how it registers `(cb, user)` and what it answers.
struct Registration {
    /// The session's slot for it.
    slot: fn(&mut Session) -> &mut Option<Registered>,
    /// The answer to a second call.
    twice: EvpResult,
    /// A NULL callback is refused (`EVP_INVAL`).
    needs_callback: bool,
    /// The answer once registered.
    then: fn(&mut Session) -> EvpResult,
}

/// `EVP_setConfigurationCallback`: a second call is `EVP_ERROR`; the stored configurations
/// come again, now that there is a callback for them.
const CONFIGURATION: Registration = Registration {
    slot: |s| &mut s.configuration,
    twice: EvpResult::Error,
    needs_callback: false,
    then: |s| s.simple(&Request::RequestResendConfig),
};
/// `EVP_setMessageCallback`: EVP asserts (and aborts the whole agent) on a second call; here
/// only the call fails.
const MESSAGE: Registration = Registration {
    slot: |s| &mut s.message,
    twice: EvpResult::Inval,
    needs_callback: false,
    then: |_| EvpResult::Ok,
};
/// `EVP_setRpcCallback`: NULL or a second call is `EVP_INVAL`.
const RPC: Registration = Registration {
    slot: |s| &mut s.rpc,
    twice: EvpResult::Inval,
    needs_callback: true,
    then: |_| EvpResult::Ok,
};

fn register(
    caller: Caller<'_, HostState>,
    [h, cb, user]: [i32; 3],
    how: &Registration,
) -> wasmtime::Result<i32> {
    check_handle!(h);
    let mut sdk = caller.data().sdk();
    if (how.needs_callback && cb == 0) || (how.slot)(&mut sdk).is_some() {
        let refused = if how.needs_callback && cb == 0 {
            EvpResult::Inval
        } else {
            how.twice
        };
        return Ok(code(refused));
    }
    *(how.slot)(&mut sdk) = Some(Registered {
        index: cb as u32,
        user,
    });
    Ok(code((how.then)(&mut sdk)))
}

/// `EVP_sendState` and `EVP_sendMessage`: `(h, topic, data, len, cb, user)`, the topic and the
/// data copied at call time into the request `build` makes.
fn send_topic_data(
    mut caller: Caller<'_, HostState>,
    [h, topic, data, len, cb, user]: [i32; 6],
    build: impl FnOnce(String, Vec<u8>, wire::Callback) -> Request,
) -> wasmtime::Result<i32> {
    check_handle!(h);
    let (topic, blob) = args!(&mut caller, |m| Ok((
        guest::c_string(m, topic as u32)?,
        guest::bytes(m, data as u32, len as u32)?
    )));
    let request = build(topic, blob, wire_callback(cb, user));
    Ok(code(caller.data().sdk().simple(&request)))
}

fn send_telemetry(
    mut caller: Caller<'_, HostState>,
    h: i32,
    entries: i32,
    n: i32,
    cb: i32,
    user: i32,
) -> wasmtime::Result<i32> {
    check_handle!(h);
    if n as u32 > abi::MAX_TELEMETRY_ENTRIES {
        return Ok(code(EvpResult::TooBig));
    }
    let entries = args!(&mut caller, |m| guest::telemetry_entries(
        m,
        entries as u32,
        n as u32
    ));
    let request = Request::SendTelemetry {
        entries: entries
            .into_iter()
            .map(|(key, value)| TelemetryEntry { key, value })
            .collect(),
        cb: wire_callback(cb, user),
    };
    Ok(code(caller.data().sdk().simple(&request)))
}

fn send_rpc_response(
    mut caller: Caller<'_, HostState>,
    h: i32,
    id: i64,
    response: i32,
    status: i32,
    cb: i32,
    user: i32,
) -> wasmtime::Result<i32> {
    check_handle!(h);
    // A NULL response reads as "" (WAMR maps offset 0 into memory), as in EVP.
    let response = args!(&mut caller, |m| guest::c_string(m, response as u32));
    let request = Request::SendRpcResponse {
        id: id as u64,
        response: Some(response),
        status: status as u32,
        cb: wire_callback(cb, user),
    };
    Ok(code(caller.data().sdk().simple(&request)))
}

#[cfg(test)]
mod tests {
    use wasmtime::{Extern, Store, ValType};

    use super::*;
    use crate::abi::{IMPORTS, Ty, wasm_type};
    use crate::config::WasmConfig;
    use crate::engine::WasmEngine;

    fn ty(v: &ValType) -> Ty {
        match v {
            ValType::I32 => Ty::I32,
            ValType::I64 => Ty::I64,
            other => panic!("the SDK has no {other} parameters"),
        }
    }

    /// The linker defines exactly the `env` functions of SDK.md §3.6, with their wasm types.
    #[test]
    fn the_linker_defines_the_sdk_imports_with_their_wasm_types() {
        let engine = WasmEngine::on_demand(&WasmConfig::default())
            .unwrap()
            .engine;
        let linker = linker(&engine).unwrap();
        let mut store = Store::new(&engine, HostState::detached());
        let funcs: Vec<(String, wasmtime::Func)> = linker
            .iter(&mut store)
            .filter(|(module, _, _)| *module == IMPORT_MODULE)
            .map(|(_, name, ext)| match ext {
                Extern::Func(f) => (name.to_owned(), f),
                _ => panic!("env.{name} is not a function"),
            })
            .collect();
        let mut defined: Vec<(String, Vec<Ty>, Vec<Ty>)> = funcs
            .into_iter()
            .map(|(name, f)| {
                let t = f.ty(&store);
                (
                    name,
                    t.params().map(|p| ty(&p)).collect(),
                    t.results().map(|r| ty(&r)).collect(),
                )
            })
            .collect();
        defined.sort();
        let mut expected: Vec<(String, Vec<Ty>, Vec<Ty>)> = IMPORTS
            .iter()
            .map(|i| {
                let (params, results) = wasm_type(i.wamr).unwrap();
                (i.name.to_owned(), params, results)
            })
            .collect();
        expected.sort();
        assert_eq!(defined, expected);
    }

    #[test]
    fn wasi_preview1_and_thread_spawn_are_defined() {
        let engine = WasmEngine::on_demand(&WasmConfig::default())
            .unwrap()
            .engine;
        let linker = linker(&engine).unwrap();
        let mut store = Store::new(&engine, HostState::detached());
        for (module, name) in [
            ("wasi_snapshot_preview1", "fd_write"),
            ("wasi_snapshot_preview1", "path_open"),
            ("wasi_snapshot_preview1", "proc_exit"),
            ("wasi", "thread-spawn"),
        ] {
            assert!(
                linker.get(&mut store, module, name).is_ok(),
                "{module}.{name}"
            );
        }
    }
}
