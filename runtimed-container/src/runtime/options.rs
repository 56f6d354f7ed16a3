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
