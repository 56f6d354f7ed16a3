//! `evpctl`: see the library.

use anyhow::Result;
use clap::{Parser, Subcommand};

/// The operator's view of evp-agent on this device.
#[derive(Parser)]
#[command(version, about = "Inspect evp-agent on this device over D-Bus")]
struct Cli {
    /// D-Bus address; the system bus (or DBUS_SYSTEM_BUS_ADDRESS) by default.
    #[arg(long, global = true)]
    bus: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The deployment status: modules and instances with their state.
    Status {
        /// Print reconcilerd's JSON as it is.
        #[arg(long)]
        json: bool,
    },
    /// What each runtime hosts now.
    Instances,
    /// The hub connection.
    Hub,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let conn = evpctl::connect(cli.bus.as_deref()).await?;
    match cli.command {
        Command::Status { json } => {
            let status = evpctl::deployment_status(&conn).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", evpctl::format_status(&status));
            }
        }
        Command::Instances => {
            for [runtime, instance, module, status, failure] in evpctl::instances(&conn).await? {
                println!("{runtime:<10} {instance:<24} {module:<20} {status:<12} {failure}");
            }
        }
        Command::Hub => print!("{}", evpctl::hub(&conn).await?),
    }
    Ok(())
}
