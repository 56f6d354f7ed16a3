//! Who may use an instance's socket: the process the runtime started for it (or one of its
//! descendants), running as the uid the runtime gave it, as `BindInstance` said. The socket
//! path alone proves nothing: any module can connect to any socket it can reach.

/// What `BindInstance` said about an instance's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// The process the runtime started.
    pub pid: u32,
    /// The uid it runs as.
    pub uid: u32,
}

/// Why a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The peer runs as another uid than the instance.
    #[error("peer uid {peer} is not the instance's uid {bound}")]
    Uid {
        /// The peer's uid.
        peer: u32,
        /// The instance's.
        bound: u32,
    },
    /// The peer is not the instance's process nor one of its descendants.
    #[error("peer pid {peer} is neither the instance's process {bound} nor a descendant of it")]
    NotDescendant {
        /// The peer's pid.
        peer: u32,
        /// The instance's process.
        bound: u32,
    },
    /// The instance was not bound in time.
    #[error("the instance was not bound to a process within {0} ms")]
    Unbound(u128),
}

/// Longest ppid chain followed: deeper than any real process tree, and it stops a loop (a chain
/// read while processes come and go).
const MAX_DEPTH: usize = 4096;

/// Whether a peer with credentials `(pid, uid)` is the bound instance's: same uid, and `pid` is
/// the bound process or descends from it. `parent_of` gives a process's parent (`None` once
/// it is gone).
pub fn check(
    binding: Binding,
    pid: u32,
    uid: u32,
    parent_of: impl Fn(u32) -> Option<u32>,
) -> Result<(), Refusal> {
    if uid != binding.uid {
        return Err(Refusal::Uid {
            peer: uid,
            bound: binding.uid,
        });
    }
    let mut at = pid;
    for _ in 0..MAX_DEPTH {
        if at == binding.pid {
            return Ok(());
        }
        match parent_of(at) {
            Some(p) if p > 1 && p != at => at = p,
            _ => break,
        }
    }
    Err(Refusal::NotDescendant {
        peer: pid,
        bound: binding.pid,
    })
}

/// Whether a peer refused under `binding` should rather wait for the next `BindInstance`: it
/// runs as the instance's uid, and the bound process is gone, so the instance is being started
/// again and this is likely its new process, connecting before the runtime's answer reached
/// sdk-broker (a container connects within milliseconds of its start). A peer of another uid,
/// or one that is not the live bound process's, is refused at once.
pub fn awaits_rebinding(
    binding: Binding,
    pid: u32,
    uid: u32,
    parent_of: impl Fn(u32) -> Option<u32>,
    alive: impl Fn(u32) -> bool,
) -> bool {
    uid == binding.uid && check(binding, pid, uid, parent_of).is_err() && !alive(binding.pid)
}

/// Whether `pid` runs: it exists and is not a zombie (an exited child its parent has not
/// reaped yet).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .and_then(|rest| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

/// The parent of `pid`, from `/proc/<pid>/stat` (field 4, counted after the command's last
/// `)`, since the command may hold spaces and parentheses).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    fields.next()?;
    fields.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Binding = Binding {
        pid: 100,
        uid: 61184,
    };

    /// 1 ← 50 (runtime) ← 100 (instance) ← 101 ← 102; 200 elsewhere.
    fn parent(pid: u32) -> Option<u32> {
        match pid {
            102 => Some(101),
            101 => Some(100),
            100 => Some(50),
            50 | 200 => Some(1),
            _ => None,
        }
    }

    #[test]
    fn the_instance_process_and_its_descendants_are_accepted() {
        assert_eq!(check(BOUND, 100, 61184, parent), Ok(()));
        assert_eq!(check(BOUND, 102, 61184, parent), Ok(()));
    }

    #[test]
    fn another_uid_or_another_tree_is_refused() {
        assert_eq!(
            check(BOUND, 102, 61185, parent),
            Err(Refusal::Uid {
                peer: 61185,
                bound: 61184
            })
        );
        assert_eq!(
            check(BOUND, 200, 61184, parent),
            Err(Refusal::NotDescendant {
                peer: 200,
                bound: 100
            })
        );
        // The runtime, the instance's parent, is not the instance.
        assert!(check(BOUND, 50, 61184, parent).is_err());
        // A vanished process or a loop ends the walk.
        assert!(check(BOUND, 999, 61184, parent).is_err());
        assert!(check(BOUND, 7, 61184, Some).is_err());
    }

    #[test]
    fn only_a_peer_of_the_instance_uid_waits_and_only_while_the_bound_process_is_gone() {
        fn check(pid: u32, uid: u32, bound_alive: bool, expect: bool) {
            let alive = |p: u32| p != BOUND.pid || bound_alive;
            let got = awaits_rebinding(BOUND, pid, uid, parent, alive);
            assert_eq!(got, expect, "pid {pid} uid {uid} bound alive {bound_alive}");
        }
        // The restarted instance's process, before its binding: it waits.
        check(200, 61184, false, true);
        // The same while the bound process runs: a stranger of that uid, refused.
        check(200, 61184, true, false);
        // Another uid never waits.
        check(200, 61185, false, false);
        // The bound tree itself is accepted, not held.
        check(102, 61184, false, false);
    }

    #[test]
    fn this_process_is_alive_and_a_reaped_one_is_not() {
        assert!(alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!alive(pid));
    }

    #[test]
    fn this_process_has_a_parent_in_proc() {
        let me = std::process::id();
        assert_eq!(parent_of(me), Some(std::os::unix::process::parent_id()));
    }
}
