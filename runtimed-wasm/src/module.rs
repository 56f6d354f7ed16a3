//! `LoadModule`: a module file checked and compiled once (the loader and the on-disk cache of
//! compiled code), then checked against what the host provides (every import resolves with its
//! type), so an instance start finds nothing wrong that could have been found earlier.

use std::path::Path;

use evp_schemas::dbus::EvpError;
use wasmtime::{Engine, ExternType, Linker, Memory, MemoryType, Module, SharedMemory, Store};

use crate::abi::{IMPORT_MODULE, MEMORY};
use crate::cache::{CacheOutcome, ModuleCache};
use crate::host::HostState;
use crate::loader::{self, LoadError};
use crate::threads::{THREAD_SPAWN, THREAD_SPAWN_MODULE};

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
    /// The export of table 0, through which callbacks are called; `None` for a module without
    /// a table (it cannot register callbacks).
    pub table_export: Option<String>,
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

/// A compiled module and its table export, and whether it came from the cache (for the log).
struct Compiled {
    module: Module,
    table_export: Option<String>,
    outcome: CacheOutcome,
}

/// Compiles the module file: from the cache of compiled code when there is one, else checked
/// and rewritten by the loader and compiled here (the cache directory could not be used).
fn compile(
    engine: &Engine,
    cache: Option<&ModuleCache>,
    sha256: &str,
    path: &Path,
) -> Result<Compiled, LoadError> {
    if let Some(cache) = cache {
        let cached = cache.load(engine, sha256, path)?;
        return Ok(Compiled {
            module: cached.module,
            table_export: cached.info.table_export,
            outcome: cached.outcome,
        });
    }
    let wasm = std::fs::read(path).map_err(|e| LoadError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let prepared = loader::prepare(&wasm)?;
    let module =
        Module::new(engine, &prepared.wasm).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
    Ok(Compiled {
        module,
        table_export: prepared.info.table_export,
        outcome: CacheOutcome::Compiled,
    })
}

/// Checks, compiles and checks again a module file; the error is what `LoadModule` answers
/// (and reconcilerd reports as the module's failure).
pub fn load(
    engine: &Engine,
    linker: &Linker<HostState>,
    cache: Option<&ModuleCache>,
    module_id: &str,
    location: &str,
    sha256: &str,
) -> Result<(LoadedModule, CacheOutcome), EvpError> {
    let invalid = |m: String| EvpError::InvalidArgument(format!("module {module_id}: {m}"));
    if !location.starts_with('/') {
        return Err(invalid(format!("path {location:?} is not absolute")));
    }
    let path = Path::new(location);
    if !path.exists() {
        return Err(invalid(format!("file {location} does not exist")));
    }
    let compiled = compile(engine, cache, sha256, path).map_err(|e| match e {
        // EVP's failure message for it.
        LoadError::HashMismatch { .. } => {
            EvpError::InvalidArgument(format!("Module hash mismatch: module {module_id}: {e}"))
        }
        LoadError::CacheDir { .. } => EvpError::Io(format!("module {module_id}: {e}")),
        other => invalid(other.to_string()),
    })?;
    let checked = check(engine, linker, &compiled.module).map_err(invalid)?;
    let loaded = LoadedModule {
        id: module_id.to_owned(),
        location: location.to_owned(),
        module: compiled.module,
        memory_import: checked.memory_import,
        table_export: compiled.table_export,
        spawns_threads: checked.spawns_threads,
    };
    Ok((loaded, compiled.outcome))
}

/// What [`check`] learnt about a module's imports.
struct Checked {
    memory_import: Option<MemoryType>,
    spawns_threads: bool,
}

/// Checks that every import resolves against the host's linker with the right type (the
/// loader checked the exports); the error is wasmtime's message.
fn check(engine: &Engine, linker: &Linker<HostState>, module: &Module) -> Result<Checked, String> {
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
