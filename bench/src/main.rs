//! `evp-bench SCENARIO [ARGS]`: starts what the scenario needs (mosquitto, the five daemons on
//! a private bus, a hub driver), runs it several times, prints one line per run to stderr and
//! its figures as one JSON object on the last line of stdout. BENCHMARKS.md records them.
//!
//! The daemons' binaries are taken from the directory of this executable, so build them in the
//! same profile first: `cargo build --release --workspace`.

mod blob;
mod cpu;
mod fleet;
mod memory;
mod spool;
mod wasm;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use evp_system_tests::system::{System, instance_status};
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
    /// Telemetry throughput end to end: one module (evp-test-telemetry-flood) sends N
    /// telemetry calls of a 100-byte value through sdk-broker, hubd and mosquitto to a
    /// subscriber; messages per second at the subscriber, and the peak RSS of sdk-broker and
    /// hubd.
    Telemetry {
        /// Telemetry calls per run.
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Measured runs.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// A burst of N telemetry calls queued at once: the rate from the first message to the
    /// last at the subscriber.
    TelemetryBurst {
        /// Telemetry calls in the burst.
        #[arg(long, default_value_t = 10_000)]
        messages: u64,
        /// Measured runs.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
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
    /// deploy-spawn for WASM: N instances of the C module echo-state, whose compiled code is
    /// in runtimed-wasm's cache (the warm-up run compiled it; each run's empty deployment
    /// unloads it, so each run loads it again from the cache and starts N instances).
    DeployWasm {
        /// How many instances the deployment has.
        #[arg(long, default_value_t = 1)]
        instances: usize,
        /// Measured runs (after one warm-up run).
        #[arg(long, default_value_t = 7)]
        runs: usize,
    },
    /// deploy-spawn for docker: N containers of an image of `evp-test-config-echo` that the
    /// benchmark imports into the local engine (so the pull finds nothing newer and the image
    /// on the device is used); each run's empty deployment removes the containers.
    DeployDocker {
        /// How many instances the deployment has.
        #[arg(long, default_value_t = 1)]
        instances: usize,
        /// Measured runs (after one warm-up run).
        #[arg(long, default_value_t = 7)]
        runs: usize,
    },
    /// A spawned module uploads an N MiB file of its workspace with `EVP_blobOperation` (HTTP
    /// PUT) to a server on loopback: MB/s, and sdk-broker's peak RSS before and after.
    BlobPut {
        /// MiB uploaded per run.
        #[arg(long, default_value_t = 100)]
        mib: u64,
        /// Measured runs (after one warm-up run).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// `Runtime1.LoadModule` of a 1 MiB C module (sdk/c/bench-modules/large.c), called on
    /// runtimed-wasm over the bus: with its compiled-code cache emptied first (validation,
    /// rewrite, compile, cache write) and again from the cache.
    WasmLoad {
        /// Measured runs of each.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// runtimed-wasm's RSS and PSS when fresh, with 1 and with 1 + N idle instances of
    /// echo-state (each has answered one configuration and is blocked in EVP_processEvent),
    /// and the cost per idle instance beyond the linear memory it committed.
    WasmIdleMemory {
        /// How many idle instances are added to the first one.
        #[arg(long, default_value_t = 100)]
        instances: usize,
        /// Measured runs, each on a fresh device.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// SHA-256 over N MiB in a WASM instance (sdk/c/bench-modules/sha256.c) against the same
    /// C code built natively with `clang -O2`.
    WasmCompute {
        /// MiB hashed per run.
        #[arg(long, default_value_t = 16)]
        mib: u64,
        /// Measured runs of each (after one warm-up run).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// hubd's spool, the device reaching the broker through a relay the bench cuts: the drain
    /// rate of a backlog, hubd's writes and fsyncs under a steady flow online and offline, and
    /// the recovery after an outage (evp-test-ticker instances; strace for the syscalls).
    Spool {
        /// Telemetry messages in the drain's backlog.
        #[arg(long, default_value_t = 20_000)]
        backlog: u64,
        /// Tickers (at 1 ms each) that build the backlog.
        #[arg(long, default_value_t = 4)]
        burst_tickers: u64,
        /// Tickers of the steady flow.
        #[arg(long, default_value_t = 3)]
        steady_tickers: u64,
        /// Messages per second of one steady ticker (a divisor of 1000).
        #[arg(long, default_value_t = 50)]
        rate: u64,
        /// Seconds of each disk measurement, online and offline.
        #[arg(long, default_value_t = 30)]
        window_s: u64,
        /// Seconds of the outage the recovery is measured after.
        #[arg(long, default_value_t = 60)]
        outage_s: u64,
    },
    /// N complete agents on this host (each its own private bus and five daemons), each with a
    /// mosquitto of its own (Debian 12's cannot strip a `mount_point`) and a hub side:
    /// deployment to all N, memory and CPU per agent at idle, and the reconnection of all N
    /// after every broker is killed and started again.
    Fleet {
        /// How many agents.
        #[arg(long, default_value_t = 10)]
        agents: usize,
        /// How many agents start at once.
        #[arg(long, default_value_t = 10)]
        wave: usize,
        /// Seconds the idle agents are watched for their CPU time.
        #[arg(long, default_value_t = 30)]
        idle_s: u64,
        /// Keep the fleet's directory (agent.toml, daemon logs) and print where it is.
        #[arg(long)]
        keep_dir: bool,
    },
    /// The telemetry scenario with the flooder a WASM instance
    /// (sdk/c/bench-modules/telemetry-flood.c).
    WasmTelemetry {
        /// Telemetry calls per run.
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Measured runs.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

/// The image deploy-docker imports and deploys.
const DOCKER_IMAGE: &str = "localhost/evp-bench/config-echo:1";
/// A telemetry run ends early when no message arrived for this long.
const STALL: Duration = Duration::from_secs(3);
/// How long one run may take before the benchmark gives up.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> Result<()> {
    let figures = match Cli::parse().scenario {
        Scenario::DeploySpawn { instances, runs } => {
            let module = |sys: &System| {
                let (url, hash) = sys.module("bench", "exec /bin/sleep 600")?;
                Ok(json!({
                    "moduleImpl": "spawn", "entryPoint": "main", "downloadUrl": url, "hash": hash,
                }))
            };
            deploy_timed("deploy-spawn", module, instances, runs).await?
        }
        Scenario::DeployWasm { instances, runs } => {
            let module = |_: &System| wasm::test_module("echo-state");
            deploy_timed("deploy-wasm", module, instances, runs).await?
        }
        Scenario::DeployDocker { instances, runs } => {
            let module = |sys: &System| {
                let binary = evp_system_tests::bin_dir().join("evp-test-config-echo");
                evp_system_tests::docker::require_engine()?;
                evp_system_tests::docker::import_module_image(
                    DOCKER_IMAGE,
                    &binary,
                    sys.dir.path(),
                )?;
                Ok(
                    json!({"moduleImpl": "docker", "entryPoint": "main", "downloadUrl": DOCKER_IMAGE}),
                )
            };
            let figures = deploy_timed("deploy-docker", module, instances, runs).await;
            evp_system_tests::docker::remove_image(DOCKER_IMAGE);
            figures?
        }
        Scenario::Telemetry { messages, runs } => {
            telemetry("telemetry", spawn_flooder()?, messages, runs).await?
        }
        Scenario::TelemetryBurst { messages, runs } => {
            telemetry("telemetry-burst", spawn_flooder()?, messages, runs).await?
        }
        Scenario::WasmTelemetry { messages, runs } => {
            let flooder = wasm::bench_module("telemetry-flood")?;
            telemetry("wasm-telemetry", flooder, messages, runs).await?
        }
        Scenario::Spool {
            backlog,
            burst_tickers,
            steady_tickers,
            rate,
            window_s,
            outage_s,
        } => {
            spool::run(spool::Params {
                backlog,
                burst_tickers,
                steady_tickers,
                rate,
                window: Duration::from_secs(window_s),
                outage: Duration::from_secs(outage_s),
            })
            .await?
        }
        Scenario::Fleet {
            agents,
            wave,
            idle_s,
            keep_dir,
        } => {
            fleet::run(fleet::Params {
                agents,
                wave,
                idle: Duration::from_secs(idle_s),
                keep_dir,
            })
            .await?
        }
        Scenario::BlobPut { mib, runs } => blob::put(mib, runs).await?,
        Scenario::WasmLoad { runs } => wasm::load(runs).await?,
        Scenario::WasmIdleMemory { instances, runs } => wasm::idle_memory(instances, runs).await?,
        Scenario::WasmCompute { mib, runs } => wasm::compute(mib, runs).await?,
    };
    println!("{figures}");
    Ok(())
}

/// Says on stderr how run `run` went; whether it is measured (run 0 is the warm-up: the
/// module downloaded, compiled and cached, the binaries faulted in).
fn note_run(run: usize, figures: &str) -> bool {
    if run == 0 {
        eprintln!("warm-up: {figures}");
    } else {
        eprintln!("run {run}: {figures}");
    }
    run > 0
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

/// A deployment of `names`, every one an instance of the module `bench` given by `module`
/// (a deployment's module entry).
fn deployment_of(id: &str, names: &[String], module: &Value) -> Value {
    let specs: serde_json::Map<String, Value> = names
        .iter()
        .map(|n| {
            let spec = json!({"moduleId": "bench", "publish": {}, "subscribe": {}});
            (n.clone(), spec)
        })
        .collect();
    json!({
        "deploymentId": id,
        "instanceSpecs": specs,
        "modules": {"bench": module},
        "publishTopics": {},
        "subscribeTopics": {}
    })
}

/// Whether the status report `report` says deployment `id` is `ok` with the instances
/// `names`, and only those, each `ok`.
fn is_deployed(report: &Value, id: &str, names: &[&str]) -> bool {
    let s = &report["deploymentStatus"];
    s["deploymentId"] == id
        && s["reconcileStatus"] == "ok"
        && s["instances"].as_object().map(|o| o.len()) == Some(names.len())
        && names.iter().all(|n| instance_status(s, n) == "ok")
}

/// Deploys `deployment` and waits for the report in which it is `ok` with its instances, and
/// only those, `ok`; the time that took.
async fn deploy_until_ok(sys: &System, deployment: &Value) -> Result<Duration> {
    let id = deployment["deploymentId"].as_str().unwrap_or_default();
    let names: Vec<&str> = deployment["instanceSpecs"]
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let started = Instant::now();
    sys.deploy(deployment).await?;
    sys.hub
        .wait_for_status(|r| is_deployed(r, id, &names), RUN_DEADLINE)
        .await
        .with_context(|| {
            let logs = sys.stack.config().log_dir();
            format!("deployment {id}; daemon logs are in {}", logs.display())
        })?;
    Ok(started.elapsed())
}

/// Times deployment → all `ok` for `instances` instances of the module `module` makes, each
/// run after an empty deployment (so every instance is started anew and the module loaded
/// again, from the caches the warm-up run filled).
async fn deploy_timed(
    scenario: &str,
    module: impl FnOnce(&System) -> Result<Value>,
    instances: usize,
    runs: usize,
) -> Result<Value> {
    let sys = System::start().await.context("starting the agent")?;
    let module = module(&sys)?;
    let names: Vec<String> = (0..instances).map(|i| format!("bench-{i}")).collect();
    let mut samples = Vec::new();
    for run in 0..=runs {
        // No instances and no modules: the module is unloaded and its instances purged.
        let empty = json!({
            "deploymentId": format!("empty-{run}"), "instanceSpecs": {}, "modules": {},
            "publishTopics": {}, "subscribeTopics": {},
        });
        deploy_until_ok(&sys, &empty).await?;
        let took = deploy_until_ok(
            &sys,
            &deployment_of(&format!("bench-{run}"), &names, &module),
        )
        .await?;
        if note_run(run, &format!("{took:?}")) {
            samples.push(took);
        }
    }
    sys.stop().await;
    let mut out = json!({
        "scenario": scenario,
        "instances": instances,
        "runs": runs,
        "report_status_interval_min_ms": 0,
    });
    if let (Value::Object(o), Value::Object(s)) = (&mut out, summary(&samples)) {
        o.extend(s);
    }
    Ok(out)
}

/// Peak resident memory of a process in KiB (`VmHWM`), 0 when it cannot be read.
fn peak_rss_kib(pid: Option<u32>) -> u64 {
    pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Median, min and max of rates.
fn rate_summary(rates: &[f64]) -> Value {
    let mut r = rates.to_vec();
    r.sort_by(f64::total_cmp);
    let median = r.get(r.len() / 2).copied().unwrap_or_default();
    json!({
        "median_msgs_per_s": median.round(),
        "min_msgs_per_s": r.first().copied().unwrap_or_default().round(),
        "max_msgs_per_s": r.last().copied().unwrap_or_default().round(),
    })
}

/// Counts telemetry messages at a plain MQTT subscriber, noting when the first and the last
/// arrived.
struct Subscriber {
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    times: std::sync::Arc<std::sync::Mutex<(Option<Instant>, Option<Instant>)>>,
}

impl Subscriber {
    async fn start(port: u16) -> Result<Subscriber> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let mut options = MqttOptions::new("evp-bench-subscriber", "127.0.0.1", port);
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client
            .subscribe("v1/devices/me/telemetry", QoS::AtMostOnce)
            .await?;
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let times = std::sync::Arc::new(std::sync::Mutex::new((None, None)));
        let (c, t) = (count.clone(), times.clone());
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        tokio::spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        let now = Instant::now();
                        // Several SDK calls may share one message when their keys differ;
                        // the flooder repeats one key, so one message is one call.
                        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let mut times = t.lock().unwrap_or_else(|e| e.into_inner());
                        times.0.get_or_insert(now);
                        times.1 = Some(now);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .context("subscribing to telemetry")??;
        Ok(Subscriber { count, times })
    }

    fn reset(&self) {
        self.count.store(0, std::sync::atomic::Ordering::SeqCst);
        *self.times.lock().unwrap_or_else(|e| e.into_inner()) = (None, None);
    }

    fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn span(&self) -> Option<(Instant, Instant)> {
        let t = self.times.lock().unwrap_or_else(|e| e.into_inner());
        Some((t.0?, t.1?))
    }
}

/// The remote flooder, `evp-test-telemetry-flood`, as a deployment's module entry.
fn spawn_flooder() -> Result<Value> {
    spawn_module("evp-test-telemetry-flood")
}

/// The test module `binary` (built beside this executable) as a spawn module entry.
fn spawn_module(binary: &str) -> Result<Value> {
    let flood = evp_system_tests::bin_dir().join(binary);
    let bytes = std::fs::read(&flood).with_context(|| {
        format!(
            "{}: run `cargo build --release --workspace`",
            flood.display()
        )
    })?;
    let hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let url = format!("file://{}", flood.display());
    Ok(json!({"moduleImpl": "spawn", "entryPoint": "main", "downloadUrl": url, "hash": hash}))
}

/// Telemetry throughput of the flooder `flooder` (a deployment's module entry; the module
/// behaves as `evp-test-telemetry-flood`), deployed as the instance `flood`.
async fn telemetry(scenario: &str, flooder: Value, messages: u64, runs: usize) -> Result<Value> {
    let sys = System::start().await.context("starting the agent")?;
    deploy_until_ok(&sys, &deployment_of("bench", &["flood".into()], &flooder)).await?;
    let subscriber = Subscriber::start(sys.mosquitto.port).await?;
    let processes = telemetry_processes(&sys);
    let mut cpu_ns = cpu::CpuTimes::new();
    let mut rates = Vec::new();
    let mut delivered = Vec::new();
    for run in 0..=runs {
        subscriber.reset();
        let cpu_before = cpu::snapshot(&processes);
        let started = Instant::now();
        // A distinct value each run (the module trims spaces), so it is a new configuration.
        let value = format!("{}{messages}", " ".repeat(run));
        sys.hub.set_configuration("flood", "flood", &value).await?;
        // Until every message arrived, or none came for a while (then the run reports what
        // arrived: QoS 0 allows loss, and the figure says so).
        let mut last_count = 0;
        let mut last_progress = Instant::now();
        while subscriber.count() < messages {
            let now = Instant::now();
            if subscriber.count() > last_count {
                last_count = subscriber.count();
                last_progress = now;
            } else if now - last_progress > STALL {
                break;
            }
            if now - started > RUN_DEADLINE {
                anyhow::bail!(
                    "run {run}: {} of {messages} messages arrived",
                    subscriber.count()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let received = subscriber.count();
        let cpu_after = cpu::snapshot(&processes);
        let rate = match (scenario, subscriber.span()) {
            ("telemetry-burst", Some((first, last))) => {
                received as f64 / (last - first).as_secs_f64().max(1e-6)
            }
            (_, Some((_, last))) => received as f64 / (last - started).as_secs_f64().max(1e-6),
            _ => 0.0,
        };
        if note_run(
            run,
            &format!("{received} of {messages} messages, {rate:.0} msg/s"),
        ) {
            rates.push(rate);
            delivered.push(received);
            cpu::add_difference(&mut cpu_ns, &cpu_before, &cpu_after);
        }
    }
    let out = json!({
        "scenario": scenario,
        "messages": messages,
        "value_bytes": 100,
        "runs": runs,
        "rates": rate_summary(&rates),
        "min_delivered": delivered.iter().min().copied().unwrap_or(0),
        "sdk_broker_peak_rss_kib": peak_rss_kib(sys.stack.pid("evp-sdk-broker")),
        "hubd_peak_rss_kib": peak_rss_kib(sys.stack.pid("evp-hubd")),
        "runtimed_wasm_peak_rss_kib": peak_rss_kib(sys.stack.pid("evp-runtimed-wasm")),
        "cpu_us_per_message": cpu_per_message(&cpu_ns, delivered.iter().sum()),
    });
    sys.stop().await;
    Ok(out)
}

/// The processes a telemetry message goes through, by label: the daemons, mosquitto, the
/// flooder's own process when it is a spawned module, and this benchmark (the subscriber).
fn telemetry_processes(sys: &System) -> Vec<(&'static str, u32)> {
    let daemons = [
        ("runtimed-wasm", "evp-runtimed-wasm"),
        ("sdk-broker", "evp-sdk-broker"),
        ("hubd", "evp-hubd"),
    ];
    let conf = sys.dir.path().join("mosquitto.conf");
    daemons
        .iter()
        .filter_map(|(label, daemon)| Some((*label, sys.stack.pid(daemon)?)))
        .chain(cpu::pid_with_argument(&conf.to_string_lossy()).map(|p| ("mosquitto", p)))
        .chain(sys.instance_pids("flood").first().map(|p| ("module", *p)))
        .chain([("evp-bench", std::process::id())])
        .collect()
}

/// CPU microseconds per message of each process, and of the threads that took a tenth of
/// their process or more, over `messages` delivered.
fn cpu_per_message(cpu_ns: &cpu::CpuTimes, messages: u64) -> Value {
    let per = |ns: u64| (ns as f64 / 1e3 / messages.max(1) as f64 * 100.0).round() / 100.0;
    let mut out = serde_json::Map::new();
    for (name, ns) in cpu_ns {
        let process = name.split('/').next().unwrap_or(name);
        let of_process = cpu_ns.get(process).copied().unwrap_or(0);
        if name == process || *ns * 10 >= of_process {
            out.insert(name.clone(), json!(per(*ns)));
        }
    }
    Value::Object(out)
}
