//! What the runtime persists about each instance it started, so that after its own restart it
//! can find the process again or say that it died: `<instances dir>/<name>/runtime.json`,
//! written atomically (temp file, fsync, rename, fsync of the directory).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the record inside the instance directory.
pub const RECORD_FILE: &str = "runtime.json";
/// Format version written in every record; a record of another version is not trusted.
pub const RECORD_VERSION: u32 = 1;
/// Largest record read back: a real one is a few hundred bytes, so anything bigger is not ours.
const MAX_RECORD_BYTES: u64 = 64 * 1024;

/// Errors reading or writing records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A record, its temp file or its directory could not be written, synced or renamed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A record exists but could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A record was read but is not valid JSON of this format (hand-edited, another version).
    #[error("{path} is not a record this runtime understands: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A record could not be removed once its instance left.
    #[error("removing {path}: {source}")]
    Remove {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The process an instance runs as: its PID and, to tell it from a later process that got the
/// same PID, its start time (`/proc/<pid>/stat` field 22, clock ticks after boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessHandle {
    /// The process id; also its process group id, since spawned modules lead their own group.
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`.
    pub start_time: u64,
}

/// How an instance ended, when it ended by itself while this runtime watched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// `self-exiting` or `error`.
    pub status: String,
    /// The failure message; empty unless `error`.
    pub failure_message: String,
}

/// One instance as the runtime last knew it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The module the instance runs.
    pub module_id: String,
    /// The module's kind (`spawn`).
    pub kind: String,
    /// The module's file path, as given to `LoadModule`.
    pub module_location: String,
    /// The process, once it started; `None` if it never did.
    pub process: Option<ProcessHandle>,
    /// Set once the instance ended by itself (or failed to start); `None` while it runs.
    pub ended: Option<Ended>,
    /// The uid of its own it runs as; absent when it runs as the runtime's user (and in
    /// records of earlier builds). Re-adoption keeps it, so no other instance gets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The engine's id of its container, for the docker kind; absent for processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// Writes `record` as `<instance_dir>/runtime.json`, atomically and durably.
pub fn save(instance_dir: &Path, record: &InstanceRecord) -> Result<(), RecordError> {
    let path = instance_dir.join(RECORD_FILE);
    let mut text = serde_json::to_vec_pretty(record).map_err(|e| RecordError::Write {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    text.push(b'\n');
    // 0600: only the runtime reads it; an instance with a uid of its own may pass through its
    // directory (0711) and has no business with it.
    evp_daemon::write_atomic(&path, &text, 0o600, None).map_err(|e| RecordError::Write {
        path: e.path,
        source: e.error,
    })
}

/// Reads `<instance_dir>/runtime.json`; `None` when there is none.
pub fn load(instance_dir: &Path) -> Result<Option<InstanceRecord>, RecordError> {
    use std::io::Read;
    let path = instance_dir.join(RECORD_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RecordError::Read { path, source }),
    };
    let mut text = Vec::new();
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|source| RecordError::Read {
            path: path.clone(),
            source,
        })?;
    if text.len() as u64 > MAX_RECORD_BYTES {
        return Err(RecordError::Invalid {
            path,
            why: format!("larger than {MAX_RECORD_BYTES} bytes"),
        });
    }
    let record: InstanceRecord =
        serde_json::from_slice(&text).map_err(|e| RecordError::Invalid {
            path: path.clone(),
            why: e.to_string(),
        })?;
    if record.version != RECORD_VERSION {
        return Err(RecordError::Invalid {
            path,
            why: format!(
                "version {} (this runtime writes {RECORD_VERSION})",
                record.version
            ),
        });
    }
    Ok(Some(record))
}

/// Removes `<instance_dir>/runtime.json`; fine if absent.
pub fn remove(instance_dir: &Path) -> Result<(), RecordError> {
    let path = instance_dir.join(RECORD_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordError::Remove { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> InstanceRecord {
        InstanceRecord {
            version: RECORD_VERSION,
            module_id: "m".into(),
            kind: "spawn".into(),
            module_location: "/var/lib/evp/modules/abc".into(),
            process: Some(ProcessHandle {
                pid: 42,
                start_time: 4242,
            }),
            ended: None,
            uid: Some(61184),
            container: None,
        }
    }

    #[test]
    fn records_round_trip_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        save(dir.path(), &record()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(record()));
        let mut ended = record();
        ended.ended = Some(Ended {
            status: "error".into(),
            failure_message: "exited with status 3".into(),
        });
        save(dir.path(), &ended).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(ended));
        assert!(!evp_daemon::fs::temp_path(&dir.path().join(RECORD_FILE)).exists());
        remove(dir.path()).unwrap();
        remove(dir.path()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
    }

    #[test]
    fn foreign_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RECORD_FILE), "{not json").unwrap();
        assert!(matches!(load(dir.path()), Err(RecordError::Invalid { .. })));
        let mut other = serde_json::to_value(record()).unwrap();
        other["version"] = 99.into();
        std::fs::write(dir.path().join(RECORD_FILE), other.to_string()).unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("version 99"), "{e}");
    }
}
