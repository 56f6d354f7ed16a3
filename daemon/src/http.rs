//! The HTTP client every outbound transfer of the agent uses (module downloads in reconcilerd,
//! blob transfers in sdk-broker): rustls with the system's roots plus an optional extra CA, an
//! optional proxy, bounded connect and read times. One place, so both honour the same
//! `EVP_HTTP_PROXY_*` and `EVP_TLS_CA_CERT`/`EVP_HTTPS_CA_CERT` settings the same way.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bound on connection establishment; a link that cannot connect in this long is down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP proxy (EVP's `EVP_HTTP_PROXY_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Basic-auth user, if the proxy wants one.
    pub username: Option<String>,
    /// Basic-auth password.
    pub password: Option<String>,
}

/// The proxy and CA keys of `[reconciler]`, which module downloads and blob transfers share;
/// read by any daemon that makes transfers (other keys of the section are ignored here).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct HttpSettings {
    /// HTTP proxy host; `EVP_HTTP_PROXY_HOST` wins when set.
    pub http_proxy_host: Option<String>,
    /// HTTP proxy port; `EVP_HTTP_PROXY_PORT` wins when set.
    pub http_proxy_port: Option<u16>,
    /// HTTP proxy Basic-auth user; `EVP_HTTP_PROXY_USERNAME` wins when set.
    pub http_proxy_username: Option<String>,
    /// HTTP proxy Basic-auth password; `EVP_HTTP_PROXY_PASSWORD` wins when set.
    pub http_proxy_password: Option<String>,
    /// An extra trusted CA; `EVP_TLS_CA_CERT`, then `EVP_HTTPS_CA_CERT`, win when set.
    pub https_ca_cert: Option<PathBuf>,
}

/// Why the settings and the environment do not make a usable proxy.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A proxy host is set without a usable port.
    #[error(
        "HTTP proxy host {host:?} needs a port (EVP_HTTP_PROXY_PORT or [reconciler] http_proxy_port)"
    )]
    ProxyPortMissing {
        /// The proxy host.
        host: String,
    },
    /// `EVP_HTTP_PROXY_PORT` is not a port number.
    #[error("EVP_HTTP_PROXY_PORT={0:?} is not a port number")]
    ProxyPortInvalid(String),
}

impl HttpSettings {
    /// The proxy and the extra CA, the environment (`lookup`, empty meaning unset) winning
    /// over the settings.
    pub fn resolve(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(Option<ProxyConfig>, Option<PathBuf>), SettingsError> {
        let host = lookup("EVP_HTTP_PROXY_HOST").or_else(|| self.http_proxy_host.clone());
        let proxy = match host {
            None => None,
            Some(host) => {
                let port = match lookup("EVP_HTTP_PROXY_PORT") {
                    Some(p) => Some(
                        p.trim()
                            .parse::<u16>()
                            .map_err(|_| SettingsError::ProxyPortInvalid(p.clone()))?,
                    ),
                    None => self.http_proxy_port,
                };
                let port =
                    port.ok_or_else(|| SettingsError::ProxyPortMissing { host: host.clone() })?;
                Some(ProxyConfig {
                    host,
                    port,
                    username: lookup("EVP_HTTP_PROXY_USERNAME")
                        .or_else(|| self.http_proxy_username.clone()),
                    password: lookup("EVP_HTTP_PROXY_PASSWORD")
                        .or_else(|| self.http_proxy_password.clone()),
                })
            }
        };
        let ca_cert = lookup("EVP_TLS_CA_CERT")
            .or_else(|| lookup("EVP_HTTPS_CA_CERT"))
            .map(PathBuf::from)
            .or_else(|| self.https_ca_cert.clone());
        Ok((proxy, ca_cert))
    }
}

/// The process environment as a `lookup` for [`HttpSettings::resolve`]: empty is unset.
pub fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Why the HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The proxy host and port do not form a proxy URL.
    #[error("HTTP proxy {url:?}: {source}")]
    Proxy {
        /// The proxy URL built from host and port.
        url: String,
        /// What reqwest said.
        source: reqwest::Error,
    },
    /// The CA file cannot be read.
    #[error("reading the CA certificate {path}: {source}")]
    CaRead {
        /// The CA file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The CA file holds no PEM certificate and is not one DER certificate either.
    #[error("{0} holds no PEM or DER certificate")]
    CaParse(PathBuf),
    /// reqwest refused the client configuration (for example the TLS roots).
    #[error("building the HTTP client: {0}")]
    Build(reqwest::Error),
}

/// A client through `proxy`, trusting `ca_cert` besides the system's roots, failing a
/// transfer that receives nothing for `read_timeout`.
pub fn client(
    proxy: Option<&ProxyConfig>,
    ca_cert: Option<&Path>,
    read_timeout: Duration,
) -> Result<reqwest::Client, ClientError> {
    // One process-wide TLS provider, chosen explicitly: ring builds without cmake or nasm.
    // Installing it twice is harmless (the second call is refused).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = || -> Result<reqwest::ClientBuilder, ClientError> {
        let mut builder = reqwest::Client::builder()
            .tls_backend_rustls()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(read_timeout);
        if let Some(p) = proxy {
            let url = format!("http://{}:{}", p.host, p.port);
            let mut proxy = reqwest::Proxy::all(&url).map_err(|source| ClientError::Proxy {
                url: url.clone(),
                source,
            })?;
            if let Some(user) = &p.username {
                proxy = proxy.basic_auth(user, p.password.as_deref().unwrap_or(""));
            }
            builder = builder.proxy(proxy);
        }
        Ok(builder)
    };
    let extra = match ca_cert {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|source| ClientError::CaRead {
                path: path.to_owned(),
                source,
            })?;
            parse_ca(path, &bytes)?
        }
        None => Vec::new(),
    };
    match builder()?.tls_certs_merge(extra.clone()).build() {
        Ok(client) => Ok(client),
        // A device without system roots (no ca-certificates package) still serves: HTTP and
        // file transfers work, HTTPS trusts only the configured CA (none: every HTTPS
        // transfer fails its handshake, and says so).
        Err(system) => match builder()?.tls_certs_only(extra).build() {
            Ok(client) => {
                let mut why = system.to_string();
                let mut source = std::error::Error::source(&system);
                while let Some(cause) = source {
                    why = format!("{why}: {cause}");
                    source = cause.source();
                }
                tracing::warn!(
                    "no system TLS roots ({why}): HTTPS transfers trust only the configured \
                     CA (EVP_TLS_CA_CERT, [reconciler] https_ca_cert); install ca-certificates \
                     for the public ones"
                );
                Ok(client)
            }
            Err(_) => Err(ClientError::Build(system)),
        },
    }
}

/// The certificates of a CA file: a PEM bundle, or one DER certificate. Each is parsed here,
/// so a file that holds no certificate is refused at start rather than trusted as nothing.
fn parse_ca(path: &Path, bytes: &[u8]) -> Result<Vec<reqwest::Certificate>, ClientError> {
    let mut ders: Vec<Vec<u8>> = rustls_pemfile::certs(&mut &bytes[..])
        .filter_map(Result::ok)
        .map(|c| c.as_ref().to_vec())
        .collect();
    if ders.is_empty() {
        ders.push(bytes.to_vec());
    }
    ders.iter()
        .map(|der| {
            x509_parser::parse_x509_certificate(der)
                .ok()
                .and_then(|_| reqwest::Certificate::from_der(der).ok())
                .ok_or_else(|| ClientError::CaParse(path.to_owned()))
        })
        .collect()
}
