//! The log relay: one small process per instance that reads the module's stdout and stderr
//! from pipes and keeps them on disk within a strict bound, and re-logs the lines at a bounded
//! rate (what it drops is counted and the count logged).
//!
//! Why a process of its own (as conmon is for podman): the module must outlive the runtime
//! (`KillMode=process`, re-adoption), so the reader of its pipes cannot be the runtime; and
//! only a reader that writes the file itself can bound it (a file truncated in place behind the
//! module's own `O_APPEND` descriptor grows faster than any poll can cut it). When the relay is
//! slower than the module, the pipe fills and the module blocks in `write`: back-pressure, and
//! no output is lost on the way to the file.
//!
//! Each stream is `<name>.log` plus the previous `<name>.log.1`, each at most half of
//! `log_max_bytes`, so a stream never takes more than `log_max_bytes` on disk.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::logs::{LineSplitter, STDERR_FILE, STDOUT_FILE};

/// Re-logged lines a second, sustained, per instance: a module printing a few lines at a
/// time is logged in full, a flood costs the daemon's log at most this (times
/// [`RELOG_MAX_LINE`] bytes) a second.
pub const RELOG_LINES_PER_SECOND: u32 = 50;
/// Lines re-logged in a burst before the rate applies: a module's start-up banner or a
/// stack trace is logged whole.
pub const RELOG_BURST: u32 = 500;
/// Longest part of a line that is re-logged; the whole line is in the file.
pub const RELOG_MAX_LINE: usize = 1024;
/// How often the count of lines not re-logged is logged while a module floods.
pub const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Read size: a pipe's default capacity, so a busy module costs few syscalls.
const READ_CHUNK: usize = 64 * 1024;

/// What one relay serves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The instance, named in every re-logged line.
    pub instance: String,
    /// The `logs` folder of the instance directory (it exists).
    pub dir: PathBuf,
    /// Disk bound of each stream (its two files together).
    pub max_bytes: u64,
}

/// Whether lines may be re-logged now: a token bucket, and the count of lines refused.
#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    dropped: u64,
    last_report: Instant,
}

impl RateLimit {
    /// A full bucket of `burst` lines, refilled at `per_second`.
    pub fn new(per_second: u32, burst: u32, now: Instant) -> RateLimit {
        RateLimit {
            per_second: f64::from(per_second),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
            dropped: 0,
            last_report: now,
        }
    }

    /// Whether one more line may be logged at `now`; a refused one is counted.
    pub fn admit(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    /// The lines refused since the last report, when there are some and a report is due
    /// (every [`DROP_REPORT_INTERVAL`], or at once with `now_anyway`); the count restarts.
    pub fn take_dropped(&mut self, now: Instant, now_anyway: bool) -> Option<u64> {
        let due = now.saturating_duration_since(self.last_report) >= DROP_REPORT_INTERVAL;
        if self.dropped == 0 || !(due || now_anyway) {
            return None;
        }
        self.last_report = now;
        Some(std::mem::take(&mut self.dropped))
    }
}

/// One stream's output on disk: `path`, rotated to `path.1` before it would pass `segment`.
/// The relay is the only writer, so neither file ever holds more than `segment` bytes.
pub struct RotatingFile {
    path: PathBuf,
    previous: PathBuf,
    segment: u64,
    file: Option<File>,
    len: u64,
    /// Set while writing fails (disk full, directory purged), so it is logged once.
    failing: bool,
}

impl RotatingFile {
    /// Output of one stream in `path`, its two files together at most `max_bytes` (at least
    /// 2). Earlier content of `path` stays and counts.
    pub fn new(path: PathBuf, max_bytes: u64) -> RotatingFile {
        RotatingFile {
            previous: previous_path(&path),
            path,
            segment: (max_bytes / 2).max(1),
            file: None,
            len: 0,
            failing: false,
        }
    }

    /// Appends `bytes`, rotating as often as needed. A failure is logged (once while it lasts)
    /// and the bytes are dropped: the module must never block on a relay that cannot write.
    pub fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.write_some(bytes) {
                Ok(n) => {
                    bytes = &bytes[n..];
                    if self.failing {
                        self.failing = false;
                        info!(path = %self.path.display(), "instance output is written again");
                    }
                }
                Err(e) => {
                    if !self.failing {
                        self.failing = true;
                        warn!(path = %self.path.display(), "instance output is dropped: {e}");
                    }
                    self.file = None;
                    return;
                }
            }
        }
    }

    /// Writes what fits the current file (rotating first when it is full); returns how much.
    fn write_some(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.file.is_none() {
            self.open()?;
        }
        if self.len >= self.segment {
            self.rotate()?;
        }
        let take = usize::try_from(self.segment - self.len)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the output file is not open"))?;
        file.write_all(&bytes[..take])?;
        self.len += take as u64;
        Ok(take)
    }

    fn open(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)?;
        self.len = file.metadata()?.len();
        if self.len > self.segment {
            // Left by a version that kept output differently (or a smaller bound now): the
            // bound holds from the start, so it goes.
            file.set_len(0)?;
            info!(path = %self.path.display(), bytes = self.len, "instance output file over its bound; emptied");
            self.len = 0;
        }
        self.file = Some(file);
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        match std::fs::rename(&self.path, &self.previous) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.open()
    }
}

/// The re-logging side shared by both streams of an instance.
struct Relog {
    instance: String,
    limit: Mutex<RateLimit>,
}

impl Relog {
    fn line(&self, stream: &str, line: &[u8]) {
        let admitted = match self.limit.lock() {
            Ok(mut l) => l.admit(Instant::now()),
            Err(_) => false,
        };
        if admitted {
            emit(&self.instance, stream, line);
        }
    }

