//! The tests' payloads as fuzz seeds: with `EVP_FUZZ_SEEDS=<dir>` set, the round-trip tests
//! save each payload they encode as `<dir>/<target>/<name>` (fuzz/README.md says how).

/// Saves `payload` for the fuzz target `target` when `EVP_FUZZ_SEEDS` names a folder.
pub(crate) fn save(target: &str, name: &str, payload: &[u8]) {
    let Some(dir) = std::env::var_os("EVP_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::Path::new(&dir).join(target);
    std::fs::create_dir_all(&dir).expect("the seed folder");
    std::fs::write(dir.join(name), payload).expect("a seed file");
}
