//! The rules of a module's requests (all but getEvent, which is a wait): what each answers,
//! what it queues, and what the broker has left to do. Every request that ends in a callback
//! begins with [`Instance::admit`]: room for the callback, or EXIT at once when exiting.

use std::collections::HashMap;

use evp_schemas::sdk::{
    BlobOutcome, BlobReason, BlobRequest, Callback, Event, EvpResult, MessageSentReason, Request,
    Response, RpcResponseReason, RpcStatus, StateReason, TelemetryEntry, TelemetryReason,
};
use tracing::warn;

use super::instance::{Instance, PendingState};
use super::{
    CALLBACK_COST, MAX_BATCH_BYTES, MAX_BATCH_ENTRIES, MAX_NON_JSON_WARNINGS,
    MAX_TELEMETRY_ENTRIES, Peer, PendingTelemetry, Rules, Signal, current, error_answer,
};
use crate::{blob, limits};

/// The answer to a request and what is left to do once it is given.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Handled {
    /// The answer for the module.
    pub(crate) response: Response,
    /// The work left for the broker.
    pub(crate) then: Then,
}

/// What the broker does after a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Then {
    /// Nothing.
    Nothing,
    /// A state or telemetry waits: wake the flusher, at once when a telemetry batch is `full`.
    Flush {
        /// A batch is full: no waiting for more.
        full: bool,
    },
    /// The module answered a command the hub waits for: emit `signal`, then give the outcome
    /// to [`Rules::rpc_answered`] with `cb`.
    EmitAnswer {
        /// The module's answer.
        signal: Signal,
        /// The request's callback.
        cb: Callback,
    },
    /// The module's answer cannot reach the hub: emit this error answer instead.
    AnswerHub(Signal),
    /// A blob transfer was accepted: run it, then give its outcome to [`Rules::blob_done`]
    /// with `cb`.
    Transfer {
        /// What to transfer.
        job: crate::blob::Job,
        /// The request's callback.
        cb: Callback,
    },
}

impl Handled {
    fn answer(result: EvpResult) -> Handled {
        Handled {
            response: Response::Simple(result),
            then: Then::Nothing,
        }
    }
}

/// A request rule's outcome: `Ok` is `EVP_OK` with work left; `Err` is the answer given with
/// nothing left to do (the EVP_OK of a request met with EXIT among them).
type Ruled = Result<Then, EvpResult>;

impl From<Ruled> for Handled {
    fn from(ruled: Ruled) -> Handled {
        match ruled {
            Ok(then) => Handled {
                response: Response::Simple(EvpResult::Ok),
                then,
            },
            Err(result) => Handled::answer(result),
        }
    }
}

impl Rules {
    /// Serves one request of `peer`. Strings that would become D-Bus strings are checked
    /// first: one with a NUL is refused (`EVP_INVAL`), logged once per instance and field.
    pub(crate) fn handle(&mut self, peer: &Peer, request: Request) -> Handled {
        let name = peer.instance.name.as_str();
        if let Err(e) = request.check_bus_strings() {
            if self.nul_logged.insert((name.to_owned(), e.field.clone())) {
                warn!(
                    instance = name,
                    "request refused with EVP_INVAL: {e} (logged once per field)"
                );
            }
            return Handled::answer(EvpResult::Inval);
        }
        match request {
            // conn.rs waits for events itself.
            Request::GetEvent { .. } => Handled::answer(EvpResult::AgentProtocolError),
            Request::RequestResendConfig => {
                if let Some(inst) = current(&mut self.instances, &peer.instance)
                    && !inst.exiting
                    && let Some(topics) = self.configs.get(name)
                {
                    inst.push_configs(topics);
                }
                Handled::answer(EvpResult::Ok)
            }
            Request::SendState { topic, blob, cb } => self.send_state(peer, topic, blob, cb).into(),
            Request::SendTelemetry { entries, cb } => self.send_telemetry(peer, entries, cb).into(),
            Request::SendMessage { topic, blob, cb } => {
                self.send_message(peer, &topic, blob, cb).into()
            }
            Request::SendRpcResponse {
                id,
                response,
                status,
                cb,
            } => self.send_rpc_response(peer, id, response, status, cb),
            Request::BlobOperation {
                kind,
                op,
                request,
                filename,
                cb,
            } => self
                .blob_operation(peer, kind, op, &request, &filename, cb)
                .into(),
            // No stream is ever declared yet, so none can be opened.
            Request::StreamParamsRequest { .. } => Handled {
                response: Response::StreamParams {
                    result: EvpResult::Inval,
                    kind: 0,
                    direction: 0,
                },
                then: Then::Nothing,
            },
        }
    }

    /// The outcome of emitting a module's answer ([`Then::EmitAnswer`]): its callback.
    pub(crate) fn rpc_answered(&mut self, peer: &Peer, cb: Callback, reason: RpcResponseReason) {
        if let Some(inst) = self.current(&peer.instance) {
            inst.complete(peer.conn, Event::RpcResponse { cb, reason });
        }
    }

