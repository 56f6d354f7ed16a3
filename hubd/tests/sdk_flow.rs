//! hubd's side of the SDK flow against a real mosquitto and a fake sdk-broker: a test object
//! serving `org.evp.SdkBroker1` on a private bus emits `Telemetry`, `StateReported` and
//! `RpcResponse` and receives `CallMethod`, while a test client plays the hub. The MQTT session
//! and the D-Bus links run in-process, wired as `evp_hubd::run` wires them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use evp_devhub::PrivateBus;
use evp_hubd::bus::link_sdk_broker;
use evp_hubd::config::{HubSection, resolve};
use evp_hubd::core::{self, Links};
use evp_hubd::device_config::DeviceConfigStore;
use evp_schemas::dbus::{EvpError, SDK_BROKER_NAME, SDK_BROKER_PATH};
use evp_schemas::{DeploymentStatus, InstanceState, InstanceStatus};
use evp_system_tests::mosquitto::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use zbus::object_server::SignalEmitter;

/// Upper bound for every awaited condition.
const WAIT: Duration = Duration::from_secs(20);
const TELEMETRY: &str = "v1/devices/me/telemetry";
const ATTRIBUTES: &str = "v1/devices/me/attributes";

/// The fake sdk-broker: answers `echo` at once with the params, never answers `slow`, and
/// refuses calls to the instance `absent` with `NotFound`.
struct FakeBroker {
    calls: mpsc::UnboundedSender<(String, u64, String, String)>,
}

#[zbus::interface(name = "org.evp.SdkBroker1")]
impl FakeBroker {
    async fn call_method(
        &self,
        instance: &str,
        reqid: u64,
        method: &str,
        params: &str,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), EvpError> {
        let _ = self
            .calls
            .send((instance.into(), reqid, method.into(), params.into()));
        if instance == "absent" {
            return Err(EvpError::NotFound(format!(
                "instance {instance} is not running"
            )));
        }
        if method == "echo" {
            Self::rpc_response(&emitter, reqid, instance, 0, params).await?;
        }
        Ok(())
    }

    async fn deliver_configuration(
        &self,
        _instance: &str,
        _topic: &str,
        _value: Vec<u8>,
    ) -> Result<(), EvpError> {
        Ok(())
    }

