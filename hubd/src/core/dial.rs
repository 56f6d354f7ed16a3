//! What one connection attempt dials: the MQTT options for a broker (through the proxy when
//! one is configured), and a failed attempt told in words a person can act on.

use std::error::Error as _;

use rumqttc::{ConnectionError, MqttOptions, Proxy, ProxyAuth, ProxyType, Transport};

use crate::config::{Broker, HubConfig, MqttProxy};
use crate::tls::TlsMaterial;

use super::{MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET, REQUEST_CHANNEL};

/// The MQTT options of the configuration for its first broker: the client id (the TLS client
/// certificate's CN wins, then the configured id, else empty: EVP's order) and the transport.
pub fn mqtt_options(cfg: &HubConfig, tls: Option<&TlsMaterial>) -> MqttOptions {
    let client_id = tls
        .and_then(|t| t.client_cn.clone())
        .or_else(|| cfg.client_id.clone())
        .unwrap_or_default();
    let transport = match tls {
        Some(t) => Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(t.config.clone())),
        None => Transport::tcp(),
    };
    connection_options(cfg, client_id, transport, &cfg.first_broker())
}

/// The options of a connection attempt to `broker` with `client_id` and `transport`; the rest
/// from `cfg`. Every attempt's options are built here: the failover calls it for the next
/// broker with the client id and transport in use, and new TLS credentials take effect by
/// calling it with their transport and client id. With TLS, rumqttc verifies the broker's
/// certificate against `broker.host` (and sends it as SNI), through the proxy too, where the
/// tunnel is asked for `broker.host`:`broker.port`.
pub fn connection_options(
    cfg: &HubConfig,
    client_id: String,
    transport: Transport,
    broker: &Broker,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    o.set_keep_alive(cfg.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
        .set_request_channel_capacity(REQUEST_CHANNEL)
        .set_transport(transport);
    if let Some(user) = &cfg.username {
        o.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    if let Some(proxy) = &cfg.proxy {
        o.set_proxy(rumqttc_proxy(proxy));
    }
    o
}

fn rumqttc_proxy(proxy: &MqttProxy) -> Proxy {
    Proxy {
        ty: ProxyType::Http,
        auth: match &proxy.basic_auth {
            Some((username, password)) => ProxyAuth::Basic {
                username: username.clone(),
                password: password.clone(),
            },
            None => ProxyAuth::None,
        },
        addr: proxy.address.host.clone(),
        port: proxy.address.port,
    }
}

/// The HTTP status a proxy answered the tunnel request with, when that is why `error` ended
/// the attempt.
fn proxy_status(error: &ConnectionError) -> Option<u16> {
    let ConnectionError::Proxy(e) = error else {
        return None;
    };
    match e.source()?.downcast_ref::<async_http_proxy::HttpError>()? {
        async_http_proxy::HttpError::HttpCode200(code) => Some(*code),
        _ => None,
    }
}

/// Whether the attempt failed because a host refused the TCP connection (a RST): the broker's,
/// or the proxy's when there is one. Its link is up, the program not listening yet.
pub fn host_refused(error: &ConnectionError) -> bool {
    let io = match error {
        ConnectionError::Io(e) => Some(e),
        ConnectionError::Proxy(e) => e.source().and_then(|s| s.downcast_ref::<std::io::Error>()),
        _ => None,
    };
    io.is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// A failed attempt to `broker` in words: which hop failed, and for a proxy's refusal what to
/// check.
pub fn describe(error: &ConnectionError, broker: &Broker, proxy: Option<&MqttProxy>) -> String {
    let Some(proxy) = proxy else {
        return format!("MQTT connection to {broker}: {error}");
    };
    let via = format!(
        "MQTT connection to {broker} through the proxy {}",
        proxy.address
    );
    match proxy_status(error) {
        Some(407) => format!(
            "{via}: the proxy refused its credentials (HTTP 407 Proxy Authentication Required): \
             check mqtt_proxy_username and mqtt_proxy_password (EVP_MQTT_PROXY_USERNAME, \
             EVP_MQTT_PROXY_PASSWORD)"
        ),
        Some(code) => format!("{via}: the proxy refused the tunnel with HTTP {code}"),
        None if matches!(error, ConnectionError::Proxy(_)) => {
            format!("{via}: reaching the proxy failed: {error}")
        }
        None => format!("{via}: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    fn proxy() -> MqttProxy {
        MqttProxy {
            address: Broker {
                host: "proxy.example".into(),
                port: 3128,
            },
            basic_auth: Some(("u".into(), "secret".into())),
        }
    }

    #[tokio::test]
    async fn a_refusing_proxy_is_named_with_what_to_check() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                    .await;
            }
        });
        let mut p = proxy();
        p.address = Broker {
            host: "127.0.0.1".into(),
            port,
        };
        let mut o = MqttOptions::new("c", "broker.example", 8883);
        o.set_proxy(rumqttc_proxy(&p));
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(o, 1);
        let e = eventloop.poll().await.unwrap_err();
        assert_eq!(proxy_status(&e), Some(407));
        assert!(!host_refused(&e));
        let broker = Broker {
            host: "broker.example".into(),
            port: 8883,
        };
        let text = describe(&e, &broker, Some(&p));
        assert!(
            text.contains("broker.example:8883")
                && text.contains(&format!("proxy 127.0.0.1:{port}"))
                && text.contains("407")
                && text.contains("EVP_MQTT_PROXY_PASSWORD"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
    }

    #[tokio::test]
    async fn a_proxy_that_is_not_listening_counts_as_a_refusing_host() {
        // A port just freed: nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut p = proxy();
        p.address.host = "127.0.0.1".into();
        p.address.port = port;
        let mut o = MqttOptions::new("c", "broker.example", 8883);
        o.set_proxy(rumqttc_proxy(&p));
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(o, 1);
        let e = eventloop.poll().await.unwrap_err();
        assert!(host_refused(&e), "{e:?}");
        let broker = Broker {
            host: "b".into(),
            port: 1,
        };
        assert!(describe(&e, &broker, Some(&p)).contains("reaching the proxy failed"));
        assert!(host_refused(&ConnectionError::Io(Error::from(
            ErrorKind::ConnectionRefused
        ))));
        assert!(!host_refused(&ConnectionError::NetworkTimeout));
    }
}
