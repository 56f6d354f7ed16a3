//! Every publish goes through the [`Outbox`], so that the event loop's driver can tell which
//! PUBACK acknowledges which spooled record. rumqttc gives a QoS 1 publish its packet id only
//! when its event loop takes it from the request channel, and says so with
//! `Outgoing::Publish(pkid)`, in channel order; the outbox pushes each QoS 1 request's tag in
//! that same order, under one lock, and the driver pairs them up.
//!
//! A connection lost is the one moment the pairing could slip: requests left in the channel
//! would go out on the next connection. So the driver, holding the lock, empties the channel
//! and rumqttc's pending list (with a clean session they would be dropped at the next CONNACK
//! anyway) and forgets the tags; the spool sends again whatever was not acknowledged.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use rumqttc::{AsyncClient, ClientError, EventLoop, QoS, Request};

/// Why a publish was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Not connected: nothing is queued for a connection that is not there.
    NotConnected,
    /// The request channel is full; try again when an acknowledgement made room.
    Full,
    /// The event loop is gone.
    Closed,
}

#[derive(Debug, Default)]
struct Pairing {
    connected: bool,
    /// Tags of the QoS 1 (and 2) requests in the channel, oldest first (`None`: not spooled).
    queued: VecDeque<Option<u64>>,
    /// Packet id → tag of spooled records on the wire.
    on_wire: HashMap<u16, u64>,
}

/// The publishing side of the MQTT client.
#[derive(Debug, Clone)]
pub struct Outbox {
    client: AsyncClient,
    pairing: Arc<Mutex<Pairing>>,
}

impl Outbox {
    /// The outbox of `client`.
    pub fn new(client: AsyncClient) -> Self {
        Outbox {
            client,
            pairing: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pairing> {
        // Nothing panics while holding it; a poisoned lock still holds consistent data.
        self.pairing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a publish; `tag` comes back from [`Outbox::puback`] when the broker acknowledged
    /// it (QoS 1 only).
    pub fn publish(
        &self,
        topic: &str,
        qos: QoS,
        payload: Vec<u8>,
        tag: Option<u64>,
    ) -> Result<(), Refused> {
        let mut pairing = self.lock();
        if !pairing.connected {
            return Err(Refused::NotConnected);
        }
        match self.client.try_publish(topic, qos, false, payload) {
            Ok(()) => {
                if qos != QoS::AtMostOnce {
                    pairing.queued.push_back(tag);
                }
                Ok(())
            }
            Err(ClientError::TryRequest(Request::Publish(_))) => Err(Refused::Full),
            Err(_) => Err(Refused::Closed),
        }
    }

    /// The client, for what is not a publish (subscriptions, DISCONNECT).
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// The driver saw a CONNACK.
    pub fn connected(&self) {
        self.lock().connected = true;
    }

    /// The driver saw the connection fail: nothing queued for it goes out on the next one.
    pub fn lost(&self, eventloop: &mut EventLoop) {
        let mut pairing = self.lock();
        pairing.connected = false;
        pairing.queued.clear();
        pairing.on_wire.clear();
        eventloop.clean();
        eventloop.pending.clear();
    }

    /// The driver saw `Outgoing::Publish(pkid)`.
    pub fn outgoing_publish(&self, pkid: u16) {
        if pkid == 0 {
            return; // QoS 0: no tag was queued.
        }
        let mut pairing = self.lock();
        if let Some(Some(tag)) = pairing.queued.pop_front() {
            pairing.on_wire.insert(pkid, tag);
        }
    }

    /// The driver saw a PUBACK: the tag of the spooled record it acknowledges, if it was one.
    pub fn puback(&self, pkid: u16) -> Option<u64> {
        self.lock().on_wire.remove(&pkid)
    }
}
