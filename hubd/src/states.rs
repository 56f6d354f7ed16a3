//! The instance-state report split across MQTT messages, and the latest states kept on disk
//! while the hub is away. The report split across MQTT messages: EVP2 sends it as shared attributes,
//! which the hub merges key by key, so a report too big for one message goes out as several
//! flat objects; no state is held back because others are big. An entry too big for any
//! message cannot come from sdk-broker (it refuses such a state with `EVP_TOOBIG`); if one
//! does, it alone is left out, and said so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tracing::warn;

/// The latest instance states, per (instance, topic).
pub type States = BTreeMap<(String, String), Vec<u8>>;

/// The latest instance states kept on disk while the hub is away (`<dir>/states.json`, 0600), so
/// a hubd restart offline does not lose what the modules reported; removed once a report that
/// carries them went out. Only the latest matters, so it is rewritten, never appended to.
#[derive(Debug, Clone)]
pub struct StatesFile {
    path: PathBuf,
}

impl StatesFile {
    /// The file in `dir`.
    pub fn new(dir: &Path) -> Self {
        StatesFile {
            path: dir.join("states.json"),
        }
    }

    /// What an earlier run kept; nothing when there is no file or it cannot be read (logged).
    pub fn load(&self) -> States {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return States::new(),
            Err(e) => {
                warn!(
                    "{}: {e}; instance states of the last run are lost",
                    self.path.display()
                );
                return States::new();
            }
        };
        match serde_json::from_slice::<Vec<(String, String, Vec<u8>)>>(&bytes) {
            Ok(entries) => entries.into_iter().map(|(i, t, v)| ((i, t), v)).collect(),
            Err(e) => {
                warn!(
                    "{}: {e}; instance states of the last run are lost",
                    self.path.display()
                );
                States::new()
            }
        }
    }

    /// Writes `states` atomically.
    pub fn save(&self, states: &States) -> Result<(), String> {
        let entries: Vec<(&String, &String, &Vec<u8>)> =
            states.iter().map(|((i, t), v)| (i, t, v)).collect();
        let bytes = serde_json::to_vec(&entries).map_err(|e| e.to_string())?;
        evp_daemon::write_atomic(&self.path, &bytes, 0o600, None).map_err(|e| e.to_string())
    }

    /// Removes the file (the hub has the states now).
    pub fn remove(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("removing {}: {e}", self.path.display()),
        }
    }
}

/// The report `states` (one flat JSON object) as payloads of at most `max_payload` bytes each,
/// in key order, and the keys of the entries left out because they alone do not fit.
pub fn split(states: &Map<String, Value>, max_payload: usize) -> (Vec<String>, Vec<String>) {
    let mut messages = Vec::new();
    let mut left_out = Vec::new();
    let mut current = String::new();
    for (key, value) in states {
        // Serializing a string key and a JSON value cannot fail.
        let entry = format!(
            "{}:{}",
            Value::String(key.clone()),
            serde_json::to_string(value).unwrap_or_default()
        );
        // `{` or `,` before it, and the closing `}`.
        if entry.len() + 2 > max_payload {
            left_out.push(key.clone());
            continue;
        }
        if !current.is_empty() && current.len() + 1 + entry.len() + 1 > max_payload {
            current.push('}');
            messages.push(std::mem::take(&mut current));
        }
        current.push(if current.is_empty() { '{' } else { ',' });
        current.push_str(&entry);
    }
    if !current.is_empty() {
        current.push('}');
        messages.push(current);
    }
    if messages.is_empty() {
        // A report with nothing in it still says so (every state of every instance is gone).
        messages.push("{}".to_owned());
    }
    (messages, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn states_survive_in_the_file_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = StatesFile::new(dir.path());
        assert!(file.load().is_empty());
        let states: States = [(("i".to_owned(), "t".to_owned()), b"v\0x".to_vec())].into();
        file.save(&states).unwrap();
        assert_eq!(file.load(), states);
        file.remove();
        assert!(file.load().is_empty());
        std::fs::write(dir.path().join("states.json"), b"{").unwrap();
        assert!(
            file.load().is_empty(),
            "a broken file is no states, not an error"
        );
    }

    fn object(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_big_state_goes_alone_and_the_others_still_go() {
        let big = "b".repeat(60);
        let states = object(json!({"state/a/x": "1", "state/big/s": big, "state/z/y": "2"}));
        let (messages, left_out) = split(&states, 80);
        assert!(left_out.is_empty());
        let mut merged = Map::new();
        for m in &messages {
            assert!(m.len() <= 80, "{m}");
            merged.extend(object(serde_json::from_str(m).unwrap()));
        }
        assert_eq!(
            merged, states,
            "the hub merges them back to the whole report"
        );
        assert!(messages.len() >= 2);
    }

    #[test]
    fn one_message_when_it_fits_and_an_entry_too_big_is_named() {
        let states = object(json!({"state/a/x": "1", "state/a/y": "2"}));
        assert_eq!(
            split(&states, 1000),
            (
                vec![r#"{"state/a/x":"1","state/a/y":"2"}"#.to_owned()],
                vec![]
            )
        );
        let states = object(json!({"state/a/x": "1", "state/h/h": "h".repeat(100)}));
        let (messages, left_out) = split(&states, 50);
        assert_eq!(messages, vec![r#"{"state/a/x":"1"}"#.to_owned()]);
        assert_eq!(left_out, vec!["state/h/h".to_owned()]);
        assert_eq!(split(&Map::new(), 50), (vec!["{}".to_owned()], vec![]));
    }
}
