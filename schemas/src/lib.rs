//! Every contract that crosses a process boundary in evp-agent, and nothing else.
//!
//! - [`deployment`]: the canonical desired deployment and its validation.
//! - [`status`]: the canonical deployment status that reconcilerd publishes.
//! - [`codec`], [`evp2`] and [`evp1`]: the hub's wire dialects, behind one trait.
//! - [`provision`]: ThingsBoard's MQTT device provisioning.
//! - [`text`]: bounding quoted input in messages.
//! - [`instance`]: the `StartInstance` options and the SDK's environment variable names.
//! - [`dbus`]: names, errors and proxies of the D-Bus interfaces; their
//!   introspection XML lives in `schemas/dbus/` and is the source of truth.
//! - [`sdk`]: the SDK wire format between a module and sdk-broker.
//! - [`bus_string`]: the check every outside string passes before it may cross D-Bus.
//!
//! Cargo features: `dbus` (the D-Bus part, with zbus) and `hub` (the codecs), both default;
//! a module's SDK (`evp-sdk`) takes neither, so it builds without zbus or an async runtime.

pub mod bus_string;
#[cfg(feature = "hub")]
pub mod codec;
#[cfg(feature = "dbus")]
pub mod dbus;
pub mod deployment;
#[cfg(feature = "hub")]
pub mod evp1;
#[cfg(feature = "hub")]
pub mod evp2;
#[cfg(all(test, feature = "hub"))]
mod golden;
pub mod instance;
#[cfg(feature = "hub")]
pub mod provision;
pub mod routing;
pub mod sdk;
pub mod status;
pub mod text;

#[cfg(feature = "hub")]
pub use codec::{
    DesiredChange, DirectCommand, DirectCommandResponse, HubCodec, Protocol, RpcStatus,
    StatusReport, TelemetryEntry,
};
pub use deployment::{
    ContainerOptions, Deployment, InstanceSpec, Module, ModuleImpl, RestartPolicy, ValidationError,
};
pub use status::{
    DeploymentStatus, InstanceState, InstanceStatus, ModuleState, ModuleStatus, ReconcileStatus,
    UnknownInstanceState,
};
