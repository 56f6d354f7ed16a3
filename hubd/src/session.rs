//! The pure state of one MQTT session: the initial attribute GET and its resends, and the
//! attribute PATCHes that arrive before its answer (queued, then applied in order after it).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use evp_schemas::DesiredChange;
use tracing::warn;

/// How often the initial GET is resent until answered (EVP: 5 s, no timeout).
pub const GET_RESEND_EVERY: Duration = Duration::from_secs(5);
/// Most PATCHes held while the initial GET is unanswered. A hub sends a handful at most
/// in that window; beyond this the oldest are dropped, since the GET answer carries the whole
/// state anyway.
pub const MAX_QUEUED_PATCHES: usize = 64;
/// Most payload bytes held in that queue: eight maximum-size MQTT messages (EVP's 128 KiB
/// buffer), so a misbehaving hub cannot grow hubd's memory without bound.
pub const MAX_QUEUED_BYTES: usize = 8 * 131_072;

/// The session's progress through its start sequence.
#[derive(Debug, Default)]
pub struct Session {
    answered: bool,
    last_get: Option<Instant>,
    queue: VecDeque<(usize, Vec<DesiredChange>)>,
    queued_bytes: usize,
}

impl Session {
    /// A session that has not connected yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A (re)connect: the GET must be sent again. PATCHes still queued from the previous
    /// connection are dropped: the new GET answer is the hub's whole, newer state.
    pub fn on_connected(&mut self) {
        self.answered = false;
        self.last_get = None;
        self.queue.clear();
        self.queued_bytes = 0;
    }

    /// Whether the initial GET was answered on this connection.
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// When the GET must be (re)sent; `None` once answered.
    pub fn get_due(&self, now: Instant) -> Option<Instant> {
        if self.answered {
            return None;
        }
        Some(self.last_get.map_or(now, |at| at + GET_RESEND_EVERY))
    }

    /// Records that the GET was published at `now`.
    pub fn get_sent(&mut self, now: Instant) {
        self.last_get = Some(now);
    }

    /// A PATCH decoded into `changes` (`size` payload bytes): what to apply now. Before the
    /// GET answer it is queued and nothing is applied; a PATCH that decodes to nothing (such
    /// as the device's own report, echoed by a plain broker) is not queued at all.
    pub fn on_patch(&mut self, changes: Vec<DesiredChange>, size: usize) -> Vec<DesiredChange> {
        if self.answered {
            return changes;
        }
        if changes.is_empty() {
            return Vec::new();
        }
        self.queue.push_back((size, changes));
        self.queued_bytes += size;
        while self.queue.len() > MAX_QUEUED_PATCHES
            || (self.queued_bytes > MAX_QUEUED_BYTES && self.queue.len() > 1)
        {
            if let Some((dropped, _)) = self.queue.pop_front() {
                self.queued_bytes -= dropped;
                warn!(
                    "dropped the oldest attribute update held before the initial GET answer \
                     (more than {MAX_QUEUED_PATCHES} updates or {MAX_QUEUED_BYTES} bytes held)"
                );
            }
        }
        Vec::new()
    }

    /// The answer to the GET, decoded: its changes, then every queued PATCH in order.
    pub fn on_get_answer(&mut self, changes: Vec<DesiredChange>) -> Vec<DesiredChange> {
        self.answered = true;
        let mut out = changes;
        for (_, queued) in self.queue.drain(..) {
            out.extend(queued);
        }
        self.queued_bytes = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removed() -> DesiredChange {
        DesiredChange::DeploymentRemoved
    }

    fn cfg(topic: &str) -> DesiredChange {
        DesiredChange::Configuration {
            instance: "i".into(),
            topic: topic.into(),
            value: b"v".to_vec(),
        }
    }

    #[test]
    fn get_is_sent_at_once_and_resent_every_5_s_until_answered() {
        let t0 = Instant::now();
        let mut s = Session::new();
        s.on_connected();
        assert_eq!(s.get_due(t0), Some(t0));
        s.get_sent(t0);
        assert_eq!(s.get_due(t0), Some(t0 + GET_RESEND_EVERY));
        s.on_get_answer(vec![]);
        assert_eq!(s.get_due(t0), None);
        s.on_connected();
        assert_eq!(s.get_due(t0), Some(t0), "a reconnect asks again");
    }

    #[test]
    fn patches_before_the_answer_are_applied_after_it_in_order() {
        let mut s = Session::new();
        s.on_connected();
        assert!(s.on_patch(vec![cfg("a")], 10).is_empty());
        assert!(s.on_patch(vec![], 10).is_empty(), "an echo is not queued");
        assert!(s.on_patch(vec![cfg("b"), removed()], 10).is_empty());
        let applied = s.on_get_answer(vec![cfg("get")]);
        assert_eq!(applied, vec![cfg("get"), cfg("a"), cfg("b"), removed()]);
        assert_eq!(s.on_patch(vec![cfg("c")], 10), vec![cfg("c")]);
    }

    #[test]
    fn the_queue_is_bounded_and_dropped_on_reconnect() {
        let mut s = Session::new();
        s.on_connected();
        for i in 0..MAX_QUEUED_PATCHES + 3 {
            s.on_patch(vec![cfg(&i.to_string())], 1);
        }
        let applied = s.on_get_answer(vec![]);
        assert_eq!(applied.len(), MAX_QUEUED_PATCHES);
        assert_eq!(applied[0], cfg("3"), "the oldest were dropped");

        s.on_connected();
        s.on_patch(vec![cfg("x")], MAX_QUEUED_BYTES);
        s.on_patch(vec![cfg("y")], 1);
        assert_eq!(s.on_get_answer(vec![]), vec![cfg("y")], "byte bound");

        s.on_connected();
        s.on_patch(vec![cfg("old")], 1);
        s.on_connected();
        assert!(s.on_get_answer(vec![]).is_empty());
    }
}
