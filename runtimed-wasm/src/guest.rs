//! Reading and writing a guest's linear memory the way the EVP host ABI (SDK.md §3.6) does:
//! every pointer is a 32-bit offset, checked against the memory's size before use (a bad one is
//! `EVP_FAULT`), a NULL string reads as `""`, and the structs have their wasm32 layouts.
//! Pure: it works on anything that looks like linear memory, so the tests use a `Vec<u8>`.

/// A guest's linear memory.
pub trait LinearMemory {
    /// Its current size in bytes.
    fn size(&self) -> usize;
    /// Copies `out.len()` bytes from offset `at`; the range is inside [`LinearMemory::size`].
    fn read_into(&self, at: usize, out: &mut [u8]);
    /// Copies `bytes` to offset `at`; the range is inside [`LinearMemory::size`].
    fn write_from(&mut self, at: usize, bytes: &[u8]);
}

impl LinearMemory for [u8] {
    fn size(&self) -> usize {
        self.len()
    }
    fn read_into(&self, at: usize, out: &mut [u8]) {
        out.copy_from_slice(&self[at..at + out.len()]);
    }
    fn write_from(&mut self, at: usize, bytes: &[u8]) {
        self[at..at + bytes.len()].copy_from_slice(bytes);
    }
}

impl LinearMemory for Vec<u8> {
    fn size(&self) -> usize {
        self.len()
    }
    fn read_into(&self, at: usize, out: &mut [u8]) {
        self.as_slice().read_into(at, out);
    }
    fn write_from(&mut self, at: usize, bytes: &[u8]) {
        self.as_mut_slice().write_from(at, bytes);
    }
}

/// Why guest memory could not be used for a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    /// A pointer (or pointer plus length) reaches past the end of linear memory: `EVP_FAULT`.
    #[error("{len} bytes at guest address {at:#x} are outside linear memory ({size} bytes)")]
    Fault {
        /// The guest address.
        at: u32,
        /// How many bytes were wanted there.
        len: u64,
        /// The memory's size then.
        size: usize,
    },
    /// A string that ends at the end of memory without a NUL: `EVP_FAULT`, as WAMR checks.
    #[error("the string at guest address {0:#x} has no NUL before the end of linear memory")]
    Unterminated(u32),
    /// A string that is not UTF-8, which no SDK message can carry: `EVP_INVAL`.
    #[error("the string at guest address {0:#x} is not UTF-8")]
    NotUtf8(u32),
}

/// How much of a string is scanned per copy while looking for its NUL.
const SCAN_CHUNK: usize = 256;

/// Checks that `len` bytes at `at` are inside `mem` and gives the start as an index.
fn range(mem: &(impl LinearMemory + ?Sized), at: u32, len: u64) -> Result<usize, GuestError> {
    let size = mem.size();
    let end = u64::from(at) + len;
    if end > size as u64 {
        return Err(GuestError::Fault { at, len, size });
    }
    Ok(at as usize)
}

/// `len` bytes at `at` (a `*`/`~` pair of the ABI). Address 0 is valid, as in WAMR.
pub fn bytes(mem: &(impl LinearMemory + ?Sized), at: u32, len: u32) -> Result<Vec<u8>, GuestError> {
    let start = range(mem, at, len.into())?;
    let mut out = vec![0; len as usize];
    mem.read_into(start, &mut out);
    Ok(out)
}

/// The NUL-terminated string at `at` (a `$` argument); NULL (0) reads as `""`.
pub fn c_string(mem: &(impl LinearMemory + ?Sized), at: u32) -> Result<String, GuestError> {
    if at == 0 {
        return Ok(String::new());
    }
    let size = mem.size();
    let start = range(mem, at, 1)?;
    let mut text = Vec::new();
    let mut chunk = [0u8; SCAN_CHUNK];
    let mut pos = start;
    while pos < size {
        let n = SCAN_CHUNK.min(size - pos);
        mem.read_into(pos, &mut chunk[..n]);
        if let Some(nul) = chunk[..n].iter().position(|b| *b == 0) {
            text.extend_from_slice(&chunk[..nul]);
            return String::from_utf8(text).map_err(|_| GuestError::NotUtf8(at));
        }
        text.extend_from_slice(&chunk[..n]);
        pos += n;
    }
    Err(GuestError::Unterminated(at))
}

