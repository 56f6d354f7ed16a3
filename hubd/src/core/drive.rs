//! The driver of rumqttc's event loop: the connection, its reconnects (across brokers, with
//! renewed TLS credentials), and what the session and the spool need from it.

use std::time::Instant;

use rumqttc::{Event, EventLoop, Outgoing, Packet};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{ConnectionState, connection_options, dial};
use crate::config::HubConfig;
use crate::failover::{Failover, Failure};
use crate::outbox::Outbox;
use crate::rotation;

/// The driver's channels.
pub(super) struct DriverLinks {
    /// Publishes, paired with their PUBACKs.
    pub outbox: Outbox,
    /// Tags of the spooled records the broker acknowledged.
    pub acks: mpsc::UnboundedSender<u64>,
    /// What the session hears of the connection.
    pub events: mpsc::Sender<MqttEvent>,
    /// `Hub1.Connection`.
    pub connection: watch::Sender<ConnectionState>,
    /// Set when hubd stops.
    pub stop: watch::Receiver<bool>,
    /// Renewed TLS credentials for the next connection.
    pub credentials: rotation::NextCredentials,
}

/// What the driver tells the session.
#[derive(Debug)]
pub(super) enum MqttEvent {
    Connected,
    Disconnected,
    Publish { topic: String, payload: Vec<u8> },
}

/// Drives rumqttc's event loop: reconnects with backoff, to the next broker when there are
/// several, forwards what the session needs, and stops after the DISCONNECT went out (or at
/// once when not connected and `stop` is set).
pub(super) async fn drive(cfg: HubConfig, mut eventloop: EventLoop, links: DriverLinks) {
    let DriverLinks {
        outbox,
        acks,
        events,
        connection,
        mut stop,
        mut credentials,
    } = links;
    let brokers = cfg.brokers();
    let mut failover = Failover::new(brokers.len());
    let via = match &cfg.proxy {
        Some(p) => format!(" through the proxy {}", p.address),
        None => String::new(),
    };
    let mut up_since: Option<Instant> = None;
    loop {
        let polled = if up_since.is_some() {
            eventloop.poll().await
        } else {
            rotation::use_latest(&mut credentials, &mut eventloop.mqtt_options);
            connection.send_replace(ConnectionState::Connecting);
            tokio::select! {
                r = eventloop.poll() => r,
                _ = stop.wait_for(|s| *s) => break,
            }
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!(
                    "connected to the MQTT broker {}{via}",
                    brokers[failover.current()]
                );
                up_since = Some(Instant::now());
                failover.connected();
                outbox.connected();
                if rotation::pending(&credentials) {
                    // Renewed while this connection was being made: it ends at once.
                    let _ = outbox.disconnect();
                }
                connection.send_replace(ConnectionState::Connected);
                if events.send(MqttEvent::Connected).await.is_err() {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let event = MqttEvent::Publish {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                };
                if events.send(event).await.is_err() {
                    break;
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => outbox.outgoing_publish(pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(tag) = outbox.puback(ack.pkid) {
                    let _ = acks.send(tag);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect))
                if !*stop.borrow() && rotation::pending(&credentials) =>
            {
                // A rotation's: connect again at once, with the renewed credentials.
                outbox.lost(&mut eventloop);
                connection.send_replace(ConnectionState::Disconnected);
                up_since = None;
                if events.send(MqttEvent::Disconnected).await.is_err() {
                    break;
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                outbox.lost(&mut eventloop);
                connection.send_replace(ConnectionState::Disconnected);
                if *stop.borrow() {
                    break;
                }
                let failure = match up_since.take() {
                    Some(since) => {
                        if events.send(MqttEvent::Disconnected).await.is_err() {
                            break;
                        }
                        Failure::Dropped {
                            up_for: since.elapsed(),
                        }
                    }
                    // A host that answers (a refused TCP connection) has its link up and its
                    // broker restarting: it is tried again soon. Anything else backs off to
                    // EVP's 64 s.
                    None if dial::host_refused(&e) => Failure::Refused,
                    None => Failure::Other,
                };
                let failed = &brokers[failover.current()];
                let what = dial::describe(&e, failed, cfg.proxy.as_ref());
                let next = failover.next(failure, evp_daemon::backoff::random_jitter());
                let target = &brokers[next.broker];
                if target != failed {
                    eventloop.mqtt_options = connection_options(
                        &cfg,
                        eventloop.mqtt_options.client_id(),
                        eventloop.mqtt_options.transport(),
                        target,
                    );
                }
                warn!("{what}; next attempt to {target} in {:.1?}", next.delay);
                tokio::select! {
                    _ = tokio::time::sleep(next.delay) => {}
                    _ = rotation::renewed(&mut credentials) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        }
    }
    connection.send_replace(ConnectionState::Disconnected);
}
