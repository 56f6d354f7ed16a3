//! sdk-broker served in process, with modules as real clients on real sockets: evp-sdk for the
//! requests, raw records for the framing errors, and a child process under another uid for the
//! peer check. Signals for hubd are collected from a channel instead of the bus.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evp_schemas::sdk::{
    self as wire, EvpResult, HEADER_LEN, Header, MAX_PAYLOAD, Request, Response,
};
use evp_sdk::{
    Client, Event, MessageSentReason, RpcResponseReason, RpcStatus, StateReason, TelemetryReason,
};
use evp_sdk_broker::{Broker, ChannelSink, Settings, Signal};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// How long a test waits for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(5);

struct Harness {
    broker: Arc<Broker>,
    signals: UnboundedReceiver<Signal>,
    dirs: tempfile::TempDir,
}

fn quick_settings() -> Settings {
    Settings {
        exit_grace_ms: 2_000,
        telemetry_flush_ms: 2,
        rpc_timeout_ms: 5_000,
        ..Settings::default()
    }
}

fn harness(settings: Settings) -> Harness {
    let dirs = tempfile::tempdir().unwrap();
    harness_in(settings, dirs)
}

fn harness_in(settings: Settings, dirs: tempfile::TempDir) -> Harness {
    let (tx, rx) = unbounded_channel();
    let broker = Broker::new(
        settings,
        dirs.path().join("run"),
        dirs.path().join("data"),
        Arc::new(ChannelSink(tx)),
    )
    .unwrap();
    broker.start();
    Harness {
        broker,
        signals: rx,
        dirs,
    }
}

impl Harness {
    /// Opens `instance` and binds it to this test process, which (with its children) plays
    /// the module.
    fn open(&self, instance: &str) -> PathBuf {
        let path = self.broker.open_instance(instance).unwrap();
        self.broker
            .bind_instance(
                instance,
                std::process::id(),
                nix::unistd::geteuid().as_raw(),
            )
            .unwrap();
        path
    }

    async fn signal(&mut self) -> Signal {
        tokio::time::timeout(PATIENCE, self.signals.recv())
            .await
            .expect("a signal in time")
            .expect("signal channel open")
    }

    async fn no_signal(&mut self) {
        let r = tokio::time::timeout(Duration::from_millis(100), self.signals.recv()).await;
        assert!(r.is_err(), "unexpected signal {r:?}");
    }
}

/// Runs blocking client code off the runtime.
async fn client<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn connect(path: &Path) -> Client {
    Client::connect(path, "/nonexistent-workspace".into()).unwrap()
}

/// The next event that is not a completion, within the patience.
fn next_real_event(c: &mut Client) -> Event {
    loop {
        match c.next_event(Some(PATIENCE)).unwrap() {
            Event::Completed => continue,
            e => return e,
        }
    }
}

/// Records completion reasons.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
    fn cb<R: std::fmt::Debug>(&self, what: &'static str) -> impl FnOnce(R) + Send + 'static {
        let me = self.clone();
        move |r| me.push(format!("{what}:{r:?}"))
    }
}

/// Processes events until `log` holds `n` entries.
fn drain_until(c: &mut Client, log: &Log, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + PATIENCE;
    while log.0.lock().unwrap().len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "only {:?}",
            log.0.lock().unwrap()
        );
        let _ = c.next_event(Some(Duration::from_millis(50))).unwrap();
    }
    log.take()
}

fn raw_send(s: &mut UnixStream, xid: u64, payload: &[u8]) {
    s.write_all(&Header::new(payload.len() as u32, xid).to_bytes())
        .unwrap();
    s.write_all(payload).unwrap();
}

fn raw_read(s: &mut UnixStream) -> Option<(Header, Response)> {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    match wire::read_frame(s) {
        Ok((h, p)) => Some((h, Response::decode(&p).unwrap())),
        Err(wire::FrameError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            None
        }
        Err(e) => panic!("reading an answer: {e}"),
    }
}

