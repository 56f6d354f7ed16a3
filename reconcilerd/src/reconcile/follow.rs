//! The loop's bus inputs: the runtimes' `InstanceChanged` (its status word parsed here, where
//! the signal arrives) and the owner changes of the runtimes' and sdk-broker's names.

use evp_schemas::InstanceState;
use evp_schemas::dbus::SdkBroker1Proxy;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::warn;
use zbus::Connection;

use super::{Event, Runtime, runtime_proxy};

/// Subscribes to both runtimes' `InstanceChanged` and to their names' owner changes, and
/// forwards them into the loop. Subscriptions are made before this returns, so nothing the
/// runtimes say after the loop first reads their `Instances` is missed.
pub async fn follow_runtimes(conn: &Connection, events: mpsc::UnboundedSender<Event>) {
    match SdkBroker1Proxy::new(conn).await {
        Ok(sdk) => match sdk.inner().receive_owner_changed().await {
            Ok(mut stream) => {
                let tx = events.clone();
                tokio::spawn(async move {
                    // Only changes come: a new owner is a (re)started sdk-broker, which knows
                    // none of the sockets the placed instances were started with.
                    while let Some(owner) = stream.next().await {
                        let Some(owner) = owner else { continue };
                        if tx.send(Event::SdkBrokerBack(owner.to_string())).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => warn!("cannot follow sdk-broker on the bus: {e}"),
        },
        Err(e) => warn!("cannot follow sdk-broker on the bus: {e}"),
    }
    for rt in Runtime::ALL {
        let proxy = match runtime_proxy(conn, rt).await {
            Ok(p) => p,
            Err(e) => {
                warn!(runtime = rt.name(), "cannot follow: {e}");
                continue;
            }
        };
        match proxy.receive_instance_changed().await {
            Ok(mut stream) => {
                let tx = events.clone();
                tokio::spawn(async move {
                    while let Some(signal) = stream.next().await {
                        let Ok(args) = signal.args() else { continue };
                        let ev = Event::Instance {
                            runtime: rt,
                            instance: args.instance().to_string(),
                            state: InstanceState::parse(args.status()),
                            failure: args.failure_message().to_string(),
                        };
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => warn!(
                runtime = rt.name(),
                "cannot follow its instance changes: {e}"
            ),
        }
        match proxy.inner().receive_owner_changed().await {
            Ok(mut stream) => {
                let tx = events.clone();
                tokio::spawn(async move {
                    while let Some(owner) = stream.next().await {
                        let ev = Event::Owner {
                            runtime: rt,
                            present: owner.is_some(),
                        };
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => warn!(
                runtime = rt.name(),
                "cannot follow its presence on the bus: {e}"
            ),
        }
    }
}
