//! The hub's answers to the device's storage-token requests (docs/hub-protocol.md §14), as a
//! test or `evp-devhub` configures them with [`super::HubSide::set_storage`].

use std::collections::BTreeMap;

use evp_schemas::evp2::storage::{RESPONSE_KEY, ResponseType, StorageTokenResponse};
use serde_json::{Value, json};

/// How the hub answers storage-token requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageAnswer {
    /// A URL for each file: `<base_url>/<percent-encoded filename>`, with `headers`.
    SingleFile {
        /// Where the files go.
        base_url: String,
        /// Headers the device sends with the PUT.
        headers: BTreeMap<String, String>,
    },
    /// One container URL (`multifile`) the device completes with each file name and may
    /// keep for use while offline.
    MultiFile {
        /// The container's URL, with its query (the SAS) if any.
        url: String,
        /// Headers the device sends with the PUT.
        headers: BTreeMap<String, String>,
        /// When the URL expires, ms since the epoch.
        expires_at_ms: Option<i64>,
    },
    /// Refuses every request with this `errorMessage`.
    Refuse(String),
}

/// The answer to `request` (the object under `storagetoken-request`).
pub fn answer(how: &StorageAnswer, request: &Value) -> Value {
    let reqid = request.get("reqid").cloned().unwrap_or(Value::Null);
    let filename = request
        .get("filename")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let body = match how {
        StorageAnswer::SingleFile { base_url, headers } => {
            // The container-style URL of this one file, the way the device builds it.
            let container = StorageTokenResponse {
                url: Some(base_url.clone()),
                response_type: ResponseType::MultiFile,
                ..Default::default()
            };
            let url = container
                .token_for(filename)
                .map(|t| t.url)
                .unwrap_or_default();
            json!({"reqid": reqid, "status": "ok", "URL": url, "headers": headers,
                "responseType": "singlefile"})
        }
        StorageAnswer::MultiFile {
            url,
            headers,
            expires_at_ms,
        } => {
            let mut body = json!({"reqid": reqid, "status": "ok", "URL": url,
                "headers": headers, "responseType": "multifile"});
            if let Some(at) = expires_at_ms {
                body["expiresAtMillis"] = json!(at.to_string());
            }
            body
        }
        StorageAnswer::Refuse(message) => {
            json!({"reqid": reqid, "status": "error", "errorMessage": message})
        }
    };
    json!({ RESPONSE_KEY: body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_answer_is_what_the_device_resolves_to_the_files_url() {
        let request = json!({"reqid": "10001", "filename": "a/b.bin", "moduleInstanceId": "i"});
        let single = StorageAnswer::SingleFile {
            base_url: "http://h/up".into(),
            headers: [("x-k".to_owned(), "v".to_owned())].into(),
        };
        let a = answer(&single, &request);
        assert_eq!(a[RESPONSE_KEY]["URL"], "http://h/up/a%2Fb.bin");
        assert_eq!(a[RESPONSE_KEY]["reqid"], "10001");
        let multi = StorageAnswer::MultiFile {
            url: "http://h/c?sig=1".into(),
            headers: BTreeMap::new(),
            expires_at_ms: Some(5),
        };
        let a = answer(&multi, &request);
        let decoded = evp_schemas::evp2::storage::decode_response(a.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(
            decoded.token_for("a/b.bin").unwrap().url,
            "http://h/c/a%2Fb.bin?sig=1"
        );
        assert_eq!(decoded.expires_at_ms(), Some(5));
        let refused = answer(&StorageAnswer::Refuse("quota".into()), &request);
        assert_eq!(refused[RESPONSE_KEY]["errorMessage"], "quota");
    }
}
