//! Module downloads over a bad link: a cut transfer resumes with Range, a server that ignores
//! Range still gives a verified module, the cache is keyed by hash, and a newer deployment
//! preempts a download it does not need.

use evp_system_tests::http::{Behaviour, FileServer};
use evp_system_tests::system::{System, deployment, instance_status};
use evp_system_tests::{DEADLINE, wait_for};
use std::time::Duration;

/// A spawn module of about `kib` KiB: it stays up, and the shell never reads the padding.
fn padded(kib: usize) -> String {
    let line = format!("# {}\n", "x".repeat(62));
    format!(
        "exec /bin/sleep 300\n{}",
        line.repeat(kib * 1024 / line.len())
    )
}

fn converged(s: &serde_json::Value, id: &str, instances: &[&str]) -> bool {
    s["deploymentId"] == id
        && s["reconcileStatus"] == "ok"
        && instances.iter().all(|i| instance_status(s, i) == "ok")
}

#[tokio::test(flavor = "multi_thread")]
async fn cut_transfer_resumes_from_where_it_stopped() {
    let sys = System::start().await.unwrap();
    let (_, hash) = sys.module("big", &padded(256)).unwrap();
    let server = FileServer::start_with(
        sys.modules_dir(),
        Behaviour {
            cut_requests: 1,
            cut_after: 64 * 1024,
            ..Default::default()
        },
    )
    .unwrap();
    let d = deployment(
        "dep-1",
        &[("one", "big")],
        &[("big", &server.url("big"), &hash)],
    );
    sys.deploy(&d).await.unwrap();
    let status = sys
        .wait_status(|s| converged(s, "dep-1", &["one"]))
        .await
        .unwrap();
    assert_eq!(status["modules"]["big"]["status"], "ok");
    let requests: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.name == "big")
        .collect();
    assert!(
        requests.len() >= 2,
        "no second request after the cut: {requests:?}"
    );
    assert_eq!(requests[0].range, None);
    let resumed_at: u64 = requests[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the second request did not resume: {:?}", requests[1]));
    assert!(
        resumed_at > 0 && resumed_at <= 64 * 1024,
        "resumed at {resumed_at}"
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_ignoring_range_still_gives_a_verified_module() {
    let sys = System::start().await.unwrap();
    let (_, hash) = sys.module("big", &padded(256)).unwrap();
    let server = FileServer::start_with(
        sys.modules_dir(),
        Behaviour {
            cut_requests: 1,
            cut_after: 64 * 1024,
            ignore_range: true,
            ..Default::default()
        },
    )
    .unwrap();
    let d = deployment(
        "dep-1",
        &[("one", "big")],
        &[("big", &server.url("big"), &hash)],
    );
    sys.deploy(&d).await.unwrap();
    sys.wait_status(|s| converged(s, "dep-1", &["one"]))
        .await
        .unwrap();
    assert!(server.request_count() >= 2);
    let cached = sys.data_dir().join("modules").join(&hash);
    assert_eq!(
        std::fs::read(cached).unwrap(),
        std::fs::read(sys.modules_dir().join("big")).unwrap()
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn same_module_under_two_ids_and_a_redeploy_download_once() {
    let sys = System::start().await.unwrap();
    let (_, hash) = sys.module("m", "exec /bin/sleep 300").unwrap();
    let server = FileServer::start(sys.modules_dir()).unwrap();
    let url = server.url("m");
    let d = deployment(
        "dep-1",
        &[("one", "first"), ("two", "second")],
        &[("first", &url, &hash), ("second", &url, &hash)],
    );
    sys.deploy(&d).await.unwrap();
    sys.wait_status(|s| converged(s, "dep-1", &["one", "two"]))
        .await
        .unwrap();
    let mut d2 = d.clone();
    d2["deploymentId"] = "dep-2".into();
    d2["instanceSpecs"]["three"] =
        serde_json::json!({"moduleId": "first", "publish": {}, "subscribe": {}});
    sys.deploy(&d2).await.unwrap();
    sys.wait_status(|s| converged(s, "dep-2", &["one", "two", "three"]))
        .await
        .unwrap();
    assert_eq!(server.request_count(), 1, "{:?}", server.requests());
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn newer_deployment_preempts_a_download_it_does_not_need() {
    let sys = System::start().await.unwrap();
    let (_, slow_hash) = sys.module("slow", &padded(512)).unwrap();
    let (fast_url, fast_hash) = sys.module("fast", "exec /bin/sleep 300").unwrap();
    let server = FileServer::start_with(
        sys.modules_dir(),
        Behaviour {
            // 16 KiB every 200 ms: a 512 KiB module takes over six seconds.
            pace: Some(Duration::from_millis(200)),
            ..Default::default()
        },
    )
    .unwrap();
    let d1 = deployment(
        "dep-1",
        &[("one", "slow")],
        &[("slow", &server.url("slow"), &slow_hash)],
    );
    sys.deploy(&d1).await.unwrap();
    let downloading = sys
        .wait_status(|s| {
            s["deploymentId"] == "dep-1"
                && s["modules"]["slow"]["status"] == "downloading"
                && s["modules"]["slow"]["bytesDone"].as_u64().unwrap_or(0) > 0
        })
        .await
        .unwrap();
    let total = std::fs::metadata(sys.modules_dir().join("slow"))
        .unwrap()
        .len();
    assert_eq!(downloading["modules"]["slow"]["bytesTotal"], total);

    let d2 = deployment(
        "dep-2",
        &[("two", "fast")],
        &[("fast", &fast_url, &fast_hash)],
    );
    sys.deploy(&d2).await.unwrap();
    let status = sys
        .wait_status(|s| converged(s, "dep-2", &["two"]))
        .await
        .unwrap();
    assert!(status["modules"].get("slow").is_none(), "{status}");
    assert!(status["instances"].get("one").is_none(), "{status}");
    // The transfer was abandoned, not left to finish in the background.
    let slow = wait_for("the slow transfer to end", DEADLINE, async || {
        server
            .requests()
            .into_iter()
            .find(|r| r.name == "slow" && r.completed.is_some())
    })
    .await
    .unwrap();
    assert_eq!(
        slow.completed,
        Some(false),
        "the preempted download ran to the end"
    );
    assert!(!sys.data_dir().join("modules").join(&slow_hash).exists());
    sys.stop().await;
}
