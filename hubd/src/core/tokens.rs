//! The session's half of storage tokens: a request from `Hub1.RequestStorageToken` is sent to
//! the hub (or, offline, answered from the kept `multifile` answers), the hub's answer is
//! matched by its `reqid` (the dialect's: EVP2's payload, EVP1's topic id), and a request that waited [`storage::TOKEN_TIMEOUT`] fails.

use std::time::Instant;

use evp_schemas::ValidationError;
use evp_schemas::evp2::storage::{StorageTokenRequest, StorageTokenResponse};
use evp_schemas::evp2::topics;
use rumqttc::QoS;
use tracing::{debug, info, warn};

use super::Core;
use super::publishing::Published;
use crate::storage::{self, TokenError, TokenRequest};

impl Core {
    /// A module asks where to upload `remote_name`.
    pub(super) fn on_token_request(&mut self, request: TokenRequest, now: Instant) {
        if !self.connected {
            self.answer_offline(request);
            return;
        }
        if self.tokens.is_full() {
            let _ = request.reply.send(Err(TokenError::Busy));
            return;
        }
        let reqid = self.tokens.next_id();
        let payload = self
            .codec
            .encode_storage_token_request(&StorageTokenRequest {
                reqid,
                filename: &request.remote_name,
                instance: &request.instance,
                // EVP leaves `key` out for the default storage (a NULL storage_name).
                key: Some(request.storage_name.as_str()).filter(|k| !k.is_empty()),
            });
        let topic = format!("{}{reqid}", topics::RPC_REQUEST_PREFIX);
        match self.publish(&topic, QoS::AtLeastOnce, payload) {
            Published::Queued => {
                debug!(
                    reqid,
                    instance = request.instance,
                    "storage token asked of the hub"
                );
                self.tokens.insert(reqid, request, now);
            }
            // Gone between the driver and the session: answered as offline, from the kept
            // multifile answers, as a request waiting when the connection drops is.
            Published::Offline => self.answer_offline(request),
            Published::TooBig | Published::NotQueued => {
                let why = "the MQTT client did not take it".to_owned();
                let _ = request.reply.send(Err(TokenError::NotSent(why)));
            }
        }
    }

    /// Answers `request` without the hub: a kept `multifile` answer, or `Offline`.
    fn answer_offline(&self, request: TokenRequest) {
        let kept =
            self.token_cache
                .lookup(&request.instance, &request.storage_name, storage::now_ms());
        let answer = match kept {
            Some(kept) => {
                info!(
                    instance = request.instance,
                    storage = request.storage_name,
                    "offline: the storage token comes from the kept multifile answer"
                );
                kept.token_for(&request.remote_name)
                    .map_err(TokenError::Refused)
            }
            None => Err(TokenError::Offline {
                instance: request.instance.clone(),
                storage: request.storage_name.clone(),
            }),
        };
        let _ = request.reply.send(answer);
    }

    /// An answer on `v1/devices/me/rpc/response/+` that is a storage token's.
    pub(super) fn on_token_answer(
        &mut self,
        answer: Result<StorageTokenResponse, ValidationError>,
    ) {
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                // Without a readable reqid it cannot be matched: the request times out.
                warn!("a storage token answer from the hub is malformed: {e}");
                return;
            }
        };
        let Some(request) = self.tokens.take(&answer.reqid) else {
            debug!(
                reqid = answer.reqid,
                "a storage token answer no request waits for (late, or another device's)"
            );
            return;
        };
        self.token_cache.keep(
            &request.instance,
            &request.storage_name,
            &answer,
            storage::now_ms(),
        );
        let token = answer
            .token_for(&request.remote_name)
            .map_err(TokenError::Refused);
        if let Err(e) = &token {
            warn!(instance = request.instance, "storage token: {e}");
        }
        let _ = request.reply.send(token);
    }

    /// The connection was lost: the requests still waiting get their answer now, from the
    /// kept `multifile` answers or as offline, rather than at their deadline.
    pub(super) fn tokens_offline(&mut self, now: Instant) {
        for request in self.tokens.take_all() {
            self.on_token_request(request, now);
        }
    }

    /// Fails the requests the hub did not answer in time.
    pub(super) fn expire_tokens(&mut self, now: Instant) {
        for (reqid, request) in self.tokens.expire(now) {
            warn!(
                reqid,
                instance = request.instance,
                "the hub did not answer a storage token request"
            );
            let _ = request.reply.send(Err(TokenError::Timeout { reqid }));
        }
    }
}
