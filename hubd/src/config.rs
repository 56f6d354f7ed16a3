//! hubd's settings: the `[hub]` section of agent.toml, overridden by EVP's environment variables.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use evp_schemas::Protocol;
use serde::Deserialize;

/// Default minimum time between two status reports (EVP's `EVP_REPORT_STATUS_INTERVAL_MIN_SEC`
/// default, 3 s).
pub const DEFAULT_INTERVAL_MIN_MS: u64 = 3_000;
/// Default time after which an unchanged status report is sent again (EVP's default, 180 s).
pub const DEFAULT_INTERVAL_MAX_MS: i64 = 180_000;
/// Default QoS of the status report (EVP's `EVP_MQTT_MFS_QOS` default): the hub must get it.
pub const DEFAULT_STATUS_QOS: u8 = 1;
/// The shortest forced re-send accepted in agent.toml: more than ten identical reports a
/// second would only flood the broker, whatever a benchmark wants to measure.
pub const MIN_FORCED_INTERVAL_MS: i64 = 100;
/// Default MQTT keep-alive, seconds. EVP uses 400 s, so a dead link goes unnoticed for
/// up to 13 minutes; 60 s notices it within 2 minutes for one ping a minute.
pub const DEFAULT_KEEP_ALIVE_S: u64 = 60;
/// Smallest spool: room for two of the largest MQTT messages.
const MIN_SPOOL_BYTES: u64 = 2 * 131_072;

/// EVP's upper bound of both report intervals, seconds (one day).
const EVP_MAX_INTERVAL_S: i64 = 86_400;

/// The `[hub]` section of agent.toml as written; every key is optional there because the
/// environment may supply it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSection {
    /// The hub's dialect, `evp2` (the default) or `evp1`; `EVP_IOT_PLATFORM` wins.
    pub protocol: Option<Protocol>,
    /// Broker host name or address; also the TLS server name.
    pub mqtt_host: Option<String>,
    /// Broker port.
    pub mqtt_port: Option<u16>,
    /// MQTT client id, used when no TLS client certificate gives one.
    pub client_id: Option<String>,
    /// MQTT user name (ThingsBoard: the device token).
    pub username: Option<String>,
    /// MQTT password.
    pub password: Option<String>,
    /// The device's permanent id, shown on `Hub1.DeviceId`.
    pub device_id: Option<String>,
    /// CA certificate (PEM or DER) that signs the broker's certificate.
    pub tls_ca_cert: Option<PathBuf>,
    /// Client certificate (PEM or DER) for mutual TLS.
    pub tls_client_cert: Option<PathBuf>,
    /// Client private key (PEM, or PKCS#8 DER) for mutual TLS.
    pub tls_client_key: Option<PathBuf>,
    /// Development only: accept any broker certificate.
    pub tls_insecure_skip_verify: Option<bool>,
    /// Minimum time between two status reports, ms (0 allowed, for benchmarks).
    pub report_status_interval_min_ms: Option<u64>,
    /// Time after which an unchanged status report is sent again, ms; -1 for never.
    pub report_status_interval_max_ms: Option<i64>,
    /// QoS of the status report (0, 1 or 2).
    pub mqtt_qos_status: Option<u8>,
    /// MQTT keep-alive, seconds: a link that stops carrying packets is noticed within twice
    /// this (a PINGREQ goes out every keep-alive; one still unanswered at the next ends the
    /// connection).
    pub mqtt_keep_alive_s: Option<u64>,
    /// Bytes the spool may hold on disk while the hub is away.
    pub spool_max_bytes: Option<u64>,
    /// Bytes of one instance's telemetry the spool may hold.
    pub spool_instance_max_bytes: Option<u64>,
    /// Longest time a spooled record waiting for the hub stays unsynced, ms.
    pub spool_sync_ms: Option<u64>,
    /// HTTP proxy the MQTT connection tunnels through (CONNECT), host name or address.
    pub mqtt_proxy_host: Option<String>,
    /// Its port.
    pub mqtt_proxy_port: Option<u16>,
    /// Basic-auth user for the proxy.
    pub mqtt_proxy_username: Option<String>,
    /// Basic-auth password for the proxy.
    pub mqtt_proxy_password: Option<String>,
    /// More brokers of the same hub, `"host:port"` each, tried in turn after
    /// `mqtt_host`:`mqtt_port` when it cannot be reached.
    pub mqtt_failover_brokers: Option<Vec<String>>,
    /// ThingsBoard device provisioning key (of the device profile): with the secret, a device
    /// without credentials registers itself.
    pub provision_device_key: Option<String>,
    /// ThingsBoard device provisioning secret.
    pub provision_device_secret: Option<String>,
}