fn poll_request() -> Vec<u8> {
    Request::GetEvent {
        deadline_sec: 0,
        deadline_nsec: 0,
    }
    .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_over_a_real_socket() {
    let mut h = harness(quick_settings());
    let path = h.open("inst-a");
    assert_eq!(path, h.dirs.path().join("run/sdk/inst-a.sock"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    // Anyone may connect; the peer check against the binding decides who is served.
    assert_eq!(mode, 0o666);

    let log = Log::default();
    let (l, p) = (log.clone(), path.clone());
    let mut c = client(move || {
        let mut c = connect(&p);
        c.set_configuration_callback(|_, _, _| {}).unwrap();
        assert!(matches!(
            c.set_configuration_callback(|_, _, _| {}),
            Err(evp_sdk::Error::Agent(EvpResult::Error))
        ));
        assert_eq!(c.next_event(Some(Duration::ZERO)).unwrap(), Event::TimedOut);
        c.send_state("st", b"{\"a\":1}", l.cb::<StateReason>("state"))
            .unwrap();
        // A value that is not JSON is accepted, as EVP does, and goes on as a JSON string.
        c.send_telemetry(
            &[
                ("temp", "21.5"),
                ("obj", "{\"x\":[1,2]}"),
                ("raw", "not json"),
            ],
            l.cb::<TelemetryReason>("tel"),
        )
        .unwrap();
        c.send_message("nowhere", b"x", l.cb::<MessageSentReason>("msg"))
            .unwrap();
        c.send_rpc_response(99, "{}", RpcStatus::Ok, l.cb::<RpcResponseReason>("rpc"))
            .unwrap();
        c
    })
    .await;
    let mut got = vec![h.signal().await, h.signal().await];
    got.sort_by_key(|s| matches!(s, Signal::Telemetry(_)));
    assert_eq!(
        got,
        [
            Signal::State {
                instance: "inst-a".into(),
                topic: "st".into(),
                value: b"{\"a\":1}".to_vec()
            },
            Signal::Telemetry(vec![
                ("inst-a".into(), "temp".into(), "21.5".into()),
                ("inst-a".into(), "obj".into(), "{\"x\":[1,2]}".into()),
                ("inst-a".into(), "raw".into(), "\"not json\"".into()),
            ])
        ]
    );
    let l = log.clone();
    let mut reasons = client(move || {
        let r = drain_until(&mut c, &l, 4);
        drop(c);
        r
    })
    .await;
    reasons.sort();
    assert_eq!(
        reasons,
        ["msg:Error", "rpc:Error", "state:Sent", "tel:Sent"],
        "no route gives ERROR, an unknown command id gives ERROR"
    );

    // The requests evp-sdk does not make, as raw records.
    let p = path.clone();
    client(move || {
        let mut s = UnixStream::connect(&p).unwrap();
        // A GET from EVP storage (EVP_EXT): EVP uploads only.
        let blob = Request::BlobOperation {
            kind: 3,
            op: 0,
            request: evp_schemas::sdk::BlobRequest::Evp {
                remote_name: "x".into(),
                storage_name: None,
            },
            filename: "x".into(),
            cb: wire::Callback::default(),
        };
        raw_send(&mut s, 1000, &blob.encode());
        let (hd, r) = raw_read(&mut s).unwrap();
        assert_eq!((hd.xid, r), (1000, Response::Simple(EvpResult::NotSup)));
        raw_send(
            &mut s,
            1001,
            &Request::StreamParamsRequest {
                name: Some("s".into()),
            }
            .encode(),
        );
        let (_, r) = raw_read(&mut s).unwrap();
        assert!(matches!(
            r,
            Response::StreamParams {
                result: EvpResult::Inval,
                ..
            }
        ));
        let no_response = Request::SendRpcResponse {
            id: 1,
            response: None,
            status: 0,
            cb: wire::Callback::default(),
        };
        raw_send(&mut s, 1002, &no_response.encode());
        assert_eq!(
            raw_read(&mut s).unwrap().1,
            Response::Simple(EvpResult::Inval)
        );
        let bad_status = Request::SendRpcResponse {
            id: 1,
            response: Some("{}".into()),
            status: 3,
            cb: wire::Callback::default(),
        };
        raw_send(&mut s, 1003, &bad_status.encode());
        assert_eq!(
            raw_read(&mut s).unwrap().1,
            Response::Simple(EvpResult::Inval)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_are_overwritten_before_collection_and_identical_ones_suppressed() {
    let mut h = harness(Settings {
        telemetry_flush_ms: 300,
        ..quick_settings()
    });
    let path = h.open("inst-s");
    let log = Log::default();
    let l = log.clone();
    let mut c = client(move || {
        let mut c = connect(&path);
        c.send_state("t", b"1", l.cb::<StateReason>("first"))
            .unwrap();
        c.send_state("t", b"2", l.cb::<StateReason>("second"))
            .unwrap();
        c
    })
    .await;
    assert_eq!(
        h.signal().await,
        Signal::State {
            instance: "inst-s".into(),
            topic: "t".into(),
            value: b"2".to_vec()
        }
    );
    h.no_signal().await;
    let l = log.clone();
    let (mut c, mut reasons) = client(move || {
        let r = drain_until(&mut c, &l, 2);
        (c, r)
    })
    .await;
    reasons.sort();
    assert_eq!(reasons, ["first:Overwritten", "second:Sent"]);
    let l = log.clone();
    let reasons = client(move || {
        c.send_state("t", b"2", l.cb::<StateReason>("same"))
            .unwrap();
        drain_until(&mut c, &l, 1)
    })
    .await;
    assert_eq!(reasons, ["same:Sent"], "an identical value still gets SENT");
    h.no_signal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_are_bounded_by_their_encoded_size_before_collection_too() {
    // A long collection window: the second state is refused while the first still waits.
    let mut h = harness(Settings {
        telemetry_flush_ms: 300,
        state_bytes: 1000,
        ..quick_settings()
    });
    let path = h.open("inst-b");
    let c = client(move || {
        let mut c = connect(&path);
        c.send_state("a", &[b'a'; 600], |_| {}).unwrap();
        let e = c.send_state("b", &[b'b'; 600], |_| {}).unwrap_err();
        assert_eq!(e.result(), EvpResult::TooBig, "past the instance's share");
        // 150 bytes of control characters are 900 once escaped.
        let e = c.send_state("c", &[1u8; 150], |_| {}).unwrap_err();
        assert_eq!(e.result(), EvpResult::TooBig, "measured escaped");
        c.send_state("a", &[b'A'; 900], |_| {}).unwrap();
        c
    })
    .await;
    assert_eq!(
        h.signal().await,
        Signal::State {
            instance: "inst-b".into(),
            topic: "a".into(),
            value: vec![b'A'; 900]
        },
        "replacing a topic frees its old share"
    );
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_is_persisted_and_redelivered_on_reconnect_to_that_instance_only() {
    let h = harness(quick_settings());
    let a = h.open("inst-a");
    let b = h.open("inst-b");
    h.broker
        .deliver_configuration("inst-a", "greeting", b"hello")
        .unwrap();
    assert!(
        h.broker
            .deliver_configuration("bad/name", "t", b"v")
            .is_err()
    );
    let (a2, b2) = (a.clone(), b.clone());
    let (ca, mut cb) = client(move || {
        let mut ca = connect(&a2);
        assert_eq!(
            next_real_event(&mut ca),
            Event::Configuration {
                topic: "greeting".into(),
                value: b"hello".to_vec()
            },
            "stored configuration is delivered on connect"
        );
        let mut cb = connect(&b2);
        assert_eq!(
            cb.next_event(Some(Duration::from_millis(100))).unwrap(),
            Event::TimedOut
        );
        (ca, cb)
    })
    .await;
    // Delivered now while connected; queued values of one topic coalesce (the latest wins).
    h.broker
        .deliver_configuration("inst-a", "greeting", b"hi")
        .unwrap();
    h.broker
        .deliver_configuration("inst-a", "greeting", b"hey")
        .unwrap();
    let a2 = a.clone();
    let mut ca = client(move || {
        let mut ca = ca;
        assert_eq!(
            next_real_event(&mut ca),
            Event::Configuration {
                topic: "greeting".into(),
                value: b"hey".to_vec()
            }
        );
        assert_eq!(
            ca.next_event(Some(Duration::from_millis(100))).unwrap(),
            Event::TimedOut
        );
        drop(ca);
        // Reconnecting: the configuration comes again, to this instance only.
        std::thread::sleep(Duration::from_millis(100));
        let mut ca = connect(&a2);
        assert_eq!(
            next_real_event(&mut ca),
            Event::Configuration {
                topic: "greeting".into(),
                value: b"hey".to_vec()
            }
        );
        assert_eq!(
            cb.next_event(Some(Duration::from_millis(100))).unwrap(),
            Event::TimedOut
        );
        // requestResendConfig delivers it again too.
        ca.set_configuration_callback(|_, _, _| {}).unwrap();
        assert!(matches!(
            next_real_event(&mut ca),
            Event::Configuration { .. }
        ));
        ca
    })
    .await;
    ca = client(move || {
        assert_eq!(
            ca.next_event(Some(Duration::from_millis(100))).unwrap(),
            Event::TimedOut
        );
        ca
    })
    .await;
    drop(ca);

    // A new broker on the same data directory has the configuration.
    let Harness { broker, dirs, .. } = h;
    for i in ["inst-a", "inst-b"] {
        broker.close_instance(i).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let h2 = harness_in(quick_settings(), dirs);
    let a = h2.open("inst-a");
    client(move || {
        let mut ca = connect(&a);
        assert_eq!(
            next_real_event(&mut ca),
            Event::Configuration {
                topic: "greeting".into(),
                value: b"hey".to_vec()
            }
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_routed_to_every_subscriber_with_its_alias() {
    let h = harness(quick_settings());
    let deployment: evp_schemas::Deployment = serde_json::from_value(serde_json::json!({
        "instanceSpecs": {
            "sender": {"moduleId": "m", "publish": {"out": "pub"}, "subscribe": {}},
            "rx-1": {"moduleId": "m", "publish": {}, "subscribe": {"in": "sub"}},
            "rx-2": {"moduleId": "m", "publish": {}, "subscribe": {"other-alias": "sub"}},
            "deaf": {"moduleId": "m", "publish": {}, "subscribe": {}}
        },
        "modules": {"m": {"moduleImpl": "spawn", "entryPoint": "main"}},
        "publishTopics": {"pub": {"type": "local", "topic": "salute"}},
        "subscribeTopics": {"sub": {"type": "local", "topic": "salute"}}
    }))
    .unwrap();
    let routing = evp_schemas::routing::Routing::from_deployment(&deployment);
    h.broker.set_routing(&routing.to_json()).unwrap();
    assert!(h.broker.set_routing("{not json").is_err());
    let paths: Vec<PathBuf> = ["sender", "rx-1", "rx-2", "deaf"]
        .iter()
        .map(|i| h.open(i))
        .collect();
    client(move || {
        let mut s = connect(&paths[0]);
        let mut r1 = connect(&paths[1]);
        let mut r2 = connect(&paths[2]);
        let mut deaf = connect(&paths[3]);
        let log = Log::default();
        s.send_message("out", b"hello", log.cb::<MessageSentReason>("out"))
            .unwrap();
        s.send_message("unknown", b"x", log.cb::<MessageSentReason>("unknown"))
            .unwrap();
        let mut reasons = drain_until(&mut s, &log, 2);
        reasons.sort();
        assert_eq!(reasons, ["out:Sent", "unknown:Error"]);
        assert_eq!(
            next_real_event(&mut r1),
            Event::Message {
                topic: "in".into(),
                payload: b"hello".to_vec()
            }
        );
        assert_eq!(
            next_real_event(&mut r2),
            Event::Message {
                topic: "other-alias".into(),
                payload: b"hello".to_vec()
            }
        );
        assert_eq!(
            deaf.next_event(Some(Duration::from_millis(100))).unwrap(),
            Event::TimedOut
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_commands_are_answered_by_the_module_or_by_the_broker() {
    let mut h = harness(Settings {
        rpc_timeout_ms: 300,
        ..quick_settings()
    });
    h.broker.call_method("absent", 7, "echo", "{}").await;
    match h.signal().await {
        Signal::RpcResponse {
            reqid: 7,
            instance,
            status: 2,
            response,
        } => {
            assert_eq!(instance, "absent");
            assert!(response.contains("not running"), "{response}");
        }
        other => panic!("{other:?}"),
    }
    let path = h.open("rpc");
    let p = path.clone();
    let c = client(move || connect(&p)).await;
    h.broker
        .call_method("rpc", 10042, "echo", "{\"text\":\"hi\"}")
        .await;
    let mut c = client(move || {
        let mut c = c;
        let Event::RpcRequest(req) = next_real_event(&mut c) else {
            panic!("no command")
        };
        assert_eq!((req.id, req.method.as_str()), (10042, "echo"));
        c.send_rpc_response(req.id, &req.params, RpcStatus::Ok, |_| {})
            .unwrap();
        c
    })
    .await;
    assert_eq!(
        h.signal().await,
        Signal::RpcResponse {
            reqid: 10042,
            instance: "rpc".into(),
            status: 0,
            response: "{\"text\":\"hi\"}".into()
        }
    );
    // A module that never answers (no RPC callback) gets an error answer after the timeout.
    h.broker.call_method("rpc", 5, "ignored", "{}").await;
    match h.signal().await {
        Signal::RpcResponse {
            reqid: 5,
            status: 2,
            response,
            ..
        } => assert!(response.contains("did not answer"), "{response}"),
        other => panic!("{other:?}"),
    }
    // The callback-style client answers commands without a handler with ERROR itself.
    h.broker.call_method("rpc", 6, "nothing", "{}").await;
    client(move || {
        assert_eq!(c.process_event(Some(PATIENCE)), EvpResult::Ok);
    })
    .await;
    match h.signal().await {
        Signal::RpcResponse {
            reqid: 6,
            status: 2,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_protocol_turns_pending_requests_into_exit_and_removes_the_socket() {
    let mut h = harness(Settings {
        // States stay pending long enough for the close to find them.
        telemetry_flush_ms: 2_000,
        exit_grace_ms: 500,
        ..quick_settings()
    });
    let path = h.open("leaving");
    let log = Log::default();
    let l = log.clone();
    let p = path.clone();
    let mut c = client(move || {
        let mut c = connect(&p);
        c.send_state("t", b"1", l.cb::<StateReason>("pending"))
            .unwrap();
        c.send_telemetry(&[("k", "1")], l.cb::<TelemetryReason>("tel"))
            .unwrap();
        c
    })
    .await;
    h.broker.call_method("leaving", 1, "m", "{}").await;
    // CloseInstance answers only once the module has let go; here it runs beside the module.
    let closing = {
        let broker = h.broker.clone();
        tokio::spawn(async move { broker.close_instance("leaving").await })
    };
    match h.signal().await {
        Signal::RpcResponse {
            reqid: 1,
            status: 2,
            ..
        } => {}
        other => panic!("a queued command is answered with an error: {other:?}"),
    }
    assert!(
        h.broker.open_instance("leaving").is_err(),
        "Busy while exiting"
    );
    let l = log.clone();
    let p = path.clone();
    client(move || {
        let mut reasons = drain_until(&mut c, &l, 2);
        reasons.sort();
        assert_eq!(reasons, ["pending:Exit", "tel:Exit"]);
        assert_eq!(c.next_event(Some(PATIENCE)).unwrap(), Event::Exit);
        // Requests after the exit get EXIT at once.
        c.send_state("t", b"2", l.cb::<StateReason>("late"))
            .unwrap();
        assert_eq!(drain_until(&mut c, &l, 1), ["late:Exit"]);
        assert_eq!(c.process_event(Some(PATIENCE)), EvpResult::ShouldExit);
        assert!(p.exists(), "the socket stays while the module is connected");
        drop(c);
    })
    .await;
    tokio::time::timeout(PATIENCE, closing)
        .await
        .expect("CloseInstance answers once the module disconnected")
        .unwrap();
    assert!(
        !path.exists(),
        "CloseInstance answered before the socket was gone"
    );
    h.no_signal().await;
    // Re-opening after the module left works, and a module that never leaves is cut off after
    // the grace.
    let path = h.open("leaving");
    let p = path.clone();
    let mut c = client(move || connect(&p)).await;
    // Answered after the grace, with the socket gone, although the module never left.
    h.broker.close_instance("leaving").await;
    assert!(!path.exists());
    client(move || {
        let r = c.next_event(Some(Duration::from_millis(100)));
        assert!(
            matches!(r, Ok(Event::Exit)) || r.is_err(),
            "exit or a closed socket: {r:?}"
        );
    })
    .await;
    // Closing an instance with no module connected removes the socket at once.
    let path = h.open("never-started");
    h.broker.close_instance("never-started").await;
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_the_documented_answer_and_never_crash_the_broker() {
    let h = harness(quick_settings());
    let path = h.open("fuzz");
    client(move || {
        // Oversized: drained, answered TOOBIG with its xid, and the connection goes on.
        let mut s = UnixStream::connect(&path).unwrap();
        let size = MAX_PAYLOAD as u32 + 1;
        s.write_all(&Header::new(size, 4242).to_bytes()).unwrap();
        s.write_all(&vec![0xa5; size as usize]).unwrap();
        let (hd, r) = raw_read(&mut s).unwrap();
        assert_eq!((hd.xid, r), (4242, Response::Simple(EvpResult::TooBig)));
        raw_send(&mut s, 4243, &poll_request());
        let (hd, r) = raw_read(&mut s).unwrap();
        assert_eq!((hd.xid, r), (4243, Response::GetEvent(wire::Event::None)));
        drop(s);

        // Size 0: EINVAL, then closed.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&Header::new(0, 1).to_bytes()).unwrap();
        assert_eq!(
            raw_read(&mut s).unwrap().1,
            Response::Simple(EvpResult::Inval)
        );
        assert!(raw_read(&mut s).is_none(), "closed after a size of 0");

        // A non-zero reserved word: EINVAL, then closed.
        let mut s = UnixStream::connect(&path).unwrap();
        let mut head = Header::new(8, 2).to_bytes();
        head[4] = 1;
        s.write_all(&head).unwrap();
        assert_eq!(
            raw_read(&mut s).unwrap().1,
            Response::Simple(EvpResult::Inval)
        );
        assert!(raw_read(&mut s).is_none());

        // Garbage that fails verification: closed without an answer.
        for garbage in [&b"garbage!"[..], &[0xff; 64][..], &[0u8; 4][..]] {
            let mut s = UnixStream::connect(&path).unwrap();
            raw_send(&mut s, 3, garbage);
            assert!(raw_read(&mut s).is_none(), "closed after {garbage:?}");
        }
        // A response table where a request belongs, and a truncated request.
        let mut s = UnixStream::connect(&path).unwrap();
        raw_send(&mut s, 4, &Response::Simple(EvpResult::Ok).encode());
        let _ = raw_read(&mut s);
        let good = Request::SendState {
            topic: "t".into(),
            blob: vec![1; 200],
            cb: wire::Callback::default(),
        }
        .encode();
        let mut s = UnixStream::connect(&path).unwrap();
        raw_send(&mut s, 5, &good[..good.len() / 2]);
        assert!(raw_read(&mut s).is_none());
        // A header cut short, then the peer goes away.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&[1, 0, 0]).unwrap();
        drop(s);

        // After all that, the broker still serves.
        let mut s = UnixStream::connect(&path).unwrap();
        raw_send(&mut s, 6, &poll_request());
        assert_eq!(raw_read(&mut s).unwrap().0.xid, 6);
        let mut rest = Vec::new();
        s.set_nonblocking(true).unwrap();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty());
        let _ = HEADER_LEN;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_again_and_memory_stays_bounded_without_dropping_anything() {
    const QUEUE: usize = 64 * 1024;
    let mut h = harness(Settings {
        event_queue_bytes: QUEUE,
        telemetry_queue_bytes: QUEUE,
        ..quick_settings()
    });
    let path = h.open("flood");
    let broker = Arc::clone(&h.broker);
    let value = format!("\"{}\"", "x".repeat(98));
    let log = Log::default();
    let l = log.clone();
    let (mut c, accepted, again) = client(move || {
        let mut c = connect(&path);
        let (mut accepted, mut again) = (0usize, 0usize);
        // Never process events: callbacks pile up until the queue refuses more.
        for _ in 0..20_000 {
            match c.send_telemetry(&[("v", value.as_str())], l.cb::<TelemetryReason>("t")) {
                Ok(()) => accepted += 1,
                Err(e) if e.result() == EvpResult::Again => again += 1,
                Err(e) => panic!("{e}"),
            }
            let queued = broker.queued_bytes("flood").unwrap();
            assert!(queued <= QUEUE, "queue grew to {queued}");
            assert!(broker.pending_telemetry_bytes("flood").unwrap() <= QUEUE);
        }
        (c, accepted, again)
    })
    .await;
    assert!(again > 0, "the flood got EVP_AGAIN");
    assert!(accepted > 0 && accepted <= QUEUE / evp_sdk_broker::broker::CALLBACK_COST);
    // Everything accepted reaches hubd, exactly once, and every callback says SENT.
    let mut emitted = 0;
    while emitted < accepted {
        match h.signal().await {
            Signal::Telemetry(entries) => emitted += entries.len(),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(emitted, accepted);
    h.no_signal().await;
    let l = log.clone();
    let reasons = client(move || {
        let r = drain_until(&mut c, &l, accepted);
        // Once drained, calls are accepted again.
        c.send_telemetry(&[("v", "1")], |_| {}).unwrap();
        r
    })
    .await;
    assert!(reasons.iter().all(|r| r == "t:Sent"));

    // Messages to a receiver that never reads: the sender gets EVP_AGAIN, nothing is lost.
    let routing = serde_json::json!({"instances": {
        "tx": {"publish": {"out": "t"}, "subscribe": {}},
        "rx": {"publish": {}, "subscribe": {"in": "t"}}
    }});
    h.broker.set_routing(&routing.to_string()).unwrap();
    let tx = h.open("tx");
    let rx = h.open("rx");
    let broker = Arc::clone(&h.broker);
    client(move || {
        let mut s = connect(&tx);
        let mut r = connect(&rx);
        let (mut sent, mut again) = (0usize, 0usize);
        for i in 0..5_000u32 {
            match s.send_message("out", &i.to_le_bytes(), |_| {}) {
                Ok(()) => sent += 1,
                Err(e) if e.result() == EvpResult::Again => again += 1,
                Err(e) => panic!("{e}"),
            }
            // The sender's callbacks are drained, so only the receiver's queue fills.
            while let Ok(Event::Completed) = s.next_event(Some(Duration::ZERO)) {}
        }
        assert!(again > 0);
        assert!(broker.queued_bytes("rx").unwrap() <= QUEUE);
        let mut got = 0;
        while let Ok(Event::Message { .. }) = r.next_event(Some(Duration::from_millis(200))) {
            got += 1;
        }
        assert_eq!(got, sent, "every accepted message arrives");
    })
    .await;
}

/// The child half of [`a_peer_with_another_uid_than_the_bound_one_is_refused`]: when run with
/// `EVP_PEER_PROBE_SOCKET` set (as another user), connects, polls once and prints what
/// happened. Does nothing in a normal test run.
#[test]
fn peer_probe_child() {
    let Some(path) = std::env::var_os("EVP_PEER_PROBE_SOCKET") else {
        return;
    };
    let outcome = match UnixStream::connect(&path) {
        Err(e) => format!("connect-failed:{e}"),
        Ok(mut s) => {
            let payload = poll_request();
            let mut record = Header::new(payload.len() as u32, 1000).to_bytes().to_vec();
            record.extend_from_slice(&payload);
            // A refused peer is closed at once: the write may already fail (EPIPE).
            if s.write_all(&record).is_err() {
                "refused".to_owned()
            } else {
                match raw_read(&mut s) {
                    Some(_) => "answered".to_owned(),
                    None => "refused".to_owned(),
                }
            }
        }
    };
    println!("PROBE:{outcome}:END");
}

/// Runs [`peer_probe_child`] as uid/gid 65534 (nobody/nogroup) against `socket`.
fn probe_as_nobody(socket: &Path) -> String {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "peer_probe_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("EVP_PEER_PROBE_SOCKET", socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = stdout.find("PROBE:").unwrap_or_else(|| {
        panic!(
            "no probe output: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let rest = &stdout[start + 6..];
    rest[..rest.find(":END").unwrap()].to_owned()
}

/// "A client that connects to another instance's socket is refused": a socket is served only
/// to the process `BindInstance` names (or a descendant) with the uid it names. The socket is
/// mode 0666 in a 0711 directory, so the refusal comes from the SO_PEERCRED check, not from
/// the file mode: the same probe (a child of this test, as uid 65534) is answered once the
/// instance is bound to that uid. Needs root (to run the probe as another user); skipped
/// otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_uid_than_the_bound_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client as another uid");
        return;
    }
    for (uid, expect) in [
        (nix::unistd::geteuid().as_raw(), "refused"),
        (65534, "answered"),
    ] {
        let dirs = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dirs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let h = harness_in(quick_settings(), dirs);
        let path = h.broker.open_instance("victim").unwrap();
        h.broker
            .bind_instance("victim", std::process::id(), uid)
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o666);
        assert_eq!(mode(path.parent().unwrap()), 0o711);
        let p = path.clone();
        let outcome = client(move || probe_as_nobody(&p)).await;
        assert_eq!(outcome, expect, "bound to uid {uid}");
    }
}

/// Connects to instance `i`'s socket at `path` and sends a request, then binds `i` to this
/// test's process: whether that early connection gets its answer.
async fn early_connection_answered_once_bound(h: &Harness, path: std::path::PathBuf) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    let early = client(move || {
        let mut s = UnixStream::connect(&path).unwrap();
        raw_send(&mut s, 1, &poll_request());
        s
    })
    .await;
    // Time for the broker to accept and hold it; nothing to observe from outside.
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.broker.bind_instance("i", std::process::id(), me).unwrap();
    client(move || {
        let mut s = early;
        raw_read(&mut s).is_some()
    })
    .await
}

/// A peer with the bound uid that is neither the bound process nor its descendant is
/// refused (here: this test, while the binding names a `sleep` it started); a connection made
/// before the binding is held, and answered once the binding names its process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_bound_process_tree_is_served_and_early_peers_wait_for_the_binding() {
    let h = harness(quick_settings());
    let path = h.broker.open_instance("i").unwrap();
    let me = nix::unistd::geteuid().as_raw();
    let mut sibling = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    h.broker.bind_instance("i", sibling.id(), me).unwrap();
    let p = path.clone();
    let refused = client(move || {
        let mut s = UnixStream::connect(&p).unwrap();
        let _ = s.write_all(&Header::new(poll_request().len() as u32, 1).to_bytes());
        let _ = s.write_all(&poll_request());
        raw_read(&mut s).is_none()
    })
    .await;
    assert!(refused, "a process outside the bound tree was served");
    let _ = sibling.kill();
    let _ = sibling.wait();

    let h = harness(quick_settings());
    let path = h.broker.open_instance("i").unwrap();
    let answered = early_connection_answered_once_bound(&h, path).await;
    assert!(
        answered,
        "the connection made before the binding was not served"
    );
    assert!(h.broker.bind_instance("nobody", 1234, me).is_err());
}

/// A restart: the binding still names the instance's previous process, which has exited, when
/// its new process (same uid) connects; the connection is held until the new binding comes,
/// then served, rather than refused for not descending from the dead process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_connecting_before_its_new_binding_is_held_then_served() {
    let h = harness(quick_settings());
    let path = h.broker.open_instance("i").unwrap();
    let me = nix::unistd::geteuid().as_raw();
    let mut previous = std::process::Command::new("true").spawn().unwrap();
    h.broker.bind_instance("i", previous.id(), me).unwrap();
    previous.wait().unwrap();
    let answered = early_connection_answered_once_bound(&h, path).await;
    assert!(
        answered,
        "the restarted instance's early connection was refused"
    );
}
