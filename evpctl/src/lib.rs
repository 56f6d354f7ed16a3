//! evpctl: what an operator on the device asks the agent, over D-Bus. Every command reads the
//! daemons' public properties, so it needs no privilege beyond the bus policy's defaults.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use evp_schemas::DeploymentStatus;
use evp_schemas::dbus::{self, Hub1Proxy, Reconciler1Proxy, Runtime, Runtime1Proxy};

/// Connects to the bus at `address`, or to the system bus (`DBUS_SYSTEM_BUS_ADDRESS`).
pub async fn connect(address: Option<&str>) -> Result<zbus::Connection> {
    let builder = match address {
        Some(a) => zbus::connection::Builder::address(a),
        None => zbus::connection::Builder::system(),
    };
    builder.build().await.context("connecting to D-Bus")
}

/// The deployment status as reconcilerd publishes it.
pub async fn deployment_status(conn: &zbus::Connection) -> Result<DeploymentStatus> {
    let proxy = Reconciler1Proxy::new(conn)
        .await
        .context("reaching org.evp.Reconciler1")?;
    let json = proxy
        .deployment_status()
        .await
        .context("reading DeploymentStatus (is evp-reconcilerd running?)")?;
    DeploymentStatus::from_json(&json).context("reconcilerd sent a status that is not JSON")
}

/// A table of the deployment status, one line per module and instance.
pub fn format_status(status: &DeploymentStatus) -> String {
    let mut out = String::new();
    let reconcile = status
        .reconcile_status
        .map(|s| s.as_str())
        .unwrap_or("none yet");
    let _ = writeln!(
        out,
        "deployment {}  {}",
        status.deployment_id.as_deref().unwrap_or("(no id)"),
        reconcile
    );
    if let Some(m) = &status.failure_message {
        let _ = writeln!(out, "  failure: {m}");
    }
    for (id, m) in &status.modules {
        let status = serde_json::to_value(m.status).unwrap_or_default();
        let _ = writeln!(
            out,
            "  module   {id:<24} {:<12} {}",
            status.as_str().unwrap_or("?"),
            m.failure_message.as_deref().unwrap_or("")
        );
    }
    for (name, i) in &status.instances {
        let _ = writeln!(
            out,
            "  instance {name:<24} {:<12} module={} {}",
            i.status,
            i.module_id,
            i.failure_message.as_deref().unwrap_or("")
        );
    }
    out
}

/// What each runtime hosts now: `(runtime, instance, module, status, failure)`.
pub async fn instances(conn: &zbus::Connection) -> Result<Vec<[String; 5]>> {
    let mut rows = Vec::new();
    for runtime in Runtime::ALL {
        let (label, name, path) = (runtime.label(), runtime.name(), runtime.path());
        let proxy = Runtime1Proxy::builder(conn)
            .destination(name)
            .path(path)
            .build()
            .await
            .with_context(|| format!("reaching {name}"))?;
        let hosted = proxy
            .instances()
            .await
            .with_context(|| format!("reading Instances of {name}"))?;
        for (instance, module, status, failure) in hosted {
            rows.push([label.to_owned(), instance, module, status, failure]);
        }
    }
    Ok(rows)
}

/// hubd's connection state, protocol and device id.
pub async fn hub(conn: &zbus::Connection) -> Result<String> {
    let proxy = Hub1Proxy::new(conn)
        .await
        .context("reaching org.evp.Hub1")?;
    let connection = proxy
        .connection()
        .await
        .map_err(|e| anyhow::anyhow!("reading Connection: {}", dbus::error_message(&e)))?;
    let protocol = proxy.protocol().await.unwrap_or_default();
    let device_id = proxy.device_id().await.unwrap_or_default();
    Ok(format!(
        "connection {connection}\nprotocol   {protocol}\ndevice id  {device_id}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use evp_schemas::{InstanceState, InstanceStatus, ReconcileStatus};

    #[test]
    fn status_table_names_each_instance_and_its_failure() {
        let mut status = DeploymentStatus {
            deployment_id: Some("dep-1".into()),
            reconcile_status: Some(ReconcileStatus::Error),
            ..Default::default()
        };
        status.instances.insert(
            "cam".into(),
            InstanceStatus {
                status: InstanceState::Error,
                module_id: "m".into(),
                failure_message: Some("exited with status 3".into()),
            },
        );
        let text = format_status(&status);
        assert!(text.starts_with("deployment dep-1  error"), "{text}");
        assert!(
            text.contains("cam") && text.contains("exited with status 3"),
            "{text}"
        );
    }
}