/// A ThingsBoard device profile's provisioning key and secret; the secret never shows in
/// `Debug`, so it is never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct ProvisionKey {
    /// `provisionDeviceKey`.
    pub key: String,
    /// `provisionDeviceSecret`.
    pub secret: String,
}

impl fmt::Debug for ProvisionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvisionKey")
            .field("key", &self.key)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// TLS material to use for MQTT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that verifies the broker.
    pub ca_cert: PathBuf,
    /// Client certificate and key, for mutual TLS; `None` for server-authenticated TLS only.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// One broker address: what a connection attempt dials, and the name its TLS certificate must
/// carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Broker {
    /// `host:port` (`[v6 address]:port` for an IPv6 address); `what` names the setting in the
    /// error.
    pub fn parse(what: &str, text: &str) -> Result<Broker, ConfigError> {
        let bad = |why: &str| invalid(what, format!("{text:?} {why}"));
        let (host, port) = text
            .trim()
            .rsplit_once(':')
            .ok_or_else(|| bad("is not host:port"))?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6
                .strip_suffix(']')
                .ok_or_else(|| bad("opens a [ it does not close"))?,
            None if host.contains(':') => {
                return Err(bad("needs brackets around its IPv6 address: [addr]:port"));
            }
            None => host,
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let port: u16 = port
            .parse()
            .map_err(|e| bad(&format!("has no valid port: {e}")))?;
        if port == 0 {
            return Err(bad("has port 0"));
        }
        Ok(Broker {
            host: host.to_owned(),
            port,
        })
    }
}

/// The HTTP CONNECT proxy the MQTT connection goes through.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttProxy {
    /// Where the proxy listens.
    pub address: Broker,
    /// Basic-auth user and password, when the proxy wants them.
    pub basic_auth: Option<(String, String)>,
}

impl fmt::Debug for MqttProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttProxy")
            .field("address", &self.address.to_string())
            .field(
                "basic_auth",
                &self
                    .basic_auth
                    .as_ref()
                    .map(|(user, _)| (user, "[redacted]")),
            )
            .finish()
    }
}

/// The report intervals before any device configuration from the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intervals {
    /// Minimum time between two reports.
    pub min: Duration,
    /// Time after which an unchanged report is sent again; `None`: never.
    pub max: Option<Duration>,
}

/// hubd's validated settings.
#[derive(Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// The hub's dialect.
    pub protocol: Protocol,
    /// Broker host.
    pub mqtt_host: String,
    /// Broker port.
    pub mqtt_port: u16,
    /// Configured client id (the TLS client certificate's CN wins over it).
    pub client_id: Option<String>,
    /// MQTT user name.
    pub username: Option<String>,
    /// MQTT password.
    pub password: Option<String>,
    /// Configured device id.
    pub device_id: Option<String>,
    /// TLS, when configured.
    pub tls: Option<TlsFiles>,
    /// Accept any broker certificate (development only).
    pub tls_insecure_skip_verify: bool,
    /// Report intervals from agent.toml or the environment.
    pub intervals: Intervals,
    /// QoS of the status report.
    pub status_qos: u8,
    /// `EVP_CONFIGURATION_ID`, echoed until the hub sets its own.
    pub configuration_id: Option<String>,
    /// `EVP_REGISTRY_AUTH`: registry → credentials, until the hub sets its own.
    pub registry_auth: Option<BTreeMap<String, String>>,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// The spool's bounds and sync policy.
    pub spool: crate::spool::Limits,
    /// The HTTP proxy MQTT goes through, when configured.
    pub proxy: Option<MqttProxy>,
    /// Brokers tried in turn after `mqtt_host`:`mqtt_port`.
    pub failover_brokers: Vec<Broker>,
    /// Device provisioning, used only while the device has no credentials.
    pub provision: Option<ProvisionKey>,
}

impl HubConfig {
    /// Every broker, in the order they are tried: the configured host first.
    pub fn brokers(&self) -> Vec<Broker> {
        std::iter::once(self.first_broker())
            .chain(self.failover_brokers.iter().cloned())
            .collect()
    }

    /// The broker of `mqtt_host` and `mqtt_port`, dialled first.
    pub fn first_broker(&self) -> Broker {
        Broker {
            host: self.mqtt_host.clone(),
            port: self.mqtt_port,
        }
    }
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("protocol", &self.protocol)
            .field("mqtt_host", &self.mqtt_host)
            .field("mqtt_port", &self.mqtt_port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("device_id", &self.device_id)
            .field("tls", &self.tls)
            .field("tls_insecure_skip_verify", &self.tls_insecure_skip_verify)
            .field("intervals", &self.intervals)
            .field("status_qos", &self.status_qos)
            .field("configuration_id", &self.configuration_id)
            .field(
                "registry_auth",
                &self
                    .registry_auth
                    .as_ref()
                    .map(|m| m.keys().collect::<Vec<_>>()),
            )
            .field("keep_alive", &self.keep_alive)
            .field("spool", &self.spool)
            .field("proxy", &self.proxy)
            .field(
                "failover_brokers",
                &self
                    .failover_brokers
                    .iter()
                    .map(Broker::to_string)
                    .collect::<Vec<_>>(),
            )
            .field("provision", &self.provision)
            .finish()
    }
}

