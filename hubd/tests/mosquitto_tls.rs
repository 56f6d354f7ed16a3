//! MQTT over mutual TLS against a real mosquitto: the broker's certificate is verified against
//! the configured CA, a wrong CA fails, and the insecure switch gets past it. Skipped when
//! mosquitto is not installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use evp_hubd::config::{HubSection, resolve};
use evp_hubd::core::{self, ConnectionState, Links};
use evp_hubd::device_config::DeviceConfigStore;
use tokio::sync::{mpsc, oneshot, watch};

fn mosquitto() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(params, key))
}

fn leaf(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    cn: &str,
    sans: Vec<String>,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(sans).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write_pki(dir: &Path) -> Pki {
    let (ca_cert, issuer) = ca("test ca");
    let (other_cert, _) = ca("other ca");
    let (server_cert, server_key) = leaf(&issuer, "broker", vec!["127.0.0.1".into()]);
    let (client_cert, client_key) = leaf(&issuer, "device-cn-7", vec![]);
    let w = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    w("server.pem", &server_cert);
    w("server.key", &server_key);
    Pki {
        ca: w("ca.pem", &ca_cert.pem()),
        other_ca: w("other-ca.pem", &other_cert.pem()),
        client_cert: w("client.pem", &client_cert),
        client_key: w("client.key", &client_key),
    }
}

fn start_broker(bin: &Path, dir: &Path) -> (Broker, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("mosquitto.conf");
    // `user root`: run as root, mosquitto would otherwise drop to its own user, which cannot
    // read the key files in this private temporary folder.
    std::fs::write(
        &conf,
        format!(
            "user root\npersistence false\nlistener {port} 127.0.0.1\nallow_anonymous true\n\
             cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
             require_certificate true\nuse_identity_as_username true\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let broker = Broker(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (broker, port);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("mosquitto did not listen on {port}");
}

/// Runs a session with `ca` and the insecure switch; true when it reached `connected`.
async fn connects(dir: &Path, port: u16, pki: &Pki, ca: &Path, insecure: bool) -> bool {
    let cfg = resolve(
        HubSection {
            mqtt_host: Some("127.0.0.1".into()),
            mqtt_port: Some(port),
            tls_ca_cert: Some(ca.to_owned()),
            tls_client_cert: Some(pki.client_cert.clone()),
            tls_client_key: Some(pki.client_key.clone()),
            tls_insecure_skip_verify: Some(insecure),
            ..Default::default()
        },
        |_| None,
    )
    .unwrap();
    let tls = evp_hubd::tls::load(cfg.tls.as_ref().unwrap(), insecure).unwrap();
    assert_eq!(tls.client_cn.as_deref(), Some("device-cn-7"));
    let options = core::mqtt_options(&cfg, Some(&tls));
    assert_eq!(options.client_id(), "device-cn-7");
    let (deployments_tx, _d) = watch::channel(None);
    let (_o, outcomes_rx) = mpsc::channel(1);
    let (config_tx, _c) = mpsc::channel(1);
    let (_s, status_rx) = watch::channel(None);
    let (connection_tx, mut connection) = watch::channel(ConnectionState::Disconnected);
    let links = Links {
        deployments: deployments_tx,
        outcomes: outcomes_rx,
        configurations: config_tx,
        status: status_rx,
        connection: connection_tx,
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let session = tokio::spawn(core::run(
        cfg,
        options,
        DeviceConfigStore::new(dir),
        None,
        links,
        async {
            let _ = stop_rx.await;
        },
    ));
    let ok = tokio::time::timeout(
        Duration::from_secs(4),
        connection.wait_for(|c| *c == ConnectionState::Connected),
    )
    .await
    .is_ok();
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), session)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_verifies_the_broker() {
    let Some(bin) = mosquitto() else {
        println!("mosquitto is not installed: skipping the MQTT TLS test");
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let (_broker, port) = start_broker(&bin, dir.path());
    assert!(connects(dir.path(), port, &pki, &pki.ca, false).await);
    assert!(
        !connects(dir.path(), port, &pki, &pki.other_ca, false).await,
        "a broker certificate from another CA is refused"
    );
    assert!(
        connects(dir.path(), port, &pki, &pki.other_ca, true).await,
        "the development switch skips verification"
    );
}
