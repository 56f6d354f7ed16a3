//! The open-file limit. Every instance costs descriptors (runtimed-container: a pidfd and the
//! log relay's; sdk-broker: its listening socket and its connection), and the soft limit that
//! a daemon inherits (1024 under systemd's defaults, and in the developer's shell that starts
//! `evp-devhub`) caps the instances a device runs. The units set `LimitNOFILE`; a daemon also
//! raises its soft limit to the hard one at start, which is what systemd recommends for
//! programs that do not use `select()`.

/// The soft and hard `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// What is enforced.
    pub soft: u64,
    /// How far an unprivileged process may raise `soft`.
    pub hard: u64,
}

/// The process's current open-file limit.
pub fn nofile() -> std::io::Result<Limit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Limit {
        soft: r.rlim_cur,
        hard: r.rlim_max,
    })
}

/// Raises the soft open-file limit to the hard one; returns the limit in force after.
pub fn raise_nofile() -> std::io::Result<Limit> {
    let now = nofile()?;
    if now.soft >= now.hard {
        return Ok(now);
    }
    let r = libc::rlimit {
        rlim_cur: now.hard,
        rlim_max: now.hard,
    };
    // SAFETY: setrlimit reads one rlimit from the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    nofile()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let before = nofile().unwrap();
        let after = raise_nofile().unwrap();
        assert_eq!(after.hard, before.hard);
        assert_eq!(after.soft, after.hard);
    }
}