    /// A blob transfer: a known type, a GET or PUT, an http(s) URL, a file inside the
    /// workspace and well-formed headers (`EVP_INVAL` otherwise), at most
    /// [`blob::MAX_LIVE_BLOBS`] under way (`EVP_DENIED` beyond), and room for its callback.
    /// EVP storage takes only PUT (`EVP_NOTSUP` for GET, as EVP), its URL from the hub.
    fn blob_operation(
        &mut self,
        peer: &Peer,
        kind: u32,
        op: u32,
        request: &BlobRequest,
        filename: &str,
        cb: Callback,
    ) -> Ruled {
        let limit = self.settings.event_queue_bytes;
        let name = peer.instance.name.as_str();
        if !blob::served_kind(kind) {
            return Err(EvpResult::NotSup);
        }
        let direction = blob::Direction::from_code(op).ok_or(EvpResult::Inval)?;
        let (url, storage) = match request {
            BlobRequest::Evp {
                remote_name,
                storage_name,
            } => {
                if direction == blob::Direction::Get {
                    return Err(EvpResult::NotSup);
                }
                // The URL comes with the hub's storage token, before the transfer.
                let target = blob::StorageTarget {
                    instance: name.to_owned(),
                    storage_name: storage_name.clone().unwrap_or_default(),
                    remote_name: remote_name.clone(),
                };
                (String::new(), Some(target))
            }
            other => {
                let url = other.url();
                if !evp_schemas::sdk::is_http_url(url) {
                    warn!(
                        instance = name,
                        url, "blob operation refused: not an http(s) URL"
                    );
                    return Err(EvpResult::Inval);
                }
                (url.to_owned(), None)
            }
        };
        let workspace = self.instances_dir.join(name).join(blob::WORKSPACE_DIR);
        let checked = blob::confine(filename, &workspace)
            .and_then(|file| Ok((file, blob::parse_headers(request, direction)?)));
        let (file, headers) = checked.map_err(|e| {
            warn!(instance = name, "blob operation refused: {e}");
            EvpResult::Inval
        })?;
        let inst = self.instance_of(peer)?;
        if inst.live_blobs >= blob::MAX_LIVE_BLOBS {
            return Err(EvpResult::Denied);
        }
        let exit = Event::Blob {
            cb,
            reason: BlobReason::Exit,
            result: BlobOutcome {
                kind,
                ..Default::default()
            },
        };
        inst.admit(peer.conn, limit, exit)?;
        inst.live_blobs += 1;
        Ok(Then::Transfer {
            job: blob::Job {
                kind,
                direction,
                url,
                headers,
                workspace,
                file,
                storage,
            },
            cb,
        })
    }

    /// The instance of `peer`, or `EVP_ERROR` when it was closed or opened again since.
    fn instance_of(&mut self, peer: &Peer) -> Result<&mut Instance, EvpResult> {
        self.current(&peer.instance).ok_or(EvpResult::Error)
    }

    fn send_state(&mut self, peer: &Peer, topic: String, blob: Vec<u8>, cb: Callback) -> Ruled {
        let (limit, state_limit) = (self.settings.event_queue_bytes, self.settings.state_bytes);
        let name = peer.instance.name.as_str();
        let inst = self.instance_of(peer)?;
        // Counted as the hub will get them, escaping included: what cannot fit one report
        // message, or would take the instance past its share, is refused now.
        if !limits::state_fits(name, &topic, &blob)
            || inst.state_share_with(name, &topic, &blob) > state_limit
        {
            return Err(EvpResult::TooBig);
        }
        let exit = Event::State {
            cb,
            reason: StateReason::Exit,
        };
        inst.admit(peer.conn, limit, exit)?;
        let new = PendingState {
            cost: limits::state_cost(name, &topic, &blob),
            value: blob,
            cb,
            conn: peer.conn,
        };
        if let Some(old) = inst.pending_states.insert(topic, new) {
            let overwritten = Event::State {
                cb: old.cb,
                reason: StateReason::Overwritten,
            };
            inst.complete(old.conn, overwritten);
        }
        self.states_pending = true;
        Ok(Then::Flush { full: false })
    }

