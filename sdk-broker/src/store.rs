//! Persisted configuration: one JSON file per instance under `<data_dir>/sdk/config/`,
//! `{"topic": "<hex of the value>"}`, written atomically (temporary file, fsync, rename, fsync
//! of the directory) so a crash leaves either the old or the new file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use tracing::warn;

/// Extension of a configuration file.
const EXT: &str = "json";

/// The configuration files.
#[derive(Debug)]
pub struct ConfigStore {
    dir: PathBuf,
}

impl ConfigStore {
    /// Opens (creating) `<sdk_data_dir>/config`.
    pub fn open(sdk_data_dir: PathBuf) -> Result<ConfigStore> {
        let dir = sdk_data_dir.join("config");
        // 0700: instances' configurations are sdk-broker's alone.
        evp_daemon::create_private_dir(&dir, 0o700)?;
        Ok(ConfigStore { dir })
    }

    /// Every instance's stored configuration; unreadable files are reported and skipped.
    pub fn load_all(&self) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                warn!("reading {}: {e}", self.dir.display());
                return out;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some(EXT) {
                continue;
            }
            let Some(instance) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if instance.starts_with('.') {
                continue;
            }
            match read(&path) {
                Ok(topics) => {
                    out.insert(instance.to_owned(), topics);
                }
                Err(e) => warn!("ignoring stored configuration {}: {e:#}", path.display()),
            }
        }
        out
    }

    /// Replaces the stored configuration of `instance` atomically.
    pub fn save(&self, instance: &str, topics: &BTreeMap<String, Vec<u8>>) -> Result<()> {
        let doc: BTreeMap<&str, String> = topics
            .iter()
            .map(|(t, v)| (t.as_str(), hex::encode(v)))
            .collect();
        let text = serde_json::to_vec(&doc).context("encoding configuration")?;
        let path = self.dir.join(format!("{instance}.{EXT}"));
        // 0666 less the umask, as `File::create` makes it: the folder (0700) keeps others out.
        evp_daemon::write_atomic(&path, &text, 0o666, None)
            .map_err(|e| e.error)
            .with_context(|| format!("persisting configuration to {}", path.display()))
    }
}

impl ConfigStore {
    /// Removes the stored configuration of `instance` (none stored is no error).
    pub fn remove(&self, instance: &str) -> Result<()> {
        let path = self.dir.join(format!("{instance}.{EXT}"));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

fn read(path: &std::path::Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let text = std::fs::read(path)?;
    let doc: BTreeMap<String, String> = serde_json::from_slice(&text)?;
    doc.into_iter()
        .map(|(t, v)| Ok((t, hex::decode(v).context("value is not hex")?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_configuration_loads_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConfigStore::open(dir.path().to_owned()).unwrap();
        let mut topics = BTreeMap::new();
        topics.insert("greeting".to_owned(), b"\0hello".to_vec());
        store.save("inst-1", &topics).unwrap();
        std::fs::write(dir.path().join("config/broken.json"), "{").unwrap();
        let all = ConfigStore::open(dir.path().to_owned()).unwrap().load_all();
        assert_eq!(all.len(), 1);
        assert_eq!(all["inst-1"], topics);
        store.remove("inst-1").unwrap();
        store.remove("inst-1").unwrap();
        assert!(
            ConfigStore::open(dir.path().to_owned())
                .unwrap()
                .load_all()
                .is_empty()
        );
    }
}
