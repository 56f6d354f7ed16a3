//! Instance output through files: a module's stdout and stderr are `<instance dir>/logs/
//! stdout.log` and `stderr.log`, opened `O_APPEND` by the runtime and handed to the module as
//! its descriptors, so a module keeps printing (no SIGPIPE, no EPIPE) while the runtime is
//! away. The runtime follows each file from its end at the time it starts following, logs every
//! new line with the instance name, and truncates a file once it passes a size; the module's
//! `O_APPEND` writes then continue at the new end.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

/// Folder of the output files inside the instance directory.
pub const LOG_DIR: &str = "logs";
/// The module's stdout.
pub const STDOUT_FILE: &str = "stdout.log";
/// The module's stderr.
pub const STDERR_FILE: &str = "stderr.log";
/// How often a followed file is checked for new output: a line reaches the journal within
/// this, and an idle instance costs five `fstat`s a second per stream.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Default for `[container] log_max_bytes`: enough to hold a burst of output between two
/// polls, small enough that a chatty module cannot fill a gateway's storage.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 1024 * 1024;
/// Longest output line logged as one record; a module printing without newlines is logged in
/// pieces of this size instead of growing memory without bound.
pub const MAX_LINE: usize = 16 * 1024;
/// Read size while following: a few syscalls per poll even for a busy module.
const READ_CHUNK: usize = 64 * 1024;

/// Errors setting up the output files.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The `logs` folder or an output file could not be created or opened.
    #[error("opening {path}: {source}")]
    Open {
        /// The folder or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How output files are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPolicy {
    /// A file is truncated once it holds at least this many bytes, after they were logged.
    pub max_bytes: u64,
}

impl Default for LogPolicy {
    fn default() -> Self {
        LogPolicy {
            max_bytes: DEFAULT_LOG_MAX_BYTES,
        }
    }
}

/// The module's two output files, opened for appending.
pub struct OutputFiles {
    /// For the module's stdout.
    pub stdout: File,
    /// For the module's stderr.
    pub stderr: File,
}

/// `<instance_dir>/logs/<file>`.
pub fn log_path(instance_dir: &Path, file: &str) -> PathBuf {
    instance_dir.join(LOG_DIR).join(file)
}

/// Creates `<instance_dir>/logs` (0700) and opens both files `O_APPEND|O_CREAT` (0600) for the
/// module; earlier content stays.
pub fn open_for_module(instance_dir: &Path) -> Result<OutputFiles, LogError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = instance_dir.join(LOG_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| LogError::Open {
            path: dir.clone(),
            source,
        })?;
    let open = |name: &str| {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| LogError::Open { path, source })
    };
    Ok(OutputFiles {
        stdout: open(STDOUT_FILE)?,
        stderr: open(STDERR_FILE)?,
    })
}

/// Follows both output files of an instance until `done` turns true (or its sender goes),
/// then logs what is left and ends. Must be called inside a tokio runtime.
pub fn follow_instance(
    instance: &str,
    instance_dir: &Path,
    policy: LogPolicy,
    done: watch::Receiver<bool>,
) {
    for (file, stream) in [(STDOUT_FILE, "stdout"), (STDERR_FILE, "stderr")] {
        let path = log_path(instance_dir, file);
        match Follower::open(&path, instance, stream, policy) {
            Ok(follower) => {
                tokio::spawn(follower.run(done.clone()));
            }
            Err(e) => {
                warn!(
                    instance,
                    stream, "the instance's {stream} will not be logged: {e}"
                );
            }
        }
    }
}

/// One output file being followed.
pub struct Follower {
    file: File,
    path: PathBuf,
    instance: String,
    stream: &'static str,
    policy: LogPolicy,
    /// Where the next unread byte is.
    offset: u64,
    lines: LineSplitter,
}

