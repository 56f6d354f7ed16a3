//! An instance's memory limit, enforced by wasmtime as it grows memories and tables. Growing
//! linear memory past the limit traps the instance, and the failure names the limit; tables
//! (host memory, not linear memory) are capped so a module cannot grow them without end.

use wasmtime::ResourceLimiter;

/// Most elements a table may grow to: far above what C modules use (a few hundred
/// functions), and small in host memory (8 bytes each).
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The limits of one store.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The most linear memory, in bytes.
    pub memory_bytes: u64,
    /// Set when the memory limit was hit: the failure to report.
    pub hit: Option<String>,
}

impl Limits {
    /// Limits with `memory_bytes` of linear memory.
    pub fn new(memory_bytes: u64) -> Limits {
        Limits {
            memory_bytes,
            hit: None,
        }
    }
}

/// The failure message of an instance that hit its limit.
pub fn limit_message(desired: u64, limit: u64) -> String {
    format!(
        "memory limit reached: growing linear memory to {desired} bytes exceeds the instance's \
         limit of {limit} bytes ([wasm] memory_limit_bytes)"
    )
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_bytes {
            let message = limit_message(desired as u64, self.memory_bytes);
            self.hit = Some(message.clone());
            return Err(wasmtime::Error::msg(message));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_past_the_limit_fails_and_is_remembered() {
        fn check(limit: u64, desired: usize, expect: Option<bool>) {
            let mut l = Limits::new(limit);
            let got = l.memory_growing(0, desired, None).ok();
            assert_eq!(got, expect, "{desired} of {limit}");
            assert_eq!(l.hit.is_some(), expect.is_none());
        }
        check(1 << 20, 65536, Some(true));
        check(1 << 20, 1 << 20, Some(true));
        check(1 << 20, (1 << 20) + 65536, None);
        let mut l = Limits::new(1 << 20);
        let e = l.memory_growing(0, 2 << 20, None).unwrap_err();
        assert!(e.to_string().contains("limit of 1048576 bytes"), "{e}");
        assert!(l.table_growing(0, MAX_TABLE_ELEMENTS, None).unwrap());
        assert!(!l.table_growing(0, MAX_TABLE_ELEMENTS + 1, None).unwrap());
    }
}
