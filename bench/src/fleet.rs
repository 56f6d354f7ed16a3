//! `fleet`: N complete agents on one host (each its own private bus and five daemons), each
//! device with its own topic namespace, and a hub side per device in this process. Measures the
//! deployment to all N, the memory and CPU of each agent at idle, and how the fleet reconnects
//! after its broker is killed and started again.
//!
//! The namespace is a mosquitto process per device, all killed at once and started again
//! together: one mosquitto with a listener per device and `mount_point` would be the one broker
//! of a hub, but Debian 12's mosquitto (2.0.11) does not take the mount point off the topics it
//! delivers (eclipse-mosquitto#2244, fixed in 2.0.12), so hubd would get
//! `dev0/v1/devices/me/attributes` and ignore it.

mod figures;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use evp_devhub::stack::{DAEMONS, DaemonOutput};
use evp_devhub::{HubSide, HubSideOptions, PrivateBus, Stack, StackConfig};
use evp_schemas::dbus::Hub1Proxy;
use evp_system_tests::mosquitto::Mosquitto;
use evp_system_tests::system::{UidBlock, kill_modules_under, traversable};
use futures_util::StreamExt;
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::cpu;
use crate::memory::{self, Footprint};
use figures::{CONNECTED, ms_distribution, peak_in_window, reconnected_at};

/// What the fleet scenario is asked to do.
pub struct Params {
    /// How many agents.
    pub agents: usize,
    /// How many agents start at once.
    pub wave: usize,
    /// How long the idle agents are watched for their CPU time.
    pub idle: Duration,
    /// Keep the fleet's directory (configurations, daemon logs) at the end.
    pub keep_dir: bool,
}

/// How long any one wait of the fleet may take: a wave of agents starting at once on two
/// shared cores is slow, and every wait ends as soon as its condition holds.
const DEADLINE: Duration = Duration::from_secs(300);
/// Uids for each agent's instances: the one instance, and its successor while the first one
/// stops in the redeployment.
const UIDS_PER_AGENT: u32 = 4;
/// hubd's default longest interval between two unchanged status reports (EVP's 180 s), so
/// the idle figure is the agent's own; the shortest interval is 0, so the deployment figure
/// is the agent's latency and not a report timer (as deploy-spawn).
const REPORT_INTERVAL_MAX_MS: i64 = 180_000;
/// The window in which reconnections are counted as one herd: the broker takes what arrives
/// within it at once.
const HERD_WINDOW: Duration = Duration::from_millis(100);
/// The test module every agent runs: it connects to the SDK and waits for events, as an idle
/// module does.
const MODULE: &str = "evp-test-config-echo";

/// One agent: its bus, its daemons, the hub's side of its namespace, and the changes of its
/// `Hub1.Connection`, as they arrived.
struct Agent {
    index: usize,
    stack: Stack,
    bus: PrivateBus,
    hub: HubSide,
    hub1: Hub1Proxy<'static>,
    connection_log: Arc<Mutex<Vec<(Instant, String)>>>,
    watcher: tokio::task::JoinHandle<()>,
    /// From its start to its first status report at the hub.
    launch_took: Duration,
}

/// What one agent is started with.
struct AgentSpec {
    index: usize,
    root: PathBuf,
    /// Its broker's port.
    port: u16,
    uids: (u32, u32),
}

