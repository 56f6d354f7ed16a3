//! Blob operations of a spawned module (`evp-test-blob`) and of WASM modules (`blob`, and
//! `memory-blob` for memory operations) through sdk-broker, against HTTP servers on loopback
//! started here: what arrives is checked byte for byte on the server (PUT) and in the
//! workspace or the module's io callback (GET).

use std::time::Duration;

use evp_system_tests::http::{Behaviour, FileServer};
use evp_system_tests::system::{System, blob_outcome, deploy_and_wait, deployment_of, wait_state};
use serde_json::{Value, json};

/// Asks instance `blob` for the operation `ask` under `topic` and waits for its outcome.
async fn blob_op(sys: &System, topic: &str, ask: Value) -> Value {
    blob_outcome(sys, "blob", topic, ask).await
}

/// `len` bytes, byte i being `(i * 7) % 251` (what the `memory-blob` module PUTs, too).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn served(dir: &std::path::Path, name: &str, len: usize) -> Vec<u8> {
    let bytes = pattern(len);
    std::fs::write(dir.join(name), &bytes).unwrap();
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_get_and_put_workspace_files_byte_for_byte_and_refuse_what_they_must() {
    let sys = System::start().await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let payload = served(root.path(), "in.bin", 3 * 1024 * 1024 + 17);
    let server = FileServer::start(root.path().to_path_buf()).unwrap();
    deploy_and_wait(&sys, &deployment_of("dep-1", &[("blob", "evp-test-blob")])).await;
    let workspace = sys.instance_dir("blob").join("default_workspace");

    // GET into the workspace: the file is the server's, and the instance's own.
    let got = blob_op(
        &sys,
        "get",
        json!({"op": "get", "url": server.url("in.bin"), "file": "got.bin"}),
    )
    .await;
    assert_eq!(
        got,
        json!({"reason": "DONE", "result": 0, "http_status": 200, "error": 0})
    );
    assert!(
        std::fs::read(workspace.join("got.bin")).unwrap() == payload,
        "downloaded bytes differ"
    );
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(&workspace).unwrap().uid();
    assert_eq!(
        std::fs::metadata(workspace.join("got.bin")).unwrap().uid(),
        owner
    );

    // PUT it back: the server stores exactly those bytes.
    let put = blob_op(
        &sys,
        "put",
        json!({"op": "put", "url": server.url("out.bin"), "file": "got.bin"}),
    )
    .await;
    assert_eq!(put["reason"], "DONE", "{put}");
    assert_eq!(
        (put["result"].as_u64(), put["http_status"].as_u64()),
        (Some(0), Some(201))
    );
    assert!(
        std::fs::read(root.path().join("out.bin")).unwrap() == payload,
        "uploaded bytes differ"
    );

    // HTTP_EXT: its headers reach the server; an HTTP error is the result, with its status.
    let ext = blob_op(
        &sys,
        "ext",
        json!({"op": "get", "type": 4, "url": server.url("in.bin"),
        "file": "ext.bin", "headers": ["X-Evp-Test: 42"]}),
    )
    .await;
    assert_eq!(ext["result"], 0, "{ext}");
    let seen = server.requests();
    assert!(
        seen.iter().any(|r| r
            .headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("X-Evp-Test") && v == "42")),
        "{seen:?}"
    );
    let missing = blob_op(
        &sys,
        "missing",
        json!({"op": "get", "url": server.url("nope"), "file": "n.bin"}),
    )
    .await;
    assert_eq!(
        (missing["result"].as_u64(), missing["http_status"].as_u64()),
        (Some(2), Some(404))
    );

    // Paths out of the workspace are refused before anything is sent.
    let before = server.request_count();
    for (topic, file) in [("up", "../../x"), ("abs", "/etc/passwd")] {
        let refused = blob_op(
            &sys,
            topic,
            json!({"op": "put", "url": server.url("x"), "file": file}),
        )
        .await;
        assert_eq!(refused, json!({"refused": "EVP_INVAL"}), "{file}");
    }
    // A symlink in the workspace that points out of it is not followed.
    std::os::unix::fs::symlink("/etc/passwd", workspace.join("link")).unwrap();
    let link = blob_op(
        &sys,
        "link",
        json!({"op": "put", "url": server.url("x"), "file": "link"}),
    )
    .await;
    assert_eq!(link["result"], 1, "{link}");
    assert_eq!(server.request_count(), before);
    assert!(!root.path().join("x").exists());
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_download_is_resumed_and_one_that_keeps_failing_is_an_error() {
    let sys = System::start().await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let payload = served(root.path(), "in.bin", 200_000);
    deploy_and_wait(&sys, &deployment_of("dep-1", &[("blob", "evp-test-blob")])).await;
    let workspace = sys.instance_dir("blob").join("default_workspace");

    // Cut twice: resumed with Range, and whole in the end.
    let flaky = FileServer::start_with(
        root.path().to_path_buf(),
        Behaviour {
            cut_requests: 2,
            cut_after: 50_000,
            ..Default::default()
        },
    )
    .unwrap();
    let got = blob_op(
        &sys,
        "flaky",
        json!({"op": "get", "url": flaky.url("in.bin"), "file": "a.bin"}),
    )
    .await;
    assert_eq!(got["result"], 0, "{got}");
    assert!(std::fs::read(workspace.join("a.bin")).unwrap() == payload);
    assert!(
        flaky.requests().iter().any(|r| r.range.is_some()),
        "never resumed"
    );

    // Cut every time: an error, reported to the module.
    let broken = FileServer::start_with(
        root.path().to_path_buf(),
        Behaviour {
            cut_requests: 100,
            cut_after: 10_000,
            ..Default::default()
        },
    )
    .unwrap();
    let failed = blob_op(
        &sys,
        "broken",
        json!({"op": "get", "url": broken.url("in.bin"), "file": "b.bin"}),
    )
    .await;
    assert_eq!(
        (failed["reason"].as_str(), failed["result"].as_u64()),
        (Some("DONE"), Some(1)),
        "{failed}"
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_eleventh_live_blob_operation_is_denied() {
    let sys = System::start().await.unwrap();
    let root = tempfile::tempdir().unwrap();
    served(root.path(), "slow.bin", 1024 * 1024);
    // 64 pieces of 16 KiB, 200 ms apart: each download takes about 13 s.
    let slow = FileServer::start_with(
        root.path().to_path_buf(),
        Behaviour {
            pace: Some(Duration::from_millis(200)),
            ..Default::default()
        },
    )
    .unwrap();
    deploy_and_wait(&sys, &deployment_of("dep-1", &[("blob", "evp-test-blob")])).await;
    for n in 0..10 {
        let ask = json!({"op": "get", "url": slow.url("slow.bin"), "file": format!("s{n}.bin")});
        sys.hub
            .set_configuration("blob", &format!("slow{n}"), &ask.to_string())
            .await
            .unwrap();
    }
    evp_system_tests::wait_for(
        "ten downloads under way",
        evp_system_tests::DEADLINE,
        async || (slow.request_count() == 10).then_some(()),
    )
    .await
    .unwrap();
    let eleventh = blob_op(
        &sys,
        "eleventh",
        json!({"op": "get", "url": slow.url("slow.bin"), "file": "e.bin"}),
    )
    .await;
    assert_eq!(eleventh, json!({"refused": "EVP_DENIED"}));
    // Undeployed meanwhile: the transfers end at once, with EXIT, and the module exits.
    deploy_and_wait(
        &sys,
        &json!({"deploymentId": "dep-2", "instanceSpecs": {}, "modules": {},
        "publishTopics": {}, "subscribeTopics": {}}),
    )
    .await;
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasm_module_gets_and_puts_a_workspace_file_through_sdk_broker() {
    let sys = System::start().await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let payload = served(root.path(), "in.bin", 700_001);
    let server = FileServer::start(root.path().to_path_buf()).unwrap();
    let mut d = deployment_of("dep-1", &[]);
    d["modules"]["blob"] = evp_system_tests::wasm::c_module("blob");
    d["instanceSpecs"]["wblob"] = json!({"moduleId": "blob", "publish": {}, "subscribe": {}});
    deploy_and_wait(&sys, &d).await;
    let wait = |topic: &'static str| {
        let sys = &sys;
        async move {
            wait_state(sys, &format!("state/wblob/{topic}"), |_| true)
                .await
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }
    };
    sys.hub
        .set_configuration("wblob", "get", &server.url("in.bin"))
        .await
        .unwrap();
    assert_eq!(wait("get").await, "reason=0 result=0 http=200 error=0");
    let workspace = sys.instance_dir("wblob").join("default_workspace");
    assert!(std::fs::read(workspace.join("blob.bin")).unwrap() == payload);
    sys.hub
        .set_configuration("wblob", "put", &server.url("back.bin"))
        .await
        .unwrap();
    assert_eq!(wait("put").await, "reason=0 result=0 http=201 error=0");
    assert!(std::fs::read(root.path().join("back.bin")).unwrap() == payload);
    sys.stop().await;
}

/// FNV-1a (32 bits), as the `memory-blob` module folds the bytes its io callback sees.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2_166_136_261u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(16_777_619)
    })
}

