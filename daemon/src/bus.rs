//! The life of a daemon's bus connection: owning the well-known name (waiting, with backoff,
//! while another connection holds it), exiting when the bus closes the connection, and pinging
//! the systemd watchdog only while a round trip to the bus proves the daemon can serve.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{error, info, warn};
use zbus::Connection;
use zbus::fdo::{DBusProxy, RequestNameFlags, RequestNameReply};

use crate::backoff::Backoff;

/// Exit status of a daemon whose bus connection died: non-zero so that systemd's
/// `Restart=on-failure` (and the devhub's Stack) start it again; 69 is `EX_UNAVAILABLE`.
pub const EXIT_BUS_LOST: i32 = 69;

/// First pause before asking again for a name someone else holds: a previous instance of the
/// daemon that is exiting releases it within milliseconds.
const NAME_RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between two requests: a name that frees is taken within this, and a
/// squatter costs the bus one call per period.
const NAME_RETRY_MAX: Duration = Duration::from_secs(5);
/// While the holder does not change, the warning is repeated this often, so a journal read
/// at any time shows why the daemon is not ready.
const NAME_WAIT_REMINDER: Duration = Duration::from_secs(60);

/// Who holds a name, as far as the bus tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's unique name (`:1.42`); `None` if it left between our request and the look-up.
    pub unique_name: Option<String>,
    /// Its process id, when the bus knows it.
    pub pid: Option<u32>,
    /// Its uid, when the bus knows it.
    pub uid: Option<u32>,
    /// Connections queued for the name after the holder.
    pub queued: Vec<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.unique_name {
            Some(n) => write!(f, "{n}")?,
            None => write!(f, "a connection that just left")?,
        }
        if let Some(pid) = self.pid {
            write!(f, " (pid {pid}")?;
            if let Some(uid) = self.uid {
                write!(f, ", uid {uid}")?;
            }
            write!(f, ")")?;
        } else if let Some(uid) = self.uid {
            write!(f, " (uid {uid})")?;
        }
        if !self.queued.is_empty() {
            write!(f, "; queued for it: {}", self.queued.join(", "))?;
        }
        Ok(())
    }
}

/// What to do after a request for the name was refused: how long to wait, and whether to log.
/// Pure, so the schedule is tested without a bus.
#[derive(Debug)]
pub struct NameWait {
    retry: Backoff,
    logged: Option<(Holder, Instant)>,
}

impl Default for NameWait {
    fn default() -> Self {
        NameWait {
            retry: Backoff::new(NAME_RETRY_FIRST, NAME_RETRY_MAX),
            logged: None,
        }
    }
}

impl NameWait {
    /// The name is held by `holder` at `now`: the pause before the next request, and whether
    /// to say so (the first time, when the holder changed, and then every
    /// [`NAME_WAIT_REMINDER`]).
    pub fn refused(&mut self, holder: &Holder, now: Instant) -> (Duration, bool) {
        // No jitter: only this device's daemons compete for the name.
        let pause = self.retry.next_delay_with(0.0);
        let log = match &self.logged {
            Some((h, at)) => h != holder || now.duration_since(*at) >= NAME_WAIT_REMINDER,
            None => true,
        };
        if log {
            self.logged = Some((holder.clone(), now));
        }
        (pause, log)
    }
}

/// Connects with `builder` (objects already registered with `serve_at`, no `name`), exits the
/// process if the bus ever closes the connection (when `exit_on_close`; a library caller that
/// must not exit watches `Connection::closed` itself), and owns `name`, waiting while another
/// connection holds it.
pub async fn connect_named(
    builder: zbus::connection::Builder<'static>,
    name: &'static str,
    exit_on_close: bool,
) -> Result<Connection> {
    let conn = builder
        .build()
        .await
        .with_context(|| format!("connecting to D-Bus to serve {name}"))?;
    if exit_on_close {
        exit_when_closed(&conn, name);
    }
    own_name(&conn, name).await?;
    Ok(conn)
}

/// Owns `name` on `conn`. While another connection holds it, says who (with its pid and uid
/// when the bus tells) and asks again with backoff, never queueing: a queued request would be
/// served to whoever queued first, and a squatter can queue too. Fails only when the bus does.
pub async fn own_name(conn: &Connection, name: &'static str) -> Result<()> {
    let dbus = DBusProxy::new(conn)
        .await
        .context("making the org.freedesktop.DBus proxy")?;
    let mut wait = NameWait::default();
    let mut waited = false;
    loop {
        match conn
            .request_name_with_flags(
                name,
                // Never ALLOW_REPLACEMENT: once ours, the name stays ours.
                RequestNameFlags::DO_NOT_QUEUE | RequestNameFlags::REPLACE_EXISTING,
            )
            .await
        {
            Ok(RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner) => {
                if waited {
                    info!("now owns {name}");
                }
                return Ok(());
            }
            // Never with DoNotQueue; treated as taken all the same.
            Ok(RequestNameReply::InQueue | RequestNameReply::Exists)
            | Err(zbus::Error::NameTaken) => {}
            Err(e) => return Err(e).with_context(|| format!("requesting the bus name {name}")),
        }
        waited = true;
        let holder = holder(&dbus, name).await;
        let (pause, log) = wait.refused(&holder, Instant::now());
        if log {
            warn!(
                "cannot own the bus name {name}: it is held by {holder}; not ready, asking \
                 again (every {}s at most) until it is released",
                NAME_RETRY_MAX.as_secs()
            );
            let status = format!("waiting for the bus name {name}, held by {holder}");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
        }
        // The start job must not time out while the name is squatted: waiting is the point.
        let extend = u32::try_from((pause + NAME_RETRY_MAX).as_micros()).unwrap_or(u32::MAX);
        let _ = sd_notify::notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(extend)]);
        tokio::time::sleep(pause).await;
    }
}

