//! Every process of an instance, not only its process group: a descendant that called
//! `setsid` left the group but must still be stopped with the instance.
//!
//! With per-instance uids the answer is exact: every process of the instance's uid is the
//! instance's. Without them (the runtime cannot change uids) it is the processes that descend
//! from the instance's process, plus those whose environment still carries the instance's
//! workspace variable (an orphan re-parented to the runtime, which is a child subreaper, or to
//! init). What that fallback misses: a descendant that both cleared its environment and lost
//! its parent.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::signal::Signal;
use tracing::warn;

/// How many times a kill scans again for processes forked while it signalled the previous
/// ones; each pass signals everything it found, so only a process forked in that instant is
/// left for the next.
const KILL_PASSES: usize = 16;

/// One process as `/proc` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    /// Its id.
    pub pid: i32,
    /// Its parent's id.
    pub ppid: i32,
    /// Its real uid.
    pub uid: u32,
    /// It exited and waits to be reaped: it cannot be signalled any more.
    pub zombie: bool,
}

/// Which processes belong to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every process of this uid (the instance's own).
    Uid(u32),
    /// The instance shares the runtime's uid: descendants of `leader`, and processes whose
    /// environment holds `marker` (`NAME=value`).
    Tree {
        /// The instance's process.
        leader: i32,
        /// An environment entry only the instance's processes have.
        marker: String,
    },
}

/// The live processes of `scope` among `procs`, never `me` (the runtime) nor pid 1.
/// `has_marker` reads a process's environment; it is asked only in the fallback.
pub fn members(
    procs: &[ProcInfo],
    scope: &Scope,
    me: i32,
    has_marker: impl Fn(i32, &str) -> bool,
) -> Vec<i32> {
    let live = procs
        .iter()
        .filter(|p| !p.zombie && p.pid != me && p.pid > 1);
    match scope {
        Scope::Uid(uid) => live.filter(|p| p.uid == *uid).map(|p| p.pid).collect(),
        Scope::Tree { leader, marker } => {
            let parent: HashMap<i32, i32> = procs.iter().map(|p| (p.pid, p.ppid)).collect();
            let descends = |mut pid: i32| {
                // Bounded: a ppid chain read while processes come and go may, in theory, loop.
                for _ in 0..procs.len() + 1 {
                    if pid == *leader {
                        return true;
                    }
                    match parent.get(&pid) {
                        Some(&p) if p > 1 => pid = p,
                        _ => return false,
                    }
                }
                false
            };
            live.filter(|p| descends(p.pid) || has_marker(p.pid, marker))
                .map(|p| p.pid)
                .collect()
        }
    }
}

/// Every process in `/proc` that could be read (processes vanish while it is read).
pub fn scan() -> Vec<ProcInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read)
        .collect()
}

/// One process from `/proc/<pid>/stat` (parent, state) and `/proc/<pid>/status` (real uid).
pub fn read(pid: i32) -> Option<ProcInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse(pid, &stat, &status)
}

fn parse(pid: i32, stat: &str, status: &str) -> Option<ProcInfo> {
    let stat = crate::process::parse_stat(stat)?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(ProcInfo {
        pid,
        ppid: stat.ppid,
        uid,
        zombie: stat.exited,
    })
}

/// Whether `/proc/<pid>/environ` holds the entry `marker` exactly.
fn environ_has(pid: i32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
        .unwrap_or(false)
}

/// Whether any process of `scope` still runs.
pub fn any_alive(scope: &Scope) -> bool {
    !members(&scan(), scope, std::process::id() as i32, environ_has).is_empty()
}

/// Sends `signal` to every process of `scope`; with `repeat`, scans again until a pass finds
/// none (for SIGKILL: what a process forked meanwhile is caught by the next pass). Returns how
/// many processes were signalled.
pub fn signal_all(scope: &Scope, signal: Signal, repeat: bool) -> usize {
    let me = std::process::id() as i32;
    let mut sent = 0;
    for _ in 0..if repeat { KILL_PASSES } else { 1 } {
        let found = members(&scan(), scope, me, environ_has);
        if found.is_empty() {
            break;
        }
        match scope {
            Scope::Uid(uid) => match signal_uid(*uid, signal) {
                Ok(()) => sent += found.len(),
                Err(e) => {
                    warn!(
                        uid,
                        "sending {} to the instance's uid: {e}",
                        signal.as_str()
                    );
                    break;
                }
            },
            Scope::Tree { .. } => {
                for pid in found {
                    if signal_checked(pid, scope, signal) {
                        sent += 1;
                    }
                }
            }
        }
    }
    sent
}

