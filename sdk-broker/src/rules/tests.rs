//! The rules without sockets, bus, files or clock: requests go in as decoded values, events come
//! out of the queue as getEvent would take them, signals and effects are looked at directly.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use evp_schemas::sdk::{
    Callback, Event, EvpResult, MessageSentReason, Request, Response, RpcResponseReason,
    StateReason, TelemetryEntry, TelemetryReason,
};

use super::*;

/// Small bounds, so that a few requests reach them.
fn settings() -> Settings {
    Settings {
        event_queue_bytes: 4096,
        telemetry_queue_bytes: 1024,
        state_bytes: 1000,
        rpc_timeout_ms: 1000,
        ..Settings::default()
    }
}

fn cb(n: u64) -> Callback {
    Callback { cb: n, userdata: 0 }
}

/// `instance` opened and a module connected to it.
fn connect(rules: &mut Rules, instance: &str) -> Peer {
    let opened = rules.open(instance);
    rules.attach(&opened).expect("attached").0
}

/// Rules with `settings` and one connected instance `i`.
fn one(settings: Settings) -> (Rules, Peer) {
    let mut rules = Rules::new(settings, BTreeMap::new());
    let peer = connect(&mut rules, "i");
    (rules, peer)
}

/// Every event queued for `peer`, as getEvents would take them, and what the next one finds.
fn drain(rules: &mut Rules, peer: &Peer) -> (Vec<Event>, Popped) {
    let mut events = Vec::new();
    loop {
        match rules.next_event(peer) {
            Popped::Event(e) => events.push(e),
            other => return (events, other),
        }
    }
}

fn events(rules: &mut Rules, peer: &Peer) -> Vec<Event> {
    drain(rules, peer).0
}

/// A blob operation of `kind` (`EVP_BLOB_TYPE`) and `op` on `url` and workspace file `file`,
/// with callback 1; `headers` make it an HTTP_EXT request.
fn blob(kind: u32, op: u32, url: &str, file: &str, headers: &[&str]) -> Request {
    use evp_schemas::sdk::BlobRequest;
    let request = if headers.is_empty() {
        BlobRequest::Http { url: url.into() }
    } else {
        BlobRequest::HttpExt {
            url: url.into(),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
        }
    };
    Request::BlobOperation {
        kind,
        op,
        request,
        filename: file.into(),
        cb: cb(1),
    }
}

/// An EVP storage blob request (`EVP_BLOB_TYPE_EVP_EXT`) of the file "f".
fn evp_blob(op: u32, remote_name: &str, storage_name: Option<&str>) -> Request {
    Request::BlobOperation {
        kind: evp_schemas::sdk::BLOB_TYPE_EVP_EXT,
        op,
        request: evp_schemas::sdk::BlobRequest::Evp {
            remote_name: remote_name.into(),
            storage_name: storage_name.map(str::to_owned),
        },
        filename: "f".into(),
        cb: cb(1),
    }
}

#[test]
fn an_evp_storage_upload_asks_the_hub_for_its_url() {
    let (mut rules, peer) = one(settings());
    let handled = rules.handle(&peer, evp_blob(1, "up/1.jpg", None));
    assert_eq!(handled.response, Response::Simple(EvpResult::Ok));
    let Then::Transfer { job, .. } = handled.then else {
        panic!("no transfer: {:?}", handled.then);
    };
    let target = job.storage.as_ref().expect("a storage target");
    assert_eq!(
        (
            target.instance.as_str(),
            target.storage_name.as_str(),
            target.remote_name.as_str()
        ),
        ("i", "", "up/1.jpg"),
        "the default storage is asked as \"\""
    );
    let mut job = job;
    job.set_token(
        "https://h/c/up%2F1.jpg?sig".into(),
        [("x-k".into(), "v".into())],
    )
    .unwrap();
    assert_eq!(job.url, "https://h/c/up%2F1.jpg?sig");
    assert_eq!(job.headers["x-k"], "v");
    let named = rules.handle(&peer, evp_blob(1, "r", Some("archive")));
    let Then::Transfer { job, .. } = named.then else {
        panic!("no transfer");
    };
    assert_eq!(
        job.storage.as_ref().map(|t| t.storage_name.as_str()),
        Some("archive")
    );
    let mut job = job;
    let refused = job.set_token("file:///etc/passwd".into(), []);
    assert!(refused.is_err(), "only http(s) from the hub");
    assert!(job.url.is_empty(), "a refused token changes nothing");
}

