//! A test-only crash hook: with `EVP_TEST_CRASH_AT=<point>` in the environment, a debug build
//! aborts the process right after the named write point, so a system test sees exactly what a
//! power cut at that step leaves on disk (page-cache loss aside, which the fsync ordering
//! covers). Release builds compile the hook to nothing.
//!
//! Points: `desired-tmp-written` (the new `desired.json.tmp` written, not synced),
//! `desired-tmp-synced` (synced, not renamed), `desired-renamed` (renamed over `desired.json`,
//! directory not synced), which are `evp_daemon::write_atomic`'s points reached through its
//! hook; `module-partial-written` (a module's whole body written and synced to `<hash>.partial`,
//! not verified or renamed), `module-renamed` (the verified file renamed to `<hash>`, directory
//! not synced).

/// Environment variable naming the write point at which a debug build aborts.
pub use evp_daemon::crash::CRASH_AT_ENV;

/// The write points the hook knows.
pub const POINTS: [&str; 5] = [
    "desired-tmp-written",
    "desired-tmp-synced",
    "desired-renamed",
    "module-partial-written",
    "module-renamed",
];

/// Aborts the process if `EVP_TEST_CRASH_AT` names `point` (debug builds only).
pub fn point(point: &str) {
    debug_assert!(POINTS.contains(&point), "unknown crash point {point}");
    evp_daemon::crash::point("evp-reconcilerd", point);
}
