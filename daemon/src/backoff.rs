//! Exponential backoff with jitter, for every retry the daemons make (hubd's reconnects,
//! reconcilerd's downloads, deployment retries and instance restarts, waiting for a bus name).
//! The schedule is a pure function so tests can check it without clocks.

use std::time::Duration;

/// Share of a delay that jitter may take away: the actual delay lies between 3/4 and all of the
/// exponential step, so devices that failed together (a server outage) do not come back in
/// lockstep; taking off rather than adding keeps the cap a cap.
pub const JITTER_SHARE: f64 = 0.25;

/// Largest doubling exponent computed; 2^32 times any base in milliseconds is beyond every cap.
const MAX_EXPONENT: u32 = 32;

/// The delay before retry number `attempt` (0 for the first retry): `base · 2^attempt`, capped at
/// `max`, then shortened by up to a quarter according to `jitter` (in `[0, 1)`, clamped; 0 for
/// no jitter).
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

/// A retry schedule: the attempt count and the caller's base and cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A schedule starting at `base`, doubling, never waiting longer than `max` (nor less
    /// than `base` at the cap).
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The next delay, shortened by a random jitter; each call doubles the following one up
    /// to the cap.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(random_jitter())
    }

    /// The next delay with the caller's `jitter` (see [`delay`]; 0 for none).
    pub fn next_delay_with(&mut self, jitter: f64) -> Duration {
        let d = delay(self.attempt, self.base, self.max, jitter);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Starts over from `base` (after a success, a stable connection, a new deployment).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    #[test]
    fn schedule_table() {
        fn check(base: Duration, max: Duration, jitter: f64, expect_ms: &[u64]) {
            let mut b = Backoff::new(base, max);
            let got: Vec<u64> = expect_ms
                .iter()
                .map(|_| b.next_delay_with(jitter).as_millis() as u64)
                .collect();
            assert_eq!(
                got, expect_ms,
                "base {base:?}, max {max:?}, jitter {jitter}"
            );
        }
        // reconcilerd's defaults-like schedule, capped between two doublings.
        check(
            S,
            60 * S,
            0.0,
            &[1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000],
        );
        // hubd's reconnects (EVP): 1 s to 64 s.
        check(
            S,
            64 * S,
            0.0,
            &[1000, 2000, 4000, 8000, 16000, 32000, 64000, 64000],
        );
        // Waiting for a bus name: 100 ms to 5 s, no jitter.
        check(
            100 * MS,
            5 * S,
            0.0,
            &[100, 200, 400, 800, 1600, 3200, 5000, 5000],
        );
        // Full jitter takes a quarter off every step, the cap included.
        check(S, 4 * S, 1.0, &[750, 1500, 3000, 3000]);
        // A cap below the base is the base.
        check(S, MS, 0.0, &[1000, 1000]);
    }

    #[test]
    fn huge_attempts_neither_overflow_nor_pass_the_cap() {
        let max = Duration::from_secs(60);
        assert_eq!(delay(u32::MAX, S, max, 0.0), max);
        let mut b = Backoff::new(S, max);
        for _ in 0..100 {
            b.next_delay_with(0.0);
        }
        assert_eq!(b.next_delay_with(0.0), max);
    }

    #[test]
    fn jitter_shortens_by_at_most_a_quarter() {
        let max = Duration::from_secs(60);
        assert_eq!(delay(2, S, max, 1.0), Duration::from_secs(3));
        assert_eq!(delay(2, S, max, 0.5), Duration::from_millis(3500));
        // Out-of-range jitter is clamped, and NaN is none.
        assert_eq!(delay(0, S, max, 7.0), Duration::from_millis(750));
        assert_eq!(delay(0, S, max, f64::NAN), S);
        for _ in 0..100 {
            let d = Backoff::new(S, max).next_delay();
            assert!(d >= Duration::from_millis(750) && d <= S, "{d:?}");
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(S, Duration::from_secs(4));
        let d: Vec<Duration> = (0..4).map(|_| b.next_delay()).collect();
        assert!(d[0] <= S && d[1] > S && d[2] > 2 * S && d[3] > 2 * S && d[3] <= 4 * S);
        b.reset();
        assert_eq!(b.next_delay_with(0.0), S);
    }
}
