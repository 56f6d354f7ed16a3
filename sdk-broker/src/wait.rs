//! How long a `getEvent` waits. The wire gives an absolute `CLOCK_REALTIME` deadline (EVP's
//! format); it is turned into a monotonic one once, when the request arrives, so a wall-clock
//! step (NTP, an operator's `date`) after that neither stretches nor cuts the wait: a step back
//! of an hour no longer stalls every module's `getEvent` for an hour.

use std::time::{Duration, Instant, SystemTime};

/// The end of one `getEvent`'s wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Until this monotonic instant (now or earlier: a poll).
    Until(Instant),
    /// No deadline the clocks can hold: until an event comes.
    Forever,
}

impl Wait {
    /// The wait a request with the deadline `sec`.`nsec` asks for, as seen at `wall_now` and
    /// `mono_now` (both read when the request arrived): bounded by the time left then.
    pub(crate) fn of_deadline(
        sec: u64,
        nsec: u64,
        wall_now: SystemTime,
        mono_now: Instant,
    ) -> Wait {
        let Some(at) = Duration::from_secs(sec)
            .checked_add(Duration::from_nanos(nsec))
            .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
        else {
            return Wait::Forever;
        };
        let left = at.duration_since(wall_now).unwrap_or(Duration::ZERO);
        mono_now
            .checked_add(left)
            .map_or(Wait::Forever, Wait::Until)
    }

    /// What is left of the wait at `now`; `None` for [`Wait::Forever`].
    pub(crate) fn left(self, now: Instant) -> Option<Duration> {
        match self {
            Wait::Until(t) => Some(t.saturating_duration_since(now)),
            Wait::Forever => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_is_the_time_left_when_the_request_arrived_whatever_the_wall_clock_does() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mono = Instant::now();
        let ten_s = wall + Duration::from_secs(10);
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let at = secs(ten_s);
        let w = Wait::of_deadline(at.as_secs(), u64::from(at.subsec_nanos()), wall, mono);
        assert_eq!(w, Wait::Until(mono + Duration::from_secs(10)));
        // The wall clock is stepped back an hour while the request waits: the wait is read on
        // the monotonic clock only, so 4 s later 6 s are left, not an hour and 6 s.
        assert_eq!(
            w.left(mono + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        assert_eq!(w.left(mono + Duration::from_secs(11)), Some(Duration::ZERO));
        // A deadline in the past is a poll; one the clocks cannot hold is no deadline.
        assert_eq!(Wait::of_deadline(0, 0, wall, mono), Wait::Until(mono));
        assert_eq!(Wait::of_deadline(u64::MAX, 0, wall, mono), Wait::Forever);
        // evp-sdk's "forever" (`i64::MAX` s) is held, and is as good as forever.
        let far = Wait::of_deadline(i64::MAX as u64, 0, wall, mono).left(mono);
        assert!(far.is_some_and(|l| l > Duration::from_secs(100 * 365 * 86_400)));
    }
}
