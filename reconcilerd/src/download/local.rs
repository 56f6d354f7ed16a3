//! Which local files a hub may name with a `file://` module URL. A hub must not make the device
//! read an arbitrary file (a secret, a device node, a FIFO), so a `file://` URL is served only
//! from the directories of `[reconciler] file_url_dirs` (none by default): its path must be
//! absolute, hold no `.` or `..` component, lie under one of them as written, and the file
//! opened must be a regular file whose real path (symlinks resolved, read from the open
//! descriptor) lies under one of them resolved. A URL outside is refused before the file system
//! is touched, so the answer says nothing about what exists there.

use std::path::{Component, Path, PathBuf};

/// Why a `file://` URL may not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalFileError {
    /// The URL names a host, a relative path, or a path with `.` or `..`.
    #[error("{url:?}: a file:// URL must be an absolute path without '.' or '..' components")]
    Malformed {
        /// The URL as the manifest gave it.
        url: String,
    },
    /// The path is outside every allowed directory (or none is configured).
    #[error(
        "{url:?}: file:// modules may only come from [reconciler] file_url_dirs ({allowed}) on this device"
    )]
    NotAllowed {
        /// The URL as the manifest gave it.
        url: String,
        /// The allowed directories, for the message.
        allowed: String,
    },
    /// The path resolves (through a symlink) outside every allowed directory.
    #[error("{url:?}: resolves to {real:?}, outside [reconciler] file_url_dirs ({allowed})")]
    Escapes {
        /// The URL as the manifest gave it.
        url: String,
        /// Where the opened file really is.
        real: PathBuf,
        /// The allowed directories, for the message.
        allowed: String,
    },
    /// The file is not a regular file (a directory, a device, a FIFO, a socket).
    #[error("{url:?}: not a regular file")]
    NotRegular {
        /// The URL as the manifest gave it.
        url: String,
    },
}

/// The path a `file://` URL names, if the URL is well formed: `file://` then an absolute path
/// whose components are all normal names (no host part, no `.`, no `..`).
pub fn file_url_path(url: &str) -> Result<&Path, LocalFileError> {
    let malformed = || LocalFileError::Malformed {
        url: url.to_owned(),
    };
    let path = Path::new(url.strip_prefix("file://").ok_or_else(malformed)?);
    // `Path::components` drops a lone `.` silently, so it is looked for in the text too.
    let dot = path
        .to_str()
        .is_some_and(|p| p.split('/').any(|c| c == "."));
    let mut components = path.components();
    if components.next() != Some(Component::RootDir)
        || dot
        || !components.all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(malformed());
    }
    Ok(path)
}

/// Whether `path` lies under one of `dirs`, component by component (`/a/bc` is not under
/// `/a/b`). Pure: the caller resolves what must be resolved.
pub fn is_under(path: &Path, dirs: &[PathBuf]) -> bool {
    dirs.iter().any(|d| d.is_absolute() && path.starts_with(d))
}

/// The allowed directories as a message shows them.
pub fn describe(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "none configured".to_owned();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first check, before any file system access: the URL's path as written.
pub fn check_url<'a>(url: &'a str, dirs: &[PathBuf]) -> Result<&'a Path, LocalFileError> {
    let path = file_url_path(url)?;
    if !is_under(path, dirs) {
        return Err(LocalFileError::NotAllowed {
            url: url.to_owned(),
            allowed: describe(dirs),
        });
    }
    Ok(path)
}

/// The second check, on the opened file: regular, and its real path under one of `dirs`
/// resolved (a directory that does not exist allows nothing).
pub fn check_opened(
    url: &str,
    real: &Path,
    is_regular: bool,
    dirs: &[PathBuf],
    resolved_dirs: &[PathBuf],
) -> Result<(), LocalFileError> {
    if !is_under(real, resolved_dirs) {
        return Err(LocalFileError::Escapes {
            url: url.to_owned(),
            real: real.to_owned(),
            allowed: describe(dirs),
        });
    }
    if !is_regular {
        return Err(LocalFileError::NotRegular {
            url: url.to_owned(),
        });
    }
    Ok(())
}

