//! The `StartInstance` options and the statuses an instance reports, as plain values.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use evp_schemas::dbus::{EvpError, StartOptions};
use tracing::warn;

use super::{EXIT_STATUS_UNKNOWN, Exit};
use crate::record::Ended;

/// The `StartInstance` options this runtime understands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceOptions {
    /// `sdk_socket` (s): the SDK socket path; `<instance dir>/sdk.sock` when absent.
    pub sdk_socket: Option<PathBuf>,
    /// `env` (a{ss}): extra environment entries.
    pub env: BTreeMap<String, String>,
    /// `entry_point` (s).
    pub entry_point: Option<String>,
}

impl InstanceOptions {
    /// Reads the D-Bus options, refusing wrong types and malformed values; unknown options are
    /// ignored so newer callers can pass limits this build does not apply yet.
    pub fn from_dbus(mut options: StartOptions) -> Result<InstanceOptions, EvpError> {
        let mut out = InstanceOptions::default();
        if let Some(v) = options.remove("sdk_socket") {
            let path = String::try_from(v).map_err(|_| {
                EvpError::InvalidArgument("option sdk_socket must be a string (s)".into())
            })?;
            if !path.starts_with('/') || path.contains('\0') {
                return Err(EvpError::InvalidArgument(format!(
                    "option sdk_socket {path:?} must be an absolute path"
                )));
            }
            out.sdk_socket = Some(path.into());
        }
        if let Some(v) = options.remove("entry_point") {
            out.entry_point = Some(String::try_from(v).map_err(|_| {
                EvpError::InvalidArgument("option entry_point must be a string (s)".into())
            })?);
        }
        if let Some(v) = options.remove("env") {
            let env = HashMap::<String, String>::try_from(v).map_err(|_| {
                EvpError::InvalidArgument("option env must be a string map (a{ss})".into())
            })?;
            for (key, value) in &env {
                if key.is_empty() || key.contains(['=', '\0']) {
                    return Err(EvpError::InvalidArgument(format!(
                        "option env: {key:?} is not a valid variable name (empty, or has '=' or NUL)"
                    )));
                }
                if value.contains('\0') {
                    return Err(EvpError::InvalidArgument(format!(
                        "option env: the value of {key} contains a NUL byte"
                    )));
                }
            }
            out.env = env.into_iter().collect();
        }
        if !options.is_empty() {
            let mut names: Vec<_> = options.keys().map(String::as_str).collect();
            names.sort_unstable();
            warn!("StartInstance: ignoring options this build does not apply: {names:?}");
        }
        Ok(out)
    }
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
    /// The status word on the bus.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Ok => "ok",
            Status::SelfExiting => "self-exiting",
            Status::Error(_) => "error",
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
        match ended.status.as_str() {
            "self-exiting" => Status::SelfExiting,
            _ => Status::Error(ended.failure_message.clone()),
        }
    }

    pub(crate) fn to_ended(&self) -> Ended {
        Ended {
            status: self.as_str().to_owned(),
            failure_message: self.message().to_owned(),
        }
    }
}
