//! Instance output through pipes to a log relay ([`crate::relay`]): a module's stdout and
//! stderr are pipes whose read ends a small per-instance relay process holds, started by the
//! runtime but not tied to it, so a module keeps printing while the runtime is away. The relay
//! writes `<instance dir>/logs/stdout.log` and `stderr.log` (with one rotated `.1` each) within
//! `log_max_bytes` per stream, and re-logs the lines with the instance name at a bounded rate.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tracing::warn;

use crate::relay::{self, RelayConfig};

/// Folder of the output files inside the instance directory.
pub const LOG_DIR: &str = "logs";
/// The module's stdout.
pub const STDOUT_FILE: &str = "stdout.log";
/// The module's stderr.
pub const STDERR_FILE: &str = "stderr.log";
/// Default for `[container] log_max_bytes`: the most one stream of one instance keeps on disk;
/// enough for the recent output of a chatty module, small enough that a flooding one cannot
/// fill a gateway's storage.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 1024 * 1024;
/// Longest output line handled as one; a module printing without newlines is cut into pieces
/// of this size instead of growing memory without bound.
pub const MAX_LINE: usize = 16 * 1024;
/// The subcommand of the runtime's binary that runs a relay.
pub const RELAY_SUBCOMMAND: &str = "log-relay";
/// The runtime's own executable, for starting relays: still the right file after the package
/// replaced the binary on disk, which the path the daemon started from may not be.
const SELF_EXE: &str = "/proc/self/exe";

/// Errors setting up an instance's output.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The `logs` folder could not be created.
    #[error("creating {path}: {source}")]
    Dir {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The pipes or the relay could not be made.
    #[error("starting the log relay of {instance}: {source}")]
    Relay {
        /// The instance.
        instance: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Who reads a module's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relay {
    /// A process of its own, this program run with [`RELAY_SUBCOMMAND`]: it outlives the
    /// runtime, as the module does.
    Process(PathBuf),
    /// Threads of this process, which end with it: for tests, whose executable is not the
    /// runtime's.
    InProcess,
}

/// How instance output is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPolicy {
    /// The most each stream of an instance takes on disk, its two files together.
    pub max_bytes: u64,
    /// Who reads the output.
    pub relay: Relay,
}

impl Default for LogPolicy {
    fn default() -> Self {
        LogPolicy {
            max_bytes: DEFAULT_LOG_MAX_BYTES,
            relay: Relay::Process(PathBuf::from(SELF_EXE)),
        }
    }
}

impl LogPolicy {
    /// `max_bytes` per stream, the relay in threads of this process (tests).
    pub fn in_process(max_bytes: u64) -> LogPolicy {
        LogPolicy {
            max_bytes,
            relay: Relay::InProcess,
        }
    }
}

/// The write ends of a module's output pipes, for its stdout and stderr.
pub struct ModuleOutput {
    /// For the module's stdout.
    pub stdout: Stdio,
    /// For the module's stderr.
    pub stderr: Stdio,
}

/// The write ends of an instance's output pipes, for a runtime that copies the output in
/// itself (a container's, from the engine).
pub struct RelayWriters {
    /// Into `stdout.log`.
    pub stdout: std::io::PipeWriter,
    /// Into `stderr.log`.
    pub stderr: std::io::PipeWriter,
}

/// `<instance_dir>/logs/<file>`.
pub fn log_path(instance_dir: &Path, file: &str) -> PathBuf {
    instance_dir.join(LOG_DIR).join(file)
}

/// Creates `<instance_dir>/logs` (0700) if missing and returns it.
pub fn create_dir(instance_dir: &Path) -> Result<PathBuf, LogError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = instance_dir.join(LOG_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| LogError::Dir {
            path: dir.clone(),
            source,
        })?;
    Ok(dir)
}

/// Starts the relay of `instance` and returns the pipe ends to give the module. The relay
/// ends by itself once every holder of those ends (the module and its descendants) is gone.
/// Call it inside a tokio runtime (the relay process is reaped by a task).
pub fn start_relay(
    instance: &str,
    instance_dir: &Path,
    policy: &LogPolicy,
) -> Result<ModuleOutput, LogError> {
    let w = start_relay_writers(instance, instance_dir, policy)?;
    Ok(ModuleOutput {
        stdout: Stdio::from(w.stdout),
        stderr: Stdio::from(w.stderr),
    })
}

/// As [`start_relay`], handing back the pipes' write ends themselves.
pub fn start_relay_writers(
    instance: &str,
    instance_dir: &Path,
    policy: &LogPolicy,
) -> Result<RelayWriters, LogError> {
    let config = RelayConfig {
        instance: instance.to_owned(),
        dir: create_dir(instance_dir)?,
        max_bytes: policy.max_bytes,
    };
    let relay_err = |source| LogError::Relay {
        instance: instance.to_owned(),
        source,
    };
    // Both ends are close-on-exec: neither the module nor any other child inherits a copy
    // it should not hold (a stray write end would keep the relay from ever ending).
    let (out_r, out_w) = std::io::pipe().map_err(relay_err)?;
    let (err_r, err_w) = std::io::pipe().map_err(relay_err)?;
    match &policy.relay {
        Relay::Process(program) => {
            // Tracked like an instance process, so the orphan reaper leaves its exit status to
            // the wait below.
            let mut tracked = crate::reaper::tracked();
            let mut child = tokio::process::Command::new(program)
                .arg(RELAY_SUBCOMMAND)
                .arg("--instance")
                .arg(instance)
                .arg("--dir")
                .arg(&config.dir)
                .arg("--max-bytes")
                .arg(config.max_bytes.to_string())
                .stdin(Stdio::from(out_r))
                .stdout(Stdio::from(err_r))
                // Its own group: signals to the module's group or the daemon's never reach it
                // before it has written what the module printed last.
                .process_group(0)
                .kill_on_drop(false)
                .spawn()
                .map_err(relay_err)?;
            let pid = child.id().and_then(|p| i32::try_from(p).ok());
            tracked.extend(pid);
            drop(tracked);
            let instance = instance.to_owned();
            tokio::spawn(async move {
                match child.wait().await {
                    Ok(s) if s.success() => {}
                    Ok(s) => warn!(instance, "the log relay ended with {s}"),
                    Err(e) => warn!(instance, "waiting for the log relay: {e}"),
                }
                if let Some(pid) = pid {
                    crate::reaper::untrack(pid);
                }
            });
        }
        Relay::InProcess => {
            let dispatch = tracing::dispatcher::get_default(|d| d.clone());
            std::thread::Builder::new()
                .name(format!("relay-{instance}"))
                .spawn(move || {
                    tracing::dispatcher::with_default(&dispatch, || {
                        relay::serve(
                            &config,
                            std::fs::File::from(std::os::fd::OwnedFd::from(out_r)),
                            std::fs::File::from(std::os::fd::OwnedFd::from(err_r)),
                        );
                    });
                })
                .map_err(relay_err)?;
        }
    }
    Ok(RelayWriters {
        stdout: out_w,
        stderr: err_w,
    })
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
}
