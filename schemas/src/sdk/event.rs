//! What the agent sends a module: the owned `Event` and `Response`, their encoders and
//! verifying decoders.

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use super::{
    BUILDER_START, BlobReason, Callback, DecodeError, EvpResult, MessageSentReason,
    RpcResponseReason, StateReason, TelemetryReason, fb,
};

/// An event delivered to a module (the `EventBody` of `Event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `body NONE`: the deadline passed without an event.
    None,
    /// A configuration value.
    Config {
        /// Configuration topic.
        topic: String,
        /// Value bytes.
        blob: Vec<u8>,
    },
    /// The outcome of a `sendState`.
    State {
        /// From the request.
        cb: Callback,
        /// Outcome.
        reason: StateReason,
    },
    /// The agent asks the module to exit (no event is left).
    Exit,
    /// The outcome of a `blobOperation`.
    Blob {
        /// From the request.
        cb: Callback,
        /// Outcome.
        reason: BlobReason,
        /// How the transfer went, for `Done`.
        result: BlobOutcome,
    },
    /// The outcome of a `sendMessage`.
    MessageSent {
        /// From the request.
        cb: Callback,
        /// Outcome.
        reason: MessageSentReason,
    },
    /// A message from another instance; `topic` is the receiver's subscribe alias.
    MessageReceived {
        /// Subscribe alias.
        topic: String,
        /// Payload.
        blob: Vec<u8>,
    },
    /// The outcome of a `sendTelemetry`.
    Telemetry {
        /// From the request.
        cb: Callback,
        /// Outcome.
        reason: TelemetryReason,
    },
    /// A direct command to answer with `sendRpcResponse`.
    RpcRequest {
        /// Request id.
        id: u64,
        /// Method name.
        method: String,
        /// Parameters, JSON text.
        params: String,
    },
    /// The outcome of a `sendRpcResponse`.
    RpcResponse {
        /// From the request.
        cb: Callback,
        /// Outcome.
        reason: RpcResponseReason,
    },
}

/// A response to a module's request (the `ResponseUnion` of `Response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The answer to `getEvent`.
    GetEvent(Event),
    /// The result of any other call.
    Simple(EvpResult),
    /// The answer to `streamParamsRequest`.
    StreamParams {
        /// Result.
        result: EvpResult,
        /// `StreamType` (only `Null` = 0 exists).
        kind: i8,
        /// `StreamDirection`: 0 in, 1 out.
        direction: i8,
    },
}

/// Builds an `Event` table in `b`.
fn build_event<'a>(b: &mut FlatBufferBuilder<'a>, event: &Event) -> WIPOffset<fb::Event<'a>> {
    let (tag, body) = match event {
        Event::None => (fb::EventBody::NONE, None),
        Event::Config { topic, blob } => {
            let topic = b.create_string(topic);
            let blob = b.create_vector(blob);
            let t = fb::Config::create(
                b,
                &fb::ConfigArgs {
                    topic: Some(topic),
                    blob: Some(blob),
                },
            );
            (fb::EventBody::config, Some(t.as_union_value()))
        }
        Event::State { cb, reason } => {
            let t = fb::StateOutput::create(
                b,
                &fb::StateOutputArgs {
                    cb: cb.cb,
                    reason: reason.code(),
                    cb_userdata: cb.userdata,
                },
            );
            (fb::EventBody::state, Some(t.as_union_value()))
        }
        Event::Exit => {
            let t = fb::Exit::create(b, &fb::ExitArgs {});
            (fb::EventBody::exit, Some(t.as_union_value()))
        }
        Event::Blob { cb, reason, result } => {
            // The C SDK reads its result struct through the tag: HTTP and HTTP_EXT results are
            // `http`, as EVP sends them. The four result tables have the same three fields.
            macro_rules! blob_result {
                ($table:ident, $args:ident, $tag:ident) => {{
                    let args = fb::$args {
                        result: result.result,
                        error: result.error,
                        http_status: result.http_status,
                    };
                    let r = fb::$table::create(b, &args);
                    (fb::BlobResultUnion::$tag, r.as_union_value())
                }};
            }
            let (tag, r) = match result.kind {
                BLOB_TYPE_AZURE_BLOB => {
                    blob_result!(BlobResultAzureBlob, BlobResultAzureBlobArgs, azureBlob)
                }
                BLOB_TYPE_EVP | BLOB_TYPE_EVP_EXT => {
                    blob_result!(BlobResultEvp, BlobResultEvpArgs, evp)
                }
                _ => blob_result!(BlobResultHttp, BlobResultHttpArgs, http),
            };
            let t = fb::BlobOutput::create(
                b,
                &fb::BlobOutputArgs {
                    result_type: tag,
                    result: Some(r),
                    cb: cb.cb,
                    reason: reason.code(),
                    cb_userdata: cb.userdata,
                },
            );
            (fb::EventBody::blob, Some(t.as_union_value()))
        }
        Event::MessageSent { cb, reason } => {
            let t = fb::MessageSentOutput::create(
                b,
                &fb::MessageSentOutputArgs {
                    cb: cb.cb,
                    reason: reason.code(),
                    cb_userdata: cb.userdata,
                },
            );
            (fb::EventBody::messageSent, Some(t.as_union_value()))
        }
        Event::MessageReceived { topic, blob } => {
            let topic = b.create_string(topic);
            let blob = b.create_vector(blob);
            let t = fb::MessageReceived::create(
                b,
                &fb::MessageReceivedArgs {
                    topic: Some(topic),
                    blob: Some(blob),
                },
            );
            (fb::EventBody::messageReceived, Some(t.as_union_value()))
        }
        Event::Telemetry { cb, reason } => {
            let t = fb::TelemetryOutput::create(
                b,
                &fb::TelemetryOutputArgs {
                    cb: cb.cb,
                    reason: reason.code(),
                    cb_userdata: cb.userdata,
                },
            );
            (fb::EventBody::telemetry, Some(t.as_union_value()))
        }
        Event::RpcRequest { id, method, params } => {
            let method = b.create_string(method);
            let params = b.create_string(params);
            let t = fb::RpcRequest::create(
                b,
                &fb::RpcRequestArgs {
                    id: *id,
                    method: Some(method),
                    params: Some(params),
                },
            );
            (fb::EventBody::rpcRequest, Some(t.as_union_value()))
        }
        Event::RpcResponse { cb, reason } => {
            let t = fb::RpcResponseOutput::create(
                b,
                &fb::RpcResponseOutputArgs {
                    cb: cb.cb,
                    reason: reason.code(),
                    cb_userdata: cb.userdata,
                },
            );
            (fb::EventBody::rpcResponse, Some(t.as_union_value()))
        }
    };
    fb::Event::create(
        b,
        &fb::EventArgs {
            body_type: tag,
            body,
        },
    )
}

