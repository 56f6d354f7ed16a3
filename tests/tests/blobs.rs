//! Blob operations of a spawned module (`evp-test-blob`) through sdk-broker, against HTTP
//! servers on loopback started here: what arrives is checked byte for byte on the server (PUT)
//! and in the workspace (GET).

use std::time::Duration;

use evp_system_tests::http::{Behaviour, FileServer};
use evp_system_tests::system::{System, deploy_and_wait, deployment_of, wait_state};
use serde_json::{Value, json};

/// Asks instance `blob` for the operation `ask` under `topic` and waits for its outcome.
async fn blob_op(sys: &System, topic: &str, ask: Value) -> Value {
    sys.hub
        .set_configuration("blob", topic, &ask.to_string())
        .await
        .unwrap();
    let state = wait_state(sys, &format!("state/blob/{topic}"), |_| true).await;
    let text = state
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| state.to_string());
    serde_json::from_str(&text).unwrap_or(state)
}

fn served(dir: &std::path::Path, name: &str, len: usize) -> Vec<u8> {
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
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
