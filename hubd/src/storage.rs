//! Storage tokens for modules' `EVP_BLOB_TYPE_EVP_EXT` uploads (docs/hub-protocol.md §14):
//! the requests waiting for the hub's answer ([`Waiting`], matched by the payload's `reqid`,
//! given up after [`TOKEN_TIMEOUT`]) and the `multifile` answers kept for use while offline
//! ([`TokenCache`]). Both are plain state fed with `Instant`s and clock readings; the session
//! loop (`core.rs`) does the MQTT and the D-Bus answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use evp_schemas::evp2::storage::{StorageToken, StorageTokenResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::warn;

/// How long a request waits for the hub's answer: EVP's.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(5);
/// The first request id; EVP's (10000 is the initial attribute GET's).
pub const FIRST_REQUEST_ID: u32 = 10_001;
/// The largest request id before wrapping to 1: ThingsBoard ids are Java ints.
const LAST_REQUEST_ID: u32 = i32::MAX.unsigned_abs();
/// Most requests waiting for the hub at once. sdk-broker lets each instance have 10 blob
/// operations under way, so this is room for dozens of uploading instances; beyond it a
/// request is refused at once rather than growing hubd.
pub const MAX_WAITING: usize = 256;
/// File of the kept `multifile` answers, under hubd's data folder (EVP: `<data>/cache`).
pub const CACHE_FILE: &str = "storage-tokens.json";

/// Why no token was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The hub did not answer in time.
    #[error(
        "the hub did not answer storage token request {reqid} within {:?}",
        TOKEN_TIMEOUT
    )]
    Timeout {
        /// The request's id.
        reqid: u32,
    },
    /// Offline, and no kept `multifile` answer fits.
    #[error(
        "not connected to the hub, and no storage token for storage {storage:?} of {instance} is \
         kept for offline use"
    )]
    Offline {
        /// The instance.
        instance: String,
        /// The storage name.
        storage: String,
    },
    /// The hub refused, or its answer is unusable.
    #[error("{0}")]
    Refused(String),
    /// Too many requests wait already.
    #[error("{MAX_WAITING} storage token requests already wait for the hub")]
    Busy,
    /// The request could not be handed to the MQTT client.
    #[error("the storage token request could not be sent to the hub: {0}")]
    NotSent(String),
}

/// A module's request, from `Hub1.RequestStorageToken`.
#[derive(Debug)]
pub struct TokenRequest {
    /// The instance uploading.
    pub instance: String,
    /// Its `storage_name` ("" for the default storage).
    pub storage_name: String,
    /// Its `remote_name`.
    pub remote_name: String,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<StorageToken, TokenError>>,
}

/// A request sent to the hub, waiting for its answer.
#[derive(Debug)]
pub struct Sent {
    /// The request.
    pub request: TokenRequest,
    /// When it is given up.
    pub deadline: Instant,
}

/// The requests waiting for the hub, by request id.
#[derive(Debug)]
pub struct Waiting {
    next_id: u32,
    sent: BTreeMap<u32, Sent>,
}

impl Default for Waiting {
    fn default() -> Self {
        Waiting {
            next_id: FIRST_REQUEST_ID,
            sent: BTreeMap::new(),
        }
    }
}

impl Waiting {
    /// The id for the next request: increasing, wrapping to 1, never one still waiting.
    pub fn next_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = if id >= LAST_REQUEST_ID { 1 } else { id + 1 };
            if !self.sent.contains_key(&id) {
                return id;
            }
        }
    }

    /// Whether no more may wait.
    pub fn is_full(&self) -> bool {
        self.sent.len() >= MAX_WAITING
    }

    /// Records `request`, sent under `reqid` at `now`.
    pub fn insert(&mut self, reqid: u32, request: TokenRequest, now: Instant) {
        let deadline = now + TOKEN_TIMEOUT;
        self.sent.insert(reqid, Sent { request, deadline });
    }

    /// The request an answer with `reqid` (the payload's, a decimal string) is for.
    pub fn take(&mut self, reqid: &str) -> Option<TokenRequest> {
        let id: u32 = reqid.trim().parse().ok()?;
        self.sent.remove(&id).map(|s| s.request)
    }

    /// The requests whose deadline passed at `now`, with their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<(u32, TokenRequest)> {
        self.sent
            .extract_if(.., |_, s| s.deadline <= now)
            .map(|(id, s)| (id, s.request))
            .collect()
    }

    /// Every request still waiting (the connection was lost: they will not be answered).
    pub fn take_all(&mut self) -> Vec<TokenRequest> {
        std::mem::take(&mut self.sent)
            .into_values()
            .map(|s| s.request)
            .collect()
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.sent.values().map(|s| s.deadline).min()
    }
}

/// One kept answer, in EVP's cache format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CacheEntry {
    #[serde(rename = "instanceName")]
    instance: String,
    #[serde(rename = "storageName")]
    storage: String,
    #[serde(rename = "storagetoken-response")]
    response: StorageTokenResponse,
}

/// The `multifile` answers kept for use while offline, one per instance and storage name,
/// persisted (0600: the URLs are credentials).
#[derive(Debug)]
pub struct TokenCache {
    path: PathBuf,
    entries: Vec<CacheEntry>,
}

