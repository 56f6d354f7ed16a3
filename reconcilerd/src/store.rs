//! What reconcilerd keeps on disk: the desired deployment (written crash-safely) and the module
//! cache, where every module file is named by its SHA-256 once verified.

use std::path::{Path, PathBuf};

use evp_daemon::fs::{WritePoint, temp_path, write_atomic};
use evp_schemas::Deployment;
use tracing::{info, warn};

use crate::crash;

/// Failures of the desired-deployment file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Writing the new desired deployment failed; the previous one is still in place.
    #[error("writing {path}: {source}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A desired deployment on disk that cannot be used (written by an older build that accepted
/// what this one refuses, or damaged), reported in the status until the hub sends a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    /// Its `deploymentId`, when it can be read.
    pub deployment_id: Option<String>,
    /// Why it cannot be used, and where it was set aside.
    pub message: String,
}

impl Unusable {
    /// `deployment` came from the hub but could not be persisted (`e`): it is not taken, the
    /// previous one keeps running, and hubd hands it again (its retry of a failed
    /// `ApplyDeployment`), so the device takes it by itself once the disk has room.
    pub fn unsaved(deployment: &Deployment, e: &StoreError) -> Unusable {
        let StoreError::Write { source, .. } = e;
        let full = source.raw_os_error() == Some(libc::ENOSPC);
        Unusable {
            deployment_id: deployment.deployment_id.clone(),
            message: format!(
                "deployment {} not applied: {e}{}; the previous deployment keeps running, and \
                 the write is tried again",
                deployment.deployment_id.as_deref().unwrap_or("(no id)"),
                if full {
                    " (ENOSPC: the data directory's file system is full)"
                } else {
                    ""
                }
            ),
        }
    }
}

/// The desired deployment on disk, `<dir>/desired.json`.
#[derive(Debug, Clone)]
pub struct DesiredStore {
    dir: PathBuf,
}

/// Name of the desired deployment file inside the store's directory.
const DESIRED_FILE: &str = "desired.json";
/// Where a desired deployment that does not parse is set aside for inspection.
const DESIRED_INVALID_FILE: &str = "desired.json.invalid";

impl DesiredStore {
    /// A store in `dir`, which must exist.
    pub fn new(dir: PathBuf) -> Self {
        DesiredStore { dir }
    }

    /// Path of the desired deployment file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(DESIRED_FILE)
    }

    /// Reads the last desired deployment. A missing file is `None`; an invalid one is logged,
    /// moved aside for inspection, and returned as [`Unusable`] (the device then waits for the
    /// hub rather than running something it cannot trust, and says so in its status); an
    /// unreadable one is logged and `None`. A leftover temporary file (a
    /// crash before its rename) is removed unread: the rename is what makes a deployment
    /// current.
    pub fn load(&self) -> Result<Option<Deployment>, Unusable> {
        let tmp = temp_path(&self.path());
        match std::fs::remove_file(&tmp) {
            Ok(()) => info!("removed {} left by an interrupted write", tmp.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("cannot remove {}: {e}", tmp.display()),
        }
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                warn!("cannot read {}: {e}", path.display());
                return Ok(None);
            }
        };
        match Deployment::from_json(&text) {
            Ok(d) => Ok(Some(d)),
            Err(e) => {
                let aside = self.dir.join(DESIRED_INVALID_FILE);
                warn!(
                    "{} is not a valid deployment ({e}); moved to {}",
                    path.display(),
                    aside.display()
                );
                let _ = std::fs::rename(&path, &aside);
                let deployment_id = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("deploymentId")?.as_str().map(str::to_owned))
                    .map(|id| evp_schemas::bus_string::escape_nul(&id).into_owned());
                Err(Unusable {
                    deployment_id,
                    message: format!(
                        "the deployment kept on disk cannot be applied ({e}); it was moved to \
                         {}; waiting for a new deployment",
                        aside.display()
                    ),
                })
            }
        }
    }

    /// Replaces the desired deployment atomically: a temporary file is written and synced,
    /// renamed over the old one, and the directory synced, so after a power cut the file holds
    /// either the old or the new deployment, never a mix. The crash hook's points are
    /// `desired-tmp-written`, `desired-tmp-synced` and `desired-renamed`.
    pub fn save(&self, deployment: &Deployment) -> Result<(), StoreError> {
        let path = self.path();
        let mut crash_hook = |point: WritePoint| {
            crash::point(&format!("desired-{}", point.name()));
            Ok(())
        };
        // 0666 less the umask, as `File::create` makes it: the folder (0700) keeps others out.
        write_atomic(
            &path,
            deployment.to_json().as_bytes(),
            0o666,
            Some(&mut crash_hook),
        )
        .map_err(|e| StoreError::Write {
            path,
            source: e.error,
        })
    }
}

