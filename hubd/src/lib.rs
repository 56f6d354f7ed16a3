//! evp-agent hubd: the only MQTT connection to the hub. It speaks EVP2-TB or EVP1, hands the hub's
//! deployments to reconcilerd and its configurations to sdk-broker, reports reconcilerd's
//! status back, and serves `org.evp.Hub1`.
//!
//! - [`config`]: the `[hub]` settings and EVP's environment variables.
//! - [`tls`]: MQTT over TLS; [`rotation`]: renewed TLS files used without a restart.
//! - [`session`], [`timing`] and [`failover`]: the pure state machines of the session, of
//!   report timing and of the reconnect schedule across brokers.
//! - [`device_config`] and [`report`]: the hub's device configuration and the status report.
//! - [`rpc`] and [`telemetry`]: direct commands and their answers, telemetry messages.
//! - [`spool`] and [`outbox`]: what must reach the hub, kept on disk until acknowledged, and
//!   the publishes paired with their PUBACKs.
//! - [`storage`]: storage tokens for modules' EVP_EXT uploads, and those kept for offline use.
//! - [`provision`]: ThingsBoard device provisioning, for a device without credentials.
//! - [`core`]: the MQTT session loop, independent of D-Bus.
//! - [`bus`]: `org.evp.Hub1` and the D-Bus links to reconcilerd and sdk-broker.

pub mod bus;
pub mod config;
pub mod core;
pub mod device_config;
pub mod failover;
pub mod identity;
pub mod outbox;
pub mod provision;
pub mod report;
pub mod rotation;
pub mod rpc;
pub mod session;
pub mod spool;
pub mod states;
pub mod storage;
pub mod telemetry;
pub mod timing;
pub mod tls;

use anyhow::{Context, Result};
use evp_daemon::{AgentConfig, DaemonArgs};
use evp_schemas::Protocol;
use evp_schemas::dbus::{HUB_NAME, HUB_PATH, HUB_TELEMETRY_NAME};
use tracing::{error, info, warn};

use crate::config::HubSection;
use crate::core::Links;
use crate::device_config::DeviceConfigStore;

