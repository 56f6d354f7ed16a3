//! Credentials rotated without a restart: when a renewal tool replaces the CA, client
//! certificate or key, hubd reconnects with the new set; a set that does not load is refused,
//! logged, and the connection goes on with the one in use.
//!
//! [`Rule`] decides (pure): a set is tried once it is the same on two checks in a row, so a
//! tool that writes the certificate and then the key is not caught between the two; a set
//! tried once is not tried again until the files change. [`watch`] reads the files every
//! [`CHECK_PERIOD`] and builds the set the rule lets through; [`Credentials`] is what the next
//! connection uses, and [`reconnect_when_renewed`] ends the current one with a DISCONNECT so
//! that the driver connects again with them. Nothing queued is lost: the spool sends again
//! whatever the broker had not acknowledged.
//!
//! The files are read, not watched with inotify: a renewal replaces them by rename, sometimes
//! of a directory or a symlink (`..data` swaps), which an inotify watch on the old inode
//! misses, and reading three files of a few KiB every few seconds costs nothing measurable.

use std::fmt;
use std::time::Duration;

use rumqttc::{MqttOptions, Transport};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::HubConfig;
use crate::outbox::{Outbox, Refused};
use crate::tls::{self, TlsBytes};

/// How often the files are read. Renewal tools replace certificates days to minutes before
/// the old ones expire, so a new set is in use within two periods (a period to settle, one to
/// be seen); the cost is three small reads per period.
pub const CHECK_PERIOD: Duration = Duration::from_secs(2);
/// Retry delay of a DISCONNECT that found rumqttc's request channel full (it drains at the
/// broker's pace; a few polls at most).
const DISCONNECT_RETRY: Duration = Duration::from_millis(100);

/// What one check read: the files' contents, or why they could not be read.
pub type Observation = Result<TlsBytes, String>;

/// What to do after a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: the files hold the set in use, or a set already tried.
    Keep,
    /// The files changed since the last check: wait for them to settle.
    Settling,
    /// A new set, settled: build it, and use it if it builds.
    Try(TlsBytes),
    /// The files cannot be read (settled that way): refuse, keep the connection.
    Unreadable(String),
}

/// Decides, check after check, when a new set of files is tried.
#[derive(Debug)]
pub struct Rule {
    in_use: TlsBytes,
    last_seen: Option<Observation>,
    tried: Option<Observation>,
}

impl Rule {
    /// The rule for a connection built from `in_use`.
    pub fn new(in_use: TlsBytes) -> Self {
        Rule {
            in_use,
            last_seen: None,
            tried: None,
        }
    }

    /// What to do about what a check read.
    pub fn observe(&mut self, seen: Observation) -> Decision {
        let settled = self.last_seen.as_ref() == Some(&seen);
        self.last_seen = Some(seen.clone());
        if seen.as_ref() == Ok(&self.in_use) {
            // Unchanged, or put back: whatever was refused is no longer on disk.
            self.tried = None;
            return Decision::Keep;
        }
        if !settled {
            return Decision::Settling;
        }
        if self.tried.as_ref() == Some(&seen) {
            return Decision::Keep;
        }
        self.tried = Some(seen.clone());
        match seen {
            Ok(bytes) => Decision::Try(bytes),
            Err(message) => Decision::Unreadable(message),
        }
    }

    /// The set of the last [`Decision::Try`] built: it is the one in use now.
    pub fn accepted(&mut self, bytes: TlsBytes) {
        self.in_use = bytes;
        self.tried = None;
    }
}

/// What a rotation changes in the next connection's options: the TLS transport, and the
/// client id when the certificate's CN changed (the CN wins, as in [`crate::core::mqtt_options`]).
#[derive(Clone)]
pub struct Credentials {
    client_id: String,
    transport: Transport,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    fn new(cfg: &HubConfig, material: &tls::TlsMaterial) -> Self {
        let options = crate::core::mqtt_options(cfg, Some(material));
        Credentials {
            client_id: options.client_id(),
            transport: options.transport(),
        }
    }

    /// Sets them on the options of the next connection.
    pub fn apply(&self, options: &mut MqttOptions) {
        options
            .set_client_id(self.client_id.clone())
            .set_transport(self.transport.clone());
    }
}

/// The credentials the next connection uses; `None` until a rotation.
pub type NextCredentials = watch::Receiver<Option<Credentials>>;

/// Whether a rotation is waiting for a new connection.
pub fn pending(next: &NextCredentials) -> bool {
    next.has_changed().unwrap_or(false)
}

/// Before a connection attempt: sets the latest rotated credentials on `options`, if any.
pub fn use_latest(next: &mut NextCredentials, options: &mut MqttOptions) {
    if !pending(next) {
        return;
    }
    if let Some(credentials) = &*next.borrow_and_update() {
        info!(
            "connecting with the renewed TLS credentials (client id {:?})",
            credentials.client_id
        );
        credentials.apply(options);
    }
}

