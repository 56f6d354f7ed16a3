//! The data directory's lock: one `evp-devhub up` per data directory. Two stacks on one
//! directory would share its bus socket, desired deployment and instances, and each would stop
//! the other's modules.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file inside the data directory.
pub const LOCK_FILE: &str = "devhub.lock";

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "{dir} is in use by another evp-devhub (pid {holder}); stop it first, or give another --data-dir"
    )]
    Held {
        /// The data directory.
        dir: PathBuf,
        /// The holder's pid as it wrote it in the lock file (`unknown` when unreadable).
        holder: String,
    },
    /// The lock file could not be opened, locked or written.
    #[error("locking {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The lock, held (with the holder's pid written in the file) until dropped. The descriptor is
/// close-on-exec, so the daemons the stack starts do not keep it.
#[derive(Debug)]
pub struct DataDirLock {
    _file: Flock<std::fs::File>,
}

impl DataDirLock {
    /// Takes the lock of `dir` at once, or says who holds it.
    pub fn take(dir: &Path) -> Result<DataDirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source: std::io::Error| LockError::Io {
            path: path.clone(),
            source,
        };
        // Not truncated on open: the holder's pid is in it until the lock is ours.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let holder = match file.read_to_string(&mut text) {
                    Ok(_) if !text.trim().is_empty() => text.trim().to_owned(),
                    _ => "unknown".to_owned(),
                };
                return Err(LockError::Held {
                    dir: dir.to_owned(),
                    holder,
                });
            }
            Err((_, e)) => return Err(io(e.into())),
        };
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_the_first_frees_it_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::take(dir.path()).unwrap();
        // flock locks belong to the open file description, so a second open in this process
        // conflicts just as another process would.
        let e = DataDirLock::take(dir.path()).unwrap_err();
        let pid = std::process::id().to_string();
        assert!(
            matches!(&e, LockError::Held { holder, .. } if *holder == pid),
            "{e}"
        );
        assert!(e.to_string().contains(&format!("pid {pid}")), "{e}");
        drop(first);
        DataDirLock::take(dir.path()).unwrap();
    }
}