    fn report(&self, now_anyway: bool) {
        let dropped = match self.limit.lock() {
            Ok(mut l) => l.take_dropped(Instant::now(), now_anyway),
            Err(_) => None,
        };
        if let Some(n) = dropped {
            warn!(
                instance = %self.instance,
                dropped = n,
                "dropped {n} lines of the instance's output from this log (over \
                 {RELOG_LINES_PER_SECOND} lines a second); they are in its logs directory"
            );
        }
    }
}

fn emit(instance: &str, stream: &str, line: &[u8]) {
    let cut = line.len() > RELOG_MAX_LINE;
    let line = String::from_utf8_lossy(&line[..line.len().min(RELOG_MAX_LINE)]);
    let line = line.trim_end_matches('\r');
    if cut {
        info!(instance = %instance, stream, "{line}… (cut; the whole line is in the file)");
    } else {
        info!(instance = %instance, stream, "{line}");
    }
}

/// Relays `stdout` and `stderr` (the read ends of the module's pipes) until both reach end of
/// file, that is until the module and every process that inherited them have exited.
pub fn serve(config: &RelayConfig, stdout: File, stderr: File) {
    let relog = Arc::new(Relog {
        instance: config.instance.clone(),
        limit: Mutex::new(RateLimit::new(
            RELOG_LINES_PER_SECOND,
            RELOG_BURST,
            Instant::now(),
        )),
    });
    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
    let (done_tx, done) = mpsc::channel::<()>();
    let mut readers = Vec::new();
    for (source, stream, file) in [
        (stdout, "stdout", STDOUT_FILE),
        (stderr, "stderr", STDERR_FILE),
    ] {
        let out = RotatingFile::new(config.dir.join(file), config.max_bytes);
        let relog = Arc::clone(&relog);
        let dispatch = dispatch.clone();
        let done_tx = done_tx.clone();
        readers.push(std::thread::spawn(move || {
            tracing::dispatcher::with_default(&dispatch, || {
                relay_stream(source, stream, out, &relog);
            });
            drop(done_tx);
        }));
    }
    drop(done_tx);
    // Reports the dropped count while the streams flow; ends when both readers are done.
    while let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(DROP_REPORT_INTERVAL) {
        relog.report(false);
    }
    for r in readers {
        let _ = r.join();
    }
    relog.report(true);
}

fn relay_stream(mut source: File, stream: &'static str, mut out: RotatingFile, relog: &Relog) {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut lines = LineSplitter::default();
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(instance = %relog.instance, stream, "reading the instance's output: {e}");
                break;
            }
        };
        out.write(&buf[..n]);
        lines.push(&buf[..n], |l| relog.line(stream, l));
    }
    lines.flush(|l| relog.line(stream, l));
}

/// The relay process: the module's stdout pipe is its fd 0 and the module's stderr pipe its
/// fd 1 (what `std::process::Command` can place without unsafe code); it logs on fd 2.
pub fn run_process(config: &RelayConfig) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    let stdout = std::io::stdin().as_fd().try_clone_to_owned()?;
    let stderr = std::io::stdout().as_fd().try_clone_to_owned()?;
    serve(config, File::from(stdout), File::from(stderr));
    Ok(())
}

/// Where a stream's previous file is.
pub fn previous_path(path: &Path) -> PathBuf {
    let mut p = path.to_owned().into_os_string();
    p.push(".1");
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_admits_a_burst_then_the_rate_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(10, 3, t0);
        assert!((0..3).all(|_| l.admit(t0)));
        assert!(!l.admit(t0));
        assert!(!l.admit(t0));
        assert_eq!(l.take_dropped(t0, false), None, "not due yet");
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.admit(t1), "one line per 100 ms at 10 a second");
        assert!(!l.admit(t1));
        let later = t0 + DROP_REPORT_INTERVAL;
        assert_eq!(l.take_dropped(later, false), Some(3));
        assert_eq!(l.take_dropped(later, true), None, "the count restarted");
        // A long pause refills to the burst, not beyond.
        let t2 = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| l.admit(t2)));
        assert!(!l.admit(t2));
        assert_eq!(l.take_dropped(t2, true), Some(1));
    }

    #[test]
    fn a_stream_never_passes_its_bound_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        std::fs::write(&path, b"earlier\n").unwrap();
        let mut f = RotatingFile::new(path.clone(), 20);
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        for i in 0..50 {
            f.write(format!("line {i:03}\n").as_bytes());
            assert!(size(&path) <= 10 && size(&previous_path(&path)) <= 10);
        }
        // 8 earlier bytes + 50 lines of 9: the last bytes are in the two files, in order.
        let both = [
            std::fs::read(previous_path(&path)).unwrap(),
            std::fs::read(&path).unwrap(),
        ]
        .concat();
        assert!(both.ends_with(b"line 048\nline 049\n"), "{both:?}");
        assert_eq!(both.len() as u64, (8 + 50 * 9) % 10 + 10);
    }

    #[test]
    fn a_file_over_the_bound_from_an_earlier_run_is_emptied_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        std::fs::write(&path, vec![b'o'; 100]).unwrap();
        let mut f = RotatingFile::new(path.clone(), 20);
        f.write(b"new\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"new\n");
        assert!(!previous_path(&path).exists());
    }

    #[test]
    fn a_stream_whose_directory_is_gone_drops_output_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        let mut f = RotatingFile::new(logs.join("stdout.log"), 20);
        std::fs::remove_dir_all(&logs).unwrap();
        f.write(b"lost\n");
        assert!(f.failing);
        std::fs::create_dir(&logs).unwrap();
        f.write(b"kept\n");
        assert!(!f.failing);
        assert_eq!(std::fs::read(logs.join("stdout.log")).unwrap(), b"kept\n");
    }
}
