//! The session's channels to the rest of the device: [`Links`] to reconcilerd, the
//! configuration delivery and `Hub1.Connection`, [`SdkLinks`] to sdk-broker, each built with
//! its other ends so that `run` and the test rigs wire them alike.

use std::collections::BTreeMap;

use evp_schemas::DeploymentStatus;
use tokio::sync::{mpsc, watch};

use crate::rotation::{Credentials, NextCredentials};
use crate::spool::task::SpoolReport;
use crate::storage::TokenRequest;
use crate::telemetry::TelemetryBatch;

/// Configurations waiting for sdk-broker; a hub sends a handful per update, so a full queue
/// means sdk-broker is stuck and newer values are dropped with a warning.
pub const CONFIGURATION_CHANNEL: usize = 1024;
/// Answers from reconcilerd waiting for the session loop (one per deployment applied).
pub const OUTCOME_CHANNEL: usize = 16;

/// sdk-broker's signals waiting for the session loop: states and answers, a few per module
/// action.
pub const SDK_EVENT_CHANNEL: usize = 1024;
/// Direct commands waiting for `SdkBroker1.CallMethod`.
pub const METHOD_CALL_CHANNEL: usize = 256;
/// Telemetry batches (one per `Telemetry` signal) waiting for the publisher; bounded, so a
/// stuck MQTT connection pushes back on the D-Bus side instead of growing hubd.
pub const TELEMETRY_CHANNEL: usize = 64;

/// `Hub1.RequestStorageToken` calls waiting for the session loop; each waits for the hub at
/// most [`crate::storage::TOKEN_TIMEOUT`], and sdk-broker bounds how many run at once.
pub const STORAGE_TOKEN_CHANNEL: usize = 64;

/// Registry domain → `X-Registry-Auth` value, as `Hub1.RegistryAuth` answers it.
pub type RegistryAuth = BTreeMap<String, String>;

/// The `Hub1.Connection` states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// The MQTT session is up.
    Connected,
    /// A connection attempt is under way.
    Connecting,
    /// Not connected; waiting before the next attempt, or stopped.
    Disconnected,
    /// Registering the device with the hub's device provisioning (it has no credentials yet).
    Provisioning,
    /// The hub refused to provision the device (the reason is in the log); retried later.
    ProvisioningRefused,
}

impl ConnectionState {
    /// The property value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Connected => "connected",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Provisioning => "provisioning",
            ConnectionState::ProvisioningRefused => "provisioning-refused",
        }
    }
}

/// The latest deployment for reconcilerd; newer ones replace older ones not yet applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRequest {
    /// Order among the hub's deployment changes.
    pub seq: u64,
    /// Its id, for logs.
    pub deployment_id: Option<String>,
    /// Canonical JSON for `Reconciler1.ApplyDeployment`.
    pub json: String,
}

/// What reconcilerd answered to a [`DeploymentRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Accepted (it will be reconciled).
    Accepted {
        /// The request's `seq`.
        seq: u64,
    },
    /// Refused as invalid (`org.evp.Error.InvalidManifest`); nothing changed.
    Refused {
        /// The request's `seq`.
        seq: u64,
        /// Its id.
        deployment_id: Option<String>,
        /// reconcilerd's message.
        message: String,
    },
}

/// A configuration value for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigurationDelivery {
    /// The instance.
    pub instance: String,
    /// The topic.
    pub topic: String,
    /// The value.
    pub value: Vec<u8>,
}

/// The session's channels to the rest of the device.
#[derive(Debug)]
pub struct Links {
    /// Deployments for reconcilerd.
    pub deployments: watch::Sender<Option<DeploymentRequest>>,
    /// reconcilerd's answers.
    pub outcomes: mpsc::Receiver<ApplyOutcome>,
    /// Configurations for sdk-broker.
    pub configurations: mpsc::Sender<ConfigurationDelivery>,
    /// reconcilerd's deployment status; `None` before it ever answered.
    pub status: watch::Receiver<Option<DeploymentStatus>>,
    /// The connection state, for `Hub1.Connection`.
    pub connection: watch::Sender<ConnectionState>,
    /// Storage tokens asked through `Hub1.RequestStorageToken`.
    pub storage_tokens: mpsc::Receiver<TokenRequest>,
    /// The registry credentials in effect, for `Hub1.RegistryAuth`.
    pub registry_auth: watch::Sender<RegistryAuth>,
    /// The spool's figures, for `Hub1.QueuedBytes`.
    pub spool: watch::Sender<SpoolReport>,
    /// Renewed TLS credentials, for the next connection.
    pub credentials: NextCredentials,
}

