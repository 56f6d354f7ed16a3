//! `evp-hubd`: see the library.

use clap::Parser;

/// evp-agent hubd.
#[derive(Parser)]
#[command(version, about = "evp-agent hubd: the MQTT connection to the hub")]
struct Cli {
    #[command(flatten)]
    daemon: evp_daemon::DaemonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    evp_daemon::init_logging("evp-hubd");
    evp_hubd::run(Cli::parse().daemon).await
}
