//! The one response header reconcilerd parses itself when resuming a module download:
//! `Content-Range` (`bytes <start>-<end>/<total or *>`), from any server a manifest names.
#![no_main]

use evp_reconcilerd::download::content_range;
use http::header::{CONTENT_RANGE, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_RANGE, value);
    if let Some((start, total)) = content_range(&headers) {
        // What it read is what a server writing those numbers would have sent.
        let text = headers[CONTENT_RANGE].to_str().expect("parsed as text");
        assert!(text.contains(&start.to_string()), "{text:?}");
        let written = match total {
            Some(t) => format!("bytes {start}-0/{t}"),
            None => format!("bytes {start}-0/*"),
        };
        let mut again = HeaderMap::new();
        again.insert(CONTENT_RANGE, HeaderValue::from_str(&written).unwrap());
        assert_eq!(content_range(&again), Some((start, total)), "{text:?}");
    }
});