/// Locks a mutex, also after a panic elsewhere: the data is a plain log.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Agent {
    async fn launch(spec: AgentSpec) -> Result<Agent> {
        let started = Instant::now();
        let name = format!("agent {}", spec.index);
        let dir = spec.root.join(format!("agent-{}", spec.index));
        let bus = PrivateBus::start(&dir.join("bus"))
            .with_context(|| format!("{name}: starting dbus-daemon"))?;
        let url = format!("mqtt://127.0.0.1:{}", spec.port);
        // Connected before the agent, so it answers the agent's first attribute request.
        let options = HubSideOptions {
            connect_timeout: DEADLINE,
            ..Default::default()
        };
        let hub = HubSide::connect_with(&url, options)
            .await
            .with_context(|| format!("{name}: connecting its hub side"))?;
        let mut config =
            StackConfig::new(dir.join("device"), bus.address(), "127.0.0.1", spec.port)?;
        config.bin_dir = evp_system_tests::bin_dir();
        config.output = DaemonOutput::LogFiles;
        config.instance_uids = Some(spec.uids);
        config.report_status_interval_min_ms = 0;
        config.report_status_interval_max_ms = REPORT_INTERVAL_MAX_MS;
        config.ready_timeout = DEADLINE;
        let logs = config.log_dir();
        let stack = Stack::launch(config).await.with_context(|| {
            format!("{name}: starting its daemons (logs in {})", logs.display())
        })?;
        let conn = zbus::connection::Builder::address(bus.address())
            .build()
            .await
            .with_context(|| format!("{name}: connecting to its bus"))?;
        let hub1 = Hub1Proxy::new(&conn).await?;
        let connection_log = Arc::new(Mutex::new(Vec::new()));
        let watcher = tokio::spawn({
            let (hub1, log) = (hub1.clone(), connection_log.clone());
            async move {
                let mut changes = hub1.receive_connection_changed().await;
                while let Some(change) = changes.next().await {
                    let at = Instant::now();
                    if let Ok(state) = change.get().await {
                        lock(&log).push((at, state));
                    }
                }
            }
        });
        hub.wait_for_status(|_| true, DEADLINE)
            .await
            .with_context(|| {
                format!(
                    "{name}: its first status report (logs in {})",
                    logs.display()
                )
            })?;
        Ok(Agent {
            index: spec.index,
            stack,
            bus,
            hub,
            hub1,
            connection_log,
            watcher,
            launch_took: started.elapsed(),
        })
    }

    /// The agent's processes, by label: the five daemons and its dbus-daemon.
    fn processes(&self) -> Vec<(&'static str, u32)> {
        DAEMONS
            .iter()
            .filter_map(|d| {
                let label = d.binary.strip_prefix("evp-").unwrap_or(d.binary);
                Some((label, self.stack.pid(d.binary)?))
            })
            .chain(self.bus.pid().map(|p| ("dbus-daemon", p)))
            .collect()
    }

    async fn is_connected(&self) -> bool {
        self.hub1.connection().await.is_ok_and(|c| c == CONNECTED)
    }
}

/// Everything the fleet runs, and its directory.
struct Fleet {
    root: tempfile::TempDir,
    /// Each agent's broker, by index (see the module's comment).
    brokers: Vec<Mosquitto>,
    agents: Vec<Agent>,
    _uids: Vec<UidBlock>,
}

