//! reconcilerd: owns the desired deployment. It validates and persists what hubd hands it,
//! downloads and verifies modules into a cache, drives the runtimes so the device matches the
//! deployment, and publishes the status as `org.evp.Reconciler1.DeploymentStatus`.

pub mod crash;
pub mod download;
pub mod plan;
pub mod reconcile;
pub mod restart;
pub mod status;
pub mod store;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use evp_daemon::{AgentConfig, DaemonArgs};
use evp_schemas::dbus::{EvpError, RECONCILER_NAME, RECONCILER_PATH};
use evp_schemas::{Deployment, DeploymentStatus, ReconcileStatus};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tracing::{error, info};
use zbus::interface;

use crate::download::{DownloadConfig, Downloader, Downloads, EventSink};
use crate::reconcile::{Desired, Event, Reconciler, Settings, SharedStatus, StatusChanged};
use crate::restart::RestartConfig;
use crate::store::{DesiredStore, ModuleCache};

/// The `[reconciler]` section of agent.toml. Every key is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcilerConfig {
    /// How long an instance may take to exit when stopped before it is killed. EVP gives
    /// spawned modules 10 s.
    #[serde(default = "default_stop_grace_ms")]
    pub stop_grace_ms: u32,
    /// How long a WASM instance has, in all, to end once asked to: EVP gives 5 s and then
    /// terminates it. The SDK exit protocol and runtimed-wasm's stop share it, because a WASM
    /// instance cannot be sent a signal it might handle.
    #[serde(default = "default_wasm_stop_grace_ms")]
    pub wasm_stop_grace_ms: u32,
    /// Module transfers running at once: a gateway's uplink is shared, and four keeps a
    /// deployment of many modules moving without starving each transfer.
    #[serde(default = "default_max_concurrent_downloads")]
    pub max_concurrent_downloads: usize,
    /// First wait before a failed download is tried again; it doubles up to the max.
    #[serde(default = "default_backoff_base_ms")]
    pub download_retry_base_ms: u64,
    /// Longest wait between download attempts.
    #[serde(default = "default_backoff_max_ms")]
    pub download_retry_max_ms: u64,
    /// A transfer that receives nothing for this long fails (and resumes at the next attempt).
    #[serde(default = "default_read_timeout_ms")]
    pub download_read_timeout_ms: u64,
    /// First wait before restarting a crashed instance; it doubles up to the max.
    #[serde(default = "default_backoff_base_ms")]
    pub restart_backoff_base_ms: u64,
    /// Longest wait before restarting a crashed instance.
    #[serde(default = "default_backoff_max_ms")]
    pub restart_backoff_max_ms: u64,
    /// An instance that ran this long counts as healthy: its restart count and backoff reset.
    #[serde(default = "default_reset_after_ms")]
    pub restart_reset_after_ms: u64,
    /// Consecutive restarts after which a crashing instance is left in `error`.
    #[serde(default = "default_restart_limit")]
    pub restart_limit: u32,
    /// First wait before retrying a pass that failed (a runtime not on the bus, a refused load
    /// or start); it doubles up to the max.
    #[serde(default = "default_backoff_base_ms")]
    pub retry_base_ms: u64,
    /// Longest wait between such retries.
    #[serde(default = "default_backoff_max_ms")]
    pub retry_max_ms: u64,
    /// HTTP proxy host for module downloads; `EVP_HTTP_PROXY_HOST` wins when set.
    #[serde(default)]
    pub http_proxy_host: Option<String>,
    /// HTTP proxy port; `EVP_HTTP_PROXY_PORT` wins when set.
    #[serde(default)]
    pub http_proxy_port: Option<u16>,
    /// HTTP proxy Basic-auth user; `EVP_HTTP_PROXY_USERNAME` wins when set.
    #[serde(default)]
    pub http_proxy_username: Option<String>,
    /// HTTP proxy Basic-auth password; `EVP_HTTP_PROXY_PASSWORD` wins when set.
    #[serde(default)]
    pub http_proxy_password: Option<String>,
    /// An extra CA trusted for HTTPS downloads; `EVP_TLS_CA_CERT`, then `EVP_HTTPS_CA_CERT`,
    /// win when set.
    #[serde(default)]
    pub https_ca_cert: Option<PathBuf>,
    /// The directories a hub's `file://` module URLs may name (absolute; the file must be a
    /// regular file really inside one, symlinks resolved). None by default: a hub cannot make
    /// the device read a local file unless the operator said where modules may be side-loaded.
    #[serde(default)]
    pub file_url_dirs: Vec<PathBuf>,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        // An empty table gets every default, exactly as agent.toml without the section.
        serde_json::from_value(serde_json::json!({}))
            .unwrap_or_else(|_| unreachable!("every key has a default"))
    }
}

