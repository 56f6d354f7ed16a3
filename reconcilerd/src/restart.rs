//! The restart policy: what happens when an instance exits by itself. A pure state machine fed
//! with exits, starts and `Instant`s, so every decision is testable without a clock or a bus.

use std::time::{Duration, Instant};

use evp_daemon::backoff;
use evp_schemas::RestartPolicy;

/// The agent-wide restart settings (`[reconciler] restart_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartConfig {
    /// Delay before the first restart; it doubles with each consecutive one.
    pub base: Duration,
    /// Longest delay between restarts.
    pub max: Duration,
    /// An instance that ran this long since its last start counts as healthy: its next exit
    /// starts the backoff and the count over.
    pub reset_after: Duration,
    /// Consecutive restarts after which the instance is left in `error`.
    pub limit: u32,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(60),
            limit: 5,
        }
    }
}

/// How an instance ended, as its runtime reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exited with status 0 by itself (`self-exiting`).
    Clean,
    /// Crashed: non-zero exit, signal, trap, or a failed restart; the runtime's reason.
    Failure(String),
}

/// What to do about an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it again at `at`; this is restart number `attempt` (1-based) of `limit`.
    Restart {
        /// When to call `StartInstance` again.
        at: Instant,
        /// Which consecutive restart this is.
        attempt: u32,
        /// The wait, for messages.
        delay: Duration,
    },
    /// Leave it as it is (`self-exiting`, or `error` under `never`).
    Stay,
    /// The limit of consecutive restarts was reached; it stays in `error`.
    GiveUp {
        /// How many restarts were tried.
        restarts: u32,
    },
}

/// The restart bookkeeping of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartState {
    /// Consecutive restarts since it last ran healthy.
    restarts: u32,
    /// When it was last (re)started or adopted.
    started_at: Instant,
    /// A restart is scheduled for then.
    pending: Option<Instant>,
}

impl RestartState {
    /// A fresh instance started (or found running) at `now`.
    pub fn new(now: Instant) -> Self {
        RestartState {
            restarts: 0,
            started_at: now,
            pending: None,
        }
    }

    /// When a restart is due, if one is scheduled.
    pub fn pending(&self) -> Option<Instant> {
        self.pending
    }

    /// Consecutive restarts since it last ran healthy.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// The instance exited at `now`; decides, and schedules a restart when one is due.
    /// `jitter` in `[0, 1)` shortens the backoff (see [`backoff::delay`]).
    pub fn on_exit(
        &mut self,
        policy: RestartPolicy,
        config: &RestartConfig,
        exit: &Exit,
        now: Instant,
        jitter: f64,
    ) -> Decision {
        if now.saturating_duration_since(self.started_at) >= config.reset_after {
            self.restarts = 0;
        }
        let wanted = match (policy, exit) {
            (RestartPolicy::Never, _) | (RestartPolicy::OnFailure, Exit::Clean) => false,
            (RestartPolicy::OnFailure, Exit::Failure(_)) | (RestartPolicy::Always, _) => true,
        };
        if !wanted {
            self.pending = None;
            return Decision::Stay;
        }
        if self.restarts >= config.limit {
            self.pending = None;
            return Decision::GiveUp {
                restarts: self.restarts,
            };
        }
        let delay = backoff::delay(self.restarts, config.base, config.max, jitter);
        self.restarts += 1;
        let at = now + delay;
        self.pending = Some(at);
        Decision::Restart {
            at,
            attempt: self.restarts,
            delay,
        }
    }

    /// The scheduled restart was made at `now` (whether the start worked is told by the next
    /// exit, if any).
    pub fn on_restarted(&mut self, now: Instant) {
        self.started_at = now;
        self.pending = None;
    }

    /// Drops a scheduled restart (the runtime went away and will report afresh).
    pub fn cancel(&mut self) {
        self.pending = None;
    }
}

/// The failure message that explains an exit and what comes of it.
pub fn describe(reason: &str, decision: &Decision, limit: u32, now: Instant) -> String {
    match decision {
        Decision::Restart { at, attempt, .. } => {
            let wait = at.saturating_duration_since(now);
            format!(
                "{reason}; restart {attempt} of {limit} in {}",
                human_duration(wait)
            )
        }
        Decision::Stay => reason.to_owned(),
        Decision::GiveUp { restarts } => format!(
            "{reason}; gave up after {restarts} restart{}",
            if *restarts == 1 { "" } else { "s" }
        ),
    }
}

