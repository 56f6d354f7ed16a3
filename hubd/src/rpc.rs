//! Direct commands: which MQTT request each pending EVP request id answers (a map with expiry,
//! EVP's 16-entry ring fixed), and the agent's own `$agent/...` methods.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use evp_schemas::{DirectCommand, DirectCommandResponse, HubCodec, RpcStatus};
use serde_json::{Value, json};
use tracing::info;

/// How long a direct command waits for its answer. A hub's RPC request times out well before
/// this (ThingsBoard: 10 s by default), so an answer later than this has nobody waiting.
pub const PENDING_EXPIRY: Duration = Duration::from_secs(60);
/// Most direct commands waiting for an answer at once; a hub that sends more within
/// [`PENDING_EXPIRY`] is flooding the device, and further commands are refused with an error.
pub const MAX_PENDING: usize = 1024;
/// Most direct commands waiting for one instance: a quarter of [`MAX_PENDING`], so an
/// instance that never answers fills its own share only and the others keep being served
/// (EVP's whole ring held 16; a hub rarely has more than a few in flight per instance).
pub const MAX_PENDING_PER_INSTANCE: usize = MAX_PENDING / 4;
/// Prefix of the methods the agent answers itself.
pub const AGENT_METHOD_PREFIX: &str = "$agent/";

/// Why a direct command was not accepted for delivery; found when it arrives, and sent back to
/// the hub as the error message of its answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PendingError {
    /// The same request id is still waiting for an answer to an earlier request.
    #[error(
        "reqid {reqid} is already waiting for an answer (MQTT request {mqtt_id}); a request id may be reused only after its answer"
    )]
    Duplicate {
        /// The request id.
        reqid: u64,
        /// The MQTT id of the request that holds it.
        mqtt_id: String,
    },
    /// Too many commands are waiting.
    #[error("{MAX_PENDING} direct commands are already waiting for an answer")]
    Full,
    /// Too many commands are waiting for this instance.
    #[error(
        "{MAX_PENDING_PER_INSTANCE} direct commands are already waiting for an answer from instance {0}"
    )]
    InstanceFull(String),
}

#[derive(Debug)]
struct Pending {
    mqtt_id: String,
    instance: String,
    expires: Instant,
}

/// EVP request id → the MQTT id of the request to answer, until answered or expired; bounded
/// in all and per instance.
#[derive(Debug, Default)]
pub struct PendingCommands {
    map: HashMap<u64, Pending>,
    /// How many entries of `map` each instance has; instances with none are absent.
    per_instance: HashMap<String, usize>,
}

impl PendingCommands {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `reqid` for `instance` arrived on MQTT request `mqtt_id` at `now`. A
    /// request id still waiting is refused, so an answer never goes to the wrong MQTT id; so is
    /// a command beyond the instance's share or the whole bound.
    pub fn insert(
        &mut self,
        reqid: u64,
        instance: &str,
        mqtt_id: &str,
        now: Instant,
    ) -> Result<(), PendingError> {
        if let Some(p) = self.map.get(&reqid).filter(|p| p.expires > now) {
            return Err(PendingError::Duplicate {
                reqid,
                mqtt_id: p.mqtt_id.clone(),
            });
        }
        let instance_count = |s: &Self| s.per_instance.get(instance).copied().unwrap_or(0);
        if self.map.len() >= MAX_PENDING || instance_count(self) >= MAX_PENDING_PER_INSTANCE {
            self.expire(now);
            if self.map.len() >= MAX_PENDING {
                return Err(PendingError::Full);
            }
            if instance_count(self) >= MAX_PENDING_PER_INSTANCE {
                return Err(PendingError::InstanceFull(instance.to_owned()));
            }
        }
        // An expired entry of the same reqid is replaced: uncount it first.
        self.remove(reqid);
        *self.per_instance.entry(instance.to_owned()).or_default() += 1;
        self.map.insert(
            reqid,
            Pending {
                mqtt_id: mqtt_id.to_owned(),
                instance: instance.to_owned(),
                expires: now + PENDING_EXPIRY,
            },
        );
        Ok(())
    }

    /// Removes `reqid`'s entry, keeping the per-instance counts right.
    fn remove(&mut self, reqid: u64) -> Option<Pending> {
        let p = self.map.remove(&reqid)?;
        self.uncount(&p.instance);
        Some(p)
    }

    fn uncount(&mut self, instance: &str) {
        if let Some(n) = self.per_instance.get_mut(instance) {
            *n -= 1;
            if *n == 0 {
                self.per_instance.remove(instance);
            }
        }
    }

