//! Telemetry's way to hubd: a signal to a name nobody owns is dropped by dbus-daemon without a
//! word, and one hubd had not read when it died is gone with it. So sdk-broker follows hubd's
//! telemetry name: while it is off the bus telemetry waits (and, behind it, each instance's
//! bounded queue, so a module meets `EVP_AGAIN`), and when a new hubd takes the name the
//! batches sent in the last moments before are sent again first (at-least-once: hubd's spool
//! may see some twice, never lose one).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::warn;

/// Who holds the name: whether anyone does, how many owners it had since sdk-broker started
/// (a new hubd is a new generation), and when the last one went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Someone owns it.
    pub present: bool,
    /// Owners seen after the first answer.
    pub generation: u64,
    /// When an owner last left the bus.
    pub vanished_at: Option<Instant>,
}

/// Follows the owner of `name`; present (generation 0) until the bus first answered.
pub fn follow_owner(conn: &zbus::Connection, name: &'static str) -> watch::Receiver<Owner> {
    let (tx, rx) = watch::channel(Owner {
        present: true,
        generation: 0,
        vanished_at: None,
    });
    let conn = conn.clone();
    tokio::spawn(async move {
        let follow = async {
            let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
            // Subscribed before asking, so no change falls between the two.
            let mut changes = dbus
                .receive_name_owner_changed_with_args(&[(0, name)])
                .await?;
            let present = dbus
                .name_has_owner(zbus::names::BusName::try_from(name)?)
                .await?;
            tx.send_modify(|o| o.present = present);
            while let Some(change) = futures_util::StreamExt::next(&mut changes).await {
                if let Ok(args) = change.args() {
                    let present = args.new_owner().is_some();
                    tx.send_modify(|o| {
                        if o.present && !present {
                            o.vanished_at = Some(Instant::now());
                        }
                        o.present = present;
                        o.generation += u64::from(present);
                    });
                }
            }
            Ok::<(), zbus::Error>(())
        };
        if let Err(e) = follow.await {
            warn!("not following {name} on the bus: {e}");
        }
    });
    rx
}

/// One `Telemetry` signal's entries.
pub type Batch = Vec<(String, String, String)>;

/// How long before hubd was seen leaving a batch counts as maybe unread: far beyond the time a
/// signal waits in hubd's socket under load, plus the time dbus-daemon takes to say it left.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(2);
/// Most bytes of entries kept for that (the oldest go first).
pub const REPLAY_BYTES: usize = 1 << 20;

/// The batches sent lately, under which owner.
#[derive(Debug, Default)]
pub struct Recent {
    generation: u64,
    batches: VecDeque<(Instant, Batch, usize)>,
    bytes: usize,
}

impl Recent {
    /// Before a send to `owner`: the batches to send again first, oldest first: those sent to
    /// an earlier owner within [`REPLAY_WINDOW`] before it was seen leaving (or after).
    pub fn replay_for(&mut self, owner: &Owner) -> Vec<Batch> {
        if owner.generation == self.generation {
            return Vec::new();
        }
        self.generation = owner.generation;
        self.bytes = 0;
        let since = owner
            .vanished_at
            .and_then(|at| at.checked_sub(REPLAY_WINDOW));
        self.batches
            .drain(..)
            .filter(|(at, _, _)| since.is_none_or(|s| *at >= s))
            .map(|(_, b, _)| b)
            .collect()
    }

    /// `batch` was sent at `now`.
    pub fn sent(&mut self, now: Instant, batch: Batch) {
        let size = batch
            .iter()
            .map(|(i, k, v)| i.len() + k.len() + v.len())
            .sum();
        self.bytes += size;
        self.batches.push_back((now, batch, size));
        self.forget_old(now);
        while self.bytes > REPLAY_BYTES {
            let Some((_, _, n)) = self.batches.pop_front() else {
                break;
            };
            self.bytes -= n;
        }
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some((at, _, n)) = self.batches.front() {
            if now.duration_since(*at) <= REPLAY_WINDOW {
                break;
            }
            self.bytes -= n;
            self.batches.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize) -> Batch {
        vec![("i".into(), "k".into(), n.to_string())]
    }

    fn owner(generation: u64, vanished_at: Option<Instant>) -> Owner {
        Owner {
            present: true,
            generation,
            vanished_at,
        }
    }

    #[test]
    fn a_new_owner_gets_what_the_last_moments_sent_again_in_order() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut r = Recent::default();
        assert!(r.replay_for(&owner(0, None)).is_empty());
        r.sent(t0, batch(1));
        r.sent(t0 + s(2), batch(2));
        r.sent(t0 + s(3), batch(3));
        assert!(r.replay_for(&owner(0, None)).is_empty(), "same owner");
        // hubd seen leaving at 3.5 s, back much later: batch 1 was sent more than the window
        // before; 2 and 3 go again, in order, once.
        let back = owner(1, Some(t0 + Duration::from_millis(3500)));
        assert_eq!(r.replay_for(&back), vec![batch(2), batch(3)]);
        assert!(r.replay_for(&back).is_empty());
    }

    #[test]
    fn what_is_kept_is_bounded_in_bytes() {
        let t0 = Instant::now();
        let mut r = Recent::default();
        let big = vec![("i".to_owned(), "k".to_owned(), "x".repeat(REPLAY_BYTES / 4))];
        for _ in 0..10 {
            r.sent(t0, big.clone());
        }
        assert!(r.bytes <= REPLAY_BYTES);
        assert_eq!(r.replay_for(&owner(1, Some(t0))).len(), 3);
    }
}
