//! An instance's stdout and stderr: every line goes to the daemon's log as
//! `wasm:<instance>/<stream>: <line>` (EVP's tag). Bounded both ways: a line longer than
//! [`MAX_LINE`] is logged in pieces, and past a burst of [`BURST_LINES`] lines only
//! [`LINES_PER_SECOND`] a second are logged, the rest dropped and counted; so a module that
//! writes without end costs log lines, never the daemon's memory.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use tracing::{info, warn};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// The longest line logged as one; longer ones are cut into pieces of this size.
pub const MAX_LINE: usize = 4096;
/// Lines logged at once before the rate applies (as the spawn runtime's relay).
pub const BURST_LINES: u32 = 500;
/// Lines logged per second per stream after the burst.
pub const LINES_PER_SECOND: u32 = 50;

/// Splits bytes into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Feeds `bytes`, calling `line` for each complete (or cut) line, without its newline.
    pub fn feed(&mut self, mut bytes: &[u8], mut line: impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            let room = MAX_LINE - self.partial.len();
            let take = bytes.len().min(room);
            match bytes[..take].iter().position(|b| *b == b'\n') {
                Some(nl) => {
                    self.partial.extend_from_slice(&bytes[..nl]);
                    line(&self.partial);
                    self.partial.clear();
                    bytes = &bytes[nl + 1..];
                }
                None => {
                    self.partial.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.partial.len() == MAX_LINE {
                        line(&self.partial);
                        self.partial.clear();
                    }
                }
            }
        }
    }

    /// What is left without a newline, as a last line (at exit).
    pub fn finish(&mut self, mut line: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            line(&self.partial);
            self.partial.clear();
        }
    }
}

/// A token bucket of lines: [`BURST_LINES`] at once, refilled at [`LINES_PER_SECOND`].
#[derive(Debug)]
pub struct LineBudget {
    tokens: f64,
    at: Instant,
    /// Lines refused since the last one let through.
    pub dropped: u64,
}

impl LineBudget {
    /// A full bucket at `now`.
    pub fn new(now: Instant) -> LineBudget {
        LineBudget {
            tokens: f64::from(BURST_LINES),
            at: now,
            dropped: 0,
        }
    }

    /// Whether a line may be logged at `now`; when it may after some were dropped, how many.
    pub fn take(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens =
            (self.tokens + elapsed * f64::from(LINES_PER_SECOND)).min(f64::from(BURST_LINES));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.dropped))
        } else {
            self.dropped += 1;
            None
        }
    }
}

struct Stream {
    splitter: LineSplitter,
    budget: LineBudget,
}

/// One output stream of one instance, logged line by line. Clones share the stream.
#[derive(Clone)]
pub struct LineLog {
    instance: Arc<str>,
    stream: &'static str,
    state: Arc<Mutex<Stream>>,
}

impl LineLog {
    /// The `stream` (`stdout` or `stderr`) of `instance`.
    pub fn new(instance: &str, stream: &'static str) -> LineLog {
        LineLog {
            instance: instance.into(),
            stream,
            state: Arc::new(Mutex::new(Stream {
                splitter: LineSplitter::default(),
                budget: LineBudget::new(Instant::now()),
            })),
        }
    }

    fn write_bytes(&self, bytes: &[u8]) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Stream { splitter, budget } = &mut *state;
        splitter.feed(bytes, |line| self.emit(budget, line));
    }

    /// Logs what is left without a newline; called when the instance ends.
    pub fn finish(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Stream { splitter, budget } = &mut *state;
        splitter.finish(|line| self.emit(budget, line));
        if budget.dropped > 0 {
            warn!(instance = %self.instance, stream = self.stream, dropped = budget.dropped,
                "wasm:{}/{}: {} lines were not logged (too many)", self.instance, self.stream, budget.dropped);
        }
    }

    fn emit(&self, budget: &mut LineBudget, line: &[u8]) {
        let Some(dropped) = budget.take(Instant::now()) else {
            return;
        };
        if dropped > 0 {
            warn!(instance = %self.instance, stream = self.stream, dropped,
                "wasm:{}/{}: {dropped} lines were not logged (too many)", self.instance, self.stream);
        }
        info!(instance = %self.instance, "wasm:{}/{}: {}", self.instance, self.stream,
            String::from_utf8_lossy(line));
    }
}

impl IsTerminal for LineLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LineLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineLog {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LineLog {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LineLog {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bytes_are_split_into_bounded_lines() {
        fn check(writes: &[&[u8]], expect: &[usize]) {
            let mut s = LineSplitter::default();
            let mut lines = Vec::new();
            for w in writes {
                s.feed(w, |l| lines.push(l.len()));
            }
            s.finish(|l| lines.push(l.len()));
            assert_eq!(lines, expect, "{writes:?}");
        }
        check(&[b"ab\ncd\n"], &[2, 2]);
        check(&[b"ab", b"c\nd"], &[3, 1]);
        check(&[b"\n\n"], &[0, 0]);
        check(&[b""], &[]);
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        check(&[&long], &[MAX_LINE, MAX_LINE, 5]);
        let mut exact = vec![b'x'; MAX_LINE];
        exact.push(b'\n');
        check(&[&exact], &[MAX_LINE, 0]);
    }

    #[test]
    fn lines_past_the_burst_are_dropped_counted_and_resume_with_time() {
        let t0 = Instant::now();
        let mut b = LineBudget::new(t0);
        for _ in 0..BURST_LINES {
            assert_eq!(b.take(t0), Some(0));
        }
        assert_eq!(b.take(t0), None);
        assert_eq!(b.take(t0), None);
        assert_eq!(b.dropped, 2);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(b.take(later), Some(2));
        for _ in 1..LINES_PER_SECOND {
            assert!(b.take(later).is_some());
        }
        assert_eq!(b.take(later), None);
    }
}
