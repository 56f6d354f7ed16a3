//! What the session publishes: direct-command answers, the status report and the
//! instance-state report (split across messages when it must be), through one bounded publish.

use std::time::Instant;

use evp_schemas::DirectCommandResponse;
use evp_schemas::evp2::{sizes, topics};
use rumqttc::QoS;
use tracing::{debug, error, warn};

use super::{Core, MAX_OUTGOING_PACKET, PUBLISH_OVERHEAD, REPORT_RETRY, qos};
use crate::report;
use crate::rpc;
use crate::spool::task::Response;
use crate::states;
use crate::timing::ReportDecision;

impl Core {
    /// Hands a direct-command answer for `v1/devices/me/rpc/response/<mqtt_id>` to the spool,
    /// which sends it at QoS 1 now, or once the hub is back.
    pub(super) fn respond(&self, instance: &str, mqtt_id: &str, answer: &DirectCommandResponse) {
        let topic = format!("{}{mqtt_id}", topics::RPC_RESPONSE_PREFIX);
        let (payload, too_big) = rpc::answer_payload(
            self.codec,
            instance,
            answer,
            sizes::max_payload(topic.len()),
        );
        if let Some(why) = too_big {
            warn!(
                "direct command {} answered with an error: {why}",
                answer.reqid
            );
        }
        let response = Response {
            instance: instance.to_owned(),
            topic,
            payload,
        };
        if self.responses.send(response).is_err() {
            error!(
                "answer to direct command {} dropped: the spooler stopped",
                answer.reqid
            );
        }
    }

    /// Sends what is due: the initial GET, the status report, the instance-state report.
    pub(super) fn tick(&mut self, now: Instant) {
        self.expire_tokens(now);
        if !self.connected {
            self.save_states_if_due(now);
            return;
        }
        if self.session.get_due(now).is_some_and(|at| at <= now) {
            let topic = format!(
                "{}{}",
                topics::ATTRIBUTES_REQUEST_PREFIX,
                topics::INITIAL_GET_ID
            );
            if self.publish(&topic, QoS::AtMostOnce, b"{}".to_vec()) == Published::Queued {
                debug!("initial attribute GET sent");
            }
            // Sent or not, it is tried again after the resend period.
            self.session.get_sent(now);
        }
        let report = report::build(
            &self.system_info,
            &self.settings,
            self.status.as_ref(),
            self.rejection.as_ref(),
            &self.losses,
        );
        let (payload, shrunk) = report::fit(self.codec, &report, sizes::MAX_ATTRIBUTES_PAYLOAD);
        self.report_wake = match self.timer.decide(now, &payload, self.settings.intervals) {
            ReportDecision::SendNow => {
                if let Some(why) = shrunk {
                    warn!("{why}");
                }
                let level = qos(self.cfg.status_qos);
                match self.publish(topics::ATTRIBUTES, level, payload.clone().into_bytes()) {
                    Published::NotQueued | Published::Offline => Some(now + REPORT_RETRY),
                    // Too big is recorded as sent: trying again would only fail again, until
                    // the report changes.
                    Published::Queued | Published::TooBig => {
                        self.timer.sent(now, payload);
                        self.settings.intervals.max.map(|max| now + max)
                    }
                }
            }
            ReportDecision::WaitUntil(at) => Some(at),
            ReportDecision::Idle => None,
        };
        self.tick_states(now);
        // The spool drains once this connection's reports are out (they go first).
        if self.timer.has_sent() && !*self.drain.borrow() {
            self.drain.send_replace(true);
        }
    }

    /// The instance-state report: the same timing rules as the status report, with its own
    /// clock; nothing is sent before a module reported a state.
    fn tick_states(&mut self, now: Instant) {
        if self.states.is_empty() && !self.states_timer.has_sent() {
            self.states_wake = None;
            return;
        }
        let (payload, messages) = match &self.states_payload {
            Some(p) => p.clone(),
            None => {
                let report = self.codec.encode_instance_states(&self.states);
                let empty = serde_json::Map::new();
                let (messages, left_out) = states::split(
                    report.as_object().unwrap_or(&empty),
                    sizes::MAX_ATTRIBUTES_PAYLOAD,
                );
                if !left_out.is_empty() {
                    error!(
                        "instance states left out of the report, each alone larger than one \
                         MQTT message: {left_out:?}"
                    );
                }
                let p = (messages.join("\n"), messages);
                self.states_payload = Some(p.clone());
                p
            }
        };
        self.states_wake = match self
            .states_timer
            .decide(now, &payload, self.settings.intervals)
        {
            ReportDecision::SendNow => {
                let mut queued = true;
                for m in messages {
                    queued &= self
                        .publish(topics::ATTRIBUTES, QoS::AtMostOnce, m.into_bytes())
                        .was_taken();
                }
                if queued {
                    self.states_timer.sent(now, payload);
                    if self.states_on_disk {
                        self.states_file.remove();
                        self.states_on_disk = false;
                    }
                    self.settings.intervals.max.map(|max| now + max)
                } else {
                    Some(now + REPORT_RETRY)
                }
            }
            ReportDecision::WaitUntil(at) => Some(at),
            ReportDecision::Idle => None,
        };
    }

    /// Writes the states kept for the hub once their delay is up.
    fn save_states_if_due(&mut self, now: Instant) {
        if self.states_save_at.is_none_or(|at| at > now) {
            return;
        }
        self.states_save_at = None;
        match self.states_file.save(&self.states) {
            Ok(()) => self.states_on_disk = true,
            Err(e) => warn!("instance states not kept on disk: {e}"),
        }
    }

    /// Queues a publish (through the outbox, so that PUBACKs pair with the spool's records).
    pub(super) fn publish(&self, topic: &str, level: QoS, payload: Vec<u8>) -> Published {
        let size = topic.len() + payload.len() + PUBLISH_OVERHEAD;
        if size > MAX_OUTGOING_PACKET {
            error!(
                "not publishing {size} bytes on {topic}: larger than the {MAX_OUTGOING_PACKET}-byte MQTT limit"
            );
            return Published::TooBig;
        }
        match self.outbox.publish(topic, level, payload, None) {
            Ok(()) => Published::Queued,
            // The driver saw the connection go before the session did.
            Err(crate::outbox::Refused::NotConnected) => Published::Offline,
            Err(e) => {
                debug!("publish on {topic} not queued ({e:?}): tried again later");
                Published::NotQueued
            }
        }
    }
}

/// What became of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Published {
    /// Handed to the MQTT event loop.
    Queued,
    /// Larger than the MQTT limit; dropped.
    TooBig,
    /// The request channel is full or closed.
    NotQueued,
    /// The connection is gone (the session hears of it next).
    Offline,
}

impl Published {
    /// Handed over, or never to be (too big): nothing to try again.
    pub(super) fn was_taken(self) -> bool {
        matches!(self, Published::Queued | Published::TooBig)
    }
}
