//! `evp-devhub`: the developer's hub. `up` runs the whole agent on a private bus against an
//! embedded broker; the other subcommands talk to that broker like a hub would.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use evp_devhub::hub::{DeviceReport, HubError, HubSide, HubSideOptions, fetch_status};
use evp_devhub::lock::DataDirLock;
use evp_devhub::stack::{DaemonOutput, Stack, StackConfig, default_bin_dir};
use evp_devhub::{DEFAULT_BROKER_URL, DEVHUB_STATUS_TOPIC, EmbeddedBroker, PrivateBus, manifest};
use evp_schemas::Protocol;
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};

/// How long a subcommand tries to reach the broker: on loopback it answers at once or not at
/// all.
const CLI_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `call` waits for the device's answer (sdk-broker gives a module 15 s).
const CALL_WAIT: Duration = Duration::from_secs(20);
/// How long `status` waits for a status report when none is retained.
const STATUS_WAIT: Duration = Duration::from_secs(3);

/// evp-devhub: a local hub for developing with evp-agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// The device's hub dialect: evp2, or evp1 (`up` configures the agent with it; the other
    /// subcommands speak it to the broker).
    #[arg(long, global = true, default_value = "evp2", value_name = "evp2|evp1")]
    protocol: Protocol,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a private bus, an MQTT broker, the five daemons and a hub; deploy the sample.
    Up {
        /// Use this broker instead of the embedded one.
        #[arg(long, value_name = "mqtt://HOST:PORT")]
        broker: Option<String>,
        /// Port of the embedded broker on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 1883, conflicts_with = "broker")]
        port: u16,
        /// Where the bus, agent.toml, the daemons' data and logs go.
        #[arg(long, value_name = "DIR", default_value = ".evp-devhub")]
        data_dir: PathBuf,
        /// Deploy nothing at start.
        #[arg(long)]
        no_sample: bool,
        /// Write each daemon's output to DIR/logs/<daemon>.log instead of this terminal.
        #[arg(long)]
        log_files: bool,
        /// Where the daemons' binaries are (default: next to evp-devhub).
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
        /// Answer modules' EVP storage uploads with URLs under this one (each file at
        /// `<URL>/<encoded name>`); without it they are refused.
        #[arg(long, value_name = "URL")]
        storage_url: Option<String>,
        /// Do not let the agent register itself: by default the devhub makes a provisioning
        /// key and secret, writes them in the agent's agent.toml and answers the agent's
        /// first-start provisioning request with an access token.
        #[arg(long)]
        no_provision: bool,
    },
    /// Deploy a manifest file (the manifest, or {"deployment": {...}}).
    Deploy {
        /// The JSON file; `file://` modules get their hash filled in when it is absent.
        file: PathBuf,
        /// The broker of the running devhub.
        #[arg(long, default_value = DEFAULT_BROKER_URL)]
        broker: String,
    },
    /// Set a configuration value of an instance.
    Config {
        /// The instance.
        instance: String,
        /// The topic (may contain `/`).
        topic: String,
        /// The value, sent as a string.
        value: String,
        /// The broker of the running devhub.
        #[arg(long, default_value = DEFAULT_BROKER_URL)]
        broker: String,
    },
    /// Send a direct command to an instance and print its answer.
    Call {
        /// The instance.
        instance: String,
        /// The method name.
        method: String,
        /// The parameters, JSON text.
        #[arg(default_value = "{}")]
        params: String,
        /// The broker of the running devhub.
        #[arg(long, default_value = DEFAULT_BROKER_URL)]
        broker: String,
    },
    /// Print the latest status report.
    Status {
        /// The broker of the running devhub.
        #[arg(long, default_value = DEFAULT_BROKER_URL)]
        broker: String,
    },
    /// Print every report of the device as it comes.
    Watch {
        /// The broker of the running devhub.
        #[arg(long, default_value = DEFAULT_BROKER_URL)]
        broker: String,
    },
}

