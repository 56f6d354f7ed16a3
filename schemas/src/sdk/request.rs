//! A module's requests: the owned `Request`, its encoder and its verifying decoder.

use flatbuffers::FlatBufferBuilder;

use super::{BUILDER_START, Callback, DecodeError, TelemetryEntry, fb};

/// Where a blob is (the `BlobRequestUnion`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobRequest {
    /// An Azure blob SAS URL.
    AzureBlob {
        /// The SAS URL.
        url: String,
    },
    /// EVP storage: a name the hub's storage token turns into a URL.
    Evp {
        /// The blob's name in the storage.
        remote_name: String,
        /// The storage (`None`: the default one).
        storage_name: Option<String>,
    },
    /// A plain HTTP(S) URL.
    Http {
        /// The URL.
        url: String,
    },
    /// An HTTP(S) URL with request headers (`Name: value`).
    HttpExt {
        /// The URL.
        url: String,
        /// The headers, each `Name: value`.
        headers: Vec<String>,
    },
}

impl BlobRequest {
    /// The URL, or the remote name for EVP storage.
    pub fn url(&self) -> &str {
        match self {
            BlobRequest::AzureBlob { url } | BlobRequest::Http { url } => url,
            BlobRequest::HttpExt { url, .. } => url,
            BlobRequest::Evp { remote_name, .. } => remote_name,
        }
    }
}

