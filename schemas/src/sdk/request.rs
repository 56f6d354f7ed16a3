//! A module's requests: the owned `Request`, its encoder and its verifying decoder.

use flatbuffers::FlatBufferBuilder;

use super::{BUILDER_START, Callback, DecodeError, TelemetryEntry, fb};

/// A request from a module (the `RequestUnion` of `Request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `EVP_processEvent`: wait for one event until an absolute `CLOCK_REALTIME` deadline.
    GetEvent {
        /// Deadline, seconds since the epoch.
        deadline_sec: u64,
        /// Deadline, nanoseconds within the second.
        deadline_nsec: u64,
    },
    /// `EVP_sendState`.
    SendState {
        /// State topic.
        topic: String,
        /// State value.
        blob: Vec<u8>,
        /// Echoed in the `state` event.
        cb: Callback,
    },
    /// `EVP_setConfigurationCallback`: deliver every stored configuration again.
    RequestResendConfig,
    /// `EVP_blobOperation` (not served yet; decoded enough to answer).
    BlobOperation {
        /// `EVP_BLOB_TYPE`.
        kind: u32,
        /// `EVP_BLOB_OPERATION`.
        op: u32,
        /// The request's URL (or remote name for EVP storage).
        url: String,
        /// Local file.
        filename: String,
        /// Echoed in the `blob` event.
        cb: Callback,
    },
    /// `EVP_sendTelemetry`.
    SendTelemetry {
        /// Entries in call order.
        entries: Vec<TelemetryEntry>,
        /// Echoed in the `telemetry` event.
        cb: Callback,
    },
    /// `EVP_sendMessage`: `topic` is the sender's publish alias.
    SendMessage {
        /// Publish alias.
        topic: String,
        /// Payload.
        blob: Vec<u8>,
        /// Echoed in the `messageSent` event.
        cb: Callback,
    },
    /// `EVP_sendRpcResponse`.
    SendRpcResponse {
        /// The request id of the `rpcRequest` event being answered.
        id: u64,
        /// Response text; `None` is refused with `EVP_INVAL`.
        response: Option<String>,
        /// `EVP_RPC_RESPONSE_STATUS` as sent (checked by the server).
        status: u32,
        /// Echoed in the `rpcResponse` event.
        cb: Callback,
    },
    /// Stream parameters for a stream named in the manifest.
    StreamParamsRequest {
        /// Stream name.
        name: Option<String>,
    },
}

impl Request {
    /// Checks every string of the request that sdk-broker passes on over D-Bus (a state
    /// topic, telemetry keys and values, an RPC response) or matches against the deployment
    /// (a message topic): a NUL in one would make dbus-daemon disconnect sdk-broker, so the
    /// request is refused (`EVP_INVAL`) before anything is done with it.
    pub fn check_bus_strings(&self) -> Result<(), crate::bus_string::BusStringError> {
        use crate::bus_string::check_bus_string;
        match self {
            Request::SendState { topic, .. } => check_bus_string("the state topic", topic),
            Request::SendMessage { topic, .. } => check_bus_string("the message topic", topic),
            Request::SendTelemetry { entries, .. } => entries.iter().try_for_each(|e| {
                check_bus_string("a telemetry key", &e.key)
                    .and_then(|()| check_bus_string("a telemetry value", &e.value))
            }),
            Request::SendRpcResponse {
                response: Some(r), ..
            } => check_bus_string("the RPC response", r),
            _ => Ok(()),
        }
    }
}

