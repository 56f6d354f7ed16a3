//! The EVP2 storage-token exchange (docs/hub-protocol.md §14): the device asks the hub, over
//! device-side RPC, for where to upload a module's `EVP_BLOB_TYPE_EVP_EXT` blob; the hub
//! answers with a URL and headers (`singlefile`), or with a container-level URL the device
//! completes with each file's name (`multifile`, which the device may keep and reuse while
//! offline). The answer is matched by the payload's `reqid`, not by the topic's id, as EVP2
//! does.

use std::collections::BTreeMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::deployment::ValidationError;

/// The key under `params` of the device's request.
pub const REQUEST_KEY: &str = "storagetoken-request";
/// The key of the hub's answer.
pub const RESPONSE_KEY: &str = "storagetoken-response";

/// What `multifile` percent-encodes in a file name: all but RFC 3986's unreserved characters,
/// so a `/` in the name becomes `%2F` and the name stays one path segment of the container.
const NAME_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The device's request for a storage token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageTokenRequest<'a> {
    /// The request id (EVP: from 10001 up); the answer carries it back.
    pub reqid: u32,
    /// The module's `remote_name`.
    pub filename: &'a str,
    /// The instance uploading.
    pub instance: &'a str,
    /// The module's `storage_name`; `None` (the default storage) leaves `key` out.
    pub key: Option<&'a str>,
}

impl StorageTokenRequest<'_> {
    /// The payload for `v1/devices/me/rpc/request/<reqid>`.
    pub fn encode(&self) -> Vec<u8> {
        let mut request = json!({
            "reqid": self.reqid.to_string(),
            "filename": self.filename,
            "moduleInstanceId": self.instance,
        });
        if let Some(key) = self.key {
            request["key"] = json!(key);
        }
        json!({"method": "evp-d2c", "params": { REQUEST_KEY: request }})
            .to_string()
            .into_bytes()
    }
}

/// `responseType`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseType {
    /// The URL is for this one file (the default).
    #[default]
    #[serde(rename = "singlefile")]
    SingleFile,
    /// The URL is a container's: each file goes to `<base>/<encoded name>?<query>`.
    #[serde(rename = "multifile")]
    MultiFile,
}

/// The hub's answer, as it came (and as the device keeps a `multifile` one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageTokenResponse {
    /// The id of the request answered.
    pub reqid: String,
    /// `ok` or `error`; informative only (EVP decides by `errorMessage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Present: the hub refused.
    #[serde(
        rename = "errorMessage",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub error_message: Option<String>,
    /// Where to PUT (required unless refused).
    #[serde(rename = "URL", default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Headers for the PUT.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// When the URL stops working, milliseconds since the epoch, as a decimal string.
    #[serde(
        rename = "expiresAtMillis",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at_millis: Option<String>,
    /// Single file or container.
    #[serde(rename = "responseType", default)]
    pub response_type: ResponseType,
}

/// A token resolved for one file: where to PUT it and with which headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageToken {
    /// The URL.
    pub url: String,
    /// The headers.
    pub headers: BTreeMap<String, String>,
    /// When it expires (ms since the epoch), if the hub said.
    pub expires_at_ms: Option<i64>,
}

/// Decodes a payload from `v1/devices/me/rpc/response/+`: `None` when it is not a storage
/// token answer (the device's own direct-command answers, echoed by a plain broker).
pub fn decode_response(payload: &[u8]) -> Option<Result<StorageTokenResponse, ValidationError>> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let answer = v.get(RESPONSE_KEY)?;
    Some(
        StorageTokenResponse::deserialize(answer)
            .map_err(|e| ValidationError::new(RESPONSE_KEY, e.to_string())),
    )
}

impl StorageTokenResponse {
    /// When the URL stops working, if the hub said (and said it as a number).
    pub fn expires_at_ms(&self) -> Option<i64> {
        self.expires_at_millis.as_deref()?.trim().parse().ok()
    }

