//! Which broker the next connection attempt dials, and after how long: a pure state machine
//! fed with what happened and a jitter value, so its schedule is unit-tested without clocks.
//!
//! With one broker it is hubd's reconnect schedule ([`crate::timing`]). With several (the
//! configured host, then `mqtt_failover_brokers`), a broker that fails hands over to the next
//! one after at most [`HANDOVER_SPREAD`], and once every broker failed in a row the list starts
//! again after the reconnect backoff. The first attempt after a stable connection dropped waits
//! a random part of [`FIRST_RECONNECT_SPREAD`], so a fleet whose broker restarted does not come
//! back in the same instant.

use std::time::Duration;

use evp_daemon::Backoff;

use crate::timing::{BACKOFF_RESET_AFTER, reconnect_backoff, refused_backoff};

/// The first attempt after a stable connection dropped is spread over this: EVP's first
/// reconnect delay, taken as a whole rather than shortened by a quarter, so a hundred devices
/// that lost their broker together reconnect over a second, not a quarter of one.
pub const FIRST_RECONNECT_SPREAD: Duration = Duration::from_secs(1);

/// A failed broker hands over to the next one within this: soon, since the others are likely
/// up, but spread, so the devices leaving a node that went away do not all land on the next
/// node at once.
pub const HANDOVER_SPREAD: Duration = Duration::from_secs(1);

/// How an attempt or a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// An attempt failed with the broker's host refusing the TCP connection (its link is up,
    /// the broker not listening): retried on the short schedule.
    Refused,
    /// An attempt failed otherwise (timeout, unreachable, TLS, MQTT or proxy refusal).
    Other,
    /// An established connection went away after being up this long.
    Dropped {
        /// How long it had been up.
        up_for: Duration,
    },
}

/// The next connection attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NextAttempt {
    /// Index of the broker to dial, in [`crate::config::HubConfig::brokers`] order.
    pub broker: usize,
    /// How long to wait before dialling it.
    pub delay: Duration,
}

/// The chooser's state.
#[derive(Debug, Clone)]
pub struct Failover {
    brokers: usize,
    current: usize,
    /// Attempts failed since the last connection or the last full round.
    failed_in_round: usize,
    backoff: Backoff,
    refused_backoff: Backoff,
}

impl Failover {
    /// A chooser over `brokers` addresses (at least one), starting with the first.
    pub fn new(brokers: usize) -> Self {
        Failover {
            brokers: brokers.max(1),
            current: 0,
            failed_in_round: 0,
            backoff: reconnect_backoff(),
            refused_backoff: refused_backoff(),
        }
    }

    /// The broker being dialled or connected to.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The attempt reached the broker: a new round starts with the next failure.
    pub fn connected(&mut self) {
        self.failed_in_round = 0;
    }

