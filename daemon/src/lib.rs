//! Plumbing every evp-agent daemon shares, and nothing of their domain: the command line, the
//! configuration file, logging to journald or stderr, sd_notify, SIGTERM, the bus connection,
//! crash-safe file writes and private directories ([`fs`]), retry backoff ([`backoff`]).

pub mod backoff;
pub mod bus;
pub mod conffile;
pub mod crash;
pub mod fs;
#[cfg(feature = "http")]
pub mod http;
pub mod rlimit;

pub use backoff::Backoff;
pub use bus::{
    BusLost, EXIT_BUS_LOST, connect_named, exit_if_bus_lost, exit_when_closed, own_name,
};
pub use fs::{create_private_dir, write_atomic};

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// Where the agent's configuration lives on a device.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/evp/agent.toml";
/// Root of the daemons' persistent data on a device; each daemon owns one folder below it.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/evp";
/// Root of the runtime files (SDK sockets) on a device.
pub const DEFAULT_RUN_DIR: &str = "/run/evp";

/// The command line every daemon accepts.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// The agent's configuration file. A missing file at the default path means "all defaults".
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// D-Bus address of the bus to use; `DBUS_SYSTEM_BUS_ADDRESS` or the system bus otherwise.
    #[arg(long, value_name = "ADDRESS")]
    pub bus: Option<String>,
}

/// Settings every daemon reads from the top level of `agent.toml`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommonConfig {
    /// Root of persistent data (`EVP_DATA_DIR` overrides it).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Root of runtime files such as SDK sockets.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    DEFAULT_DATA_DIR.into()
}

fn default_run_dir() -> PathBuf {
    DEFAULT_RUN_DIR.into()
}

/// The parsed `agent.toml`: common settings plus one table per daemon.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Top-level settings.
    pub common: CommonConfig,
    table: toml::Table,
}

impl AgentConfig {
    /// Reads the configuration named on the command line, or the default file when it exists,
    /// then applies `EVP_DATA_DIR`.
    pub fn load(args: &DaemonArgs) -> Result<AgentConfig> {
        let text = match &args.config {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading configuration {}", path.display()))?,
            None => match std::fs::read_to_string(DEFAULT_CONFIG_PATH) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {DEFAULT_CONFIG_PATH}"));
                }
            },
        };
        let mut config = Self::parse(&text)?;
        if let Some(dir) = env_nonempty("EVP_DATA_DIR") {
            config.common.data_dir = dir.into();
        }
        Ok(config)
    }

    /// Parses the text of an `agent.toml`.
    pub fn parse(text: &str) -> Result<AgentConfig> {
        let mut table: toml::Table = text.parse().context("agent.toml is not valid TOML")?;
        let sections: toml::Table = table
            .iter()
            .filter(|(_, v)| v.is_table())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        table.retain(|_, v| !v.is_table());
        let common: CommonConfig = toml::Value::Table(table)
            .try_into()
            .context("agent.toml: top-level settings")?;
        Ok(AgentConfig {
            common,
            table: sections,
        })
    }

    /// The daemon's own `[name]` table, with defaults for what it leaves out.
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let value = self
            .table
            .get(name)
            .cloned()
            .unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
        value
            .try_into()
            .with_context(|| format!("agent.toml: section [{name}]"))
    }

    /// The daemon's folder under the data root, created if missing, its owner's only (0700):
    /// no other daemon reads a daemon's data.
    pub fn data_subdir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.common.data_dir.join(name);
        create_private_dir(&dir, 0o700)?;
        Ok(dir)
    }
}

/// An environment variable, with empty meaning unset (as EVP treats them).
pub fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Sends logs to journald when systemd connected stderr to the journal, to stderr otherwise.
/// `RUST_LOG` sets the filter; the default is `info`. A log's fields are journal fields of the
/// same name upper-cased, unprefixed (`instance` is `INSTANCE`, so
/// `journalctl INSTANCE=sample` finds an instance's lines); none is named like a field journald
/// or tracing-journald sets (`MESSAGE`, `PRIORITY`, `TARGET`, `CODE_*`, `SYSLOG_*`).
///
/// It also raises the open-file soft limit to the hard one, and logs the limit in force:
/// every instance costs descriptors ([`rlimit`]).
pub fn init_logging(name: &'static str) {
    init_subscriber(name);
    match rlimit::raise_nofile() {
        Ok(l) => tracing::info!("open files: soft limit {}, hard limit {}", l.soft, l.hard),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}

fn init_subscriber(name: &'static str) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(
                        layer
                            .with_field_prefix(None)
                            .with_syslog_identifier(name.to_owned()),
                    )
                    .init();
                return;
            }
            Err(e) => eprintln!("{name}: journald unavailable ({e}); logging to stderr"),
        }
    }
    // Colours only for a person at a terminal, never into log files or pipes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Connects to the bus named on the command line, `DBUS_SYSTEM_BUS_ADDRESS`, or the system bus.
