//! Files the daemons keep: one crash-safe write ([`write_atomic`]) and one way to make a
//! directory only its owner (or, with 0711, also traversers) may use ([`create_private_dir`]).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Why [`write_atomic`] failed. Until the rename, the previous file is untouched.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {error}", path.display())]
pub struct AtomicWriteError {
    /// The step that failed: `creating`, `writing`, `syncing` or `renaming into place`.
    pub action: &'static str,
    /// What the step acted on: the temporary file, the target, or its directory.
    pub path: PathBuf,
    /// The I/O error (in the message, so it is not repeated as a cause).
    pub error: std::io::Error,
}

/// The moments of [`write_atomic`] at which a hook is called, so a test can stop the write
/// there as a power cut would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePoint {
    /// The temporary file holds the new bytes, not yet synced.
    TempWritten,
    /// The temporary file is synced, not yet renamed.
    TempSynced,
    /// The temporary file is renamed over the target; the directory is not yet synced.
    Renamed,
}

impl WritePoint {
    /// Every point, in the order a write passes them.
    pub const ALL: [WritePoint; 3] = [
        WritePoint::TempWritten,
        WritePoint::TempSynced,
        WritePoint::Renamed,
    ];

    /// The point's name: `tmp-written`, `tmp-synced` or `renamed`.
    pub fn name(self) -> &'static str {
        match self {
            WritePoint::TempWritten => "tmp-written",
            WritePoint::TempSynced => "tmp-synced",
            WritePoint::Renamed => "renamed",
        }
    }
}

/// Called at each [`WritePoint`]; an error stops the write there and is returned.
pub type WriteHook<'a> = &'a mut dyn FnMut(WritePoint) -> std::io::Result<()>;

/// The temporary file [`write_atomic`] writes `path` through: `<path>.tmp`, in the same
/// directory (a rename is atomic only within one file system). A daemon that finds one at
/// start knows a write was cut short, and the target still holds the previous content.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    PathBuf::from(temp)
}

/// Replaces `path` with `bytes` so that after a power cut it holds either the old or the new
/// content, never a mix: writes [`temp_path`] (created with `mode`, less the umask), syncs it,
/// renames it over `path` and syncs the directory. A write that fails before the rename
/// removes its temporary file. `hook`, when given, is called at each [`WritePoint`].
pub fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    mut hook: Option<WriteHook<'_>>,
) -> Result<(), AtomicWriteError> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |error| AtomicWriteError {
            action,
            path,
            error,
        }
    };
    if path.file_name().is_none() {
        return Err(fail("creating", path)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let temp = temp_path(path);
    let mut at = |point| hook.as_mut().map_or(Ok(()), |h| h(point));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)
            .map_err(fail("creating", &temp))?;
        file.write_all(bytes).map_err(fail("writing", &temp))?;
        at(WritePoint::TempWritten).map_err(fail("writing", &temp))?;
        file.sync_all().map_err(fail("syncing", &temp))?;
        at(WritePoint::TempSynced).map_err(fail("syncing", &temp))?;
        std::fs::rename(&temp, path).map_err(fail("renaming into place", path))
    })();
    if let Err(e) = written {
        // A half-written temporary file (a full disk: ENOSPC) would hold the space that the
        // next attempt needs; the target is untouched either way.
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    at(WritePoint::Renamed).map_err(fail("renaming into place", path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail("syncing", dir))
}

/// Why [`create_private_dir`] or [`refuse_non_dir`] refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    /// A symbolic link is where the directory should be: following it could put the
    /// daemon's (or an instance's) files anywhere.
    #[error("{} is a symbolic link; remove it and start again", .0.display())]
    Symlink(PathBuf),
    /// Something other than a directory is in its place.
    #[error("{} exists and is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// Inspecting or creating the directory failed.
    #[error("{action} {}: {error}", path.display())]
    Io {
        /// `inspecting` or `creating`.
        action: &'static str,
        /// The directory.
        path: PathBuf,
        /// The I/O error (in the message, so it is not repeated as a cause).
        error: std::io::Error,
    },
    /// The directory exists but its mode could not be set.
    #[error("making {} private ({mode:04o}): {error}", path.display())]
    Mode {
        /// The directory.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
        /// The I/O error (in the message, so it is not repeated as a cause).
        error: std::io::Error,
    },
}

