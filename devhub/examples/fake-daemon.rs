//! A stand-in for the agent's daemons, to test [`evp_devhub::Stack`] without them: run under
//! a daemon's binary name (a symlink), it owns that daemon's bus name on `--bus` and exits 0
//! on SIGTERM. With `FAKE_DAEMON_CHILD=<binary name>` that daemon also starts a `sleep`
//! it never stops (as a runtime leaves a spawned module) and writes its pid to
//! `<binary name>.child` in the current folder.

use anyhow::{Context, Result, bail};
use evp_devhub::stack::DAEMONS;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args();
    let argv0 = args.next().context("no argv[0]")?;
    let name = std::path::Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .context("argv[0] has no file name")?
        .to_owned();
    let spec = DAEMONS
        .iter()
        .find(|d| d.binary == name)
        .with_context(|| format!("{name} is not one of the daemons"))?;
    let (mut bus, mut config) = (None, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bus" => bus = args.next(),
            "--config" => config = args.next(),
            other => bail!("unexpected argument {other}"),
        }
    }
    let bus = bus.context("--bus is required")?;
    let config = config.context("--config is required")?;
    std::fs::metadata(&config).with_context(|| format!("reading {config}"))?;

    if std::env::var("FAKE_DAEMON_CHILD").ok().as_deref() == Some(name.as_str()) {
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .context("spawning sleep")?;
        std::fs::write(format!("{name}.child"), child.id().to_string())?;
    }

    let mut term = signal(SignalKind::terminate())?;
    let _conn = zbus::connection::Builder::address(bus.as_str())
        .name(spec.bus_name)
        .build()
        .await
        .with_context(|| format!("owning {}", spec.bus_name))?;
    println!("fake {name} owns {}", spec.bus_name);
    term.recv().await;
    Ok(())
}