impl Follower {
    /// Opens `path` (read and write, for truncation) and starts at its current end: what is
    /// there already was logged by an earlier run, or is not ours to replay.
    pub fn open(
        path: &Path,
        instance: &str,
        stream: &'static str,
        policy: LogPolicy,
    ) -> Result<Follower, LogError> {
        let open_err = |source| LogError::Open {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let offset = file.metadata().map_err(open_err)?.len();
        Ok(Follower {
            file,
            path: path.to_owned(),
            instance: instance.to_owned(),
            stream,
            policy,
            offset,
            lines: LineSplitter::default(),
        })
    }

    /// Polls the file every [`POLL_INTERVAL`] until `done`, then reads it one last time.
    pub async fn run(mut self, mut done: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                r = done.wait_for(|d| *d) => { let _ = r; true }
            };
            if let Err(e) = self.poll() {
                warn!(instance = %self.instance, stream = self.stream, path = %self.path.display(), "following the instance output failed: {e}");
                return;
            }
            if last {
                let (instance, stream) = (&self.instance, self.stream);
                self.lines.flush(|l| emit(instance, stream, l));
                return;
            }
        }
    }

    /// Logs every complete line written since the last poll, then truncates the file if it
    /// reached the size limit.
    pub fn poll(&mut self) -> std::io::Result<()> {
        self.read_new()?;
        if self.offset >= self.policy.max_bytes {
            // Read once more right before truncating, so only what the module writes in
            // between these two calls can be lost.
            self.read_new()?;
            self.file.set_len(0)?;
            info!(
                instance = %self.instance,
                stream = self.stream,
                bytes = self.offset,
                "instance output file reached its size limit; truncated"
            );
            self.offset = 0;
        }
        Ok(())
    }

    fn read_new(&mut self) -> std::io::Result<()> {
        let len = self.file.metadata()?.len();
        if len < self.offset {
            // Truncated by someone else: start again from the top.
            self.offset = 0;
        }
        let mut buf = vec![0u8; READ_CHUNK];
        let (instance, stream) = (&self.instance, self.stream);
        loop {
            let n = match self.file.read_at(&mut buf, self.offset) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.lines.push(&buf[..n], |l| emit(instance, stream, l));
            self.offset += n as u64;
        }
    }
}

fn emit(instance: &str, stream: &str, line: &[u8]) {
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end_matches('\r');
    info!(instance = %instance, stream, "{line}");
}

/// Cuts a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; `emit` gets each complete line, without its newline.
    pub fn push(&mut self, mut bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            match bytes.iter().position(|b| *b == b'\n') {
                Some(i) if self.partial.len() + i <= MAX_LINE => {
                    self.partial.extend_from_slice(&bytes[..i]);
                    emit(&self.partial);
                    self.partial.clear();
                    bytes = &bytes[i + 1..];
                }
                _ => {
                    let room = MAX_LINE - self.partial.len();
                    let take = room.min(bytes.len());
                    self.partial.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.partial.len() >= MAX_LINE {
                        emit(&self.partial);
                        self.partial.clear();
                    }
                }
            }
        }
    }

    /// Emits what is left of an unfinished last line.
    pub fn flush(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            emit(&self.partial);
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = LineSplitter::default();
        for c in chunks {
            s.push(c, |l| out.push(l.to_vec()));
        }
        s.flush(|l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn lines_are_cut_at_newlines_and_at_the_length_limit() {
        assert_eq!(
            split(&[b"a\nb", b"c\n\nd"]),
            [b"a".to_vec(), b"bc".to_vec(), vec![], b"d".to_vec()]
        );
        let long = vec![b'x'; MAX_LINE + 5];
        let out = split(&[&long, b"\n"]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), MAX_LINE);
        assert_eq!(out[1], b"xxxxx");
    }

    #[test]
    fn follower_starts_at_the_end_and_truncates_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let files = open_for_module(dir.path()).unwrap();
        let mut out = files.stdout;
        std::io::Write::write_all(&mut out, b"old line\n").unwrap();
        let path = log_path(dir.path(), STDOUT_FILE);
        let mut f = Follower::open(&path, "i", "stdout", LogPolicy { max_bytes: 20 }).unwrap();
        assert_eq!(f.offset, 9, "an existing line is not replayed");
        std::io::Write::write_all(&mut out, b"0123456789\n").unwrap();
        f.poll().unwrap();
        assert_eq!(f.offset, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // The module's O_APPEND descriptor now writes at the start of the file.
        std::io::Write::write_all(&mut out, b"next\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"next\n");
        f.poll().unwrap();
        assert_eq!(f.offset, 5);
    }
}
