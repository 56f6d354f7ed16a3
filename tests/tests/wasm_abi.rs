//! The WASM ABI of the C SDK header and of the test modules: every module built against
//! `sdk/c/include/evp/sdk.h` imports the SDK from `env` under the names and with the wasm
//! types of the EVP host ABI (docs: SDK.md §3.6, `SDK_IMPORTS` below), and exports what the
//! agent calls. `abi-all` references every function of the header, so a declaration with a
//! wrong type or name fails here. No agent runs in this test: it reads the built files.

use std::collections::BTreeSet;
use std::path::Path;

use evp_system_tests::wasm::{build_c_module, build_threads_module};
use wasmparser::ValType::{self, I32, I64};
use wasmparser::{ExternalKind, FuncType, Parser, Payload, TypeRef};

/// Every import `env.<name>` the agent provides, with its wasm type (params, results). At
/// the wasm level every pointer, `size_t`, enum and handle is an i32; `EVP_RPC_ID` is an i64.
const SDK_IMPORTS: &[(&str, &[ValType], &[ValType])] = &[
    ("EVP_initialize", &[], &[I32]),
    ("EVP_getWorkspaceDirectory", &[I32; 2], &[I32]),
    ("EVP_setConfigurationCallback", &[I32; 3], &[I32]),
    ("EVP_sendState", &[I32; 6], &[I32]),
    ("EVP_setMessageCallback", &[I32; 3], &[I32]),
    ("EVP_setRpcCallback", &[I32; 3], &[I32]),
    ("EVP_blobOperation", &[I32; 7], &[I32]),
    ("EVP_BlobRequestHttpExt_initialize", &[], &[I32]),
    ("EVP_BlobRequestHttpExt_addHeader", &[I32; 3], &[I32]),
    ("EVP_BlobRequestHttpExt_addAzureHeader", &[I32], &[I32]),
    ("EVP_BlobRequestHttpExt_setUrl", &[I32; 2], &[I32]),
    ("EVP_BlobRequestHttpExt_free", &[I32], &[]),
    ("EVP_sendMessage", &[I32; 6], &[I32]),
    ("EVP_sendTelemetry", &[I32; 5], &[I32]),
    (
        "EVP_sendRpcResponse",
        &[I32, I64, I32, I32, I32, I32],
        &[I32],
    ),
    ("EVP_processEvent", &[I32; 2], &[I32]),
    ("EVP_streamInputOpen", &[I32; 5], &[I32]),
    ("EVP_streamOutputOpen", &[I32; 3], &[I32]),
    ("EVP_streamClose", &[I32; 2], &[I32]),
    ("EVP_streamWrite", &[I32; 4], &[I32]),
];

/// The exports the agent calls, with their wasm types: the WASI command's entry, and the
/// allocator it hands callback data through.
const REQUIRED_EXPORTS: &[(&str, &[ValType], &[ValType])] = &[
    ("_start", &[], &[]),
    ("malloc", &[I32], &[I32]),
    ("free", &[I32], &[]),
];

/// The linear memory a module has.
#[derive(Debug, PartialEq)]
enum Memory {
    /// Its own, not shared (`wasm32-wasi`).
    Own,
    /// Imported as `env.memory`, shared (`wasm32-wasip1-threads`: threads instantiate with
    /// the same memory).
    ImportedShared,
}

/// What the ABI test reads from a module.
#[derive(Debug, Default)]
struct Interface {
    /// Each import: (module, name, its type: a function's, or `None` for other kinds).
    imports: Vec<(String, String, Option<FuncType>)>,
    /// Each export: (name, kind, a function's type).
    exports: Vec<(String, ExternalKind, Option<FuncType>)>,
    /// The memory, and whether it is shared.
    memory: Option<(bool, bool)>,
}

fn read_interface(path: &Path) -> Interface {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut types = Vec::new();
    // The type of every function, imported ones first, as the index space counts them.
    let mut functions = Vec::new();
    let mut exports = Vec::new();
    let mut found = Interface::default();
    for payload in Parser::new(0).parse_all(&bytes) {
        match payload.expect("a well-formed module") {
            Payload::TypeSection(r) => {
                for t in r.into_iter_err_on_gc_types() {
                    types.push(t.expect("a function type"));
                }
            }
            Payload::ImportSection(r) => {
                for import in r.into_imports() {
                    let import = import.expect("an import");
                    let ty = match import.ty {
                        TypeRef::Func(i) | TypeRef::FuncExact(i) => {
                            functions.push(i);
                            Some(types[i as usize].clone())
                        }
                        TypeRef::Memory(m) => {
                            found.memory = Some((true, m.shared));
                            None
                        }
                        _ => None,
                    };
                    found
                        .imports
                        .push((import.module.into(), import.name.into(), ty));
                }
            }
            Payload::FunctionSection(r) => {
                functions.extend(r.into_iter().map(|t| t.expect("a function")));
            }
            Payload::MemorySection(r) => {
                for m in r {
                    found.memory = Some((false, m.expect("a memory").shared));
                }
            }
            Payload::ExportSection(r) => {
                for export in r {
                    let export = export.expect("an export");
                    exports.push((export.name.to_owned(), export.kind, export.index));
                }
            }
            _ => {}
        }
    }
    found.exports = exports
        .into_iter()
        .map(|(name, kind, index)| {
            let ty = (kind == ExternalKind::Func)
                .then(|| types[functions[index as usize] as usize].clone());
            (name, kind, ty)
        })
        .collect();
    found
}