async fn holder(dbus: &DBusProxy<'_>, name: &'static str) -> Holder {
    let bus_name = match zbus::names::BusName::try_from(name) {
        Ok(n) => n,
        Err(_) => {
            return Holder {
                unique_name: None,
                pid: None,
                uid: None,
                queued: Vec::new(),
            };
        }
    };
    let owner = dbus.get_name_owner(bus_name.clone()).await.ok();
    let (pid, uid) = match &owner {
        Some(o) => {
            let o = zbus::names::BusName::from(o.clone().into_inner());
            (
                dbus.get_connection_unix_process_id(o.clone()).await.ok(),
                dbus.get_connection_unix_user(o).await.ok(),
            )
        }
        None => (None, None),
    };
    let unique_name = owner.map(|o| o.to_string());
    let queued = match zbus::names::WellKnownName::try_from(name) {
        Ok(w) => dbus
            .list_queued_owners(w)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|o| o.to_string())
            .filter(|o| Some(o) != unique_name.as_ref())
            .collect(),
        Err(_) => Vec::new(),
    };
    Holder {
        unique_name,
        pid,
        uid,
        queued,
    }
}

/// The bus closed a daemon's connection (dbus-daemon disconnected it, or went away); the
/// daemon must exit with [`EXIT_BUS_LOST`]. Names the connection.
#[derive(Debug)]
pub struct BusLost(pub &'static str);

impl std::fmt::Display for BusLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the D-Bus connection for {} was closed (dbus-daemon disconnected this daemon or \
             went away)",
            self.0
        )
    }
}

impl std::error::Error for BusLost {}

/// What a daemon's `run` ends with: a serve loop that ended because the bus closed its
/// connection exits the process with [`EXIT_BUS_LOST`], so systemd restarts it; any other
/// outcome is returned as it is.
pub fn exit_if_bus_lost(served: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(e) = &served
        && e.is::<BusLost>()
    {
        std::process::exit(EXIT_BUS_LOST);
    }
    served
}

/// Exits the process with [`EXIT_BUS_LOST`] when the bus closes `conn` (dbus-daemon
/// disconnected us, or went away): off the bus, a daemon serves nobody, and a restart is the
/// only way back. `what` names the connection in the log.
pub fn exit_when_closed(conn: &Connection, what: &'static str) {
    let conn = conn.clone();
    tokio::spawn(async move {
        conn.closed().await;
        error!(
            "{}; exiting with status {EXIT_BUS_LOST} to be restarted",
            BusLost(what)
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(
            "the D-Bus connection was closed; exiting",
        )]);
        std::process::exit(EXIT_BUS_LOST);
    });
}

/// Whether `conn` still owns `name`, asked of the bus: a round trip through dbus-daemon that
/// proves both the connection and the daemon's own event loop work.
pub async fn still_owns(conn: &Connection, name: &'static str) -> Result<bool> {
    let dbus = DBusProxy::new(conn).await?;
    let owner = dbus
        .get_name_owner(zbus::names::BusName::try_from(name)?)
        .await?;
    Ok(conn.unique_name().map(|u| u.as_str()) == Some(owner.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(n: &str) -> Holder {
        Holder {
            unique_name: Some(n.into()),
            pid: Some(7),
            uid: Some(0),
            queued: vec![":1.9".into()],
        }
    }

    #[test]
    fn waits_double_up_to_the_max() {
        let mut w = NameWait::default();
        let t = Instant::now();
        let pauses: Vec<Duration> = (0..10).map(|_| w.refused(&held_by(":1.1"), t).0).collect();
        assert_eq!(pauses[0], NAME_RETRY_FIRST);
        assert_eq!(pauses[1], NAME_RETRY_FIRST * 2);
        assert_eq!(*pauses.last().unwrap(), NAME_RETRY_MAX);
        assert!(pauses.windows(2).all(|p| p[0] <= p[1]));
    }

    #[test]
    fn logs_the_first_time_on_a_new_holder_and_then_every_reminder() {
        let mut w = NameWait::default();
        let t = Instant::now();
        assert!(w.refused(&held_by(":1.1"), t).1);
        assert!(!w.refused(&held_by(":1.1"), t + Duration::from_secs(1)).1);
        assert!(w.refused(&held_by(":1.2"), t + Duration::from_secs(2)).1);
        assert!(!w.refused(&held_by(":1.2"), t + Duration::from_secs(3)).1);
        assert!(
            w.refused(
                &held_by(":1.2"),
                t + Duration::from_secs(2) + NAME_WAIT_REMINDER
            )
            .1
        );
    }

    #[test]
    fn the_holder_reads_as_a_person_wants_it() {
        assert_eq!(
            held_by(":1.1").to_string(),
            ":1.1 (pid 7, uid 0); queued for it: :1.9"
        );
    }
}
