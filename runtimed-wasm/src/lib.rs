//! evp-agent runtimed-wasm: WASM modules in wasmtime.
