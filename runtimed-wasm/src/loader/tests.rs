use super::*;

// Pieces of a module as wasm-ld links an EVP C module: memory, `_start`, `malloc` and `free`
// exported, and an indirect function table that is not exported.
const MEMORY: &str = r#"(memory (export "memory") 1)"#;
const START: &str = r#"(func (export "_start"))"#;
const MALLOC: &str = r#"(func (export "malloc") (param i32) (result i32) i32.const 0)"#;
const FREE: &str = r#"(func (export "free") (param i32))"#;
/// Two callbacks at indices 1 and 2, told apart by what they return.
const TABLE: &str = r#"(table 3 funcref)
    (elem (i32.const 1) func $ten $twenty)
    (func $ten (result i32) i32.const 10)
    (func $twenty (result i32) i32.const 20)"#;

/// The module made of `parts`.
pub(crate) fn wasm(parts: &[&str]) -> Vec<u8> {
    let text = format!("(module {})", parts.join("\n"));
    wat::parse_str(&text).unwrap_or_else(|e| panic!("test module does not parse: {e}\n{text}"))
}

/// A module as an EVP C module is built: no table export.
pub(crate) fn c_module() -> Vec<u8> {
    wasm(&[MEMORY, TABLE, START, MALLOC, FREE])
}

fn check_refused(case: &str, bytes: &[u8], needle: &str) {
    match prepare(bytes) {
        Ok(_) => panic!("{case}: accepted"),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(needle),
                "{case}: {message:?} lacks {needle:?}"
            );
            // A failure message is one line at the hub and in the log.
            assert!(!message.contains('\n'), "{case}: {message:?} spans lines");
        }
    }
}

fn check_accepted(case: &str, bytes: &[u8], table_export: Option<&str>, added: bool) -> Prepared {
    let prepared = prepare(bytes).unwrap_or_else(|e| panic!("{case}: refused: {e}"));
    assert_eq!(
        prepared.info.table_export.as_deref(),
        table_export,
        "{case}"
    );
    assert_eq!(prepared.info.table_export_added, added, "{case}");
    if !added {
        assert_eq!(
            prepared.wasm, bytes,
            "{case}: rewritten though nothing was added"
        );
    }
    // The engine's own validator accepts what comes out.
    Validator::new_with_features(WASM_FEATURES)
        .validate_all(&prepared.wasm)
        .unwrap_or_else(|e| panic!("{case}: output does not validate: {e}"));
    prepared
}