fn signature(params: &[ValType], results: &[ValType]) -> FuncType {
    FuncType::new(params.iter().copied(), results.iter().copied())
}

/// Checks the module at `path`: its `env` functions are exactly `sdk` (names without the
/// `EVP_` prefix, space-separated), each with the type of [`SDK_IMPORTS`]; it imports nothing
/// else but WASI (and `env.memory` when its memory is imported); it exports the
/// [`REQUIRED_EXPORTS`] and `memory`, and its memory is as `memory` says.
fn check(path: &Path, sdk: &str, memory: Memory) {
    let module = path.display();
    let found = read_interface(path);
    let mut env = BTreeSet::new();
    for (from, name, ty) in &found.imports {
        match (from.as_str(), name.as_str(), ty) {
            ("env", "memory", None) => assert_eq!(memory, Memory::ImportedShared, "{module}"),
            ("env", _, Some(ty)) => {
                let (_, params, results) = SDK_IMPORTS
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .unwrap_or_else(|| panic!("{module}: env.{name} is not an SDK import"));
                assert_eq!(ty, &signature(params, results), "{module}: env.{name}");
                env.insert(name.as_str());
            }
            ("wasi_snapshot_preview1", _, Some(_)) | ("wasi", "thread-spawn", Some(_)) => {}
            _ => panic!("{module}: unexpected import {from}.{name} {ty:?}"),
        }
    }
    let expected: Vec<String> = sdk.split_whitespace().map(|n| format!("EVP_{n}")).collect();
    let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    assert_eq!(env, expected, "{module}: env imports");
    for (name, params, results) in REQUIRED_EXPORTS {
        let ty = found
            .exports
            .iter()
            .find(|(n, kind, _)| n == name && *kind == ExternalKind::Func)
            .and_then(|(_, _, ty)| ty.as_ref())
            .unwrap_or_else(|| panic!("{module}: no function export {name}"));
        assert_eq!(ty, &signature(params, results), "{module}: export {name}");
    }
    assert!(
        found
            .exports
            .iter()
            .any(|(n, kind, _)| n == "memory" && *kind == ExternalKind::Memory),
        "{module}: memory is not exported"
    );
    // wasm-ld exports the function table only with --export-table, which EVP modules are not
    // built with; the agent calls callbacks through it, so its loader adds the export.
    assert!(
        !found
            .exports
            .iter()
            .any(|(_, kind, _)| *kind == ExternalKind::Table),
        "{module}: the table is exported; EVP modules do not export it, and the runtime must \
         be tested with modules as they are"
    );
    let shared = memory == Memory::ImportedShared;
    assert_eq!(
        found.memory,
        Some((shared, shared)),
        "{module}: (imported, shared) memory"
    );
}

#[test]
fn the_c_test_modules_import_the_sdk_with_its_wasm_types() {
    // "<module>: <the SDK functions it imports>".
    let cases = [
        "echo-state: initialize setConfigurationCallback sendState processEvent",
        "config-telemetry: initialize setConfigurationCallback sendTelemetry processEvent",
        "rpc: initialize setRpcCallback sendRpcResponse processEvent",
        "msg-sender: initialize setConfigurationCallback sendMessage sendState processEvent",
        "msg-receiver: initialize setMessageCallback sendState processEvent",
        "self-exit: initialize setConfigurationCallback sendState processEvent",
        "ignore-exit: initialize setConfigurationCallback sendState processEvent",
        "trap: initialize setConfigurationCallback processEvent",
        "spin: initialize",
        "hog: initialize sendState processEvent",
        "workspace-write: initialize getWorkspaceDirectory setConfigurationCallback sendState processEvent",
        "workspace-read: initialize getWorkspaceDirectory sendState processEvent",
    ];
    for case in cases {
        let (name, sdk) = case.split_once(": ").expect("<module>: <imports>");
        check(&build_c_module(name), sdk, Memory::Own);
    }
}

#[test]
fn the_header_declares_every_sdk_import_with_its_wasm_type() {
    let all: Vec<&str> = SDK_IMPORTS
        .iter()
        .map(|(name, _, _)| name.trim_start_matches("EVP_"))
        .collect();
    check(&build_c_module("abi-all"), &all.join(" "), Memory::Own);
}

#[test]
fn the_threads_module_imports_a_shared_memory_and_the_sdk() {
    let path = build_threads_module();
    check(
        &path,
        "initialize setConfigurationCallback sendState processEvent",
        Memory::ImportedShared,
    );
    let found = read_interface(&path);
    assert!(
        found
            .imports
            .iter()
            .any(|(from, name, _)| from == "wasi" && name == "thread-spawn"),
        "{}: no wasi.thread-spawn import",
        path.display()
    );
}