/// Waits for rotated credentials not yet used (forever once the watcher is gone).
pub async fn renewed(next: &mut NextCredentials) {
    if next.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Ends the current connection with a DISCONNECT whenever new credentials arrive, so that the
/// driver connects again with them. Not connected: the next attempt uses them anyway.
pub async fn reconnect_when_renewed(mut next: NextCredentials, outbox: Outbox) {
    while next.changed().await.is_ok() {
        loop {
            match outbox.disconnect() {
                Ok(()) | Err(Refused::NotConnected) => break,
                Err(Refused::Full) => tokio::time::sleep(DISCONNECT_RETRY).await,
                Err(Refused::Closed) => return,
            }
        }
    }
}

/// Checks the TLS files of `cfg` every [`CHECK_PERIOD`] against `in_use`, the set the
/// current connection was built from, and hands every new set that builds to `next`; one that
/// does not is logged and changes nothing. Ends when nobody follows `next`.
pub async fn watch(cfg: HubConfig, in_use: TlsBytes, next: watch::Sender<Option<Credentials>>) {
    let Some(files) = cfg.tls.clone() else {
        return;
    };
    let mut rule = Rule::new(in_use);
    let mut ticks = tokio::time::interval(CHECK_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !next.is_closed() {
        ticks.tick().await;
        let reading = files.clone();
        let seen = match tokio::task::spawn_blocking(move || tls::read(&reading)).await {
            Ok(read) => read.map_err(|e| e.to_string()),
            Err(e) => {
                warn!("reading the MQTT TLS files: {e}");
                continue;
            }
        };
        match rule.observe(seen) {
            Decision::Keep | Decision::Settling => {}
            Decision::Unreadable(message) => refused(&message),
            Decision::Try(bytes) => {
                match tls::build(&files, bytes.clone(), cfg.tls_insecure_skip_verify) {
                    Ok(material) => {
                        rule.accepted(bytes);
                        let credentials = Credentials::new(&cfg, &material);
                        info!(
                            "the MQTT TLS files changed and load (client id {:?}): reconnecting \
                             with them",
                            credentials.client_id
                        );
                        next.send_replace(Some(credentials));
                    }
                    Err(e) => refused(&e.to_string()),
                }
            }
        }
    }
}

fn refused(message: &str) {
    error!(
        "refused the changed MQTT TLS files: {message}; the connection keeps the previous \
         credentials (the files are used once they load)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ca: &str, cert: &str, key: &str) -> TlsBytes {
        TlsBytes {
            ca: ca.into(),
            client: Some((cert.into(), key.into())),
        }
    }

    #[test]
    fn unchanged_files_are_kept() {
        let mut rule = Rule::new(set("ca", "c1", "k1"));
        for _ in 0..3 {
            assert_eq!(rule.observe(Ok(set("ca", "c1", "k1"))), Decision::Keep);
        }
    }

    #[test]
    fn a_new_set_is_tried_once_it_is_the_same_on_two_checks() {
        let mut rule = Rule::new(set("ca", "c1", "k1"));
        assert_eq!(rule.observe(Ok(set("ca", "c2", "k1"))), Decision::Settling);
        // The key followed the certificate between two checks: still settling.
        assert_eq!(rule.observe(Ok(set("ca", "c2", "k2"))), Decision::Settling);
        assert_eq!(
            rule.observe(Ok(set("ca", "c2", "k2"))),
            Decision::Try(set("ca", "c2", "k2"))
        );
        rule.accepted(set("ca", "c2", "k2"));
        assert_eq!(rule.observe(Ok(set("ca", "c2", "k2"))), Decision::Keep);
        // A new CA alone is a new set too.
        assert_eq!(rule.observe(Ok(set("ca2", "c2", "k2"))), Decision::Settling);
        assert_eq!(
            rule.observe(Ok(set("ca2", "c2", "k2"))),
            Decision::Try(set("ca2", "c2", "k2"))
        );
    }

    #[test]
    fn a_refused_set_is_not_tried_again_until_the_files_change() {
        let mut rule = Rule::new(set("ca", "c1", "k1"));
        let broken = set("ca", "garbage", "k1");
        rule.observe(Ok(broken.clone()));
        assert_eq!(
            rule.observe(Ok(broken.clone())),
            Decision::Try(broken.clone())
        );
        // It did not build (not accepted): logged once, not every check.
        for _ in 0..3 {
            assert_eq!(rule.observe(Ok(broken.clone())), Decision::Keep);
        }
        // Fixed: picked up.
        let fixed = set("ca", "c2", "k2");
        assert_eq!(rule.observe(Ok(fixed.clone())), Decision::Settling);
        assert_eq!(rule.observe(Ok(fixed.clone())), Decision::Try(fixed));
    }

    #[test]
    fn unreadable_files_are_refused_once_and_a_set_put_back_is_the_one_in_use() {
        let mut rule = Rule::new(set("ca", "c1", "k1"));
        let gone = Err("reading the MQTT TLS client key /k: No such file".to_string());
        assert_eq!(rule.observe(gone.clone()), Decision::Settling);
        assert_eq!(
            rule.observe(gone.clone()),
            Decision::Unreadable("reading the MQTT TLS client key /k: No such file".into())
        );
        assert_eq!(rule.observe(gone.clone()), Decision::Keep);
        assert_eq!(rule.observe(Ok(set("ca", "c1", "k1"))), Decision::Keep);
        // Back to the same failure later: refused (and logged) again.
        rule.observe(gone.clone());
        assert!(matches!(rule.observe(gone), Decision::Unreadable(_)));
    }

    #[test]
    fn credentials_carry_the_new_cn_as_client_id() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let files = crate::tls::tests::write_pki(dir.path(), "renewed-cn");
        let cfg = crate::config::resolve(
            crate::config::HubSection {
                mqtt_host: Some("h".into()),
                mqtt_port: Some(1),
                client_id: Some("configured".into()),
                ..Default::default()
            },
            |_| None,
        )
        .unwrap();
        let material = tls::load(&files, false).unwrap();
        let mut options = MqttOptions::new("old-cn", "h", 1);
        Credentials::new(&cfg, &material).apply(&mut options);
        assert_eq!(options.client_id(), "renewed-cn");
        assert!(matches!(options.transport(), Transport::Tls(_)));
    }
}
