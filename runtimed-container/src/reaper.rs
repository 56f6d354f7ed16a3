//! The runtime as a child subreaper (`PR_SET_CHILD_SUBREAPER`): a module's descendant whose
//! parent exits is re-parented to the runtime instead of init, so it stays findable and is
//! reaped here once it is killed. Only such orphans are reaped: the instances' own processes
//! are the runtime's children too, and their exit status belongs to the `wait` that tokio does
//! for each of them (a pid in [`TRACKED`]).

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

/// How often orphans are looked for even without SIGCHLD (a signal can be coalesced with one
/// tokio consumed for its own child).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Pids of the instance processes this runtime spawned and has not reaped yet.
static TRACKED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// The tracked set, locked. Spawning holds it from `spawn` until the pid is inserted, and the
/// sweep holds it while it reaps, so a just-spawned child that exits at once is never reaped
/// by the sweep.
pub fn tracked() -> MutexGuard<'static, BTreeSet<i32>> {
    TRACKED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The child `pid` was reaped by its own `wait`.
pub fn untrack(pid: i32) {
    tracked().remove(&pid);
}

/// Makes this process a child subreaper and reaps orphans in the background from now on.
pub fn start() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes integers only and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        warn!(
            "cannot become a child subreaper ({}): a module's orphaned descendants go to init",
            std::io::Error::last_os_error()
        );
        return;
    }
    info!("child subreaper: orphaned descendants of modules are re-parented here");
    tokio::spawn(async {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("cannot watch SIGCHLD, sweeping for orphans every second only: {e}");
                None
            }
        };
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            match sigchld.as_mut() {
                Some(s) => {
                    tokio::select! {
                        _ = s.recv() => {}
                        _ = tick.tick() => {}
                    }
                }
                None => {
                    tick.tick().await;
                }
            }
            sweep();
        }
    });
}

/// Reaps every exited child that is not a tracked instance process.
fn sweep() {
    let me = std::process::id() as i32;
    let tracked = tracked();
    for p in crate::tree::scan() {
        if p.ppid != me || !p.zombie || tracked.contains(&p.pid) {
            continue;
        }
        match waitpid(Pid::from_raw(p.pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(status) => debug!(pid = p.pid, ?status, "reaped an orphaned module process"),
            Err(e) => debug!(pid = p.pid, "reaping an orphan: {e}"),
        }
    }
}
