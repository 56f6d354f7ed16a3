//! The EVP WASM host ABI as data (SDK.md §3.6): the `env` imports with their WAMR signatures,
//! the callback types, and the constants both sides rely on. The linker in `host` defines
//! exactly these functions; a test holds the two together.

/// The module name every SDK function is imported from.
pub const IMPORT_MODULE: &str = "env";

/// What `EVP_initialize` returns and every other call expects as its handle.
pub const HANDLE: i32 = 0x1234;

/// The guest's allocator, which the host uses to hand data in (and `getWorkspaceDirectory`'s
/// string out).
pub const MALLOC_EXPORT: &str = "malloc";
/// Frees what the host allocated with [`MALLOC_EXPORT`] once a callback returned.
pub const FREE_EXPORT: &str = "free";
/// The WASI command's entry.
pub const START_EXPORT: &str = "_start";
/// The linear memory, defined by the module or imported as `env.memory` (threads builds).
pub const MEMORY: &str = "memory";

/// More entries than this in one `EVP_sendTelemetry` give `EVP_TOOBIG`.
pub const MAX_TELEMETRY_ENTRIES: u32 = 1000;
/// More headers than this on one HTTP_EXT blob request give `EVP_TOOBIG`.
pub const MAX_HTTP_EXT_HEADERS: u32 = 100;
/// `EVP_BLOB_TYPE` values go up to HTTP_EXT (4); above is `EVP_INVAL`.
pub const MAX_BLOB_TYPE: i32 = 4;

/// A wasm value type of the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ty {
    /// Pointers, lengths, enums, handles, callbacks.
    I32,
    /// `EVP_RPC_ID`.
    I64,
}

/// One `env` import: its name and WAMR signature, as SDK.md §3.6 lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Import {
    /// The C name, which is also the import name.
    pub name: &'static str,
    /// WAMR's signature letters: `i` i32, `I` i64, `*` pointer, `~` its length, `$` string.
    pub wamr: &'static str,
}

/// Every `env.EVP_*` function the host provides (`EVP_blobGetUploadURL` is not among them).
pub const IMPORTS: [Import; 20] = [
    imp("EVP_initialize", "()i"),
    imp("EVP_getWorkspaceDirectory", "(ii)i"),
    imp("EVP_setConfigurationCallback", "(iii)i"),
    imp("EVP_sendState", "(i$*~ii)i"),
    imp("EVP_setMessageCallback", "(iii)i"),
    imp("EVP_setRpcCallback", "(iii)i"),
    imp("EVP_blobOperation", "(iiiiiii)i"),
    imp("EVP_BlobRequestHttpExt_initialize", "()i"),
    imp("EVP_BlobRequestHttpExt_addHeader", "(iii)i"),
    imp("EVP_BlobRequestHttpExt_addAzureHeader", "(i)i"),
    imp("EVP_BlobRequestHttpExt_setUrl", "(ii)i"),
    imp("EVP_BlobRequestHttpExt_free", "(i)"),
    imp("EVP_sendMessage", "(i$*~ii)i"),
    imp("EVP_sendTelemetry", "(iiiii)i"),
    imp("EVP_sendRpcResponse", "(iI$iii)i"),
    imp("EVP_processEvent", "(ii)i"),
    imp("EVP_streamInputOpen", "(i$iii)i"),
    imp("EVP_streamOutputOpen", "(i$i)i"),
    imp("EVP_streamClose", "(ii)i"),
    imp("EVP_streamWrite", "(ii*~)i"),
];

const fn imp(name: &'static str, wamr: &'static str) -> Import {
    Import { name, wamr }
}

/// Why a WAMR signature could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("WAMR signature {0:?} is not `(params)results` with letters i I * ~ $")]
pub struct BadSignature(pub String);

/// The wasm type of a WAMR signature: every letter but `I` is an i32 at the wasm level.
pub fn wasm_type(wamr: &str) -> Result<(Vec<Ty>, Vec<Ty>), BadSignature> {
    let bad = || BadSignature(wamr.to_owned());
    let rest = wamr.strip_prefix('(').ok_or_else(bad)?;
    let (params, results) = rest.split_once(')').ok_or_else(bad)?;
    let letters = |s: &str| -> Result<Vec<Ty>, BadSignature> {
        s.chars()
            .map(|c| match c {
                'i' | '*' | '~' | '$' => Ok(Ty::I32),
                'I' => Ok(Ty::I64),
                _ => Err(bad()),
            })
            .collect()
    };
    let results = letters(results)?;
    if results.len() > 1 {
        return Err(bad());
    }
    Ok((letters(params)?, results))
}

/// The callbacks the host calls through the table, with their wasm parameter types (none
/// returns a value, except the blob I/O callback, which returns an `EVP_BLOB_IO_RESULT`).
pub mod callback {
    use super::Ty::{self, I32, I64};

    /// configuration: (topic, data, len, user).
    pub const CONFIGURATION: &[Ty] = &[I32, I32, I32, I32];
    /// state, message-sent, telemetry, rpc-response: (reason, user).
    pub const REASON: &[Ty] = &[I32, I32];
    /// message-received: (topic, data, len, user).
    pub const MESSAGE_RECEIVED: &[Ty] = &[I32, I32, I32, I32];
    /// rpc-request: (id, method, params, user); the id is an i64.
    pub const RPC_REQUEST: &[Ty] = &[I64, I32, I32, I32];
    /// blob io (a memory GET or PUT chunk): (buf, len, user) -> i32 `EVP_BLOB_IO_RESULT`.
    pub const BLOB_IO: &[Ty] = &[I32, I32, I32];
}

#[cfg(test)]
mod tests {
    use super::Ty::{I32, I64};
    use super::*;

    #[test]
    fn wamr_signatures_become_wasm_types() {
        fn check(wamr: &str, expect: Result<(Vec<Ty>, Vec<Ty>), ()>) {
            assert_eq!(
                wasm_type(wamr).map_err(|_| ()),
                expect,
                "signature {wamr:?}"
            );
        }
        check("()i", Ok((vec![], vec![I32])));
        check("(i)", Ok((vec![I32], vec![])));
        check("(i$*~ii)i", Ok((vec![I32; 6], vec![I32])));
        check(
            "(iI$iii)i",
            Ok((vec![I32, I64, I32, I32, I32, I32], vec![I32])),
        );
        check("ii)i", Err(()));
        check("(ii", Err(()));
        check("(x)i", Err(()));
        check("()ii", Err(()));
    }

    #[test]
    fn every_import_has_a_readable_signature_and_a_unique_name() {
        let mut names: Vec<&str> = IMPORTS.iter().map(|i| i.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), IMPORTS.len());
        for import in IMPORTS {
            wasm_type(import.wamr).unwrap();
            assert!(import.name.starts_with("EVP_"), "{}", import.name);
        }
        assert!(!names.contains(&"EVP_blobGetUploadURL"));
    }
}