impl TokenCache {
    /// The cache kept in `dir`; an unreadable file is logged and starts it empty (it only
    /// saves round trips to the hub).
    pub fn load(dir: &Path) -> TokenCache {
        let path = dir.join(CACHE_FILE);
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(
                    "{}: {e}; starting without kept storage tokens",
                    path.display()
                );
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                warn!(
                    "{}: {e}; starting without kept storage tokens",
                    path.display()
                );
                Vec::new()
            }
        };
        TokenCache { path, entries }
    }

    /// The kept answer for `instance`'s `storage`, unless it expired at `now_ms`.
    pub fn lookup(
        &self,
        instance: &str,
        storage: &str,
        now_ms: i64,
    ) -> Option<&StorageTokenResponse> {
        self.entries
            .iter()
            .find(|e| e.instance == instance && e.storage == storage && !e.response.expired(now_ms))
            .map(|e| &e.response)
    }

    /// Keeps `response` if it is a usable `multifile` answer, replacing the one of the same
    /// instance and storage, and forgets expired ones; then writes the file.
    pub fn keep(
        &mut self,
        instance: &str,
        storage: &str,
        response: &StorageTokenResponse,
        now_ms: i64,
    ) {
        use evp_schemas::evp2::storage::ResponseType;
        if response.response_type != ResponseType::MultiFile
            || response.error_message.is_some()
            || response.expired(now_ms)
        {
            return;
        }
        self.entries.retain(|e| {
            let same = e.instance == instance && e.storage == storage;
            !same && !e.response.expired(now_ms)
        });
        self.entries.push(CacheEntry {
            instance: instance.to_owned(),
            storage: storage.to_owned(),
            response: response.clone(),
        });
        self.save();
    }

    fn save(&self) {
        let text = match serde_json::to_vec(&self.entries) {
            Ok(t) => t,
            Err(e) => {
                warn!("storage tokens not kept: {e}");
                return;
            }
        };
        if let Err(e) = evp_daemon::write_atomic(&self.path, &text, 0o600, None) {
            warn!("storage tokens not kept: {e}");
        }
    }
}

/// Milliseconds since the epoch now (0 before it: a clock that far off expires nothing).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use evp_schemas::evp2::storage::ResponseType;

    fn request(
        instance: &str,
    ) -> (
        TokenRequest,
        oneshot::Receiver<Result<StorageToken, TokenError>>,
    ) {
        let (reply, rx) = oneshot::channel();
        let r = TokenRequest {
            instance: instance.into(),
            storage_name: String::new(),
            remote_name: "f".into(),
            reply,
        };
        (r, rx)
    }

    #[test]
    fn ids_start_at_evps_and_wrap_past_the_java_int_range_skipping_waiting_ones() {
        let mut w = Waiting::default();
        assert_eq!(w.next_id(), 10_001);
        assert_eq!(w.next_id(), 10_002);
        w.next_id = LAST_REQUEST_ID;
        let now = Instant::now();
        w.insert(1, request("a").0, now);
        assert_eq!(w.next_id(), LAST_REQUEST_ID);
        assert_eq!(w.next_id(), 2, "1 is still waiting");
    }

    #[test]
    fn answers_match_by_reqid_and_the_late_expire() {
        let mut w = Waiting::default();
        let t0 = Instant::now();
        w.insert(10_001, request("a").0, t0);
        w.insert(10_002, request("b").0, t0 + Duration::from_secs(1));
        assert_eq!(w.next_deadline(), Some(t0 + TOKEN_TIMEOUT));
        assert!(w.take("999").is_none());
        assert!(w.take("x").is_none());
        assert_eq!(w.take("10002").map(|r| r.instance).as_deref(), Some("b"));
        assert!(w.take("10002").is_none(), "answered once");
        assert!(
            w.expire(t0 + TOKEN_TIMEOUT - Duration::from_millis(1))
                .is_empty()
        );
        let late = w.expire(t0 + TOKEN_TIMEOUT);
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].0, 10_001);
        assert_eq!(w.next_deadline(), None);
    }

    fn answer(kind: ResponseType, expires: Option<i64>) -> StorageTokenResponse {
        StorageTokenResponse {
            reqid: "1".into(),
            url: Some("http://h/c?sig=s".into()),
            response_type: kind,
            expires_at_millis: expires.map(|e| e.to_string()),
            ..Default::default()
        }
    }

    #[test]
    fn only_live_multifile_answers_are_kept_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = TokenCache::load(dir.path());
        c.keep("cam", "", &answer(ResponseType::SingleFile, None), 0);
        assert!(c.lookup("cam", "", 0).is_none(), "singlefile is never kept");
        c.keep("cam", "", &answer(ResponseType::MultiFile, Some(100)), 0);
        c.keep("cam", "other", &answer(ResponseType::MultiFile, None), 0);
        assert!(c.lookup("cam", "", 99).is_some());
        assert!(c.lookup("cam", "", 100).is_none(), "expired");
        assert!(c.lookup("cam2", "", 0).is_none());

        let again = TokenCache::load(dir.path());
        assert_eq!(again.entries, c.entries);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CACHE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let on_disk: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(CACHE_FILE)).unwrap()).unwrap();
        assert_eq!(on_disk[0]["instanceName"], "cam");
        assert_eq!(
            on_disk[0]["storagetoken-response"]["responseType"],
            "multifile"
        );

        std::fs::write(dir.path().join(CACHE_FILE), "{").unwrap();
        assert!(TokenCache::load(dir.path()).entries.is_empty());
    }
}