/// Whether a blob transfer may go to `url`: http or https, the schemes EVP transfers with.
pub fn is_http_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// `EVP_BLOB_TYPE_HTTP_EXT`: the EVP C SDK sends these requests with the `http` union tag
/// and an HttpExt-shaped table (SDK.md §4.4).
pub const BLOB_TYPE_HTTP_EXT: u32 = 4;

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
    /// `EVP_blobOperation`.
    BlobOperation {
        /// `EVP_BLOB_TYPE`.
        kind: u32,
        /// `EVP_BLOB_OPERATION` (GET 0, PUT 1).
        op: u32,
        /// Where the blob is.
        request: BlobRequest,
        /// The local file, as the module names it.
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
    /// topic, telemetry keys and values, an RPC response, an EVP storage blob's names, which
    /// `Hub1.RequestStorageToken` carries) or matches against the deployment (a message
    /// topic): a NUL in one would make dbus-daemon disconnect sdk-broker, so the request is
    /// refused (`EVP_INVAL`) before anything is done with it.
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
            Request::BlobOperation {
                request:
                    BlobRequest::Evp {
                        remote_name,
                        storage_name,
                    },
                ..
            } => check_bus_string("the blob's remote name", remote_name).and_then(|()| {
                check_bus_string(
                    "the blob's storage name",
                    storage_name.as_deref().unwrap_or_default(),
                )
            }),
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
                request,
                filename,
                cb,
            } => {
                let (request_type, req) = encode_blob_request(&mut b, request);
                let filename = b.create_string(filename);
                let t = fb::BlobInput::create(
                    &mut b,
                    &fb::BlobInputArgs {
                        type_: *kind,
                        op: *op,
                        request_type,
                        request: Some(req),
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
                let strings = |v: flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<&str>>| {
                    v.iter().map(str::to_owned).collect::<Vec<_>>()
                };
                let request = match t.request_type() {
                    fb::BlobRequestUnion::azureBlob => {
                        t.request_as_azure_blob().map(|r| BlobRequest::AzureBlob {
                            url: r.url().to_owned(),
                        })
                    }
                    fb::BlobRequestUnion::evp => t.request_as_evp().map(|r| BlobRequest::Evp {
                        remote_name: r.remoteName().to_owned(),
                        storage_name: r.storageName().map(str::to_owned),
                    }),
                    // The EVP C SDK's HTTP_EXT: an HttpExt table under the `http` tag, whose
                    // headers the verifier has not seen: verified here as what it is.
                    fb::BlobRequestUnion::http if t.type_() == BLOB_TYPE_HTTP_EXT => {
                        match t.request_as_http() {
                            Some(r) => Some(http_ext_under_http_tag(r._tab)?),
                            None => None,
                        }
                    }
                    fb::BlobRequestUnion::http => t.request_as_http().map(|r| BlobRequest::Http {
                        url: r.url().to_owned(),
                    }),
                    fb::BlobRequestUnion::http_ext => {
                        t.request_as_http_ext().map(|r| BlobRequest::HttpExt {
                            url: r.url().to_owned(),
                            headers: strings(r.headers()),
                        })
                    }
                    _ => None,
                };
                Request::BlobOperation {
                    kind: t.type_(),
                    op: t.op(),
                    request: request.ok_or(DecodeError::UnknownBody {
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

/// Writes a blob request; returns its union tag and offset.
fn encode_blob_request<'b>(
    b: &mut FlatBufferBuilder<'b>,
    request: &BlobRequest,
) -> (
    fb::BlobRequestUnion,
    flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
) {
    match request {
        BlobRequest::AzureBlob { url } => {
            let url = b.create_string(url);
            let t = fb::BlobRequestAzureBlob::create(
                b,
                &fb::BlobRequestAzureBlobArgs { url: Some(url) },
            );
            (fb::BlobRequestUnion::azureBlob, t.as_union_value())
        }
        BlobRequest::Evp {
            remote_name,
            storage_name,
        } => {
            let remote = b.create_string(remote_name);
            let storage = storage_name.as_deref().map(|s| b.create_string(s));
            let t = fb::BlobRequestEvp::create(
                b,
                &fb::BlobRequestEvpArgs {
                    remoteName: Some(remote),
                    storageName: storage,
                },
            );
            (fb::BlobRequestUnion::evp, t.as_union_value())
        }
        BlobRequest::Http { url } => {
            let url = b.create_string(url);
            let t = fb::BlobRequestHttp::create(b, &fb::BlobRequestHttpArgs { url: Some(url) });
            (fb::BlobRequestUnion::http, t.as_union_value())
        }
        BlobRequest::HttpExt { url, headers } => {
            let url = b.create_string(url);
            let made: Vec<_> = headers.iter().map(|h| b.create_string(h)).collect();
            let headers = b.create_vector(&made);
            let t = fb::BlobRequestHttpExt::create(
                b,
                &fb::BlobRequestHttpExtArgs {
                    url: Some(url),
                    headers: Some(headers),
                },
            );
            (fb::BlobRequestUnion::http_ext, t.as_union_value())
        }
    }
}

/// An HttpExt table sent under the `http` tag (the EVP C SDK's HTTP_EXT), verified as an
/// HttpExt before its headers are read.
fn http_ext_under_http_tag(table: flatbuffers::Table<'_>) -> Result<BlobRequest, DecodeError> {
    let opts = flatbuffers::VerifierOptions::default();
    let mut verifier = flatbuffers::Verifier::new(&opts, table.buf());
    <fb::BlobRequestHttpExt as flatbuffers::Verifiable>::run_verifier(&mut verifier, table.loc())?;
    // SAFETY: the table at this location was just verified as a BlobRequestHttpExt.
    let ext = unsafe { fb::BlobRequestHttpExt::init_from_table(table) };
    Ok(BlobRequest::HttpExt {
        url: ext.url().to_owned(),
        headers: ext.headers().iter().map(str::to_owned).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzz/fuzz_targets/sdk_request.rs: an EVP storage PUT whose storage name is a
    /// NUL passed the check, and `Hub1.RequestStorageToken` would have carried it, so
    /// dbus-daemon would have disconnected sdk-broker. The module's frame, as the fuzzer left it.
    #[test]
    fn an_evp_storage_blob_with_a_nul_in_its_names_is_refused() {
        let hex = [
            "100000000000000008000e000700080008000000000000041800000000001200",
            "2c0008000c000700100014001800200012000000000000020300000001000000",
            "5c0000001800000002000000000000fdffff00ffffffffff0000000031000000",
            "2f7661722f6c69622f6576702f696e7374616e6365732f696e73742d312f6465",
            "6661756c745f776f726b73706163652f6600000008000c000400080008000000",
            "14000000040000000100000000000000000000000000000000",
        ]
        .concat();
        let payload = hex::decode(hex).unwrap();
        let request = Request::decode(&payload).unwrap();
        let Request::BlobOperation {
            request: BlobRequest::Evp { storage_name, .. },
            ..
        } = &request
        else {
            panic!("{request:?}");
        };
        assert_eq!(storage_name.as_deref(), Some("\0"));
        let e = request.check_bus_strings().unwrap_err();
        assert_eq!(e.field, "the blob's storage name");
        let remote = Request::BlobOperation {
            kind: 3,
            op: 1,
            request: BlobRequest::Evp {
                remote_name: "cam\0.jpg".into(),
                storage_name: None,
            },
            filename: "f".into(),
            cb: Callback::default(),
        };
        let e = remote.check_bus_strings().unwrap_err();
        assert_eq!((e.field.as_str(), e.at), ("the blob's remote name", 3));
    }
}
