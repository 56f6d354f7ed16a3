//! What reconcilerd, a runtime and a module agree on about one instance, besides the D-Bus
//! signatures: the options of `Runtime1.StartInstance` and the environment a module finds its
//! SDK by. The states an instance reports are [`crate::InstanceState`].
//!
//! Each option key and variable name is spelled here only, so a rename on one side of the bus
//! is a rename on both.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The environment variable naming the instance's SDK socket (EVP's name); the runtime sets it,
/// the module's SDK reads it.
pub const ENV_SDK_SOCKET: &str = "EVP_MODULE_SDK_SOCKET_PATH";
/// The environment variable naming the instance's default workspace (EVP's name); the runtime
/// sets it, the module's SDK reads it.
pub const ENV_DEFAULT_WORKSPACE: &str = "EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH";

/// The options of `Runtime1.StartInstance`, carried on the bus as `a{sv}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// `sdk_socket` (s): the SDK socket path, absolute; the runtime's default when absent.
    pub sdk_socket: Option<PathBuf>,
    /// `env` (a{ss}): extra environment entries; sent only when there are some.
    pub env: BTreeMap<String, String>,
    /// `entry_point` (s): the module's entry point, for kinds that use one.
    pub entry_point: Option<String>,
    /// `network` (s), `memory_bytes` (t), `nano_cpus` (t), `cap_add` (as): what a docker
    /// instance's container gets beyond the default; each sent only when set.
    pub container: crate::deployment::ContainerOptions,
}

/// Why `StartInstance` options could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartOptionsError {
    /// An option has another D-Bus type than its own.
    #[error("option {key} must be {expected}")]
    WrongType {
        /// The option.
        key: &'static str,
        /// Its type, in words and D-Bus signature (`a string (s)`).
        expected: &'static str,
    },
    /// `sdk_socket` is relative, or holds a NUL.
    #[error("option sdk_socket {0:?} must be an absolute path")]
    SocketNotAbsolute(String),
    /// `sdk_socket` is not UTF-8, so it cannot be a D-Bus string.
    #[error("option sdk_socket {0:?} is not UTF-8")]
    SocketNotUtf8(PathBuf),
    /// An `env` name is empty or holds `=` or NUL.
    #[error("option env: {0:?} is not a valid variable name (empty, or has '=' or NUL)")]
    EnvName(String),
    /// An `env` value holds a NUL.
    #[error("option env: the value of {0} contains a NUL byte")]
    EnvValueNul(String),
    /// A container option cannot be applied (the manifest's rules, checked again).
    #[error("option {0}")]
    Container(String),
}

#[cfg(feature = "dbus")]
pub use self::wire::StartOptionsDict;

#[cfg(feature = "dbus")]
mod wire {
    use std::collections::{BTreeMap, HashMap};

    use zbus::Str;
    use zbus::zvariant::OwnedVariant;

    use super::{StartOptions, StartOptionsError};

    /// `StartInstance` options as they cross the bus (`a{sv}`).
    pub type StartOptionsDict = HashMap<String, OwnedVariant>;

    const SDK_SOCKET: &str = "sdk_socket";
    const ENV: &str = "env";
    const ENTRY_POINT: &str = "entry_point";
    const NETWORK: &str = "network";
    const MEMORY_BYTES: &str = "memory_bytes";
    const NANO_CPUS: &str = "nano_cpus";
    const CAP_ADD: &str = "cap_add";
    const A_STRING: &str = "a string (s)";
    const A_U64: &str = "an unsigned 64-bit integer (t)";
    const A_STRING_ARRAY: &str = "a string array (as)";
    const A_STRING_MAP: &str = "a string map (a{ss})";

    impl StartOptions {
        /// Every option key this build reads.
        pub const KEYS: [&'static str; 7] = [
            SDK_SOCKET,
            ENV,
            ENTRY_POINT,
            NETWORK,
            MEMORY_BYTES,
            NANO_CPUS,
            CAP_ADD,
        ];