/// Decodes a verified `Event` table.
fn decode_event(e: fb::Event<'_>) -> Result<Event, DecodeError> {
    let unknown = DecodeError::UnknownBody {
        what: "Event",
        tag: e.body_type().0,
    };
    let cb = |cb: u64, userdata: u64| Callback { cb, userdata };
    fn code<T>(what: &'static str, code: u32, f: fn(u32) -> Option<T>) -> Result<T, DecodeError> {
        f(code).ok_or(DecodeError::UnknownCode { what, code })
    }
    Ok(match e.body_type() {
        fb::EventBody::NONE => Event::None,
        fb::EventBody::config => {
            let t = e.body_as_config().ok_or(unknown)?;
            Event::Config {
                topic: t.topic().to_owned(),
                blob: t.blob().bytes().to_vec(),
            }
        }
        fb::EventBody::state => {
            let t = e.body_as_state().ok_or(unknown)?;
            Event::State {
                cb: cb(t.cb(), t.cb_userdata()),
                reason: code("StateOutput.reason", t.reason(), StateReason::from_code)?,
            }
        }
        fb::EventBody::exit => Event::Exit,
        fb::EventBody::blob => {
            let t = e.body_as_blob().ok_or(unknown)?;
            let fields = match t.result_type() {
                fb::BlobResultUnion::azureBlob => t
                    .result_as_azure_blob()
                    .map(|r| (BLOB_TYPE_AZURE_BLOB, r.result(), r.error(), r.http_status())),
                fb::BlobResultUnion::evp => t
                    .result_as_evp()
                    .map(|r| (BLOB_TYPE_EVP_EXT, r.result(), r.error(), r.http_status())),
                fb::BlobResultUnion::http => t
                    .result_as_http()
                    .map(|r| (BLOB_TYPE_HTTP, r.result(), r.error(), r.http_status())),
                fb::BlobResultUnion::http_ext => t
                    .result_as_http_ext()
                    .map(|r| (BLOB_TYPE_HTTP, r.result(), r.error(), r.http_status())),
                _ => None,
            };
            let (kind, result, error, http_status) = fields.unwrap_or((BLOB_TYPE_HTTP, 0, 0, 0));
            Event::Blob {
                cb: cb(t.cb(), t.cb_userdata()),
                reason: code("BlobOutput.reason", t.reason(), BlobReason::from_code)?,
                result: BlobOutcome {
                    kind,
                    result,
                    error,
                    http_status,
                },
            }
        }
        fb::EventBody::messageSent => {
            let t = e.body_as_message_sent().ok_or(unknown)?;
            Event::MessageSent {
                cb: cb(t.cb(), t.cb_userdata()),
                reason: code(
                    "MessageSentOutput.reason",
                    t.reason(),
                    MessageSentReason::from_code,
                )?,
            }
        }
        fb::EventBody::messageReceived => {
            let t = e.body_as_message_received().ok_or(unknown)?;
            Event::MessageReceived {
                topic: t.topic().to_owned(),
                blob: t.blob().bytes().to_vec(),
            }
        }
        fb::EventBody::telemetry => {
            let t = e.body_as_telemetry().ok_or(unknown)?;
            Event::Telemetry {
                cb: cb(t.cb(), t.cb_userdata()),
                reason: code(
                    "TelemetryOutput.reason",
                    t.reason(),
                    TelemetryReason::from_code,
                )?,
            }
        }
        fb::EventBody::rpcRequest => {
            let t = e.body_as_rpc_request().ok_or(unknown)?;
            Event::RpcRequest {
                id: t.id(),
                method: t.method().to_owned(),
                params: t.params().to_owned(),
            }
        }
        fb::EventBody::rpcResponse => {
            let t = e.body_as_rpc_response().ok_or(unknown)?;
            Event::RpcResponse {
                cb: cb(t.cb(), t.cb_userdata()),
                reason: code(
                    "RpcResponseOutput.reason",
                    t.reason(),
                    RpcResponseReason::from_code,
                )?,
            }
        }
        _ => return Err(unknown),
    })
}