/// Asks instance `wmem` for the memory operation `topic` (its configuration is `value`).
async fn ask_memory(sys: &System, topic: &str, value: &str) {
    sys.hub
        .set_configuration("wmem", topic, value)
        .await
        .unwrap();
}

/// Waits for the outcome of `wmem`'s operation `topic` (`key=value` fields) and checks that
/// it has the fields `expect` with their values.
async fn check_memory(sys: &System, topic: &str, expect: &[(&str, &str)]) {
    let state = wait_state(sys, &format!("state/wmem/{topic}"), |_| true).await;
    let text = state.as_str().unwrap_or_default();
    let fields: std::collections::HashMap<&str, &str> = text
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    for (key, value) in expect {
        assert_eq!(fields.get(key), Some(value), "{key} of {topic}: {text:?}");
    }
}

/// The staging files left in a workspace.
fn staging_files(workspace: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(workspace)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".evp-memory-blob-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasm_module_gets_and_puts_blobs_in_memory_through_its_io_callback() {
    let sys = System::start().await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let payload = served(root.path(), "big.bin", 3 * 1024 * 1024 + 17);
    let server = FileServer::start(root.path().to_path_buf()).unwrap();
    let mut d = deployment_of("dep-1", &[]);
    d["modules"]["mblob"] = evp_system_tests::wasm::c_module("memory-blob");
    d["instanceSpecs"]["wmem"] = json!({"moduleId": "mblob", "publish": {}, "subscribe": {}});
    deploy_and_wait(&sys, &d).await;
    let workspace = sys.instance_dir("wmem").join("default_workspace");
    let done = [("reason", "0"), ("result", "0")];

    // A GET and a PUT at once: the GET's io callback saw exactly the server's bytes, in
    // order (in chunks: 16 KiB at most each); the server stored exactly the PUT's pattern.
    let put_len = 1_000_003;
    ask_memory(&sys, "get", &server.url("big.bin")).await;
    ask_memory(&sys, "put", &format!("{put_len} {}", server.url("up.bin"))).await;
    let (len, fnv) = (payload.len().to_string(), fnv1a(&payload).to_string());
    let calls = payload.len().div_ceil(16 * 1024).to_string();
    let got = [
        ("http", "200"),
        ("len", &len),
        ("fnv", &fnv),
        ("calls", &calls),
    ];
    check_memory(&sys, "get", &[&done[..], &got].concat()).await;
    let put_len_text = put_len.to_string();
    let put = [("http", "201"), ("len", put_len_text.as_str())];
    check_memory(&sys, "put", &[&done[..], &put].concat()).await;
    let stored = std::fs::read(root.path().join("up.bin")).unwrap();
    assert!(
        stored == pattern(put_len),
        "uploaded {} bytes, not the pattern",
        stored.len()
    );

    // An io callback that answers ERROR ends a PUT with ECANCELED before anything is sent,
    // and a GET with ECANCELED and the transfer's status.
    let ecanceled = libc::ECANCELED.to_string();
    let refused = [
        ("reason", "0"),
        ("result", "1"),
        ("error", &ecanceled),
        ("calls", "2"),
    ];
    ask_memory(
        &sys,
        "putfail",
        &format!("100000 {}", server.url("fail.bin")),
    )
    .await;
    check_memory(&sys, "putfail", &[&refused[..], &[("http", "0")]].concat()).await;
    assert!(!root.path().join("fail.bin").exists());
    assert!(server.requests().iter().all(|r| r.name != "fail.bin"));
    ask_memory(&sys, "getfail", &server.url("big.bin")).await;
    check_memory(
        &sys,
        "getfail",
        &[&refused[..], &[("http", "200")]].concat(),
    )
    .await;

    // A failed transfer is the result as it came, with no io callback; a NULL io callback
    // discards the blob.
    ask_memory(&sys, "get404", &server.url("nope")).await;
    let missing = [("result", "2"), ("http", "404"), ("calls", "0")];
    check_memory(&sys, "get404", &missing).await;
    ask_memory(&sys, "discard", &server.url("big.bin")).await;
    let discarded = [("http", "200"), ("len", "0"), ("calls", "0")];
    check_memory(&sys, "discard", &[&done[..], &discarded].concat()).await;

    // No staging file is left behind.
    assert_eq!(staging_files(&workspace), Vec::<String>::new());
    sys.stop().await;
}