        /// The options as sent on the bus; fails only for a socket path that is not UTF-8.
        pub fn to_dbus(&self) -> Result<StartOptionsDict, StartOptionsError> {
            let mut out = StartOptionsDict::new();
            if let Some(path) = &self.sdk_socket {
                let path = path
                    .to_str()
                    .ok_or_else(|| StartOptionsError::SocketNotUtf8(path.clone()))?;
                out.insert(SDK_SOCKET.to_owned(), string(path));
            }
            if let Some(entry_point) = &self.entry_point {
                out.insert(ENTRY_POINT.to_owned(), string(entry_point));
            }
            if !self.env.is_empty() {
                out.insert(ENV.to_owned(), OwnedVariant::from(self.env.clone()));
            }
            let c = &self.container;
            if let Some(network) = &c.network {
                out.insert(NETWORK.to_owned(), string(network));
            }
            if let Some(m) = c.memory_bytes {
                out.insert(MEMORY_BYTES.to_owned(), OwnedVariant::from(m));
            }
            if let Some(n) = c.nano_cpus {
                out.insert(NANO_CPUS.to_owned(), OwnedVariant::from(n));
            }
            if !c.cap_add.is_empty() {
                let caps = zbus::Variant::from(c.cap_add.clone());
                let caps = OwnedVariant::try_from(caps)
                    .map_err(|_| wrong_type(CAP_ADD, A_STRING_ARRAY))?;
                out.insert(CAP_ADD.to_owned(), caps);
            }
            Ok(out)
        }

        /// Reads the options off the bus, refusing wrong types and malformed values. Keys this
        /// build does not read are left out (see [`StartOptions::unknown_keys`]), so newer
        /// callers can pass limits an older runtime does not apply yet.
        pub fn from_dbus(mut options: StartOptionsDict) -> Result<StartOptions, StartOptionsError> {
            let mut out = StartOptions::default();
            if let Some(v) = options.remove(SDK_SOCKET) {
                let path = String::try_from(v).map_err(|_| wrong_type(SDK_SOCKET, A_STRING))?;
                if !path.starts_with('/') || path.contains('\0') {
                    return Err(StartOptionsError::SocketNotAbsolute(path));
                }
                out.sdk_socket = Some(path.into());
            }
            if let Some(v) = options.remove(ENTRY_POINT) {
                out.entry_point =
                    Some(String::try_from(v).map_err(|_| wrong_type(ENTRY_POINT, A_STRING))?);
            }
            if let Some(v) = options.remove(ENV) {
                let env = BTreeMap::<String, String>::try_from(v)
                    .map_err(|_| wrong_type(ENV, A_STRING_MAP))?;
                for (key, value) in &env {
                    if key.is_empty() || key.contains(['=', '\0']) {
                        return Err(StartOptionsError::EnvName(key.clone()));
                    }
                    if value.contains('\0') {
                        return Err(StartOptionsError::EnvValueNul(key.clone()));
                    }
                }
                out.env = env;
            }
            let c = &mut out.container;
            if let Some(v) = options.remove(NETWORK) {
                c.network = Some(String::try_from(v).map_err(|_| wrong_type(NETWORK, A_STRING))?);
            }
            if let Some(v) = options.remove(MEMORY_BYTES) {
                c.memory_bytes =
                    Some(u64::try_from(v).map_err(|_| wrong_type(MEMORY_BYTES, A_U64))?);
            }
            if let Some(v) = options.remove(NANO_CPUS) {
                c.nano_cpus = Some(u64::try_from(v).map_err(|_| wrong_type(NANO_CPUS, A_U64))?);
            }
            if let Some(v) = options.remove(CAP_ADD) {
                c.cap_add =
                    Vec::<String>::try_from(v).map_err(|_| wrong_type(CAP_ADD, A_STRING_ARRAY))?;
            }
            c.validate("container")
                .map_err(|e| StartOptionsError::Container(format!("{}: {}", e.path, e.message)))?;
            Ok(out)
        }

        /// The keys of `options` this build does not read, sorted.
        pub fn unknown_keys(options: &StartOptionsDict) -> Vec<&str> {
            let mut keys: Vec<&str> = options
                .keys()
                .map(String::as_str)
                .filter(|k| !Self::KEYS.contains(k))
                .collect();
            keys.sort_unstable();
            keys
        }
    }

    impl From<StartOptionsError> for crate::dbus::EvpError {
        fn from(e: StartOptionsError) -> Self {
            crate::dbus::EvpError::InvalidArgument(e.to_string())
        }
    }

    fn string(s: &str) -> OwnedVariant {
        OwnedVariant::from(Str::from(s.to_owned()))
    }

    fn wrong_type(key: &'static str, expected: &'static str) -> StartOptionsError {
        StartOptionsError::WrongType { key, expected }
    }

    #[cfg(test)]
    mod tests {
        use std::path::PathBuf;

        use super::*;

        fn env(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
            entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        }