/// The little-endian u32 at `at`.
pub fn u32_at(mem: &(impl LinearMemory + ?Sized), at: u32) -> Result<u32, GuestError> {
    let start = range(mem, at, 4)?;
    let mut word = [0u8; 4];
    mem.read_into(start, &mut word);
    Ok(u32::from_le_bytes(word))
}

/// Writes `bytes` at `at`.
pub fn write(
    mem: &mut (impl LinearMemory + ?Sized),
    at: u32,
    bytes: &[u8],
) -> Result<(), GuestError> {
    let start = range(mem, at, bytes.len() as u64)?;
    mem.write_from(start, bytes);
    Ok(())
}

/// Writes the little-endian u32s `words` at `at`, one after the other.
pub fn write_u32s(
    mem: &mut (impl LinearMemory + ?Sized),
    at: u32,
    words: &[u32],
) -> Result<(), GuestError> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    write(mem, at, &bytes)
}

/// `EVP_telemetry_entry`: 8 bytes, key pointer then value pointer.
pub const TELEMETRY_ENTRY_SIZE: u32 = 8;

/// The `(key, value)` strings of `n` `EVP_telemetry_entry` structs at `at`.
pub fn telemetry_entries(
    mem: &(impl LinearMemory + ?Sized),
    at: u32,
    n: u32,
) -> Result<Vec<(String, String)>, GuestError> {
    let start = range(mem, at, u64::from(n) * u64::from(TELEMETRY_ENTRY_SIZE))?;
    let mut raw = vec![0u8; n as usize * TELEMETRY_ENTRY_SIZE as usize];
    mem.read_into(start, &mut raw);
    raw.chunks_exact(TELEMETRY_ENTRY_SIZE as usize)
        .map(|entry| {
            let key = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
            let value = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
            Ok((c_string(mem, key)?, c_string(mem, value)?))
        })
        .collect()
}

/// `EVP_BlobRequestHttpExt` as the host manages it in guest memory: 12 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HttpExtRequest {
    /// +0: the URL string, or 0.
    pub url: u32,
    /// +4: an array of `nheaders` string pointers, or 0.
    pub headers: u32,
    /// +8: how many headers.
    pub nheaders: u32,
}

impl HttpExtRequest {
    /// Its size in guest memory.
    pub const SIZE: u32 = 12;

    /// Reads the struct at `at`.
    pub fn read(mem: &(impl LinearMemory + ?Sized), at: u32) -> Result<Self, GuestError> {
        range(mem, at, Self::SIZE.into())?;
        Ok(HttpExtRequest {
            url: u32_at(mem, at)?,
            headers: u32_at(mem, at + 4)?,
            nheaders: u32_at(mem, at + 8)?,
        })
    }

    /// Writes the struct at `at`.
    pub fn write(&self, mem: &mut (impl LinearMemory + ?Sized), at: u32) -> Result<(), GuestError> {
        write_u32s(mem, at, &[self.url, self.headers, self.nheaders])
    }

    /// The header string pointers.
    pub fn header_pointers(
        &self,
        mem: &(impl LinearMemory + ?Sized),
    ) -> Result<Vec<u32>, GuestError> {
        let start = range(mem, self.headers, u64::from(self.nheaders) * 4)?;
        let mut raw = vec![0u8; self.nheaders as usize * 4];
        mem.read_into(start, &mut raw);
        Ok(raw
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect())
    }
}

