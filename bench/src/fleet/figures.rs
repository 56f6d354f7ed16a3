//! The fleet's figures from what was observed, as pure functions: distributions of times, how
//! bunched the reconnections were, when an agent was connected again.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The value at percentile `p` (0-100) of `sorted` by nearest rank; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `samples` (by nearest rank), rounded to hundredths.
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    round(percentile(&sorted, 50.0))
}

/// Rounds to hundredths, so the JSON stays readable.
fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// min, p50, p95, max of `samples` and the spread (max - min), each `<name>_<unit>`.
pub fn distribution(samples: &[f64], unit: &str) -> Value {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let min = sorted.first().copied().unwrap_or_default();
    let max = sorted.last().copied().unwrap_or_default();
    let mut out = serde_json::Map::new();
    for (name, value) in [
        ("min", min),
        ("p50", percentile(&sorted, 50.0)),
        ("p95", percentile(&sorted, 95.0)),
        ("max", max),
        ("spread", max - min),
    ] {
        out.insert(format!("{name}_{unit}"), json!(round(value)));
    }
    Value::Object(out)
}

/// [`distribution`] of durations, in milliseconds.
pub fn ms_distribution(samples: &[Duration]) -> Value {
    let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    distribution(&ms, "ms")
}

/// The most of `times` that fall within any one `window` (`[t, t + window)`): the size of
/// the herd the broker had to take at once.
pub fn peak_in_window(times: &[Duration], window: Duration) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort();
    let mut peak = 0;
    let mut first = 0;
    for last in 0..sorted.len() {
        while sorted[last] - sorted[first] >= window {
            first += 1;
        }
        peak = peak.max(last - first + 1);
    }
    peak
}

/// hubd's `Hub1.Connection` when its MQTT session is up.
pub const CONNECTED: &str = "connected";

/// When the agent whose `Hub1.Connection` changes are `log` (in order) was connected again
/// after losing its broker at `lost`: the first `connected` after a change to anything else,
/// both after `lost`.
pub fn reconnected_at(log: &[(Instant, String)], lost: Instant) -> Option<Instant> {
    let mut went_away = false;
    for (at, state) in log.iter().filter(|(at, _)| *at >= lost) {
        if state != CONNECTED {
            went_away = true;
        } else if went_away {
            return Some(*at);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_by_nearest_rank() {
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 50.0), 50.0);
        assert_eq!(percentile(&hundred, 95.0), 95.0);
        assert_eq!(percentile(&hundred, 100.0), 100.0);
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 95.0), 10.0);
        assert_eq!(percentile(&ten, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn a_distribution_has_its_spread() {
        let d = distribution(&[30.0, 10.0, 20.0], "ms");
        assert_eq!(
            d,
            json!({"min_ms": 10.0, "p50_ms": 20.0, "p95_ms": 30.0, "max_ms": 30.0,
                   "spread_ms": 20.0})
        );
        let ms = ms_distribution(&[Duration::from_micros(1500)]);
        assert_eq!(ms["p50_ms"], 1.5);
        assert_eq!(ms["spread_ms"], 0.0);
    }

    #[test]
    fn the_peak_counts_the_busiest_window() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        let window = Duration::from_millis(100);
        // In lock-step: all at once.
        assert_eq!(peak_in_window(&ms(&[500, 500, 501, 502]), window), 4);
        // Spread: never more than two within 100 ms.
        assert_eq!(peak_in_window(&ms(&[0, 60, 120, 180, 240]), window), 2);
        // A window is half-open: 0 and 100 are not in one.
        assert_eq!(peak_in_window(&ms(&[100, 0]), window), 1);
        assert_eq!(peak_in_window(&[], window), 0);
    }

    #[test]
    fn reconnected_is_connected_after_having_gone_away() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let log = |v: &[(u64, &str)]| -> Vec<(Instant, String)> {
            v.iter().map(|(ms, s)| (at(*ms), (*s).to_owned())).collect()
        };
        let lost = at(100);
        // Connected before the loss does not count, nor a connected not preceded by a loss.
        let back = log(&[
            (0, "connected"),
            (150, "disconnected"),
            (160, "connecting"),
            (900, "connected"),
        ]);
        assert_eq!(reconnected_at(&back, lost), Some(at(900)));
        assert_eq!(
            reconnected_at(&log(&[(0, "connected"), (150, "connected")]), lost),
            None
        );
        // Still away.
        assert_eq!(
            reconnected_at(&log(&[(0, "connected"), (150, "connecting")]), lost),
            None
        );
        // The change to disconnected came before the loss was noted: not this loss.
        assert_eq!(
            reconnected_at(&log(&[(50, "disconnected"), (60, "connected")]), lost),
            None
        );
    }
}