    /// The MQTT id to answer `reqid` on, which is then forgotten; `None` when nothing waits
    /// for it (never sent, answered already, or expired).
    pub fn take(&mut self, reqid: u64, now: Instant) -> Option<String> {
        let p = self.remove(reqid)?;
        (p.expires > now).then_some(p.mqtt_id)
    }

    /// Forgets the expired entries; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let expired: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(reqid, _)| *reqid)
            .collect();
        for reqid in &expired {
            self.remove(*reqid);
        }
        expired.len()
    }

    /// Forgets everything (a new MQTT session: the hub's ids of the old one mean nothing now).
    pub fn clear(&mut self) {
        self.map.clear();
        self.per_instance.clear();
    }

    /// How many commands wait.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// An error answer to `reqid` with `message`.
pub fn error_response(reqid: u64, message: impl Into<String>) -> DirectCommandResponse {
    let message = message.into();
    DirectCommandResponse {
        reqid,
        status: RpcStatus::Error,
        response: Some(json!({ "error": message }).to_string()),
        error_message: Some(message),
    }
}

/// The payload answering a direct command with `answer`, at most `max_payload` bytes: the
/// answer itself, or, when it is too big to send, an error answer saying so (the hub learns
/// why instead of waiting for nothing). The second value is that reason, for the log.
pub fn answer_payload(
    codec: &dyn HubCodec,
    instance: &str,
    answer: &DirectCommandResponse,
    max_payload: usize,
) -> (Vec<u8>, Option<String>) {
    let payload = codec.encode_direct_command_response(instance, answer);
    if payload.len() <= max_payload {
        return (payload, None);
    }
    let why = format!(
        "the answer of {} bytes exceeds the {max_payload}-byte MQTT limit",
        payload.len()
    );
    let error = error_response(answer.reqid, why.clone());
    (
        codec.encode_direct_command_response(instance, &error),
        Some(why),
    )
}

