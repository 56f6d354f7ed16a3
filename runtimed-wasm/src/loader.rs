//! Checks a `.wasm` file before it is compiled: it must validate with the features the engine
//! enables, have the exports the SDK host calls need (SDK.md §3.6), and export its indirect
//! function table, which the host needs to call callbacks by index; a module that does not
//! export table 0 (wasm-ld's default) is rewritten to export it.

use std::convert::Infallible;

use wasm_encoder::reencode::{self, Reencode};
use wasmparser::types::Types;
use wasmparser::{
    CompositeInnerType, ExternalKind, FuncType, Parser, Payload, TypeRef, ValType, Validator,
    WasmFeatures,
};

/// The export name given to table 0 when the module does not export it already.
pub const TABLE_EXPORT: &str = "__evp_indirect_function_table";

/// The first bytes of a WAMR AOT or XIP file (a `.wasm` starts with `\0asm`).
const WAMR_AOT_MAGIC: &[u8; 4] = b"\0aot";

/// The wasm proposals a module may use: wasmtime 48's defaults for this build (the WASM 3.0
/// set less GC types and exceptions, which need wasmtime's `gc` feature, not enabled here)
/// plus threads and shared memory, which `wasm32-wasi-threads` modules need. The engine's
/// config must enable the same set, so that a module refused here would be refused there.
pub const WASM_FEATURES: WasmFeatures = WasmFeatures::WASM3
    .difference(WasmFeatures::GC_TYPES)
    .difference(WasmFeatures::EXCEPTIONS)
    .union(WasmFeatures::THREADS);

/// Why a module cannot be loaded. Each message says what is wrong with the module (or with the
/// host, for the cache variants) in words a module author can act on.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is a WAMR AOT/XIP file, which only WAMR runs.
    #[error("WAMR AOT/XIP files cannot run on wasmtime; deploy the .wasm")]
    WamrAot,
    /// The binary does not validate (garbage, truncated, a proposal the engine does not
    /// enable); carries wasmparser's message, which includes the byte offset.
    #[error("the module does not validate: {0}")]
    Invalid(String),
    /// Exports the agent calls are missing or have the wrong kind or signature.
    #[error("the module lacks what the EVP agent needs: {}", .0.join("; "))]
    MissingExports(Vec<String>),
    /// The module already exports something else under [`TABLE_EXPORT`], so table 0 cannot be
    /// exported under that name.
    #[error("the module exports {TABLE_EXPORT:?} but not as its table 0")]
    TableExportTaken,
    /// Re-encoding the module to add the table export failed (wasm-encoder's message).
    #[error("adding the table export to the module failed: {0}")]
    Rewrite(String),
    /// The module hash given to the cache is not 64 hex digits.
    #[error("module hash {0:?} is not a SHA-256 in hex")]
    BadHash(String),
    /// The module file could not be read.
    #[error("reading the module {path}: {message}")]
    Read {
        /// The module file.
        path: String,
        /// The OS error.
        message: String,
    },
    /// The module file's SHA-256 is not the one the deployment names.
    #[error("the module's SHA-256 is {actual}, not {expected} as the deployment says")]
    HashMismatch {
        /// The hash the deployment gave.
        expected: String,
        /// The hash of the file on disk.
        actual: String,
    },
    /// wasmtime refused to compile the module; carries wasmtime's message.
    #[error("wasmtime cannot compile the module: {0}")]
    Compile(String),
    /// The compiled-code cache directory cannot be made private to the daemon's user.
    #[error("the compiled-module cache {dir}: {message}")]
    CacheDir {
        /// The cache directory.
        dir: String,
        /// What is wrong with it.
        message: String,
    },
}

/// Where the module's linear memory (memory 0) comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryInfo {
    /// `(module, name)` when the memory is imported (wasm-ld `--import-memory`, the default for
    /// `wasm32-wasi-threads`): the host must provide it.
    pub import: Option<(String, String)>,
    /// The name memory 0 is exported under, `memory` for modules linked by wasm-ld.
    pub export: Option<String>,
    /// A shared memory (threads proposal).
    pub shared: bool,
    /// Initial size in 64 KiB pages.
    pub initial_pages: u64,
    /// Maximum size in 64 KiB pages, when declared.
    pub maximum_pages: Option<u64>,
}

