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
        let (port, up, task) =
            Cuttable::start(move |device, cut| forward(device, target, cut)).await?;
        Ok(Relay { port, up, task })
    }

    /// Cuts the device off: open connections are reset and new ones refused.
    pub fn down(&self) {
        self.up.send_replace(false);
    }

    /// Lets the device through again.
    pub async fn up(&self) -> Result<()> {
        self.up.send_replace(true);
        wait_listening(self.port).await
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback listener that serves each connection with a handler while up, and while down
/// refuses connections (RST, as a host whose server is not listening) and has the handlers
/// reset theirs: the relay's and the test proxy's way of being cut.
pub(crate) struct Cuttable;

impl Cuttable {
    /// Listens on a free port and serves each connection with `handle(stream, cut)`, where
    /// `cut` turns false when the listener is cut; the port, the switch and the serving task.
    pub(crate) async fn start<F, Fut>(
        handle: F,
    ) -> Result<(u16, Arc<watch::Sender<bool>>, JoinHandle<()>)>
    where
        F: Fn(TcpStream, watch::Receiver<bool>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let port = crate::free_port()?;
        let (up, _) = watch::channel(true);
        let up = Arc::new(up);
        let task = tokio::spawn(serve(port, Arc::clone(&up), handle));
        wait_listening(port).await?;
        Ok((port, up, task))
    }
}

/// Returns once 127.0.0.1:`port` accepts connections.
pub(crate) async fn wait_listening(port: u16) -> Result<()> {
    crate::wait_for("the relay to listen", crate::DEADLINE, async || {
        TcpStream::connect(("127.0.0.1", port)).await.ok()
    })
    .await
    .map(drop)
}

async fn serve<F, Fut>(port: u16, up: Arc<watch::Sender<bool>>, handle: F)
where
    F: Fn(TcpStream, watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
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
                    tokio::spawn(handle(device, up.subscribe()));
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

/// Copies between `device` and `upstream` until either closes or `cut` turns false, when the
/// device is reset.
pub(crate) async fn pipe(
    mut device: TcpStream,
    mut upstream: TcpStream,
    mut cut: watch::Receiver<bool>,
) {
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut device, &mut upstream) => {}
        _ = cut.wait_for(|u| !*u) => {
            // SO_LINGER 0: the device sees a reset, as from a broker that went away. A zero
            // linger resets at once, so the drop that follows never blocks.
            #[expect(deprecated, reason = "SO_LINGER 0 resets at once; it never blocks")]
            let _ = device.set_linger(Some(std::time::Duration::ZERO));
        }
    }
}

async fn forward(device: TcpStream, target: u16, cut: watch::Receiver<bool>) {
    let Ok(broker) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    pipe(device, broker, cut).await;
}