/// `4s`, `1.5s`, `250ms`: short enough for a status line.
fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RestartConfig {
        RestartConfig {
            base: Duration::from_secs(1),
            max: Duration::from_secs(8),
            reset_after: Duration::from_secs(60),
            limit: 5,
        }
    }

    fn crash() -> Exit {
        Exit::Failure("exited with status 3".into())
    }

    /// Feeds `n` quick crashes, restarting right when due; returns the decisions.
    fn crash_loop(
        s: &mut RestartState,
        policy: RestartPolicy,
        n: usize,
        t: &mut Instant,
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        for _ in 0..n {
            *t += Duration::from_millis(100);
            let d = s.on_exit(policy, &config(), &crash(), *t, 0.0);
            if let Decision::Restart { at, .. } = d {
                *t = at;
                s.on_restarted(*t);
            }
            out.push(d);
        }
        out
    }

    #[test]
    fn crashes_restart_with_doubling_delays_then_give_up() {
        let t0 = Instant::now();
        let mut t = t0;
        let mut s = RestartState::new(t0);
        let decisions = crash_loop(&mut s, RestartPolicy::OnFailure, 7, &mut t);
        let delays: Vec<u64> = decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Restart { delay, .. } => Some(delay.as_secs()),
                _ => None,
            })
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 8], "capped at max");
        assert_eq!(decisions[5], Decision::GiveUp { restarts: 5 });
        assert_eq!(decisions[6], Decision::GiveUp { restarts: 5 });
        assert_eq!(s.pending(), None);
        assert_eq!(
            describe("exited with status 3", &decisions[5], 5, t),
            "exited with status 3; gave up after 5 restarts"
        );
    }

    #[test]
    fn running_healthy_resets_the_count() {
        let t0 = Instant::now();
        let mut t = t0;
        let mut s = RestartState::new(t0);
        crash_loop(&mut s, RestartPolicy::OnFailure, 3, &mut t);
        assert_eq!(s.restarts(), 3);
        // It then runs for a minute before crashing again: back to the first delay.
        t += Duration::from_secs(60);
        let d = s.on_exit(RestartPolicy::OnFailure, &config(), &crash(), t, 0.0);
        assert_eq!(
            d,
            Decision::Restart {
                at: t + Duration::from_secs(1),
                attempt: 1,
                delay: Duration::from_secs(1)
            }
        );
        assert_eq!(
            describe("exited with status 3", &d, 5, t),
            "exited with status 3; restart 1 of 5 in 1s"
        );
    }

    #[test]
    fn clean_exits_stay_unless_always() {
        let t = Instant::now();
        let c = config();
        for policy in [RestartPolicy::OnFailure, RestartPolicy::Never] {
            let mut s = RestartState::new(t);
            assert_eq!(s.on_exit(policy, &c, &Exit::Clean, t, 0.0), Decision::Stay);
        }
        let mut s = RestartState::new(t);
        assert!(matches!(
            s.on_exit(RestartPolicy::Always, &c, &Exit::Clean, t, 0.0),
            Decision::Restart { attempt: 1, .. }
        ));
        assert!(s.pending().is_some());
    }

    #[test]
    fn never_leaves_a_crash_alone() {
        let t = Instant::now();
        let mut s = RestartState::new(t);
        let d = s.on_exit(RestartPolicy::Never, &config(), &crash(), t, 0.0);
        assert_eq!(d, Decision::Stay);
        assert_eq!(
            describe("killed by signal SIGSEGV", &d, 5, t),
            "killed by signal SIGSEGV"
        );
    }

    #[test]
    fn a_limit_of_zero_never_restarts() {
        let t = Instant::now();
        let mut s = RestartState::new(t);
        let c = RestartConfig {
            limit: 0,
            ..config()
        };
        let d = s.on_exit(RestartPolicy::Always, &c, &crash(), t, 0.0);
        assert_eq!(d, Decision::GiveUp { restarts: 0 });
    }

    #[test]
    fn jitter_shortens_the_wait_and_messages_round() {
        let t = Instant::now();
        let mut s = RestartState::new(t);
        let d = s.on_exit(RestartPolicy::OnFailure, &config(), &crash(), t, 1.0);
        assert_eq!(describe("x", &d, 5, t), "x; restart 1 of 5 in 750ms");
        let d = s.on_exit(RestartPolicy::OnFailure, &config(), &crash(), t, 0.5);
        assert_eq!(describe("x", &d, 5, t), "x; restart 2 of 5 in 1.8s");
    }
}
