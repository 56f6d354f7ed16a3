//! Exponential backoff with jitter, shared by download retries, deployment retries and instance
//! restarts. The schedule is a pure function so tests can check it without clocks.

use std::time::Duration;

/// Share of a delay that jitter may take away: the actual delay lies between 3/4 and all of the
/// exponential step, so devices that failed together (a server outage) do not come back in
/// lockstep, and no retry comes sooner than 3/4 of the configured base.
const JITTER_SHARE: f64 = 0.25;

/// Largest doubling exponent computed; 2^32 times any base in milliseconds is beyond every cap.
const MAX_EXPONENT: u32 = 32;

/// The delay before retry number `attempt` (0 for the first retry): `base · 2^attempt`, capped at
/// `max`, then shortened by up to a quarter according to `jitter` (in `[0, 1)`, clamped).
pub fn delay(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let step = base
        .checked_mul(1u32 << attempt.min(MAX_EXPONENT - 1))
        .unwrap_or(max)
        .min(max);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    step.mul_f64(1.0 - JITTER_SHARE * jitter)
}

/// A jitter value in `[0, 1)` from the thread's random generator.
pub fn random_jitter() -> f64 {
    rand::random::<f64>()
}

/// A retry schedule: the attempt count and the configured base and cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A schedule starting at `base`, never waiting longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The next delay (with jitter); each call doubles the following one up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = delay(self.attempt, self.base, self.max, random_jitter());
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Starts over from `base` (after a success or a new deployment).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn doubles_up_to_the_cap_without_jitter() {
        let max = Duration::from_secs(60);
        let got: Vec<u64> = (0..9).map(|a| delay(a, S, max, 0.0).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        // Huge attempt numbers neither overflow nor pass the cap.
        assert_eq!(delay(u32::MAX, S, max, 0.0), max);
    }

    #[test]
    fn jitter_shortens_by_at_most_a_quarter() {
        let max = Duration::from_secs(60);
        assert_eq!(delay(2, S, max, 1.0), Duration::from_secs(3));
        assert_eq!(delay(2, S, max, 0.5), Duration::from_millis(3500));
        // Out-of-range jitter is clamped.
        assert_eq!(delay(0, S, max, 7.0), Duration::from_millis(750));
        assert_eq!(delay(0, S, max, f64::NAN), S);
        for _ in 0..100 {
            let d = Backoff::new(S, max).next_delay();
            assert!(d >= Duration::from_millis(750) && d <= S, "{d:?}");
        }
    }

    #[test]
    fn schedule_grows_and_resets() {
        let mut b = Backoff::new(S, Duration::from_secs(4));
        let d: Vec<Duration> = (0..4).map(|_| b.next_delay()).collect();
        assert!(d[0] <= S && d[1] > S && d[2] > 2 * S && d[3] > 2 * S && d[3] <= 4 * S);
        b.reset();
        assert!(b.next_delay() <= S);
    }
}
