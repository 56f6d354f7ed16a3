//! The MQTT session against a real mosquitto, with the hub played by a test client and
//! reconcilerd and sdk-broker played by channels. Fails when mosquitto is not installed.

mod common;

use std::time::Duration;

use common::{WAIT, local_config, wait_connection};
use evp_hubd::config::HubSection;
use evp_hubd::core::{
    self, ApplyOutcome, ConfigurationDelivery, ConnectionState, LinkEnds, RegistryAuth,
};
use evp_hubd::device_config::DeviceConfigStore;
use evp_hubd::spool::task::SpoolReport;
use evp_hubd::storage::{TOKEN_TIMEOUT, TokenError, TokenRequest};
use evp_schemas::evp2::storage::StorageToken;
use evp_schemas::{DeploymentStatus, ReconcileStatus};
use evp_system_tests::mosquitto::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::{mpsc, oneshot, watch};

/// The initial GET's topic.
const INITIAL_GET: &str = "v1/devices/me/attributes/request/10000";

/// The hub's side: every message the device publishes, as (topic, JSON).
async fn hub_client(port: u16) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Value)>) {
    let mut o = MqttOptions::new("hub", "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    client
        .subscribe("v1/devices/me/attributes/request/+", QoS::AtMostOnce)
        .await
        .unwrap();
    client
        .subscribe("v1/devices/me/attributes", QoS::AtMostOnce)
        .await
        .unwrap();
    // The device's own requests: storage tokens.
    client
        .subscribe("v1/devices/me/rpc/request/+", QoS::AtMostOnce)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    tokio::spawn(async move {
        let mut subacks = 0;
        let mut errors = 0;
        loop {
            let ev = match eventloop.poll().await {
                Ok(ev) => ev,
                // The broker may still be starting: rumqttc reconnects on the next poll.
                Err(e) if errors < 50 => {
                    errors += 1;
                    eprintln!("hub client: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(_) => break,
            };
            match ev {
                Event::Incoming(Packet::SubAck(_)) => {
                    subacks += 1;
                    if subacks == 3
                        && let Some(r) = ready_tx.take()
                    {
                        let _ = r.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    let _ = tx.send((p.topic, v));
                }
                _ => {}
            }
        }
    });
    ready_rx.await.unwrap();
    (client, rx)
}

/// Waits for a message matching `pred`.
async fn expect(
    rx: &mut mpsc::UnboundedReceiver<(String, Value)>,
    what: &str,
    pred: impl Fn(&str, &Value) -> bool,
) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let (topic, v) = rx.recv().await.expect("hub client stopped");
            if pred(&topic, &v) {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn is_report(topic: &str, v: &Value) -> bool {
    topic == "v1/devices/me/attributes" && v.get("systemInfo").is_some()
}

fn deployment(id: &str) -> Value {
    json!({
        "deploymentId": id,
        "instanceSpecs": { "i": { "moduleId": "m", "publish": {}, "subscribe": {} } },
        "modules": { "m": { "moduleImpl": "spawn", "entryPoint": "main" } }
    })
}

/// One session against a mosquitto of its own, with the hub played by `hub` and reconcilerd
/// by a task that accepts every deployment but `bad-late`, which it refuses.
struct Rig {
    hub: AsyncClient,
    /// Every message the device publishes.
    from_device: mpsc::UnboundedReceiver<(String, Value)>,
    /// The ids of the deployments reconcilerd was asked to apply, in order.
    applied: mpsc::UnboundedReceiver<String>,
    configurations: mpsc::Receiver<ConfigurationDelivery>,
    status: watch::Sender<Option<DeploymentStatus>>,
    connection: watch::Receiver<ConnectionState>,
    storage_tokens: mpsc::Sender<TokenRequest>,
    registry_auth: watch::Receiver<RegistryAuth>,
    /// The spool's figures (`Hub1.QueuedBytes`).
    _spool: watch::Receiver<SpoolReport>,
    store: DeviceConfigStore,
    session: common::Session,
    broker: Mosquitto,
    /// Last: the broker's files live here.
    _dir: TempDir,
}

impl Rig {
    /// A session of `device-1` with the minimum report interval 0, connecting to a new broker
    /// the hub's client already listens on.
    async fn start() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let broker = Mosquitto::start(dir.path(), None).unwrap();
        let (hub, from_device) = hub_client(broker.port).await;
        let cfg = local_config(
            broker.port,
            HubSection {
                client_id: Some("device-1".into()),
                report_status_interval_min_ms: Some(0),
                ..Default::default()
            },
        );
        let options = core::mqtt_options(&cfg, None);
        let store = DeviceConfigStore::new(dir.path());
        let (session, ends) = common::start(cfg, options, store.clone());
        let LinkEnds {
            mut deployments,
            outcomes,
            configurations,
            status,
            connection,
            storage_tokens,
            registry_auth,
            spool,
            ..
        } = ends;
        let (applied_tx, applied) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while deployments.changed().await.is_ok() {
                let Some(req) = deployments.borrow_and_update().clone() else {
                    continue;
                };
                let id = req.deployment_id.clone().unwrap_or_default();
                let outcome = if id == "bad-late" {
                    ApplyOutcome::Refused {
                        seq: req.seq,
                        deployment_id: req.deployment_id.clone(),
                        message: "reconcilerd says no".into(),
                    }
                } else {
                    ApplyOutcome::Accepted { seq: req.seq }
                };
                let _ = applied_tx.send(id);
                let _ = outcomes.send(outcome).await;
            }
        });
        Rig {
            hub,
            from_device,
            applied,
            configurations,
            status,
            connection,
            storage_tokens,
            registry_auth,
            _spool: spool,
            store,
            session,
            broker,
            _dir: dir,
        }
    }

    /// [`Rig::start`], with the initial GET answered by the deployment `dep-get`, which
    /// reconcilerd was asked to apply: PATCHes from now on are applied as they come.
    async fn answered() -> Rig {
        let mut rig = Rig::start().await;
        rig.expect("the initial GET", |t, _| t == INITIAL_GET).await;
        rig.answer_get().await;
        rig.wait_applied("dep-get").await;
        rig
    }

    /// The hub answers the initial GET: its deployment is `dep-get`.
    async fn answer_get(&self) {
        self.hub
            .publish(
                "v1/devices/me/attributes/response/10000",
                QoS::AtMostOnce,
                false,
                json!({ "shared": { "deployment": deployment("dep-get") }, "client": {} })
                    .to_string(),
            )
            .await
            .unwrap();
    }

    /// Waits for a message from the device matching `pred`.
    async fn expect(&mut self, what: &str, pred: impl Fn(&str, &Value) -> bool) -> Value {
        expect(&mut self.from_device, what, pred).await
    }

    /// Waits until reconcilerd was asked to apply `id`; returns every id asked for until then.
    async fn wait_applied(&mut self, id: &str) -> Vec<String> {
        let mut seen = Vec::new();
        tokio::time::timeout(WAIT, async {
            while !seen.iter().any(|s| s == id) {
                seen.push(self.applied.recv().await.unwrap());
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{id} was never applied"));
        seen
    }

    /// Publishes `attributes` as the hub's attribute PATCH.
    async fn patch(&self, attributes: Value) {
        self.hub
            .publish(
                "v1/devices/me/attributes",
                QoS::AtMostOnce,
                false,
                attributes.to_string(),
            )
            .await
            .unwrap();
    }

    /// reconcilerd reports deployment `id` as reconciled; returns the report that shows it.
    async fn reconciled(&mut self, id: &str) -> Value {
        self.status.send_replace(Some(DeploymentStatus {
            deployment_id: Some(id.into()),
            reconcile_status: Some(ReconcileStatus::Ok),
            ..Default::default()
        }));
        self.expect(&format!("a report with {id} ok"), |t, v| {
            is_report(t, v)
                && v["deploymentStatus"]["deploymentId"] == id
                && v["deploymentStatus"]["reconcileStatus"] == "ok"
                && v["deploymentStatus"].get("failureMessage").is_none()
        })
        .await
    }

    /// The hub sends `bad-late`, which reconcilerd refuses; waits for the report that shows
    /// the refusal with reconcilerd's message and the deployment's id.
    async fn refused_by_reconcilerd(&mut self) {
        self.patch(json!({ "deployment": deployment("bad-late") }))
            .await;
        self.expect("a report with reconcilerd's refusal", |t, v| {
            is_report(t, v)
                && v["deploymentStatus"]["failureMessage"] == "reconcilerd says no"
                && v["deploymentStatus"]["deploymentId"] == "bad-late"
        })
        .await;
    }

    /// Sends the hub's device configuration `cfg-42` (report intervals 1 s..4 s, a registry
    /// credential); returns the first report that echoes it.
    async fn configure_device(&mut self) -> Value {
        self.patch(json!({ "desiredDeviceConfig": { "desiredDeviceConfig": {
            "configuration/$agent/report-status-interval-min": 1,
            "configuration/$agent/report-status-interval-max": 4,
            "configuration/$agent/configuration-id": "cfg-42",
            "configuration/$agent/registry-auth": { "ghcr.io": "secret" } } } }))
            .await;
        self.expect("a report with the device config", |t, v| {
            is_report(t, v) && v["state/$agent/configuration-id"] == "cfg-42"
        })
        .await
    }

    /// Asks a storage token for `instance`'s `storage` (what `Hub1.RequestStorageToken`
    /// does); the answer comes on the returned receiver.
    async fn ask_token(
        &self,
        instance: &str,
        storage: &str,
        remote_name: &str,
    ) -> oneshot::Receiver<Result<StorageToken, TokenError>> {
        let (reply, answer) = oneshot::channel();
        let request = TokenRequest {
            instance: instance.into(),
            storage_name: storage.into(),
            remote_name: remote_name.into(),
            reply,
        };
        self.storage_tokens.send(request).await.unwrap();
        answer
    }

    /// Waits for the device's storage-token request; returns its MQTT id and the request.
    async fn token_request(&mut self) -> (String, Value) {
        let topic = std::cell::RefCell::new(String::new());
        let v = self
            .expect("a storage token request", |t, v| {
                let is = t.starts_with("v1/devices/me/rpc/request/")
                    && v["params"].get("storagetoken-request").is_some();
                if is {
                    *topic.borrow_mut() = t.to_owned();
                }
                is
            })
            .await;
        let id = topic
            .take()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        (id, v["params"]["storagetoken-request"].clone())
    }

    /// The hub answers a storage-token request on a response topic of its choosing (EVP2
    /// matches by the payload's reqid).
    async fn answer_token(&self, answer: Value) {
        self.hub
            .publish(
                "v1/devices/me/rpc/response/whatever",
                QoS::AtMostOnce,
                false,
                json!({ "storagetoken-response": answer }).to_string(),
            )
            .await
            .unwrap();
    }

    /// Stops the session, asserting that it ends cleanly and leaves `Hub1.Connection`
    /// disconnected.
    async fn stop(mut self) {
        self.session.stop().await;
        assert_eq!(
            *self.connection.borrow_and_update(),
            ConnectionState::Disconnected
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_report_goes_out_at_once_then_the_initial_get() {
    let mut rig = Rig::start().await;
    let first = rig.expect("the first report", is_report).await;
    assert_eq!(first["systemInfo"]["protocolVersion"], "EVP2-TB");
    assert_eq!(first["state/$agent/report-status-interval-min"], 0);
    rig.expect("the initial GET", |t, v| {
        t == INITIAL_GET && *v == json!({})
    })
    .await;
    assert_eq!(
        *rig.connection.borrow_and_update(),
        ConnectionState::Connected
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_before_the_get_answer_is_held_then_applied_after_it() {
    let mut rig = Rig::start().await;
    rig.expect("the initial GET", |t, _| t == INITIAL_GET).await;
    rig.patch(json!({ "deployment": deployment("dep-patch"), "configuration/i/t": "hello" }))
        .await;
    // The GET is resent every 5 s until answered; meanwhile the PATCH is only held.
    rig.expect("the resent GET", |t, _| t == INITIAL_GET).await;
    assert!(
        rig.applied.try_recv().is_err(),
        "nothing applied before the GET answer"
    );
    assert!(
        rig.configurations.try_recv().is_err(),
        "nothing delivered before the GET answer"
    );
    rig.answer_get().await;
    // The held PATCH comes after the answer, so dep-patch wins.
    let seen = rig.wait_applied("dep-patch").await;
    assert_eq!(
        seen.last().map(String::as_str),
        Some("dep-patch"),
        "{seen:?}"
    );
    let delivered = tokio::time::timeout(WAIT, rig.configurations.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (delivered.instance.as_str(), delivered.topic.as_str()),
        ("i", "t")
    );
    assert_eq!(delivered.value, b"hello");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcilerd_status_is_reported_at_once() {
    let mut rig = Rig::answered().await;
    // With the minimum interval 0 the change goes out in the next report, at once.
    rig.reconciled("dep-get").await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_manifest_is_reported_as_an_error_with_its_id_and_message() {
    let mut rig = Rig::answered().await;
    rig.reconciled("dep-get").await;
    rig.patch(json!({ "deployment": { "deploymentId": "bad", "instanceSpecs": {} } }))
        .await;
    let v = rig
        .expect("a report with the refusal", |t, v| {
            is_report(t, v) && v["deploymentStatus"]["reconcileStatus"] == "error"
        })
        .await;
    assert_eq!(v["deploymentStatus"]["deploymentId"], "bad");
    let msg = v["deploymentStatus"]["failureMessage"].as_str().unwrap();
    assert!(msg.contains("deployment.modules"), "{msg}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_refused_by_reconcilerd_is_reported_with_its_message() {
    let mut rig = Rig::answered().await;
    rig.reconciled("dep-get").await;
    rig.refused_by_reconcilerd().await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_deployment_clears_the_refusal() {
    let mut rig = Rig::answered().await;
    rig.reconciled("dep-get").await;
    rig.refused_by_reconcilerd().await;
    rig.patch(json!({ "deployment": deployment("dep-3") }))
        .await;
    // The report with dep-3 ok has no failure message any more.
    rig.reconciled("dep-3").await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_config_is_applied_echoed_without_credentials_and_stored() {
    let mut rig = Rig::answered().await;
    let v = rig.configure_device().await;
    assert_eq!(v["state/$agent/report-status-interval-min"], 1);
    assert_eq!(v["state/$agent/report-status-interval-max"], 4);
    assert!(
        !v.to_string().contains("secret"),
        "credentials never echoed"
    );
    // Stored single-wrapped: it reads back as the configuration itself.
    let stored = rig.store.load().unwrap().unwrap();
    assert_eq!(stored.configuration_id.as_deref(), Some("cfg-42"));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_report_is_sent_again_at_the_max_interval() {
    let mut rig = Rig::answered().await;
    let v = rig.configure_device().await;
    // The device config sets the max interval to 4 s: an identical report comes again well
    // after the last change. (A QoS 1 report may be delivered twice at once; the interval
    // rules themselves are unit-tested in timing.rs.)
    let changed_at = std::time::Instant::now();
    let forced = rig
        .expect("a forced report", |t, w| {
            is_report(t, w)
                && w["state/$agent/configuration-id"] == "cfg-42"
                && changed_at.elapsed() >= Duration::from_secs(2)
        })
        .await;
    assert_eq!(forced, v, "the forced report is the unchanged one");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_reports_again_after_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), None).unwrap();
    let cfg = local_config(
        broker.port,
        HubSection {
            report_status_interval_min_ms: Some(0),
            ..Default::default()
        },
    );
    let options = core::mqtt_options(&cfg, None);
    let store = DeviceConfigStore::new(dir.path());
    let (session, mut ends) = common::start(cfg, options, store);
    assert!(
        wait_connection(&mut ends.connection, WAIT, |c| *c
            == ConnectionState::Connected)
        .await,
        "never connected"
    );
    broker.stop();
    assert!(
        wait_connection(&mut ends.connection, WAIT, |c| *c
            != ConnectionState::Connected)
        .await,
        "the broker's end went unnoticed"
    );
    // Same port again; the first retry comes within about a second.
    broker.restart().unwrap();
    let (_hub, mut from_device) = hub_client(broker.port).await;
    // The session starts again: the GET is (re)sent on the new connection ...
    expect(&mut from_device, "the GET after the reconnect", |t, _| {
        t == INITIAL_GET
    })
    .await;
    // ... and reports flow again.
    ends.status.send_replace(Some(DeploymentStatus {
        deployment_id: Some("after-restart".into()),
        ..Default::default()
    }));
    expect(&mut from_device, "a report after the reconnect", |t, v| {
        is_report(t, v) && v["deploymentStatus"]["deploymentId"] == "after-restart"
    })
    .await;
    assert_eq!(*ends.connection.borrow(), ConnectionState::Connected);
    session.stop().await;
}

async fn token(
    answer: oneshot::Receiver<Result<StorageToken, TokenError>>,
) -> Result<StorageToken, TokenError> {
    tokio::time::timeout(WAIT, answer)
        .await
        .expect("the session never answered")
        .expect("the session dropped the request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_tokens_are_asked_of_the_hub_and_matched_by_reqid() {
    let mut rig = Rig::answered().await;
    let answer = rig
        .ask_token("uploader-1", "", "images/cam1/0001.jpg")
        .await;
    let (mqtt_id, request) = rig.token_request().await;
    assert_eq!(request["reqid"], mqtt_id, "the request id is the topic's");
    assert_eq!(request["filename"], "images/cam1/0001.jpg");
    assert_eq!(request["moduleInstanceId"], "uploader-1");
    assert!(
        request.get("key").is_none(),
        "the default storage has no key: {request}"
    );
    let reqid = request["reqid"].as_str().unwrap().to_owned();
    assert!(reqid.parse::<u32>().unwrap() >= 10_001, "{reqid}");
    // Another request's answer is not this one's.
    rig.answer_token(json!({"reqid": "1", "status": "ok", "URL": "http://elsewhere/"}))
        .await;
    rig.answer_token(json!({"reqid": reqid, "status": "ok",
        "URL": "https://acct.blob/c/images%2Fcam1%2F0001.jpg?sig=x",
        "headers": {"x-ms-blob-type": "BlockBlob"}}))
        .await;
    let got = token(answer).await.unwrap();
    assert_eq!(
        got.url,
        "https://acct.blob/c/images%2Fcam1%2F0001.jpg?sig=x"
    );
    assert_eq!(got.headers["x-ms-blob-type"], "BlockBlob");

    // A named storage is the key; the hub's refusal is the error, with its message.
    let answer = rig.ask_token("uploader-1", "archive", "f").await;
    let (_, request) = rig.token_request().await;
    assert_eq!(request["key"], "archive");
    rig.answer_token(json!({"reqid": request["reqid"], "status": "error",
        "errorMessage": "storage archive is full"}))
        .await;
    let e = token(answer).await.unwrap_err();
    assert!(e.to_string().contains("storage archive is full"), "{e}");

    // Unanswered: given up after EVP's 5 s.
    let asked = std::time::Instant::now();
    let answer = rig.ask_token("uploader-1", "", "late").await;
    rig.token_request().await;
    let e = token(answer).await.unwrap_err();
    assert!(matches!(e, TokenError::Timeout { .. }), "{e}");
    assert!(asked.elapsed() >= TOKEN_TIMEOUT);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multifile_token_serves_while_offline_and_a_restart_keeps_it() {
    let mut rig = Rig::answered().await;
    let answer = rig.ask_token("cam", "", "a/1.jpg").await;
    let (_, request) = rig.token_request().await;
    rig.answer_token(json!({"reqid": request["reqid"], "status": "ok",
        "responseType": "multifile", "URL": "https://acct.blob/c?sig=x",
        "expiresAtMillis": "99999999999999"}))
        .await;
    assert_eq!(
        token(answer).await.unwrap().url,
        "https://acct.blob/c/a%2F1.jpg?sig=x"
    );

    rig.broker.stop();
    assert!(
        wait_connection(&mut rig.connection, WAIT, |c| *c
            != ConnectionState::Connected)
        .await,
        "the broker's end went unnoticed"
    );
    // Offline: the kept container URL, completed with the new name; nothing for another
    // storage.
    let offline = token(rig.ask_token("cam", "", "b 2.jpg").await)
        .await
        .unwrap();
    assert_eq!(offline.url, "https://acct.blob/c/b%202.jpg?sig=x");
    let e = token(rig.ask_token("cam", "other", "x").await)
        .await
        .unwrap_err();
    assert!(matches!(e, TokenError::Offline { .. }), "{e}");
    // Kept on disk, 0600, in EVP's cache shape.
    let kept = rig.store.dir().join(evp_hubd::storage::CACHE_FILE);
    let v: Value = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
    assert_eq!(v[0]["instanceName"], "cam");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (port, kept) = (rig.broker.port, std::fs::read(&kept).unwrap());
    rig.stop().await;

    // A new session (hubd restarted) with that file, still offline, serves from it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(evp_hubd::storage::CACHE_FILE), kept).unwrap();
    let cfg = local_config(port, HubSection::default());
    let options = core::mqtt_options(&cfg, None);
    let (session, ends) = common::start(cfg, options, DeviceConfigStore::new(dir.path()));
    let (reply, answer) = oneshot::channel();
    let request = TokenRequest {
        instance: "cam".into(),
        storage_name: String::new(),
        remote_name: "c.jpg".into(),
        reply,
    };
    ends.storage_tokens.send(request).await.unwrap();
    assert_eq!(
        token(answer).await.unwrap().url,
        "https://acct.blob/c/c.jpg?sig=x"
    );
    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hubs_registry_credentials_replace_the_local_ones() {
    let mut rig = Rig::answered().await;
    assert!(rig.registry_auth.borrow().is_empty());
    rig.configure_device().await;
    assert!(
        wait_registry_auth(&mut rig.registry_auth, |r| r
            .get("ghcr.io")
            .map(String::as_str)
            == Some("secret"))
        .await,
        "Hub1.RegistryAuth never had the hub's credentials"
    );
    rig.stop().await;
}

async fn wait_registry_auth(
    rx: &mut watch::Receiver<RegistryAuth>,
    pred: impl FnMut(&RegistryAuth) -> bool,
) -> bool {
    tokio::time::timeout(WAIT, rx.wait_for(pred))
        .await
        .is_ok_and(|r| r.is_ok())
}
