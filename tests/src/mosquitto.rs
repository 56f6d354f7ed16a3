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

/// A running mosquitto; killed on drop.
pub struct Mosquitto {
    child: Child,
    /// Its plain port on 127.0.0.1 (the hub driver's).
    pub port: u16,
    /// Its mutual-TLS port on 127.0.0.1, when started with TLS (the device's).
    pub tls_port: Option<u16>,
}

impl Mosquitto {
    /// Starts mosquitto in `dir` (its config and log go there): a plain listener, and a second
    /// one that requires client certificates when `tls` is given.
    pub fn start(dir: &Path, tls: Option<&TlsFiles>) -> Result<Mosquitto> {
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("mosquitto is not installed (apt-get install mosquitto)")?;
        let port = crate::free_port()?;
        let mut conf = format!(
            "persistence false\nlog_dest stderr\nallow_anonymous true\nlistener {port} 127.0.0.1\n"
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
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf)?;
        let log = std::fs::File::create(dir.join("mosquitto.log"))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mosquitto")?;
        let mut m = Mosquitto {
            child,
            port,
            tls_port,
        };
        let end = std::time::Instant::now() + crate::DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = m.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default();
                bail!("mosquitto exited with {status}:\n{log}");
            }
            if std::time::Instant::now() > end {
                bail!("mosquitto did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
