//! A TCP relay on loopback between the device and its broker, which a test can cut: "the
//! broker is down" as the device sees it (connections refused, the open one reset), while the
//! hub driver stays connected to the broker itself and misses nothing the device sends.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The relay: listens on [`Relay::port`] and forwards to the broker while up.
pub struct Relay {
    /// Where the device connects.
    pub port: u16,
    up: Arc<watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl Relay {
    /// A relay to 127.0.0.1:`target`, up.
    pub async fn start(target: u16) -> Result<Relay> {
        let port = crate::free_port()?;
        let (up, _) = watch::channel(true);
        let up = Arc::new(up);
        let task = tokio::spawn(serve(port, target, Arc::clone(&up)));
        let relay = Relay { port, up, task };
        relay.wait_listening().await?;
        Ok(relay)
    }

    async fn wait_listening(&self) -> Result<()> {
        crate::wait_for("the relay to listen", crate::DEADLINE, async || {
            TcpStream::connect(("127.0.0.1", self.port)).await.ok()
        })
        .await
        .map(drop)
    }

    /// Cuts the device off: open connections are reset and new ones refused.
    pub fn down(&self) {
        self.up.send_replace(false);
    }

    /// Lets the device through again.
    pub async fn up(&self) -> Result<()> {
        self.up.send_replace(true);
        self.wait_listening().await
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(port: u16, target: u16, up: Arc<watch::Sender<bool>>) {
    let mut state = up.subscribe();
    loop {
        if state.wait_for(|u| *u).await.is_err() {
            return;
        }
        // Bound only while up, so that a connection attempt while down is refused (RST), as
        // by a host whose broker is not listening.
        let listener = match TcpListener::bind(("127.0.0.1", port))
            .await
            .context("binding the relay")
        {
            Ok(l) => l,
            Err(e) => {
                eprintln!("relay: {e:#}");
                return;
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((device, _)) = accepted else { continue };
                    let cut = up.subscribe();
                    tokio::spawn(forward(device, target, cut));
                }
                r = state.wait_for(|u| !*u) => {
                    if r.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

async fn forward(mut device: TcpStream, target: u16, mut cut: watch::Receiver<bool>) {
    let Ok(mut broker) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut device, &mut broker) => {}
        _ = cut.wait_for(|u| !*u) => {
            // SO_LINGER 0: the device sees a reset, as from a broker that went away. A zero
            // linger resets at once, so the drop that follows never blocks.
            #[expect(deprecated, reason = "SO_LINGER 0 resets at once; it never blocks")]
            let _ = device.set_linger(Some(std::time::Duration::ZERO));
        }
    }
}
