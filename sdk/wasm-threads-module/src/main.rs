//! An EVP WASM module that runs threads on a shared memory: built for `wasm32-wasip1-threads`,
//! it declares a shared linear memory and imports `wasi.thread-spawn` (through std's threads),
//! as EVP modules built with clang for `wasm32-wasi-threads` and `-pthread` do. The SDK is
//! imported from `env` under the C names of `evp/sdk.h`, as a C module imports it.
//!
//! Behaviour: the configuration `count` = N (decimal text) starts 4 threads that each add 1
//! to one shared atomic counter N times; once they are joined the module reports the state
//! `count` = the total (4N). It returns from `main` when the agent asks it to exit.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many threads share the work.
const THREADS: u64 = 4;
/// `EVP_SHOULDEXIT`.
const SHOULD_EXIT: c_int = 1;
/// `EVP_OK`.
const OK: c_int = 0;

type ConfigurationCallback = extern "C" fn(*const c_char, *const c_void, usize, *mut c_void);
type StateCallback = extern "C" fn(c_int, *mut c_void);

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn EVP_initialize() -> *mut c_void;
    fn EVP_setConfigurationCallback(
        h: *mut c_void,
        cb: ConfigurationCallback,
        user: *mut c_void,
    ) -> c_int;
    fn EVP_sendState(
        h: *mut c_void,
        topic: *const c_char,
        state: *const c_void,
        len: usize,
        cb: StateCallback,
        user: *mut c_void,
    ) -> c_int;
    fn EVP_processEvent(h: *mut c_void, timeout_ms: c_int) -> c_int;
}

/// The run the last `count` configuration asked for; 0 when idle. The callback runs on the
/// main thread, inside `EVP_processEvent`.
static WANTED: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_configuration(
    topic: *const c_char,
    data: *const c_void,
    len: usize,
    _: *mut c_void,
) {
    // SAFETY: the agent passes a NUL-terminated topic and `len` bytes of data, valid for the
    // duration of the callback.
    let (topic, value) = unsafe {
        (
            CStr::from_ptr(topic),
            std::slice::from_raw_parts(data.cast::<u8>(), len),
        )
    };
    if topic.to_bytes() != b"count" {
        return;
    }
    match String::from_utf8_lossy(value)
        .trim()
        .trim_matches('"')
        .parse()
    {
        Ok(n) => WANTED.store(n, Ordering::SeqCst),
        Err(_) => eprintln!("wasm-threads: count is not a number"),
    }
}

/// Frees the state buffer once the agent has it (it must live until then).
extern "C" fn free_state(_reason: c_int, buffer: *mut c_void) {
    // SAFETY: `buffer` is the box leaked in `report`, given back exactly once.
    drop(unsafe { Box::from_raw(buffer.cast::<Vec<u8>>()) });
}

/// Adds 1 to a shared counter `n` times on each of [`THREADS`] threads; the total.
fn count_on_threads(n: u64) -> u64 {
    let total = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let total = Arc::clone(&total);
            std::thread::spawn(move || {
                for _ in 0..n {
                    total.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        if w.join().is_err() {
            eprintln!("wasm-threads: a thread panicked");
        }
    }
    total.load(Ordering::SeqCst)
}

/// Reports the state `count` = `total`.
fn report(h: *mut c_void, total: u64) {
    let state = Box::new(total.to_string().into_bytes());
    let (ptr, len) = (state.as_ptr().cast::<c_void>(), state.len());
    let user = Box::into_raw(state).cast::<c_void>();
    // SAFETY: the topic is NUL-terminated; the buffer lives until `free_state` gets it back.
    let r = unsafe { EVP_sendState(h, c"count".as_ptr(), ptr, len, free_state, user) };
    if r != OK {
        eprintln!("wasm-threads: state refused: {r}");
        free_state(r, user);
    }
}

fn main() {
    println!("wasm-threads: started");
    // SAFETY: called once, from the main thread, as the SDK requires.
    let h = unsafe { EVP_initialize() };
    // SAFETY: the callback is a plain function that matches the SDK's prototype.
    unsafe { EVP_setConfigurationCallback(h, on_configuration, std::ptr::null_mut()) };
    // SAFETY: `h` is the handle EVP_initialize returned.
    while unsafe { EVP_processEvent(h, 100) } != SHOULD_EXIT {
        let n = WANTED.swap(0, Ordering::SeqCst);
        if n > 0 {
            let total = count_on_threads(n);
            eprintln!("wasm-threads: {THREADS} threads counted {total}");
            report(h, total);
        }
    }
    eprintln!("wasm-threads: leaving");
}