impl Fleet {
    fn prepare(agents: usize) -> Result<Fleet> {
        let root = tempfile::Builder::new().prefix("evp-fleet-").tempdir()?;
        // Instances run under uids of their own: they must get through to their workspace and
        // SDK socket inside.
        traversable(root.path())?;
        let brokers = (0..agents)
            .map(|i| {
                let dir = root.path().join(format!("broker-{i}"));
                std::fs::create_dir_all(&dir)?;
                Mosquitto::start(&dir, None).with_context(|| format!("starting mosquitto {i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let blocks = (agents as u32 * UIDS_PER_AGENT).div_ceil(64);
        let uids = (0..blocks)
            .map(|_| UidBlock::take())
            .collect::<Result<Vec<_>>>()?;
        Ok(Fleet {
            root,
            brokers,
            agents: Vec::new(),
            _uids: uids,
        })
    }

    /// The uids of agent `index`'s instances, carved from the blocks held.
    fn uids_of(&self, index: usize) -> Result<(u32, u32)> {
        let first = index as u32 * UIDS_PER_AGENT;
        let block = self
            ._uids
            .get((first / 64) as usize)
            .context("too few uid blocks")?;
        let min = block.min + first % 64;
        Ok((min, min + UIDS_PER_AGENT - 1))
    }

    /// Starts the agents `wave` at a time; each wave is up (every agent reported its status)
    /// before the next starts.
    async fn launch(&mut self, agents: usize, wave: usize) -> Result<()> {
        let indices: Vec<usize> = (0..agents).collect();
        for chunk in indices.chunks(wave.max(1)) {
            let mut set = tokio::task::JoinSet::new();
            for &index in chunk {
                let port = self.brokers.get(index).context("a broker per agent")?.port;
                set.spawn(Agent::launch(AgentSpec {
                    index,
                    root: self.root.path().to_owned(),
                    port,
                    uids: self.uids_of(index)?,
                }));
            }
            let mut failed = None;
            while let Some(joined) = set.join_next().await {
                match joined.context("an agent's start panicked")? {
                    Ok(agent) => self.agents.push(agent),
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            eprintln!("fleet: {} of {agents} agents up", self.agents.len());
        }
        self.agents.sort_by_key(|a| a.index);
        Ok(())
    }

    /// Stops every agent (their modules with them), then the broker; removes the directory
    /// unless asked to keep it.
    async fn stop(mut self, keep_dir: bool) {
        join_all(self.agents.iter().map(|a| a.stack.stop_all())).await;
        for agent in &self.agents {
            agent.watcher.abort();
        }
        self.agents.clear();
        // A module whose runtime did not stop it (killed in a failed start) is ours still.
        kill_modules_under(self.root.path());
        self.brokers.clear();
        if keep_dir {
            eprintln!("fleet: kept {}", self.root.keep().display());
        }
    }
}

/// Runs the scenario; on Ctrl-C or SIGTERM, stops what it started and fails.
pub async fn run(params: Params) -> Result<Value> {
    raise_fd_limit()?;
    let load_before = loadavg();
    let mut fleet = Fleet::prepare(params.agents)?;
    let outcome = tokio::select! {
        figures = measure(&mut fleet, &params) => figures,
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    fleet.stop(params.keep_dir).await;
    let mut figures = outcome?;
    if let Value::Object(o) = &mut figures {
        o.insert("loadavg_before".into(), json!(load_before));
        o.insert("loadavg_after".into(), json!(loadavg()));
    }
    Ok(figures)
}

async fn measure(fleet: &mut Fleet, params: &Params) -> Result<Value> {
    let started = Instant::now();
    fleet.launch(params.agents, params.wave).await?;
    let startup_s = started.elapsed().as_secs_f64();
    let launches: Vec<Duration> = fleet.agents.iter().map(|a| a.launch_took).collect();
    let module = crate::spawn_module(MODULE)?;

    let startup = json!({
        "total_s": (startup_s * 10.0).round() / 10.0,
        "per_agent": ms_distribution(&launches),
    });
    eprintln!("fleet: startup {startup}");
    let deploy = deploy_all(&fleet.agents, "fleet-1", "echo", &module).await;
    eprintln!("fleet: deploy {deploy}");
    let idle = idle_figures(fleet, params.idle).await?;
    eprintln!("fleet: idle {idle}");
    let reconnect = reconnect_figures(fleet).await?;
    eprintln!("fleet: reconnect {reconnect}");
    // The fleet still takes a deployment once the hub sides are back too.
    evp_system_tests::wait_for("every hub side connected again", DEADLINE, async || {
        fleet
            .agents
            .iter()
            .all(|a| a.hub.is_connected())
            .then_some(())
    })
    .await?;
    let redeploy = deploy_all(&fleet.agents, "fleet-2", "echo-2", &module).await;
    Ok(json!({
        "scenario": "fleet",
        "agents": params.agents,
        "wave": params.wave,
        "startup": startup,
        "deploy": deploy,
        "idle": idle,
        "reconnect": reconnect,
        "redeploy_after_reconnect": redeploy,
    }))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// Deploys one instance `instance` of [`MODULE`] to every agent at once and times, for each
/// agent, the start of the deployment until its hub saw it `ok`; an agent that did not get
/// there within the deadline is counted and its error given, not the end of the run.
async fn deploy_all(agents: &[Agent], id: &str, instance: &str, module: &Value) -> Value {
    let deployment = crate::deployment_of(id, &[instance.to_owned()], module);
    let started = Instant::now();
    let results = join_all(agents.iter().map(|agent| {
        let deployment = &deployment;
        async move {
            agent.hub.deploy(deployment).await?;
            agent
                .hub
                .wait_for_status(|r| crate::is_deployed(r, id, &[instance]), DEADLINE)
                .await
                .with_context(|| format!("agent {}: deployment {id}", agent.index))?;
            anyhow::Ok(started.elapsed())
        }
    }))
    .await;
    let ok: Vec<Duration> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    for failure in &failed {
        eprintln!("fleet: {failure}");
    }
    json!({
        "ok_agents": ok.len(),
        "all_ok_ms": failed.is_empty().then(|| ms(ok.iter().max().copied().unwrap_or_default())),
        "per_device": ms_distribution(&ok),
        "first_failure": failed.first(),
    })
}

/// Memory of each agent at the end of an idle window, and the CPU time it took in it.
async fn idle_figures(fleet: &Fleet, window: Duration) -> Result<Value> {
    let processes: Vec<Vec<(&str, u32)>> = fleet.agents.iter().map(Agent::processes).collect();
    let before: Vec<cpu::CpuTimes> = processes.iter().map(|p| cpu::snapshot(p)).collect();
    eprintln!("fleet: idle for {window:?}");
    // The window is what is measured: nothing to wait for but time.
    tokio::time::sleep(window).await;
    let after: Vec<cpu::CpuTimes> = processes.iter().map(|p| cpu::snapshot(p)).collect();
    let percent = |ns: u64| ns as f64 / window.as_nanos() as f64 * 100.0;

    let mut cpu_per_agent = Vec::new();
    let mut pss_per_agent = Vec::new();
    let mut rss_per_agent = Vec::new();
    let mut by_process: std::collections::BTreeMap<&str, (Vec<f64>, Vec<f64>)> = Default::default();
    for ((procs, before), after) in processes.iter().zip(&before).zip(&after) {
        let mut ran = cpu::CpuTimes::new();
        cpu::add_difference(&mut ran, before, after);
        let mut agent_ns = 0;
        let mut agent = Footprint::default();
        for (label, pid) in procs {
            let ns = ran.get(*label).copied().unwrap_or(0);
            let footprint = footprint(*pid)?;
            agent_ns += ns;
            agent.rss_kib += footprint.rss_kib;
            agent.pss_kib += footprint.pss_kib;
            let entry = by_process.entry(label).or_default();
            entry.0.push(percent(ns));
            entry.1.push(footprint.pss_kib as f64);
        }
        cpu_per_agent.push(percent(agent_ns));
        pss_per_agent.push(agent.pss_kib as f64);
        rss_per_agent.push(agent.rss_kib as f64);
    }
    let by_process: serde_json::Map<String, Value> = by_process
        .into_iter()
        .map(|(label, (cpu, pss))| {
            (
                label.to_owned(),
                json!({"cpu_percent_p50": figures::median(&cpu), "pss_kib_p50": figures::median(&pss)}),
            )
        })
        .collect();
    let mut brokers = Footprint::default();
    for i in 0..fleet.brokers.len() {
        let conf = fleet.root.path().join(format!("broker-{i}/mosquitto.conf"));
        if let Some(pid) = cpu::pid_with_argument(&conf.to_string_lossy()) {
            let footprint = footprint(pid)?;
            brokers.rss_kib += footprint.rss_kib;
            brokers.pss_kib += footprint.pss_kib;
        }
    }
    Ok(json!({
        "window_s": window.as_secs(),
        "cpu_percent_of_a_core_per_agent": figures::distribution(&cpu_per_agent, "percent"),
        "cpu_percent_of_a_core_all_agents": (cpu_per_agent.iter().sum::<f64>() * 100.0).round() / 100.0,
        "pss_kib_per_agent": figures::distribution(&pss_per_agent, "kib"),
        "rss_kib_per_agent": figures::distribution(&rss_per_agent, "kib"),
        "pss_mib_all_agents": (pss_per_agent.iter().sum::<f64>() / 1024.0).round(),
        "by_process": by_process,
        "brokers_all": brokers,
        "hub_sides_evp_bench": footprint(std::process::id())?,
    }))
}

fn footprint(pid: u32) -> Result<Footprint> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    memory::parse_rollup(&text)
}

/// Kills every broker (SIGKILL), starts them again on the same ports, and times each agent
/// until its hubd is connected again.
async fn reconnect_figures(fleet: &mut Fleet) -> Result<Value> {
    evp_system_tests::wait_for("every agent connected", DEADLINE, async || {
        for agent in &fleet.agents {
            if !agent.is_connected().await {
                return None;
            }
        }
        Some(())
    })
    .await?;
    let mut brokers = std::mem::take(&mut fleet.brokers);
    let lost = Instant::now();
    // Off the runtime's threads, since a start waits (blocking) until its broker listens; all
    // killed first, then started together, as one broker would be.
    let (brokers, restarted) = tokio::task::spawn_blocking(move || {
        brokers.iter_mut().for_each(Mosquitto::stop);
        let restarted: Vec<Result<()>> = std::thread::scope(|scope| {
            let starts: Vec<_> = brokers
                .iter_mut()
                .map(|b| scope.spawn(move || b.restart()))
                .collect();
            starts
                .into_iter()
                .map(|s| {
                    s.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
                })
                .collect()
        });
        (brokers, restarted)
    })
    .await?;
    fleet.brokers = brokers;
    restarted
        .into_iter()
        .collect::<Result<Vec<()>>>()
        .context("restarting the brokers")?;
    let back = Instant::now();
    eprintln!("fleet: brokers killed and all back in {:?}", back - lost);
    let connected =
        evp_system_tests::wait_for("every agent connected again", DEADLINE, async || {
            fleet
                .agents
                .iter()
                .map(|a| reconnected_at(&lock(&a.connection_log), lost))
                .collect::<Option<Vec<Instant>>>()
        })
        .await?;
    let since_kill: Vec<Duration> = connected.iter().map(|t| *t - lost).collect();
    let since_back: Vec<Duration> = connected
        .iter()
        .map(|t| t.saturating_duration_since(back))
        .collect();
    Ok(json!({
        "broker_down_ms": ms(back - lost),
        "since_kill": ms_distribution(&since_kill),
        "since_broker_back": ms_distribution(&since_back),
        "peak_per_100ms": peak_in_window(&since_kill, HERD_WINDOW),
    }))
}

/// The first of SIGINT and SIGTERM, by name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        // Without signal handlers the run cannot be interrupted cleanly; it still ends.
        _ => std::future::pending().await,
    }
}

/// Raises the soft limit of open files to the hard one: the hub sides and bus connections of
/// 100 agents.
fn raise_fd_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")?;
    Ok(())
}

/// `/proc/loadavg`: the load the figures were taken under (the machine is shared).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.trim().to_owned())
        .unwrap_or_default()
}