/// Module files named by their verified SHA-256, shared read-only with the runtimes, plus the
/// `<hash>.partial` files of transfers under way (and `<hash>.partial.meta` beside them).
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
}

impl ModuleCache {
    /// A cache in `dir`, which must exist.
    pub fn new(dir: PathBuf) -> Self {
        ModuleCache { dir }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the verified module file with this hash (which may not exist yet).
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256.to_ascii_lowercase())
    }

    /// Whether the verified module file with this hash is in the cache.
    pub fn contains(&self, sha256: &str) -> bool {
        !sha256.is_empty() && self.path_of(sha256).is_file()
    }

    /// Path of the partial file a transfer of this hash writes.
    pub fn partial_of(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{}.partial", sha256.to_ascii_lowercase()))
    }

    /// Path of the validator kept beside the partial file.
    pub fn partial_meta_of(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{}.partial.meta", sha256.to_ascii_lowercase()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_store_round_trips_and_sets_aside_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = DesiredStore::new(dir.path().to_owned());
        assert_eq!(store.load(), Ok(None));
        let d = Deployment {
            deployment_id: Some("d1".into()),
            ..Default::default()
        };
        store.save(&d).unwrap();
        assert_eq!(store.load(), Ok(Some(d)));
        assert!(!temp_path(&store.path()).exists());
        std::fs::write(store.path(), b"{not json").unwrap();
        assert!(store.load().is_err());
        assert!(dir.path().join("desired.json.invalid").exists());
        assert_eq!(store.load(), Ok(None), "set aside once");
    }

    #[test]
    fn a_deployment_that_no_longer_validates_is_reported_with_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = DesiredStore::new(dir.path().to_owned());
        let old = r#"{"deploymentId":"d\u0000","instanceSpecs":{},"modules":{"m\u0000":{"moduleImpl":"spawn","entryPoint":"main"}}}"#;
        std::fs::write(store.path(), old).unwrap();
        let e = store.load().unwrap_err();
        assert_eq!(e.deployment_id.as_deref(), Some("d\\0"));
        assert!(e.message.contains("NUL"), "{}", e.message);
        assert!(!e.message.contains('\0'));
    }

    #[test]
    fn a_deployment_that_cannot_be_written_is_reported_with_its_id_and_enospc_named() {
        let d = Deployment {
            deployment_id: Some("d2".into()),
            ..Default::default()
        };
        let e = StoreError::Write {
            path: PathBuf::from("/data/deployment/desired.json"),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let u = Unusable::unsaved(&d, &e);
        assert_eq!(u.deployment_id.as_deref(), Some("d2"));
        assert!(u.message.contains("ENOSPC"), "{}", u.message);
        assert!(u.message.contains("desired.json"), "{}", u.message);
        let denied = StoreError::Write {
            path: PathBuf::from("/data/deployment/desired.json"),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert!(!Unusable::unsaved(&d, &denied).message.contains("ENOSPC"));
    }

    #[test]
    fn a_leftover_temporary_file_is_ignored_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = DesiredStore::new(dir.path().to_owned());
        let old = Deployment {
            deployment_id: Some("old".into()),
            ..Default::default()
        };
        store.save(&old).unwrap();
        // A crash after the new deployment's temporary file was (partly) written.
        std::fs::write(
            dir.path().join("desired.json.tmp"),
            b"{\"deploymentId\": \"ne",
        )
        .unwrap();
        assert_eq!(store.load(), Ok(Some(old)));
        assert!(!dir.path().join("desired.json.tmp").exists());
    }
}