impl Request {
    /// The payload of this request (a root `Request` table).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = FlatBufferBuilder::with_capacity(BUILDER_START);
        let (tag, body) = match self {
            Request::GetEvent {
                deadline_sec,
                deadline_nsec,
            } => {
                let t = fb::GetEvent::create(
                    &mut b,
                    &fb::GetEventArgs {
                        timeout_sec: *deadline_sec,
                        timeout_nsec: *deadline_nsec,
                    },
                );
                (fb::RequestUnion::getEvent, t.as_union_value())
            }
            Request::SendState { topic, blob, cb } => {
                let topic = b.create_string(topic);
                let blob = b.create_vector(blob);
                let t = fb::StateInput::create(
                    &mut b,
                    &fb::StateInputArgs {
                        topic: Some(topic),
                        blob: Some(blob),
                        cb: cb.cb,
                        cb_userdata: cb.userdata,
                    },
                );
                (fb::RequestUnion::sendState, t.as_union_value())
            }
            Request::RequestResendConfig => {
                let t = fb::RequestResendConfig::create(&mut b, &fb::RequestResendConfigArgs {});
                (fb::RequestUnion::requestResendConfig, t.as_union_value())
            }
            Request::BlobOperation {
                kind,
                op,
                url,
                filename,
                cb,
            } => {
                let url = b.create_string(url);
                let req = fb::BlobRequestHttp::create(
                    &mut b,
                    &fb::BlobRequestHttpArgs { url: Some(url) },
                );
                let filename = b.create_string(filename);
                let t = fb::BlobInput::create(
                    &mut b,
                    &fb::BlobInputArgs {
                        type_: *kind,
                        op: *op,
                        request_type: fb::BlobRequestUnion::http,
                        request: Some(req.as_union_value()),
                        filename: Some(filename),
                        cb: cb.cb,
                        cb_userdata: cb.userdata,
                    },
                );
                (fb::RequestUnion::blobOperation, t.as_union_value())
            }
            Request::SendTelemetry { entries, cb } => {
                let offsets: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        let key = b.create_string(&e.key);
                        let value = b.create_string(&e.value);
                        fb::TelemetryEntry::create(
                            &mut b,
                            &fb::TelemetryEntryArgs {
                                key: Some(key),
                                value: Some(value),
                            },
                        )
                    })
                    .collect();
                let entries = b.create_vector(&offsets);
                let t = fb::TelemetryInput::create(
                    &mut b,
                    &fb::TelemetryInputArgs {
                        entries: Some(entries),
                        cb: cb.cb,
                        cb_userdata: cb.userdata,
                    },
                );
                (fb::RequestUnion::sendTelemetry, t.as_union_value())
            }
            Request::SendMessage { topic, blob, cb } => {
                let topic = b.create_string(topic);
                let blob = b.create_vector(blob);
                let t = fb::MessageSentInput::create(
                    &mut b,
                    &fb::MessageSentInputArgs {
                        topic: Some(topic),
                        blob: Some(blob),
                        cb: cb.cb,
                        cb_userdata: cb.userdata,
                    },
                );
                (fb::RequestUnion::sendMessage, t.as_union_value())
            }
            Request::SendRpcResponse {
                id,
                response,
                status,
                cb,
            } => {
                let response = response.as_deref().map(|r| b.create_string(r));
                let t = fb::RpcResponseInput::create(
                    &mut b,
                    &fb::RpcResponseInputArgs {
                        id: *id,
                        response,
                        status: *status,
                        cb: cb.cb,
                        cb_userdata: cb.userdata,
                    },
                );
                (fb::RequestUnion::sendRpcResponse, t.as_union_value())
            }
            Request::StreamParamsRequest { name } => {
                let name = name.as_deref().map(|n| b.create_string(n));
                let t =
                    fb::StreamParamsRequest::create(&mut b, &fb::StreamParamsRequestArgs { name });
                (fb::RequestUnion::streamParamsRequest, t.as_union_value())
            }
        };
        let root = fb::Request::create(
            &mut b,
            &fb::RequestArgs {
                body_type: tag,
                body: Some(body),
            },
        );
        b.finish_minimal(root);
        b.finished_data().to_vec()
    }

    /// Verifies and decodes a request payload.
    pub fn decode(payload: &[u8]) -> Result<Request, DecodeError> {
        let root = flatbuffers::root::<fb::Request>(payload)?;
        let unknown = DecodeError::UnknownBody {
            what: "Request",
            tag: root.body_type().0,
        };
        let cb = |cb: u64, userdata: u64| Callback { cb, userdata };
        Ok(match root.body_type() {
            fb::RequestUnion::getEvent => {
                let t = root.body_as_get_event().ok_or(unknown)?;
                Request::GetEvent {
                    deadline_sec: t.timeout_sec(),
                    deadline_nsec: t.timeout_nsec(),
                }
            }
            fb::RequestUnion::sendState => {
                let t = root.body_as_send_state().ok_or(unknown)?;
                Request::SendState {
                    topic: t.topic().to_owned(),
                    blob: t.blob().bytes().to_vec(),
                    cb: cb(t.cb(), t.cb_userdata()),
                }
            }
            fb::RequestUnion::requestResendConfig => Request::RequestResendConfig,
            fb::RequestUnion::blobOperation => {
                let t = root.body_as_blob_operation().ok_or(unknown)?;
                let url = match t.request_type() {
                    fb::BlobRequestUnion::azureBlob => {
                        t.request_as_azure_blob().map(|r| r.url().to_owned())
                    }
                    fb::BlobRequestUnion::evp => {
                        t.request_as_evp().map(|r| r.remoteName().to_owned())
                    }
                    fb::BlobRequestUnion::http => t.request_as_http().map(|r| r.url().to_owned()),
                    fb::BlobRequestUnion::http_ext => {
                        t.request_as_http_ext().map(|r| r.url().to_owned())
                    }
                    _ => None,
                };
                Request::BlobOperation {
                    kind: t.type_(),
                    op: t.op(),
                    url: url.ok_or(DecodeError::UnknownBody {
                        what: "BlobInput.request",
                        tag: t.request_type().0,
                    })?,
                    filename: t.filename().to_owned(),
                    cb: cb(t.cb(), t.cb_userdata()),
                }
            }
            fb::RequestUnion::sendTelemetry => {
                let t = root.body_as_send_telemetry().ok_or(unknown)?;
                let entries = t
                    .entries()
                    .map(|v| {
                        v.iter()
                            .map(|e| TelemetryEntry {
                                key: e.key().to_owned(),
                                value: e.value().to_owned(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Request::SendTelemetry {
                    entries,
                    cb: cb(t.cb(), t.cb_userdata()),
                }
            }
            fb::RequestUnion::sendMessage => {
                let t = root.body_as_send_message().ok_or(unknown)?;
                Request::SendMessage {
                    topic: t.topic().to_owned(),
                    blob: t.blob().bytes().to_vec(),
                    cb: cb(t.cb(), t.cb_userdata()),
                }
            }
            fb::RequestUnion::sendRpcResponse => {
                let t = root.body_as_send_rpc_response().ok_or(unknown)?;
                Request::SendRpcResponse {
                    id: t.id(),
                    response: t.response().map(str::to_owned),
                    status: t.status(),
                    cb: cb(t.cb(), t.cb_userdata()),
                }
            }
            fb::RequestUnion::streamParamsRequest => {
                let t = root.body_as_stream_params_request().ok_or(unknown)?;
                Request::StreamParamsRequest {
                    name: t.name().map(str::to_owned),
                }
            }
            _ => return Err(unknown),
        })
    }

    /// The name of the request body, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::GetEvent { .. } => "getEvent",
            Request::SendState { .. } => "sendState",
            Request::RequestResendConfig => "requestResendConfig",
            Request::BlobOperation { .. } => "blobOperation",
            Request::SendTelemetry { .. } => "sendTelemetry",
            Request::SendMessage { .. } => "sendMessage",
            Request::SendRpcResponse { .. } => "sendRpcResponse",
            Request::StreamParamsRequest { .. } => "streamParamsRequest",
        }
    }
}