/// A C string as the guest receives it: its bytes and a NUL.
pub fn nul_terminated(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 1);
    out.extend_from_slice(text.as_bytes());
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64 bytes: "topic\0" at 16, "key\0" at 24, "{}\0" at 28, entries at 32, an
    /// unterminated tail from 60.
    fn memory() -> Vec<u8> {
        let mut m = vec![0u8; 64];
        m[16..22].copy_from_slice(b"topic\0");
        m[24..28].copy_from_slice(b"key\0");
        m[28..31].copy_from_slice(b"{}\0");
        m[32..40].copy_from_slice(&[24, 0, 0, 0, 28, 0, 0, 0]);
        m[40..48].copy_from_slice(&[0, 0, 0, 0, 16, 0, 0, 0]);
        m[60..64].copy_from_slice(b"abcd");
        m
    }

    fn fault(at: u32, len: u64) -> GuestError {
        GuestError::Fault { at, len, size: 64 }
    }

    #[test]
    fn strings_are_read_up_to_their_nul_and_null_is_empty() {
        fn check(at: u32, expect: Result<&str, GuestError>) {
            assert_eq!(
                c_string(&memory(), at),
                expect.map(str::to_owned),
                "at {at}"
            );
        }
        check(16, Ok("topic"));
        check(18, Ok("pic"));
        check(0, Ok(""));
        check(21, Ok(""));
        check(60, Err(GuestError::Unterminated(60)));
        check(64, Err(fault(64, 1)));
        check(u32::MAX, Err(fault(u32::MAX, 1)));
    }

    #[test]
    fn a_string_that_is_not_utf8_is_refused() {
        let mut m = memory();
        m[8..11].copy_from_slice(&[0xff, 0xfe, 0]);
        assert_eq!(c_string(&m, 8), Err(GuestError::NotUtf8(8)));
    }

    #[test]
    fn a_string_longer_than_a_scan_chunk_is_read_whole() {
        let mut m = vec![b'x'; 1000];
        m[999] = 0;
        assert_eq!(c_string(&m, 1).unwrap().len(), 998);
    }

    #[test]
    fn byte_ranges_are_checked_against_the_memory_size() {
        fn check(at: u32, len: u32, expect: Result<usize, GuestError>) {
            assert_eq!(
                bytes(&memory(), at, len).map(|b| b.len()),
                expect,
                "{at}+{len}"
            );
        }
        check(0, 0, Ok(0));
        check(0, 64, Ok(64));
        check(64, 0, Ok(0));
        check(60, 4, Ok(4));
        check(60, 5, Err(fault(60, 5)));
        check(65, 0, Err(fault(65, 0)));
        check(u32::MAX, u32::MAX, Err(fault(u32::MAX, u32::MAX.into())));
    }

    #[test]
    fn telemetry_entries_are_two_string_pointers() {
        fn check(at: u32, n: u32, expect: Result<Vec<(&str, &str)>, GuestError>) {
            let owned = expect.map(|v| {
                v.into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect::<Vec<_>>()
            });
            assert_eq!(telemetry_entries(&memory(), at, n), owned, "{at} x{n}");
        }
        check(32, 0, Ok(vec![]));
        check(32, 1, Ok(vec![("key", "{}")]));
        check(32, 2, Ok(vec![("key", "{}"), ("", "topic")]));
        check(56, 2, Err(fault(56, 16)));
        check(60, 1, Err(fault(60, 8)));
    }

    #[test]
    fn the_http_ext_request_is_three_words_and_round_trips() {
        let mut m = memory();
        let req = HttpExtRequest {
            url: 16,
            headers: 32,
            nheaders: 2,
        };
        req.write(&mut m, 48).unwrap();
        assert_eq!(&m[48..60], &[16, 0, 0, 0, 32, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(HttpExtRequest::read(&m, 48), Ok(req));
        assert_eq!(req.header_pointers(&m), Ok(vec![24, 28]));
        assert_eq!(HttpExtRequest::read(&m, 56), Err(fault(56, 12)));
        assert_eq!(req.write(&mut m, 60), Err(fault(60, 12)));
    }

    #[test]
    fn words_and_writes_are_little_endian_and_checked() {
        let mut m = memory();
        write_u32s(&mut m, 0, &[0x1234]).unwrap();
        assert_eq!(u32_at(&m, 0), Ok(0x1234));
        assert_eq!(&m[0..4], &[0x34, 0x12, 0, 0]);
        assert_eq!(u32_at(&m, 61), Err(fault(61, 4)));
        assert_eq!(write(&mut m, 63, b"ab"), Err(fault(63, 2)));
        assert_eq!(nul_terminated("ab"), b"ab\0");
    }
}