/// Prints the error and its causes on one line, each cause once (the library's messages
/// already name their source), without a backtrace: these errors are for a person at a
/// terminal.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message.push_str(": ");
                    message.push_str(&cause);
                }
            }
            eprintln!("evp-devhub: error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run() -> Result<()> {
    // rumqttd logs every client that goes away as an error (the readiness probe, each
    // `evp-devhub status`); EVP_DEVHUB_LOG=rumqttd=info brings them back when a broker
    // problem is suspected.
    let filter = tracing_subscriber::EnvFilter::try_from_env("EVP_DEVHUB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let protocol = cli.protocol;
    match cli.command {
        Cmd::Up {
            broker,
            port,
            data_dir,
            no_sample,
            log_files,
            bin_dir,
            storage_url,
            no_provision,
        } => {
            up(UpArgs {
                broker,
                port,
                data_dir,
                no_sample,
                log_files,
                bin_dir,
                storage_url,
                provision: !no_provision,
                protocol,
            })
            .await
        }
        Cmd::Deploy { file, broker } => deploy(&file, &broker, protocol).await,
        Cmd::Config {
            instance,
            topic,
            value,
            broker,
        } => {
            let hub = connect_passive(&broker, protocol).await?;
            hub.set_configuration(&instance, &topic, &value).await?;
            hub.close().await;
            println!("set configuration/{instance}/{topic}");
            Ok(())
        }
        Cmd::Call {
            instance,
            method,
            params,
            broker,
        } => {
            let hub = connect_passive(&broker, protocol).await?;
            // A request id unique enough for a person at a terminal: the clock in ms.
            let reqid = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_millis() as u64);
            let answer = hub
                .call(&instance, &method, &params, reqid, CALL_WAIT)
                .await?;
            hub.close().await;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        Cmd::Status { broker } => match fetch_status(&broker, STATUS_WAIT).await? {
            Some(status) => {
                println!("{}", serde_json::to_string_pretty(&status)?);
                Ok(())
            }
            None => bail!(
                "no status report on {broker} within {STATUS_WAIT:?}: is `evp-devhub up` running there, and has the agent connected?"
            ),
        },
        Cmd::Watch { broker } => watch(&broker, protocol).await,
    }
}

async fn connect_passive(broker: &str, protocol: Protocol) -> Result<HubSide> {
    let options = HubSideOptions {
        connect_timeout: CLI_CONNECT_TIMEOUT,
        protocol,
        ..HubSideOptions::passive()
    };
    HubSide::connect_with(broker, options)
        .await
        .map_err(|e| match e {
            HubError::Connect { .. } => anyhow::anyhow!("{e} (is `evp-devhub up` running?)"),
            other => other.into(),
        })
}

async fn deploy(file: &Path, broker: &str, protocol: Protocol) -> Result<()> {
    let manifest = manifest::read_deployment_file(file)?;
    let hub = connect_passive(broker, protocol).await?;
    hub.deploy(&manifest).await?;
    hub.close().await;
    let id = manifest
        .get("deploymentId")
        .and_then(Value::as_str)
        .unwrap_or("(no deploymentId)");
    println!("deployed {id}; `evp-devhub status` or `evp-devhub watch` shows how it goes");
    Ok(())
}

async fn watch(broker: &str, protocol: Protocol) -> Result<()> {
    let hub = connect_passive(broker, protocol).await?;
    let mut reports = hub.subscribe();
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    eprintln!("watching {broker}; Ctrl-C to stop");
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            report = reports.recv() => match report {
                Ok(DeviceReport::Status(v)) => println!("status {v}"),
                Ok(DeviceReport::InstanceState(v)) => println!("state {v}"),
                Ok(DeviceReport::Telemetry(v)) => println!("telemetry {v}"),
                Ok(DeviceReport::StorageTokenRequest(v)) => println!("storage-token-request {v}"),
                Ok(DeviceReport::ProvisionRequest(seen)) => {
                    println!("provision-request {:?} granted {}", seen.device_name, seen.token.is_some())
                }
                Ok(DeviceReport::CommandResponse { mqtt_id, payload }) => {
                    println!("command-response {mqtt_id} {payload}")
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("evp-devhub: {n} reports skipped (output too slow)");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    hub.close().await;
    Ok(())
}

struct UpArgs {
    broker: Option<String>,
    port: u16,
    data_dir: PathBuf,
    no_sample: bool,
    log_files: bool,
    bin_dir: Option<PathBuf>,
    storage_url: Option<String>,
    provision: bool,
    protocol: Protocol,
}

/// What `up` runs, kept together so a stop takes everything down in order.
struct Running {
    /// Held for the process's life: a second `up` on the same data directory stops at once.
    _lock: DataDirLock,
    bus: PrivateBus,
    /// Kept for the process's life: rumqttd cannot be stopped.
    _broker: Option<EmbeddedBroker>,
    hub: HubSide,
    stack: Stack,
    broker_url: String,
}

async fn up(args: UpArgs) -> Result<()> {
    // Installed first: from here on Ctrl-C no longer kills the process outright, so even a
    // stop during start-up takes everything down.
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let running = tokio::select! {
        r = start_up(&args) => r?,
        _ = interrupt.recv() => { eprintln!("evp-devhub: interrupted while starting"); return Ok(()) }
        _ = terminate.recv() => { eprintln!("evp-devhub: terminated while starting"); return Ok(()) }
    };
    print_usage(&running);

    let mut reports = running.hub.subscribe();
    // Those granted before the subscription, then each as it comes, each device once.
    let mut provisioned = std::collections::BTreeSet::new();
    for (device, token) in running.hub.provisioned() {
        print_provisioned(&device, &token, &mut provisioned);
    }
    let mut last_summary = String::new();
    if let Some(status) = running.hub.latest_status() {
        print_summary(&status, &mut last_summary);
    }
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            report = reports.recv() => match report {
                Ok(DeviceReport::Status(status)) => print_summary(&status, &mut last_summary),
                Ok(DeviceReport::ProvisionRequest(seen)) => match seen.token {
                    Some(token) => print_provisioned(&seen.device_name, &token, &mut provisioned),
                    None => println!("evp-devhub: provisioning of {:?} refused", seen.device_name),
                },
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if let Some(status) = running.hub.latest_status() {
                        print_summary(&status, &mut last_summary);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    eprintln!("evp-devhub: stopping");
    let Running {
        mut bus,
        hub,
        stack,
        ..
    } = running;
    stack.stop_all().await;
    hub.close().await;
    bus.stop();
    eprintln!("evp-devhub: stopped");
    Ok(())
}

async fn start_up(args: &UpArgs) -> Result<Running> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let dir = std::fs::canonicalize(&args.data_dir)
        .with_context(|| format!("resolving {}", args.data_dir.display()))?;
    let lock = DataDirLock::take(&dir)?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => default_bin_dir().context("finding the folder of evp-devhub")?,
    };

    let bus = PrivateBus::start(&dir.join("bus")).context("starting the private bus")?;
    let (broker, broker_url) = match &args.broker {
        Some(url) => (None, url.clone()),
        None => {
            let broker = EmbeddedBroker::start(args.port)?;
            let url = broker.url();
            (Some(broker), url)
        }
    };
    let (mqtt_host, mqtt_port) = evp_devhub::hub::parse_broker_url(&broker_url)?;
    let hub = HubSide::connect_with(
        &broker_url,
        HubSideOptions {
            republish_status: Some(DEVHUB_STATUS_TOPIC.into()),
            protocol: args.protocol,
            ..HubSideOptions::default()
        },
    )
    .await?;
    hub.set_storage(Some(match args.storage_url.clone() {
        Some(base_url) => evp_devhub::StorageAnswer::SingleFile {
            base_url,
            headers: Default::default(),
        },
        None => evp_devhub::StorageAnswer::Refuse(
            "evp-devhub has no storage: start it with --storage-url".into(),
        ),
    }));

    // Deployed before the agent starts: its first attribute request gets the sample.
    if !args.no_sample {
        let module = bin_dir.join(manifest::SAMPLE_BINARY);
        let sample = manifest::sample_deployment(&module).context(
            "the sample module is built with the workspace (cargo build -p evp-sample-module), or use --no-sample",
        )?;
        hub.deploy(&sample).await.context("deploying the sample")?;
    }

    let mut config = StackConfig::new(&dir, bus.address(), mqtt_host, mqtt_port)?;
    if args.provision {
        let profile = evp_devhub::hub::ProvisionProfile::generated();
        config.provision = Some((profile.key.clone(), profile.secret.clone()));
        hub.set_provisioning(Some(profile));
    }
    config.bin_dir = bin_dir;
    config.protocol = args.protocol;
    config.supervise = true;
    config.output = if args.log_files {
        DaemonOutput::LogFiles
    } else {
        DaemonOutput::Forward
    };
    let stack = Stack::launch(config).await?;
    Ok(Running {
        _lock: lock,
        bus,
        _broker: broker,
        hub,
        stack,
        broker_url,
    })
}

fn print_usage(r: &Running) {
    let broker_flag = if r.broker_url == DEFAULT_BROKER_URL {
        String::new()
    } else {
        format!(" --broker {}", r.broker_url)
    };
    let pids: Vec<String> = r
        .stack
        .names()
        .iter()
        .map(|n| format!("{n} {}", r.stack.pid(n).unwrap_or(0)))
        .collect();
    println!(
        "evp-devhub: up. bus {}, broker {}\n  daemons: {}\n  agent.toml: {}\n\
         In another terminal:\n  \
         evp-devhub status{broker_flag}                        latest status report\n  \
         evp-devhub watch{broker_flag}                         every report as it comes\n  \
         evp-devhub deploy FILE.json{broker_flag}              deploy a manifest\n  \
         evp-devhub config INSTANCE TOPIC VALUE{broker_flag}   set a configuration value\n\
         Ctrl-C stops everything.",
        r.bus.address(),
        r.broker_url,
        pids.join(", "),
        r.stack.agent_toml_path().display(),
    );
}

/// Says that `device` registered itself, the first time only.
fn print_provisioned(device: &str, token: &str, printed: &mut std::collections::BTreeSet<String>) {
    if printed.insert(device.to_owned()) {
        println!("evp-devhub: device {device} provisioned itself: access token {token}");
    }
}

/// One line about the deployment status; printed only when it differs from the last one.
fn print_summary(status: &Value, last: &mut String) {
    let Some(line) = summarize(status) else {
        return;
    };
    if line != *last {
        println!("evp-devhub: {line}");
        *last = line;
    }
}

fn summarize(status: &Value) -> Option<String> {
    let deployment = status.get("deploymentStatus")?;
    let id = deployment
        .get("deploymentId")
        .and_then(Value::as_str)
        .unwrap_or("-");
    let reconcile = deployment
        .get("reconcileStatus")
        .and_then(Value::as_str)
        .unwrap_or("-");
    let mut parts = vec![format!("deployment {id}: {reconcile}")];
    if let Some(failure) = deployment.get("failureMessage").and_then(Value::as_str) {
        parts.push(format!("({failure})"));
    }
    for (kind, key) in [("module", "modules"), ("instance", "instances")] {
        for (name, v) in deployment
            .get(key)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let st = v.get("status").and_then(Value::as_str).unwrap_or("?");
            parts.push(match v.get("failureMessage").and_then(Value::as_str) {
                Some(m) => format!("{kind} {name} {st} ({m})"),
                None => format!("{kind} {name} {st}"),
            });
        }
    }
    Some(parts.join(", "))
}