    /// Whether it is no longer usable at `now_ms` (ms since the epoch); one without an expiry
    /// never expires.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms().is_some_and(|at| at <= now_ms)
    }

    /// The token for the file `remote_name`, or why there is none (the hub's own message
    /// when it refused).
    pub fn token_for(&self, remote_name: &str) -> Result<StorageToken, String> {
        use crate::bus_string::{check_bus_string, escape_nul};
        if let Some(message) = &self.error_message {
            // It becomes the message of a D-Bus error: no NUL, and bounded.
            let message = crate::text::shorten(message, crate::deployment::MAX_ERROR_MESSAGE);
            return Err(format!(
                "the hub refused the storage token: {}",
                escape_nul(&message)
            ));
        }
        let Some(url) = self.url.as_deref().filter(|u| !u.is_empty()) else {
            return Err("the hub's storage token has no URL".into());
        };
        // The URL and headers are `Hub1.RequestStorageToken`'s answer, D-Bus strings.
        check_bus_string("the hub's storage token URL", url)
            .and_then(|()| {
                self.headers.iter().try_for_each(|(name, value)| {
                    check_bus_string("a header of the hub's storage token", name).and_then(|()| {
                        check_bus_string("a header of the hub's storage token", value)
                    })
                })
            })
            .map_err(|e| e.to_string())?;
        let url = match self.response_type {
            ResponseType::SingleFile => url.to_owned(),
            ResponseType::MultiFile => {
                let (base, query) = match url.split_once('?') {
                    Some((base, query)) => (base, Some(query)),
                    None => (url, None),
                };
                let name = utf8_percent_encode(remote_name, NAME_SEGMENT);
                let base = base.trim_end_matches('/');
                match query {
                    Some(q) => format!("{base}/{name}?{q}"),
                    None => format!("{base}/{name}"),
                }
            }
        };
        Ok(StorageToken {
            url,
            headers: self.headers.clone(),
            expires_at_ms: self.expires_at_ms(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_evps_and_leaves_out_a_default_key() {
        let r = StorageTokenRequest {
            reqid: 10077,
            filename: "images/cam1/0001.jpg",
            instance: "uploader-1",
            key: Some("default"),
        };
        let v: Value = serde_json::from_slice(&r.encode()).unwrap();
        assert_eq!(
            v,
            json!({"method": "evp-d2c", "params": {"storagetoken-request": {
                "reqid": "10077", "filename": "images/cam1/0001.jpg",
                "moduleInstanceId": "uploader-1", "key": "default"}}})
        );
        let v: Value =
            serde_json::from_slice(&StorageTokenRequest { key: None, ..r }.encode()).unwrap();
        assert!(v["params"][REQUEST_KEY].get("key").is_none(), "{v}");
    }

    /// Decodes `answer` (the object under `storagetoken-response`) and resolves it for
    /// `name`.
    fn check(answer: Value, name: &str, expect: Result<&str, &str>) {
        let payload = json!({ RESPONSE_KEY: answer }).to_string();
        let got = decode_response(payload.as_bytes())
            .expect("a storage token answer")
            .map_err(|e| e.to_string())
            .and_then(|r| r.token_for(name));
        match expect {
            Ok(url) => assert_eq!(got.map(|t| t.url).as_deref(), Ok(url)),
            Err(part) => {
                let e = got.expect_err("refused");
                assert!(e.contains(part), "{e:?} lacks {part:?}");
            }
        }
    }

    #[test]
    fn answers_resolve_to_the_url_of_the_file() {
        let single = "https://acct.blob.core.windows.net/c/images%2Fcam1%2F0001.jpg?sv=1&sig=x";
        check(
            json!({"reqid": "1", "status": "ok", "URL": single}),
            "images/cam1/0001.jpg",
            Ok(single),
        );
        let container = json!({"reqid": "2", "status": "ok", "responseType": "multifile",
            "URL": "https://acct.blob.core.windows.net/c?sv=1&sig=x"});
        check(container.clone(), "images/cam1/0001.jpg", Ok(single));
        check(
            json!({"reqid": "2", "responseType": "multifile", "URL": "http://h/c/"}),
            "a b+ü.txt",
            Ok("http://h/c/a%20b%2B%C3%BC.txt"),
        );
        check(
            json!({"reqid": "3", "status": "error", "errorMessage": "quota"}),
            "f",
            Err("quota"),
        );
        check(json!({"reqid": "4", "status": "ok"}), "f", Err("no URL"));
        check(json!({"reqid": 5}), "f", Err("expected a string"));
        check(
            json!({"reqid": "6", "URL": "u", "responseType": "many"}),
            "f",
            Err("unknown variant `many`"),
        );
    }

    #[test]
    fn other_answers_are_not_storage_tokens() {
        for payload in [
            r#"{"direct-command-response": {"reqid": "1"}}"#,
            "not json",
            "[]",
        ] {
            assert!(decode_response(payload.as_bytes()).is_none(), "{payload}");
        }
    }

    /// Found by fuzz/fuzz_targets/evp2_storage_token.rs: a NUL in the hub's URL, a header or
    /// its refusal reached `Hub1.RequestStorageToken`'s answer (dbus-daemon disconnects hubd).
    #[test]
    fn a_nul_from_the_hub_never_reaches_the_token() {
        let url = br#"{"storagetoken-response":{"reqid":"1","URL":"https://h/x\u0000y","headers":{"a":"b"}}}"#;
        let e = decode_response(url)
            .unwrap()
            .unwrap()
            .token_for("f")
            .unwrap_err();
        assert!(e.contains("URL contains a NUL"), "{e}");
        let header =
            json!({RESPONSE_KEY: {"reqid": "1", "URL": "https://h/x", "headers": {"a": "b\0"}}});
        let e = decode_response(header.to_string().as_bytes())
            .unwrap()
            .unwrap()
            .token_for("f")
            .unwrap_err();
        assert!(
            e.contains("header of the hub's storage token contains a NUL"),
            "{e}"
        );
        let refused = br#"{"storagetoken-response":{"reqid":"1","errorMessage":"no\u0000"}}"#;
        let e = decode_response(refused)
            .unwrap()
            .unwrap()
            .token_for("f")
            .unwrap_err();
        assert_eq!(e, "the hub refused the storage token: no\\0");
    }

    #[test]
    fn headers_and_expiry_come_with_the_token() {
        let r: StorageTokenResponse = serde_json::from_value(json!({
            "reqid": "1", "URL": "u", "headers": {"x-ms-blob-type": "BlockBlob"},
            "expiresAtMillis": "1700000000000"}))
        .unwrap();
        let t = r.token_for("f").unwrap();
        assert_eq!(t.headers["x-ms-blob-type"], "BlockBlob");
        assert_eq!(t.expires_at_ms, Some(1_700_000_000_000));
        assert!(r.expired(1_700_000_000_000) && !r.expired(1_699_999_999_999));
        let never = StorageTokenResponse::default();
        assert!(!never.expired(i64::MAX));
    }
}