impl Event {
    /// An estimate of the bytes this event occupies on the wire, for queue accounting.
    pub fn wire_size(&self) -> usize {
        /// Tables, vtables, offsets and alignment of an event with small fields.
        const OVERHEAD: usize = 64;
        OVERHEAD
            + match self {
                Event::Config { topic, blob } | Event::MessageReceived { topic, blob } => {
                    topic.len() + blob.len()
                }
                Event::RpcRequest { method, params, .. } => method.len() + params.len(),
                _ => 0,
            }
    }
}

impl Response {
    /// The payload of this response (a root `Response` table).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = FlatBufferBuilder::with_capacity(BUILDER_START);
        let (tag, body) = match self {
            Response::GetEvent(event) => {
                let e = build_event(&mut b, event);
                (fb::ResponseUnion::getEvent, e.as_union_value())
            }
            Response::Simple(result) => {
                let t = fb::Simple::create(
                    &mut b,
                    &fb::SimpleArgs {
                        result: result.code(),
                    },
                );
                (fb::ResponseUnion::simple, t.as_union_value())
            }
            Response::StreamParams {
                result,
                kind,
                direction,
            } => {
                let t = fb::StreamParamsResponse::create(
                    &mut b,
                    &fb::StreamParamsResponseArgs {
                        result: result.code(),
                        type_: fb::StreamType(*kind),
                        direction: fb::StreamDirection(*direction),
                    },
                );
                (fb::ResponseUnion::streamParamsResponse, t.as_union_value())
            }
        };
        let root = fb::Response::create(
            &mut b,
            &fb::ResponseArgs {
                body_type: tag,
                body: Some(body),
            },
        );
        b.finish_minimal(root);
        b.finished_data().to_vec()
    }

    /// Verifies and decodes a response payload.
    pub fn decode(payload: &[u8]) -> Result<Response, DecodeError> {
        let root = flatbuffers::root::<fb::Response>(payload)?;
        let unknown = DecodeError::UnknownBody {
            what: "Response",
            tag: root.body_type().0,
        };
        let result = |code: u32| {
            EvpResult::from_code(code).ok_or(DecodeError::UnknownCode {
                what: "EVP_RESULT",
                code,
            })
        };
        Ok(match root.body_type() {
            fb::ResponseUnion::getEvent => {
                Response::GetEvent(decode_event(root.body_as_get_event().ok_or(unknown)?)?)
            }
            fb::ResponseUnion::simple => {
                Response::Simple(result(root.body_as_simple().ok_or(unknown)?.result())?)
            }
            fb::ResponseUnion::streamParamsResponse => {
                let t = root.body_as_stream_params_response().ok_or(unknown)?;
                Response::StreamParams {
                    result: result(t.result())?,
                    kind: t.type_().0,
                    direction: t.direction().0,
                }
            }
            _ => return Err(unknown),
        })
    }
}

/// `EVP_BLOB_TYPE_AZURE_BLOB`.
pub const BLOB_TYPE_AZURE_BLOB: u32 = 0;
/// `EVP_BLOB_TYPE_EVP` (deprecated).
pub const BLOB_TYPE_EVP: u32 = 1;
/// `EVP_BLOB_TYPE_HTTP`.
pub const BLOB_TYPE_HTTP: u32 = 2;
/// `EVP_BLOB_TYPE_EVP_EXT`.
pub const BLOB_TYPE_EVP_EXT: u32 = 3;

/// `EVP_BLOB_RESULT_SUCCESS`.
pub const BLOB_RESULT_SUCCESS: u32 = 0;
/// `EVP_BLOB_RESULT_ERROR` (with an errno in `error`).
pub const BLOB_RESULT_ERROR: u32 = 1;
/// `EVP_BLOB_RESULT_ERROR_HTTP` (with the status in `http_status`).
pub const BLOB_RESULT_ERROR_HTTP: u32 = 2;

/// How a blob transfer went: the `EVP_BlobResult*` struct of its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlobOutcome {
    /// The request's `EVP_BLOB_TYPE`, which picks the result's union tag.
    pub kind: u32,
    /// `EVP_BLOB_RESULT`.
    pub result: u32,
    /// An errno, for `BLOB_RESULT_ERROR`.
    pub error: u32,
    /// The HTTP status, when a response came.
    pub http_status: u32,
}