    #[zbus(signal)]
    async fn state_reported(
        emitter: &SignalEmitter<'_>,
        instance: &str,
        topic: &str,
        value: &[u8],
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn telemetry(
        emitter: &SignalEmitter<'_>,
        entries: &[(&str, &str, &str)],
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn rpc_response(
        emitter: &SignalEmitter<'_>,
        reqid: u64,
        instance: &str,
        status: u32,
        response: &str,
    ) -> zbus::Result<()>;
}

/// Everything one test runs: mosquitto, the bus, hubd's session, the fake broker, the hub.
struct Rig {
    _dir: tempfile::TempDir,
    _mosquitto: Mosquitto,
    _bus: PrivateBus,
    broker: zbus::Connection,
    calls: mpsc::UnboundedReceiver<(String, u64, String, String)>,
    hub: AsyncClient,
    inbox: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    status: watch::Sender<Option<DeploymentStatus>>,
    stop: Option<oneshot::Sender<()>>,
    session: tokio::task::JoinHandle<anyhow::Result<()>>,
    _keep: Vec<Box<dyn std::any::Any + Send>>,
}

fn deployment_status(instances: &[&str]) -> DeploymentStatus {
    let mut s = DeploymentStatus::default();
    for name in instances {
        s.instances.insert(
            (*name).into(),
            InstanceStatus {
                status: InstanceState::Ok,
                module_id: "m".into(),
                failure_message: None,
            },
        );
    }
    s
}

impl Rig {
    /// Starts everything; `hub_topics` is what the hub client subscribes to. Returns once
    /// hubd's initial GET reached the hub (so hubd's subscriptions are in place).
    async fn start(hub_topics: &[&str]) -> Result<Rig> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir()?;
        let mosquitto = Mosquitto::start(dir.path(), None)?;
        let bus = PrivateBus::start(&dir.path().join("bus"))?;
        let (calls_tx, calls) = mpsc::unbounded_channel();
        let broker = zbus::connection::Builder::address(bus.address())
            .name(SDK_BROKER_NAME)
            .serve_at(SDK_BROKER_PATH, FakeBroker { calls: calls_tx })
            .build()
            .await
            .context("fake sdk-broker on the private bus")?;

        // The hub: subscribes first, so it sees hubd's first publishes.
        let mut o = MqttOptions::new("hub", "127.0.0.1", mosquitto.port);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (hub, mut hub_loop) = AsyncClient::new(o, 1024);
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        for t in hub_topics {
            hub.subscribe(*t, QoS::AtMostOnce).await?;
        }
        tokio::spawn(async move {
            loop {
                match hub_loop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if inbox_tx.send((p.topic, p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, subscribed)
            .await
            .context("the hub client's subscription")??;

        // hubd: the session and its D-Bus links, as `run` wires them.
        let cfg = resolve(
            HubSection {
                mqtt_host: Some("127.0.0.1".into()),
                mqtt_port: Some(mosquitto.port),
                client_id: Some("device-1".into()),
                report_status_interval_min_ms: Some(0),
                ..Default::default()
            },
            |_| None,
        )?;
        let options = core::mqtt_options(&cfg, None);
        let conn = zbus::connection::Builder::address(bus.address())
            .build()
            .await?;
        let telemetry_conn = zbus::connection::Builder::address(bus.address())
            .build()
            .await?;
        let sdk = link_sdk_broker(&conn, telemetry_conn);
        let (links, ends) = Links::new();
        // reconcilerd's status is known before the session starts.
        ends.status
            .send_replace(Some(deployment_status(&["sensor-1", "rpc-1"])));
        let (stop, stop_rx) = oneshot::channel::<()>();
        let store = DeviceConfigStore::new(dir.path().join("hub"));
        let session = tokio::spawn(core::run_with_sdk(
            cfg,
            options,
            store,
            None,
            links,
            sdk,
            async {
                let _ = stop_rx.await;
            },
        ));
        let mut rig = Rig {
            _dir: dir,
            _mosquitto: mosquitto,
            _bus: bus,
            broker,
            calls,
            hub,
            inbox,
            status: ends.status,
            stop: Some(stop),
            session,
            _keep: vec![
                Box::new(conn),
                Box::new(ends.deployments),
                Box::new(ends.outcomes),
                Box::new(ends.configurations),
            ],
        };
        if hub_topics.iter().any(|t| t.ends_with('#')) {
            rig.expect("hubd's initial GET", |t, _| {
                t == "v1/devices/me/attributes/request/10000"
            })
            .await?;
        }
        Ok(rig)
    }

    async fn emitter(&self) -> Result<SignalEmitter<'static>> {
        Ok(SignalEmitter::new(&self.broker, SDK_BROKER_PATH)?.into_owned())
    }

    /// The next message the hub receives for which `pred` holds; others are skipped.
    async fn expect(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&str, &[u8]) -> bool,
    ) -> Result<(String, Vec<u8>)> {
        let end = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(end, self.inbox.recv()).await {
                Ok(Some((topic, payload))) => {
                    if pred(&topic, &payload) {
                        return Ok((topic, payload));
                    }
                }
                Ok(None) => bail!("the hub client stopped while waiting for {what}"),
                Err(_) => bail!("timed out after {WAIT:?} waiting for {what}"),
            }
        }
    }

    /// The next message on `topic`, parsed.
    async fn expect_json(&mut self, topic: &str) -> Result<Value> {
        let (_, payload) = self.expect(topic, |t, _| t == topic).await?;
        Ok(serde_json::from_slice(&payload)?)
    }

    /// Emits `StateReported` until the hub sees the instance-state report carrying it, which
    /// also shows that hubd follows sdk-broker's signals.
    async fn report_state(&mut self, instance: &str, topic: &str, value: &str) -> Result<Value> {
        let key = format!("state/{instance}/{topic}");
        let emitter = self.emitter().await?;
        let end = Instant::now() + WAIT;
        loop {
            FakeBroker::state_reported(&emitter, instance, topic, value.as_bytes()).await?;
            let seen = tokio::time::timeout(Duration::from_millis(500), async {
                loop {
                    let (t, p) = self.inbox.recv().await?;
                    if t != ATTRIBUTES {
                        continue;
                    }
                    let v: Value = serde_json::from_slice(&p).ok()?;
                    if v.get(&key) == Some(&json!(value)) {
                        return Some(v);
                    }
                }
            })
            .await;
            if let Ok(Some(v)) = seen {
                return Ok(v);
            }
            if Instant::now() > end {
                bail!("the instance-state report never carried {key}");
            }
        }
    }

    /// Publishes a direct command on `v1/devices/me/rpc/request/<mqtt_id>`.
    async fn command(&self, mqtt_id: u32, body: Value) -> Result<()> {
        self.hub
            .publish(
                format!("v1/devices/me/rpc/request/{mqtt_id}"),
                QoS::AtMostOnce,
                false,
                body.to_string(),
            )
            .await?;
        Ok(())
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.session)
            .await
            .context("the session did not stop")???;
        Ok(())
    }
}

fn direct_command(reqid: &str, instance: &str, method: &str, params: Value) -> Value {
    json!({ "method": "evp-c2d", "params": { "direct-command-request": {
        "reqid": reqid, "method": method, "instance": instance, "params": params } } })
}

fn response_of(v: &Value) -> &Value {
    &v["direct-command-response"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_states_and_direct_commands_reach_the_hub() -> Result<()> {
    let mut rig = Rig::start(&["v1/devices/me/#"]).await?;

    // The instance-state report, which also shows hubd follows the broker's signals.
    let report = rig.report_state("sensor-1", "t", "hello").await?;
    assert_eq!(report, json!({"state/sensor-1/t": "hello"}));

    // Telemetry: one instance's entries merged while no key repeats (each message is one
    // instance's, for the spool's order and quotas); a non-JSON value is dropped, the rest sent.
    let emitter = rig.emitter().await?;
    FakeBroker::telemetry(
        &emitter,
        &[
            (
                "sensor-1",
                "room1",
                r#"{"temperature": 25, "humidity": 53}"#,
            ),
            ("sensor-1", "count", "17"),
            ("sensor-1", "count", "18"),
            ("sensor-1", "bad", "not json"),
            ("rpc-1", "count", "\"x\""),
        ],
    )
    .await?;
    let first = rig.expect_json(TELEMETRY).await?;
    assert_eq!(
        first,
        json!({"sensor-1/room1": {"temperature": 25, "humidity": 53}, "sensor-1/count": 17})
    );
    let second = rig.expect_json(TELEMETRY).await?;
    assert_eq!(second, json!({"sensor-1/count": 18}));
    let third = rig.expect_json(TELEMETRY).await?;
    assert_eq!(third, json!({"rpc-1/count": "x"}));

    // A direct command, answered by the module, on the id of its own request.
    rig.command(
        77,
        direct_command("10042", "rpc-1", "echo", json!("{\"text\":\"hi\"}")),
    )
    .await?;
    let answer = rig.expect_json("v1/devices/me/rpc/response/77").await?;
    assert_eq!(
        response_of(&answer),
        &json!({"status": "ok", "reqid": "10042", "response": "{\"text\":\"hi\"}"})
    );
    let call = rig.calls.recv().await.context("CallMethod")?;
    assert_eq!(
        call,
        (
            "rpc-1".into(),
            10042,
            "echo".into(),
            "{\"text\":\"hi\"}".into()
        )
    );

    // An absent instance: sdk-broker refuses the call, and the hub gets an error.
    rig.command(78, direct_command("10043", "absent", "echo", json!("{}")))
        .await?;
    let answer = rig.expect_json("v1/devices/me/rpc/response/78").await?;
    let r = response_of(&answer);
    assert_eq!(r["status"], "error");
    assert_eq!(r["reqid"], "10043");
    assert_eq!(r["errorMessage"], "instance absent is not running");

    // A reqid still waiting is refused on the duplicate's own id, never answered elsewhere.
    rig.command(79, direct_command("10044", "rpc-1", "slow", json!("{}")))
        .await?;
    rig.command(80, direct_command("10044", "rpc-1", "echo", json!("{}")))
        .await?;
    let answer = rig.expect_json("v1/devices/me/rpc/response/80").await?;
    assert_eq!(response_of(&answer)["status"], "error");
    assert!(
        response_of(&answer)["errorMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("already waiting"),
        "{answer}"
    );
    // The late answer to 10044 goes to 79, where it was asked.
    FakeBroker::rpc_response(&emitter, 10044, "rpc-1", 1, "").await?;
    let answer = rig.expect_json("v1/devices/me/rpc/response/79").await?;
    assert_eq!(
        response_of(&answer),
        &json!({"status": "error", "errorMessage": "Unknown method", "reqid": "10044"})
    );

    // hubd's own methods, and malformed requests.
    rig.command(81, direct_command("5", "rpc-1", "$agent/get", json!("")))
        .await?;
    let answer = rig.expect_json("v1/devices/me/rpc/response/81").await?;
    assert_eq!(response_of(&answer)["status"], "ok");
    let log: Value = serde_json::from_str(response_of(&answer)["response"].as_str().unwrap_or(""))?;
    assert_eq!(log, json!({"log_enable": false}));
    rig.command(
        82,
        direct_command("6", "rpc-1", "echo", json!({"text": "hi"})),
    )
    .await?;
    let answer = rig.expect_json("v1/devices/me/rpc/response/82").await?;
    assert_eq!(response_of(&answer)["status"], "error");
    assert_eq!(response_of(&answer)["reqid"], "6");
    // The device's own storage-token request, echoed by mosquitto, is never answered; a
    // command sent after it is answered first.
    rig.command(
        83,
        json!({"method": "evp-d2c", "params": {"storagetoken-request": {"reqid": "10077"}}}),
    )
    .await?;
    rig.command(
        84,
        direct_command("7", "rpc-1", "$agent/set", json!("{\"log_enable\":true}")),
    )
    .await?;
    let (topic, _) = rig
        .expect("an RPC answer", |t, _| {
            t.starts_with("v1/devices/me/rpc/response/")
        })
        .await?;
    assert_eq!(topic, "v1/devices/me/rpc/response/84");

    // An instance that leaves the deployment leaves the instance-state report.
    rig.report_state("rpc-1", "u", "there").await?;
    rig.status.send_replace(Some(deployment_status(&["rpc-1"])));
    let (_, payload) = rig
        .expect("a state report without sensor-1", |t, p| {
            t == ATTRIBUTES
                && serde_json::from_slice::<Value>(p)
                    .is_ok_and(|v| v == json!({"state/rpc-1/u": "there"}))
        })
        .await?;
    assert!(!payload.is_empty());
    rig.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_without_sdk_broker_is_answered_with_an_error() -> Result<()> {
    let mut rig = Rig::start(&["v1/devices/me/#"]).await?;
    // sdk-broker leaves the bus.
    rig.broker.release_name(SDK_BROKER_NAME).await?;
    rig.command(90, direct_command("1", "rpc-1", "echo", json!("{}")))
        .await?;
    let answer = rig.expect_json("v1/devices/me/rpc/response/90").await?;
    let r = response_of(&answer);
    assert_eq!(r["status"], "error");
    assert_eq!(r["reqid"], "1");
    assert!(
        r["errorMessage"]
            .as_str()
            .unwrap_or_default()
            .contains(SDK_BROKER_NAME),
        "{answer}"
    );
    rig.stop().await
}

/// Messages per second from one instance, end to end: `Telemetry` signals of 100 entries of
/// 100-byte values on one key (so one MQTT message each, as EVP sends one per SDK call)
/// → hubd → mosquitto → a subscriber. Run it built with optimisations:
/// `cargo test --release -p evp-hubd --test sdk_flow -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark; run it on purpose, in release mode"]
async fn telemetry_throughput() -> Result<()> {
    const MESSAGES: u64 = 300_000;
    const PER_SIGNAL: u64 = 100;
    let mut rig = Rig::start(&[TELEMETRY]).await?;
    let value = format!("\"{}\"", "v".repeat(98));
    let entries: Vec<(&str, &str, &str)> = (0..PER_SIGNAL)
        .map(|_| ("sensor-1", "reading", value.as_str()))
        .collect();
    let emitter = rig.emitter().await?;
    // Warm up until telemetry flows (hubd connected and following the signal).
    let end = Instant::now() + WAIT;
    loop {
        FakeBroker::telemetry(&emitter, &entries[..1]).await?;
        if tokio::time::timeout(Duration::from_millis(200), rig.inbox.recv())
            .await
            .is_ok()
        {
            break;
        }
        if Instant::now() > end {
            bail!("telemetry never flowed");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while rig.inbox.try_recv().is_ok() {}

    let received = Arc::new(AtomicU64::new(0));
    let mut inbox = std::mem::replace(&mut rig.inbox, mpsc::unbounded_channel().1);
    let counter = received.clone();
    let counting = tokio::spawn(async move {
        while inbox.recv().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let start = Instant::now();
    for _ in 0..MESSAGES / PER_SIGNAL {
        FakeBroker::telemetry(&emitter, &entries).await?;
    }
    let emitted = start.elapsed();
    let end = Instant::now() + Duration::from_secs(60);
    let mut last = (0, Instant::now());
    loop {
        let n = received.load(Ordering::Relaxed);
        if n >= MESSAGES {
            break;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) || Instant::now() > end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let n = received.load(Ordering::Relaxed);
    let elapsed = if n >= MESSAGES {
        start.elapsed()
    } else {
        last.1 - start
    };
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "telemetry: {n}/{MESSAGES} messages of {}-byte values in {elapsed:.2?} ({rate:.0} msg/s); \
         signals emitted in {emitted:.2?}",
        value.len()
    );
    counting.abort();
    rig.stop().await?;
    assert_eq!(n, MESSAGES, "messages were lost");
    Ok(())
}
