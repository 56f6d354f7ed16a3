//! The `StartInstance` options and the statuses an instance reports, as plain values; their
//! wire forms are `evp_schemas`'.

use evp_schemas::InstanceState;
use evp_schemas::dbus::EvpError;
use evp_schemas::instance::StartOptionsDict;
use tracing::warn;

use super::{EXIT_STATUS_UNKNOWN, Exit};
use crate::record::Ended;

/// The `StartInstance` options this runtime understands.
pub use evp_schemas::instance::StartOptions as InstanceOptions;

/// Reads `StartInstance` options off the bus, refusing wrong types and malformed values as
/// `InvalidArgument`; options this build does not apply are logged and ignored, so newer
/// callers can pass limits it does not know yet.
pub fn read_start_options(options: StartOptionsDict) -> Result<InstanceOptions, EvpError> {
    let ignored: Vec<String> = InstanceOptions::unknown_keys(&options)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let read = InstanceOptions::from_dbus(options)?;
    if !ignored.is_empty() {
        warn!("StartInstance: ignoring options this build does not apply: {ignored:?}");
    }
    Ok(read)
}

/// An instance's status as reported on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Being started.
    Starting,
    /// Running.
    Ok,
    /// Exited by itself with status 0.
    SelfExiting,
    /// Failed to start, or exited by itself with a failure; why.
    Error(String),
}

impl Status {
    /// The state it is reported as on the bus.
    pub fn state(&self) -> InstanceState {
        match self {
            Status::Starting => InstanceState::Starting,
            Status::Ok => InstanceState::Ok,
            Status::SelfExiting => InstanceState::SelfExiting,
            Status::Error(_) => InstanceState::Error,
        }
    }

    /// The failure message on the bus, empty unless `error`.
    pub fn message(&self) -> &str {
        match self {
            Status::Error(m) => m,
            _ => "",
        }
    }

    pub(crate) fn from_exit(exit: &Exit) -> Status {
        match exit {
            Exit::Code(0) => Status::SelfExiting,
            Exit::Code(n) => Status::Error(format!("exited with status {n}")),
            Exit::Signal(name) => Status::Error(format!("killed by signal {name}")),
            Exit::Lost(why) => Status::Error(format!("lost track of the process: {why}")),
            Exit::Unknown => Status::Error(EXIT_STATUS_UNKNOWN.to_owned()),
        }
    }

    /// The status a record says an instance ended with.
    pub(crate) fn from_ended(ended: &Ended) -> Status {
        match InstanceState::parse(&ended.status) {
            Ok(InstanceState::SelfExiting) => Status::SelfExiting,
            _ => Status::Error(ended.failure_message.clone()),
        }
    }

    pub(crate) fn to_ended(&self) -> Ended {
        Ended {
            status: self.state().as_str().to_owned(),
            failure_message: self.message().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use evp_schemas::instance::StartOptionsDict;
    use zbus::zvariant::OwnedVariant;

    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;

    fn refused(options: StartOptionsDict) -> String {
        match read_start_options(options) {
            Err(EvpError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn options_are_read_and_checked() {
        let sent = InstanceOptions {
            sdk_socket: Some(PathBuf::from("/run/s.sock")),
            env: BTreeMap::from([("A".to_owned(), "1".to_owned())]),
            entry_point: Some("main".into()),
            ..Default::default()
        };
        let o = read_start_options(sent.to_dbus().unwrap()).unwrap();
        assert_eq!(o.sdk_socket, Some(PathBuf::from("/run/s.sock")));
        assert_eq!(o.entry_point.as_deref(), Some("main"));
        assert_eq!(o.env, BTreeMap::from([("A".to_owned(), "1".to_owned())]));

        let relative = InstanceOptions {
            sdk_socket: Some("relative.sock".into()),
            ..Default::default()
        };
        let m = refused(relative.to_dbus().unwrap());
        assert!(m.contains("absolute"), "{m}");
        let bad_env = InstanceOptions {
            env: BTreeMap::from([("A=B".to_owned(), "1".to_owned())]),
            ..Default::default()
        };
        let m = refused(bad_env.to_dbus().unwrap());
        assert!(m.contains("A=B"), "{m}");
        let mut wrong_type = StartOptionsDict::new();
        wrong_type.insert("sdk_socket".into(), OwnedVariant::from(7u32));
        assert!(refused(wrong_type).contains("string"));
        let mut wrong_type = StartOptionsDict::new();
        wrong_type.insert("env".into(), OwnedVariant::from(7u32));
        assert!(refused(wrong_type).contains("a{ss}"));
        // Unknown options (limits of later builds) are ignored.
        let mut later = StartOptionsDict::new();
        later.insert("pids_limit".into(), OwnedVariant::from(1u64 << 20));
        assert_eq!(
            read_start_options(later).unwrap(),
            InstanceOptions::default()
        );
    }

    #[test]
    fn exits_map_to_statuses() {
        let s = |e: Exit| {
            let st = Status::from_exit(&e);
            (st.state().as_str(), st.message().to_owned())
        };
        assert_eq!(s(Exit::Code(0)), ("self-exiting", String::new()));
        assert_eq!(s(Exit::Code(3)), ("error", "exited with status 3".into()));
        assert_eq!(
            s(Exit::Signal("SIGSEGV".into())),
            ("error", "killed by signal SIGSEGV".into())
        );
    }

    #[test]
    fn a_record_ends_as_the_status_it_was_written_with() {
        fn check(status: Status) {
            assert_eq!(Status::from_ended(&status.to_ended()), status);
        }
        check(Status::SelfExiting);
        check(Status::Error("exited with status 3".into()));
        check(Status::Error(String::new()));
        // A word this build does not know (a newer build's record) is taken as a failure.
        let odd = Ended {
            status: "paused".into(),
            failure_message: "why".into(),
        };
        assert_eq!(Status::from_ended(&odd), Status::Error("why".into()));
    }
}
