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

    /// Ends the current connection with a DISCONNECT (a rotation's: the driver connects again).
    /// Refused when there is no connection: a DISCONNECT queued then would end the next one.
    pub fn disconnect(&self) -> Result<(), Refused> {
        let pairing = self.lock();
        if !pairing.connected {
            return Err(Refused::NotConnected);
        }
        match self.client.try_disconnect() {
            Ok(()) => Ok(()),
            Err(ClientError::TryRequest(Request::Disconnect(_))) => Err(Refused::Full),
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

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::MqttOptions;

    fn outbox() -> (Outbox, EventLoop) {
        let (client, eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 8);
        (Outbox::new(client), eventloop)
    }

    #[test]
    fn pubacks_give_back_the_tags_in_the_order_the_publishes_left() {
        let (o, _eventloop) = outbox();
        assert_eq!(
            o.publish("t", QoS::AtLeastOnce, b"x".to_vec(), Some(1)),
            Err(Refused::NotConnected)
        );
        o.connected();
        o.publish("t", QoS::AtLeastOnce, b"a".to_vec(), Some(10))
            .unwrap();
        o.publish("t", QoS::AtMostOnce, b"q0".to_vec(), None)
            .unwrap();
        o.publish("t", QoS::AtLeastOnce, b"report".to_vec(), None)
            .unwrap();
        o.publish("t", QoS::AtLeastOnce, b"b".to_vec(), Some(11))
            .unwrap();
        // The event loop numbers them as it takes them: QoS 0 goes out as pkid 0.
        for pkid in [1, 0, 2, 3] {
            o.outgoing_publish(pkid);
        }
        assert_eq!(o.puback(3), Some(11));
        assert_eq!(o.puback(2), None, "a report is not the spool's");
        assert_eq!(o.puback(1), Some(10));
        assert_eq!(o.puback(1), None, "once");
    }

    #[test]
    fn a_lost_connection_forgets_every_pairing_and_empties_the_channel() {
        let (o, mut eventloop) = outbox();
        o.connected();
        o.publish("t", QoS::AtLeastOnce, b"a".to_vec(), Some(1))
            .unwrap();
        o.publish("t", QoS::AtLeastOnce, b"b".to_vec(), Some(2))
            .unwrap();
        o.outgoing_publish(1);
        o.lost(&mut eventloop);
        assert!(eventloop.pending.is_empty());
        assert_eq!(o.puback(1), None);
        assert_eq!(
            o.publish("t", QoS::AtLeastOnce, b"c".to_vec(), Some(3)),
            Err(Refused::NotConnected)
        );
        o.connected();
        o.publish("t", QoS::AtLeastOnce, b"c".to_vec(), Some(3))
            .unwrap();
        // The first publish of the new connection pairs with its own tag, not a stale one.
        o.outgoing_publish(1);
        assert_eq!(o.puback(1), Some(3));
    }

    #[test]
    fn a_disconnect_is_queued_only_for_a_connection() {
        let (o, mut eventloop) = outbox();
        assert_eq!(o.disconnect(), Err(Refused::NotConnected));
        o.connected();
        o.disconnect().unwrap();
        o.lost(&mut eventloop);
        assert!(
            eventloop.pending.is_empty(),
            "the next connection is not ended"
        );
        assert_eq!(o.disconnect(), Err(Refused::NotConnected));
    }

    #[test]
    fn a_full_channel_is_refused_without_a_tag() {
        let (o, _eventloop) = outbox();
        o.connected();
        for n in 0..8 {
            o.publish("t", QoS::AtLeastOnce, vec![n], Some(u64::from(n)))
                .unwrap();
        }
        assert_eq!(
            o.publish("t", QoS::AtLeastOnce, b"x".to_vec(), Some(99)),
            Err(Refused::Full)
        );
        for pkid in 1..=8 {
            o.outgoing_publish(pkid);
        }
        assert_eq!(
            o.puback(8),
            Some(7),
            "the refused one took no place in the order"
        );
    }
}
