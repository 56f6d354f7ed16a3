//! `blob-put`: a module uploads a file of its workspace with `EVP_blobOperation` (HTTP PUT)
//! to a server on loopback; the rate, and sdk-broker's peak RSS, which must not grow with the
//! file (the upload is streamed from the file).

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use evp_system_tests::http::FileServer;
use evp_system_tests::system::{System, deploy_and_wait, deployment_of, try_wait_state};
use serde_json::{Value, json};

use crate::{RUN_DEADLINE, note_run, peak_rss_kib};

/// Uploads a `mib` MiB file `runs` times (after one warm-up) and reports MB/s and the peak
/// RSS of sdk-broker before and after.
pub async fn put(mib: u64, runs: usize) -> Result<Value> {
    let sys = System::start().await.context("starting the agent")?;
    deploy_and_wait(&sys, &deployment_of("bench", &[("blob", "evp-test-blob")])).await;
    let broker = sys.stack.pid("evp-sdk-broker");
    let rss_before = peak_rss_kib(broker);
    let workspace = sys.instance_dir("blob").join("default_workspace");
    let bytes = mib * 1024 * 1024;
    // Written as the instance would: a file of its workspace, its own.
    let file = workspace.join("upload.bin");
    let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    {
        use std::io::Write;
        let mut out = std::fs::File::create(&file)?;
        for _ in 0..mib {
            out.write_all(&chunk)?;
        }
    }
    let root = tempfile::tempdir()?;
    let server = FileServer::start(root.path().to_path_buf())?;
    let mut rates = Vec::new();
    for run in 0..=runs {
        let topic = format!("put{run}");
        let ask = json!({"op": "put", "url": server.url("upload.bin"), "file": "upload.bin"});
        let started = Instant::now();
        sys.hub
            .set_configuration("blob", &topic, &ask.to_string())
            .await?;
        let outcome = try_wait_state(&sys, &format!("state/blob/{topic}"), |_| true, RUN_DEADLINE)
            .await
            .with_context(|| format!("no outcome for {topic}"))?;
        let took = started.elapsed();
        ensure!(
            outcome.as_str().is_some_and(|s| s.contains("\"result\":0")),
            "upload failed: {outcome}"
        );
        let stored = std::fs::metadata(root.path().join("upload.bin"))?.len();
        ensure!(
            stored == bytes,
            "the server stored {stored} bytes of {bytes}"
        );
        let rate = bytes as f64 / took.as_secs_f64() / 1e6;
        if note_run(run, &format!("{took:?} ({rate:.1} MB/s)")) {
            rates.push(rate);
        }
    }
    let rss_after = peak_rss_kib(broker);
    sys.stop().await;
    rates.sort_by(f64::total_cmp);
    let median = rates.get(rates.len() / 2).copied().unwrap_or_default();
    let round = |x: f64| (x * 10.0).round() / 10.0;
    Ok(json!({
        "scenario": "blob-put",
        "mib": mib,
        "runs": runs,
        "median_mb_per_s": round(median),
        "min_mb_per_s": round(rates.first().copied().unwrap_or_default()),
        "max_mb_per_s": round(rates.last().copied().unwrap_or_default()),
        "sdk_broker_peak_rss_kib_before": rss_before,
        "sdk_broker_peak_rss_kib_after": rss_after,
    }))
}
