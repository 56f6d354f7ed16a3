//! The `[wasm]` section of `agent.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// `[wasm]` settings, each with a default sized for a gateway.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WasmConfig {
    /// The most linear memory one instance may have; growing past it traps the instance and
    /// is its failure. For a threads build (shared memory), its maximum is capped to it.
    pub memory_limit_bytes: u64,
    /// How long a stopped instance has to return from `_start` by itself before it is
    /// interrupted (EVP gives WASM instances 5 s). A `StopInstance` asking less gets less.
    pub stop_grace_ms: u64,
    /// How many instances may run at once; also the pooling allocator's slots.
    pub max_instances: u32,
    /// The host stack of each instance thread; WASM code gets `wasm_stack_bytes` of it.
    pub thread_stack_bytes: usize,
    /// The most native stack WASM code of one instance may use before it traps with a stack
    /// overflow.
    pub wasm_stack_bytes: usize,
    /// Where compiled modules are kept; empty: systemd's `CacheDirectory=` (`$CACHE_DIRECTORY`,
    /// `/var/cache/evp/wasm` in the unit), else `<data_dir>/cache/wasm`.
    pub cache_dir: String,
}

/// 64 MiB: a gateway runs tens to hundreds of instances; EVP modules ask for far less.
pub const DEFAULT_MEMORY_LIMIT: u64 = 64 * 1024 * 1024;
/// Host stack per instance thread: only the pages touched count, and idle instances touch few.
pub const DEFAULT_THREAD_STACK: usize = 1024 * 1024;
/// WASM's share of it; C modules keep their own stack in linear memory, so this holds calls only.
pub const DEFAULT_WASM_STACK: usize = 512 * 1024;
/// Host code above the WASM frames (WASI, the SDK calls, logging) needs at least this.
const HOST_STACK_MARGIN: usize = 256 * 1024;

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            memory_limit_bytes: DEFAULT_MEMORY_LIMIT,
            stop_grace_ms: 5_000,
            max_instances: 1_000,
            thread_stack_bytes: DEFAULT_THREAD_STACK,
            wasm_stack_bytes: DEFAULT_WASM_STACK,
            cache_dir: String::new(),
        }
    }
}

/// A `[wasm]` value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Below one 64 KiB page no module can run; above 4 GiB is more than wasm32 addresses.
    #[error("[wasm] memory_limit_bytes ({0}) must be between 65536 and 4294967296")]
    MemoryLimit(u64),
    /// No instance could start.
    #[error("[wasm] max_instances must be at least 1")]
    NoInstances,
    /// The WASM stack and the host code above it would not fit the thread's stack.
    #[error(
        "[wasm] thread_stack_bytes ({thread}) must exceed wasm_stack_bytes ({wasm}) by at least {margin}"
    )]
    Stack {
        /// `thread_stack_bytes`.
        thread: usize,
        /// `wasm_stack_bytes`.
        wasm: usize,
        /// The host margin.
        margin: usize,
    },
}

impl WasmConfig {
    /// Refuses values that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(65_536..=1 << 32).contains(&self.memory_limit_bytes) {
            return Err(ConfigError::MemoryLimit(self.memory_limit_bytes));
        }
        if self.max_instances == 0 {
            return Err(ConfigError::NoInstances);
        }
        if self.thread_stack_bytes < self.wasm_stack_bytes.saturating_add(HOST_STACK_MARGIN) {
            return Err(ConfigError::Stack {
                thread: self.thread_stack_bytes,
                wasm: self.wasm_stack_bytes,
                margin: HOST_STACK_MARGIN,
            });
        }
        Ok(())
    }

    /// The compiled-module cache directory, given systemd's `$CACHE_DIRECTORY` (a `:`-separated
    /// list; its first entry is runtimed-wasm's) and the data root.
    pub fn cache_dir(&self, systemd_cache: Option<&str>, data_dir: &Path) -> PathBuf {
        if !self.cache_dir.is_empty() {
            return PathBuf::from(&self.cache_dir);
        }
        match systemd_cache
            .and_then(|list| list.split(':').next())
            .filter(|d| !d.is_empty())
        {
            Some(dir) => PathBuf::from(dir),
            None => data_dir.join("cache").join("wasm"),
        }
    }

    /// The stop grace as a duration.
    pub fn stop_grace(&self) -> Duration {
        Duration::from_millis(self.stop_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_agent_toml_shows_every_wasm_setting_with_its_default() {
        use evp_daemon::conffile::{PACKAGED, fields_of, shown_keys, uncommented};
        assert_eq!(shown_keys(PACKAGED, "wasm"), fields_of::<WasmConfig>());
        let all = evp_daemon::AgentConfig::parse(&uncommented(PACKAGED)).unwrap();
        let section: WasmConfig = all.section("wasm").unwrap();
        assert_eq!(section, WasmConfig::default());
    }

    fn parse(text: &str) -> WasmConfig {
        evp_daemon::AgentConfig::parse(text)
            .unwrap()
            .section("wasm")
            .unwrap()
    }

    #[test]
    fn defaults_are_gateway_sized_and_valid() {
        let c = parse("");
        assert_eq!(c.memory_limit_bytes, 64 << 20);
        assert_eq!(c.stop_grace(), Duration::from_secs(5));
        c.validate().unwrap();
    }

    #[test]
    fn values_that_cannot_work_are_refused() {
        fn check(text: &str, expect: Result<(), &str>) {
            let got = parse(text).validate().map_err(|e| e.to_string());
            match expect {
                Ok(()) => assert_eq!(got, Ok(()), "{text}"),
                Err(part) => assert!(
                    got.as_ref().is_err_and(|m| m.contains(part)),
                    "{text}: {got:?}"
                ),
            }
        }
        check("[wasm]\nmemory_limit_bytes = 1048576\n", Ok(()));
        check(
            "[wasm]\nmemory_limit_bytes = 1000\n",
            Err("memory_limit_bytes"),
        );
        check(
            "[wasm]\nmemory_limit_bytes = 8589934592\n",
            Err("memory_limit_bytes"),
        );
        check("[wasm]\nmax_instances = 0\n", Err("max_instances"));
        check(
            "[wasm]\nthread_stack_bytes = 600000\n",
            Err("thread_stack_bytes"),
        );
        check(
            "[wasm]\nthread_stack_bytes = 400000\nwasm_stack_bytes = 131072\n",
            Ok(()),
        );
    }

    #[test]
    fn the_cache_is_systemds_cache_directory_or_under_the_data_root() {
        fn check(configured: &str, systemd: Option<&str>, expect: &str) {
            let c = WasmConfig {
                cache_dir: configured.to_owned(),
                ..WasmConfig::default()
            };
            assert_eq!(c.cache_dir(systemd, Path::new("/data")), Path::new(expect));
        }
        check("", None, "/data/cache/wasm");
        check("", Some(""), "/data/cache/wasm");
        check("", Some("/var/cache/evp/wasm"), "/var/cache/evp/wasm");
        check(
            "",
            Some("/var/cache/evp/wasm:/other"),
            "/var/cache/evp/wasm",
        );
        check("/mine", Some("/var/cache/evp/wasm"), "/mine");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let config = evp_daemon::AgentConfig::parse("[wasm]\nmemory = 1\n").unwrap();
        assert!(config.section::<WasmConfig>("wasm").is_err());
    }
}