        #[test]
        fn options_round_trip_through_the_bus_form() {
            fn check(options: StartOptions, keys: &[&str]) {
                let dict = options.to_dbus().unwrap();
                let mut sent: Vec<&str> = dict.keys().map(String::as_str).collect();
                sent.sort_unstable();
                assert_eq!(sent, keys, "{options:?}");
                assert_eq!(StartOptions::from_dbus(dict).unwrap(), options);
            }
            let socket = || Some(PathBuf::from("/run/evp/sdk/i.sock"));
            check(StartOptions::default(), &[]);
            check(
                StartOptions {
                    sdk_socket: socket(),
                    ..Default::default()
                },
                &["sdk_socket"],
            );
            check(
                StartOptions {
                    entry_point: Some(String::new()),
                    ..Default::default()
                },
                &["entry_point"],
            );
            check(
                StartOptions {
                    env: env(&[("A", "1"), ("B", "")]),
                    ..Default::default()
                },
                &["env"],
            );
            check(
                StartOptions {
                    sdk_socket: socket(),
                    env: env(&[("A", "1")]),
                    entry_point: Some("main".into()),
                    ..Default::default()
                },
                &["entry_point", "env", "sdk_socket"],
            );
            check(
                StartOptions {
                    container: crate::deployment::ContainerOptions {
                        network: Some("bridge".into()),
                        memory_bytes: Some(64 << 20),
                        nano_cpus: Some(500_000_000),
                        cap_add: vec!["NET_BIND_SERVICE".into()],
                    },
                    ..Default::default()
                },
                &["cap_add", "memory_bytes", "nano_cpus", "network"],
            );
        }

        #[test]
        fn bad_options_are_refused_with_what_is_wrong() {
            fn check(key: &str, value: OwnedVariant, expect: &str) {
                let dict = StartOptionsDict::from([(key.to_owned(), value)]);
                let e = StartOptions::from_dbus(dict).unwrap_err();
                assert_eq!(e.to_string(), expect, "{key}");
                let evp = crate::dbus::EvpError::from(e);
                assert!(
                    matches!(&evp, crate::dbus::EvpError::InvalidArgument(m) if m == expect),
                    "{evp:?}"
                );
            }
            let map = |entries: &[(&str, &str)]| OwnedVariant::from(env(entries));
            check(
                "sdk_socket",
                string("relative.sock"),
                r#"option sdk_socket "relative.sock" must be an absolute path"#,
            );
            check(
                "sdk_socket",
                string("/run/a\0b"),
                r#"option sdk_socket "/run/a\0b" must be an absolute path"#,
            );
            check(
                "sdk_socket",
                OwnedVariant::from(7u32),
                "option sdk_socket must be a string (s)",
            );
            check(
                "entry_point",
                OwnedVariant::from(true),
                "option entry_point must be a string (s)",
            );
            check(
                "env",
                OwnedVariant::from(7u32),
                "option env must be a string map (a{ss})",
            );
            check(
                "env",
                map(&[("A=B", "1")]),
                r#"option env: "A=B" is not a valid variable name (empty, or has '=' or NUL)"#,
            );
            check(
                "env",
                map(&[("", "1")]),
                r#"option env: "" is not a valid variable name (empty, or has '=' or NUL)"#,
            );
            check(
                "env",
                map(&[("A", "x\0y")]),
                "option env: the value of A contains a NUL byte",
            );
            check(
                "memory_bytes",
                OwnedVariant::from(7u32),
                "option memory_bytes must be an unsigned 64-bit integer (t)",
            );
            check(
                "memory_bytes",
                OwnedVariant::from(1024u64),
                "option container.memoryBytes: must be at least 6291456 (6 MiB)",
            );
            check(
                "network",
                string("container:db"),
                r#"option container.network: "container:db" is not a network name (none, bridge, host or a name)"#,
            );
        }

        #[test]
        fn unknown_keys_are_left_to_the_caller() {
            let dict = StartOptionsDict::from([
                ("pids_limit".to_owned(), OwnedVariant::from(1u64 << 20)),
                ("cpu".to_owned(), OwnedVariant::from(1u32)),
                ("entry_point".to_owned(), string("main")),
            ]);
            assert_eq!(StartOptions::unknown_keys(&dict), ["cpu", "pids_limit"]);
            let read = StartOptions::from_dbus(dict).unwrap();
            assert_eq!(read.entry_point.as_deref(), Some("main"));
            assert_eq!(read.sdk_socket, None);
        }

        #[test]
        fn a_socket_path_that_is_not_utf8_cannot_be_sent() {
            use std::os::unix::ffi::OsStrExt;
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(b"/run/\xff.sock"));
            let options = StartOptions {
                sdk_socket: Some(path.clone()),
                ..Default::default()
            };
            assert_eq!(
                options.to_dbus().unwrap_err(),
                StartOptionsError::SocketNotUtf8(path)
            );
        }
    }
}