/// Why the settings cannot be used; found at start-up, before anything connects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A required setting is missing from both places.
    #[error(
        "no MQTT broker {what}: set `{key}` in the [hub] section of agent.toml or the environment variable {env}"
    )]
    Missing {
        /// What is missing, in words.
        what: &'static str,
        /// The agent.toml key.
        key: &'static str,
        /// The environment variable.
        env: &'static str,
    },
    /// A value does not parse or is out of range.
    #[error("{source_name}: {message}")]
    Invalid {
        /// The key or variable at fault.
        source_name: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(source_name: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        source_name: source_name.into(),
        message: message.into(),
    }
}

fn parse_env<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e| invalid(name, format!("{value:?} is not valid: {e}")))
}

/// Resolves the settings: `section` from agent.toml, then every EVP variable that `env` gives
/// (non-empty values only) on top, then validation. Pure: `env` is the only input from outside.
pub fn resolve(
    section: HubSection,
    env: impl Fn(&str) -> Option<String>,
) -> Result<HubConfig, ConfigError> {
    let env = |name: &str| env(name).filter(|v| !v.is_empty());
    let protocol = env("EVP_IOT_PLATFORM")
        .map(|p| Protocol::from_iot_platform(&p))
        .or(section.protocol)
        .unwrap_or_default();
    let proxy = resolve_proxy(&section, &env)?;
    let mqtt_host = env("EVP_MQTT_HOST")
        .or(section.mqtt_host)
        .filter(|h| !h.is_empty())
        .ok_or(ConfigError::Missing {
            what: "host",
            key: "mqtt_host",
            env: "EVP_MQTT_HOST",
        })?;
    let mqtt_port = match env("EVP_MQTT_PORT") {
        Some(p) => Some(parse_env::<u16>("EVP_MQTT_PORT", &p)?),
        None => section.mqtt_port,
    }
    .ok_or(ConfigError::Missing {
        what: "port",
        key: "mqtt_port",
        env: "EVP_MQTT_PORT",
    })?;
    if mqtt_port == 0 {
        return Err(invalid("mqtt_port", "0 is not a port"));
    }
    let client_id = env("EVP_MQTT_CLIENTID").or(section.client_id);
    let username = env("EVP_MQTT_USERNAME").or(section.username);
    let password = env("EVP_MQTT_PASSWORD").or(section.password);
    let device_id = env("EVP_MQTT_DEVICE_ID").or(section.device_id);
    // Either one is Hub1.DeviceId on the bus, which cannot carry a NUL (TOML can: "\u0000").
    for (key, value) in [("device_id", &device_id), ("client_id", &client_id)] {
        if let Some(v) = value {
            evp_schemas::bus_string::check_bus_string(key, v)
                .map_err(|e| invalid(key, e.to_string()))?;
        }
    }

    // EVP_TLS_CA_CERT serves MQTT and HTTPS and takes precedence over the MQTT-only one.
    let ca = env("EVP_TLS_CA_CERT")
        .or_else(|| env("EVP_MQTT_TLS_CA_CERT"))
        .map(PathBuf::from)
        .or(section.tls_ca_cert);
    let cert = env("EVP_MQTT_TLS_CLIENT_CERT")
        .map(PathBuf::from)
        .or(section.tls_client_cert);
    let key = env("EVP_MQTT_TLS_CLIENT_KEY")
        .map(PathBuf::from)
        .or(section.tls_client_key);
    let tls = match (ca, cert, key) {
        (None, None, None) => None,
        (Some(ca_cert), None, None) => Some(TlsFiles {
            ca_cert,
            client: None,
        }),
        (Some(ca_cert), Some(c), Some(k)) => Some(TlsFiles {
            ca_cert,
            client: Some((c, k)),
        }),
        (_, Some(_), None) => {
            return Err(invalid(
                "tls_client_cert (EVP_MQTT_TLS_CLIENT_CERT)",
                "is set without tls_client_key (EVP_MQTT_TLS_CLIENT_KEY)",
            ));
        }
        (_, None, Some(_)) => {
            return Err(invalid(
                "tls_client_key (EVP_MQTT_TLS_CLIENT_KEY)",
                "is set without tls_client_cert (EVP_MQTT_TLS_CLIENT_CERT)",
            ));
        }
        (None, Some(_), Some(_)) => {
            return Err(invalid(
                "tls_ca_cert (EVP_TLS_CA_CERT or EVP_MQTT_TLS_CA_CERT)",
                "is required with a client certificate: the broker's certificate is verified",
            ));
        }
    };
    let tls_insecure_skip_verify = section.tls_insecure_skip_verify.unwrap_or(false);

    let min_ms = match env("EVP_REPORT_STATUS_INTERVAL_MIN_SEC") {
        Some(v) => {
            let s: i64 = parse_env("EVP_REPORT_STATUS_INTERVAL_MIN_SEC", &v)?;
            if !(1..=EVP_MAX_INTERVAL_S).contains(&s) {
                return Err(invalid(
                    "EVP_REPORT_STATUS_INTERVAL_MIN_SEC",
                    format!("{s} is outside 1..={EVP_MAX_INTERVAL_S}"),
                ));
            }
            s as u64 * 1000
        }
        None => section
            .report_status_interval_min_ms
            .unwrap_or(DEFAULT_INTERVAL_MIN_MS),
    };
    let max_ms = match env("EVP_REPORT_STATUS_INTERVAL_MAX_SEC") {
        Some(v) => {
            let s: i64 = parse_env("EVP_REPORT_STATUS_INTERVAL_MAX_SEC", &v)?;
            if s != -1 && !(1..=EVP_MAX_INTERVAL_S).contains(&s) {
                return Err(invalid(
                    "EVP_REPORT_STATUS_INTERVAL_MAX_SEC",
                    format!("{s} is neither -1 nor within 1..={EVP_MAX_INTERVAL_S}"),
                ));
            }
            if s == -1 { -1 } else { s * 1000 }
        }
        None => {
            let ms = section
                .report_status_interval_max_ms
                .unwrap_or(DEFAULT_INTERVAL_MAX_MS);
            if ms != -1 && ms < MIN_FORCED_INTERVAL_MS {
                return Err(invalid(
                    "report_status_interval_max_ms",
                    format!("{ms} is neither -1 (never) nor at least {MIN_FORCED_INTERVAL_MS}"),
                ));
            }
            ms
        }
    };
    let intervals = effective_intervals(Duration::from_millis(min_ms), max_ms);

    let status_qos = match env("EVP_MQTT_MFS_QOS") {
        Some(v) => parse_env::<u8>("EVP_MQTT_MFS_QOS", &v)?,
        None => section.mqtt_qos_status.unwrap_or(DEFAULT_STATUS_QOS),
    };
    if status_qos > 2 {
        return Err(invalid(
            "mqtt_qos_status (EVP_MQTT_MFS_QOS)",
            format!("{status_qos} is not an MQTT QoS (0, 1 or 2)"),
        ));
    }
    let configuration_id = env("EVP_CONFIGURATION_ID");
    let registry_auth = match env("EVP_REGISTRY_AUTH") {
        Some(v) => Some(
            serde_json::from_str::<BTreeMap<String, String>>(&v).map_err(|e| {
                invalid(
                    "EVP_REGISTRY_AUTH",
                    format!("must be a JSON object of strings: {e}"),
                )
            })?,
        ),
        None => None,
    };
    let keep_alive_s = section.mqtt_keep_alive_s.unwrap_or(DEFAULT_KEEP_ALIVE_S);
    if !(1..=u64::from(u16::MAX)).contains(&keep_alive_s) {
        return Err(invalid(
            "mqtt_keep_alive_s",
            format!("{keep_alive_s} is outside 1..=65535 (MQTT's two-byte keep-alive)"),
        ));
    }
    let defaults = crate::spool::Limits::default();
    let spool = crate::spool::Limits {
        max_bytes: section.spool_max_bytes.unwrap_or(defaults.max_bytes),
        instance_max_bytes: section
            .spool_instance_max_bytes
            .unwrap_or(defaults.instance_max_bytes),
        sync_every: section
            .spool_sync_ms
            .map_or(defaults.sync_every, Duration::from_millis),
    };
    if spool.max_bytes < MIN_SPOOL_BYTES {
        return Err(invalid(
            "spool_max_bytes",
            format!(
                "{} is below {MIN_SPOOL_BYTES} (two MQTT messages)",
                spool.max_bytes
            ),
        ));
    }
    let failover_brokers = section
        .mqtt_failover_brokers
        .iter()
        .flatten()
        .map(|b| Broker::parse("mqtt_failover_brokers", b))
        .collect::<Result<Vec<_>, _>>()?;
    const KEY: &str = "provision_device_key (EVP_PROVISION_DEVICE_KEY)";
    const SECRET: &str = "provision_device_secret (EVP_PROVISION_DEVICE_SECRET)";
    let provision = match (
        env("EVP_PROVISION_DEVICE_KEY").or(section.provision_device_key),
        env("EVP_PROVISION_DEVICE_SECRET").or(section.provision_device_secret),
    ) {
        (None, None) => None,
        (Some(key), _) if key.is_empty() => return Err(invalid(KEY, "is empty")),
        (_, Some(secret)) if secret.is_empty() => return Err(invalid(SECRET, "is empty")),
        (Some(key), Some(secret)) => Some(ProvisionKey { key, secret }),
        (Some(_), None) => return Err(invalid(KEY, format!("is set without {SECRET}"))),
        (None, Some(_)) => return Err(invalid(SECRET, format!("is set without {KEY}"))),
    };
    if proxy.is_some()
        && let Some(v6) = std::iter::once(mqtt_host.as_str())
            .chain(failover_brokers.iter().map(|b| b.host.as_str()))
            .find(|h| h.contains(':'))
    {
        // rumqttc's CONNECT line would read `CONNECT ::1:8883`, which no proxy parses.
        return Err(invalid(
            "mqtt_proxy_host (EVP_MQTT_PROXY_HOST)",
            format!("cannot reach the broker at the IPv6 address {v6} (name it instead)"),
        ));
    }
    Ok(HubConfig {
        protocol,
        mqtt_host,
        mqtt_port,
        client_id,
        username,
        password,
        device_id,
        tls,
        tls_insecure_skip_verify,
        intervals,
        status_qos,
        configuration_id,
        registry_auth,
        keep_alive: Duration::from_secs(keep_alive_s),
        spool,
        proxy,
        failover_brokers,
        provision,
    })
}

