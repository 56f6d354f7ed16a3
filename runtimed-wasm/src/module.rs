//! `LoadModule`: a module file verified by its SHA-256, compiled once, and checked against
//! what the host provides (every import resolves, `_start` exists), so an instance start finds
//! nothing wrong that could have been found earlier.

use std::io::Read;
use std::path::Path;

use evp_schemas::dbus::EvpError;
use sha2::{Digest, Sha256};
use wasmtime::{Engine, ExternType, Linker, Memory, MemoryType, Module, SharedMemory, Store};

use crate::abi::{IMPORT_MODULE, MEMORY, START_EXPORT, TABLE_EXPORT};
use crate::host::HostState;
use crate::threads::{THREAD_SPAWN, THREAD_SPAWN_MODULE};

/// Read size while hashing a module file.
const HASH_CHUNK: usize = 64 * 1024;

/// A compiled module, ready for instances.
pub struct LoadedModule {
    /// The module id of the deployment.
    pub id: String,
    /// Where it was loaded from.
    pub location: String,
    /// The compiled code.
    pub module: Module,
    /// The type of `env.memory` when the module imports its memory (threads builds do).
    pub memory_import: Option<MemoryType>,
    /// The export of table 0, through which callbacks are called.
    pub table_export: String,
    /// It imports `wasi.thread-spawn`.
    pub spawns_threads: bool,
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("id", &self.id)
            .field("location", &self.location)
            .field("spawns_threads", &self.spawns_threads)
            .finish_non_exhaustive()
    }
}

/// Compiles the module file. The one place code is compiled: the loader's on-disk cache
/// (keyed by `sha256`, engine and CPU) takes its place.
fn compile(engine: &Engine, sha256: &str, path: &Path) -> Result<Module, String> {
    let _ = sha256;
    Module::from_file(engine, path).map_err(|e| format!("{e:#}"))
}

/// Verifies, compiles and checks a module file; the error is what `LoadModule` answers (and
/// reconcilerd reports as the module's failure).
pub fn load(
    engine: &Engine,
    linker: &Linker<HostState>,
    module_id: &str,
    location: &str,
    sha256: &str,
) -> Result<LoadedModule, EvpError> {
    let invalid = |m: String| EvpError::InvalidArgument(format!("module {module_id}: {m}"));
    if !location.starts_with('/') {
        return Err(invalid(format!("path {location:?} is not absolute")));
    }
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid(format!("sha256 {sha256:?} is not 64 hex digits")));
    }
    let path = Path::new(location);
    let actual = hash_file(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => invalid(format!("file {location} does not exist")),
        _ => EvpError::Io(format!("module {module_id}: reading {location}: {e}")),
    })?;
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(EvpError::InvalidArgument(format!(
            "Module hash mismatch: module {module_id} file {location} has sha256 {actual}, \
             the deployment says {}",
            sha256.to_ascii_lowercase()
        )));
    }
    let module = compile(engine, sha256, path)
        .map_err(|e| invalid(format!("not a valid WASM module: {e}")))?;
    let checked = check(engine, linker, &module).map_err(invalid)?;
    Ok(LoadedModule {
        id: module_id.to_owned(),
        location: location.to_owned(),
        module,
        memory_import: checked.memory_import,
        table_export: TABLE_EXPORT.to_owned(),
        spawns_threads: checked.spawns_threads,
    })
}

/// SHA-256 of a file, in lower hex.
fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// What [`check`] learnt about a module's imports.
struct Checked {
    memory_import: Option<MemoryType>,
    spawns_threads: bool,
}

/// Checks that the module is a WASI command and that every import resolves against the
/// host's linker with the right type; the error is wasmtime's message.
fn check(engine: &Engine, linker: &Linker<HostState>, module: &Module) -> Result<Checked, String> {
    if !matches!(module.get_export(START_EXPORT), Some(ExternType::Func(_))) {
        return Err(format!(
            "it exports no `{START_EXPORT}` function (it must be a WASI command)"
        ));
    }
    let mut memory_import = None;
    let mut spawns_threads = false;
    for import in module.imports() {
        match (import.module(), import.name(), import.ty()) {
            (IMPORT_MODULE, MEMORY, ExternType::Memory(ty)) => memory_import = Some(ty),
            (THREAD_SPAWN_MODULE, THREAD_SPAWN, _) => spawns_threads = true,
            _ => {}
        }
    }
    if spawns_threads && !memory_import.as_ref().is_some_and(MemoryType::is_shared) {
        return Err(format!(
            "it imports {THREAD_SPAWN_MODULE}.{THREAD_SPAWN} but not a shared `{IMPORT_MODULE}.{MEMORY}` \
             for its threads to share"
        ));
    }
    // The imported memory is made per instance; a stand-in of the same type lets wasmtime
    // check everything else.
    let mut linker = linker.clone();
    if let Some(ty) = &memory_import {
        let mut store = Store::new(engine, HostState::detached());
        if ty.is_shared() {
            let memory = SharedMemory::new(engine, ty.clone()).map_err(|e| format!("{e:#}"))?;
            linker.define(&store, IMPORT_MODULE, MEMORY, memory)
        } else {
            let memory = Memory::new(&mut store, ty.clone()).map_err(|e| format!("{e:#}"))?;
            linker.define(&store, IMPORT_MODULE, MEMORY, memory)
        }
        .map_err(|e| format!("{e:#}"))?;
    }
    linker
        .instantiate_pre(module)
        .map_err(|e| format!("{e:#}"))?;
    Ok(Checked {
        memory_import,
        spawns_threads,
    })
}
