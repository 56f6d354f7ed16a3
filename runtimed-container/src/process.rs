//! Processes this runtime did not necessarily start: their identity in `/proc` (PID plus start
//! time, so a reused PID is not taken for the old process) and pidfds to watch and signal them
//! without being their parent.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// `/proc/<pid>/stat` exists but could not be read (permissions, I/O).
    #[error("reading /proc/{pid}/stat: {source}")]
    ReadStat {
        /// The process id.
        pid: i32,
        /// Why.
        source: io::Error,
    },
    /// `/proc/<pid>/stat` did not have the layout proc(5) describes.
    #[error("/proc/{pid}/stat is not in the format proc(5) describes: {text:?}")]
    MalformedStat {
        /// The process id.
        pid: i32,
        /// The text read, for the log.
        text: String,
    },
    /// `pidfd_open` failed for a reason other than the process being gone.
    #[error("pidfd_open({pid}): {source}")]
    PidfdOpen {
        /// The process id.
        pid: i32,
        /// Why.
        source: io::Error,
    },
    /// The pidfd could not be registered with the async reactor.
    #[error("watching the pidfd of {pid}: {source}")]
    Register {
        /// The process id.
        pid: i32,
        /// Why.
        source: io::Error,
    },
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 4, the parent's process id.
    pub ppid: i32,
    /// Field 22, `starttime`: clock ticks after boot at which the process started. With the PID
    /// it names one process for the whole uptime, since the kernel reuses PIDs but never goes
    /// back in time.
    pub start_time: u64,
    /// The process has exited and waits to be reaped (state `Z` or `X`).
    pub exited: bool,
}

/// Reads `/proc/<pid>/stat`; `None` when no such process exists.
pub fn stat(pid: i32) -> Result<Option<ProcStat>, ProcessError> {
    let text = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(t) => t,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound) || e.raw_os_error() == Some(3) => {
            // ENOENT, or ESRCH when the process vanished between open and read.
            return Ok(None);
        }
        Err(source) => return Err(ProcessError::ReadStat { pid, source }),
    };
    parse_stat(&text)
        .map(Some)
        .ok_or(ProcessError::MalformedStat {
            pid,
            text: text.chars().take(200).collect(),
        })
}

/// Parses the text of `/proc/<pid>/stat`. The second field (the command) is in parentheses and
/// may hold spaces and parentheses itself, so fields are counted after the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let after = text.get(text.rfind(')')? + 1..)?;
    let mut fields = after.split_whitespace();
    // Field 3 is the state, field 4 the parent; `starttime` is field 22, 18 fields further.
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let start_time = fields.nth(17)?.parse().ok()?;
    Some(ProcStat {
        ppid,
        start_time,
        exited: matches!(state, "Z" | "X" | "x"),
    })
}

/// Whether `pid` runs now (not exited) and started at `start_time`, so a PID the kernel gave to
/// another process since does not count.
pub fn is_same_live_process(pid: i32, start_time: u64) -> Result<bool, ProcessError> {
    Ok(stat(pid)?.is_some_and(|s| !s.exited && s.start_time == start_time))
}

/// A pidfd: a handle on one process that stays valid (and keeps naming that process, not a
/// later one with the same PID) until closed, and becomes readable once the process exits,
/// whoever its parent is.
#[derive(Debug)]
pub struct PidFd {
    pid: i32,
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    /// Opens a pidfd on `pid`; `Ok(None)` when no such process exists. Must be called inside
    /// a tokio runtime with I/O enabled.
    pub fn open(pid: i32) -> Result<Option<PidFd>, ProcessError> {
        // SAFETY: pidfd_open takes a pid and a flags word and returns a new descriptor or -1;
        // it touches no memory of ours.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(None);
            }
            return Err(ProcessError::PidfdOpen { pid, source: e });
        }
        let raw = i32::try_from(raw).map_err(|_| ProcessError::PidfdOpen {
            pid,
            source: io::Error::other("the kernel returned a descriptor out of range"),
        })?;
        // SAFETY: `raw` is a descriptor the kernel just returned to us and nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an `OwnedFd` returns the same open descriptor for as long as it lives, and
        // the `AsyncFd` owns it until dropped: nothing else can close or replace it.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(|e| ProcessError::Register {
            pid,
            source: io::Error::other(e.to_string()),
        })?;
        Ok(Some(PidFd { pid, fd }))
    }

    /// The process id this pidfd was opened on.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Resolves once the process has exited (its exit status is not available through a pidfd
    /// of a process that is not our child).
    pub async fn exited(&self) -> io::Result<()> {
        // The readiness is never cleared: once exited, a pidfd stays readable.
        let _guard = self.fd.readable().await?;
        Ok(())
    }

    /// Sends `signal` to the process itself (not its group); a process that already exited is
    /// not an error.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: pidfd_send_signal with a null siginfo and flags 0 reads no memory of ours;
        // `fd` is a live pidfd owned by `self`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command() {
        // A command with spaces and a parenthesis; start time 4242 in field 22.
        let text = "77 (a) b (c) S 1 77 77 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 4242 1000 10";
        assert_eq!(
            parse_stat(text),
            Some(ProcStat {
                ppid: 1,
                start_time: 4242,
                exited: false
            })
        );
        let zombie = "78 (z) Z 1 78 78 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 99 0 0";
        assert_eq!(parse_stat(zombie).map(|s| s.exited), Some(true));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_is_alive_with_its_own_start_time_only() {
        let me = i32::try_from(std::process::id()).unwrap();
        let s = stat(me).unwrap().unwrap();
        assert!(!s.exited);
        assert!(is_same_live_process(me, s.start_time).unwrap());
        assert!(!is_same_live_process(me, s.start_time + 1).unwrap());
    }
}