pub fn bus_builder(args: &DaemonArgs) -> Result<zbus::connection::Builder<'static>> {
    Ok(match &args.bus {
        Some(address) => zbus::connection::Builder::address(address.as_str()),
        None => zbus::connection::Builder::system(),
    })
}

/// SIGTERM and SIGINT streams, created before READY so that a stop requested right after the
/// daemon said it is ready is a clean stop, not the default action of the signal.
static SHUTDOWN_SIGNALS: std::sync::Mutex<Option<ShutdownSignals>> = std::sync::Mutex::new(None);

struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

fn shutdown_signals() -> Result<ShutdownSignals> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok(ShutdownSignals {
        term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
        int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
    })
}

/// Tells systemd the daemon serves (`READY=1`, `STATUS=serving <name>`) and starts the
/// watchdog pings when `WATCHDOG_USEC` asks for them. Call it once `name` is owned on `conn`, from the runtime.
/// Each ping follows a round trip to the bus that shows `conn` still owns `name`, so a daemon
/// cut off from the bus (or whose event loop is stuck) stops pinging and systemd restarts it.
pub fn notify_ready(conn: &zbus::Connection, name: &'static str) {
    {
        let mut slot = SHUTDOWN_SIGNALS.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            match shutdown_signals() {
                Ok(s) => *slot = Some(s),
                Err(e) => warn!("{e:#}"),
            }
        }
    }
    // The status `systemctl status` shows, with READY=1 in one message.
    let status = format!("serving {name}");
    let ready = [
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ];
    if let Err(e) = sd_notify::notify(&ready) {
        warn!("sd_notify READY failed: {e}");
    }
    if let Some(period) = sd_notify::watchdog_enabled() {
        // Ping at half the period, as systemd recommends, so one late tick is not fatal; the
        // round trip gets the other half at most.
        let every = (period / 2).max(Duration::from_millis(100));
        info!(?every, "systemd watchdog enabled");
        let conn = conn.clone();
        let hang_at = debug_hang_at();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut failing = false;
            loop {
                tick.tick().await;
                if hang_at.is_some_and(|at| std::time::Instant::now() >= at) {
                    warn!("{DEBUG_HANG_VARIABLE}: hanging here; the watchdog pings stop");
                    std::future::pending::<()>().await;
                }
                let check = tokio::time::timeout(every, bus::still_owns(&conn, name)).await;
                let problem = match check {
                    Ok(Ok(true)) => None,
                    Ok(Ok(false)) => Some(format!("{name} is no longer ours")),
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some(format!("no answer from the bus within {every:?}")),
                };
                match problem {
                    None => {
                        if failing {
                            info!("the bus answers again; watchdog pings resume");
                        }
                        failing = false;
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    }
                    Some(p) if !failing => {
                        failing = true;
                        warn!("not pinging the watchdog: {p}");
                    }
                    Some(_) => {}
                }
            }
        });
    }
}

/// Debug builds only: the daemon's watchdog pinger hangs this many milliseconds after READY,
/// so a test sees systemd's watchdog restart a daemon that stopped answering.
pub const DEBUG_HANG_VARIABLE: &str = "EVP_DEBUG_HANG_AFTER_MS";

/// When a debug build is to hang ([`DEBUG_HANG_VARIABLE`]); never in a release build.
fn debug_hang_at() -> Option<std::time::Instant> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let ms: u64 = std::env::var(DEBUG_HANG_VARIABLE).ok()?.parse().ok()?;
    Some(std::time::Instant::now() + Duration::from_millis(ms))
}

/// Waits for SIGTERM or SIGINT, then tells systemd the daemon is stopping.
pub async fn wait_for_shutdown() -> Result<()> {
    let taken = SHUTDOWN_SIGNALS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let mut signals = match taken {
        Some(s) => s,
        None => shutdown_signals()?,
    };
    let which = tokio::select! {
        _ = signals.term.recv() => "SIGTERM",
        _ = signals.int.recv() => "SIGINT",
    };
    info!("{which} received, stopping");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Default)]
    struct Hub {
        #[serde(default)]
        mqtt_port: u16,
    }

    #[test]
    fn sections_and_common_settings_are_separate() {
        let c = AgentConfig::parse("data_dir = \"/d\"\n[hub]\nmqtt_port = 1883\n").unwrap();
        assert_eq!(c.common.data_dir, PathBuf::from("/d"));
        assert_eq!(c.common.run_dir, PathBuf::from(DEFAULT_RUN_DIR));
        assert_eq!(c.section::<Hub>("hub").unwrap().mqtt_port, 1883);
        assert_eq!(c.section::<Hub>("absent").unwrap().mqtt_port, 0);
    }

    #[test]
    fn unknown_top_level_key_is_an_error() {
        let e = AgentConfig::parse("data_dri = \"/d\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("data_dri"), "{e:#}");
    }
}