/// Runs hubd until SIGTERM.
pub async fn run(args: DaemonArgs) -> Result<()> {
    // Only fails when a provider is already installed, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let agent = AgentConfig::load(&args)?;
    let section: HubSection = agent.section("hub")?;
    let mut cfg = config::resolve(section, evp_daemon::env_nonempty)?;
    let hub_dir = agent.data_subdir("hub")?;
    // The permanent id stands in for what is not configured (a TLS CN still wins for MQTT).
    let permanent = identity::load_or_create(&hub_dir)?;
    cfg.device_id.get_or_insert_with(|| permanent.clone());
    cfg.client_id.get_or_insert(permanent);
    info!(?cfg, "hub settings");
    let plan = provision::plan(&cfg, provision::store::load(&hub_dir)?);
    log_plan(&cfg, &plan);
    let tls = match &cfg.tls {
        Some(files) => {
            if cfg.tls_insecure_skip_verify {
                warn!(
                    "!!! tls_insecure_skip_verify is set: the MQTT broker's certificate is NOT \
                     verified; anyone on the path can impersonate the hub. Development only !!!"
                );
            }
            Some(tls::load(files, cfg.tls_insecure_skip_verify).context("MQTT TLS")?)
        }
        None => {
            if cfg.tls_insecure_skip_verify {
                warn!("tls_insecure_skip_verify is set but MQTT TLS is not configured");
            }
            warn!(
                "MQTT without TLS to {}:{}: set tls_ca_cert (EVP_TLS_CA_CERT) for TLS",
                cfg.mqtt_host, cfg.mqtt_port
            );
            None
        }
    };
    // Always set: the permanent id stands in for a configured one.
    let device_id = cfg.device_id.clone().unwrap_or_default();
    let store = DeviceConfigStore::new(hub_dir.clone());
    let device_config = match store.load() {
        // EVP1 has no device configuration: one kept from an EVP2 hub does not apply.
        Ok(Some(_)) if cfg.protocol == Protocol::Evp1 => {
            info!("EVP1: the device configuration kept from an EVP2 hub is not used");
            None
        }
        Ok(c) => c,
        Err(e) => {
            warn!("{e}; starting without the hub's device configuration");
            None
        }
    };

    let codec = cfg.protocol.codec();
    let (links, ends) = Links::new();
    let hub = bus::Hub1::new(
        codec.protocol_name(),
        device_id.clone(),
        bus::Hub1Links {
            connection: ends.connection.clone(),
            storage_tokens: ends.storage_tokens,
            registry_auth: ends.registry_auth,
            spool: ends.spool,
        },
    );
    let conn = evp_daemon::connect_named(
        evp_daemon::bus_builder(&args)?.serve_at(HUB_PATH, hub),
        HUB_NAME,
        true,
    )
    .await?;
    info!("serving {HUB_NAME}");
    evp_daemon::notify_ready(&conn, HUB_NAME);

    tokio::spawn(bus::apply_deployments(
        conn.clone(),
        ends.deployments,
        ends.outcomes,
    ));
    tokio::spawn(bus::deliver_configurations(
        conn.clone(),
        ends.configurations,
    ));
    tokio::spawn(bus::watch_status(conn.clone(), ends.status));
    // Telemetry has a connection of its own, so a slow MQTT link that makes it wait never
    // holds up the signals and calls on the main one; it has a name of its own so that
    // sdk-broker can send telemetry to it alone.
    let telemetry_conn = evp_daemon::bus_builder(&args)?
        .build()
        .await
        .context("connecting to D-Bus for telemetry")?;
    evp_daemon::exit_when_closed(&telemetry_conn, "hubd's telemetry");
    let subscribed = bus::telemetry_signals(&telemetry_conn)
        .await
        .context("subscribing to sdk-broker's Telemetry")?;
    telemetry_conn
        .request_name(HUB_TELEMETRY_NAME)
        .await
        .with_context(|| format!("taking {HUB_TELEMETRY_NAME} on D-Bus"))?;
    let sdk = bus::link_sdk_broker_subscribed(&conn, telemetry_conn, Some(subscribed));
    let follower = conn.clone();
    tokio::spawn(async move {
        if let Err(e) = bus::follow_connection(follower, ends.connection).await {
            error!("Hub1.Connection no longer follows the MQTT session: {e}");
        }
    });

    let shutdown = async {
        if let Err(e) = evp_daemon::wait_for_shutdown().await {
            error!("{e:#}; stopping");
        }
    };
    tokio::pin!(shutdown);
    match plan {
        provision::Plan::AsConfigured => {}
        provision::Plan::Stored(credentials) => credentials.apply(&mut cfg),
        provision::Plan::Provision(key) => {
            let obtained = provision::session::obtain(
                &cfg,
                tls.as_ref(),
                &key,
                &device_id,
                &hub_dir,
                &links.connection,
            );
            tokio::select! {
                credentials = obtained => credentials.apply(&mut cfg),
                _ = &mut shutdown => {
                    info!("stopped while provisioning");
                    return Ok(());
                }
            }
        }
    }
    let options = core::mqtt_options(&cfg, tls.as_ref());
    if let Some(material) = tls {
        // With the credentials provisioning may have set: a renewed set keeps them.
        tokio::spawn(rotation::watch(
            cfg.clone(),
            material.bytes,
            ends.credentials,
        ));
    }
    core::run_with_sdk(cfg, options, store, device_config, links, sdk, shutdown).await?;
    info!("stopped");
    Ok(())
}

/// Says where the MQTT credentials come from (never what they are).
fn log_plan(cfg: &config::HubConfig, plan: &provision::Plan) {
    let stored = provision::store::FILE;
    match plan {
        provision::Plan::AsConfigured if cfg.provision.is_some() => {
            info!("credentials are configured: provision_device_key is not used (nor any {stored})")
        }
        provision::Plan::AsConfigured => {}
        provision::Plan::Stored(c) => info!("connecting with the {c:?} credentials of {stored}"),
        provision::Plan::Provision(_) => {}
    }
}
