//! Pure timing state machines, fed with `Instant`s: when a status report goes out, and how long
//! to wait before reconnecting.

use std::time::{Duration, Instant};

use crate::config::Intervals;

/// What the report timer wants done now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportDecision {
    /// Publish the report now.
    SendNow,
    /// Nothing now; ask again at this instant (or earlier, if the report changes).
    WaitUntil(Instant),
    /// Nothing until the report changes.
    Idle,
}

/// When the status report is sent: the first at once after a connect; a changed one as soon as
/// the minimum interval since the last one allows (no fixed poll floor); an unchanged one again
/// after the maximum interval (never when it is `None`).
#[derive(Debug, Default)]
pub struct ReportTimer {
    last: Option<(Instant, String)>,
}

impl ReportTimer {
    /// A timer that sends the next report at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the last report, so the next one goes out at once (after a reconnect).
    pub fn reset(&mut self) {
        self.last = None;
    }

    /// Whether a report was sent since the last reset.
    pub fn has_sent(&self) -> bool {
        self.last.is_some()
    }

    /// What to do with `payload`, the report as it would be sent now.
    pub fn decide(&self, now: Instant, payload: &str, intervals: Intervals) -> ReportDecision {
        let Some((at, last_payload)) = &self.last else {
            return ReportDecision::SendNow;
        };
        let due = if last_payload != payload {
            Some(*at + intervals.min)
        } else {
            intervals.max.map(|max| *at + max)
        };
        match due {
            Some(due) if due <= now => ReportDecision::SendNow,
            Some(due) => ReportDecision::WaitUntil(due),
            None => ReportDecision::Idle,
        }
    }

    /// Records that `payload` was published at `now`.
    pub fn sent(&mut self, now: Instant, payload: String) {
        self.last = Some((now, payload));
    }
}

/// First reconnect delay (EVP: 1 s).
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest reconnect delay: 1 s · 2^6, EVP's longest wait.
const BACKOFF_MAX: Duration = Duration::from_secs(64);
/// A connection that stayed up this long resets the backoff (EVP's "recovering grace period").
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);

/// hubd's reconnect schedule: 1, 2, 4 ... 64 s, each shortened by up to a quarter at random
/// (see [`evp_daemon::Backoff`]), so a fleet that lost its broker at once does not come back in
/// lock-step (taking off, not adding, keeps the 64 s cap).
pub fn reconnect_backoff() -> evp_daemon::Backoff {
    evp_daemon::Backoff::new(BACKOFF_BASE, BACKOFF_MAX)
}

/// Longest reconnect delay while the broker's host refuses TCP connections. Its link is up
/// and the broker restarting; 64 s there kept devices away for most of a minute after it was
/// back. Jitter still spreads a fleet (a quarter of 8 s).
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(8);

/// The schedule while the broker's host refuses connections: 1, 2, 4, 8, 8 ... s, jittered.
pub fn refused_backoff() -> evp_daemon::Backoff {
    evp_daemon::Backoff::new(BACKOFF_BASE, REFUSED_BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn iv(min: u64, max: Option<u64>) -> Intervals {
        Intervals {
            min: Duration::from_secs(min),
            max: max.map(Duration::from_secs),
        }
    }

    #[test]
    fn first_report_goes_at_once_then_changes_wait_for_min() {
        let t0 = Instant::now();
        let mut t = ReportTimer::new();
        let i = iv(3, Some(180));
        assert_eq!(t.decide(t0, "a", i), ReportDecision::SendNow);
        t.sent(t0, "a".into());
        // Unchanged: wait for max.
        assert_eq!(
            t.decide(t0 + S, "a", i),
            ReportDecision::WaitUntil(t0 + 180 * S)
        );
        // Changed one second later: not before min.
        assert_eq!(
            t.decide(t0 + S, "b", i),
            ReportDecision::WaitUntil(t0 + 3 * S)
        );
        // Changed after min: right away, no extra poll floor.
        assert_eq!(t.decide(t0 + 3 * S, "b", i), ReportDecision::SendNow);
        t.sent(t0 + 3 * S, "b".into());
        // Unchanged past max: forced.
        assert_eq!(t.decide(t0 + 183 * S, "b", i), ReportDecision::SendNow);
    }

    #[test]
    fn min_zero_sends_every_change_and_never_max_idles() {
        let t0 = Instant::now();
        let mut t = ReportTimer::new();
        let i = iv(0, None);
        t.sent(t0, "a".into());
        assert_eq!(t.decide(t0, "b", i), ReportDecision::SendNow);
        assert_eq!(t.decide(t0 + 1000 * S, "a", i), ReportDecision::Idle);
    }

    #[test]
    fn reset_sends_at_once() {
        let t0 = Instant::now();
        let mut t = ReportTimer::new();
        t.sent(t0, "a".into());
        t.reset();
        assert_eq!(t.decide(t0, "a", iv(3, Some(180))), ReportDecision::SendNow);
    }

    #[test]
    fn the_refused_schedule_is_capped_and_jittered() {
        let mut b = refused_backoff();
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(
            delays.iter().all(|d| *d <= REFUSED_BACKOFF_MAX),
            "{delays:?}"
        );
        assert!(
            delays[7] >= REFUSED_BACKOFF_MAX * 3 / 4,
            "jittered, not shortened: {delays:?}"
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = reconnect_backoff();
        let delays: Vec<u64> = (0..9).map(|_| b.next_delay_with(0.0).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 64, 64]);
        let jittered = b.next_delay_with(0.999);
        assert!(jittered >= Duration::from_secs(48) && jittered <= Duration::from_secs(64));
        b.reset();
        assert_eq!(b.next_delay_with(0.0), S);
    }
}
