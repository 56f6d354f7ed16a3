//! `evp-bench SCENARIO [ARGS]`: starts what the scenario needs (mosquitto, the five daemons on
//! a private bus, a hub driver), runs it several times, prints one line per run to stderr and
//! its figures as one JSON object on the last line of stdout. BENCHMARKS.md records them.
//!
//! The daemons' binaries are taken from the directory of this executable, so build them in the
//! same profile first: `cargo build --release --workspace`.
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use evp_system_tests::system::{System, deployment, instance_status};
use serde_json::{Value, json};

/// evp-agent benchmarks.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Time from the deployment message to the status report with `ok` for N spawned
    /// instances of a module already in the cache.
    DeploySpawn {
        /// How many instances the deployment has.
        #[arg(long, default_value_t = 1)]
        instances: usize,
        /// Measured runs (after one warm-up run).
        #[arg(long, default_value_t = 7)]
        runs: usize,
    },
}

/// How long one run may take before the benchmark gives up.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> Result<()> {
    let figures = match Cli::parse().scenario {
        Scenario::DeploySpawn { instances, runs } => deploy_spawn(instances, runs).await?,
    };
    println!("{figures}");
    Ok(())
}

/// Median, min and max of durations, in milliseconds.
fn summary(samples: &[Duration]) -> Value {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let median = if ms.is_empty() {
        0.0
    } else if ms.len() % 2 == 1 {
        ms[ms.len() / 2]
    } else {
        (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0
    };
    let round = |x: f64| (x * 100.0).round() / 100.0;
    json!({
        "median_ms": round(median),
        "min_ms": round(ms.first().copied().unwrap_or_default()),
        "max_ms": round(ms.last().copied().unwrap_or_default()),
    })
}

async fn deploy_spawn(instances: usize, runs: usize) -> Result<Value> {
    let sys = System::start().await.context("starting the agent")?;
    let (url, hash) = sys.module("bench", "exec /bin/sleep 600")?;
    let names: Vec<String> = (0..instances).map(|i| format!("bench-{i}")).collect();
    let mut samples = Vec::new();
    for run in 0..=runs {
        let empty = format!("empty-{run}");
        sys.deploy(&deployment(&empty, &[], &[])).await?;
        sys.hub
            .wait_for_status(
                |r| {
                    r["deploymentStatus"]["deploymentId"] == empty.as_str()
                        && r["deploymentStatus"]["reconcileStatus"] == "ok"
                        && r["deploymentStatus"]["instances"]
                            .as_object()
                            .is_some_and(|o| o.is_empty())
                },
                RUN_DEADLINE,
            )
            .await?;
        let id = format!("bench-{run}");
        let specs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "bench")).collect();
        let d = deployment(&id, &specs, &[("bench", &url, &hash)]);
        let started = Instant::now();
        sys.deploy(&d).await?;
        sys.hub
            .wait_for_status(
                |r| {
                    let s = &r["deploymentStatus"];
                    s["deploymentId"] == id.as_str()
                        && s["reconcileStatus"] == "ok"
                        && names.iter().all(|n| instance_status(s, n) == "ok")
                },
                RUN_DEADLINE,
            )
            .await?;
        let took = started.elapsed();
        if run == 0 {
            eprintln!("warm-up (module download and cache): {took:?}");
        } else {
            eprintln!("run {run}: {took:?}");
            samples.push(took);
        }
    }
    sys.stop().await;
    let mut out = json!({
        "scenario": "deploy-spawn",
        "instances": instances,
        "runs": runs,
        "report_status_interval_min_ms": 0,
    });
    if let (Value::Object(o), Value::Object(s)) = (&mut out, summary(&samples)) {
        o.extend(s);
    }
    Ok(out)
}
