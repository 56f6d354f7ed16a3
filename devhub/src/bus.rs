//! A private `dbus-daemon` of the system type that runs the project's real D-Bus policy.
//!
//! The policy files of `systemd/dbus/` are embedded in this crate; every daemon user in them
//! (`evp-hub`, `evp-reconciler`, ...) becomes the current user and the group `evp-sysapp`
//! becomes the current user's primary group, so in development all daemons run as one user
//! and the same allow and deny rules as on a device are in force.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The project's policy files, by file name, as in `systemd/dbus/`.
pub const PROJECT_POLICIES: [(&str, &str); 5] = [
    (
        "org.evp.Hub1.conf",
        include_str!("../../systemd/dbus/org.evp.Hub1.conf"),
    ),
    (
        "org.evp.Reconciler1.conf",
        include_str!("../../systemd/dbus/org.evp.Reconciler1.conf"),
    ),
    (
        "org.evp.Runtime1.Wasm.conf",
        include_str!("../../systemd/dbus/org.evp.Runtime1.Wasm.conf"),
    ),
    (
        "org.evp.Runtime1.Container.conf",
        include_str!("../../systemd/dbus/org.evp.Runtime1.Container.conf"),
    ),
    (
        "org.evp.SdkBroker1.conf",
        include_str!("../../systemd/dbus/org.evp.SdkBroker1.conf"),
    ),
];

/// The system users the daemons run as on a device (sysusers.d); each becomes the current
/// user on a private bus.
pub const DAEMON_USERS: [&str; 5] = [
    "evp-hub",
    "evp-reconciler",
    "evp-wasm",
    "evp-container",
    "evp-sdk",
];

/// The group of system apps on a device; it becomes the current user's primary group.
pub const SYSAPP_GROUP: &str = "evp-sysapp";

/// The socket file of the bus, inside the bus directory.
const SOCKET_NAME: &str = "bus.sock";
/// The main configuration file written into the bus directory.
const CONFIG_NAME: &str = "system.conf";
/// Where the substituted project policies are written, inside the bus directory.
const POLICY_DIR_NAME: &str = "system.d";
/// Where dbus-daemon's own messages go, so a failure to start can be explained.
const LOG_NAME: &str = "dbus-daemon.log";
/// The longest path a unix socket address may have (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long dbus-daemon gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Why a private bus could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// `dbus-daemon` is not on `PATH`.
    #[error("dbus-daemon is not installed (apt-get install dbus)")]
    NotInstalled,
    /// The socket path would not fit in a unix socket address.
    #[error(
        "the bus socket path {0} is longer than {MAX_SOCKET_PATH} bytes; use a shorter directory"
    )]
    PathTooLong(PathBuf),
    /// The current user or group could not be named.
    #[error("cannot name the current user or group: {0}")]
    User(String),
    /// A file of the bus could not be written, or the daemon could not be run.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// dbus-daemon exited without printing its address.
    #[error("dbus-daemon did not start: {0}")]
    Failed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BusError {
    let what = what.into();
    move |source| BusError::Io { what, source }
}

/// Rewrites one of the project's policy files for a private bus: every daemon user becomes
/// `user` and the group `evp-sysapp` becomes `group`. Other users (`root`) stay as they are.
pub fn substitute_policy(policy: &str, user: &str, group: &str) -> String {
    let user = xml_escape(user);
    let group = xml_escape(group);
    let mut out = policy.to_owned();
    for daemon in DAEMON_USERS {
        out = out.replace(&format!("user=\"{daemon}\""), &format!("user=\"{user}\""));
    }
    out.replace(
        &format!("group=\"{SYSAPP_GROUP}\""),
        &format!("group=\"{group}\""),
    )
}