/// The MQTT proxy (EVP's rule: used when both host and port are set, Basic auth when both user
/// and password are), except that half a setting is an error here rather than ignored.
fn resolve_proxy(
    section: &HubSection,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<MqttProxy>, ConfigError> {
    let host = env("EVP_MQTT_PROXY_HOST").or_else(|| section.mqtt_proxy_host.clone());
    let port = match env("EVP_MQTT_PROXY_PORT") {
        Some(p) => Some(parse_env::<u16>("EVP_MQTT_PROXY_PORT", &p)?),
        None => section.mqtt_proxy_port,
    };
    let username = env("EVP_MQTT_PROXY_USERNAME").or_else(|| section.mqtt_proxy_username.clone());
    let password = env("EVP_MQTT_PROXY_PASSWORD").or_else(|| section.mqtt_proxy_password.clone());
    let basic_auth = match (username, password) {
        (Some(user), Some(password)) => Some((user, password)),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            return Err(invalid(
                "mqtt_proxy_username, mqtt_proxy_password (EVP_MQTT_PROXY_USERNAME, \
                 EVP_MQTT_PROXY_PASSWORD)",
                "are set one without the other: Basic auth needs both",
            ));
        }
    };
    match (host.filter(|h| !h.trim().is_empty()), port) {
        (Some(host), Some(port)) if port != 0 => Ok(Some(MqttProxy {
            address: Broker { host, port },
            basic_auth,
        })),
        (Some(_), Some(_)) => Err(invalid(
            "mqtt_proxy_port (EVP_MQTT_PROXY_PORT)",
            "0 is not a port",
        )),
        (Some(host), None) => Err(invalid(
            "mqtt_proxy_port (EVP_MQTT_PROXY_PORT)",
            format!("is required with the MQTT proxy host {host:?}"),
        )),
        (None, Some(_)) => Err(invalid(
            "mqtt_proxy_host (EVP_MQTT_PROXY_HOST)",
            "is required with the MQTT proxy port",
        )),
        (None, None) if basic_auth.is_some() => Err(invalid(
            "mqtt_proxy_username (EVP_MQTT_PROXY_USERNAME)",
            "is set without an MQTT proxy host and port",
        )),
        (None, None) => Ok(None),
    }
}