/// Refuses a symbolic link or a non-directory at `dir` (looked at with lstat, so a link is
/// never followed). The directory's metadata when it exists, `None` when nothing is there.
pub fn refuse_non_dir(dir: &Path) -> Result<Option<std::fs::Metadata>, PrivateDirError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(PrivateDirError::Symlink(dir.to_owned())),
        Ok(m) if !m.is_dir() => Err(PrivateDirError::NotADirectory(dir.to_owned())),
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(PrivateDirError::Io {
            action: "inspecting",
            path: dir.to_owned(),
            error,
        }),
    }
}

/// Creates `dir` (and missing parents, with the same `mode` less the umask) and gives it
/// exactly `mode`, also when it existed with another one. A symbolic link or a file in its
/// place is refused (see [`refuse_non_dir`]); the owner is left as it is.
pub fn create_private_dir(dir: &Path, mode: u32) -> Result<(), PrivateDirError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if refuse_non_dir(dir)?.is_none() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .map_err(|error| PrivateDirError::Io {
                action: "creating",
                path: dir.to_owned(),
                error,
            })?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|error| {
        PrivateDirError::Mode {
            path: dir.to_owned(),
            mode,
            error,
        }
    })
}

/// A file read as a stream of chunks of up to `chunk` bytes, for a request body (a blob
/// upload, an image archive for the engine): the file is never in memory whole.
pub fn chunks(
    file: tokio::fs::File,
    chunk: usize,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(Some(file), move |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; chunk];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn atomic_write_replaces_the_file_with_the_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomic(&path, b"old", 0o600, None).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        write_atomic(&path, b"new", 0o600, None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!temp_path(&path).exists());
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 1, "only the file itself");
    }

    #[test]
    fn a_write_stopped_at_each_point_leaves_old_or_new_never_a_mix() {
        fn check(stop_at: WritePoint, expect: &[u8]) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("desired.json");
            write_atomic(&path, b"old content", 0o644, None).unwrap();
            let mut passed = Vec::new();
            let mut hook = |p: WritePoint| {
                passed.push(p);
                if p == stop_at {
                    Err(std::io::Error::other("power cut"))
                } else {
                    Ok(())
                }
            };
            let e = write_atomic(&path, b"new content", 0o644, Some(&mut hook)).unwrap_err();
            assert!(e.to_string().contains("power cut"), "{e}");
            assert_eq!(passed.last(), Some(&stop_at));
            assert_eq!(
                std::fs::read(&path).unwrap(),
                expect,
                "stopped at {stop_at:?}"
            );
            assert!(!temp_path(&path).exists(), "a failed write leaves no temp");
        }
        check(WritePoint::TempWritten, b"old content");
        check(WritePoint::TempSynced, b"old content");
        check(WritePoint::Renamed, b"new content");
    }

    #[test]
    fn the_hook_sees_every_point_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut passed = Vec::new();
        let mut hook = |p| {
            passed.push(p);
            Ok(())
        };
        write_atomic(&dir.path().join("f"), b"x", 0o600, Some(&mut hook)).unwrap();
        assert_eq!(passed, WritePoint::ALL);
    }

    #[test]
    fn a_write_into_a_missing_directory_names_the_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent/f");
        let e = write_atomic(&path, b"x", 0o600, None).unwrap_err();
        assert_eq!(e.action, "creating");
        assert_eq!(e.path, temp_path(&path));
    }

    #[test]
    fn private_dir_is_created_or_fixed_with_the_mode() {
        fn check(existing_mode: Option<u32>, mode: u32) {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join("a/b");
            if let Some(m) = existing_mode {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).unwrap();
            }
            create_private_dir(&dir, mode).unwrap();
            assert_eq!(mode_of(&dir), mode, "from {existing_mode:?}");
        }
        check(None, 0o700);
        check(None, 0o711);
        check(Some(0o755), 0o700);
        check(Some(0o700), 0o711);
    }

    #[test]
    fn private_dir_refuses_a_symlink_or_a_file() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = create_private_dir(&link, 0o700).unwrap_err();
        assert!(matches!(e, PrivateDirError::Symlink(_)), "{e}");
        assert_eq!(mode_of(&target), 0o755, "the link's target is not touched");
        let file = root.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = create_private_dir(&file, 0o700).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} exists and is not a directory", file.display())
        );
        assert!(
            refuse_non_dir(&root.path().join("absent"))
                .unwrap()
                .is_none()
        );
    }
}