fn default_stop_grace_ms() -> u32 {
    10_000
}
fn default_wasm_stop_grace_ms() -> u32 {
    5_000
}
fn default_max_concurrent_downloads() -> usize {
    4
}
/// Retries and restarts start at 1 s, as EVP's own retry tick.
fn default_backoff_base_ms() -> u64 {
    1_000
}
/// Failures on a gateway are mostly links and peers coming back; a minute keeps the device
/// responsive without hammering a server.
fn default_backoff_max_ms() -> u64 {
    60_000
}
fn default_read_timeout_ms() -> u64 {
    60_000
}
fn default_reset_after_ms() -> u64 {
    60_000
}
fn default_restart_limit() -> u32 {
    5
}

/// Why the `[reconciler]` section and the environment do not make a usable configuration.
pub use evp_daemon::http::SettingsError as ConfigError;

impl ReconcilerConfig {
    /// How downloads are made, with the environment (`lookup`, empty meaning unset) winning
    /// over the section.
    pub fn download_config(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<DownloadConfig, ConfigError> {
        let (proxy, ca_cert) = evp_daemon::http::HttpSettings {
            http_proxy_host: self.http_proxy_host.clone(),
            http_proxy_port: self.http_proxy_port,
            http_proxy_username: self.http_proxy_username.clone(),
            http_proxy_password: self.http_proxy_password.clone(),
            https_ca_cert: self.https_ca_cert.clone(),
        }
        .resolve(lookup)?;
        Ok(DownloadConfig {
            max_concurrent: self.max_concurrent_downloads.max(1),
            read_timeout: Duration::from_millis(self.download_read_timeout_ms),
            proxy,
            ca_cert,
            retry_base: Duration::from_millis(self.download_retry_base_ms),
            retry_max: Duration::from_millis(self.download_retry_max_ms),
            file_url_dirs: self.file_url_dirs.clone(),
        })
    }

    /// The reconcile loop's settings.
    pub fn settings(&self) -> Settings {
        Settings {
            stop_grace_ms: self.stop_grace_ms,
            wasm_stop_grace_ms: self.wasm_stop_grace_ms,
            restart: RestartConfig {
                base: Duration::from_millis(self.restart_backoff_base_ms),
                max: Duration::from_millis(self.restart_backoff_max_ms),
                reset_after: Duration::from_millis(self.restart_reset_after_ms),
                limit: self.restart_limit,
            },
            retry_base: Duration::from_millis(self.retry_base_ms),
            retry_max: Duration::from_millis(self.retry_max_ms),
        }
    }
}

/// The `org.evp.Reconciler1` object.
pub struct ReconcilerService {
    store: DesiredStore,
    desired_tx: watch::Sender<Desired>,
    status: SharedStatus,
}

impl ReconcilerService {
    fn status(&self) -> DeploymentStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[interface(name = "org.evp.Reconciler1")]
impl ReconcilerService {
    /// Validates and persists the deployment, answers, then reconciles in the background.
    async fn apply_deployment(&self, deployment_json: &str) -> Result<(), EvpError> {
        let deployment = Deployment::from_json(deployment_json)
            .map_err(|e| EvpError::InvalidManifest(e.to_string()))?;
        if let Err(e) = self.store.save(&deployment) {
            let unsaved = store::Unusable::unsaved(&deployment, &e);
            error!("{}", unsaved.message);
            let message = unsaved.message.clone();
            // Reported (hubd passes the status on) while hubd tries again; what runs is kept.
            self.desired_tx.send_modify(|d| d.unusable = Some(unsaved));
            return Err(EvpError::Io(message));
        }
        info!(
            deployment_id = deployment.deployment_id.as_deref().unwrap_or("-"),
            instances = deployment.instance_specs.len(),
            "deployment accepted"
        );
        self.desired_tx.send_modify(|d| {
            d.deployment = Some(deployment);
            d.unusable = None;
        });
        Ok(())
    }

    /// Holds deployment changes until resumed.
    async fn pause_deployment(&self) {
        self.desired_tx.send_modify(|d| d.paused = true);
    }

    /// Resumes deployment changes.
    async fn resume_deployment(&self) {
        self.desired_tx.send_modify(|d| d.paused = false);
    }

