//! mosquitto as a real process on a free loopback port, plain or with mutual TLS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Files for a TLS listener that requires client certificates.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// Server certificate (SAN 127.0.0.1).
    pub cert: PathBuf,
    /// Server key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The broker's side of a test PKI.
    pub fn server_of(pki: &crate::certs::Pki) -> TlsFiles {
        TlsFiles {
            ca: pki.ca.clone(),
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
        }
    }
}

/// A running mosquitto; killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    binary: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    /// Its plain port on 127.0.0.1 (the hub driver's).
    pub port: u16,
    /// Its mutual-TLS port on 127.0.0.1, when started with TLS (the device's).
    pub tls_port: Option<u16>,
}

/// The mosquitto binary: the Debian locations first, then `PATH`.
pub fn binary() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/usr/bin"]
        .into_iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .context("mosquitto is not installed (apt-get install mosquitto)")
}

impl Mosquitto {
    /// Starts mosquitto in `dir` (its config and log go there): a plain listener, and a second
    /// one that requires client certificates when `tls` is given.
    pub fn start(dir: &Path, tls: Option<&TlsFiles>) -> Result<Mosquitto> {
        Self::start_with(dir, crate::free_port()?, tls, "")
    }

    /// A node of a broker cluster, as a hub behind several addresses has: a plain listener on
    /// `port`, bridged both ways for every topic to the mosquitto on 127.0.0.1:`core` (where
    /// the hub listens) as the connection `name`, so a device on any node reaches the hub. Its
    /// files go in `dir`, which must not hold another mosquitto's.
    pub fn start_node(dir: &Path, port: u16, core: u16, name: &str) -> Result<Mosquitto> {
        // QoS 1 both ways, as the device's reports and the hub's changes are sent; a short
        // restart_timeout so that a node brought back rejoins within a second; the client id
        // names the state topic on the core (`$SYS/broker/connection/<client id>/state`).
        let bridge = format!(
            "connection {name}\naddress 127.0.0.1:{core}\nremote_clientid {name}\n\
             topic # both 1\ncleansession true\nrestart_timeout 1\n"
        );
        Self::start_with(dir, port, None, &bridge)
    }

    fn start_with(
        dir: &Path,
        port: u16,
        tls: Option<&TlsFiles>,
        extra_conf: &str,
    ) -> Result<Mosquitto> {
        let binary = binary()?;
        // No bound on the messages queued for a slow subscriber (mosquitto drops beyond 1000
        // by default): a draining spool outruns the hub driver, and a test must see it all.
        let mut conf = format!(
            "persistence false\nlog_dest stderr\nallow_anonymous true\nmax_queued_messages 0\n\
             listener {port} 127.0.0.1\n"
        );
        // Run as root, mosquitto drops to its own user, which could not read the test's files.
        if nix::unistd::geteuid().is_root() {
            conf.push_str("user root\n");
        }
        let tls_port = match tls {
            None => None,
            Some(t) => {
                let tls_port = crate::free_port()?;
                conf.push_str(&format!(
                    "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
                    t.ca.display(),
                    t.cert.display(),
                    t.key.display()
                ));
                Some(tls_port)
            }
        };
        // Last: a bridge section takes every line after it.
        conf.push_str(extra_conf);
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf)?;
        let log = dir.join("mosquitto.log");
        std::fs::File::create(&log)?;
        let mut m = Mosquitto {
            child: None,
            binary,
            conf: conf_path,
            log,
            port,
            tls_port,
        };
        m.spawn()?;
        Ok(m)
    }

    /// Kills mosquitto and reaps it; its ports stay reserved for [`Mosquitto::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops mosquitto if it runs, then starts it again with the same configuration and on
    /// the same ports, and returns once it listens. Its log goes on in the same file.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// What mosquitto logged so far (each connection, with its client id and user name).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Runs mosquitto on the written configuration and waits until each of its ports accepts.
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mosquitto")?;
        let child = self.child.insert(child);
        let ports: Vec<u16> = std::iter::once(self.port).chain(self.tls_port).collect();
        let end = std::time::Instant::now() + crate::DEADLINE;
        while ports
            .iter()
            .any(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_err())
        {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                bail!("mosquitto exited with {status}:\n{log}");
            }
            if std::time::Instant::now() > end {
                bail!("mosquitto did not listen on {ports:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// Waits until the bridge `name` of a [`Mosquitto::start_node`] is connected to the mosquitto
/// on 127.0.0.1:`core`, as that one tells in its retained `$SYS/broker/connection/<name>/state`
/// (`1` up, `0` down).
pub async fn wait_bridge_up(core: u16, name: &str) -> Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let topic = format!("$SYS/broker/connection/{name}/state");
    let (client, mut eventloop) = AsyncClient::new(
        MqttOptions::new(format!("bridge-watch-{name}"), "127.0.0.1", core),
        8,
    );
    client.subscribe(&topic, QoS::AtMostOnce).await?;
    let up = tokio::time::timeout(crate::DEADLINE, async {
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Packet::Publish(p))
                    if p.topic == topic && p.payload[..] == b"1"[..] =>
                {
                    return anyhow::Ok(());
                }
                _ => {}
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    up.with_context(|| {
        format!(
            "the bridge {name} did not connect within {:?}",
            crate::DEADLINE
        )
    })?
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}
