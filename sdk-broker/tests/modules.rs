//! The test modules (`sdk/test-modules`) as processes against an in-process sdk-broker: what
//! the system tests will see through hubd, checked here at the broker's signals. The modules
//! know only the wire format: they are separate binaries, built by `cargo build --workspace`.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use evp_sdk_broker::{Broker, ChannelSink, Settings, Signal};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// How long a step may take: generous, because the machine's two cores may be busy with other
/// tests; the wait ends as soon as the signal comes.
const PATIENCE: Duration = Duration::from_secs(30);

/// A test module's binary, beside this test's own executable (`target/<profile>/`).
fn module_bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("the test's own path");
    let deps = exe.parent().expect("the test's folder");
    let dir = match deps.file_name() {
        Some(n) if n == "deps" => deps.parent().unwrap_or(deps),
        _ => deps,
    };
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin.to_string_lossy().into_owned()
}

struct Module(Child);

impl Drop for Module {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &str, socket: &Path) -> Module {
    Module(
        Command::new(bin)
            .env_clear()
            .env("EVP_MODULE_SDK_SOCKET_PATH", socket)
            .env("EVP_MODULE_SDK_DEFAULT_WORKSPACE_PATH", "/nonexistent")
            .spawn()
            .unwrap(),
    )
}

async fn signal(rx: &mut UnboundedReceiver<Signal>) -> Signal {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("signal in time")
        .unwrap()
}

/// The next state of `topic` from `instance`, skipping other signals.
async fn state(rx: &mut UnboundedReceiver<Signal>, instance: &str, topic: &str) -> String {
    loop {
        if let Signal::State {
            instance: i,
            topic: t,
            value,
        } = signal(rx).await
            && i == instance
            && t == topic
        {
            return String::from_utf8(value).unwrap();
        }
    }
}

async fn exits_cleanly(broker: &Arc<Broker>, instance: &str, mut m: Module) {
    broker.close_instance(instance).await;
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = m.0.try_wait().unwrap() {
            assert!(status.success(), "{instance}: {status}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{instance} did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_modules_behave_as_documented() {
    let dirs = tempfile::tempdir().unwrap();
    let (tx, mut rx) = unbounded_channel();
    let broker = Broker::new(
        Settings {
            event_queue_bytes: 32 * 1024,
            rpc_timeout_ms: 5_000,
            ..Settings::default()
        },
        dirs.path().join("run"),
        dirs.path().join("data"),
        Arc::new(ChannelSink(tx)),
    )
    .unwrap();
    broker.start();
    let routing = serde_json::json!({"instances": {
        "sender": {"publish": {"out": "t"}, "subscribe": {}},
        "receiver": {"publish": {}, "subscribe": {"in": "t"}}
    }});
    broker.set_routing(&routing.to_string()).unwrap();

    // config -> state
    let sock = broker.open_instance("echo").unwrap();
    broker
        .deliver_configuration("echo", "greeting", b"hello")
        .unwrap();
    let m = spawn(&module_bin("evp-test-config-echo"), &sock);
    assert_eq!(state(&mut rx, "echo", "greeting").await, "hello");
    exits_cleanly(&broker, "echo", m).await;

    // config -> telemetry
    let sock = broker.open_instance("tel").unwrap();
    let m = spawn(&module_bin("evp-test-config-telemetry"), &sock);
    broker
        .deliver_configuration("tel", "room", b"{\"t\":21}")
        .unwrap();
    loop {
        if let Signal::Telemetry(e) = signal(&mut rx).await {
            assert_eq!(e, [("tel".into(), "room".into(), "{\"t\":21}".into())]);
            break;
        }
    }
    exits_cleanly(&broker, "tel", m).await;

    // a direct command answered
    let sock = broker.open_instance("rpc").unwrap();
    let m = spawn(&module_bin("evp-test-rpc-echo"), &sock);
    // Queued until the module connects; it registers its handler before processing events.
    broker
        .call_method("rpc", 10042, "echo", "{\"text\":\"hi\"}")
        .await;
    loop {
        if let Signal::RpcResponse {
            reqid,
            status,
            response,
            ..
        } = signal(&mut rx).await
        {
            assert_eq!(
                (reqid, status, response.as_str()),
                (10042, 0, "{\"text\":\"hi\"}")
            );
            break;
        }
    }
    exits_cleanly(&broker, "rpc", m).await;

    // 1000 messages from one instance to another, counted
    let rx_sock = broker.open_instance("receiver").unwrap();
    let tx_sock = broker.open_instance("sender").unwrap();
    let receiver = spawn(&module_bin("evp-test-msg-receiver"), &rx_sock);
    let sender = spawn(&module_bin("evp-test-msg-sender"), &tx_sock);
    broker
        .deliver_configuration("sender", "count", b"1000")
        .unwrap();
    // The two reports come in either order; the receiver's last one may come first.
    let (mut sent, mut received) = (None, None);
    while sent.is_none() || received.as_deref() != Some("1000") {
        if let Signal::State {
            instance,
            topic,
            value,
        } = signal(&mut rx).await
        {
            let value = String::from_utf8(value).unwrap();
            match (instance.as_str(), topic.as_str()) {
                ("sender", "sent") => sent = Some(value),
                ("receiver", "received") => received = Some(value),
                _ => {}
            }
        }
    }
    assert_eq!(sent.unwrap(), "{\"errors\":0,\"sent\":1000}");
    exits_cleanly(&broker, "sender", sender).await;
    exits_cleanly(&broker, "receiver", receiver).await;

    // a telemetry flood meets back-pressure
    let sock = broker.open_instance("flood").unwrap();
    let m = spawn(&module_bin("evp-test-telemetry-flood"), &sock);
    broker
        .deliver_configuration("flood", "flood", b"5000")
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&state(&mut rx, "flood", "flood").await).unwrap();
    assert_eq!(report["accepted"], 5000);
    assert_eq!(report["sent"], 5000);
    assert!(report["again"].as_u64().unwrap() > 0, "{report}");
    assert!(broker.queued_bytes("flood").unwrap() <= 32 * 1024);
    exits_cleanly(&broker, "flood", m).await;
}
