//! The spooler: the task that owns the [`Spool`]. It writes what it is given (telemetry
//! batches from sdk-broker, direct-command answers from the session), publishes the spool at
//! QoS 1 while the session allows it, and removes what the broker acknowledged.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use evp_schemas::evp2::sizes::MAX_TELEMETRY_PAYLOAD;
use evp_schemas::evp2::{Evp2Codec, topics};
use rumqttc::QoS;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::{CURSOR_EVERY, Record, Spool};
use crate::outbox::{Outbox, Refused};
use crate::telemetry::{self, TelemetryBatch};

/// Spooled records on the wire at once. Below rumqttc's 100 in-flight publishes, so the
/// session's reports never wait behind the spool; on loopback 64 keeps the drain at the
/// broker's pace (BENCHMARKS.md, "## spool": about 25k msg/s drained).
pub const DRAIN_WINDOW: usize = 64;
/// How soon a publish refused for a full request channel is tried again, when no PUBACK comes
/// first to wake the spooler.
const FULL_RETRY: Duration = Duration::from_millis(20);
/// Drop counts are logged at most this often.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// A direct-command answer for the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The instance that answered (`""` for hubd's own answers).
    pub instance: String,
    /// `v1/devices/me/rpc/response/<id>`.
    pub topic: String,
    /// The encoded answer.
    pub payload: Vec<u8>,
}

/// What the spooler tells the rest of hubd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolReport {
    /// Bytes waiting for the hub (`Hub1.QueuedBytes`).
    pub queued_bytes: u64,
    /// Telemetry messages dropped per instance, since the device was installed.
    pub dropped: BTreeMap<String, u64>,
}

/// The spooler's inputs.
#[derive(Debug)]
pub struct SpoolInputs {
    /// sdk-broker's telemetry.
    pub telemetry: mpsc::Receiver<Box<dyn TelemetryBatch>>,
    /// The session's direct-command answers.
    pub responses: mpsc::UnboundedReceiver<Response>,
    /// Tags of acknowledged records, from the event loop's driver.
    pub acks: mpsc::UnboundedReceiver<u64>,
    /// Whether the session lets the spool drain: connected, and the reports of the new
    /// connection already out (they go first).
    pub drain: watch::Receiver<bool>,
    /// Set at shutdown: the spooler syncs, writes its cursor and ends.
    pub stop: watch::Receiver<bool>,
}

/// Where the spooler says what it holds and what it lost.
#[derive(Debug)]
pub struct SpoolOutputs {
    /// Every change (`Hub1.QueuedBytes` reads it): a change per batch while telemetry flows.
    pub report: watch::Sender<SpoolReport>,
    /// The drop counts alone, which change rarely: the session reports them, and waking it
    /// for every batch would be waste.
    pub dropped: watch::Sender<BTreeMap<String, u64>>,
}

