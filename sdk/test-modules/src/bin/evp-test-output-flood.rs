//! Writes to stdout as fast as it can while serving the SDK (see the crate's table).

use std::io::Write;

use evp_sdk_test_modules::{TICK, connect, finish};

const NAME: &str = "output-flood";
/// Bytes per line, newline included: long enough that the relay's per-line work is small
/// next to the bytes, short enough to be many lines.
const LINE: usize = 1000;
/// Lines per write: 64 KB, a pipe's capacity, so the module is as fast as the reader allows.
const LINES_PER_WRITE: usize = 64;

/// `flood <offset> xxx…\n`, `LINE` bytes, where `offset` is the number of bytes written to
/// stdout before this line.
fn line(offset: u64, out: &mut Vec<u8>) {
    let start = out.len();
    let _ = write!(out, "flood {offset:012} ");
    out.resize(start + LINE - 1, b'x');
    out.push(b'\n');
}

fn main() {
    let mut client = connect(NAME);
    std::thread::spawn(|| {
        let mut stdout = std::io::stdout().lock();
        let mut offset = 0u64;
        let mut batch = Vec::with_capacity(LINE * LINES_PER_WRITE);
        for n in 0u64.. {
            batch.clear();
            for _ in 0..LINES_PER_WRITE {
                line(offset + batch.len() as u64, &mut batch);
            }
            if stdout.write_all(&batch).is_err() {
                return;
            }
            offset += batch.len() as u64;
            // Some stderr too, so both streams are bounded under load.
            if n % 16 == 0 {
                eprintln!("{NAME}: {offset} bytes written");
            }
        }
    });
    finish(NAME, client.run_until_exit(TICK, |_| {}));
}
