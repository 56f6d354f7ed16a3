//! A test-only crash hook shared by the daemons: with `EVP_TEST_CRASH_AT=<point>` in the
//! environment, a debug build aborts the process right after the named write point, so a
//! system test sees exactly what a power cut at that step leaves on disk (page-cache loss
//! aside, which each daemon's fsync ordering covers). Release builds compile it to nothing.
//! Each daemon lists its own points beside the code that reaches them.

/// Environment variable naming the write point at which a debug build aborts.
pub const CRASH_AT_ENV: &str = "EVP_TEST_CRASH_AT";

/// Aborts the process if `EVP_TEST_CRASH_AT` names `point` (debug builds only); `daemon`
/// names the process in the line it writes first.
#[cfg(debug_assertions)]
pub fn point(daemon: &str, point: &str) {
    if std::env::var(CRASH_AT_ENV).is_ok_and(|v| v == point) {
        // stderr is unbuffered: the line is out before the abort.
        eprintln!("{daemon}: {CRASH_AT_ENV}={point}: aborting as asked");
        std::process::abort();
    }
}

/// Release builds have no crash hook.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_daemon: &str, _point: &str) {}
