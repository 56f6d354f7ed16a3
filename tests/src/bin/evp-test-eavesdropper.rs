//! An outsider on the bus, for the policy test: run as an unprivileged user, it tries every
//! way an ordinary client has to read other connections' messages, and prints what it gets.
//!
//! Usage: `evp-test-eavesdropper <bus address>`. Prints `monitor: <outcome>` for its
//! `BecomeMonitor` attempt, `match <rule>: <outcome>` for each match rule, then `ready`, then
//! one `<type> <sender> <interface>.<member>` line per signal or method call it receives
//! (`signal`, `call`), until killed.

use std::io::Write;

use anyhow::{Context, Result};
use futures_util::StreamExt;

/// What an outsider asks for: sdk-broker's signals by plain match rules, and by eavesdropping
/// everything of its interface (which would also catch signals sent to hubd alone, and the
/// configurations and commands hubd sends sdk-broker); and the test's marker, which it may
/// receive, so the test knows when everything sent before the marker has been delivered.
const MATCH_RULES: [&str; 5] = [
    "type='signal',sender='org.evp.SdkBroker1'",
    "type='signal',interface='org.evp.SdkBroker1'",
    "eavesdrop='true',interface='org.evp.SdkBroker1'",
    "eavesdrop='true',sender='org.evp.SdkBroker1'",
    "type='signal',interface='org.evp.Test'",
];

fn outcome<T>(r: &zbus::Result<T>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("refused: {e}"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let address = std::env::args()
        .nth(1)
        .context("usage: evp-test-eavesdropper <bus address>")?;
    let mut out = std::io::stdout();
    // A connection that became a monitor can do nothing else, so it is a connection of its own.
    let monitor = zbus::connection::Builder::address(address.as_str())
        .build()
        .await
        .context("connecting to the bus")?;
    let became = zbus::fdo::MonitoringProxy::new(&monitor)
        .await?
        .become_monitor(&[], 0)
        .await;
    writeln!(
        out,
        "monitor: {}",
        outcome(&became.map_err(zbus::Error::from))
    )?;

    let conn = zbus::connection::Builder::address(address.as_str())
        .build()
        .await
        .context("connecting to the bus")?;
    // Messages are read from the connection's stream before any rule is added, so none is
    // missed.
    let mut messages = zbus::MessageStream::from(&conn);
    let mut monitored = zbus::MessageStream::from(&monitor);
    for rule in MATCH_RULES {
        let added = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "AddMatch",
                &rule,
            )
            .await;
        writeln!(out, "match {rule}: {}", outcome(&added))?;
    }
    writeln!(out, "ready")?;
    out.flush()?;
    loop {
        let msg = tokio::select! {
            m = messages.next() => m,
            m = monitored.next() => m,
        };
        let Some(Ok(msg)) = msg else { continue };
        let header = msg.header();
        let kind = match header.message_type() {
            zbus::message::Type::Signal => "signal",
            zbus::message::Type::MethodCall => "call",
            _ => continue,
        };
        let name = |n: Option<String>| n.unwrap_or_else(|| "-".to_owned());
        writeln!(
            out,
            "{kind} {} {}.{}",
            name(header.sender().map(|s| s.to_string())),
            name(header.interface().map(|s| s.to_string())),
            name(header.member().map(|s| s.to_string())),
        )?;
        out.flush()?;
    }
}
