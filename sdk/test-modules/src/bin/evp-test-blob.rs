//! Blob operations asked for by configuration (see the crate's table): configuration `<topic>`
//! = `{"op":"get"|"put","type":T,"url":U,"file":F,"headers":[...]}` starts one; the state
//! `<topic>` is then its outcome, `{"reason":R,"result":N,"http_status":S,"error":E}` once the
//! callback came, or `{"refused":"EVP_…"}` when the request was refused at once. EVP storage
//! (`"type":3`) takes `"remote_name"` and `"storage"` (absent: the default storage) instead of
//! the URL.

use std::sync::{Arc, Mutex};

use evp_sdk::{BLOB_TYPE_AZURE_BLOB, BLOB_TYPE_EVP_EXT, BLOB_TYPE_HTTP_EXT, BlobRequest};
use evp_sdk_test_modules::{TICK, connect, finish};
use serde_json::{Value, json};

const NAME: &str = "blob";

fn main() {
    let mut client = connect(NAME);
    let workspace = client.workspace_directory().to_path_buf();
    // (topic, outcome) waiting to be sent as states, outside the callbacks.
    let outcomes: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let out = Arc::clone(&outcomes);
    let registered = client.set_configuration_callback(move |c, topic, value| {
        let Ok(ask) = serde_json::from_slice::<Value>(value) else {
            eprintln!("{NAME}: configuration {topic} is not JSON");
            return;
        };
        let kind = ask["type"]
            .as_u64()
            .and_then(|k| u32::try_from(k).ok())
            .unwrap_or(2);
        let op = u32::from(ask["op"] == "put");
        let url = ask["url"].as_str().unwrap_or_default().to_owned();
        // A file name without a slash is one in the workspace, as modules usually build it.
        let file = ask["file"].as_str().unwrap_or_default();
        let file = if file.contains('/') {
            file.to_owned()
        } else {
            workspace.join(file).to_string_lossy().into_owned()
        };
        let headers: Vec<String> = ask["headers"]
            .as_array()
            .map(|h| {
                h.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let request = match kind {
            BLOB_TYPE_AZURE_BLOB => BlobRequest::AzureBlob { url },
            BLOB_TYPE_HTTP_EXT => BlobRequest::HttpExt { url, headers },
            BLOB_TYPE_EVP_EXT => BlobRequest::Evp {
                remote_name: ask["remote_name"].as_str().unwrap_or_default().to_owned(),
                storage_name: ask["storage"].as_str().map(str::to_owned),
            },
            _ => BlobRequest::Http { url },
        };
        eprintln!("{NAME}: {topic}: blob operation {op} of {file}");
        let (t, done) = (topic.to_owned(), Arc::clone(&out));
        let started = c.blob_operation(kind, op, request, &file, move |reason, result| {
            let outcome = json!({
                "reason": format!("{reason:?}").to_uppercase(),
                "result": result.result,
                "http_status": result.http_status,
                "error": result.error,
            });
            lock(&done).push((t, outcome));
        });
        if let Err(e) = started {
            eprintln!("{NAME}: {topic} refused: {e}");
            lock(&out).push((topic.to_owned(), json!({"refused": e.result().to_string()})));
        }
    });
    if let Err(e) = registered {
        eprintln!("{NAME}: {e}");
        std::process::exit(1);
    }
    let end = client.run_until_exit(TICK, |c| {
        for (topic, outcome) in std::mem::take(&mut *lock(&outcomes)) {
            if let Err(e) = c.send_state(&topic, outcome.to_string().as_bytes(), |_| {}) {
                eprintln!("{NAME}: state {topic} refused: {e}");
            }
        }
    });
    finish(NAME, end);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