    fn send_telemetry(&mut self, peer: &Peer, entries: Vec<TelemetryEntry>, cb: Callback) -> Ruled {
        let (limit, tel_limit) = (
            self.settings.event_queue_bytes,
            self.settings.telemetry_queue_bytes,
        );
        let name = peer.instance.name.as_str();
        if entries.len() > MAX_TELEMETRY_ENTRIES {
            return Err(EvpResult::TooBig);
        }
        // EVP accepts a value that is not JSON (and then drops it); unchanged modules rely on
        // EVP_OK, so it is accepted and goes to the hub as a JSON string instead.
        let mut non_json = Vec::new();
        let entries: Vec<(String, String)> = entries
            .into_iter()
            .map(|e| match limits::telemetry_json(&e.value) {
                None => (e.key, e.value),
                Some(json) => {
                    non_json.push(e.key.clone());
                    (e.key, json)
                }
            })
            .collect();
        if !limits::telemetry_fits(name, &entries) {
            return Err(EvpResult::TooBig);
        }
        let bytes: usize = entries
            .iter()
            .map(|(key, value)| name.len() + key.len() + value.len())
            .sum();
        let inst = self.instance_of(peer)?;
        if inst.telemetry_bytes + bytes > tel_limit {
            return Err(if bytes > tel_limit {
                EvpResult::TooBig
            } else {
                EvpResult::Again
            });
        }
        let exit = Event::Telemetry {
            cb,
            reason: TelemetryReason::Exit,
        };
        inst.admit(peer.conn, limit, exit)?;
        for key in non_json {
            if inst.non_json_warned.len() < MAX_NON_JSON_WARNINGS
                && inst.non_json_warned.insert(key.clone())
            {
                warn!(
                    instance = name,
                    key, "telemetry value is not JSON: sent to the hub as a JSON string"
                );
            }
        }
        inst.telemetry_bytes += bytes;
        let queue = &mut self.telemetry;
        queue.entries += entries.len();
        queue.bytes += bytes;
        queue.calls.push_back(PendingTelemetry {
            peer: peer.clone(),
            cb,
            entries,
            bytes,
        });
        let full = queue.entries >= MAX_BATCH_ENTRIES || queue.bytes >= MAX_BATCH_BYTES;
        Ok(Then::Flush { full })
    }

    fn send_message(&mut self, peer: &Peer, alias: &str, blob: Vec<u8>, cb: Callback) -> Ruled {
        let limit = self.settings.event_queue_bytes;
        let name = peer.instance.name.as_str();
        let exit = Event::MessageSent {
            cb,
            reason: MessageSentReason::Exit,
        };
        self.instance_of(peer)?.admit(peer.conn, limit, exit)?;
        let targets: Vec<(String, String)> = match self.routing.publish_topic(name, alias) {
            Some(topic) => self
                .routing
                .subscribers(topic)
                .filter(|(sub, _)| self.instances.get(*sub).is_some_and(|i| !i.exiting))
                .map(|(sub, a)| (sub.to_owned(), a.to_owned()))
                .collect(),
            None => Vec::new(),
        };
        // All or nothing: when a subscriber's queue is full, the sender retries later rather
        // than some subscribers silently missing the message.
        let mut need: HashMap<&str, usize> = HashMap::new();
        for (sub, a) in &targets {
            *need.entry(sub.as_str()).or_default() += CALLBACK_COST + a.len() + blob.len();
        }
        let room = need.iter().all(|(sub, n)| {
            self.instances
                .get(*sub)
                .is_some_and(|i| i.used + n <= limit)
        });
        if !room {
            if let Some(inst) = self.instances.get_mut(name) {
                inst.release();
            }
            return Err(EvpResult::Again);
        }
        for (sub, a) in &targets {
            if let Some(sub) = self.instances.get_mut(sub) {
                sub.push(Event::MessageReceived {
                    topic: a.clone(),
                    blob: blob.clone(),
                });
            }
        }
        let reason = if targets.is_empty() {
            MessageSentReason::Error
        } else {
            MessageSentReason::Sent
        };
        if let Some(inst) = self.instances.get_mut(name) {
            inst.complete(peer.conn, Event::MessageSent { cb, reason });
        }
        Ok(Then::Nothing)
    }

    fn send_rpc_response(
        &mut self,
        peer: &Peer,
        id: u64,
        response: Option<String>,
        status: u32,
        cb: Callback,
    ) -> Handled {
        let name = peer.instance.name.as_str();
        let Some(response) = response else {
            return Handled::answer(EvpResult::Inval);
        };
        if RpcStatus::from_code(status).is_none() {
            return Handled::answer(EvpResult::Inval);
        }
        if !limits::rpc_response_fits(id, status, &response) {
            // The module gets EVP_TOOBIG; the hub, which waits for this command, gets an error
            // answer now rather than none.
            let was_waiting = self
                .current(&peer.instance)
                .is_some_and(|i| i.rpcs.remove(&id).is_some());
            let then = if was_waiting {
                warn!(
                    instance = name,
                    reqid = id,
                    "answer too big for one MQTT message"
                );
                let message = format!(
                    "the answer of instance {name} does not fit one MQTT message once encoded \
                     ({} bytes of response)",
                    response.len()
                );
                Then::AnswerHub(error_answer(id, name, &message))
            } else {
                Then::Nothing
            };
            return Handled {
                response: Response::Simple(EvpResult::TooBig),
                then,
            };
        }
        let limit = self.settings.event_queue_bytes;
        let inst = match self.instance_of(peer) {
            Ok(inst) => inst,
            Err(result) => return Handled::answer(result),
        };
        let exit = Event::RpcResponse {
            cb,
            reason: RpcResponseReason::Exit,
        };
        let ruled = inst.admit(peer.conn, limit, exit).map(|()| {
            if inst.rpcs.remove(&id).is_some() {
                let signal = Signal::RpcResponse {
                    reqid: id,
                    instance: name.to_owned(),
                    status,
                    response,
                };
                Then::EmitAnswer { signal, cb }
            } else {
                let unknown = Event::RpcResponse {
                    cb,
                    reason: RpcResponseReason::Error,
                };
                inst.complete(peer.conn, unknown);
                Then::Nothing
            }
        });
        ruled.into()
    }
}