    /// What to do after `failure`; `jitter` is a random value in `[0, 1)` (0: none).
    pub fn next(&mut self, failure: Failure, jitter: f64) -> NextAttempt {
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let delay = match failure {
            Failure::Dropped { up_for } if up_for >= BACKOFF_RESET_AFTER => {
                self.backoff.reset();
                self.refused_backoff.reset();
                self.failed_in_round = 0;
                FIRST_RECONNECT_SPREAD.mul_f64(jitter)
            }
            // A connection that keeps dropping soon after it came up backs off as before.
            Failure::Dropped { .. } => self.backoff.next_delay_with(jitter),
            Failure::Refused | Failure::Other => {
                self.failed_in_round += 1;
                if self.failed_in_round < self.brokers {
                    HANDOVER_SPREAD.mul_f64(jitter)
                } else {
                    self.failed_in_round = 0;
                    match failure {
                        Failure::Refused => self.refused_backoff.next_delay_with(jitter),
                        _ => self.backoff.next_delay_with(jitter),
                    }
                }
            }
        };
        // The one that failed or dropped is likely going away: the next is tried first.
        self.current = (self.current + 1) % self.brokers;
        NextAttempt {
            broker: self.current,
            delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const STABLE: Failure = Failure::Dropped {
        up_for: BACKOFF_RESET_AFTER,
    };

    fn delays(f: &mut Failover, failure: Failure, n: usize) -> Vec<(usize, Duration)> {
        (0..n)
            .map(|_| {
                let a = f.next(failure, 0.0);
                (a.broker, a.delay)
            })
            .collect()
    }

    #[test]
    fn one_broker_keeps_the_reconnect_schedules() {
        let mut f = Failover::new(1);
        let secs: Vec<u64> = delays(&mut f, Failure::Other, 8)
            .into_iter()
            .map(|(b, d)| {
                assert_eq!(b, 0);
                d.as_secs()
            })
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 64]);
        let mut f = Failover::new(1);
        let secs: Vec<u64> = delays(&mut f, Failure::Refused, 6)
            .into_iter()
            .map(|(_, d)| d.as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 8, 8]);
        // Jittered by a quarter at most, as hubd always did.
        let d = Failover::new(1).next(Failure::Other, 0.999).delay;
        assert!(d > S * 3 / 4 && d <= S, "{d:?}");
    }

    #[test]
    fn a_failed_broker_hands_over_soon_and_a_failed_round_backs_off() {
        let mut f = Failover::new(3);
        assert_eq!(f.current(), 0);
        // Round 1: 0 failed → 1 soon, 1 failed → 2 soon, 2 failed → back to 0 after 1 s.
        assert_eq!(
            delays(&mut f, Failure::Other, 3),
            [(1, Duration::ZERO), (2, Duration::ZERO), (0, S)]
        );
        // Round 2 backs off further at its end.
        assert_eq!(
            delays(&mut f, Failure::Refused, 3),
            [(1, Duration::ZERO), (2, Duration::ZERO), (0, S)],
            "the refused schedule has its own count"
        );
        assert_eq!(delays(&mut f, Failure::Other, 3)[2], (0, 2 * S));
        // Hand-overs are spread over at most HANDOVER_SPREAD.
        let d = f.next(Failure::Other, 0.999).delay;
        assert!(d > Duration::ZERO && d < HANDOVER_SPREAD, "{d:?}");
    }

    #[test]
    fn a_connection_starts_a_new_round() {
        let mut f = Failover::new(2);
        assert_eq!(f.next(Failure::Other, 0.0).broker, 1);
        f.connected();
        // 1 fails after the connection: the round is 1 then 0, so 0 is tried soon.
        assert_eq!(
            f.next(Failure::Other, 0.0),
            NextAttempt {
                broker: 0,
                delay: Duration::ZERO
            }
        );
    }

    #[test]
    fn a_stable_connection_that_drops_reconnects_within_a_jittered_second_to_the_next() {
        let mut f = Failover::new(2);
        delays(&mut f, Failure::Other, 6); // backoff grown
        f.connected();
        let a = f.next(STABLE, 0.5);
        assert_eq!(a.delay, FIRST_RECONNECT_SPREAD / 2);
        let first = f.current();
        // The backoff starts over: the next full round waits 1 s again.
        assert_eq!(delays(&mut f, Failure::Other, 2)[1].1, S);
        assert_eq!(f.current(), first);
        // Spread over the whole second, not only its last quarter.
        let spread: Vec<Duration> = [0.0, 0.3, 0.9]
            .iter()
            .map(|j| Failover::new(1).next(STABLE, *j).delay)
            .collect();
        assert_eq!(spread[0], Duration::ZERO);
        assert!(spread[1] < FIRST_RECONNECT_SPREAD / 2 && spread[2] > spread[1]);
    }

    #[test]
    fn a_connection_that_keeps_dropping_backs_off() {
        let mut f = Failover::new(1);
        let short = Failure::Dropped { up_for: S };
        let secs: Vec<u64> = delays(&mut f, short, 4)
            .into_iter()
            .map(|(_, d)| d.as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8]);
    }
}