/// Runs the spooler until `inputs.stop` is set or every input closed.
pub async fn run(mut spool: Spool, outbox: Outbox, mut inputs: SpoolInputs, outputs: SpoolOutputs) {
    // Telemetry is the same in both dialects (docs/hub-protocol.md §15).
    let codec = Evp2Codec;
    let mut held: Option<(u64, Record)> = None;
    let mut retry_at: Option<Instant> = None;
    let mut sync_at: Option<Instant> = None;
    let mut cursor_at: Option<Instant> = None;
    let mut drops = DropLog::default();
    let mut telemetry_open = true;
    let mut responses_open = true;
    let mut messages = Vec::new();
    publish_report(&spool, &outputs);
    loop {
        let wake = [retry_at, sync_at, cursor_at].into_iter().flatten().min();
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = inputs.stop.wait_for(|s| *s) => {
                let _ = r;
                break;
            }
            b = inputs.telemetry.recv(), if telemetry_open => match b {
                Some(batch) => {
                    match batch.entries() {
                        Ok(entries) => {
                            telemetry::encode_batch(&codec, &entries, MAX_TELEMETRY_PAYLOAD, &mut messages);
                        }
                        Err(e) => warn!("a telemetry batch from sdk-broker cannot be read: {e}"),
                    }
                    let n = messages.len() as u64;
                    match spool.push_telemetry(topics::TELEMETRY, std::mem::take(&mut messages)) {
                        Ok(refused) => drops.dropped(refused),
                        Err(e) => {
                            error!("telemetry not spooled: {e}");
                            drops.dropped(n);
                        }
                    }
                }
                None => telemetry_open = false,
            },
            r = inputs.responses.recv(), if responses_open => match r {
                Some(r) => match spool.push_response(&r.instance, &r.topic, r.payload) {
                    Ok(true) => {}
                    Ok(false) => error!("answer on {} dropped: the spool is full of answers", r.topic),
                    Err(e) => error!("answer on {} not spooled: {e}", r.topic),
                },
                None => responses_open = false,
            },
            a = inputs.acks.recv() => match a {
                Some(tag) => {
                    if let Err(e) = spool.acked(tag) {
                        error!("spool: {e}");
                    }
                }
                None => break,
            },
            r = inputs.drain.changed() => {
                if r.is_err() {
                    break;
                }
                if !*inputs.drain.borrow_and_update() {
                    held = None;
                    spool.rewind();
                    debug!("spool: the connection went; {} bytes wait", spool.queued_bytes());
                }
            },
            _ = sleep => {}
        }
        let now = Instant::now();
        retry_at = None;
        if *inputs.drain.borrow() {
            retry_at = drain(&mut spool, &outbox, &mut held).then(|| now + FULL_RETRY);
        }
        if due(
            &mut sync_at,
            spool.needs_sync(),
            now,
            spool.limits.sync_every,
        ) && let Err(e) = spool.sync()
        {
            error!("spool: {e}");
        }
        if due(&mut cursor_at, spool.cursor_behind(), now, CURSOR_EVERY)
            && let Err(e) = spool.write_cursor()
        {
            error!("spool: {e}");
        }
        publish_report(&spool, &outputs);
    }
    if let Err(e) = spool.sync().and_then(|()| spool.write_cursor()) {
        error!("spool at shutdown: {e}");
    }
    info!(
        "spooler stopped with {} bytes waiting for the hub",
        spool.queued_bytes()
    );
}

/// Whether deferred work is due now: work `needed` is done `delay` after it first was, so
/// what piles up meanwhile costs one write. `at` holds that moment until then.
fn due(at: &mut Option<Instant>, needed: bool, now: Instant, delay: Duration) -> bool {
    if !needed {
        *at = None;
        return false;
    }
    if *at.get_or_insert(now + delay) > now {
        return false;
    }
    *at = None;
    true
}

/// Publishes while the window has room; whether a full request channel stopped it (so a
/// retry is due).
fn drain(spool: &mut Spool, outbox: &Outbox, held: &mut Option<(u64, Record)>) -> bool {
    while spool.inflight() < DRAIN_WINDOW {
        let next = match held.take() {
            Some(h) => Some(h),
            None => match spool.next_unsent() {
                Ok(n) => n,
                Err(e) => {
                    error!("spool: {e}");
                    None
                }
            },
        };
        let Some((tag, record)) = next else {
            return false;
        };
        match outbox.publish(
            &record.topic,
            QoS::AtLeastOnce,
            record.payload.clone(),
            Some(tag),
        ) {
            Ok(()) => spool.sent(tag, &record),
            Err(Refused::Full) => {
                *held = Some((tag, record));
                return true;
            }
            // The drain watch turns false with it; the spool rewinds then.
            Err(Refused::NotConnected | Refused::Closed) => {
                *held = Some((tag, record));
                return false;
            }
        }
    }
    false
}

fn publish_report(spool: &Spool, outputs: &SpoolOutputs) {
    outputs.dropped.send_if_modified(|d| {
        let changed = d != spool.dropped();
        if changed {
            d.clone_from(spool.dropped());
        }
        changed
    });
    outputs.report.send_if_modified(|r| {
        let queued = spool.queued_bytes();
        let changed = r.queued_bytes != queued || &r.dropped != spool.dropped();
        if changed {
            r.queued_bytes = queued;
            r.dropped.clone_from(spool.dropped());
        }
        changed
    });
}

/// Counts telemetry the spool could not keep, and logs the count now and then.
#[derive(Debug, Default)]
struct DropLog {
    count: u64,
    last_log: Option<Instant>,
}

impl DropLog {
    fn dropped(&mut self, n: u64) {
        self.count += n;
        if self.count > 0
            && self
                .last_log
                .is_none_or(|at| at.elapsed() >= DROP_LOG_EVERY)
        {
            warn!(
                "{} telemetry messages dropped: the spool is full, or an instance is over its \
                 quota (counted per instance in state/$agent/telemetry-dropped)",
                self.count
            );
            self.count = 0;
            self.last_log = Some(Instant::now());
        }
    }
}