/// Opens the file `url` names for reading, if the rule allows it. The open does not block on a
/// FIFO and the real path is read from the descriptor, so a symlink swapped in between the
/// checks cannot escape.
pub async fn open(url: &str, dirs: &[PathBuf]) -> Result<tokio::fs::File, super::FetchError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = check_url(url, dirs)?.to_owned();
    let dirs = dirs.to_vec();
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)?;
        let meta = file.metadata()?;
        let real = std::fs::read_link(format!("/proc/self/fd/{}", fd_of(&file)))?;
        let resolved: Vec<PathBuf> = dirs.iter().filter_map(|d| d.canonicalize().ok()).collect();
        check_opened(&url, &real, meta.file_type().is_file(), &dirs, &resolved)?;
        Ok(tokio::fs::File::from_std(file))
    })
    .await
    .map_err(|e| super::FetchError::Io(std::io::Error::other(e)))?
}

fn fd_of(file: &std::fs::File) -> i32 {
    use std::os::fd::AsRawFd;
    file.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(d: &[&str]) -> Vec<PathBuf> {
        d.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn only_absolute_plain_paths_are_file_urls() {
        assert_eq!(
            file_url_path("file:///media/usb/m.bin").unwrap(),
            Path::new("/media/usb/m.bin")
        );
        for bad in [
            "file://host/m.bin",
            "file://m.bin",
            "file:///media/usb/../../etc/shadow",
            "file:///media/./usb/m.bin",
            "file:///media/usb/..",
            "http://x/m.bin",
        ] {
            assert!(
                matches!(file_url_path(bad), Err(LocalFileError::Malformed { .. })),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn a_url_outside_the_allowed_directories_is_refused_before_any_access() {
        let allowed = dirs(&["/media/usb", "/var/lib/evp/side-load"]);
        assert!(check_url("file:///media/usb/cam/m.bin", &allowed).is_ok());
        assert!(check_url("file:///var/lib/evp/side-load/m", &allowed).is_ok());
        for bad in [
            "file:///etc/shadow",
            "file:///media/usbx/m",
            "file:///media",
        ] {
            let e = check_url(bad, &allowed).unwrap_err();
            assert!(matches!(e, LocalFileError::NotAllowed { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("/media/usb, /var/lib"), "{e}");
        }
        // None configured, the default: every file:// URL is refused, saying so.
        let e = check_url("file:///media/usb/m.bin", &[]).unwrap_err();
        assert!(e.to_string().contains("none configured"), "{e}");
        // A relative directory in the setting allows nothing.
        assert!(check_url("file:///m", &dirs(&["m", ""])).is_err());
    }

    #[test]
    fn the_opened_file_must_be_regular_and_really_inside() {
        let allowed = dirs(&["/media/usb"]);
        let resolved = dirs(&["/mnt/usb0"]);
        let url = "file:///media/usb/m";
        assert!(check_opened(url, Path::new("/mnt/usb0/m"), true, &allowed, &resolved).is_ok());
        let e = check_opened(url, Path::new("/etc/shadow"), true, &allowed, &resolved);
        assert!(matches!(e, Err(LocalFileError::Escapes { .. })), "{e:?}");
        let e = check_opened(url, Path::new("/mnt/usb0/fifo"), false, &allowed, &resolved);
        assert!(matches!(e, Err(LocalFileError::NotRegular { .. })), "{e:?}");
        // An allowed directory that does not exist resolves to nothing and allows nothing.
        let e = check_opened(url, Path::new("/media/usb/m"), true, &allowed, &[]);
        assert!(matches!(e, Err(LocalFileError::Escapes { .. })), "{e:?}");
    }
}
