//! The provisioning executor: one short MQTT session per attempt (user name `provision`,
//! subscribe to the answer, publish the request, read the answer, disconnect), retried as
//! [`super::Retries`] decides until the hub grants credentials, which are then kept.

use std::path::Path;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS, SubscribeReasonCode};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{
    Answer, Credentials, Next, Outcome, PROVISION_USERNAME, REQUEST_TOPIC, RESPONSE_TOPIC, Retries,
    decode_answer, request, store,
};
use crate::config::{HubConfig, ProvisionKey};
use crate::core::ConnectionState;
use crate::tls::TlsMaterial;

/// How long one attempt may take from the connection to the answer. ThingsBoard answers
/// within a second; a hub silent this long is asked again on the reconnect schedule.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the DISCONNECT that ends an attempt may take to go out.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);
/// Requests the session queues: a subscribe, a publish, a disconnect.
const REQUEST_QUEUE: usize = 4;

/// Provisions the device named `device_name` with `key` over the broker of `cfg`, retrying
/// until the hub grants credentials; keeps them in `dir` and returns them. `connection`
/// shows `provisioning` during an attempt and `provisioning-refused` after a refusal.
pub async fn obtain(
    cfg: &HubConfig,
    tls: Option<&TlsMaterial>,
    key: &ProvisionKey,
    device_name: &str,
    dir: &Path,
    connection: &watch::Sender<ConnectionState>,
) -> Credentials {
    let mut session_cfg = cfg.clone();
    session_cfg.username = Some(PROVISION_USERNAME.to_owned());
    session_cfg.password = None;
    // Each broker of the hub in turn while none answers, as the normal session fails over.
    let brokers = cfg.brokers();
    let first = crate::core::mqtt_options(&session_cfg, tls);
    let mut at = 0;
    let payload = request(device_name, key);
    let mut retries = Retries::default();
    info!(
        "no MQTT credentials yet: provisioning {device_name:?} with key {:?}",
        key.key
    );
    loop {
        connection.send_replace(ConnectionState::Provisioning);
        let options = crate::core::connection_options(
            &session_cfg,
            first.client_id(),
            first.transport(),
            &brokers[at],
        );
        let outcome = attempt(options, payload.clone()).await;
        if matches!(outcome, Outcome::NoAnswer(_)) {
            at = (at + 1) % brokers.len();
        }
        match retries.next(outcome) {
            Next::Keep(credentials) => {
                match store::save(dir, &credentials) {
                    Ok(path) => info!(
                        "provisioned: {} credentials kept in {}",
                        credentials.kind(),
                        path.display()
                    ),
                    // They still serve this run; the next start provisions again.
                    Err(e) => error!("provisioned, but the credentials are not kept: {e}"),
                }
                return credentials;
            }
            Next::Retry {
                delay,
                state,
                reason,
            } => {
                connection.send_replace(state);
                match state {
                    ConnectionState::ProvisioningRefused => {
                        error!("device provisioning refused: {reason}; next attempt in {delay:.1?}")
                    }
                    _ => warn!(
                        "device provisioning: {reason}; next attempt to {} in {delay:.1?}",
                        brokers[at]
                    ),
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One provisioning session.
async fn attempt(options: rumqttc::MqttOptions, payload: Vec<u8>) -> Outcome {
    let (host, port) = options.broker_address();
    let broker = format!("{host}:{port}");
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
    let deadline = tokio::time::Instant::now() + ATTEMPT_TIMEOUT;
    let mut connected = false;
    let outcome = loop {
        let Ok(polled) = tokio::time::timeout_at(deadline, eventloop.poll()).await else {
            break Outcome::NoAnswer(format!(
                "no answer on {RESPONSE_TOPIC} from {broker} within {ATTEMPT_TIMEOUT:?}"
            ));
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                // Subscribed first, so the answer cannot go by unseen.
                if let Err(e) = client.try_subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce) {
                    break Outcome::NoAnswer(format!("subscribing: {e}"));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    break Outcome::Answered(Answer::Refused(format!(
                        "the broker refused the subscription to {RESPONSE_TOPIC}"
                    )));
                }
                if let Err(e) =
                    client.try_publish(REQUEST_TOPIC, QoS::AtLeastOnce, false, payload.clone())
                {
                    break Outcome::NoAnswer(format!("publishing the request: {e}"));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == RESPONSE_TOPIC => {
                break Outcome::Answered(decode_answer(&p.payload));
            }
            Ok(_) => {}
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                break Outcome::Answered(Answer::Refused(format!(
                    "the broker refused the provisioning connection: {code:?}"
                )));
            }
            Err(e) => {
                connected = false;
                break Outcome::NoAnswer(format!("MQTT broker {broker}: {e}"));
            }
        }
    };
    // A clean end, so the broker drops the session before the device connects again with
    // the same client id (polling a lost connection would reconnect instead).
    if connected && client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    outcome
}