/// The other ends of [`Links`], for whoever plays reconcilerd, the configuration delivery and
/// `Hub1.Connection`. Dropping one looks like what it stands for going away.
#[derive(Debug)]
pub struct LinkEnds {
    /// What hubd asks reconcilerd to apply.
    pub deployments: watch::Receiver<Option<DeploymentRequest>>,
    /// Where reconcilerd's answers go.
    pub outcomes: mpsc::Sender<ApplyOutcome>,
    /// The configurations hubd wants delivered to sdk-broker.
    pub configurations: mpsc::Receiver<ConfigurationDelivery>,
    /// Where reconcilerd's deployment status goes.
    pub status: watch::Sender<Option<DeploymentStatus>>,
    /// The connection state hubd publishes.
    pub connection: watch::Receiver<ConnectionState>,
    /// Where `Hub1.RequestStorageToken` hands its requests.
    pub storage_tokens: mpsc::Sender<TokenRequest>,
    /// The registry credentials hubd holds.
    pub registry_auth: watch::Receiver<RegistryAuth>,
    /// The spool's figures.
    pub spool: watch::Receiver<SpoolReport>,
    /// Where renewed TLS credentials go ([`crate::rotation::watch`]).
    pub credentials: watch::Sender<Option<Credentials>>,
}

impl Links {
    /// Links and their other ends: no deployment asked for, no status known, disconnected.
    pub fn new() -> (Links, LinkEnds) {
        let (deployments, deployments_rx) = watch::channel(None);
        let (outcomes_tx, outcomes) = mpsc::channel(OUTCOME_CHANNEL);
        let (configurations, configurations_rx) = mpsc::channel(CONFIGURATION_CHANNEL);
        let (status_tx, status) = watch::channel(None);
        let (connection, connection_rx) = watch::channel(ConnectionState::Disconnected);
        let (storage_tokens_tx, storage_tokens) = mpsc::channel(STORAGE_TOKEN_CHANNEL);
        let (registry_auth, registry_auth_rx) = watch::channel(RegistryAuth::new());
        let (spool, spool_rx) = watch::channel(SpoolReport::default());
        let (credentials_tx, credentials) = watch::channel(None);
        (
            Links {
                deployments,
                outcomes,
                configurations,
                status,
                connection,
                storage_tokens,
                registry_auth,
                spool,
                credentials,
            },
            LinkEnds {
                deployments: deployments_rx,
                outcomes: outcomes_tx,
                configurations: configurations_rx,
                status: status_tx,
                connection: connection_rx,
                storage_tokens: storage_tokens_tx,
                registry_auth: registry_auth_rx,
                spool: spool_rx,
                credentials: credentials_tx,
            },
        )
    }
}

/// What sdk-broker tells the session, from its signals or from a failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdkEvent {
    /// `StateReported`: the latest state of an instance's topic.
    State {
        /// The instance.
        instance: String,
        /// The topic.
        topic: String,
        /// The state.
        value: Vec<u8>,
    },
    /// `RpcResponse`: the answer to a direct command.
    RpcResponse {
        /// The request id it answers.
        reqid: u64,
        /// The instance that answered (or was asked).
        instance: String,
        /// `EVP_RPC_RESPONSE_STATUS`.
        status: u32,
        /// The response text.
        response: String,
    },
    /// `CallMethod` failed on D-Bus (sdk-broker absent, or its error).
    CallFailed {
        /// The request id of the command.
        reqid: u64,
        /// Why.
        message: String,
    },
}

/// A direct command for `SdkBroker1.CallMethod`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodCall {
    /// The instance.
    pub instance: String,
    /// The EVP request id.
    pub reqid: u64,
    /// The method.
    pub method: String,
    /// Its parameters (JSON text).
    pub params: String,
}

/// The session's channels to sdk-broker.
pub struct SdkLinks {
    /// States, answers and failed calls.
    pub events: mpsc::Receiver<SdkEvent>,
    /// Direct commands to deliver.
    pub calls: mpsc::Sender<MethodCall>,
    /// Telemetry batches to publish.
    pub telemetry: mpsc::Receiver<Box<dyn TelemetryBatch>>,
}

impl std::fmt::Debug for SdkLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdkLinks").finish_non_exhaustive()
    }
}

/// The other ends of [`SdkLinks`], for whoever plays sdk-broker.
#[derive(Debug)]
pub struct SdkEnds {
    /// Where sdk-broker's events go.
    pub events: mpsc::Sender<SdkEvent>,
    /// The direct commands hubd wants delivered.
    pub calls: mpsc::Receiver<MethodCall>,
    /// Where telemetry batches go.
    pub telemetry: mpsc::Sender<Box<dyn TelemetryBatch>>,
}

impl SdkLinks {
    /// Links and their other ends.
    pub fn new() -> (SdkLinks, SdkEnds) {
        let (events_tx, events) = mpsc::channel(SDK_EVENT_CHANNEL);
        let (calls, calls_rx) = mpsc::channel(METHOD_CALL_CHANNEL);
        let (telemetry_tx, telemetry) = mpsc::channel(TELEMETRY_CHANNEL);
        (
            SdkLinks {
                events,
                calls,
                telemetry,
            },
            SdkEnds {
                events: events_tx,
                calls: calls_rx,
                telemetry: telemetry_tx,
            },
        )
    }
}