/// The agent's answer to one of its own `$agent/...` methods. `$agent/get` reports
/// `{"log_enable": false}`; `$agent/set` accepts `{"log_enable": <bool>}` but changes nothing,
/// since module log streaming (a WASM feature in EVP) is not built; other names are unknown.
pub fn agent_method(cmd: &DirectCommand) -> DirectCommandResponse {
    let ok = |response: Option<String>| DirectCommandResponse {
        reqid: cmd.reqid,
        status: RpcStatus::Ok,
        error_message: None,
        response,
    };
    match cmd.method.strip_prefix(AGENT_METHOD_PREFIX) {
        Some("get") => ok(Some(json!({ "log_enable": false }).to_string())),
        Some("set") => match serde_json::from_str::<Value>(&cmd.params) {
            Ok(Value::Object(o)) => match o.get("log_enable") {
                None | Some(Value::Bool(_)) => {
                    info!(
                        "$agent/set for {} ({}): accepted; module log streaming is not built, \
                         so nothing changes",
                        cmd.instance, cmd.params
                    );
                    ok(None)
                }
                Some(_) => error_response(cmd.reqid, "log_enable must be true or false"),
            },
            Ok(_) => error_response(cmd.reqid, "params must be a JSON object"),
            Err(e) => error_response(cmd.reqid, format!("params is not JSON: {e}")),
        },
        _ => DirectCommandResponse {
            reqid: cmd.reqid,
            status: RpcStatus::MethodNotFound,
            error_message: None,
            response: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_goes_to_its_own_request_once() {
        let t0 = Instant::now();
        let mut p = PendingCommands::new();
        p.insert(7, "i", "42", t0).unwrap();
        p.insert(8, "i", "43", t0).unwrap();
        assert_eq!(p.take(8, t0), Some("43".into()));
        assert_eq!(p.take(7, t0), Some("42".into()));
        assert_eq!(p.take(7, t0), None, "answered already");
        assert_eq!(p.take(99, t0), None, "never sent");
        assert!(p.is_empty());
    }

    #[test]
    fn a_pending_duplicate_is_refused_and_keeps_the_first_id() {
        let t0 = Instant::now();
        let mut p = PendingCommands::new();
        p.insert(7, "i", "42", t0).unwrap();
        assert_eq!(
            p.insert(7, "i", "50", t0 + Duration::from_secs(1)),
            Err(PendingError::Duplicate {
                reqid: 7,
                mqtt_id: "42".into()
            })
        );
        assert_eq!(p.take(7, t0), Some("42".into()));
        p.insert(7, "i", "51", t0).unwrap();
        assert_eq!(p.take(7, t0), Some("51".into()), "reusable once answered");
    }

    #[test]
    fn entries_expire() {
        let t0 = Instant::now();
        let later = t0 + PENDING_EXPIRY;
        let mut p = PendingCommands::new();
        p.insert(7, "i", "42", t0).unwrap();
        assert_eq!(p.take(7, later), None, "an expired entry is never answered");
        p.insert(8, "i", "43", t0).unwrap();
        p.insert(8, "i", "44", later).unwrap();
        assert_eq!(
            p.take(8, later),
            Some("44".into()),
            "an expired reqid is free"
        );
        p.insert(9, "i", "45", t0).unwrap();
        assert_eq!(p.expire(later), 1);
        assert!(p.is_empty());
    }

    #[test]
    fn the_map_is_bounded_and_cleared_on_reconnect() {
        let t0 = Instant::now();
        let mut p = PendingCommands::new();
        for i in 0..MAX_PENDING as u64 {
            let instance = format!("i{}", i as usize / MAX_PENDING_PER_INSTANCE);
            p.insert(i, &instance, "x", t0).unwrap();
        }
        assert_eq!(
            p.insert(u64::MAX, "other", "y", t0),
            Err(PendingError::Full)
        );
        assert!(
            p.insert(u64::MAX, "other", "y", t0 + PENDING_EXPIRY)
                .is_ok(),
            "expired entries make room"
        );
        assert_eq!(p.len(), 1);
        p.clear();
        assert!(p.is_empty());
    }

    #[test]
    fn a_silent_instance_fills_its_own_share_only() {
        let t0 = Instant::now();
        let mut p = PendingCommands::new();
        for i in 0..MAX_PENDING_PER_INSTANCE as u64 {
            p.insert(i, "silent", "x", t0).unwrap();
        }
        assert_eq!(
            p.insert(10_000, "silent", "y", t0),
            Err(PendingError::InstanceFull("silent".into()))
        );
        p.insert(10_001, "other", "z", t0).unwrap();
        assert_eq!(p.take(0, t0), Some("x".into()));
        p.insert(10_000, "silent", "y", t0).unwrap();
        assert_eq!(
            p.insert(10_002, "silent", "w", t0),
            Err(PendingError::InstanceFull("silent".into())),
            "an answer frees one place, not more"
        );
        assert_eq!(p.expire(t0 + PENDING_EXPIRY), MAX_PENDING_PER_INSTANCE + 1);
        assert!(p.per_instance.is_empty(), "counts follow expiry");
        const { assert!(MAX_PENDING_PER_INSTANCE < MAX_PENDING) };
    }

    #[test]
    fn an_answer_too_big_becomes_an_error_answer() {
        use evp_schemas::evp2::Evp2Codec;
        let answer = |response: &str| DirectCommandResponse {
            reqid: 7,
            status: RpcStatus::Ok,
            error_message: None,
            response: Some(response.into()),
        };
        let (payload, why) = answer_payload(&Evp2Codec, "i", &answer("{}"), 1000);
        assert_eq!(
            payload,
            Evp2Codec.encode_direct_command_response("i", &answer("{}"))
        );
        assert_eq!(why, None);
        // 200 control characters are 1,200 bytes once escaped.
        let (payload, why) = answer_payload(&Evp2Codec, "i", &answer(&"\u{1}".repeat(200)), 1000);
        let v: Value = serde_json::from_slice(&payload).unwrap();
        let r = &v["direct-command-response"];
        assert_eq!(
            (r["status"].as_str(), r["reqid"].as_str()),
            (Some("error"), Some("7"))
        );
        assert!(
            r["errorMessage"].as_str().unwrap().contains("MQTT limit"),
            "{r}"
        );
        assert!(why.is_some() && payload.len() <= 1000);
    }

    fn cmd(method: &str, params: &str) -> DirectCommand {
        DirectCommand {
            reqid: 3,
            method: method.into(),
            instance: "i".into(),
            params: params.into(),
        }
    }

    #[test]
    fn agent_methods() {
        let get = agent_method(&cmd("$agent/get", ""));
        assert_eq!(get.status, RpcStatus::Ok);
        let v: Value = serde_json::from_str(get.response.as_deref().unwrap()).unwrap();
        assert_eq!(v, json!({"log_enable": false}));
        let set = agent_method(&cmd("$agent/set", r#"{"log_enable": true}"#));
        assert_eq!((set.status, set.response), (RpcStatus::Ok, None));
        let bad = agent_method(&cmd("$agent/set", r#"{"log_enable": 1}"#));
        assert_eq!(bad.status, RpcStatus::Error);
        let v: Value = serde_json::from_str(bad.response.as_deref().unwrap()).unwrap();
        assert_eq!(v["error"], "log_enable must be true or false");
        assert_eq!(
            agent_method(&cmd("$agent/set", "nope")).status,
            RpcStatus::Error
        );
        assert_eq!(
            agent_method(&cmd("$agent/reboot", "")).status,
            RpcStatus::MethodNotFound
        );
    }
}