/// The main configuration of a private system bus listening on `socket`, including every
/// file of `policy_dir`: the default policy of Debian's `system.conf` (nobody owns names or
/// calls methods unless a policy file allows it; signals and replies flow; everyone may talk
/// to the bus itself).
pub fn system_config(socket: &Path, policy_dir: &Path) -> String {
    let socket = xml_escape(&socket.to_string_lossy());
    let policy_dir = xml_escape(&policy_dir.to_string_lossy());
    format!(
        r#"<?xml version="1.0"?>
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- Written by evp-devhub: a private system bus with the project's policy. -->
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Containers1"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <includedir>{policy_dir}</includedir>
</busconfig>
"#
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The current user's name and the name of their primary group.
pub fn current_user_and_group() -> Result<(String, String), BusError> {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .map_err(|e| BusError::User(format!("looking up uid {uid}: {e}")))?
        .ok_or_else(|| BusError::User(format!("uid {uid} has no name in the user database")))?;
    let group = nix::unistd::Group::from_gid(user.gid)
        .map_err(|e| BusError::User(format!("looking up gid {}: {e}", user.gid)))?
        .ok_or_else(|| {
            BusError::User(format!(
                "gid {} has no name in the group database",
                user.gid
            ))
        })?;
    Ok((user.name, group.name))
}

/// A running private `dbus-daemon`. Stopping it, or dropping it, kills the daemon.
#[derive(Debug)]
pub struct PrivateBus {
    child: Option<Child>,
    address: String,
    dir: PathBuf,
}

impl PrivateBus {
    /// Writes the bus configuration into `dir` (created if missing), starts
    /// `dbus-daemon --nofork --print-address` on a socket in `dir`, and returns once it
    /// listens.
    pub fn start(dir: &Path) -> Result<PrivateBus, BusError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let dir = std::fs::canonicalize(dir).map_err(io(format!("resolving {}", dir.display())))?;
        let socket = dir.join(SOCKET_NAME);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(BusError::PathTooLong(socket));
        }
        // A socket left by a bus that was killed would make dbus-daemon refuse to listen.
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(format!("removing the old {}", socket.display()))(e));
            }
            _ => {}
        }

        let (user, group) = current_user_and_group()?;
        let policy_dir = dir.join(POLICY_DIR_NAME);
        std::fs::create_dir_all(&policy_dir)
            .map_err(io(format!("creating {}", policy_dir.display())))?;
        for (name, text) in PROJECT_POLICIES {
            let path = policy_dir.join(name);
            std::fs::write(&path, substitute_policy(text, &user, &group))
                .map_err(io(format!("writing {}", path.display())))?;
        }
        let config = dir.join(CONFIG_NAME);
        std::fs::write(&config, system_config(&socket, &policy_dir))
            .map_err(io(format!("writing {}", config.display())))?;

        let log_path = dir.join(LOG_NAME);
        let log = std::fs::File::create(&log_path)
            .map_err(io(format!("creating {}", log_path.display())))?;
        let mut command = Command::new("dbus-daemon");
        // Its own process group: Ctrl-C in a terminal goes to the foreground group, and the
        // bus must outlive the daemons while the devhub stops them.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        command
            .arg(format!("--config-file={}", config.display()))
            .arg("--nofork")
            .arg("--print-address")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        crate::stack::die_with_parent(&mut command);
        let mut child = command.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BusError::NotInstalled
            } else {
                io("running dbus-daemon")(e)
            }
        })?;

        // dbus-daemon prints its address once it listens, or exits (closing stdout) when it
        // cannot: this read ends either way.
        let mut line = String::new();
        let read = match child.stdout.take() {
            Some(out) => BufReader::new(out).read_line(&mut line),
            None => Ok(0),
        };
        let address = line.trim().to_owned();
        if read.is_err() || address.is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(BusError::Failed(format!(
                "{} (configuration {})",
                log.trim(),
                config.display()
            )));
        }
        // As the system bus's socket: anyone may connect, the policy decides what they may do.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
                .map_err(io(format!("opening {} to every user", socket.display())))?;
        }
        Ok(PrivateBus {
            child: Some(child),
            address,
            dir,
        })
    }

    /// The bus address, as dbus-daemon printed it (`unix:path=...,guid=...`); give it to
    /// `--bus` or `DBUS_SYSTEM_BUS_ADDRESS`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The directory holding the socket, the configuration and dbus-daemon's log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id of dbus-daemon, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops dbus-daemon: SIGTERM, then SIGKILL after a short grace, and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate_blocking(&mut child, STOP_GRACE);
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGTERM, a grace of `grace` polled every few milliseconds, then SIGKILL; always reaps.
fn terminate_blocking(child: &mut Child, grace: Duration) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    /// How often the exit is checked during the grace.
    const POLL: Duration = Duration::from_millis(10);
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) => std::thread::sleep(POLL),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_daemon_user_and_the_sysapp_group_are_replaced() {
        for (name, text) in PROJECT_POLICIES {
            let out = substitute_policy(text, "alice", "staff");
            for daemon in DAEMON_USERS {
                assert!(
                    !out.contains(&format!("\"{daemon}\"")),
                    "{name} still names {daemon}"
                );
            }
            assert!(!out.contains(SYSAPP_GROUP), "{name} still names the group");
            assert!(out.contains("user=\"alice\""), "{name}");
            // root keeps its own rules.
            assert!(out.contains("user=\"root\""), "{name}");
        }
        let reconciler = substitute_policy(PROJECT_POLICIES[1].1, "alice", "staff");
        assert!(reconciler.contains("group=\"staff\""));
    }

    #[test]
    fn names_are_escaped_for_xml() {
        let out = substitute_policy("<policy user=\"evp-hub\"/>", "a\"b", "g");
        assert_eq!(out, "<policy user=\"a&quot;b\"/>");
    }

    #[test]
    fn the_main_config_is_a_system_bus_on_the_socket() {
        let text = system_config(Path::new("/tmp/x/bus.sock"), Path::new("/tmp/x/system.d"));
        assert!(text.contains("<type>system</type>"));
        assert!(text.contains("<listen>unix:path=/tmp/x/bus.sock</listen>"));
        assert!(text.contains("<deny own=\"*\"/>"));
        assert!(text.contains("<deny send_type=\"method_call\"/>"));
        assert!(text.contains("<includedir>/tmp/x/system.d</includedir>"));
    }
}
