//! Who an instance runs as. Where the runtime may change uids (root, or CAP_SETUID, CAP_SETGID
//! and CAP_CHOWN), every instance gets a uid of its own from a reserved range, as systemd's
//! `DynamicUser=` does: gid equal to the uid, no supplementary groups, its workspace owned by
//! it alone. Then every process of that uid is the instance's, which is what the SDK's peer
//! check and the stop rely on. Elsewhere (an ordinary user running the devhub) instances run
//! as the runtime's own user.

use std::collections::HashSet;
use std::path::Path;

use tracing::warn;

/// First uid of the default range: systemd's range for dynamic users (61184–65519), which no
/// distribution gives to regular or system users.
pub const DEFAULT_UID_MIN: u32 = 61184;
/// Last uid of the default range (65519: below 65534, `nobody`, and 65535, the 16-bit -1).
pub const DEFAULT_UID_MAX: u32 = 65519;

/// Capabilities (bit numbers, `capability.h`) needed to give an instance its own uid: setgid,
/// setuid (and dropping supplementary groups) in the child, and chown of its workspace.
const CAP_CHOWN: u32 = 0;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

/// How instances get their uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identities {
    /// Each instance runs under a uid of its own from `min..=max`.
    PerInstance {
        /// First uid of the range.
        min: u32,
        /// Last uid of the range.
        max: u32,
    },
    /// Instances run as the runtime's own user (it cannot change uids).
    Shared,
}

impl Identities {
    /// Per-instance uids from `min..=max` when this process can change uids; otherwise
    /// [`Identities::Shared`], saying so once in the log.
    pub fn detect(min: u32, max: u32) -> Identities {
        let caps = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| effective_caps(&s));
        if caps.is_some_and(can_change_uids) {
            return Identities::PerInstance { min, max };
        }
        warn!(
            uid = nix::unistd::geteuid().as_raw(),
            "instances run as the runtime's own user: it cannot change uids (it needs \
             CAP_SETUID, CAP_SETGID and CAP_CHOWN), so they are not isolated from each other; \
             the SDK sockets still serve only each instance's own processes"
        );
        Identities::Shared
    }

    /// Whether instances get uids of their own.
    pub fn per_instance(&self) -> bool {
        matches!(self, Identities::PerInstance { .. })
    }
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn can_change_uids(caps: u64) -> bool {
    [CAP_CHOWN, CAP_SETGID, CAP_SETUID]
        .iter()
        .all(|bit| caps & (1 << bit) != 0)
}

/// Drops every capability of the calling process: the ambient set (which `execve` would carry
/// into the module) and the effective, permitted and inheritable sets. Needed after `setuid`
/// in an instance's child: a runtime that is not root keeps its capabilities across a change
/// between two non-zero uids, and its ambient ones would survive the exec. Async-signal-safe
/// (two system calls), for `pre_exec`.
pub fn drop_all_capabilities() -> std::io::Result<()> {
    /// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, in two 32-bit halves.
    const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // SAFETY: prctl with integer arguments only; no memory of ours is touched.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut header = Header {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads the header and two data structs, laid out as the kernel's
    // `__user_cap_header_struct` and `__user_cap_data_struct`, which live for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Picks an instance's uid in `min..=max`: `preferred` (the uid it had, so its workspace stays
/// its own) when it is in range and not taken, else the lowest uid not taken.
pub fn pick(
    min: u32,
    max: u32,
    preferred: Option<u32>,
    taken: impl Fn(u32) -> bool,
) -> Option<u32> {
    if let Some(p) = preferred.filter(|p| (min..=max).contains(p) && !taken(*p)) {
        return Some(p);
    }
    (min..=max).find(|u| !taken(*u))
}

/// Uids in `min..=max` of live processes: a dynamic user of systemd's, a leftover of an
/// instance. Such a uid is never given to an instance.
pub fn used_by_processes(min: u32, max: u32) -> HashSet<u32> {
    crate::tree::scan()
        .into_iter()
        .map(|p| p.uid)
        .filter(|u| (min..=max).contains(u))
        .collect()
}

/// Whether the user database names `uid` (a user that owns files elsewhere): such a uid is
/// never given to an instance. Asked per candidate, not for the whole range.
pub fn in_user_database(uid: u32) -> bool {
    matches!(
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Ok(Some(_))
    )
}

/// The owner of `path`, when it exists.
pub fn owner(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.uid())
}

/// Gives `dir` and everything in it to `uid` (group `uid` too), without following symlinks,
/// so an instance that got another uid than last time still owns its workspace. The runtime
/// must be able to read the tree: [`take_tree`] it first when another uid owns it.
pub fn chown_tree(dir: &Path, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path(), uid)?;
        }
    }
    if meta.uid() != uid || meta.gid() != uid {
        std::os::unix::fs::lchown(dir, Some(uid), Some(uid))?;
    }
    Ok(())
}

/// Makes `dir` and everything in it the runtime's (`own`), each directory readable and
/// searchable by it, without following symlinks: with CAP_CHOWN alone (no CAP_DAC_OVERRIDE or
/// CAP_FOWNER) the runtime can then purge, or give to another uid, what an instance owned.
pub fn take_tree(dir: &Path, own: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.uid() != own {
        std::os::unix::fs::lchown(dir, Some(own), Some(own))?;
    }
    if meta.is_dir() {
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o700 != 0o700 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700))?;
        }
        for entry in std::fs::read_dir(dir)? {
            take_tree(&entry?.path(), own)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_the_status_text() {
        let root = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert!(effective_caps(root).is_some_and(can_change_uids));
        let user = "CapEff:\t0000000000000000\n";
        assert!(!effective_caps(user).is_some_and(can_change_uids));
        // CAP_SETUID and CAP_SETGID without CAP_CHOWN are not enough.
        let partial = format!("CapEff:\t{:016x}\n", (1u64 << 6) | (1 << 7));
        assert!(!effective_caps(&partial).is_some_and(can_change_uids));
        let all = format!("CapEff:\t{:016x}\n", 1u64 | (1 << 6) | (1 << 7));
        assert!(effective_caps(&all).is_some_and(can_change_uids));
        assert_eq!(effective_caps("nothing"), None);
    }

    #[test]
    fn the_preferred_uid_is_kept_when_free_else_the_lowest_free_one() {
        let taken = |set: &'static [u32]| move |u: u32| set.contains(&u);
        assert_eq!(pick(10, 15, None, taken(&[])), Some(10));
        assert_eq!(pick(10, 15, Some(13), taken(&[10])), Some(13));
        assert_eq!(pick(10, 15, Some(13), taken(&[10, 13])), Some(11));
        // A preferred uid outside the range (the range was changed) is not kept.
        assert_eq!(pick(10, 15, Some(3), taken(&[])), Some(10));
        assert_eq!(pick(10, 11, None, taken(&[10, 11])), None);
    }
}