/// The intervals from a minimum and a maximum in ms (-1: never), with EVP's rule that a
/// maximum below the minimum becomes the minimum.
pub fn effective_intervals(min: Duration, max_ms: i64) -> Intervals {
    let max = u64::try_from(max_ms)
        .ok()
        .map(|ms| Duration::from_millis(ms).max(min));
    Intervals { min, max }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_packaged_agent_toml_shows_every_hub_setting_and_they_parse() {
        use evp_daemon::conffile::{PACKAGED, fields_of, shown_keys, uncommented};
        assert_eq!(shown_keys(PACKAGED, "hub"), fields_of::<HubSection>());
        let all = evp_daemon::AgentConfig::parse(&uncommented(PACKAGED)).unwrap();
        let section: HubSection = all.section("hub").unwrap();
        let resolved = resolve(section, |_| None).unwrap();
        assert_eq!(resolved.mqtt_port, 8883);
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn section(toml_text: &str) -> HubSection {
        evp_daemon::AgentConfig::parse(toml_text)
            .unwrap()
            .section("hub")
            .unwrap()
    }

    #[test]
    fn toml_only_with_defaults() {
        let c = resolve(
            section("[hub]\nmqtt_host = \"h\"\nmqtt_port = 1883\n"),
            env_of(&[]),
        )
        .unwrap();
        assert_eq!(c.mqtt_host, "h");
        assert_eq!(c.mqtt_port, 1883);
        assert_eq!(c.intervals.min, Duration::from_secs(3));
        assert_eq!(c.intervals.max, Some(Duration::from_secs(180)));
        assert_eq!(c.status_qos, 1);
        assert!(c.tls.is_none());
        assert!(!c.tls_insecure_skip_verify);
    }

    #[test]
    fn environment_overrides_toml_and_empty_means_unset() {
        let s = section(
            "[hub]\nmqtt_host = \"h\"\nmqtt_port = 1883\nclient_id = \"t\"\nusername = \"tu\"\nreport_status_interval_min_ms = 0\n",
        );
        let c = resolve(
            s,
            env_of(&[
                ("EVP_MQTT_HOST", "e"),
                ("EVP_MQTT_PORT", "8883"),
                ("EVP_MQTT_CLIENTID", ""),
                ("EVP_MQTT_USERNAME", "eu"),
                ("EVP_MQTT_PASSWORD", "pw"),
                ("EVP_MQTT_DEVICE_ID", "dev"),
                ("EVP_MQTT_MFS_QOS", "0"),
                ("EVP_REPORT_STATUS_INTERVAL_MAX_SEC", "-1"),
                ("EVP_CONFIGURATION_ID", "cfg"),
                ("EVP_REGISTRY_AUTH", r#"{"ghcr.io":"x"}"#),
                ("EVP_IOT_PLATFORM", "TB"),
            ]),
        )
        .unwrap();
        assert_eq!((c.mqtt_host.as_str(), c.mqtt_port), ("e", 8883));
        assert_eq!(c.client_id.as_deref(), Some("t"), "empty env keeps toml");
        assert_eq!(c.username.as_deref(), Some("eu"));
        assert_eq!(c.password.as_deref(), Some("pw"));
        assert_eq!(c.device_id.as_deref(), Some("dev"));
        assert_eq!(c.status_qos, 0);
        assert_eq!(c.intervals.min, Duration::ZERO);
        assert_eq!(c.intervals.max, None);
        assert_eq!(c.configuration_id.as_deref(), Some("cfg"));
        assert_eq!(c.registry_auth.unwrap()["ghcr.io"], "x");
        assert!(
            !format!(
                "{:?}",
                resolve(
                    section("[hub]\nmqtt_host=\"h\"\nmqtt_port=1\npassword=\"secret\"\n"),
                    env_of(&[])
                )
                .unwrap()
            )
            .contains("secret")
        );
    }

    #[test]
    fn a_provisioning_key_needs_its_secret_and_the_secret_is_never_shown() {
        let base = "[hub]\nmqtt_host=\"h\"\nmqtt_port=1\n";
        let c = resolve(
            section(&format!(
                "{base}provision_device_key=\"k\"\nprovision_device_secret=\"toml-secret\"\n"
            )),
            env_of(&[("EVP_PROVISION_DEVICE_SECRET", "env-secret")]),
        )
        .unwrap();
        let key = c.provision.clone().unwrap();
        assert_eq!((key.key.as_str(), key.secret.as_str()), ("k", "env-secret"));
        let shown = format!("{c:?}");
        assert!(
            shown.contains("\"k\"") && !shown.contains("secret\""),
            "{shown}"
        );
        assert_eq!(resolve(section(base), env_of(&[])).unwrap().provision, None);
        for (extra, env, named) in [
            (
                "provision_device_key=\"k\"\n",
                vec![],
                "provision_device_key",
            ),
            (
                "",
                vec![("EVP_PROVISION_DEVICE_SECRET", "s")],
                "provision_device_secret",
            ),
            (
                "provision_device_key=\"\"\nprovision_device_secret=\"s\"\n",
                vec![],
                "provision_device_key",
            ),
        ] {
            let e = resolve(section(&format!("{base}{extra}")), env_of(&env)).unwrap_err();
            assert!(e.to_string().starts_with(named), "{e}");
            assert!(!e.to_string().contains("\"s\""), "{e}");
        }
    }

    #[test]
    fn a_device_id_with_a_nul_is_refused_by_name() {
        let e = resolve(
            section("[hub]\nmqtt_host = \"h\"\nmqtt_port = 1883\ndevice_id = \"d\\u0000\"\n"),
            env_of(&[]),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("device_id: "), "{e}");
        assert!(e.to_string().contains("NUL"), "{e}");
    }

    #[test]
    fn host_and_port_are_required_and_named() {
        let e = resolve(HubSection::default(), env_of(&[])).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("mqtt_host") && text.contains("EVP_MQTT_HOST"),
            "{text}"
        );
        let e = resolve(HubSection::default(), env_of(&[("EVP_MQTT_HOST", "h")])).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("mqtt_port") && text.contains("EVP_MQTT_PORT"),
            "{text}"
        );
        let e = resolve(
            HubSection::default(),
            env_of(&[("EVP_MQTT_HOST", "h"), ("EVP_MQTT_PORT", "x")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("EVP_MQTT_PORT"), "{e}");
    }

    #[test]
    fn the_protocol_comes_from_the_environment_then_agent_toml_and_defaults_to_evp2() {
        let base = [("EVP_MQTT_HOST", "h"), ("EVP_MQTT_PORT", "1")];
        let protocol = |toml: &str, platform: Option<&str>| {
            let mut env = base.to_vec();
            env.extend(platform.map(|p| ("EVP_IOT_PLATFORM", p)));
            resolve(section(toml), env_of(&env)).map(|c| c.protocol)
        };
        assert_eq!(protocol("", None), Ok(Protocol::Evp2));
        assert_eq!(
            protocol("[hub]\nprotocol = \"evp1\"\n", None),
            Ok(Protocol::Evp1)
        );
        assert_eq!(protocol("", Some("evp1")), Ok(Protocol::Evp1));
        assert_eq!(protocol("", Some(" EVP1 ")), Ok(Protocol::Evp1));
        assert_eq!(
            protocol("[hub]\nprotocol = \"evp1\"\n", Some("TB")),
            Ok(Protocol::Evp2),
            "EVP_IOT_PLATFORM wins, and anything but EVP1 is EVP2"
        );
        assert_eq!(protocol("", Some("whatever")), Ok(Protocol::Evp2));
        let e = evp_daemon::AgentConfig::parse("[hub]\nprotocol = \"evp3\"\n")
            .unwrap()
            .section::<HubSection>("hub")
            .unwrap_err();
        assert!(format!("{e:#}").contains("evp3"), "{e:#}");
    }

    #[test]
    fn tls_combinations() {
        let base = [("EVP_MQTT_HOST", "h"), ("EVP_MQTT_PORT", "1")];
        let c = resolve(
            HubSection::default(),
            env_of(&[
                base[0],
                base[1],
                ("EVP_MQTT_TLS_CA_CERT", "/mqtt-ca"),
                ("EVP_TLS_CA_CERT", "/ca"),
                ("EVP_MQTT_TLS_CLIENT_CERT", "/c"),
                ("EVP_MQTT_TLS_CLIENT_KEY", "/k"),
            ]),
        )
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.ca_cert, PathBuf::from("/ca"), "EVP_TLS_CA_CERT wins");
        assert_eq!(tls.client, Some(("/c".into(), "/k".into())));
        let c = resolve(
            section("[hub]\nmqtt_host=\"h\"\nmqtt_port=1\ntls_ca_cert=\"/ca\"\n"),
            env_of(&[]),
        )
        .unwrap();
        assert_eq!(c.tls.unwrap().client, None, "CA only: server-auth TLS");
        let e = resolve(
            section("[hub]\nmqtt_host=\"h\"\nmqtt_port=1\ntls_client_cert=\"/c\"\n"),
            env_of(&[]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("tls_client_key"), "{e}");
        let e = resolve(
            section("[hub]\nmqtt_host=\"h\"\nmqtt_port=1\ntls_client_cert=\"/c\"\ntls_client_key=\"/k\"\n"),
            env_of(&[]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("tls_ca_cert"), "{e}");
    }

    #[test]
    fn intervals_are_validated_and_max_follows_min() {
        let base = [("EVP_MQTT_HOST", "h"), ("EVP_MQTT_PORT", "1")];
        let c = resolve(
            HubSection::default(),
            env_of(&[
                base[0],
                base[1],
                ("EVP_REPORT_STATUS_INTERVAL_MIN_SEC", "10"),
                ("EVP_REPORT_STATUS_INTERVAL_MAX_SEC", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(c.intervals.min, Duration::from_secs(10));
        assert_eq!(c.intervals.max, Some(Duration::from_secs(10)));
        for bad in ["0", "86401", "x"] {
            let e = resolve(
                HubSection::default(),
                env_of(&[
                    base[0],
                    base[1],
                    ("EVP_REPORT_STATUS_INTERVAL_MIN_SEC", bad),
                ]),
            )
            .unwrap_err();
            assert!(
                e.to_string().contains("EVP_REPORT_STATUS_INTERVAL_MIN_SEC"),
                "{e}"
            );
        }
        let e = resolve(
            section("[hub]\nmqtt_host=\"h\"\nmqtt_port=1\nreport_status_interval_max_ms=0\n"),
            env_of(&[]),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("report_status_interval_max_ms"),
            "{e}"
        );
        let e = resolve(
            section("[hub]\nmqtt_host=\"h\"\nmqtt_port=1\nmqtt_qos_status=3\n"),
            env_of(&[]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("mqtt_qos_status"), "{e}");
    }

    #[test]
    fn the_mqtt_proxy_takes_host_and_port_and_both_halves_of_basic_auth() {
        let base = "[hub]\nmqtt_host=\"h\"\nmqtt_port=1\n";
        let c = resolve(
            section(&format!(
                "{base}mqtt_proxy_host=\"t\"\nmqtt_proxy_port=1\nmqtt_proxy_username=\"tu\"\n\
                 mqtt_proxy_password=\"tp\"\n"
            )),
            env_of(&[
                ("EVP_MQTT_PROXY_HOST", "proxy"),
                ("EVP_MQTT_PROXY_PORT", "3128"),
                ("EVP_MQTT_PROXY_PASSWORD", "secret"),
            ]),
        )
        .unwrap();
        let proxy = c.proxy.clone().unwrap();
        assert_eq!(proxy.address.to_string(), "proxy:3128");
        assert_eq!(
            proxy.basic_auth,
            Some(("tu".to_string(), "secret".to_string())),
            "each value from where it is set, the environment winning"
        );
        assert!(!format!("{c:?}").contains("secret"), "{c:?}");
        let e = resolve(
            section("[hub]\nmqtt_host=\"::1\"\nmqtt_port=1\n"),
            env_of(&[("EVP_MQTT_PROXY_HOST", "p"), ("EVP_MQTT_PROXY_PORT", "1")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("IPv6 address ::1"), "{e}");
        let none = resolve(section(base), env_of(&[])).unwrap();
        assert_eq!(none.proxy, None);
        for (env, key) in [
            (&[("EVP_MQTT_PROXY_HOST", "p")][..], "mqtt_proxy_port"),
            (&[("EVP_MQTT_PROXY_PORT", "3128")][..], "mqtt_proxy_host"),
            (&[("EVP_MQTT_PROXY_PORT", "x")][..], "EVP_MQTT_PROXY_PORT"),
            (
                &[
                    ("EVP_MQTT_PROXY_HOST", "p"),
                    ("EVP_MQTT_PROXY_PORT", "3128"),
                    ("EVP_MQTT_PROXY_USERNAME", "u"),
                ][..],
                "mqtt_proxy_password",
            ),
            (
                &[
                    ("EVP_MQTT_PROXY_USERNAME", "u"),
                    ("EVP_MQTT_PROXY_PASSWORD", "p"),
                ][..],
                "mqtt_proxy_username",
            ),
        ] {
            let e = resolve(section(base), env_of(env)).unwrap_err();
            assert!(e.to_string().contains(key), "{env:?}: {e}");
        }
    }

    #[test]
    fn failover_brokers_follow_the_configured_one_and_bad_ones_are_named() {
        let c = resolve(
            section(
                "[hub]\nmqtt_host=\"a\"\nmqtt_port=1\n\
                 mqtt_failover_brokers=[\"b.example:8883\", \" [::1]:2 \"]\n",
            ),
            env_of(&[]),
        )
        .unwrap();
        let all: Vec<String> = c.brokers().iter().map(Broker::to_string).collect();
        assert_eq!(all, ["a:1", "b.example:8883", "[::1]:2"]);
        assert_eq!(
            c.brokers()[2].host,
            "::1",
            "dialled and verified without brackets"
        );
        assert_eq!(
            resolve(
                section("[hub]\nmqtt_host=\"a\"\nmqtt_port=1\n"),
                env_of(&[])
            )
            .unwrap()
            .brokers()
            .len(),
            1
        );
        for bad in ["b", "b:", ":1", "b:0", "b:70000", "::1:2", "[::1:2"] {
            let e = resolve(
                section(&format!(
                    "[hub]\nmqtt_host=\"a\"\nmqtt_port=1\nmqtt_failover_brokers=[\"{bad}\"]\n"
                )),
                env_of(&[]),
            )
            .unwrap_err();
            assert!(
                e.to_string().starts_with("mqtt_failover_brokers: ") && e.to_string().contains(bad),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_bad_registry_auth_are_errors() {
        let e = evp_daemon::AgentConfig::parse("[hub]\nmqtt_hots = \"h\"\n")
            .unwrap()
            .section::<HubSection>("hub")
            .unwrap_err();
        assert!(format!("{e:#}").contains("mqtt_hots"), "{e:#}");
        let e = resolve(
            HubSection::default(),
            env_of(&[
                ("EVP_MQTT_HOST", "h"),
                ("EVP_MQTT_PORT", "1"),
                ("EVP_REGISTRY_AUTH", "[1]"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("EVP_REGISTRY_AUTH"), "{e}");
    }
}
