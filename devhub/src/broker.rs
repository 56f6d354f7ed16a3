//! An MQTT broker (rumqttd) embedded in the process, on loopback, in its own thread.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The largest MQTT packet the broker accepts. The agent's own buffers are 128 KiB
/// (docs/hub-protocol.md §15); the double leaves room for a hub's answer carrying every shared
/// attribute at once.
pub const MAX_PACKET_BYTES: usize = 256 * 1024;
/// Unacknowledged QoS 1 messages per connection; a status burst never comes near it.
const MAX_INFLIGHT: usize = 100;
/// How long a client has to send CONNECT after the TCP connection opens.
const CONNECTION_TIMEOUT_MS: u16 = 60_000;
/// Connections the router accepts: a device, a few devhub processes, and tests.
const MAX_CONNECTIONS: usize = 1_000;
/// Messages queued towards one slow subscriber before the router stops reading for it.
const MAX_OUTGOING_PACKETS: u64 = 200;
/// Size and count of the router's in-memory log segments (its own defaults, reduced:
/// retained history is not needed, only fan-out).
const SEGMENT_BYTES: usize = 8 * 1024 * 1024;
/// See [`SEGMENT_BYTES`].
const SEGMENT_COUNT: usize = 4;
/// How long the broker gets to accept TCP connections after its thread starts.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often readiness is checked.
const READY_POLL: Duration = Duration::from_millis(20);

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The port is taken, most likely by another broker or another `evp-devhub up`.
    #[error(
        "cannot listen on 127.0.0.1:{port}: {source} (is another broker or `evp-devhub up` running? choose another port)"
    )]
    PortInUse {
        /// The port asked for.
        port: u16,
        /// What bind said.
        #[source]
        source: std::io::Error,
    },
    /// The broker's thread could not be started.
    #[error("starting the broker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The broker stopped, or did not accept connections in time.
    #[error("the embedded MQTT broker did not start on 127.0.0.1:{port}: {reason}")]
    NotListening {
        /// The port.
        port: u16,
        /// What was seen.
        reason: String,
    },
}

/// rumqttd serving MQTT 3.1.1 on `127.0.0.1:<port>` from a thread of its own.
///
/// rumqttd has no way to stop; the broker lives until the process exits. Dropping this
/// handle does not stop it.
#[derive(Debug)]
pub struct EmbeddedBroker {
    port: u16,
    thread: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Starts the broker on `127.0.0.1:port`, or on a free port when `port` is 0, and returns
    /// once it accepts connections.
    pub fn start(port: u16) -> Result<EmbeddedBroker, BrokerError> {
        // Binding first gives a clear error for a taken port (rumqttd only logs it) and picks
        // the free port for 0. The listener is closed before rumqttd binds the same port;
        // another process taking it in that instant is caught by the readiness check.
        let port = {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                .map_err(|source| BrokerError::PortInUse { port, source })?;
            listener
                .local_addr()
                .map_err(|source| BrokerError::PortInUse { port, source })?
                .port()
        };
        let config = broker_config(port);
        let thread = std::thread::Builder::new()
            .name(format!("mqtt-broker-{port}"))
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!("embedded MQTT broker stopped: {e}");
                }
            })
            .map_err(BrokerError::Thread)?;

        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if thread.is_finished() {
                return Err(BrokerError::NotListening {
                    port,
                    reason: "its thread ended (see the log above)".into(),
                });
            }
            match TcpStream::connect_timeout(&addr, READY_POLL) {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(BrokerError::NotListening {
                        port,
                        reason: format!("no connection within {READY_TIMEOUT:?}: {e}"),
                    });
                }
                Err(_) => std::thread::sleep(READY_POLL),
            }
        }
        Ok(EmbeddedBroker { port, thread })
    }

    /// The port the broker listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL to give to [`crate::HubSide`] and the CLI: `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Whether the broker's thread still runs.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }
}

fn broker_config(port: u16) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: CONNECTION_TIMEOUT_MS,
        max_payload_size: MAX_PACKET_BYTES,
        max_inflight_count: MAX_INFLIGHT,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: format!("devhub-v4-{port}"),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        tls: None,
        // rumqttd waits this long between two accepted connections; none is needed here.
        next_connection_delay_ms: 1,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: MAX_OUTGOING_PACKETS,
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENT_COUNT,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}