/// What the host needs to know about a module to instantiate it and call into it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModuleInfo {
    /// The export name of table 0 (the indirect function table callbacks index into), or
    /// `None` when the module has no table and so cannot register callbacks.
    pub table_export: Option<String>,
    /// Whether loading added that export ([`TABLE_EXPORT`]) rather than finding it.
    pub table_export_added: bool,
    /// The module imports `wasi.thread-spawn` (wasi-threads).
    pub imports_thread_spawn: bool,
    /// The module's linear memory.
    pub memory: MemoryInfo,
}

impl ModuleInfo {
    /// The module declares (or imports) a shared linear memory.
    pub fn shared_memory(&self) -> bool {
        self.memory.shared
    }
}

/// A module ready to compile.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The binary to compile: the input, or the input with table 0 exported.
    pub wasm: Vec<u8>,
    /// What the host needs about it.
    pub info: ModuleInfo,
}

/// Checks `wasm` and returns the binary to compile, with table 0 exported.
pub fn prepare(wasm: &[u8]) -> Result<Prepared, LoadError> {
    if wasm.starts_with(WAMR_AOT_MAGIC) {
        return Err(LoadError::WamrAot);
    }
    let types = Validator::new_with_features(WASM_FEATURES)
        .validate_all(wasm)
        .map_err(invalid)?;
    let surface = Surface::read(wasm)?;
    let memory = check_exports(&surface, &types)?;

    let found_table_export = surface.export_of(ExternalKind::Table, 0).map(str::to_owned);
    let add_table_export = types.as_ref().table_count() > 0 && found_table_export.is_none();
    let info = ModuleInfo {
        table_export: if add_table_export {
            Some(TABLE_EXPORT.to_owned())
        } else {
            found_table_export
        },
        table_export_added: add_table_export,
        imports_thread_spawn: surface
            .imports
            .iter()
            .any(|i| i.module == "wasi" && i.name == "thread-spawn" && i.is_func),
        memory,
    };
    let wasm = if add_table_export {
        if surface.exports.iter().any(|e| e.name == TABLE_EXPORT) {
            return Err(LoadError::TableExportTaken);
        }
        export_table_zero(wasm)?
    } else {
        wasm.to_vec()
    };
    Ok(Prepared { wasm, info })
}

/// An import, as far as loading cares.
struct ImportEntry {
    module: String,
    name: String,
    is_func: bool,
    memory: Option<wasmparser::MemoryType>,
}

/// An export.
struct ExportEntry {
    name: String,
    kind: ExternalKind,
    index: u32,
}

/// The module's imports and exports, read from an already validated binary.
struct Surface {
    imports: Vec<ImportEntry>,
    exports: Vec<ExportEntry>,
}

/// wasmparser's refusal as a one-line message: some of its messages pretty-print byte
/// arrays over several lines, and a failure message is one line at the hub and in the log.
fn invalid(e: wasmparser::BinaryReaderError) -> LoadError {
    LoadError::Invalid(
        e.to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    )
}

