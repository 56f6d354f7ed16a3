//! One open instance: its bounded event queue with the bytes reserved for callbacks, the states
//! waiting to be collected and those already reported, its telemetry bytes in flight and the
//! direct commands waiting for its answer.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use evp_schemas::sdk::{Callback, Event, EvpResult};
use tokio::sync::Notify;

use super::CALLBACK_COST;
use crate::limits;

/// One queued event and the bytes it counts for.
#[derive(Debug)]
pub(super) struct Queued {
    pub(super) event: Event,
    pub(super) bytes: usize,
    /// The connection a callback event belongs to; `None` for events for the instance.
    pub(super) conn: Option<u64>,
}

/// A state waiting to be collected.
#[derive(Debug)]
pub(crate) struct PendingState {
    pub(super) value: Vec<u8>,
    /// Its [`limits::state_cost`].
    pub(super) cost: usize,
    pub(super) cb: Callback,
    pub(super) conn: u64,
}

/// An instance with an open socket.
#[derive(Debug)]
pub(super) struct Instance {
    /// Which opening of the instance this is (see [`super::InstanceRef`]).
    pub(super) id: u64,
    /// The current connection's id, when a module is connected.
    pub(super) conn: Option<u64>,
    pub(super) events: VecDeque<Queued>,
    /// Bytes of queued events plus reserved callbacks.
    pub(super) used: usize,
    /// Wakes the connection waiting in getEvent.
    pub(super) notify: Arc<Notify>,
    /// `CloseInstance` began the exit protocol.
    pub(super) exiting: bool,
    pub(super) pending_states: BTreeMap<String, PendingState>,
    /// The last value reported per topic, to suppress identical ones.
    pub(super) reported: HashMap<String, Vec<u8>>,
    /// The share of the instance-state report they take ([`limits::state_cost`]).
    pub(super) reported_bytes: usize,
    /// Bytes of this instance's telemetry waiting to be emitted.
    pub(super) telemetry_bytes: usize,
    /// Telemetry keys already warned about for a value that is not JSON.
    pub(super) non_json_warned: HashSet<String>,
    /// Direct commands waiting for the module's answer, with their deadlines.
    pub(super) rpcs: HashMap<u64, Instant>,
    /// Blob transfers under way.
    pub(super) live_blobs: usize,
    /// Turned true when the instance begins to exit: its transfers end, with EXIT.
    pub(super) blob_cancel: tokio::sync::watch::Sender<bool>,
}

impl Instance {
    /// A freshly opened instance, with nothing queued and no module connected.
    pub(super) fn new(id: u64) -> Instance {
        Instance {
            id,
            conn: None,
            events: VecDeque::new(),
            used: 0,
            notify: Arc::new(Notify::new()),
            exiting: false,
            pending_states: BTreeMap::new(),
            reported: HashMap::new(),
            reported_bytes: 0,
            telemetry_bytes: 0,
            non_json_warned: HashSet::new(),
            rpcs: HashMap::new(),
            live_blobs: 0,
            blob_cancel: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The instance's share of the instance-state report once `topic` is `value`: every
    /// topic at its newest value (pending, else reported), as encoded for the hub.
    pub(super) fn state_share_with(&self, instance: &str, topic: &str, value: &[u8]) -> usize {
        let reported = |t: &str| {
            self.reported
                .get(t)
                .map_or(0, |v| limits::state_cost(instance, t, v))
        };
        let pending_growth: isize = self
            .pending_states
            .iter()
            .filter(|(t, _)| t.as_str() != topic)
            .map(|(t, p)| p.cost as isize - reported(t) as isize)
            .sum();
        let others = self.reported_bytes as isize - reported(topic) as isize + pending_growth;
        others.max(0) as usize + limits::state_cost(instance, topic, value)
    }

    /// The prelude of every request that ends in a callback: reserves the callback's bytes
    /// (`EVP_AGAIN` when the queue is full), and when the instance is exiting queues the EXIT
    /// callback `exit` at once (answered `EVP_OK`). `Ok` means the request goes on to its
    /// own rule with the callback reserved.
    pub(super) fn admit(&mut self, conn: u64, limit: usize, exit: Event) -> Result<(), EvpResult> {
        if self.used + CALLBACK_COST > limit {
            return Err(EvpResult::Again);
        }
        self.used += CALLBACK_COST;
        if self.exiting {
            self.complete(conn, exit);
            return Err(EvpResult::Ok);
        }
        Ok(())
    }

    /// Gives back a callback's reservation whose request was refused after all.
    pub(super) fn release(&mut self) {
        self.used -= CALLBACK_COST;
    }

    /// Queues a callback event whose bytes were reserved, or releases the reservation when
    /// the connection that made the request is gone (its callback pointers mean nothing now).
    pub(super) fn complete(&mut self, conn: u64, event: Event) {
        if self.conn == Some(conn) {
            self.events.push_back(Queued {
                event,
                bytes: CALLBACK_COST,
                conn: Some(conn),
            });
            self.notify.notify_one();
        } else {
            self.release();
        }
    }

    /// Queues an event for the instance itself (a message, a command, a configuration).
    pub(super) fn push(&mut self, event: Event) {
        let bytes = event.wire_size();
        self.used += bytes;
        self.events.push_back(Queued {
            event,
            bytes,
            conn: None,
        });
        self.notify.notify_one();
    }

    /// Queues a configuration, replacing a queued one of the same topic (the latest wins).
    pub(super) fn push_config(&mut self, topic: &str, value: &[u8]) {
        for q in self.events.iter_mut() {
            if let Event::Config { topic: t, blob } = &mut q.event
                && t == topic
            {
                self.used = self.used - blob.len() + value.len();
                q.bytes = q.bytes - blob.len() + value.len();
                *blob = value.to_vec();
                return;
            }
        }
        self.push(Event::Config {
            topic: topic.to_owned(),
            blob: value.to_vec(),
        });
    }

    /// Queues every stored configuration of the instance.
    pub(super) fn push_configs(&mut self, topics: &BTreeMap<String, Vec<u8>>) {
        for (topic, value) in topics {
            self.push_config(topic, value);
        }
    }

    /// Removes queued events matching `pred`, releasing their bytes.
    pub(super) fn drop_events(&mut self, pred: impl Fn(&Queued) -> bool) {
        let mut freed = 0;
        self.events.retain(|q| {
            let drop = pred(q);
            if drop {
                freed += q.bytes;
            }
            !drop
        });
        self.used -= freed;
    }

    /// Takes the oldest queued event, releasing its bytes.
    pub(super) fn pop(&mut self) -> Option<Event> {
        let q = self.events.pop_front()?;
        self.used -= q.bytes;
        Some(q.event)
    }
}