/// Sends `signal` to every process of `uid` in one step: a helper process becomes `uid` and
/// calls `kill(-1)`, which the kernel delivers to all processes of that uid at once (a process
/// forking meanwhile cannot slip through), and which needs no CAP_KILL in the runtime.
fn signal_uid(uid: u32, signal: Signal) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let sig = signal as libc::c_int;
    // Never executed: the helper exits in pre_exec, after std made it `uid` (gid, no groups).
    let mut helper = std::process::Command::new("/bin/true");
    helper
        .uid(uid)
        .gid(uid)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the forked child and calls only kill and _exit, which are
    // async-signal-safe; it never returns.
    unsafe {
        helper.pre_exec(move || {
            // Without any capability, kill(-1) reaches this uid's processes only.
            if crate::identity::drop_all_capabilities().is_err() {
                libc::_exit(2);
            }
            let rc = libc::kill(-1, sig);
            libc::_exit(if rc == 0 { 0 } else { 1 })
        });
    }
    let mut child = {
        // Tracked from spawn to wait, so the orphan reaper leaves its exit status to us.
        let mut tracked = crate::reaper::tracked();
        let child = helper.spawn()?;
        tracked.insert(child.id() as i32);
        child
    };
    let status = child.wait();
    crate::reaper::untrack(child.id() as i32);
    // Status 1: kill(-1) found no process of the uid left (ESRCH), which is fine.
    status.map(|_| ())
}

/// Signals `pid` through a pidfd, after checking (with the pidfd held, so the pid cannot
/// change hands in between) that it is still in `scope`.
fn signal_checked(pid: i32, scope: &Scope, signal: Signal) -> bool {
    // SAFETY: pidfd_open takes a pid and a flags word and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(raw) = i32::try_from(raw) else {
        return false;
    };
    if raw < 0 {
        return false;
    }
    // SAFETY: `raw` is a descriptor the kernel just returned to us and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let still = match scope {
        Scope::Uid(uid) => read(pid).is_some_and(|p| p.uid == *uid && !p.zombie),
        // The tree was read an instant ago with this pid in it; a pid reused since would have
        // to be a new process of the same tree, so the uid is what a reuse would change.
        Scope::Tree { .. } => read(pid).is_some_and(|p| !p.zombie),
    };
    if !still {
        return false;
    }
    // SAFETY: pidfd_send_signal with a null siginfo and flags 0 reads no memory of ours; `fd`
    // is a live pidfd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            warn!(pid, "sending {}: {e}", signal.as_str());
        }
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, uid: u32) -> ProcInfo {
        ProcInfo {
            pid,
            ppid,
            uid,
            zombie: false,
        }
    }

    #[test]
    fn with_its_own_uid_every_live_process_of_it_is_the_instances() {
        let mut procs = vec![p(1, 0, 0), p(10, 1, 0), p(20, 10, 61184), p(30, 1, 61184)];
        procs.push(ProcInfo {
            zombie: true,
            ..p(40, 10, 61184)
        });
        procs.push(p(50, 1, 61185));
        let found = members(&procs, &Scope::Uid(61184), 10, |_, _| false);
        assert_eq!(found, [20, 30]);
    }

    #[test]
    fn without_it_descendants_and_marked_orphans_are() {
        // 10 is the runtime, 20 the instance, 21 its child, 22 a grandchild that called
        // setsid (still a descendant), 30 an orphan re-parented to the runtime that kept the
        // marker, 31 one that did not, 40 another instance.
        let procs = vec![
            p(1, 0, 0),
            p(10, 1, 5),
            p(20, 10, 5),
            p(21, 20, 5),
            p(22, 21, 5),
            p(30, 10, 5),
            p(31, 10, 5),
            p(40, 10, 5),
        ];
        let scope = Scope::Tree {
            leader: 20,
            marker: "W=/i/a".into(),
        };
        let found = members(&procs, &scope, 10, |pid, m| pid == 30 && m == "W=/i/a");
        assert_eq!(found, [20, 21, 22, 30]);
    }

    #[test]
    fn proc_files_are_parsed() {
        let stat = "77 (a) b) S 12 77 77 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 4242 1000 10";
        let status = "Name:\ta\nUid:\t61184\t61184\t61184\t61184\nGid:\t61184\n";
        assert_eq!(parse(77, stat, status), Some(p(77, 12, 61184)));
        let zombie = "78 (z) Z 1 78 78 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 99 0 0";
        assert!(parse(78, zombie, status).is_some_and(|p| p.zombie));
        assert_eq!(parse(79, "garbage", status), None);
        assert_eq!(parse(79, stat, "Name:\tx\n"), None);
    }

    #[test]
    fn this_process_is_read_with_its_uid() {
        let me = std::process::id() as i32;
        let info = read(me).unwrap();
        assert_eq!(info.uid, nix::unistd::getuid().as_raw());
        assert!(!info.zombie);
        assert!(scan().iter().any(|p| p.pid == me));
    }
}