impl Surface {
    fn read(wasm: &[u8]) -> Result<Self, LoadError> {
        let mut surface = Surface {
            imports: Vec::new(),
            exports: Vec::new(),
        };
        for payload in Parser::new(0).parse_all(wasm) {
            match payload.map_err(invalid)? {
                Payload::ImportSection(section) => {
                    for import in section.into_imports() {
                        let import = import.map_err(invalid)?;
                        surface.imports.push(ImportEntry {
                            module: import.module.to_owned(),
                            name: import.name.to_owned(),
                            is_func: matches!(import.ty, TypeRef::Func(_) | TypeRef::FuncExact(_)),
                            memory: match import.ty {
                                TypeRef::Memory(ty) => Some(ty),
                                _ => None,
                            },
                        });
                    }
                }
                Payload::ExportSection(section) => {
                    for export in section {
                        let export = export.map_err(invalid)?;
                        surface.exports.push(ExportEntry {
                            name: export.name.to_owned(),
                            kind: export.kind,
                            index: export.index,
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(surface)
    }

    /// The name `(kind, index)` is exported under; `memory` first for memory 0, as wasm-ld
    /// names it.
    fn export_of(&self, kind: ExternalKind, index: u32) -> Option<&str> {
        let mut names = self
            .exports
            .iter()
            .filter(|e| e.kind == kind && e.index == index)
            .map(|e| e.name.as_str());
        let first = names.next()?;
        Some(
            std::iter::once(first)
                .chain(names)
                .find(|n| *n == "memory")
                .unwrap_or(first),
        )
    }

    fn export_named(&self, name: &str) -> Option<&ExportEntry> {
        self.exports.iter().find(|e| e.name == name)
    }
}

/// The function exports the host calls (SDK.md §3.6), with their wasm types.
fn required_functions() -> [(&'static str, FuncType, &'static str); 3] {
    [
        ("_start", FuncType::new([], []), "the WASI command entry"),
        (
            "malloc",
            FuncType::new([ValType::I32], [ValType::I32]),
            "link with -Wl,--export=malloc",
        ),
        (
            "free",
            FuncType::new([ValType::I32], []),
            "link with -Wl,--export=free",
        ),
    ]
}

/// Checks the exports and returns where memory 0 comes from; lists every problem at once.
fn check_exports(surface: &Surface, types: &Types) -> Result<MemoryInfo, LoadError> {
    let types = types.as_ref();
    let mut problems = Vec::new();
    for (name, expected, hint) in required_functions() {
        match surface.export_named(name) {
            None => problems.push(format!("no export `{name}` ({hint})")),
            Some(e) if !matches!(e.kind, ExternalKind::Func | ExternalKind::FuncExact) => {
                problems.push(format!("export `{name}` is not a function"));
            }
            Some(e) => match &types[types.core_function_at(e.index)].composite_type.inner {
                CompositeInnerType::Func(ty) if ty == &expected => {}
                CompositeInnerType::Func(ty) => {
                    problems.push(format!(
                        "export `{name}` has type {ty}, expected {expected}"
                    ));
                }
                _ => problems.push(format!("export `{name}` is not a plain function")),
            },
        }
    }
    let memory = if types.memory_count() == 0 {
        problems.push("no linear memory".to_owned());
        None
    } else {
        let ty = types.memory_at(0);
        // Imports come first in the index space, so memory 0 is the first imported memory.
        let import = surface
            .imports
            .iter()
            .find(|i| i.memory.is_some())
            .map(|i| (i.module.clone(), i.name.clone()));
        let export = surface
            .export_of(ExternalKind::Memory, 0)
            .map(str::to_owned);
        if import.is_none() && export.is_none() {
            problems.push("memory 0 is neither exported (as `memory`) nor imported".to_owned());
        }
        if ty.memory64 {
            problems.push("memory 0 is a 64-bit memory; EVP modules are wasm32".to_owned());
        }
        Some(MemoryInfo {
            import,
            export,
            shared: ty.shared,
            initial_pages: ty.initial,
            maximum_pages: ty.maximum,
        })
    };
    match memory {
        Some(memory) if problems.is_empty() => Ok(memory),
        _ => Err(LoadError::MissingExports(problems)),
    }
}

/// Re-encodes `wasm` with one more export, table 0 as [`TABLE_EXPORT`]. Function bodies and
/// custom sections are copied as bytes, so code offsets (DWARF) and names stay as they were;
/// the other sections are re-encoded entry by entry, which keeps their meaning.
fn export_table_zero(wasm: &[u8]) -> Result<Vec<u8>, LoadError> {
    let mut exporter = TableExporter { added: false };
    let mut module = wasm_encoder::Module::new();
    exporter
        .parse_core_module(&mut module, Parser::new(0), wasm)
        .map_err(|e| LoadError::Rewrite(e.to_string()))?;
    if !exporter.added {
        // Only a module without an export section gets here, and `_start` is required.
        return Err(LoadError::Rewrite(
            "the module has no export section".to_owned(),
        ));
    }
    Ok(module.finish())
}

/// A round-trip re-encoder that appends the table export to the export section.
struct TableExporter {
    added: bool,
}

impl Reencode for TableExporter {
    type Error = Infallible;

    fn parse_export_section(
        &mut self,
        exports: &mut wasm_encoder::ExportSection,
        section: wasmparser::ExportSectionReader<'_>,
    ) -> Result<(), reencode::Error<Infallible>> {
        reencode::utils::parse_export_section(self, exports, section)?;
        exports.export(TABLE_EXPORT, wasm_encoder::ExportKind::Table, 0);
        self.added = true;
        Ok(())
    }

    fn parse_function_body(
        &mut self,
        code: &mut wasm_encoder::CodeSection,
        func: wasmparser::FunctionBody<'_>,
    ) -> Result<(), reencode::Error<Infallible>> {
        code.raw(func.as_bytes());
        Ok(())
    }

    fn parse_custom_section(
        &mut self,
        module: &mut wasm_encoder::Module,
        section: wasmparser::CustomSectionReader<'_>,
    ) -> Result<(), reencode::Error<Infallible>> {
        module.section(&wasm_encoder::CustomSection {
            name: section.name().into(),
            data: section.data().into(),
        });
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