    /// The canonical status JSON.
    #[zbus(property)]
    async fn deployment_status(&self) -> String {
        self.status().to_json()
    }

    /// `applying`, `ok`, `error` or `paused`; empty before any deployment.
    #[zbus(property)]
    async fn reconcile_status(&self) -> String {
        self.status()
            .reconcile_status
            .map(ReconcileStatus::as_str)
            .unwrap_or_default()
            .to_owned()
    }
}

/// Runs reconcilerd until SIGTERM.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let config = AgentConfig::load(&args)?;
    let section: ReconcilerConfig = config.section("reconciler")?;
    let store = DesiredStore::new(config.data_subdir("deployment")?);
    let modules_dir = config.common.data_dir.join("modules");
    create_shared_dir(&modules_dir)?;
    let download_config = section.download_config(evp_daemon::env_nonempty)?;
    let downloader = Downloader::new(ModuleCache::new(modules_dir), &download_config)?;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let sink_tx = events_tx.clone();
    let sink: EventSink = Arc::new(move |ev| {
        let _ = sink_tx.send(Event::Download(ev));
    });
    let downloads = Downloads::new(downloader, &download_config, sink);

    let (initial, unusable) = match store.load() {
        Ok(d) => (d, None),
        Err(u) => (None, Some(u)),
    };
    if let Some(d) = &initial {
        info!(
            deployment_id = d.deployment_id.as_deref().unwrap_or("-"),
            "resuming the last desired deployment from disk"
        );
    }
    let (desired_tx, desired_rx) = watch::channel(Desired {
        deployment: initial,
        paused: false,
        unusable,
    });
    let status: SharedStatus = Arc::new(Mutex::new(DeploymentStatus::default()));
    let service = ReconcilerService {
        store,
        desired_tx,
        status: status.clone(),
    };
    let conn = evp_daemon::connect_named(
        evp_daemon::bus_builder(&args)?.serve_at(RECONCILER_PATH, service),
        RECONCILER_NAME,
        true,
    )
    .await?;
    let iface = conn
        .object_server()
        .interface::<_, ReconcilerService>(RECONCILER_PATH)
        .await
        .context("looking up our own object")?;
    let (changed_tx, mut changed_rx) = watch::channel(());
    let changed: StatusChanged = Arc::new(move || {
        let _ = changed_tx.send(());
    });
    // PropertiesChanged is emitted from one task, coalescing bursts of updates.
    tokio::spawn(async move {
        while changed_rx.changed().await.is_ok() {
            let this = iface.get().await;
            let emitter = iface.signal_emitter();
            if let Err(e) = this.deployment_status_changed(emitter).await {
                error!("emitting DeploymentStatus change: {e}");
            }
            if let Err(e) = this.reconcile_status_changed(emitter).await {
                error!("emitting ReconcileStatus change: {e}");
            }
        }
    });
    reconcile::follow_runtimes(&conn, events_tx).await;
    let sdk = evp_schemas::dbus::SdkBroker1Proxy::new(&conn)
        .await
        .context("making the sdk-broker proxy")?;
    let reconciler = Reconciler::new(
        conn.clone(),
        sdk,
        downloads,
        events_rx,
        status,
        changed,
        section.settings(),
    );
    tokio::spawn(reconciler.run(desired_rx));
    info!("serving {RECONCILER_NAME}");
    evp_daemon::notify_ready(&conn, RECONCILER_NAME);
    evp_daemon::wait_for_shutdown().await
}

/// The module cache is read by the runtimes through its group (set-group-id, so files inherit
/// it); nobody else may look in. On a device tmpfiles.d makes it, and an existing one is left
/// as it is: the unit's `RestrictSUIDSGID=yes` refuses (EPERM) a mkdir with the set-group-id
/// bit even where the directory exists.
fn create_shared_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o2750)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::download::ProxyConfig;

    #[test]
    fn the_packaged_agent_toml_shows_every_reconciler_setting_and_they_parse() {
        use evp_daemon::conffile::{PACKAGED, fields_of, shown_keys, uncommented};
        assert_eq!(
            shown_keys(PACKAGED, "reconciler"),
            fields_of::<ReconcilerConfig>()
        );
        let all = evp_daemon::AgentConfig::parse(&uncommented(PACKAGED)).unwrap();
        let section: ReconcilerConfig = all.section("reconciler").unwrap();
        assert_eq!(section.stop_grace_ms, 10_000);
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, v)| *n == k && !v.is_empty())
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = ReconcilerConfig::default();
        assert_eq!(c.max_concurrent_downloads, 4);
        assert_eq!(c.restart_limit, 5);
        let s = c.settings();
        assert_eq!(s.restart, RestartConfig::default());
        assert_eq!(s.retry_base, Duration::from_secs(1));
        let d = c.download_config(env(&[])).unwrap();
        assert_eq!(d.retry_base, Duration::from_secs(1));
        assert_eq!(d.retry_max, Duration::from_secs(60));
        assert_eq!(d.proxy, None);
        assert_eq!(d.ca_cert, None);
    }

    #[test]
    fn the_environment_wins_over_the_section() {
        let c: ReconcilerConfig = serde_json::from_value(serde_json::json!({
            "http_proxy_host": "toml-proxy",
            "http_proxy_port": 3128,
            "http_proxy_username": "toml-user",
            "https_ca_cert": "/toml/ca.pem",
        }))
        .unwrap();
        let d = c.download_config(env(&[])).unwrap();
        assert_eq!(d.proxy.as_ref().unwrap().host, "toml-proxy");
        assert_eq!(d.proxy.as_ref().unwrap().port, 3128);
        assert_eq!(d.ca_cert, Some(PathBuf::from("/toml/ca.pem")));
        let vars = [
            ("EVP_HTTP_PROXY_HOST", "env-proxy"),
            ("EVP_HTTP_PROXY_PORT", "8080"),
            ("EVP_HTTP_PROXY_USERNAME", ""),
            ("EVP_HTTP_PROXY_PASSWORD", "secret"),
            ("EVP_HTTPS_CA_CERT", "/env/https.pem"),
        ];
        let d = c.download_config(env(&vars)).unwrap();
        assert_eq!(
            d.proxy,
            Some(ProxyConfig {
                host: "env-proxy".into(),
                port: 8080,
                // Empty means unset, so the section's user stays.
                username: Some("toml-user".into()),
                password: Some("secret".into()),
            })
        );
        assert_eq!(d.ca_cert, Some(PathBuf::from("/env/https.pem")));
        let with_tls = [
            ("EVP_TLS_CA_CERT", "/env/tls.pem"),
            ("EVP_HTTPS_CA_CERT", "/x"),
        ];
        let d = c.download_config(env(&with_tls)).unwrap();
        assert_eq!(d.ca_cert, Some(PathBuf::from("/env/tls.pem")));
    }

    #[test]
    fn a_proxy_needs_a_valid_port() {
        let c = ReconcilerConfig::default();
        let e = c
            .download_config(env(&[("EVP_HTTP_PROXY_HOST", "p")]))
            .unwrap_err();
        assert!(matches!(e, ConfigError::ProxyPortMissing { .. }));
        let e = c
            .download_config(env(&[
                ("EVP_HTTP_PROXY_HOST", "p"),
                ("EVP_HTTP_PROXY_PORT", "http"),
            ]))
            .unwrap_err();
        assert!(matches!(e, ConfigError::ProxyPortInvalid(_)));
    }

    #[test]
    fn a_proxy_and_a_ca_file_make_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::new(dir.path().to_owned());
        let proxied = DownloadConfig {
            proxy: Some(ProxyConfig {
                host: "127.0.0.1".into(),
                port: 3128,
                username: Some("u".into()),
                password: None,
            }),
            ..Default::default()
        };
        assert!(Downloader::new(cache.clone(), &proxied).is_ok());
        let garbage = dir.path().join("ca.pem");
        std::fs::write(&garbage, b"not a certificate").unwrap();
        let with_ca = DownloadConfig {
            ca_cert: Some(garbage),
            ..Default::default()
        };
        assert!(matches!(
            Downloader::new(cache.clone(), &with_ca),
            Err(crate::download::ClientError::CaParse(_))
        ));
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        for (name, bytes) in [
            ("ca.pem", ca.cert.pem().into_bytes()),
            ("ca.der", ca.cert.der().to_vec()),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let good = DownloadConfig {
                ca_cert: Some(path),
                ..Default::default()
            };
            assert!(Downloader::new(cache.clone(), &good).is_ok(), "{name}");
        }
        let missing = DownloadConfig {
            ca_cert: Some(dir.path().join("nope.pem")),
            ..Default::default()
        };
        assert!(matches!(
            Downloader::new(cache, &missing),
            Err(crate::download::ClientError::CaRead { .. })
        ));
    }
}
