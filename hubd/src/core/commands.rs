//! Direct commands from the hub: decoded by the dialect, answered by hubd (`$agent/...`, or
//! an error when they cannot be delivered), or handed to sdk-broker with their MQTT id kept.

use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Core, MethodCall};
use crate::rpc;

impl Core {
    /// A direct command on MQTT request `mqtt_id`.
    pub(super) fn on_rpc_request(&mut self, mqtt_id: &str, payload: &[u8], now: Instant) {
        let cmd = match self.codec.decode_direct_command(mqtt_id, payload) {
            Ok(Some(cmd)) => cmd,
            Ok(None) => {
                debug!("ignoring RPC request {mqtt_id}: not a direct command (our own, echoed)");
                return;
            }
            Err(e) => {
                match e.reqid {
                    Some(reqid) => {
                        warn!("RPC request {mqtt_id}: {e}; answered with an error");
                        self.respond("", mqtt_id, &rpc::error_response(reqid, e.to_string()));
                    }
                    None => warn!("RPC request {mqtt_id}: {e}; not answered (no reqid)"),
                }
                return;
            }
        };
        if cmd.method.starts_with(rpc::AGENT_METHOD_PREFIX) {
            debug!(
                "direct command {} {} answered by hubd",
                cmd.reqid, cmd.method
            );
            self.respond("", mqtt_id, &rpc::agent_method(&cmd));
            return;
        }
        if let Err(e) = self.pending.insert(cmd.reqid, &cmd.instance, mqtt_id, now) {
            warn!(
                "direct command {} on request {mqtt_id} refused: {e}",
                cmd.reqid
            );
            self.respond(
                &cmd.instance,
                mqtt_id,
                &rpc::error_response(cmd.reqid, e.to_string()),
            );
            return;
        }
        let reqid = cmd.reqid;
        debug!(
            "direct command {reqid} {} for {} (request {mqtt_id})",
            cmd.method, cmd.instance
        );
        let call = MethodCall {
            instance: cmd.instance,
            reqid,
            method: cmd.method,
            params: cmd.params,
        };
        if let Err(e) = self.calls.try_send(call) {
            self.pending.take(reqid, now);
            let (message, call) = match e {
                mpsc::error::TrySendError::Full(c) => {
                    ("too many direct commands are waiting for sdk-broker", c)
                }
                mpsc::error::TrySendError::Closed(c) => {
                    ("sdk-broker is not reachable from hubd", c)
                }
            };
            warn!("direct command {reqid}: {message}");
            self.respond(
                &call.instance,
                mqtt_id,
                &rpc::error_response(reqid, message),
            );
        }
    }
}