#[test]
fn refused_modules_say_why() {
    let valid = c_module();
    let mut aot = b"\0aot".to_vec();
    aot.extend_from_slice(&[3, 0, 0, 0, 1, 2, 3, 4]);
    let wrong_malloc = r#"(func (export "malloc") (param i32 i32) (result i32) i32.const 0)"#;
    let taken = r#"(func (export "__evp_indirect_function_table"))"#;
    #[rustfmt::skip]
    let cases: &[(&str, Vec<u8>, &str)] = &[
        ("empty", Vec::new(), "the module does not validate: "),
        ("garbage", b"#!/bin/sh\necho hello\n".to_vec(), "magic header not detected"),
        ("truncated", valid[..valid.len() - 3].to_vec(), "(at offset "),
        ("header only", valid[..8].to_vec(), "no export `_start`"),
        ("WAMR AOT", aot, "WAMR AOT/XIP files cannot run on wasmtime; deploy the .wasm"),
        ("no _start", wasm(&[MEMORY, TABLE, MALLOC, FREE]), "no export `_start`"),
        ("no malloc", wasm(&[MEMORY, START, FREE]), "no export `malloc` (link with -Wl,--export=malloc)"),
        ("no free", wasm(&[MEMORY, START, MALLOC]), "no export `free`"),
        ("malloc type", wasm(&[MEMORY, START, wrong_malloc, FREE]), "export `malloc` has type (func (param i32 i32) (result i32)), expected (func (param i32) (result i32))"),
        ("_start type", wasm(&[r#"(func (export "_start") (export "malloc") (param i32) (result i32) i32.const 0)"#]), "export `_start` has type"),
        ("no memory", wasm(&[START, MALLOC, FREE]), "no linear memory"),
        ("memory hidden", wasm(&["(memory 1)", START, MALLOC, FREE]), "memory 0 is neither exported"),
        ("name taken", wasm(&[MEMORY, TABLE, START, MALLOC, FREE, taken]), "exports \"__evp_indirect_function_table\" but not as its table 0"),
        ("component", wat::parse_str("(component)").unwrap_or_default(), "the module does not validate: "),
    ];
    for (case, bytes, needle) in cases {
        check_refused(case, bytes, needle);
    }
}

#[test]
fn every_problem_is_listed_at_once() {
    check_refused(
        "none",
        &wasm(&[MEMORY]),
        "no export `_start` (the WASI command entry); no export `malloc`",
    );
}

#[test]
fn a_missing_table_export_is_added_and_the_rest_kept() {
    let original = c_module();
    let prepared = check_accepted("C module", &original, Some(TABLE_EXPORT), true);
    assert_eq!(
        code_section(&prepared.wasm),
        code_section(&original),
        "function bodies changed"
    );
    assert_eq!(exports(&prepared.wasm), {
        let mut names = exports(&original);
        names.push((TABLE_EXPORT.to_owned(), ExternalKind::Table, 0));
        names
    });
}

#[test]
fn the_added_export_is_the_table_holding_the_callbacks() {
    let prepared = check_accepted("C module", &c_module(), Some(TABLE_EXPORT), true);
    let engine = wasmtime::Engine::default();
    let module = wasmtime::Module::new(&engine, &prepared.wasm).expect("wasmtime compiles it");
    let mut store = wasmtime::Store::new(&engine, ());
    let instance = wasmtime::Instance::new(&mut store, &module, &[]).expect("instantiates");
    let table = instance
        .get_table(&mut store, TABLE_EXPORT)
        .expect("table exported");
    assert_eq!(table.size(&store), 3);
    assert!(
        table
            .get(&mut store, 0)
            .expect("slot 0")
            .unwrap_func()
            .is_none()
    );
    for (slot, expect) in [(1, 10), (2, 20)] {
        let callback = table
            .get(&mut store, slot)
            .and_then(|r| r.unwrap_func().copied())
            .unwrap_or_else(|| panic!("slot {slot} holds no function"));
        let got = callback
            .typed::<(), i32>(&store)
            .and_then(|f| f.call(&mut store, ()))
            .expect("callback runs");
        assert_eq!(got, expect, "slot {slot}");
    }
}

#[test]
fn tables_already_exported_or_absent_are_left_alone() {
    let own = r#"(export "__indirect_function_table" (table 0))"#;
    let second_table = "(table $other 1 funcref)";
    let own_second = r#"(export "tbl" (table $other))"#;
    #[rustfmt::skip]
    let cases: &[(&str, Vec<u8>, Option<&str>, bool)] = &[
        ("own name", wasm(&[MEMORY, TABLE, START, MALLOC, FREE, own]), Some("__indirect_function_table"), false),
        ("no table", wasm(&[MEMORY, START, MALLOC, FREE]), None, false),
        ("only table 1 exported", wasm(&[MEMORY, TABLE, second_table, own_second, START, MALLOC, FREE]), Some(TABLE_EXPORT), true),
    ];
    for (case, bytes, table_export, added) in cases {
        check_accepted(case, bytes, *table_export, *added);
    }
}

#[test]
fn a_threads_module_with_imported_shared_memory_is_accepted() {
    // As wasm-ld links `wasm32-wasi-threads`: memory imported (and exported), shared, with
    // atomics in the code, and `wasi.thread-spawn` imported.
    let bytes = wasm(&[
        r#"(import "env" "memory" (memory 2 16 shared))"#,
        r#"(import "wasi" "thread-spawn" (func (param i32) (result i32)))"#,
        r#"(export "memory" (memory 0))"#,
        TABLE,
        r#"(func (export "_start") i32.const 0 i32.const 1 i32.atomic.rmw.add drop
            i32.const 0 i32.const 0 i64.const -1 memory.atomic.wait32 drop)"#,
        MALLOC,
        FREE,
    ]);
    let prepared = check_accepted("threads", &bytes, Some(TABLE_EXPORT), true);
    assert!(prepared.info.imports_thread_spawn);
    assert!(prepared.info.shared_memory());
    assert_eq!(
        prepared.info.memory,
        MemoryInfo {
            import: Some(("env".to_owned(), "memory".to_owned())),
            export: Some("memory".to_owned()),
            shared: true,
            initial_pages: 2,
            maximum_pages: Some(16),
        }
    );
    let engine = wasmtime::Engine::default();
    wasmtime::Module::new(&engine, &prepared.wasm).expect("wasmtime compiles it");
}

#[test]
fn a_plain_module_reports_its_own_memory() {
    let prepared = check_accepted("C module", &c_module(), Some(TABLE_EXPORT), true);
    assert!(!prepared.info.imports_thread_spawn);
    assert!(!prepared.info.shared_memory());
    assert_eq!(prepared.info.memory.import, None);
    assert_eq!(prepared.info.memory.export.as_deref(), Some("memory"));
}

#[test]
fn custom_sections_survive_the_rewrite() {
    let bytes = wasm(&[
        MEMORY,
        TABLE,
        START,
        MALLOC,
        FREE,
        r#"(@custom "producers" "clang 19")"#,
    ]);
    let prepared = check_accepted("custom", &bytes, Some(TABLE_EXPORT), true);
    assert_eq!(custom_sections(&prepared.wasm), custom_sections(&bytes));
    assert!(!custom_sections(&bytes).is_empty());
}

/// The bytes of the code section.
fn code_section(bytes: &[u8]) -> Vec<u8> {
    Parser::new(0)
        .parse_all(bytes)
        .find_map(|p| match p {
            Ok(Payload::CodeSectionStart { range, .. }) => Some(bytes[range].to_vec()),
            _ => None,
        })
        .expect("a code section")
}

fn exports(bytes: &[u8]) -> Vec<(String, ExternalKind, u32)> {
    Surface::read(bytes)
        .expect("readable")
        .exports
        .into_iter()
        .map(|e| (e.name, e.kind, e.index))
        .collect()
}

fn custom_sections(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    Parser::new(0)
        .parse_all(bytes)
        .filter_map(|p| match p {
            Ok(Payload::CustomSection(c)) => Some((c.name().to_owned(), c.data().to_vec())),
            _ => None,
        })
        .collect()
}

#[test]
fn the_features_accepted_are_the_engines() {
    // One module per proposal, and whether this build takes it; the default engine of this
    // build is the reference (the runtime's engine enables the same set). GC and exceptions
    // need wasmtime's `gc` feature, off here; wide arithmetic is off by default.
    #[rustfmt::skip]
    let cases: &[(&str, bool, &str)] = &[
        ("bulk memory", true, "(memory 1) (func i32.const 0 i32.const 0 i32.const 0 memory.copy)"),
        ("simd", true, "(func (result v128) v128.const i64x2 0 0)"),
        ("relaxed simd", true, "(func (param v128 v128 v128) (result v128) local.get 0 local.get 1 local.get 2 f32x4.relaxed_madd)"),
        ("tail calls", true, "(func $f return_call $f)"),
        ("threads", true, "(memory 1 1 shared) (func i32.const 0 i32.const 1 i32.atomic.rmw.add drop)"),
        ("multi memory", true, "(memory 1) (memory 1)"),
        ("memory64", true, "(memory i64 1)"),
        ("extended const", true, "(global i32 (i32.add (i32.const 1) (i32.const 2)))"),
        ("exceptions", false, "(tag $e) (func try_table (catch_all 0) throw $e end)"),
        ("gc", false, "(type $s (struct (field i32))) (func (result (ref null $s)) ref.null $s)"),
        ("wide arithmetic", false, "(func (param i64 i64 i64 i64) (result i64 i64) local.get 0 local.get 1 local.get 2 local.get 3 i64.add128)"),
    ];
    let engine = wasmtime::Engine::default();
    for (case, accepted, body) in cases {
        let bytes = wasm(&[body]);
        let ours = Validator::new_with_features(WASM_FEATURES).validate_all(&bytes);
        let engines = wasmtime::Module::validate(&engine, &bytes);
        assert_eq!(
            (ours.is_ok(), engines.is_ok()),
            (*accepted, *accepted),
            "{case}: loader {:?}, engine {:?}",
            ours.err().map(|e| e.to_string()),
            engines.err().map(|e| e.to_string())
        );
    }
}
