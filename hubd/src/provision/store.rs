//! The provisioned credentials on disk: `<data_dir>/hub/credentials.json`, mode 0600 (hubd's
//! user alone), written atomically so a power cut leaves the old file or the new one, never
//! half of one. A damaged file stops hubd with its name: it is not replaced by itself, since a
//! hub usually refuses to provision a device name twice.

use std::path::{Path, PathBuf};

use super::Credentials;

/// The file, in hubd's state directory.
pub const FILE: &str = "credentials.json";
/// Only hubd's user may read the credentials.
const MODE: u32 = 0o600;

/// Why the credentials cannot be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file does not hold credentials.
    #[error(
        "{} does not hold provisioned credentials ({reason}); restore it, or remove it to \
         provision the device again",
        path.display()
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the file's content: it may hold a secret).
        reason: String,
    },
    /// Reading or writing failed.
    #[error("{action} {}: {error}", path.display())]
    Io {
        /// What hubd was doing.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What failed.
        error: String,
    },
}

/// The credentials kept in `dir`, if any.
pub fn load(dir: &Path) -> Result<Option<Credentials>, StoreError> {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StoreError::Io {
                action: "reading",
                path,
                error: e.to_string(),
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StoreError::Damaged {
            path,
            // serde_json's message names a line and column, not the content.
            reason: e.to_string(),
        })
}

/// Keeps `credentials` in `dir`, replacing what was there. The crash hook's points
/// (`EVP_TEST_CRASH_AT`, debug builds) are `credentials-tmp-written`, `credentials-tmp-synced`
/// and `credentials-renamed`.
pub fn save(dir: &Path, credentials: &Credentials) -> Result<PathBuf, StoreError> {
    let path = dir.join(FILE);
    let mut bytes = serde_json::to_vec_pretty(credentials).map_err(|e| StoreError::Io {
        action: "encoding",
        path: path.clone(),
        error: e.to_string(),
    })?;
    bytes.push(b'\n');
    let mut crash_hook = |point: evp_daemon::fs::WritePoint| {
        evp_daemon::crash::point(
            crate::spool::DAEMON,
            &format!("credentials-{}", point.name()),
        );
        Ok(())
    };
    evp_daemon::write_atomic(&path, &bytes, MODE, Some(&mut crash_hook)).map_err(|e| {
        StoreError::Io {
            action: "writing",
            path: path.clone(),
            error: e.to_string(),
        }
    })?;
    Ok(path)
}