#[test]
fn ten_blob_transfers_run_at_once_and_each_ends_in_its_callback() {
    use evp_schemas::sdk::{BlobOutcome, BlobReason};
    let (mut rules, peer) = one(settings());
    let mut jobs = Vec::new();
    for n in 0..10 {
        let mut request = blob(2, 0, "http://h/x", &format!("f{n}"), &[]);
        if let Request::BlobOperation { cb: c, .. } = &mut request {
            *c = cb(n);
        }
        let handled = rules.handle(&peer, request);
        assert_eq!(handled.response, Response::Simple(EvpResult::Ok));
        match handled.then {
            Then::Transfer { job, cb } => jobs.push((job, cb)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(jobs[3].0.file, std::path::PathBuf::from("f3"));
    assert_eq!(
        jobs[3].0.workspace,
        std::path::PathBuf::from("i/default_workspace")
    );
    let eleventh = rules.handle(&peer, blob(2, 0, "http://h/x", "f", &[]));
    assert_eq!(eleventh.response, Response::Simple(EvpResult::Denied));
    let done = BlobOutcome {
        kind: 2,
        result: 0,
        error: 0,
        http_status: 200,
    };
    rules.blob_done(&peer, jobs[0].1, 2, Some(done));
    assert_eq!(
        events(&mut rules, &peer),
        [Event::Blob {
            cb: cb(0),
            reason: BlobReason::Done,
            result: done
        }]
    );
    // One ended: there is room again.
    let again = rules.handle(&peer, blob(2, 1, "http://h/x", "f", &[]));
    assert_eq!(again.response, Response::Simple(EvpResult::Ok));
    // Exiting cuts the rest short: each gets EXIT, and only then the module gets exit.
    let cancel = rules.blob_cancel(&peer).unwrap();
    let _ = rules.close("i");
    assert!(*cancel.borrow());
    assert_eq!(rules.next_event(&peer), Popped::Empty);
    for (_, c) in jobs.iter().skip(1) {
        rules.blob_done(&peer, *c, 2, None);
    }
    rules.blob_done(&peer, cb(1), 2, None);
    let (got, then) = drain(&mut rules, &peer);
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|e| matches!(
        e,
        Event::Blob {
            reason: BlobReason::Exit,
            ..
        }
    )));
    assert_eq!(then, Popped::Exit);
}

fn state(topic: &str, value: &[u8], n: u64) -> Request {
    Request::SendState {
        topic: topic.into(),
        blob: value.to_vec(),
        cb: cb(n),
    }
}

fn telemetry(entries: &[(&str, &str)], n: u64) -> Request {
    Request::SendTelemetry {
        entries: entries
            .iter()
            .map(|(key, value)| TelemetryEntry {
                key: (*key).into(),
                value: (*value).into(),
            })
            .collect(),
        cb: cb(n),
    }
}

fn message(alias: &str, blob: &[u8], n: u64) -> Request {
    Request::SendMessage {
        topic: alias.into(),
        blob: blob.to_vec(),
        cb: cb(n),
    }
}

fn rpc_answer(id: u64, response: &str, n: u64) -> Request {
    Request::SendRpcResponse {
        id,
        response: Some(response.into()),
        status: 0,
        cb: cb(n),
    }
}

fn result(handled: &Handled) -> EvpResult {
    match handled.response {
        Response::Simple(r) => r,
        ref other => panic!("not a simple answer: {other:?}"),
    }
}

/// Fills `peer`'s queue with callbacks nobody collects (messages without a route).
fn fill(rules: &mut Rules, peer: &Peer) {
    let mut n = 1000;
    while result(&rules.handle(peer, message("nowhere", b"", n))) == EvpResult::Ok {
        n += 1;
    }
}

/// The text of the broker's own error answer.
fn error_text(signal: &Signal) -> String {
    match signal {
        Signal::RpcResponse {
            status: 2,
            response,
            ..
        } => response.clone(),
        other => panic!("not an error answer: {other:?}"),
    }
}

/// How instance `i` stands when a request comes.
#[derive(Debug, Clone, Copy)]
enum Standing {
    Ready,
    QueueFull,
    Exiting,
    /// Closed and opened again since the request's connection was made.
    Replaced,
}

impl Standing {
    /// The rules, the peer that makes the request, and the events queued for it already.
    fn set_up(self) -> (Rules, Peer, usize) {
        let (mut rules, peer) = one(settings());
        match self {
            Standing::Ready => (rules, peer, 0),
            Standing::QueueFull => {
                fill(&mut rules, &peer);
                let queued = rules.queued_bytes("i").unwrap() / CALLBACK_COST;
                (rules, peer, queued)
            }
            Standing::Exiting => {
                rules.close("i");
                (rules, peer, 0)
            }
            Standing::Replaced => {
                rules.close("i");
                rules.detach(&peer);
                connect(&mut rules, "i");
                (rules, peer, 0)
            }
        }
    }
}

/// `request` from instance `i` standing so is answered `result` and queues `callback`.
fn check(standing: Standing, request: Request, expect: EvpResult, callback: Option<Event>) {
    let (mut rules, peer, before) = standing.set_up();
    let handled = rules.handle(&peer, request);
    assert_eq!(result(&handled), expect, "{standing:?}");
    let queued = events(&mut rules, &peer);
    let new: Vec<Event> = queued.into_iter().skip(before).collect();
    assert_eq!(new, Vec::from_iter(callback), "{standing:?}");
}

#[test]
fn every_request_with_a_callback_has_room_reserved_or_gets_exit() {
    use EvpResult::{Again, Error, Ok};
    use Standing::*;
    let st = |reason| Some(Event::State { cb: cb(1), reason });
    let tel = |reason| Some(Event::Telemetry { cb: cb(1), reason });
    let msg = |reason| Some(Event::MessageSent { cb: cb(1), reason });
    let rpc = |reason| Some(Event::RpcResponse { cb: cb(1), reason });
    // The state and the telemetry wait for the flusher: no callback yet.
    check(Ready, state("t", b"1", 1), Ok, None);
    check(QueueFull, state("t", b"1", 1), Again, None);
    check(Exiting, state("t", b"1", 1), Ok, st(StateReason::Exit));
    check(Replaced, state("t", b"1", 1), Error, None);
    check(Ready, telemetry(&[("k", "1")], 1), Ok, None);
    check(QueueFull, telemetry(&[("k", "1")], 1), Again, None);
    check(
        Exiting,
        telemetry(&[("k", "1")], 1),
        Ok,
        tel(TelemetryReason::Exit),
    );
    check(Replaced, telemetry(&[("k", "1")], 1), Error, None);
    // No route: ERROR at once.
    check(
        Ready,
        message("out", b"x", 1),
        Ok,
        msg(MessageSentReason::Error),
    );
    check(QueueFull, message("out", b"x", 1), Again, None);
    check(
        Exiting,
        message("out", b"x", 1),
        Ok,
        msg(MessageSentReason::Exit),
    );
    check(Replaced, message("out", b"x", 1), Error, None);
    // No command waits for this answer: ERROR at once.
    check(
        Ready,
        rpc_answer(9, "{}", 1),
        Ok,
        rpc(RpcResponseReason::Error),
    );
    check(QueueFull, rpc_answer(9, "{}", 1), Again, None);
    check(
        Exiting,
        rpc_answer(9, "{}", 1),
        Ok,
        rpc(RpcResponseReason::Exit),
    );
    check(Replaced, rpc_answer(9, "{}", 1), Error, None);
}

/// `request` is answered `expect` and leaves nothing queued and nothing to do.
fn check_refused(request: Request, expect: Response) {
    let (mut rules, peer) = one(settings());
    let handled = rules.handle(&peer, request);
    assert_eq!(handled.response, expect);
    assert_eq!(handled.then, Then::Nothing);
    assert_eq!(rules.queued_bytes("i"), Some(0));
}

#[test]
fn refused_and_unserved_requests_change_nothing() {
    use EvpResult::*;
    let simple = Response::Simple;
    let nul_topic = state("a\0b", b"1", 1);
    check_refused(nul_topic, simple(Inval));
    check_refused(telemetry(&[("k\0", "1")], 1), simple(Inval));
    check_refused(state("t", &[1u8; 25_000], 1), simple(TooBig));
    check_refused(telemetry(&[("k", "1")].repeat(1001), 1), simple(TooBig));
    let past_the_queue = "1".repeat(2000);
    check_refused(telemetry(&[("k", &past_the_queue)], 1), simple(TooBig));
    let no_response = Request::SendRpcResponse {
        id: 1,
        response: None,
        status: 0,
        cb: cb(1),
    };
    check_refused(no_response, simple(Inval));
    let bad_status = Request::SendRpcResponse {
        id: 1,
        response: Some("{}".into()),
        status: 3,
        cb: cb(1),
    };
    check_refused(bad_status, simple(Inval));
    let get_event = Request::GetEvent {
        deadline_sec: 0,
        deadline_nsec: 0,
    };
    check_refused(get_event, simple(AgentProtocolError));
    // Blobs: an unknown type, and a GET from EVP storage (EVP uploads only), are not
    // served; a bad operation, URL, file or header is refused before any transfer.
    check_refused(blob(9, 0, "http://h/x", "f", &[]), simple(NotSup));
    check_refused(evp_blob(0, "r", None), simple(NotSup));
    check_refused(evp_blob(7, "r", None), simple(Inval));
    check_refused(blob(2, 7, "http://h/x", "f", &[]), simple(Inval));
    check_refused(blob(2, 0, "ftp://h/x", "f", &[]), simple(Inval));
    check_refused(blob(2, 0, "http://h/x", "/tmp/x", &[]), simple(Inval));
    check_refused(blob(2, 0, "http://h/x", "../x", &[]), simple(Inval));
    check_refused(blob(4, 0, "http://h/x", "f", &["no colon"]), simple(Inval));
    let stream = Request::StreamParamsRequest {
        name: Some("s".into()),
    };
    let no_stream = Response::StreamParams {
        result: Inval,
        kind: 0,
        direction: 0,
    };
    check_refused(stream, no_stream);
}

#[test]
fn the_event_queue_holds_its_bound_in_bytes_and_no_more() {
    let (mut rules, peer) = one(settings());
    fill(&mut rules, &peer);
    assert_eq!(
        rules.queued_bytes("i"),
        Some(4096),
        "64 callbacks of 64 bytes"
    );
    // Taking one event makes room for one callback, and no more.
    assert!(matches!(rules.next_event(&peer), Popped::Event(_)));
    let send = |rules: &mut Rules, n| result(&rules.handle(&peer, message("nowhere", b"", n)));
    assert_eq!(send(&mut rules, 1), EvpResult::Ok);
    assert_eq!(send(&mut rules, 2), EvpResult::Again);
    // A command counts its method and parameters too: 64 + 1 + 2 bytes.
    let mut rules = Rules::new(settings(), BTreeMap::new());
    let peer = connect(&mut rules, "i");
    rules
        .call_method("i", 1, "m", "{}", Instant::now())
        .unwrap();
    assert_eq!(rules.queued_bytes("i"), Some(67));
    assert!(matches!(
        rules.next_event(&peer),
        Popped::Event(Event::RpcRequest { .. })
    ));
    assert_eq!(rules.queued_bytes("i"), Some(0));
}

#[test]
fn callbacks_of_a_connection_that_ended_release_their_room() {
    let (mut rules, old) = one(settings());
    assert_eq!(
        rules.handle(&old, state("t", b"1", 1)).then,
        Then::Flush { full: false }
    );
    assert_eq!(rules.queued_bytes("i"), Some(CALLBACK_COST));
    rules.detach(&old);
    let opened = InstanceRef {
        name: "i".into(),
        id: old.instance.id,
    };
    let (new, _) = rules.attach(&opened).unwrap();
    for s in rules.take_states() {
        rules.state_sent(s, true);
    }
    assert_eq!(rules.queued_bytes("i"), Some(0));
    assert_eq!(drain(&mut rules, &new), (vec![], Popped::Empty));
    assert_eq!(rules.next_event(&old), Popped::Gone);
}

#[test]
fn closing_turns_pending_work_into_exit_then_removes_the_instance() {
    let (mut rules, peer) = one(settings());
    rules.handle(&peer, state("t", b"1", 1));
    rules.handle(&peer, telemetry(&[("k", "1")], 2));
    let now = Instant::now();
    rules.call_method("i", 7, "m", "{}", now).unwrap();
    let Closing::Began {
        instance,
        answers,
        removed,
    } = rules.close("i")
    else {
        panic!("the close did not begin")
    };
    assert_eq!((instance, removed), (peer.instance.clone(), false));
    assert_eq!(answers.len(), 1);
    assert!(error_text(&answers[0]).contains("instance i is stopping"));
    let exits = vec![
        Event::State {
            cb: cb(1),
            reason: StateReason::Exit,
        },
        Event::Telemetry {
            cb: cb(2),
            reason: TelemetryReason::Exit,
        },
    ];
    assert_eq!(
        drain(&mut rules, &peer),
        (exits, Popped::Exit),
        "the command is dropped"
    );
    assert!(rules.take_states().is_empty() && rules.take_telemetry().is_none());
    assert_eq!(rules.close("i"), Closing::UnderWay);
    assert!(
        rules.attach(&peer.instance).is_none(),
        "no new module while exiting"
    );
    let refused = rules.call_method("i", 8, "m", "{}", now).unwrap_err();
    assert!(error_text(&refused).contains("is stopping"));
    assert_eq!(rules.is_exiting("i"), Some(true));
    let detached = rules.detach(&peer);
    assert_eq!(
        detached,
        Detached {
            answers: vec![],
            removed: true
        }
    );
    assert_eq!(rules.is_exiting("i"), None);
    assert_eq!(rules.close("i"), Closing::NotOpen);
}

#[test]
fn an_instance_without_a_module_closes_at_once_and_the_grace_ends_only_its_own_opening() {
    let mut rules = Rules::new(settings(), BTreeMap::new());
    let first = rules.open("i");
    assert!(matches!(
        rules.close("i"),
        Closing::Began { removed: true, .. }
    ));
    assert_eq!(rules.queued_bytes("i"), None);
    // Opened again and closing with a module connected: the first grace is not its own.
    let peer = connect(&mut rules, "i");
    assert!(matches!(
        rules.close("i"),
        Closing::Began { removed: false, .. }
    ));
    assert!(!rules.grace_over(&first));
    assert_eq!(rules.is_exiting("i"), Some(true));
    assert!(rules.grace_over(&peer.instance));
    assert_eq!(rules.is_exiting("i"), None);
}

/// Routes: `sender` publishes `out` on topic `t`; `rx-1` and `rx-2` subscribe to it with
/// aliases of their own; `deaf` subscribes to nothing.
fn routed() -> (Rules, [Peer; 4]) {
    let routing = serde_json::json!({"instances": {
        "sender": {"publish": {"out": "t"}, "subscribe": {}},
        "rx-1": {"publish": {}, "subscribe": {"in": "t"}},
        "rx-2": {"publish": {}, "subscribe": {"other": "t"}},
        "deaf": {"publish": {}, "subscribe": {}}
    }});
    let mut rules = Rules::new(settings(), BTreeMap::new());
    rules.set_routing(
        Routing::from_json(&routing.to_string()).unwrap(),
        Instant::now(),
    );
    let peers = ["sender", "rx-1", "rx-2", "deaf"].map(|i| connect(&mut rules, i));
    (rules, peers)
}

fn received(alias: &str) -> Event {
    Event::MessageReceived {
        topic: alias.into(),
        blob: b"hello".to_vec(),
    }
}

fn sent(n: u64, reason: MessageSentReason) -> Event {
    Event::MessageSent { cb: cb(n), reason }
}

#[test]
fn messages_reach_every_subscriber_with_its_alias() {
    let (mut rules, [sender, rx1, rx2, deaf]) = routed();
    assert_eq!(
        result(&rules.handle(&sender, message("out", b"hello", 1))),
        EvpResult::Ok
    );
    assert_eq!(
        result(&rules.handle(&sender, message("unknown", b"x", 2))),
        EvpResult::Ok
    );
    let reasons = vec![
        sent(1, MessageSentReason::Sent),
        sent(2, MessageSentReason::Error),
    ];
    assert_eq!(events(&mut rules, &sender), reasons);
    assert_eq!(events(&mut rules, &rx1), [received("in")]);
    assert_eq!(events(&mut rules, &rx2), [received("other")]);
    assert_eq!(events(&mut rules, &deaf), []);
}

#[test]
fn a_message_goes_to_every_subscriber_or_to_none() {
    let (mut rules, [sender, rx1, rx2, _]) = routed();
    fill(&mut rules, &rx2);
    let handled = rules.handle(&sender, message("out", b"hello", 1));
    assert_eq!(result(&handled), EvpResult::Again);
    assert_eq!(
        rules.queued_bytes("sender"),
        Some(0),
        "the reservation is given back"
    );
    assert_eq!(events(&mut rules, &rx1), []);
    // An exiting subscriber is left out.
    rules.close("rx-2");
    rules.handle(&sender, message("out", b"hello", 2));
    assert_eq!(
        events(&mut rules, &sender),
        [sent(2, MessageSentReason::Sent)]
    );
    assert_eq!(events(&mut rules, &rx1), [received("in")]);
}

fn config(topic: &str, value: &[u8]) -> Event {
    Event::Config {
        topic: topic.into(),
        blob: value.to_vec(),
    }
}

#[test]
fn configuration_is_kept_persisted_coalesced_and_delivered_again() {
    let stored = BTreeMap::from([(
        "i".to_owned(),
        BTreeMap::from([("a".to_owned(), b"1".to_vec())]),
    )]);
    let mut rules = Rules::new(settings(), stored);
    let opened = rules.open("i");
    let mut persisted = Vec::new();
    let mut deliver = |rules: &mut Rules, topic: &str, value: &[u8]| {
        rules.deliver_configuration("i", topic, value, Instant::now(), |topics| {
            persisted.push(topics.clone());
            Ok::<(), ()>(())
        })
    };
    // Not connected: kept, not queued.
    deliver(&mut rules, "b", b"2").unwrap();
    assert_eq!(rules.queued_bytes("i"), Some(0));
    let (peer, _) = rules.attach(&opened).unwrap();
    assert_eq!(
        events(&mut rules, &peer),
        [config("a", b"1"), config("b", b"2")]
    );
    // Connected: queued at once, the latest of a topic wins; an unchanged value is not
    // written again.
    deliver(&mut rules, "b", b"3").unwrap();
    deliver(&mut rules, "b", b"4").unwrap();
    deliver(&mut rules, "b", b"4").unwrap();
    assert_eq!(events(&mut rules, &peer), [config("b", b"4")]);
    // A value that cannot be persisted is not kept.
    let failed = rules.deliver_configuration("i", "c", b"5", Instant::now(), |_| Err("disk full"));
    assert_eq!(failed, Err("disk full"));
    // Asking again, or connecting again, delivers what is kept.
    let resend = rules.handle(&peer, Request::RequestResendConfig);
    assert_eq!(result(&resend), EvpResult::Ok);
    assert_eq!(
        events(&mut rules, &peer),
        [config("a", b"1"), config("b", b"4")]
    );
    deliver(&mut rules, "a", b"6").unwrap();
    rules.detach(&peer);
    let (peer, _) = rules.attach(&opened).unwrap();
    assert_eq!(
        events(&mut rules, &peer),
        [config("a", b"6"), config("b", b"4")]
    );
    let written: Vec<usize> = persisted.iter().map(BTreeMap::len).collect();
    assert_eq!(
        written,
        [2, 2, 2, 2],
        "b=2, b=3, b=4, a=6: each time every topic"
    );
}

/// How a `CallMethod` to `i` is refused, after `set_up`.
fn check_refusal(set_up: impl FnOnce(&mut Rules, &Peer), instance: &str, expect: &str) {
    let (mut rules, peer) = one(settings());
    set_up(&mut rules, &peer);
    let answer = rules
        .call_method(instance, 7, "m", "{}", Instant::now())
        .unwrap_err();
    let text = error_text(&answer);
    assert!(text.contains(expect), "{text}");
    assert!(matches!(answer, Signal::RpcResponse { reqid: 7, .. }));
}

#[test]
fn direct_commands_the_instance_cannot_take_are_answered_by_the_broker() {
    let calls_7 =
        |r: &mut Rules, _: &Peer| r.call_method("i", 7, "m", "{}", Instant::now()).unwrap();
    check_refusal(
        |_, _| {},
        "absent",
        "instance absent is not running on this device",
    );
    let close = |r: &mut Rules, _: &Peer| {
        r.close("i");
    };
    check_refusal(close, "i", "instance i is stopping");
    check_refusal(calls_7, "i", "request 7 is already waiting for instance i");
    check_refusal(fill, "i", "instance i has too many queued events");
}

#[test]
fn a_command_is_answered_by_the_module_or_expires() {
    let (mut rules, peer) = one(settings());
    let t0 = Instant::now();
    rules.call_method("i", 1, "echo", "{}", t0).unwrap();
    let request = |id: u64, method: &str| Event::RpcRequest {
        id,
        method: method.into(),
        params: "{}".into(),
    };
    assert_eq!(rules.next_event(&peer), Popped::Event(request(1, "echo")));
    let handled = rules.handle(&peer, rpc_answer(1, "{\"ok\":1}", 5));
    let answer = Signal::RpcResponse {
        reqid: 1,
        instance: "i".into(),
        status: 0,
        response: "{\"ok\":1}".into(),
    };
    let then = Then::EmitAnswer {
        signal: answer,
        cb: cb(5),
    };
    assert_eq!(
        handled,
        Handled {
            response: Response::Simple(EvpResult::Ok),
            then
        }
    );
    rules.rpc_answered(&peer, cb(5), RpcResponseReason::Sent);
    let sent = Event::RpcResponse {
        cb: cb(5),
        reason: RpcResponseReason::Sent,
    };
    assert_eq!(rules.next_event(&peer), Popped::Event(sent));
    // Command 2 is never taken: at its deadline it is answered, and its event goes.
    rules.call_method("i", 2, "ignored", "{}", t0).unwrap();
    assert!(
        rules
            .expire_commands(t0 + Duration::from_millis(999))
            .is_empty()
    );
    let expired = rules.expire_commands(t0 + Duration::from_millis(1000));
    assert_eq!(expired.len(), 1);
    assert!(error_text(&expired[0]).contains("did not answer within 1000 ms"));
    assert_eq!(drain(&mut rules, &peer), (vec![], Popped::Empty));
}

#[test]
fn an_answer_too_big_for_the_hub_becomes_an_error_answer() {
    let (mut rules, peer) = one(settings());
    rules
        .call_method("i", 1, "m", "{}", Instant::now())
        .unwrap();
    let huge = "\u{1}".repeat(25_000);
    let handled = rules.handle(&peer, rpc_answer(1, &huge, 5));
    assert_eq!(result(&handled), EvpResult::TooBig);
    let Then::AnswerHub(signal) = &handled.then else {
        panic!("{:?}", handled.then)
    };
    assert!(error_text(signal).contains("does not fit one MQTT message"));
    // The hub has its answer: a second one, or the same again, answers no one.
    let again = rules.handle(&peer, rpc_answer(1, &huge, 6));
    assert_eq!(
        (result(&again), again.then),
        (EvpResult::TooBig, Then::Nothing)
    );
}

#[test]
fn a_module_that_leaves_gets_its_commands_answered_by_the_broker() {
    let (mut rules, peer) = one(settings());
    rules
        .call_method("i", 1, "m", "{}", Instant::now())
        .unwrap();
    let detached = rules.detach(&peer);
    assert!(!detached.removed);
    assert_eq!(detached.answers.len(), 1);
    assert!(error_text(&detached.answers[0]).contains("instance i disconnected before answering"));
    assert_eq!(
        rules.queued_bytes("i"),
        Some(0),
        "its command event goes with it"
    );
}

/// Collects every pending state, emitted (`emitted`) or not; the signals that were due.
fn flush_states(rules: &mut Rules, emitted: bool) -> Vec<Signal> {
    let mut signals = Vec::new();
    for s in rules.take_states() {
        signals.extend(s.signal());
        rules.state_sent(s, emitted);
    }
    signals
}

fn state_signal(value: &[u8]) -> Signal {
    Signal::State {
        instance: "i".into(),
        topic: "t".into(),
        value: value.to_vec(),
    }
}

fn state_cb(n: u64, reason: StateReason) -> Event {
    Event::State { cb: cb(n), reason }
}

#[test]
fn states_are_overwritten_before_collection_and_identical_ones_not_sent_again() {
    let (mut rules, peer) = one(settings());
    assert!(flush_states(&mut rules, true).is_empty(), "nothing pending");
    rules.handle(&peer, state("t", b"1", 1));
    rules.handle(&peer, state("t", b"2", 2));
    assert_eq!(
        events(&mut rules, &peer),
        [state_cb(1, StateReason::Overwritten)]
    );
    assert_eq!(flush_states(&mut rules, true), [state_signal(b"2")]);
    assert_eq!(events(&mut rules, &peer), [state_cb(2, StateReason::Sent)]);
    rules.handle(&peer, state("t", b"2", 3));
    assert_eq!(flush_states(&mut rules, true), []);
    assert_eq!(events(&mut rules, &peer), [state_cb(3, StateReason::Sent)]);
    // Not emitted: DENIED, and the value is not taken as reported.
    rules.handle(&peer, state("t", b"3", 4));
    assert_eq!(flush_states(&mut rules, false), [state_signal(b"3")]);
    assert_eq!(
        events(&mut rules, &peer),
        [state_cb(4, StateReason::Denied)]
    );
    rules.handle(&peer, state("t", b"3", 5));
    assert_eq!(flush_states(&mut rules, true), [state_signal(b"3")]);
}

#[test]
fn an_instance_states_are_bounded_by_their_encoded_share() {
    let (mut rules, peer) = one(settings());
    let send = |rules: &mut Rules, topic: &str, value: &[u8]| {
        result(&rules.handle(&peer, state(topic, value, 1)))
    };
    assert_eq!(send(&mut rules, "a", &[b'a'; 600]), EvpResult::Ok);
    assert_eq!(
        send(&mut rules, "b", &[b'b'; 600]),
        EvpResult::TooBig,
        "past the share"
    );
    assert_eq!(
        send(&mut rules, "c", &[1u8; 150]),
        EvpResult::TooBig,
        "measured escaped"
    );
    assert_eq!(
        send(&mut rules, "a", &[b'A'; 900]),
        EvpResult::Ok,
        "replacing frees"
    );
    flush_states(&mut rules, true);
    assert_eq!(
        send(&mut rules, "b", &[b'b'; 200]),
        EvpResult::TooBig,
        "reported counts"
    );
}

/// `n` entries `k = 1`.
fn entries(n: usize) -> Vec<(&'static str, &'static str)> {
    vec![("k", "1"); n]
}

#[test]
fn telemetry_goes_in_batches_of_whole_calls_and_a_full_batch_goes_at_once() {
    let (mut rules, peer) = one(Settings {
        telemetry_queue_bytes: 1 << 20,
        ..settings()
    });
    let flush = |full| Then::Flush { full };
    assert_eq!(
        rules.handle(&peer, telemetry(&entries(400), 1)).then,
        flush(false)
    );
    assert_eq!(
        rules.handle(&peer, telemetry(&entries(400), 2)).then,
        flush(false)
    );
    assert_eq!(
        rules.handle(&peer, telemetry(&entries(400), 3)).then,
        flush(true)
    );
    let batch_len = |b: &TelemetryBatch| match b.signal() {
        Some(Signal::Telemetry(e)) => e.len(),
        other => panic!("{other:?}"),
    };
    let first = rules.take_telemetry().unwrap();
    assert_eq!(batch_len(&first), 800);
    assert!(rules.telemetry_sent(first, true), "more waits");
    let second = rules.take_telemetry().unwrap();
    assert_eq!(batch_len(&second), 400);
    assert!(!rules.telemetry_sent(second, false));
    let reasons = [
        TelemetryReason::Sent,
        TelemetryReason::Sent,
        TelemetryReason::Error,
    ];
    let expect: Vec<Event> = (1..=3)
        .zip(reasons)
        .map(|(n, reason)| Event::Telemetry { cb: cb(n), reason })
        .collect();
    assert_eq!(events(&mut rules, &peer), expect);
    assert_eq!(rules.pending_telemetry_bytes("i"), Some(0));
}

#[test]
fn telemetry_waiting_is_bounded_per_instance_and_values_not_json_become_strings() {
    // 1024 bytes: each call below is 1 + 1 + 400 bytes.
    let (mut rules, peer) = one(settings());
    let value = format!("\"{}\"", "x".repeat(398));
    let call = |n| telemetry(&[("k", value.as_str())], n);
    assert_eq!(result(&rules.handle(&peer, call(1))), EvpResult::Ok);
    assert_eq!(result(&rules.handle(&peer, call(2))), EvpResult::Ok);
    assert_eq!(result(&rules.handle(&peer, call(3))), EvpResult::Again);
    let batch = rules.take_telemetry().unwrap();
    rules.telemetry_sent(batch, true);
    assert_eq!(result(&rules.handle(&peer, call(3))), EvpResult::Ok);
    let batch = rules.take_telemetry().unwrap();
    rules.telemetry_sent(batch, true);
    rules.handle(&peer, telemetry(&[("raw", "not json")], 4));
    let signal = rules.take_telemetry().unwrap().signal();
    let raw = ("i".to_owned(), "raw".to_owned(), "\"not json\"".to_owned());
    assert_eq!(signal, Some(Signal::Telemetry(vec![raw])));
}
